"""The command line, above the engine (``explorer``) and the views (``widgets``).

``python -m explorer <command>`` (or ``interp-explorer``) runs ``main``; each module adds its commands.
"""
from cli.main import build_parser, main

__all__ = ["build_parser", "main"]
