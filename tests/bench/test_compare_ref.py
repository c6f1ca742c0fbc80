"""``--compare-ref``: exporting another commit's vtunnel, running it as a twin, and reporting the two side by side."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from bench.procs import HarnessError, ProcessGroup
from bench.refs import RefTree, export_tree
from bench.report import build_document, render_markdown, validate_document
from bench.runner import Runner, RunOptions, Sample
from bench.scenarios import SCENARIOS
from bench.systems import SystemSpec, check_code, code_env, twin, vtunnel_command

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(120)


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(repo), "-c", "user.name=bench", "-c", "user.email=bench@localhost", *args],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    path = tmp_path / "repo"
    (path / "vtunnel").mkdir(parents=True)
    _git(path, "init", "-q")
    (path / "vtunnel" / "__init__.py").write_text('WHICH = "committed"\n')
    _git(path, "add", "vtunnel")
    _git(path, "commit", "-q", "-m", "one")
    return path


def test_the_export_is_the_commit_not_the_work_tree_and_is_reused(repo: Path, tmp_path: Path) -> None:
    (repo / "vtunnel" / "__init__.py").write_text('WHICH = "edited"\n')
    status = _git(repo, "status", "--porcelain")
    tree = export_tree("HEAD", repo=repo, cache=tmp_path / "cache")
    assert tree.commit == _git(repo, "rev-parse", "HEAD")
    assert tree.path == tmp_path / "cache" / tree.commit
    assert tree.short == tree.commit[:7]
    assert (tree.package / "__init__.py").read_text() == 'WHICH = "committed"\n'
    # the user's work tree and index are left as they were
    assert (repo / "vtunnel" / "__init__.py").read_text() == 'WHICH = "edited"\n'
    assert _git(repo, "status", "--porcelain") == status
    # a second run of the same commit reuses the export (a file put there survives) and leaves no partial copy
    (tree.package / "mark").write_text("kept")
    again = export_tree(tree.commit[:10], repo=repo, cache=tmp_path / "cache")
    assert again.path == tree.path
    assert (again.package / "mark").read_text() == "kept"
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [tree.commit]


def test_a_ref_that_is_not_a_commit_is_a_clear_error(repo: Path, tmp_path: Path) -> None:
    with pytest.raises(HarnessError, match="not a commit"):
        export_tree("no-such-branch", repo=repo, cache=tmp_path / "cache")
    with pytest.raises(HarnessError, match="not a git ref"):
        export_tree("--output=/tmp/x", repo=repo, cache=tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def test_a_twin_runs_the_exported_code_and_says_so(tmp_path: Path) -> None:
    tree = export_tree("HEAD", cache=tmp_path / "cache")
    current = SystemSpec(kind="vtunnel", transport="tcp")
    other = twin(current, tree)
    assert other.name == f"vtunnel-tcp@{tree.short}"
    with ProcessGroup(log_dir=tmp_path) as group:
        theirs = group.spawn("twin", [*vtunnel_command(), "--help"], env=code_env(other))
        ours = group.spawn("current", [*vtunnel_command(), "--help"], env=code_env(current))
        for proc in (theirs, ours):
            proc.popen.wait(30)
    assert check_code(theirs, other) == str(tree.package.resolve())
    assert check_code(ours, current) == str(ROOT / "vtunnel")
    with pytest.raises(HarnessError, match="runs vtunnel from"):
        check_code(theirs, current)
    with pytest.raises(HarnessError, match="runs vtunnel from"):
        check_code(ours, other)


def test_each_vtunnel_system_is_followed_by_its_twin_in_every_round(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    runner = Runner(
        RunOptions(
            quick=True, scenarios=("bulk-1",), systems=("direct", "vtunnel-tcp"), rounds=2, compare_ref="HEAD"
        )
    )
    assert runner.compare is not None
    short = runner.compare.short
    assert runner.compare.path.parent == tmp_path / "vtbench-trees"
    order = [(j.round, j.system.name) for j in runner.plan()]
    names = ("direct", "vtunnel-tcp", f"vtunnel-tcp@{short}")
    assert order == [(r, name) for r in range(2) for name in names]


def _twin_doc() -> dict[str, Any]:
    compare = {"ref": "v1", "commit": "a44345d" + "0" * 33, "short": "a44345d", "tree": "/tmp/x"}
    samples = [
        Sample(scenario="bulk-1", system=name, round=r, metrics={"goodput_MBps": value + r})
        for r in range(2)
        for name, value in (("vtunnel-kcp+psk", 90.0), ("vtunnel-kcp+psk@a44345d", 120.0))
    ]
    now = time.time()
    base = SystemSpec(kind="vtunnel", transport="kcp", keyed=True)
    tree = RefTree(ref=compare["ref"], commit=compare["commit"], path=Path(compare["tree"]))
    systems = [base, twin(base, tree)]
    return build_document(
        mode="quick",
        started=now - 5,
        finished=now,
        rounds=2,
        loss_levels=[],
        systems=systems,
        skipped={},
        scenarios=[s for s in SCENARIOS if s.name == "bulk-1"],
        quick=True,
        notes=[],
        samples=[s.as_dict() for s in samples],
        compare=compare,
    )


def test_the_report_gives_each_system_its_ratio_to_its_twin() -> None:
    doc = json.loads(json.dumps(_twin_doc()))
    assert validate_document(doc) == []
    ratios = doc["ratios"]["bulk-1"]
    assert ratios["vtunnel-kcp+psk"]["goodput_MBps"]["vs_ref"] == pytest.approx(90.5 / 120.5)
    assert ratios["vtunnel-kcp+psk@a44345d"]["goodput_MBps"]["vs_ref"] is None
    # only the selected scenarios' targets are listed
    assert {t["scenario"] for t in doc["targets"]} == {"bulk-1"}
    md = render_markdown(doc)
    assert "| system | goodput_MBps (MB/s) | vs @a44345d |" in md
    assert "| vtunnel-kcp+psk | 90.5 (90-91) | 0.75x |" in md
    assert "| vtunnel-kcp+psk@a44345d | 120.5 (120.0-121.0) | - |" in md
    assert doc["systems"][1]["commit"] == "a44345d" + "0" * 33
    assert "--compare-ref v1" in md


def test_a_whole_run_against_another_commit(tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    argv = [sys.executable, "-m", "bench", "run", "--quick", "--scenario", "rr-64", "--system", "vtunnel-tcp"]
    argv += ["--rounds", "2", "--compare-ref", "HEAD", "--out", str(out), "--name", "compare"]
    proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, timeout=110, check=False)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-2000:]
    doc = json.loads((out / "compare.json").read_text())
    assert validate_document(doc) == []
    commit = _git(ROOT, "rev-parse", "HEAD")
    assert doc["compare"]["commit"] == commit
    name = f"vtunnel-tcp@{commit[:7]}"
    assert [(s["system"], s["round"]) for s in doc["samples"]] == [
        ("vtunnel-tcp", 0),
        (name, 0),
        ("vtunnel-tcp", 1),
        (name, 1),
    ]
    assert all(s["ok"] for s in doc["samples"]), [s["error"] for s in doc["samples"]]
    exported = str(tmp_path / "vtbench-trees" / commit / "vtunnel")
    for s in doc["samples"]:
        expected = exported if s["system"] == name else str(ROOT / "vtunnel")
        assert s["raw"]["vtunnel_code"] == {"server": expected, "agent": expected}
    assert doc["ratios"]["rr-64"]["vtunnel-tcp"]["p50_us"]["vs_ref"] is not None
    assert f"vs @{commit[:7]}" in (out / "compare.md").read_text()
    assert not (out / "latest.md").exists()


def test_the_twin_finds_transports_where_its_commit_registered_them(repo: Path, tmp_path: Path) -> None:
    """A transport whose module moved after the compared commit still loads in the twin: the export carries that
    commit's entry points, and first on the path they stand for the installed distribution's."""
    (repo / "vtunnel" / "old_place.py").write_text("class Old:\n    pass\n")
    (repo / "pyproject.toml").write_text(
        '[project]\nname = "vtunnel"\nversion = "0"\n'
        '[project.entry-points."vtunnel.transports"]\nkcp = "vtunnel.old_place:Old"\n'
    )
    _git(repo, "add", ".")
    _git(repo, "commit", "-q", "-m", "two")
    tree = export_tree("HEAD", repo=repo, cache=tmp_path / "cache")
    probe = (
        "from importlib.metadata import entry_points\n"
        "print({e.name: e.value for e in entry_points(group='vtunnel.transports')}['kcp'])\n"
    )
    found = subprocess.run(
        [sys.executable, "-P", "-c", probe],
        env={**os.environ, "PYTHONPATH": str(tree.path)},
        capture_output=True,
        text=True,
        cwd=tmp_path,
        check=True,
    )
    assert found.stdout.strip() == "vtunnel.old_place:Old"
