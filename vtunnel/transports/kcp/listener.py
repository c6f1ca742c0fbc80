"""The ``kcp://`` listener: a :class:`~vtunnel.transports.kcp.routing.DatagramListener` whose sessions are KCP
links; and :func:`kcp_link`, how a KCP session's link is built, on a listener and on a client alike."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Final, TypeVar

import structlog

from vtunnel.arq.fec import FEC_OVERHEAD
from vtunnel.arq.kcp_engine import KCPEngine
from vtunnel.arq.kcp_options import KCPOptions
from vtunnel.arq.kcp_wire import conv_of, is_new_session
from vtunnel.io.datagrams import Address
from vtunnel.transports.kcp.codec import Datagram, ListenerCodec, RoutedLink, Transmit
from vtunnel.transports.kcp.fec import FECLink, fec_transmitter, opens_fec_session
from vtunnel.transports.kcp.link import KCPLink
from vtunnel.transports.kcp.routing import DatagramListener

__all__ = ["KCPListener", "kcp_link"]

log = structlog.get_logger("vtunnel.transports.kcp")

C = TypeVar("C", bound=ListenerCodec[Any])
#: the longest a listener stays quiet about first datagrams of the other FEC kind (seconds)
_MISMATCH_LOG_PERIOD: Final = 60.0


def kcp_link(
    options: KCPOptions,
    conv: int,
    overhead: int,
    transmit: Transmit,
    local: Address,
    peer: Address,
    on_close: Callable[[RoutedLink], None],
) -> KCPLink:
    """The link of a KCP session ``conv`` whose datagrams a codec of ``overhead`` bytes carries: an
    :class:`~vtunnel.transports.kcp.fec.FECLink` with ``options.fec``, else a :class:`KCPLink`. Raises
    :class:`~vtunnel.arq.kcp_engine.KCPEngineError` for options ikcp refuses."""
    link = KCPLink
    if options.fec is not None:
        overhead += FEC_OVERHEAD
        transmit = fec_transmitter(transmit, options.fec)
        link = FECLink
    now = asyncio.get_running_loop().time()
    engine = KCPEngine(conv=conv, options=options, mtu=options.mtu - overhead, now=now)
    return link(
        engine=engine,
        options=options,
        transmit=transmit,
        local_address=local,
        remote_address=peer,
        on_close=on_close,
    )


class KCPListener(DatagramListener[C]):
    """Accepts KCP sessions on one UDP socket, its datagrams read by ``codec``; each accepted session is one
    :class:`KCPLink` (an :class:`~vtunnel.transports.kcp.fec.FECLink` with ``fec``), started by a PUSH of sequence
    number 0."""

    def __init__(self, sock: Any, options: KCPOptions, codec: C) -> None:
        self._options = options
        self._mismatch_logged = -_MISMATCH_LOG_PERIOD
        #: first datagrams of the other kind (FEC packets without ``fec``, bare KCP with it): no session started
        self.fec_mismatches = 0
        super().__init__(
            sock,
            codec,
            limit=options.sessions,
            tombstone=2.0 * options.timeout,
            opens=self._opens,
            new_link=self._new_link,
        )

    def _opens(self, first: Datagram) -> bool:
        shards = self._options.fec
        fec = shards is not None
        if (opens_fec_session if fec else is_new_session)(first):
            return True
        if (is_new_session if fec else opens_fec_session)(first):
            self.fec_mismatches += 1
            now = asyncio.get_running_loop().time()
            if now - self._mismatch_logged >= _MISMATCH_LOG_PERIOD:
                self._mismatch_logged = now
                log.warning(
                    "a kcp client's fec differs from this listener's: no session started (set the same fec on "
                    "both ends)",
                    fec="off" if shards is None else f"{shards[0]}/{shards[1]}",
                    client="fec off" if fec else "fec on",
                )
        return False

    def _new_link(
        self, first: Datagram, address: Address, transmit: Transmit, on_close: Callable[[RoutedLink], None]
    ) -> KCPLink:
        offset = 0 if self._options.fec is None else FEC_OVERHEAD
        conv = conv_of(memoryview(first)[offset:])
        log.debug("kcp session opened", conv=conv, peer=address, sessions=self.session_count + 1)
        return kcp_link(
            self._options, conv, self.codec.overhead, transmit, self.local_address, address, on_close
        )
