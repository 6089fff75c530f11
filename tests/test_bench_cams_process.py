"""``benchmarks/bench_cams_process.py`` times the checkout it is given, not the working tree."""

from __future__ import annotations

import os
import shutil

import pytest
from bench_helpers import BENCH, import_bench

REPO = BENCH.parent


def _module():
    return import_bench("bench_cams_process")


def test_each_checkout_runs_from_its_own_root_and_imports_its_own_code(tmp_path):
    bench = _module()
    other = tmp_path / "other"
    shutil.copytree(REPO / "vpl_plugin", other / "vpl_plugin", ignore=shutil.ignore_patterns("__pycache__"))
    args = type("Args", (), {"upstream_script": BENCH / "upstream_cams_script.py", "upstream_args": "",
                             "vpl_args": "", "vpl_root": REPO, "baseline_root": other})()
    cmds = bench.commands(args, tmp_path, tmp_path / "ids.txt", tmp_path / "clip.pt")
    assert cmds["ours"][2] == REPO.resolve() and cmds["baseline"][2] == other.resolve()
    assert cmds["baseline"][1]["PYTHONPATH"] == str(other.resolve())


def test_a_root_without_its_own_vpl_plugin_is_refused(tmp_path):
    """A folder without vpl_plugin/ would time whatever the interpreter finds (the installed
    package): refused by name."""
    bench = _module()
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    with pytest.raises(SystemExit, match="imports vpl_plugin from"):
        bench.check_imported_from(tmp_path.resolve(), env)
