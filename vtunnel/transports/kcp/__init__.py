"""``kcp://``: tunnels over KCP (the C ikcp through ``siokcp``) on UDP, plain or sealed by a pre-shared key.

One link (:mod:`.link`, one KCP session), one listener (:mod:`.listener`) and one client (:mod:`.client`), each
reading its datagrams through a codec (:mod:`.codec`): :mod:`.plain` (sessions by conv, or by source address for
conv 0) or :mod:`.sealed` (sessions by authenticated connection ID); the listener's session routing
(:mod:`.routing`) is the same for both. With ``fec=D/P`` the session's datagrams travel as kcp-go's FEC
packets between the link and the codec (:mod:`.fec`). :mod:`.transport` is what the registry names,
:mod:`.options` reads the ``kcp://`` URL. Runs on asyncio (or uvloop) only; trio is not supported for ``kcp://``.
"""

from vtunnel.transports.kcp.link import KCPLink
from vtunnel.transports.kcp.listener import KCPListener
from vtunnel.transports.kcp.transport import KCPTransport

__all__ = ["KCPLink", "KCPListener", "KCPTransport"]
