"""Reading YAML files the tool did not write itself (``--config``, a shared output folder's record).

``yaml.safe_load`` builds only plain data, but it still expands aliases: a few hundred bytes of
nested ``*alias`` references (a "billion laughs" file) expand to gigabytes. Configuration files
have no use for aliases, so :func:`read_yaml_mapping` refuses them, refuses files over a size
limit, and reports malformed YAML as one line with the file, the line and the column.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict

from vpl_plugin._imports import require

__all__ = ["MAX_YAML_BYTES", "YAMLFileError", "read_yaml_mapping"]

#: larger files are refused (a configuration is a few hundred bytes)
MAX_YAML_BYTES = 1 << 20


class YAMLFileError(ValueError):
    """A YAML file that cannot be used; the message names the file and the problem."""


def _loader_class():
    yaml = require("yaml")

    class NoAliasSafeLoader(yaml.SafeLoader):
        """``yaml.SafeLoader`` that refuses aliases (``*name``) instead of expanding them."""

        def compose_node(self, parent, index):  # noqa: D102 - PyYAML hook
            if self.check_event(yaml.events.AliasEvent):
                mark = self.peek_event().start_mark
                raise yaml.composer.ComposerError(
                    None, None, "aliases (*name) are not allowed in this file", mark)
            return super().compose_node(parent, index)

    return NoAliasSafeLoader


def read_yaml_mapping(path: str | os.PathLike, *, what: str = "YAML file") -> Dict[str, Any]:
    """Read a YAML file that must hold a mapping (an empty file gives ``{}``).

    Args:
        path: the file.
        what: how the file is named in errors, e.g. ``"--config file"``.

    Raises:
        YAMLFileError: missing, larger than :data:`MAX_YAML_BYTES`, not valid YAML, uses an
            alias, or holds something other than a mapping.
    """
    yaml = require("yaml")
    path = Path(path)
    if not path.is_file():
        raise YAMLFileError(f"{what} {path}: no such file.")
    size = path.stat().st_size
    if size > MAX_YAML_BYTES:
        raise YAMLFileError(f"{what} {path}: {size} bytes, more than the {MAX_YAML_BYTES} a "
                            f"configuration may have; is it the right file?")
    try:
        text = path.read_text(encoding="utf-8")
        values = yaml.load(text, Loader=_loader_class())  # noqa: S506 - a SafeLoader subclass
    except UnicodeDecodeError as err:
        raise YAMLFileError(f"{what} {path}: not UTF-8 text ({err}).") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise YAMLFileError(f"{what} {path}: not valid YAML{where}: {problem}.") from None
    if values is None:
        return {}
    if not isinstance(values, dict) or not all(isinstance(k, str) for k in values):
        raise YAMLFileError(f"{what} {path}: expected a mapping of option names to values; got "
                            f"{type(values).__name__}.")
    return values
