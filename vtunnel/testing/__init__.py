"""Helpers shared by the tests and the benchmark harness: the one UDP impairment relay."""

from vtunnel.testing.relay import DirectionStats, Impairment, ImpairmentRelay

__all__ = ["DirectionStats", "Impairment", "ImpairmentRelay"]
