"""``kcp://``: tunnels over KCP (the C ikcp through ``siokcp``) on UDP, plain or sealed by a pre-shared key."""

from vtunnel.transports.kcp.link import KCPLink
from vtunnel.transports.kcp.listener import KCPListener
from vtunnel.transports.kcp.transport import KCPTransport

__all__ = ["KCPLink", "KCPListener", "KCPTransport"]
