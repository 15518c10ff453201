"""Logging, configured in one place for the CLI; library code only calls logging.getLogger."""

from __future__ import annotations

import logging
import sys

from rich.console import Console
from rich.logging import RichHandler

#: Results (tables, predictions) go to stdout; logs, progress and errors to stderr.
# Piped output gets a wide fixed width so tables are not squeezed to 80 columns.
console = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 160)
err_console = Console(stderr=True, soft_wrap=True, width=None if sys.stderr.isatty() else 160)


def configure_logging(verbose: bool = False, quiet: bool = False) -> None:
    """Route modelkiln's log records to a rich handler at the level the user asked for."""
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    handler = RichHandler(console=err_console, show_path=verbose, show_time=verbose, markup=False)
    root = logging.getLogger("modelkiln")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
