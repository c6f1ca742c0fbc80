"""The event-loop I/O tests run on both loops, as the transport tests do (the same fixture)."""

from tests.transports.conftest import anyio_backend

__all__ = ["anyio_backend"]
