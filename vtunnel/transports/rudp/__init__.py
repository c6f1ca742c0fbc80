"""``rudp://``: tunnels over rudp (:mod:`vtunnel.arq.rudp`, vtunnel's own reliable UDP) on UDP, keyless or sealed by
a pre-shared key.

One link (:mod:`.link`, one rudp connection driven like ``kcp://``'s KCP session), one listener (:mod:`.listener`)
and one client (:mod:`.client`). What is not rudp's is ``kcp://``'s, shared: the session routing
(:mod:`vtunnel.transports.kcp.routing`), the sealed codec (:mod:`vtunnel.transports.kcp.sealed`: handshake,
connection IDs, path validation, stateless reset) and the keyless codec's frame (:mod:`.plain` keys it by rudp's
connection ID). :mod:`.transport` is what the registry names, :mod:`.options` reads the ``rudp://`` URL. Runs on
asyncio (or uvloop) only.
"""

from vtunnel.transports.rudp.link import RudpLink
from vtunnel.transports.rudp.listener import RudpListener
from vtunnel.transports.rudp.transport import RudpTransport

__all__ = ["RudpLink", "RudpListener", "RudpTransport"]
