"""What every ``vpl`` command shares: exit statuses, the usage error, argument types.

Kept apart from :mod:`vpl_plugin.cli` so that modules which add their own sub-command flags
(:mod:`vpl_plugin.reproduce`) can use them without importing the CLI.
"""

from __future__ import annotations

import argparse
import math
from typing import Optional

__all__ = ["EXIT_FAILURE", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_PARTIAL", "EXIT_USAGE", "ParseError",
           "UsageError", "VplArgumentParser", "finite_float", "max_pixels_arg", "max_tokens_arg", "nonnegative_int",
           "positive_float", "positive_int", "tau_arg"]

#: every image processed
EXIT_OK = 0
#: the run stopped on an unexpected error (one line names it; ``-v`` prints the traceback)
EXIT_FAILURE = 1
#: nothing could run: bad arguments, or an input refused (missing or unsafe model, bad dataset file,
#: output in use by another run)
EXIT_USAGE = 2
#: some images were skipped (the summary names them and why)
EXIT_PARTIAL = 3
#: interrupted (Ctrl-C); rerun the same command to resume
EXIT_INTERRUPTED = 130


class UsageError(Exception):
    """Bad arguments: reported on stderr with exit status 2."""


class ParseError(Exception):
    """argparse refused the arguments (printed with the command's usage line, exit status 2)."""

    def __init__(self, parser: argparse.ArgumentParser, message: str) -> None:
        super().__init__(message)
        self.parser = parser


class VplArgumentParser(argparse.ArgumentParser):
    """argparse that raises :class:`ParseError` instead of exiting, so ``main`` can say where a
    bad value came from (a flag or the --config file)."""

    def error(self, message: str):  # type: ignore[override]
        raise ParseError(self, message)


def finite_float(text: str) -> float:
    """argparse type: a finite number (``nan``, ``inf`` refused)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number; got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number; got {text!r}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0; got {text!r}")
    return value


def tau_arg(text: str) -> str:
    """argparse type of ``--tau``: ``clip`` or a finite number > 0 (kept as written)."""
    if text != "clip":
        try:
            positive_float(text)
        except argparse.ArgumentTypeError:
            raise argparse.ArgumentTypeError(f"must be a finite number > 0 or 'clip'; got {text!r}") from None
    return text


def max_pixels_arg(text: str) -> Optional[int]:
    """argparse type of ``--max-pixels``: a whole number of pixels (``4e6`` allowed); ``0`` or
    ``none`` lifts the limit (returns None)."""
    if text.strip().lower() in ("0", "none"):
        return None
    try:
        number = float(text)
    except ValueError:
        number = float("nan")
    if not 1 <= number < float("inf") or number != int(number):
        raise argparse.ArgumentTypeError(f"must be a whole number of pixels such as 4000000 or 4e6, or 0 "
                                         f"for no limit; got {text!r}")
    return int(number)


def _int_at_least(least: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a whole number; got {text!r}") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"must be at least {least}; got {value}")
        return value

    parse.__name__ = f"int>={least}"
    return parse


positive_int = _int_at_least(1)
nonnegative_int = _int_at_least(0)


def max_tokens_arg(value: Optional[str]) -> Optional[int]:
    """``--max-tokens``: a positive whole number, also written as ``1e7``; None = no budget."""
    if value is None or value == "":
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if not 1 <= number < float("inf") or number != int(number):
        raise UsageError(f"--max-tokens must be a positive whole number such as 10000000 or 1e7; got "
                         f"{value!r}.")
    return int(number)
