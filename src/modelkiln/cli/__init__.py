"""The ``kiln`` command line: one thin file per command."""
