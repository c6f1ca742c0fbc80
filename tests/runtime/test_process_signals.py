"""``serve_until_signal``: SIGHUP calls the reload hook and serving goes on (a failing reload too); SIGTERM drains."""

from __future__ import annotations

import os
import signal

import anyio
import pytest

from vtunnel.runtime.process import serve_until_signal

pytestmark = pytest.mark.anyio


async def test_sighup_reloads_and_serving_goes_on_until_sigterm() -> None:
    reloads: list[int] = []
    stopped = anyio.Event()

    def reload() -> None:
        reloads.append(len(reloads))
        if len(reloads) == 1:
            raise ValueError("a bad key file")  # logged; nothing stops

    async def start() -> None:
        await stopped.wait()

    async def signals() -> None:
        # until the receiver is installed a SIGHUP is ignored (SIG_IGN below), so send until one is taken
        for wanted in (1, 2):
            with anyio.fail_after(5):
                while len(reloads) < wanted:
                    os.kill(os.getpid(), signal.SIGHUP)
                    await anyio.sleep(0.05)
        assert not stopped.is_set()
        os.kill(os.getpid(), signal.SIGTERM)

    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(signals)
                await serve_until_signal(start, stopped.set, reload=reload)
    finally:
        signal.signal(signal.SIGHUP, previous)
    assert len(reloads) >= 2
    assert stopped.is_set()
