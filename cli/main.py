"""Command line: ``python -m explorer <command>``. Bad input gives one line on stderr, exit 2."""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from cli import ablate, basic, generate, heads, intervene, models, neurons, probes, sae
from cli.common import log
from explorer.core.errors import ExplorerError


class UsageError(ExplorerError):
    """A command line that does not parse (an unknown flag, a bad value, a missing argument)."""


class Parser(argparse.ArgumentParser):
    """Reports a bad command line as one ``error: ...`` line (exit 2), as every other error."""

    def error(self, message: str):
        raise UsageError(f"{self.prog}: {message} (see {self.prog} --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="python -m explorer",
                    description="Interp Explorer: interpretability of transformer LMs")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                help="what to do (each command has its own --help)")

    # Each module adds its own commands.
    for module in (basic, models, ablate, heads, neurons, intervene, probes, generate, sae):
        module.add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        args = build_parser().parse_args(argv)
    except UsageError as e:
        log(f"error: {e}")
        return 2
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
        return args.fn(args)
    except ExplorerError as e:
        log(f"error: {e}")
        return 2
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    except BrokenPipeError:  # e.g. piped into `head`
        sys.stderr.close()
        return 0
