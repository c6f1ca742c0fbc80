"""The least a Python process can do on the path: a TCP relay that writes each read to the other side at once.

    python -m bench.floor --listen HOST:PORT --to HOST:PORT

Every accepted connection gets one connection to ``--to``; bytes read on either side are written to the other in
the same callback (asyncio protocols on uvloop when it is installed, as ``vtunnel run`` uses), with no framing,
multiplexing, flow-control bookkeeping or encryption. Two of these in a row (the ``python-floor`` system of the
harness: one in the client's place of the agent, one in the server's) put two Python processes on the path of a
request and its answer, as a tunnel's agent and server do: the round trip they give is what any tunnel written
in Python pays on this machine before doing anything of its own, the floor under vtunnel's latency rows. Logs
``listening`` on stderr once it accepts; loopback only. A development tool, not part of vtunnel.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys


class _Side(asyncio.Protocol):
    """One connection of a pair; what it reads goes to its peer's transport, and its end ends the peer's.

    The accepted side is made first and holds what it reads until the outgoing side (made with ``peer``) is
    connected; that side pairs the two in its ``connection_made``."""

    def __init__(self, peer: _Side | None = None) -> None:
        self.transport: asyncio.WriteTransport | None = None
        self.peer = peer
        self.pending: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a stream transport: create_server/connection
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peer = self.peer
        if peer is not None:  # the outgoing side: pair, and send what the accepted side held
            peer.peer = self
            for data in peer.pending:
                self.transport.write(data)  # type: ignore[union-attr]
            peer.pending.clear()

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        if peer is not None and peer.transport is not None:
            peer.transport.write(data)
        else:  # the outgoing connection is not up yet
            self.pending.append(data)

    def eof_received(self) -> bool:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.write_eof()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()


async def _serve(listen: tuple[str, int], to: tuple[str, int]) -> None:
    loop = asyncio.get_running_loop()
    dials: set[asyncio.Task[object]] = set()

    async def dial(inner: _Side) -> None:
        try:
            await loop.create_connection(lambda: _Side(inner), *to)
        except OSError:
            if inner.transport is not None:
                inner.transport.close()

    def accepted() -> _Side:
        inner = _Side()
        task: asyncio.Task[object] = loop.create_task(dial(inner))
        dials.add(task)
        task.add_done_callback(dials.discard)
        return inner

    server = await loop.create_server(accepted, *listen, reuse_address=True)
    print("listening", listen, file=sys.stderr, flush=True)
    async with server:
        await server.serve_forever()


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if host not in ("127.0.0.1", "localhost", "::1") and not host.startswith("127."):
        raise argparse.ArgumentTypeError(f"{text}: loopback only")
    return host, int(port)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.floor", description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", type=_address, required=True, help="HOST:PORT to accept on (loopback)")
    parser.add_argument("--to", type=_address, required=True, help="HOST:PORT each connection is relayed to")
    args = parser.parse_args(argv)
    try:
        import uvloop
    except ImportError:  # the standard loop, as vtunnel falls back to
        asyncio.run(_serve(args.listen, args.to))
    else:
        uvloop.run(_serve(args.listen, args.to))


if __name__ == "__main__":
    main()
