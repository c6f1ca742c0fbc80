"""Many tunnels from one process: ``python -m bench.tunnels --server URL --count N [--psk-file F]``.

Opens ``N`` vtunnel tunnels (each its own transport connection and handshake) to one server with vtunnel's tunnel
pool and prints ``{"ok": true, "tunnels": N, ...}`` once all are up. It then reads commands from stdin, one per
line: ``streams`` opens one stream in every tunnel, proves it with a 64-byte echo (the server's target must be the
bench workload server), keeps it open and answers ``{"ok": true, "streams": N}``; ``close`` (or end of input, or
``--hold`` seconds without a command) shuts everything down. The harness reads the server's RSS between steps.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from typing import Any

import anyio
import structlog
from anyio.abc import ByteStream

from bench.workload import ECHO_MAGIC, MESSAGE_SIZE

__all__ = ["main"]


def _emit(payload: dict[str, object]) -> None:
    sys.stdout.write(json.dumps(payload) + "\n")
    sys.stdout.flush()


async def _echo_stream(conn: Any) -> ByteStream:
    from vtunnel.runtime.byte_stream import TunnelByteStream

    stream = TunnelByteStream(await conn.open_stream(None))
    message = ECHO_MAGIC + bytes(MESSAGE_SIZE - len(ECHO_MAGIC))
    await stream.send(message)
    got = b""
    while len(got) < MESSAGE_SIZE:
        got += await stream.receive(MESSAGE_SIZE - len(got))
    if got != message:
        raise RuntimeError("the echo through a tunnel came back different")
    return stream


async def _open_streams(conns: Sequence[Any], limit: float) -> list[ByteStream]:
    streams: list[ByteStream] = []
    gate = anyio.Semaphore(16)

    async def one(conn: Any) -> None:
        async with gate:
            streams.append(await _echo_stream(conn))

    with anyio.fail_after(limit):
        async with anyio.create_task_group() as tg:
            for conn in conns:
                tg.start_soon(one, conn)
    return streams


async def _run(url: str, count: int, psk_file: str | None, time_limit: float, hold: float) -> None:
    from vtunnel.config import load_psk_file
    from vtunnel.runtime.session import TunnelPool
    from vtunnel.transports.base import Endpoint, SecurityConfig

    psk = load_psk_file(psk_file) if psk_file else None
    pool = TunnelPool([Endpoint.parse(url)], security=SecurityConfig(psk=psk), size=count)
    started = time.perf_counter()
    streams: list[ByteStream] = []
    async with anyio.create_task_group() as tg:
        await pool.run(tg)
        with anyio.move_on_after(time_limit):
            while len(pool.connections) < count:  # noqa: ASYNC110 - the pool has no all-up event
                await anyio.sleep(0.1)
        up = len(pool.connections)
        if up < count:
            _emit({"ok": False, "error": f"only {up} of {count} tunnels came up within {time_limit} s"})
        else:
            _emit({"ok": True, "tunnels": up, "seconds": time.perf_counter() - started})
            while True:
                command = ""
                with anyio.move_on_after(hold):
                    command = await anyio.to_thread.run_sync(sys.stdin.readline, abandon_on_cancel=True)
                if command.strip() != "streams":
                    break
                try:
                    streams = await _open_streams(pool.connections, time_limit)
                except Exception as exc:
                    _emit({"ok": False, "error": f"opening streams failed: {type(exc).__name__}: {exc}"})
                    break
                _emit({"ok": True, "streams": len(streams)})
        for stream in streams:
            await stream.aclose()
        pool.shutdown("benchmark done")
        await anyio.sleep(0.2)
        tg.cancel_scope.cancel()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.tunnels", description=__doc__.split("\n")[0])
    parser.add_argument("--server", required=True, help="the server's transport URL")
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--psk-file", default=None)
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--hold", type=float, default=600.0)
    args = parser.parse_args(argv)
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR),
        logger_factory=structlog.WriteLoggerFactory(sys.stderr),
    )
    options: dict[str, Any] = {}
    try:
        import uvloop  # noqa: F401

        options = {"use_uvloop": True}
    except ImportError:
        pass
    try:
        anyio.run(
            _run, args.server, args.count, args.psk_file, args.timeout, args.hold, backend_options=options
        )
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # report any failure as a result line, never a bare traceback
        _emit({"ok": False, "error": f"{type(exc).__name__}: {exc}"})
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
