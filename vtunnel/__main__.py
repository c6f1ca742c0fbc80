"""``python -m vtunnel`` is the ``vtunnel`` command."""

from vtunnel.cli import main

main()
