"""``python -m bench run [--quick] [--scenario NAME ...] [--system NAME ...]``; ``python -m bench list``."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import structlog
from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from bench.plots import plot_all
from bench.procs import HarnessError
from bench.report import HEADLINE, build_document, scenario_key, write_results
from bench.runner import Runner, RunOptions, Sample
from bench.scenarios import SCENARIOS, all_systems
from bench.stats import median

DEFAULT_OUT = Path(__file__).resolve().parent / "results"


def _result_name(text: str) -> str:
    if not text or not all(c.isalnum() or c in "-_." for c in text) or text.startswith("."):
        raise argparse.ArgumentTypeError(f"{text!r}: use letters, digits, '-', '_' and '.' only")
    return text


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description="vtunnel benchmark harness")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the benchmarks")
    run.add_argument("--quick", action="store_true", help="small sizes, 2 rounds: under 5 minutes")
    run.add_argument(
        "--scenario", action="append", default=[], metavar="NAME", help="only these (repeatable)"
    )
    run.add_argument("--system", action="append", default=[], metavar="NAME", help="only these (repeatable)")
    run.add_argument("--rounds", type=int, default=None, help="alternated rounds (default: 5, quick: 2)")
    run.add_argument(
        "--compare-ref",
        metavar="REF",
        default=None,
        help="also run every selected vtunnel system with the vtunnel code of git commit REF (exported with "
        "git archive into a cache directory; the work tree is not touched), same Python and venv, as a twin "
        "named SYSTEM@COMMIT alternated with it round by round; the report gives each system's ratio to its twin",
    )
    run.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help="result directory (default: bench/results)"
    )
    run.add_argument(
        "--name",
        default="latest",
        type=_result_name,
        help="results are NAME.md and NAME.json (default: latest); any other name also starts the plots' file "
        "names with NAME-, so a run of a few scenarios can sit beside latest.md without replacing its files",
    )
    sub.add_parser("list", help="list scenarios and systems")
    return parser


class LiveView:
    """Progress bar plus a table of the medians so far."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
        )
        self.task = self.progress.add_task("planning", total=None)
        self.samples: list[Sample] = []
        self.live = Live(self._render(), console=console, refresh_per_second=2, transient=False)

    def __call__(self, text: str, sample: Sample | None) -> None:
        if text.startswith("total:"):
            self.progress.update(self.task, total=int(text.split(":")[1]), completed=0)
            return
        if sample is None:
            self.progress.update(self.task, description=text)
            return
        self.samples.append(sample)
        self.progress.advance(self.task)
        if sample.error:
            self.console.print(f"[red]{text}: {sample.error}[/red]")
        self.live.update(self._render())

    def _table(self) -> Table:
        table = Table(title="medians so far", show_lines=False)
        table.add_column("scenario")
        systems: list[str] = []
        grouped: dict[str, dict[str, list[Sample]]] = {}
        kinds = {s.name: s.kind for s in SCENARIOS}
        for s in self.samples:
            if s.system not in systems:
                systems.append(s.system)
            grouped.setdefault(scenario_key(s.scenario, s.loss), {}).setdefault(s.system, []).append(s)
        for system in systems:
            table.add_column(system, justify="right")
        for key, by_system in grouped.items():
            headline = HEADLINE.get(kinds.get(key.split("@")[0], ""), ())
            for metric, unit, _ in headline[:2]:
                row = [f"{key} {metric} ({unit})"]
                for system in systems:
                    values = [s.metrics[metric] for s in by_system.get(system, []) if metric in s.metrics]
                    row.append(f"{median(values):.4g}" if values else "-")
                table.add_row(*row)
        return table

    def _render(self) -> Group:
        return Group(self._table(), self.progress)


def _run(args: argparse.Namespace) -> int:
    console = Console(stderr=True, width=None if sys.stderr.isatty() else 150)
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        logger_factory=structlog.WriteLoggerFactory(sys.stderr),
    )
    options = RunOptions(
        quick=args.quick,
        scenarios=tuple(args.scenario),
        systems=tuple(args.system),
        rounds=args.rounds,
        compare_ref=args.compare_ref,
    )
    try:
        view = LiveView(console)
        runner = Runner(options, listener=view)
    except HarnessError as exc:
        console.print(f"[red]{exc}[/red]")
        return 2
    interrupted = False
    with view.live:
        try:
            runner.run()
        except KeyboardInterrupt:
            interrupted = True
            console.print("[yellow]interrupted: every process was stopped; writing partial results[/yellow]")
        except HarnessError as exc:
            interrupted = True
            console.print(f"[red]{exc}[/red]")
    doc: dict[str, Any] = build_document(
        mode=runner.mode,
        started=runner.started,
        finished=time.time(),
        rounds=runner.rounds,
        loss_levels=runner.loss_levels,
        systems=runner.systems,
        skipped=runner.skipped,
        scenarios=runner.scenarios,
        quick=args.quick,
        notes=runner.notes,
        samples=[s.as_dict() for s in runner.samples],
        interrupted=interrupted,
        compare=runner.compare.as_dict() if runner.compare is not None else None,
    )
    plots = plot_all(doc, args.out, prefix="" if args.name == "latest" else f"{args.name}-")
    json_path, md_path = write_results(doc, args.out, plots=plots, name=args.name)
    table = Table(title="targets")
    for col in ("target", "system", "measured", "goal", "met"):
        table.add_column(col)
    for t in doc["targets"]:
        unit = "x" if t["reference"] else ""
        measured = "-" if t["value"] is None else f"{t['value']:.3g}{unit}"
        met = {True: "[green]yes[/green]", False: "[red]no[/red]", None: "not measured"}[t["met"]]
        table.add_row(t["target"], t["system"], measured, f"{t['op']} {t['threshold']:g}{unit}", met)
    console.print(table)
    for note in doc["notes"] + doc["saturation"]:
        console.print(f"note: {note}")
    console.print(f"results: {md_path}, {json_path}, {len(plots)} plots ({doc['duration_s']} s)")
    return 130 if interrupted else 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "list":
        for sc in SCENARIOS:
            print(f"{sc.name:14} {sc.kind:13} {sc.link:9} {sc.description}")
        print()
        for system in all_systems():
            print(system.name)
        return 0
    return _run(args)


if __name__ == "__main__":
    raise SystemExit(main())
