"""Running a ``vpl`` command line: parse, check and lock the output, run, map errors to statuses."""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

from vpl_plugin._cli_common import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_USAGE, REFUSED_INPUT_ERRORS, ParseError, \
    UsageError
from vpl_plugin.cli.parsing import parse_args

__all__ = ["error_line", "run_argv"]


def run_argv(argv: Optional[Sequence[str]], commands: Sequence[Any]) -> int:
    """Run the ``vpl`` command line ``argv`` (default: ``sys.argv[1:]``) with the sub-commands
    ``commands`` (modules with ``NAME``, ``OUTPUT_IS_FOLDER``, ``add_parser``, ``run`` and
    optionally ``check_output``); returns the exit status.

    Every failure ends as one line on stderr that names the file or option and the problem (the
    traceback too with ``-v``): a refused input (:data:`REFUSED_INPUT_ERRORS`) exits 2, any other
    error 1, Ctrl-C 130.
    """
    try:
        args = parse_args(argv, commands)
    except ParseError as err:
        err.parser.print_usage(sys.stderr)
        print(f"{err.parser.prog}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except SystemExit as err:  # --help, --version
        return int(err.code or 0)
    verbose = bool(getattr(args, "verbose", False))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    module = next(m for m in commands if m.NAME == args.command)
    try:
        _check_output(args, module)
        with _output_lock(args, module, argv), _subnormals_mode(args):
            return module.run(args)
    except KeyboardInterrupt:
        print("interrupted: finished outputs are kept; run the same command again to resume.",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as err:  # noqa: BLE001 - the last resort: one line, never a bare traceback
        if verbose:
            traceback.print_exc()
        if isinstance(err, REFUSED_INPUT_ERRORS):
            print(f"error: {error_line(err)}", file=sys.stderr)
            return EXIT_USAGE
        hint = "" if verbose else " (run with -v for the traceback)"
        print(f"error: {type(err).__name__}: {error_line(err)}{hint}", file=sys.stderr)
        return EXIT_FAILURE


def _subnormals_mode(args: argparse.Namespace) -> Any:
    """A command that offers ``--keep-subnormals`` (it computes GradCAMs) runs with subnormal
    floats flushed to zero unless given it, from its start: the intra-op threads it starts inherit
    the mode, so a multi-threaded CPU run flushes on every thread
    (``docs/upstream_clip_es.md#subnormals``)."""
    from vpl_plugin._subnormals import flushed_subnormals

    return flushed_subnormals(getattr(args, "keep_subnormals", None) is False)


def _check_output(args: argparse.Namespace, module: Any) -> None:
    """Refuse an --out of the wrong kind before any work is done."""
    folder, out = module.OUTPUT_IS_FOLDER, getattr(args, "out", None)
    if folder is None or not out:
        return
    out = Path(out)
    if folder and out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, but vpl {args.command} writes a folder of files; "
                         f"give a folder (it is created when missing).")
    if not folder and out.is_dir():
        raise UsageError(f"--out {out} is a folder, but vpl {args.command} writes one file; give a file "
                         f"name, e.g. {out / 'vpl.pt'}.")
    check = getattr(module, "check_output", None)
    if check is not None:
        check(args)


@contextmanager
def _output_lock(args: argparse.Namespace, module: Any, argv: Optional[Sequence[str]]) -> Iterator[None]:
    """Hold the lock of the command's output while it runs (see :mod:`vpl_plugin._lock`): a second
    writer into the same output is refused."""
    from vpl_plugin._lock import output_lock

    folder, out = module.OUTPUT_IS_FOLDER, getattr(args, "out", None)
    if folder is None or not out or getattr(args, "dry_run", False):
        yield
        return
    words = list(sys.argv[1:] if argv is None else argv)
    command = "vpl " + " ".join(str(w) for w in words)
    with output_lock(out, command[:300], folder=folder):
        yield


def error_line(err: BaseException) -> str:
    """One line naming what failed (the file, where an OS error knows it)."""
    text = " ".join(str(err).split()) or type(err).__name__
    filename = getattr(err, "filename", None)
    if isinstance(err, OSError) and filename and str(filename) not in text:
        text = f"{filename}: {text}"
    return text
