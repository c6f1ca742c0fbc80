"""Fixtures shared by the application tests: loopback servers started inside the test."""

from __future__ import annotations

import pytest


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
