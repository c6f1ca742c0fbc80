"""The benchmark runner: plans the jobs, alternates the systems round by round, records every sample.

A *job* is one stack start (one system on one placement) followed by the scenarios that share it. For
``rounds`` scenarios the job list is ``round 1: A B C ..., round 2: A B C ...``, so a machine that slows down
halfway hurts every system alike. Every process belongs to one :class:`~bench.procs.ProcessGroup` that is
closed whatever happens, and the namespaces the runner made are deleted in the same ``finally``.
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

import structlog

from bench.fairness import measure_fairness
from bench.measure import (
    Metrics,
    measure_bulk,
    measure_https_lite,
    measure_idle_cpu,
    measure_idle_streams,
    measure_rr,
    measure_stalled,
    measure_ttfb,
    measure_ttfb_spliced,
    measure_tunnels,
    start_stall_sink,
    start_tls_sources,
)
from bench.netem import IPV4_UDP_HEADER, LOOPBACK, NetnsLink, netns_supported, relay_available
from bench.procs import HarnessError, ProcessGroup, free_port
from bench.refs import RefTree, export_tree
from bench.report import link_description
from bench.scaling import measure_scaling
from bench.scenarios import (
    LOSS_LEVELS,
    NOT_AUTOMATIC,
    ROUNDS,
    SCENARIOS,
    VTUNNEL_TRANSPORTS,
    Scenario,
    all_systems,
)
from bench.systems import (
    Stack,
    SystemSpec,
    installed_transports,
    make_psk_file,
    start_keyless_twin,
    start_side_agent,
    start_stack,
    system_unavailable,
    twin,
)

__all__ = ["Job", "RunOptions", "Runner", "Sample"]

log = structlog.get_logger("bench.runner")


@dataclass(frozen=True, kw_only=True, slots=True)
class RunOptions:
    quick: bool = False
    scenarios: tuple[str, ...] = ()  # empty: all
    systems: tuple[str, ...] = ()  # empty: all available
    rounds: int | None = None
    compare_ref: str | None = None  # git ref: every vtunnel system also runs that commit's vtunnel


@dataclass(kw_only=True, slots=True)
class Sample:
    """One measurement of one scenario on one system."""

    scenario: str
    system: str
    round: int
    loss: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    raw: dict[str, object] = field(default_factory=dict)
    error: str | None = None

    def as_dict(self) -> dict[str, object]:
        return {
            "scenario": self.scenario,
            "system": self.system,
            "round": self.round,
            "loss": self.loss,
            "ok": self.error is None,
            "error": self.error,
            "metrics": self.metrics,
            "raw": self.raw,
        }


@dataclass(frozen=True, kw_only=True, slots=True)
class Job:
    """One stack start and the scenarios measured on it."""

    system: SystemSpec
    scenarios: tuple[Scenario, ...]
    round: int
    link: str  # "loopback" | "relay" | "netns"
    together: tuple[SystemSpec, ...] = ()  # systems measured side by side in this one job

    def step_count(self, loss_levels: tuple[float, ...]) -> int:
        if self.link == "netns":
            return sum(len(s.netns_levels(loss_levels)) for s in self.scenarios)
        return max(1, len(self.together)) * len(self.scenarios)


Listener = Callable[[str, Sample | None], None]


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


class Runner:
    """Runs the selected scenarios over the available systems; ``listener`` sees progress and samples."""

    def __init__(self, options: RunOptions, *, listener: Listener | None = None) -> None:
        self.options = options
        self.listener = listener or (lambda text, sample: None)
        self.samples: list[Sample] = []
        self.notes: list[str] = []
        self.skipped: dict[str, str] = {}
        self.mode = "quick" if options.quick else "full"
        self.rounds = options.rounds or ROUNDS[self.mode]
        self.loss_levels = LOSS_LEVELS[self.mode]
        names = set(options.scenarios)
        unknown = names - {s.name for s in SCENARIOS}
        if unknown:
            raise HarnessError(f"unknown scenario(s): {', '.join(sorted(unknown))}")
        self.scenarios = [s for s in SCENARIOS if not names or s.name in names]
        self.compare: RefTree | None = None
        if options.compare_ref is not None:
            self.compare = export_tree(options.compare_ref)
        self.systems = self._pick_systems()
        self.netns_reason: str | None = None
        self.started = time.time()

    # ------------------------------------------------------------------ planning
    def _pick_systems(self) -> list[SystemSpec]:
        transports = installed_transports()
        wanted = set(self.options.systems)
        plugins = tuple(sorted(transports - set(VTUNNEL_TRANSPORTS) - NOT_AUTOMATIC))
        chosen: list[SystemSpec] = []
        for system in all_systems(plugins):
            if wanted and system.name not in wanted:
                continue
            if system.transport in plugins and self.options.quick and not wanted:
                self.skipped[system.name] = (
                    "plugin transport: measured in full runs, or name it with --system"
                )
                continue
            reason = system_unavailable(system, transports)
            if reason is not None:
                self.skipped[system.name] = reason
                continue
            chosen.append(system)
        if self.compare is None:
            return chosen
        # Each vtunnel system is followed by its twin at the other commit, so rounds alternate them too.
        old_transports = installed_transports(self.compare)
        paired: list[SystemSpec] = []
        for system in chosen:
            paired.append(system)
            if system.kind != "vtunnel":
                continue
            other = twin(system, self.compare)
            if system.transport not in old_transports:
                self.skipped[other.name] = (
                    f"transport {system.transport}:// does not load at {self.compare.ref}"
                )
                continue
            paired.append(other)
        return paired

    def plan(self) -> list[Job]:
        jobs: list[Job] = []
        groups: dict[tuple[str, tuple[str, ...], str], list[Scenario]] = {}
        for link in ("loopback", "relay", "netns"):
            for sc in self.scenarios:
                if sc.link == link and sc.schedule == "rounds":
                    groups.setdefault((link, sc.relay_options, sc.name if sc.own_stack else ""), []).append(
                        sc
                    )
        for (link, _, _), group in groups.items():
            rounds = self.rounds
            if self.options.quick and self.options.rounds is None:
                rounds = min(s.quick_rounds or self.rounds for s in group)
            for r in range(rounds):
                for system in self.systems:
                    mine = tuple(s for s in group if s.applies_to(system))
                    if mine:
                        jobs.append(Job(system=system, scenarios=mine, round=r, link=link))
        for scenario in (s for s in self.scenarios if s.schedule == "once"):
            eligible = tuple(system for system in self.systems if scenario.applies_to(system))
            if scenario.kind == "idle_cpu" and eligible:
                # One shared quiet window for every system (see measure_idle_cpu).
                jobs.append(
                    Job(
                        system=eligible[0],
                        scenarios=(scenario,),
                        round=0,
                        link=scenario.link,
                        together=eligible,
                    )
                )
                continue
            for system in eligible:
                jobs.append(Job(system=system, scenarios=(scenario,), round=0, link=scenario.link))
        return jobs

    def total_steps(self, jobs: Sequence[Job]) -> int:
        return sum(j.step_count(self.loss_levels) for j in jobs)

    # ------------------------------------------------------------------ running
    def run(self) -> list[Sample]:
        previous = signal.signal(signal.SIGTERM, _raise_interrupt)
        _raise_fd_limit()
        link: NetnsLink | None = None
        try:
            with ProcessGroup(log_dir=Path(tempfile.mkdtemp(prefix="vtbench-"))) as group:
                psk_file = make_psk_file(group.log_dir)
                if psk_file is None and any(s.keyed for s in self.systems):
                    for s in [s for s in self.systems if s.keyed]:
                        self.skipped[s.name] = "`vtunnel keygen` did not give a key"
                    self.systems = [s for s in self.systems if not s.keyed]
                jobs = self.plan()
                if any(j.link == "netns" for j in jobs):
                    self.netns_reason = netns_supported()
                    if self.netns_reason is None:
                        link = NetnsLink(tag=f"{os.getpid() % 100000}")
                        link.up()
                        self.notes.extend(link.notes)
                    else:
                        self.notes.append(f"the veth scenarios are skipped: {self.netns_reason}")
                if any(j.link == "relay" for j in jobs) and not relay_available():
                    self.notes.append("rr-impaired skipped: the UDP impairment relay is not installed")
                self.listener(f"total:{self.total_steps(jobs)}", None)
                for job in jobs:
                    self._run_job(job, group, psk_file, link)
        finally:
            if link is not None:
                link.down()
            signal.signal(signal.SIGTERM, previous)
        return self.samples

    def _record(self, sample: Sample) -> None:
        self.samples.append(sample)
        self.listener(f"{sample.scenario} {sample.system} r{sample.round + 1}", sample)

    def _fail_all(self, job: Job, error: str, levels: Sequence[float | None]) -> None:
        for scenario in job.scenarios:
            for level in levels:
                self._record(
                    Sample(
                        scenario=scenario.name,
                        system=job.system.name,
                        round=job.round,
                        loss=level,
                        error=error,
                    )
                )

    def _run_job(self, job: Job, group: ProcessGroup, psk_file: Path | None, link: NetnsLink | None) -> None:
        self.listener(f"start {job.system.name} ({job.link}) round {job.round + 1}", None)
        if job.link == "netns":
            if link is None:
                self._fail_netns(job, f"skipped: {self.netns_reason}")
                return
            self._run_netns_job(job, group, psk_file, link)
            return
        if job.link == "relay" and not relay_available():
            self._fail_all(job, "skipped: the UDP impairment relay is not installed", [None])
            return
        scenario = job.scenarios[0]
        if job.scenarios[0].kind in ("tunnels", "scaling"):
            self._run_tunnels(job, group, psk_file)
            return
        if job.together:
            self._run_side_by_side(job, group, psk_file)
            return
        relay = scenario.relay_options if job.link == "relay" else None
        stalling = [sc for sc in job.scenarios if sc.kind == "stalled"]
        https = any(sc.kind == "https_lite" for sc in job.scenarios)
        plain_spliced = any(sc.kind == "ttfb_spliced" for sc in job.scenarios)
        socks = any(sc.socks for sc in job.scenarios)
        with group.scope() as scope:
            try:
                sink = None
                side: list[str] = []
                agent_extra: list[str] = []
                if stalling:
                    sink, address = start_stall_sink(scope, stalling[0].settings(quick=self.options.quick))
                    side.append(address)
                splice_port = None
                # splice mode: a dedicated TCP connection per stream over tcp:// and tls://, a keyless
                # conversation over kcp:// and rudp:// (not in the code of a twin from before that: no such option)
                spliceable = job.system.transport in ("tcp", "tls") or (
                    job.system.transport in ("kcp", "rudp") and job.system.ref is None
                )
                if https:  # the agent's stream to the TLS source is lite-tls (chosen by its first bytes)
                    sources = start_tls_sources(scope, 1)
                    side += [address for _, address in sources]
                    if spliceable:
                        splice_port = free_port()
                if plain_spliced:
                    splice_port = free_port()
                stack = start_stack(
                    job.system,
                    scope,
                    LOOPBACK,
                    psk_file=psk_file,
                    relay=relay,
                    side_targets=side,
                    agent_extra=agent_extra,
                    socks=socks,
                    splice_port=splice_port,
                )
                if plain_spliced:  # an agent in splice mode to the workload server
                    stack.side_entries["plain-spliced"] = start_side_agent(
                        stack, scope, psk_file, "agent-plain-spliced", stack.target, splice_port=splice_port
                    )
                if https:  # and two more agents to the source: spliced (where it can), and lite-tls off
                    if spliceable:
                        stack.side_entries["spliced"] = start_side_agent(
                            stack, scope, psk_file, "agent-spliced", sources[0][1], splice_port=splice_port
                        )
                    stack.side_entries["off"] = start_side_agent(
                        stack, scope, psk_file, "agent-off", sources[0][1], extra=["--no-lite-tls"]
                    )
                    if job.system.keyed:  # the ceiling of muxed mode: the same tunnel with no cipher at all
                        stack.side_entries["keyless"] = start_keyless_twin(
                            stack, scope, "keyless", sources[0][1]
                        )
                if sink is not None:
                    stack.procs["stall-sink"] = sink
            except HarnessError as exc:
                self._fail_all(job, str(exc), [None])
                return
            for sc in job.scenarios:
                self._measure(sc, job, stack, scope, None)

    def _measure(
        self,
        scenario: Scenario,
        job: Job,
        stack: Stack,
        group: ProcessGroup,
        loss: float | None,
        *,
        link: NetnsLink | None = None,
        psk_file: Path | None = None,
    ) -> None:
        settings = scenario.settings(quick=self.options.quick)
        sample = Sample(scenario=scenario.name, system=job.system.name, round=job.round, loss=loss)
        try:
            stack.check_alive()
            metrics: Metrics
            if scenario.kind in ("bulk", "bulk_loss", "bulk_wire"):
                metrics = measure_bulk(stack, settings, group)
            elif scenario.kind == "rr":
                metrics = measure_rr(stack, settings)
            elif scenario.kind == "ttfb":
                metrics = measure_ttfb(stack, settings)
            elif scenario.kind == "idle_streams":
                metrics = measure_idle_streams(stack, group, settings)
            elif scenario.kind == "stalled":
                metrics = measure_stalled(stack, settings, group, job.round)
            elif scenario.kind == "https_lite":
                metrics = measure_https_lite(stack, settings, job.round)
            elif scenario.kind == "ttfb_spliced":
                metrics = measure_ttfb_spliced(stack, settings, job.round)
            elif scenario.kind == "fairness" and link is not None:
                metrics = measure_fairness(stack, link, settings, group, psk_file)
            else:
                raise HarnessError(f"no measurement for kind {scenario.kind!r}")
            sample.metrics, sample.raw = metrics
        except HarnessError as exc:
            sample.error = str(exc)
        except Exception as exc:  # a surprise in one measurement must not end the whole run
            sample.error = f"{type(exc).__name__}: {exc}"
            log.exception("measurement failed", scenario=scenario.name, system=job.system.name)
        sample.raw["link"] = stack.placement.description
        if stack.code:
            sample.raw["vtunnel_code"] = dict(stack.code)
        if job.link == "relay":
            sample.raw["link"] = link_description(scenario)
        self._record(sample)

    def _run_side_by_side(self, job: Job, group: ProcessGroup, psk_file: Path | None) -> None:
        scenario = job.scenarios[0]
        self.listener(f"start {len(job.together)} quiet stacks for {scenario.name}", None)
        with group.scope() as scope:
            stacks: list[Stack] = []
            for system in job.together:
                try:
                    stacks.append(start_stack(system, scope, LOOPBACK, psk_file=psk_file))
                except HarnessError as exc:
                    self._record(Sample(scenario=scenario.name, system=system.name, round=0, error=str(exc)))
            try:
                results = measure_idle_cpu(stacks, scope, scenario.settings(quick=self.options.quick))
            except Exception as exc:  # e.g. a process vanished mid-window: every stack's sample says so
                error = exc if isinstance(exc, HarnessError) else HarnessError(f"{type(exc).__name__}: {exc}")
                results = [error] * len(stacks)
            for stack, result in zip(stacks, results, strict=True):
                sample = Sample(scenario=scenario.name, system=stack.system.name, round=0)
                if isinstance(result, HarnessError):
                    sample.error = str(result)
                else:
                    sample.metrics, sample.raw = result
                sample.raw["link"] = stack.placement.description
                self._record(sample)

    def _fail_netns(self, job: Job, error: str) -> None:
        """Every sample of a ``netns`` job failed: one per level of a sweep, one for a scenario of one level."""
        for scenario in job.scenarios:
            one = Job(system=job.system, scenarios=(scenario,), round=job.round, link=job.link)
            levels = [None] if scenario.netns_loss is not None else list(self.loss_levels)
            self._fail_all(one, error, levels)

    def _run_netns_job(self, job: Job, group: ProcessGroup, psk_file: Path | None, link: NetnsLink) -> None:
        with group.scope() as scope:
            link.set_loss(0.0)
            link.set_rate(None)
            try:
                stack = start_stack(job.system, scope, link.placement, psk_file=psk_file)
            except HarnessError as exc:
                self._fail_netns(job, str(exc))
                return
            for sc in job.scenarios:
                link.set_rate(sc.netns_rate)
                for level in sc.netns_levels(self.loss_levels):
                    link.set_loss(level)  # and the counters start from zero
                    # a scenario of one level is named by it (rudp-veth-2); a sweep's samples carry the level
                    key = None if sc.netns_loss is not None else level
                    self._measure(sc, job, stack, scope, key, link=link, psk_file=psk_file)
                    sample = self.samples[-1]
                    sample.raw["dropped_packets"] = link.dropped()
                    sample.raw["link"] = link.placement.description
                    if sc.kind == "bulk_wire" and sample.error is None:
                        sent, packets = link.wire()
                        payload = float(str(sample.raw["bytes"]))
                        sample.raw["wire"] = {"ip_bytes": sent, "packets": packets}
                        wire = (sent - IPV4_UDP_HEADER * packets) / payload
                        sample.metrics["wire_per_payload"] = wire
                        sample.metrics["wire_excess"] = wire - 1.0
            link.set_rate(None)

    def _run_tunnels(self, job: Job, group: ProcessGroup, psk_file: Path | None) -> None:
        """A scenario that starts its own processes: tunnels (one server, many tunnels) or scaling."""
        scenario = job.scenarios[0]
        settings = scenario.settings(quick=self.options.quick)
        sample = Sample(scenario=scenario.name, system=job.system.name, round=0)
        try:
            with group.scope() as scope:
                if scenario.kind == "scaling":
                    sample.metrics, sample.raw = measure_scaling(job.system, scope, psk_file, settings)
                else:
                    sample.metrics, sample.raw = measure_tunnels(
                        job.system, scope, psk_file, int(settings["tunnels"]), float(settings["timeout"])
                    )
        except HarnessError as exc:
            sample.error = str(exc)
        except Exception as exc:  # a surprise in one measurement must not end the whole run
            sample.error = f"{type(exc).__name__}: {exc}"
            log.exception("measurement failed", scenario=scenario.name, system=job.system.name)
        self._record(sample)


def _raise_fd_limit() -> None:
    """Idle-stream scenarios hold tens of thousands of sockets: lift the soft fd limit to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    _ = soft
