"""``python -m modelkiln`` is the ``kiln`` command."""

from modelkiln.cli.main import main

main()
