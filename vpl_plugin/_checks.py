"""Validation at the public boundary: raise with the argument, the expectation and a fix."""

from __future__ import annotations

import math
from typing import Any, Sequence


def check_ndim(name: str, x: Any, ndim: int, shape_doc: str) -> None:
    """Raise ValueError unless ``x.ndim == ndim`` (``shape_doc`` names the axes, e.g. ``(K, D)``)."""
    if getattr(x, "ndim", None) != ndim:
        raise ValueError(
            f"{name} must have shape {shape_doc} ({ndim} dims); got shape "
            f"{tuple(getattr(x, 'shape', ()))}."
        )


def check_same(name_a: str, a: int, name_b: str, b: int, hint: str = "") -> None:
    """Raise ValueError unless two sizes agree."""
    if a != b:
        raise ValueError(f"{name_a} ({a}) must equal {name_b} ({b}).{(' ' + hint) if hint else ''}")


def check_range(name: str, value: float, low: float | None = None, high: float | None = None,
                low_open: bool = False) -> None:
    """Raise ValueError unless ``low (<|<=) value <= high``."""
    if low is not None and (value <= low if low_open else value < low):
        op = ">" if low_open else ">="
        raise ValueError(f"{name} must be {op} {low}; got {value}.")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high}; got {value}.")


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> None:
    """Raise ValueError unless ``value`` is one of ``choices`` (the message lists them)."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}; got {value!r}.")


def check_template(template: str) -> None:
    """Raise ValueError unless ``template`` is a prompt with exactly one ``{}`` for the class name.

    Example:
        >>> check_template("a clean origami {}.")
        >>> check_template("a {} {x}")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: prompt template 'a {} {x}' must hold exactly one '{}' ... found fields ['', 'x'].
    """
    import string

    hint = ("must hold exactly one '{}' where the class name goes and no other {...} field (write a "
            "literal brace as '{{' or '}}')")
    if not isinstance(template, str):
        raise ValueError(f"prompt template {template!r} must be a string that {hint[5:]}.")
    try:
        parts = [(name, spec, conv) for _, name, spec, conv in string.Formatter().parse(template)
                 if name is not None]
    except ValueError as err:
        raise ValueError(f"prompt template {template!r} {hint}; Python cannot read it: {err}.") from None
    if [name for name, _, _ in parts] not in ([""], ["0"]) or any(spec or conv for _, spec, conv in parts):
        raise ValueError(f"prompt template {template!r} {hint}; found fields {[n for n, _, _ in parts]}.")


def check_positive(name: str, value: Any) -> float:
    """``value`` as a float, refused unless it is a finite number > 0 (NaN fails every ``<=``
    test, so a plain range check lets it through)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a positive number; got {value!r}.") from None
    if not (math.isfinite(number) and number > 0):
        raise ValueError(f"{name} must be a finite number > 0; got {value!r}.")
    return number
