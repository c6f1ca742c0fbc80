"""``python -P bench/launch.py ARGS``: the ``vtunnel`` command of whichever vtunnel package the import path gives.

The harness starts every vtunnel server and agent through this file, run by path with ``-P`` so that neither the
working directory nor ``bench/`` comes first on the import path: ``PYTHONPATH`` alone decides which code runs
(an exported tree of another commit for ``--compare-ref`` twins, the installed vtunnel otherwise). Before
handing over to ``vtunnel.cli.main`` it prints one line, ``vtunnel code: DIR``, naming the package directory it
imported; the harness checks that line against the tree it meant to run, so a twin that silently ran the
current code cannot pass as the old one. It imports nothing from ``bench``.
"""

from __future__ import annotations

import sys
from pathlib import Path

__all__ = ["CODE_MARKER", "main"]

#: The start of the line naming the imported vtunnel package directory.
CODE_MARKER = "vtunnel code: "


def main() -> None:
    import vtunnel
    from vtunnel.cli import main as vtunnel_main

    print(CODE_MARKER + str(Path(vtunnel.__file__).resolve().parent), file=sys.stderr, flush=True)
    sys.argv[0] = "vtunnel"
    vtunnel_main()


if __name__ == "__main__":
    main()
