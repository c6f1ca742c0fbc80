"""vtunnel's benchmark harness.

``python -m bench run [--quick] [--scenario NAME ...]`` measures vtunnel's transports and settings side by
side with kcptun and a direct connection, alternating the systems round by round so that ratios hold on a
noisy machine, and writes a JSON file with every raw sample, PNG plots and a markdown summary to
``bench/results/``.

Modules: :mod:`bench.stats` (percentiles, summaries), :mod:`bench.workload` (asyncio sink, source, echo and
idle clients, also runnable as ``python -m bench.workload``), :mod:`bench.procs` (process supervision and
``/proc`` readers), :mod:`bench.systems` (the systems under test: direct, kcptun, vtunnel per transport),
:mod:`bench.netem` (network namespaces with nftables loss, the UDP impairment relay), :mod:`bench.scenarios`
(scenarios as data), :mod:`bench.runner`, :mod:`bench.report` (JSON, markdown, targets),
:mod:`bench.plots`, :mod:`bench.refs` (another commit's vtunnel for ``--compare-ref``) and :mod:`bench.launch`
(how every vtunnel process is started, and says which code it runs).
"""

from __future__ import annotations

__all__ = ["RESULT_SCHEMA_VERSION"]

#: Bumped whenever the layout of the result JSON changes.
RESULT_SCHEMA_VERSION = 1
