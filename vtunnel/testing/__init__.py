"""Helpers shared by the tests and the benchmark harness: the one UDP impairment relay.

Names are loaded lazily so that ``python -m vtunnel.testing.relay`` runs the relay module exactly once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vtunnel.testing.relay import DirectionStats, Impairment, ImpairmentRelay

__all__ = ["DirectionStats", "Impairment", "ImpairmentRelay"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from vtunnel.testing import relay

        return getattr(relay, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
