"""The ``vpl`` argument parser: the sub-commands' flags and ``--config FILE.yaml``.

Precedence: defaults < the ``--config`` file < command-line flags. The file's values are turned
into the flags they stand for and parsed with the command line, so each goes through its flag's
own type, choices and checks; a flag given on the command line replaces the file's value (also
for repeatable flags such as ``--template``). Required flags may come from the file too.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from vpl_plugin._cli_common import EXIT_USAGE, LenientArgumentParser, ParseError, RecordedOption, UsageError, \
    VplArgumentParser
from vpl_plugin._version import __version__

__all__ = ["DESCRIPTION", "ConfigError", "build_parser", "parse_args"]

DESCRIPTION = """The ``vpl`` command (also ``python -m vpl_plugin``).

Stages, each resumable and each writing its resolved configuration beside its outputs::

    vpl cams    -> CAM_DIR/<id>.npy       (CLIP-ES or CLIP-CPAL CAMs, text or vision prototypes)
    vpl learn   -> PROTOTYPES.pt          (VPL phase 1: vision prototypes from text CAMs)
    vpl masks   -> MASK_DIR/<id>.png      (dense CRF pseudo masks, 255 = ignore)
    vpl eval    -> mIoU of CAMs or masks  (upstream eval_cam.py semantics)
    vpl train   -> OUT/segmenter.pt       (VPL phase 2: decoder on frozen CLIP, CE + RSC)
    vpl segment -> OUT/<id>.png           (phase-2 inference: multi-scale + flip, optional CRF)
    vpl reproduce table1                  (the paper's Table 1 in one command, VOC or COCO)
    vpl demo    -> the embedded default: CLIP-ES vs CLIP-ES + VPL on the synthetic world
    vpl train-clip / random-clip          (the demo CLIP / a random-weight CLIP checkpoint)

`vpl cams`, `vpl learn`, `vpl segment` and `vpl train` run under torchrun too (list sharding; DDP).

Recommended VPL configuration (measured on the demo world, see README): learn with
`--pooling region --tau 0.1`, then `vpl cams --prototypes P --map-mode dense`. The
paper-literal configuration is the default of every flag (phase 2: tau_RSC 0.07, see README).

Exit status: 0 every image processed; 3 some images skipped (the summary names them and why);
2 nothing could run (bad arguments, or an input refused: missing or unsafe model, bad dataset
file, output in use by another run); 1 a run stopped on an unexpected error (one line names it;
-v prints the traceback); 130 interrupted (rerun the same command to resume).
"""


class ConfigError(UsageError):
    """A --config value that its flag refuses."""


def build_parser(commands: Sequence[Any], *, lenient: bool = False) -> VplArgumentParser:
    """The ``vpl`` parser with one sub-command per module of ``commands`` (each has ``NAME`` and
    ``add_parser(subparsers)``); ``parser.commands`` maps the names to their parsers.
    ``lenient=True`` drops ``required`` (to read ``--config`` first)."""
    parser_class = LenientArgumentParser if lenient else VplArgumentParser
    parser = parser_class(prog="vpl", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"vpl-plugin {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=parser_class)
    for module in commands:
        parser.commands[module.NAME] = module.add_parser(sub)
    return parser


def parse_args(argv: Optional[Sequence[str]], commands: Sequence[Any]) -> argparse.Namespace:
    """Parse ``argv`` (default ``sys.argv[1:]``) with ``--config`` applied.

    Raises :class:`ParseError` (a flag refused), :class:`UsageError` (a ``--config`` file or
    value refused) or ``SystemExit`` (``--help``, ``--version``, no command: status 2).
    """
    words = [str(w) for w in (sys.argv[1:] if argv is None else argv)]
    if not any(w in ("-h", "--help", "--version") for w in words):
        words = _with_config(words, commands)
    parser = build_parser(commands)
    args = parser.parse_args(words)
    if args.command is None:
        parser.print_help()
        raise SystemExit(EXIT_USAGE)
    return args


def _with_config(argv: List[str], commands: Sequence[Any]) -> List[str]:
    """``argv`` with the ``--config`` file's values inserted as flags after the command name
    (unchanged without ``--config``, or when the command line alone is refused: the strict
    parse then reports it)."""
    parser = build_parser(commands, lenient=True)
    try:
        args = parser.parse_args(argv)
    except ParseError:
        return argv
    if not getattr(args, "config", None):
        return argv
    from vpl_plugin._yaml import YAMLFileError, read_yaml_mapping

    path = Path(args.config)
    try:
        values = read_yaml_mapping(path, what="--config")
    except YAMLFileError as err:
        raise UsageError(str(err)) from None
    tokens = _config_tokens(parser.commands[args.command].options, values, path, argv)
    at = argv.index(args.command) + 1
    words = argv[:at] + tokens + argv[at:]
    try:
        parser.parse_args(words)
    except ParseError as err:  # the command line alone parsed, so the file's value is the culprit
        raise ConfigError(f"--config {path}: {err}") from None
    return words


def _config_tokens(options: Sequence[RecordedOption], values: Dict[str, Any], path: Path,
                   argv: Sequence[str]) -> List[str]:
    """The command-line tokens a --config mapping stands for (flags on ``argv`` win)."""
    by_dest: Dict[str, List[RecordedOption]] = {}
    for option in options:
        if option.action.dest not in ("help", "config"):
            by_dest.setdefault(option.action.dest, []).append(option)
    unknown = sorted(k for k in values if k.replace("-", "_") not in by_dest)
    if unknown:
        raise UsageError(f"--config {path}: unknown option(s) {unknown}; valid: {sorted(by_dest)}.")
    given = {o.action.dest for o in options for flag in o.action.option_strings
             for token in argv if token == flag or token.startswith(flag + "=")}
    tokens: List[str] = []
    for key, value in values.items():
        dest = key.replace("-", "_")
        if dest not in given and value is not None:
            tokens += _tokens_for(by_dest[dest], value, f"--config {path}: {key}")
    return tokens


def _tokens_for(options: List[RecordedOption], value: Any, where: str) -> List[str]:
    actions = [o.action for o in options]
    flag = max(actions[0].option_strings, key=len)
    if all(a.nargs == 0 for a in actions):  # on/off switches
        for action in actions:
            if isinstance(value, bool) and action.const is value:
                return [max(action.option_strings, key=len)]
        if value is False or value == actions[0].default:
            return []
        raise ConfigError(f"{where} must be true or false; got {value!r}.")
    if isinstance(value, dict):
        raise ConfigError(f"{where} must be a value or a list, not a mapping.")
    items = value if isinstance(value, list) else [value]
    if any(isinstance(v, (list, dict)) for v in items):
        raise ConfigError(f"{where}: nested lists are not option values; got {value!r}.")
    text = [_scalar_text(v) for v in items]
    nargs = actions[0].nargs
    if options[0].repeatable:
        return [t for v in text for t in (flag, v)]
    if isinstance(nargs, int):
        if len(text) != nargs:
            raise ConfigError(f"{where} takes {nargs} values; got {value!r}.")
        return [flag, *text]
    if len(text) != 1:
        raise ConfigError(f"{where} takes one value; got {value!r}.")
    return [flag, text[0]]


def _scalar_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"  # refused by numeric flags, kept by text flags
    return str(value)
