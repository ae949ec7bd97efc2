"""``python -m adaptflow``: the ``adaptflow`` command."""

from adaptflow.cli import main

main()
