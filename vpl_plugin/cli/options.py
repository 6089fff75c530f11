"""Flags generated from configuration dataclasses, so that a field and its flag cannot drift.

A field opts in with ``field(..., metadata=cli_option("--flag", "help", type=...))`` (see
:func:`vpl_plugin._cli_common.cli_option`); :func:`add_config_options` adds its flag to a parser
and :func:`config_values` reads the parsed values back under the field names.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Dict, Iterable, List, Optional, Sequence

from vpl_plugin._cli_common import CLI_OPTION, CLIOption

__all__ = ["add_config_options", "config_values", "option_dest", "options_of"]


def options_of(config: type) -> Dict[str, CLIOption]:
    """``{field name: CLIOption}`` of the fields of dataclass ``config`` that have a flag."""
    return {f.name: f.metadata[CLI_OPTION] for f in dataclasses.fields(config) if CLI_OPTION in f.metadata}


def option_dest(option: CLIOption) -> str:
    """The namespace attribute of a flag: its name without ``--`` (and ``no-`` for an off switch)."""
    name = option.flag[2:]
    if name.startswith("no-"):
        name = name[3:]
    return name.replace("-", "_")


def _field_default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return field.default_factory()  # type: ignore[misc]
    return None


def add_config_options(container: Any, config: type, names: Optional[Iterable[str]] = None, *,
                       given_only: bool = False) -> List[str]:
    """Add the flags of dataclass ``config``'s fields ``names`` (default: every field with a flag,
    in field order) to ``container`` (a parser or argument group), in that order.

    ``given_only=True``: every default is None (a switch is ``store_const True``), so that only the
    flags a user gave override the dataclass (its defaults stay in one place); otherwise a flag's
    default is the field's default. Returns the field names added.
    """
    by_name = {f.name: f for f in dataclasses.fields(config)}
    options = options_of(config)
    names = list(options) if names is None else list(names)
    for name in names:
        option = options[name]  # KeyError: the field has no flag
        default = None if given_only else _field_default(by_name[name])
        _add_option(container, option, default, switch=by_name[name].type in (bool, "bool"),
                    given_only=given_only)
    return names


def _add_option(container: Any, option: CLIOption, default: Any, *, switch: bool, given_only: bool) -> None:
    dest = option_dest(option)
    if switch:
        turns_on = not option.flag.startswith("--no-")
        if given_only:
            container.add_argument(option.flag, dest=dest, action="store_const", const=turns_on, default=None,
                                   help=option.help)
        else:
            container.add_argument(option.flag, dest=dest, action="store_true" if turns_on else "store_false",
                                   **({"default": default} if turns_on and default else {}), help=option.help)
        if option.off_flag:
            container.add_argument(option.off_flag, dest=dest, action="store_false" if turns_on else "store_true",
                                   help=option.off_help)
        return
    extra: Dict[str, Any] = {}
    for key in ("type", "choices", "metavar", "nargs"):
        value = getattr(option, key)
        if value is not None:
            extra[key] = list(value) if key == "choices" else value
    if default is not None or not given_only:
        extra["default"] = default
    container.add_argument(option.flag, **extra, help=option.help)


def config_values(config: type, args: argparse.Namespace, names: Optional[Sequence[str]] = None, *,
                  given_only: bool = False) -> Dict[str, Any]:
    """``{field name: parsed value}`` of ``config``'s flags (``names``, default all) in ``args``;
    ``given_only=True`` leaves out the flags that were not given (value None). A value parsed as
    a list for a tuple field (``nargs``) becomes a tuple."""
    options = options_of(config)
    values: Dict[str, Any] = {}
    for name in options if names is None else names:
        value = getattr(args, option_dest(options[name]), None)
        if given_only and value is None:
            continue
        values[name] = tuple(value) if isinstance(value, list) else value
    return values
