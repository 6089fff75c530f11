"""Validation at the public boundary: raise with the argument, the expectation and a fix."""

from __future__ import annotations

import math
from typing import Any, Dict, Iterable, Mapping, Optional, Sequence, Tuple


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


# -- saved settings against current ones (resume files, caches, banks) ---------------------------------
def settings_diff(saved: Mapping[str, Any], now: Mapping[str, Any],
                  keys: Optional[Iterable[str]] = None) -> Dict[str, Tuple[Any, Any]]:
    """``{key: (saved value, current value)}`` of every key (default: those of ``now``) whose two
    values differ; a missing key reads as ``None``.

    Example:
        >>> settings_diff({"lr": 0.01, "crop": 320}, {"lr": 0.02, "crop": 320, "seed": 0})
        {'lr': (0.01, 0.02), 'seed': (None, 0)}
    """
    keys = list(now) if keys is None else keys
    return {k: (saved.get(k), now.get(k)) for k in keys if saved.get(k) != now.get(k)}


def describe_diff(diff: Mapping[str, Tuple[Any, Any]], item: str = "{key}: {then!r} -> {now!r}",
                  sep: str = ", ") -> str:
    """The entries of a :func:`settings_diff` as text, each formatted by ``item``.

    Example:
        >>> describe_diff({"lr": (0.01, 0.02)}, "{key}: {then!r} there, {now!r} now")
        'lr: 0.01 there, 0.02 now'
    """
    return sep.join(item.format(key=k, then=a, now=b) for k, (a, b) in diff.items())


def check_settings(saved: Mapping[str, Any], now: Mapping[str, Any], what: str, fix: str, *,
                   keys: Optional[Iterable[str]] = None, item: str = "{key}: {then!r} -> {now!r}",
                   sep: str = ", ") -> None:
    """Raise ``ValueError("<what> (<every difference>); <fix>")`` when saved settings differ from
    the current ones (:func:`settings_diff`, each difference formatted by ``item``).

    Example:
        >>> check_settings({"lr": 0.01}, {"lr": 0.01}, "out/ holds a run with other settings", "use another --out.")
        >>> check_settings({"lr": 0.01}, {"lr": 0.02}, "out/ holds a run with other settings", "use another --out.")
        Traceback (most recent call last):
        ...
        ValueError: out/ holds a run with other settings (lr: 0.01 -> 0.02); use another --out.
    """
    diff = settings_diff(saved, now, keys)
    if diff:
        raise ValueError(f"{what} ({describe_diff(diff, item, sep)}); {fix}")

