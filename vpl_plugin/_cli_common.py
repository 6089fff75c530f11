"""What every ``vpl`` command shares: exit statuses, the usage error, argument types, and the
metadata that turns a configuration-dataclass field into a flag (:func:`cli_option`).

Kept apart from :mod:`vpl_plugin.cli` so that library modules (configuration dataclasses,
:mod:`vpl_plugin.reproduce`) can use them without importing the CLI.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, NoReturn, Optional, Sequence, Tuple

__all__ = ["CLI_OPTION", "EXIT_FAILURE", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_PARTIAL", "EXIT_USAGE",
           "FP16_COMPAT_CONFLICT", "REFUSED_INPUT_ERRORS", "CLIOption", "LenientArgumentParser", "ParseError",
           "RecordedOption", "UsageError", "VplArgumentParser", "add_numerics_flags", "cli_option", "finite_float",
           "max_pixels_arg", "max_tokens_arg", "nonnegative_int", "numerics_resume_hint", "positive_float",
           "positive_int", "tau_arg"]

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


def _refused_input_errors() -> Tuple[type, ...]:
    from vpl_plugin._lock import OutputLocked  # a RuntimeError, but a refusal: the output is in use

    # ValueError covers the project's refusals of bad files (DatasetError, CheckpointError,
    # UnsafeFileError, CAMFileError, YAMLFileError, NonFiniteRowsError all derive from it)
    return (UsageError, OutputLocked, ValueError, FileNotFoundError, PermissionError, IsADirectoryError,
            NotADirectoryError, ImportError)


#: errors that mean "an input was refused" (exit status 2, one line); any other exception of a
#: command is unexpected (exit status 1, one line; the traceback with -v)
REFUSED_INPUT_ERRORS: Tuple[type, ...] = _refused_input_errors()


class ParseError(Exception):
    """argparse refused the arguments (printed with the command's usage line, exit status 2)."""

    def __init__(self, parser: argparse.ArgumentParser, message: str) -> None:
        super().__init__(message)
        self.parser = parser


@dataclass(frozen=True)
class RecordedOption:
    """An option of a :class:`VplArgumentParser`, as ``--config`` needs it.

    Attributes:
        action: the argparse action (its public ``option_strings``, ``dest``, ``nargs``,
            ``const`` and ``default``).
        repeatable: added with ``action="append"`` (each value is one more flag).
    """

    action: argparse.Action
    repeatable: bool


class _RecordingGroup:
    """An argument group (or mutually exclusive group) whose ``add_argument`` records the option
    in its parser; everything else is the group's own."""

    def __init__(self, parser: "VplArgumentParser", group: Any) -> None:
        self._parser = parser
        self._group = group

    def add_argument(self, *args: Any, **kwargs: Any) -> argparse.Action:
        return self._parser.record(self._group.add_argument, args, kwargs)

    def add_mutually_exclusive_group(self, **kwargs: Any) -> "_RecordingGroup":
        kwargs["required"] = kwargs.get("required", False) and not self._parser.lenient
        return _RecordingGroup(self._parser, self._group.add_mutually_exclusive_group(**kwargs))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._group, name)


class VplArgumentParser(argparse.ArgumentParser):
    """argparse that raises :class:`ParseError` instead of exiting, so ``main`` can say where a
    bad value came from (a flag or the --config file).

    It also keeps the options it was given (:attr:`options`, for ``--config``) and, with
    ``lenient=True``, drops ``required`` (to read ``--config`` before the required flags are
    complete). ``commands`` maps a sub-command name to its parser (filled by the CLI).
    """

    def __init__(self, *args: Any, lenient: bool = False, **kwargs: Any) -> None:
        self.lenient = lenient
        self.options: List[RecordedOption] = []
        self.commands: Dict[str, "VplArgumentParser"] = {}
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:  # type: ignore[override]
        raise ParseError(self, message)

    def record(self, add: Callable[..., argparse.Action], args: Sequence[Any],
               kwargs: Dict[str, Any]) -> argparse.Action:
        """Call ``add(*args, **kwargs)`` (``required`` dropped when lenient) and keep the option."""
        if self.lenient:
            kwargs.pop("required", None)
        action = add(*args, **kwargs)
        if action.option_strings:
            self.options.append(RecordedOption(action, kwargs.get("action") == "append"))
        return action

    def add_argument(self, *args: Any, **kwargs: Any) -> argparse.Action:  # type: ignore[override]
        return self.record(super().add_argument, args, kwargs)

    def add_argument_group(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        return _RecordingGroup(self, super().add_argument_group(*args, **kwargs))

    def add_mutually_exclusive_group(self, **kwargs: Any) -> Any:  # type: ignore[override]
        kwargs["required"] = kwargs.get("required", False) and not self.lenient
        return _RecordingGroup(self, super().add_mutually_exclusive_group(**kwargs))


class LenientArgumentParser(VplArgumentParser):
    """A :class:`VplArgumentParser` that drops ``required`` (reads ``--config`` before the required
    flags are complete)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, lenient=True, **kwargs)


#: key of a dataclass field's ``metadata`` that holds its :class:`CLIOption`
CLI_OPTION = "vpl_cli_option"


@dataclass(frozen=True)
class CLIOption:
    """How a configuration-dataclass field appears as a ``vpl`` flag (see :func:`cli_option`)."""

    flag: str
    help: Optional[str]
    type: Optional[Callable[[str], Any]] = None
    choices: Optional[Tuple[str, ...]] = None
    metavar: Any = None
    nargs: Optional[int] = None
    off_flag: Optional[str] = None
    off_help: Optional[str] = None


def cli_option(flag: str, help: Optional[str], *, type: Optional[Callable[[str], Any]] = None,  # noqa: A002
               choices: Optional[Sequence[str]] = None, metavar: Any = None, nargs: Optional[int] = None,
               off_flag: Optional[str] = None, off_help: Optional[str] = None) -> Dict[str, CLIOption]:
    """The ``metadata`` of a dataclass field that the CLI exposes as ``flag``.

    ``type``/``choices``/``metavar``/``nargs`` are argparse's. A boolean field is a switch:
    ``flag`` is ``--X`` (turns it on) or ``--no-X`` (turns it off); ``off_flag`` adds the
    opposite switch right after it (``--amp`` / ``--no-amp``). The flag's ``dest`` is its
    name, so the command's namespace and recorded configuration keep the flag's name.
    """
    return {CLI_OPTION: CLIOption(flag, help, type, tuple(choices) if choices else None, metavar, nargs,
                                  off_flag, off_help)}


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


def unit_float(text: str) -> float:
    """argparse type: a number in [0, 1]."""
    value = finite_float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1]; got {text!r}")
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


# -- numerics switch (docs/upstream_clip_es.md#numerics) -------------------------------------------

#: --help of --exact-fp32, with its effect measured on the repository's peaked-attention test bed
EXACT_FP32_HELP = (
    "compute with the checkpoint's exact fp32 weights and an fp32 positional table instead of "
    "upstream CLIP-ES's numerics (the default: weights rounded through fp16 and an fp16 positional "
    "table on every device; on CUDA an fp16 model with upstream's fp16 GradCAM arithmetic). Not "
    "upstream's numbers: EXACT_FP32_EFFECT. Earlier versions' default; resumes their outputs")

#: measured effect (benchmarks/exact_fp32_effect.py: random ViT-B/16 with q / k x8, 8 VOC train images, CPU)
EXACT_FP32_EFFECT = ("on a ViT-B/16 with peaked attention and 8 VOC images its CAMs differed from the "
                     "default by up to 0.85 per pixel (mean 0.05) and the seed mIoU by 2.2 points")

FP16_COMPAT_CONFLICT = ("--fp16-compat (upstream's numerics, now the default) contradicts --exact-fp32; "
                        "drop one of them.")


#: --help of --keep-subnormals, with the measured speed and effect (benchmarks/bench_cams_process.py)
KEEP_SUBNORMALS_HELP = (
    "on the CPU, compute GradCAMs with IEEE subnormal floats instead of flushing them to zero (the "
    "default). A CLIP with peaked attention gives many attention probabilities below 1.2e-38, and "
    "x86 CPUs compute with them tens of times slower: flushing made the CAM loop of a ViT-B/16 with "
    "peaked attention 4.7x faster and moved its maps by at most one fp16 step "
    "(docs/upstream_clip_es.md#subnormals)")


def add_numerics_flags(group: Any, *, alias: bool = True, subnormals: bool = True) -> None:
    """``--exact-fp32``, (``alias``) its former opposite ``--fp16-compat`` (accepted, means
    the default) and (``subnormals``, commands that compute GradCAMs) ``--keep-subnormals``."""
    group.add_argument("--exact-fp32", action="store_true",
                       help=EXACT_FP32_HELP.replace("EXACT_FP32_EFFECT", EXACT_FP32_EFFECT))
    if subnormals:
        group.add_argument("--keep-subnormals", action="store_true", help=KEEP_SUBNORMALS_HELP)
    if not alias:
        return
    group.add_argument("--fp16-compat", action="store_true",
                       help="accepted for scripts written before upstream's numerics became the "
                            "default; changes nothing (refused together with --exact-fp32)")


def numerics_resume_hint(then: dict, now: dict) -> str:
    """A sentence naming the switch that reproduces a record's numerics, when a recorded
    ``fp16_compat`` (upstream's numerics) differs from the current one; else ``""``."""
    before, current = then.get("fp16_compat"), now.get("fp16_compat")
    if before == current:
        return ""
    if not before and current:
        return ("They were computed in exact fp32 (the default of versions before upstream's numerics "
                "became the default): rerun with --exact-fp32 to continue them. ")
    return "They were computed with upstream's numerics (the default): rerun without --exact-fp32. "
