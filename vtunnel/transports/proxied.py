"""``proxy=1`` on a ``tcp://`` or ``tls://`` listener: every connection begins with a PROXY protocol header (v1 or
v2, HAProxy's ``send-proxy`` / ``send-proxy-v2``) naming the client behind the balancer; one without a valid
header is refused. The header is read with :class:`~vtunnel.security.proxy_header.ProxyHeaderReader`, never a
byte past its end, before the transport's own handshake (TLS) and the key's (docs/deploy-haproxy.md)."""

from __future__ import annotations

import anyio
import structlog
from anyio.abc import ByteStream

from vtunnel.security.proxy_header import ProxyHeaderError, ProxyHeaderReader
from vtunnel.transports.link import Refusals

__all__ = ["read_proxy_header"]

log = structlog.get_logger("vtunnel.transports")


async def read_proxy_header(stream: ByteStream, *, peer: str, refusals: Refusals) -> str | None:
    """Read the PROXY header at the start of ``stream`` (from ``peer``, the balancer): the client's address it
    names (``peer`` itself for a header that names none: the balancer's own health check), or None when the
    connection has no valid header (logged, and counted as the probe ``proxy``; the caller closes it)."""
    reader = ProxyHeaderReader()
    try:
        while (header := reader.feed(await stream.receive(reader.wanted()))) is None:
            pass
    except ProxyHeaderError as exc:
        log.info("connection refused: no valid PROXY header", peer=peer, reason=str(exc))
        refusals.probes["proxy"] += 1
        return None
    except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
        refusals.probes["closed"] += 1
        return None
    return header.source[0] if header.source is not None else peer
