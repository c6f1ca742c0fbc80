"""The transport tests run on asyncio's own loop and on uvloop, the runtime's loop when it is installed.

The two differ where it matters here (uvloop stops watching a socket that reports an error, for one), so every
transport test runs on both unless its module asks for one loop.
"""

from __future__ import annotations

import pytest

from tests.conftest import BOTH_LOOPS


@pytest.fixture(params=BOTH_LOOPS)
def anyio_backend(request: pytest.FixtureRequest) -> tuple[str, dict[str, bool]]:
    param: tuple[str, dict[str, bool]] = request.param
    return param
