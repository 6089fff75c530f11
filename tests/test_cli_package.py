"""The `vpl` command's structure: flags generated from configuration dataclasses, required flags
and choices enforced by argparse (also when --config supplies them), no import of the CLI from the
library, short functions."""

from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from vpl_plugin import cli
from vpl_plugin.cli import EXIT_USAGE, main
from vpl_plugin.cli.options import config_values, option_dest, options_of
from vpl_plugin.phase2.train import TrainConfig

PACKAGE = Path(__file__).resolve().parents[1] / "vpl_plugin"
TRAIN = ["train", "--clip", "c.pt", "--root", "r", "--masks", "m", "--prototypes", "p.pt", "--out", "o"]


def test_train_flag_defaults_are_the_dataclass_defaults():
    args = cli.parse_args(TRAIN)
    assert TrainConfig(**config_values(TrainConfig, args)) == TrainConfig()


def test_every_train_flag_reaches_its_field():
    values = {"iterations": 7, "batch_size": 4, "lr": 0.5, "momentum": 0.8, "weight_decay": 0.001, "crop": 64,
              "scale_range": (0.75, 1.5), "flip": False, "checkpoint_every": 3, "eval_every": 2,
              "eval_limit": 5, "amp": False, "amp_dtype": "fp16", "seed": 11, "num_workers": 0}
    options = options_of(TrainConfig)
    assert sorted(options) == sorted(values)  # a new field with a flag must be added here
    argv = list(TRAIN)
    for name, value in values.items():
        default = next(f.default for f in fields(TrainConfig) if f.name == name)
        assert value != default, name
        flag = options[name].off_flag if name == "amp" else options[name].flag
        if isinstance(value, bool):
            argv.append(flag)
        else:
            argv += [flag, *(str(v) for v in (value if isinstance(value, tuple) else (value,)))]
    config = TrainConfig(**config_values(TrainConfig, cli.parse_args(argv)))
    assert {name: getattr(config, name) for name in values} == values


def test_train_clip_flags_come_from_the_demo_dataclasses():
    """`vpl train-clip`: defaults equal the dataclasses' and every flag reaches its field."""
    from vpl_plugin.cli.train_clip import _settings
    from vpl_plugin.demo.train_clip import DemoCLIPConfig, DemoTrainConfig

    arch, config = _settings(cli.parse_args(["train-clip", "--out", "x.pt"]))
    assert (arch, config) == (DemoCLIPConfig(), DemoTrainConfig())
    values = {"steps": 5, "batch_size": 4, "lr": 0.01, "seed": 3, "select_every": 2, "select_scenes": 7,
              "vision_width": 192, "vision_layers": 4, "patch_size": 4}
    options = {**options_of(DemoTrainConfig), **options_of(DemoCLIPConfig)}
    assert sorted(options) == sorted(values)  # a new field with a flag must be added here
    argv = ["train-clip", "--out", "x.pt"] + [a for n, v in values.items() for a in (options[n].flag, str(v))]
    arch, config = _settings(cli.parse_args(argv))
    assert {n: getattr(config if hasattr(config, n) else arch, n) for n in values} == values


def test_clip_es_flags_come_from_clipesconfig():
    """`vpl cams` / `vpl learn`: the CLIP-ES flags are generated from CLIPESConfig; defaults give no
    change to the dataclass and every flag reaches its field."""
    from vpl_plugin.adapters.clip_es import CLIPESConfig
    from vpl_plugin.cli.shared import clip_es_overrides

    cams = ["cams", "--clip", "c", "--root", "r", "--out", "o"]
    assert CLIPESConfig(**clip_es_overrides(cli.parse_args(cams))) == CLIPESConfig()
    values = {"box_threshold": 0.5, "box_clip_fix": True, "refine": False, "save_gradcam": True,
              "map_mode": "dense"}
    options = options_of(CLIPESConfig)
    assert sorted(options) == sorted(values)  # a new field with a flag must be added here
    argv = list(cams)
    for name, value in values.items():
        argv += [options[name].flag] if isinstance(value, bool) else [options[name].flag, str(value)]
    assert clip_es_overrides(cli.parse_args(argv + ["--template", "a {}"])) == {**values, "templates": ("a {}",)}
    learn = cli.parse_args(["learn", "--clip", "c", "--root", "r", "--out", "o.pt", "--box-clip-fix"])
    assert clip_es_overrides(learn) == {"box_clip_fix": True, "map_mode": "gradcam"}  # learn has no --no-refine


def test_generated_flags_keep_their_names_in_the_namespace():
    args = vars(cli.parse_args(TRAIN))
    for option in options_of(TrainConfig).values():
        assert option_dest(option) in args
    assert {"iters", "workers", "scale", "val_limit", "flip", "amp"} <= set(args)


def test_required_flags_can_come_from_the_config_file(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("clip: m.pt\nroot: data\nout: cams\n")
    args = cli.parse_args(["cams", "--config", str(cfg)])
    assert (args.clip, args.root, args.out) == ("m.pt", "data", "cams")


@pytest.mark.parametrize("argv, named", [
    (["cams", "--root", "r"], "the following arguments are required: --clip, --out"),
    (["eval", "--gt-root", "g", "--split-file", "s"], "one of the arguments --cams --masks is required"),
    (["cams", "--clip", "c", "--root", "r", "--out", "o", "--adapter", "nope"], "invalid choice: 'nope'"),
])
def test_missing_or_refused_flags_exit_2_with_the_usage(argv, named, tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("limit: 2\n")
    for extra in ([], ["--config", str(cfg)]):
        assert main(argv + extra) == EXIT_USAGE
        err = capsys.readouterr().err
        assert named in err and err.startswith("usage: vpl ")


def test_help_shows_required_flags_and_adapter_choices(capsys):
    assert main(["cams", "--help"]) == 0
    usage = capsys.readouterr().out.split("\n\n")[0]
    assert "--clip NAME_OR_PATH" in usage and "[--clip" not in usage
    assert "--adapter {clip-cpal,clip-es}" in usage


def test_the_library_never_imports_the_cli():
    """Only the CLI package itself and ``__main__`` import ``vpl_plugin.cli`` (at any level)."""
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE)
        if rel.parts[0] == "cli" or rel.name == "__main__.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(n == "vpl_plugin.cli" or n.startswith("vpl_plugin.cli.") for n in names):
                offenders.append(f"{rel}:{node.lineno}")
    assert offenders == []
    code = "import sys, vpl_plugin.reproduce; print(any(m.startswith('vpl_plugin.cli') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_cli_functions_are_short():
    """No function of the CLI package or of reproduce is longer than 80 lines."""
    long = []
    for path in [*sorted((PACKAGE / "cli").glob("*.py")), PACKAGE / "reproduce.py"]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if node.end_lineno - node.lineno + 1 > 80:
                    long.append(f"{path.name}:{node.name}")
    assert long == []


def test_python_dash_m_is_the_same_command():
    out = subprocess.run([sys.executable, "-m", "vpl_plugin", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("vpl-plugin ")
