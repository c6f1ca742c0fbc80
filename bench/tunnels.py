"""Many tunnels from one process: ``python -m bench.tunnels --server URL --count N [--psk-file F]``.

Opens ``N`` vtunnel tunnels (each its own transport connection and handshake) to one server with vtunnel's
tunnel pool, prints ``{"ok": true, "tunnels": N, "seconds": S}`` once all are up, then holds them until a line
arrives on stdin (or ``--hold`` seconds pass) and shuts them down. The harness reads the server's RSS
meanwhile.
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

__all__ = ["main"]


def _emit(payload: dict[str, object]) -> None:
    sys.stdout.write(json.dumps(payload) + "\n")
    sys.stdout.flush()


async def _run(url: str, count: int, psk_file: str | None, time_limit: float, hold: float) -> None:
    from vtunnel.runtime.session import TunnelPool
    from vtunnel.security.keys import load_psk_file
    from vtunnel.transports.base import Endpoint, SecurityConfig

    psk = load_psk_file(psk_file) if psk_file else None
    pool = TunnelPool(Endpoint.parse(url), security=SecurityConfig(psk=psk), size=count)
    started = time.perf_counter()
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
            with anyio.move_on_after(hold):
                await anyio.to_thread.run_sync(sys.stdin.readline, abandon_on_cancel=True)
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
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
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
