"""The shared "saved settings differ" check gives the messages the inline copies gave."""

from __future__ import annotations

import pytest

from vpl_plugin._checks import check_settings, describe_diff, settings_diff


def _inline(saved, now):  # the expression each copy used before the shared helper
    diff = {k: (saved.get(k), v) for k, v in now.items() if saved.get(k) != v}
    return diff, ", ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in diff.items())


@pytest.mark.parametrize("saved, now", [
    ({}, {}),
    ({"a": 1}, {"a": 1}),
    ({"a": 1, "b": "x"}, {"a": 2, "b": "x", "c": None}),
    ({"a": [1, 2], "z": 0}, {"a": [1, 2, 3], "q": {"k": 1}}),
])
def test_diff_and_text_equal_the_inline_copies(saved, now):
    diff, text = _inline(saved, now)
    assert settings_diff(saved, now) == diff
    assert describe_diff(diff, "{key}: {then!r} there, {now!r} now") == text


def test_check_settings_message_and_braces_in_paths():
    what = "the feature cache /tmp/a{b}/c was written with other settings"  # braces: no str.format of it
    with pytest.raises(ValueError) as err:
        check_settings({"lr": 0.1, "crop": 3}, {"lr": 0.2, "crop": 3}, what, "delete it.",
                       item="{key}: {then!r} there, {now!r} now")
    assert str(err.value) == f"{what} (lr: 0.1 there, 0.2 now); delete it."
    check_settings({"lr": 0.1, "extra": 1}, {"lr": 0.1}, what, "delete it.")  # keys of `now` only
    with pytest.raises(ValueError, match=r"\(seed: 1 -> 2\)"):
        check_settings({"seed": 1, "lr": 0}, {"seed": 2, "lr": 1}, "x", "y", keys=["seed"])
