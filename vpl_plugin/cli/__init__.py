"""The ``vpl`` command (also ``python -m vpl_plugin``): ``main(argv)``.

One module per sub-command (``add_parser(subparsers)``, ``run(args)``): :mod:`.cams`,
:mod:`.learn`, :mod:`.masks`, :mod:`.evaluate` (``vpl eval``), :mod:`.train`, :mod:`.segment`,
:mod:`.reproduce`, :mod:`.demo`, :mod:`.train_clip`, :mod:`.random_clip`. Parsing and
``--config`` are in :mod:`.parsing`, flags shared by several commands in :mod:`.arguments`, flags
generated from configuration dataclasses in :mod:`.options`, running and exit statuses in
:mod:`.app`. The exit statuses are documented in :mod:`vpl_plugin._cli_common` and ``docs/cli.md``.
"""

from __future__ import annotations

import argparse
from typing import Optional, Sequence

from vpl_plugin._cli_common import (
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_PARTIAL,
    EXIT_USAGE,
    UsageError,
    VplArgumentParser,
)
from vpl_plugin.cli import (
    cams,
    demo,
    evaluate,
    learn,
    masks,
    random_clip,
    reproduce,
    segment,
    train,
    train_clip,
)
from vpl_plugin.cli import parsing
from vpl_plugin.cli.app import run_argv

__all__ = ["COMMANDS", "EXIT_FAILURE", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_PARTIAL", "EXIT_USAGE", "UsageError",
           "build_parser", "main", "parse_args"]

#: the sub-commands, in the order ``vpl --help`` lists them
COMMANDS = (cams, learn, masks, evaluate, demo, train_clip, random_clip, train, segment, reproduce)


def build_parser() -> VplArgumentParser:
    """The ``vpl`` argument parser (``parser.commands`` maps each sub-command to its parser)."""
    return parsing.build_parser(COMMANDS)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The options of a ``vpl`` command line, ``--config`` applied (see :mod:`.parsing`)."""
    return parsing.parse_args(argv, COMMANDS)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the ``vpl`` command with ``argv`` (default: ``sys.argv[1:]``); returns the exit status.

    Every failure ends as one line on stderr that names the file or option and the problem (the
    traceback too with ``-v``); the exit status says what kind (see ``docs/cli.md``).
    """
    return run_argv(argv, COMMANDS)
