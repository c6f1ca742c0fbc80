"""vtunnel: a multiplexed ARQ tunnel."""

__version__ = "0.1.0"
