"""The vtunnel package of another commit, exported for ``python -m bench run --compare-ref REF``.

:func:`export_tree` resolves REF to a commit of the repository the harness lives in and exports that commit's
``vtunnel/`` directory with ``git archive`` into a cache directory named by the full commit hash
(``$TMPDIR/vtbench-trees/COMMIT``), without touching the user's work tree or index. The export is written beside
its final name and renamed into place, so an interrupted export is never mistaken for a complete one, and a
second run with the same commit reuses it. The twin systems run that tree with this interpreter and venv, the
exported directory first on ``PYTHONPATH`` (see :mod:`bench.launch`).

Beside the package the export holds a ``vtunnel-REF.dist-info`` with that commit's entry points (from its
``pyproject.toml``): first on the path, it stands for the installed ``vtunnel`` distribution in the twin, so the
twin's registry finds the transports where that commit had them, even after a transport moved to another module.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import tomllib
from dataclasses import dataclass
from pathlib import Path

from bench.procs import HarnessError

__all__ = ["REPO_ROOT", "RefTree", "add_ref_option", "default_cache", "export_tree", "micro_packages"]

#: The repository the harness belongs to (the parent of ``bench/``).
REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True, kw_only=True, slots=True)
class RefTree:
    """An exported vtunnel package: ``path / "vtunnel"`` is the package of ``commit``."""

    ref: str  # as the user gave it
    commit: str  # full hash
    path: Path

    @property
    def short(self) -> str:
        """The label of the twin systems (``vtunnel-kcp+psk@a44345d``)."""
        return self.commit[:7]

    @property
    def package(self) -> Path:
        return self.path / "vtunnel"

    def as_dict(self) -> dict[str, str]:
        return {"ref": self.ref, "commit": self.commit, "short": self.short, "tree": str(self.path)}


def default_cache() -> Path:
    return Path(tempfile.gettempdir()) / "vtbench-trees"


def _git(repo: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    try:
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise HarnessError(f"git {args[0]} failed: {exc}") from None


def export_tree(ref: str, *, repo: Path = REPO_ROOT, cache: Path | None = None) -> RefTree:
    """Export the ``vtunnel`` package of commit ``ref`` (or reuse the export of the same commit)."""
    if ref.startswith("-"):
        raise HarnessError(f"--compare-ref: {ref!r} is not a git ref")
    found = _git(repo, "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}")
    if found.returncode != 0:
        raise HarnessError(f"--compare-ref: {ref!r} is not a commit of the repository at {repo}")
    commit = found.stdout.decode().strip()
    root = cache if cache is not None else default_cache()
    final = root / commit
    if (final / "vtunnel" / "__init__.py").is_file():
        _write_metadata(repo, commit, final)
        return RefTree(ref=ref, commit=commit, path=final)
    root.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(dir=root, prefix=f".{commit[:12]}-"))
    try:
        _extract(repo, commit, partial)
        if not (partial / "vtunnel" / "__init__.py").is_file():
            raise HarnessError(f"--compare-ref: commit {commit[:10]} has no vtunnel package")
        _write_metadata(repo, commit, partial)
        try:
            os.rename(partial, final)
        except OSError:
            # a concurrent export of the same commit got there first: use it
            if not (final / "vtunnel" / "__init__.py").is_file():
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return RefTree(ref=ref, commit=commit, path=final)


def _extract(repo: Path, commit: str, into: Path) -> None:
    """``git archive COMMIT vtunnel | tar -x -C into``, with Python's tar reader and its safe ``data`` filter."""
    proc = subprocess.Popen(
        ["git", "-C", str(repo), "archive", "--format=tar", commit, "vtunnel"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None
    try:
        with tarfile.open(fileobj=proc.stdout, mode="r|") as archive:
            archive.extractall(into, filter="data")
    except tarfile.TarError as exc:
        proc.kill()
        raise HarnessError(f"--compare-ref: git archive of {commit[:10]} was unreadable: {exc}") from None
    finally:
        _, err = proc.communicate(timeout=60)
    if proc.returncode != 0:
        raise HarnessError(f"--compare-ref: git archive {commit[:10]} failed: {err.decode(errors='replace')}")


def _write_metadata(repo: Path, commit: str, tree: Path) -> None:
    """The commit's distribution metadata (name, version, entry points) as a ``.dist-info`` in ``tree``."""
    info = tree / f"vtunnel-0+{commit[:12]}.dist-info"
    if (info / "entry_points.txt").is_file():
        return
    shown = _git(repo, "show", f"{commit}:pyproject.toml")
    if shown.returncode != 0:
        return  # no pyproject at that commit: the twin keeps the installed entry points
    project = tomllib.loads(shown.stdout.decode()).get("project", {})
    groups: dict[str, dict[str, str]] = project.get("entry-points", {})
    lines: list[str] = []
    for group, entries in groups.items():
        lines.append(f"[{group}]")
        lines.extend(f"{name} = {target}" for name, target in entries.items())
        lines.append("")
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vtunnel\nVersion: 0+{commit[:12]}\n")
    (info / "entry_points.txt").write_text("\n".join(lines))


def add_ref_option(parser: argparse.ArgumentParser) -> None:
    """A micro-benchmark's ``--ref DIR``: another tree's code measured in the same process (:func:`micro_packages`)."""
    parser.add_argument("--ref", help="a directory holding vtunnel_ref/ (another tree's vtunnel/, renamed)")


def micro_packages(ref: str | None) -> list[str]:
    """The packages a micro-benchmark measures, interleaved in one process: ``vtunnel``, and with ``ref`` (a
    directory holding ``vtunnel_ref/``, which goes first on the import path) ``vtunnel_ref`` too."""
    if ref is None:
        return ["vtunnel"]
    sys.path.insert(0, ref)
    return ["vtunnel", "vtunnel_ref"]
