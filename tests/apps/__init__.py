"""Tests of the proxy fronts and the exit side."""
