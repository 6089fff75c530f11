"""The `vpl` command refuses bad input by name and never answers with a traceback.

Config files go through each flag's own checks, aliases bombs are refused, a second run into the
same output is refused while the first runs, workers die with their parent, temporary files of a
killed run are cleaned, outputs follow the umask, and any unexpected error ends as one line.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from vpl_plugin import cli
from vpl_plugin.cli import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, main

REPO = Path(__file__).resolve().parents[1]


def _run(argv):
    return main([str(a) for a in argv])


def _err(capsys) -> str:
    return capsys.readouterr().err


# -- --config ---------------------------------------------------------------------------------------
def _config(tmp_path: Path, text: str, name: str = "c.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_config_values_parse_exactly_like_the_flags_they_stand_for(tmp_path):
    cfg = _config(tmp_path, "iters: 5\nlr: 2.5\ntau: clip\nno_cache: true\nlimit: 3\n"
                            "template: ['a {}.', 'the {}.']\nroot: data\nclip: m.pt\nout: p.pt\n"
                            .replace("no_cache: true", "cache: false").replace("template:", "templates:"))
    from_file = cli.parse_args(["learn", "--config", str(cfg)])
    from_flags = cli.parse_args(["learn", "--iters", "5", "--lr", "2.5", "--tau", "clip", "--no-cache",
                             "--limit", "3", "--template", "a {}.", "--template", "the {}.",
                             "--root", "data", "--clip", "m.pt", "--out", "p.pt"])
    assert {**vars(from_file), "config": None} == vars(from_flags)


def test_flags_on_the_command_line_replace_the_file_values(tmp_path):
    cfg = _config(tmp_path, "templates: ['from file {}.']\niters: 7\nroot: r\nclip: m\nout: o.pt\n")
    args = cli.parse_args(["learn", "--config", str(cfg), "--template", "flag {}.", "--iters=9"])
    assert args.templates == ["flag {}."] and args.iters == 9 and args.root == "r"


@pytest.mark.parametrize("text, named", [
    ("limit: 1.5\n", "--limit"),              # an int flag: argparse's type, not a traceback later
    ("limit: -1\n", "--limit"),               # --limit -1 processed nothing before
    ("lr: .nan\n", "--lr"),
    ("lr: .inf\n", "--lr"),
    ("tau: .inf\n", "--tau"),
    ("iters: true\n", "--iters"),             # a bool is not a number
    ("cache: 3\n", "cache"),                  # a switch takes true/false
    ("scale: [1]\n", "scale"),                # wrong arity (vpl train's --scale takes 2)
    ("target_mode: bogus\n", "--target-mode"),
    ("unknown_key: 1\n", "unknown_key"),
])
def test_bad_config_values_are_refused_with_the_file_and_the_option(tmp_path, capsys, text, named):
    cfg = _config(tmp_path, text)
    command = "train" if text.startswith("scale") else "learn"
    assert _run([command, "--config", cfg]) == EXIT_USAGE
    err = _err(capsys)
    assert str(cfg) in err and named in err and "Traceback" not in err


def test_yaml_alias_bomb_and_malformed_yaml_are_refused_quickly(tmp_path, capsys):
    rows = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for prev, name in zip("abcdefgh", "bcdefghi"):
        rows.append(f"{name}: &{name} [" + ",".join([f"*{prev}"] * 9) + "]")
    bomb = _config(tmp_path, "\n".join(rows) + "\n", "bomb.yaml")
    assert bomb.stat().st_size < 500  # 9**9 strings if expanded
    start = time.perf_counter()
    assert _run(["learn", "--config", bomb]) == EXIT_USAGE
    assert time.perf_counter() - start < 5
    err = _err(capsys)
    assert "bomb.yaml" in err and "alias" in err and "line 2" in err
    broken = _config(tmp_path, "limit: [1\nout: x\n", "broken.yaml")
    assert _run(["learn", "--config", broken]) == EXIT_USAGE
    err = _err(capsys)
    assert "broken.yaml" in err and "line 2" in err and "Traceback" not in err


# -- command-line values ----------------------------------------------------------------------------
@pytest.mark.parametrize("argv, named", [
    (["learn", "--lr", "nan"], "--lr"), (["learn", "--lr", "inf"], "--lr"),
    (["learn", "--tau", "inf"], "--tau"), (["learn", "--tau", "-0.1"], "--tau"),
    (["learn", "--limit", "-1"], "--limit"), (["cams", "--limit", "0"], "--limit"),
    (["masks", "--conf", "nan"], "--conf"), (["train", "--scale", "0.5", "inf"], "--scale"),
    (["reproduce", "table1", "--lr", "nan"], "--lr"),
])
def test_non_finite_and_negative_numbers_are_refused(capsys, argv, named):
    assert _run(argv) == EXIT_USAGE
    err = _err(capsys)
    assert named in err and "Traceback" not in err


def test_template_with_a_stray_field_is_refused_by_name(tmp_path, tiny_checkpoint, capsys):
    root = tmp_path / "VOC2012"
    for sub in ("JPEGImages", "Annotations"):
        (root / sub).mkdir(parents=True)
    (root / "x.txt").write_text("a\n")
    code = _run(["cams", "--clip", tiny_checkpoint, "--root", root, "--split-file", root / "x.txt",
                 "--out", tmp_path / "o", "--template", "a {} {x}", "--no-progress"])
    err = _err(capsys)
    assert code == EXIT_USAGE and "'a {} {x}'" in err and "Traceback" not in err


# -- outputs of the wrong kind, checked before any work ---------------------------------------------
def test_learn_out_that_its_own_config_would_overwrite_is_refused_first(tmp_path, capsys):
    for name in ("p.yaml", "p.features"):
        code = _run(["learn", "--clip", "never-loaded.pt", "--root", tmp_path, "--out", tmp_path / name])
        err = _err(capsys)
        assert code == EXIT_USAGE and "name the prototype file" in err and str(tmp_path / "p.pt") in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing was written


def test_out_of_the_wrong_kind_is_refused_before_loading_anything(tmp_path, capsys):
    a_file = tmp_path / "taken"
    a_file.write_text("x")
    assert _run(["cams", "--clip", "never-loaded.pt", "--root", tmp_path, "--out", a_file]) == EXIT_USAGE
    assert "is a file" in _err(capsys)
    assert _run(["learn", "--clip", "never-loaded.pt", "--root", tmp_path, "--out", tmp_path]) == EXIT_USAGE
    assert "is a folder" in _err(capsys)


# -- the last resort --------------------------------------------------------------------------------
def test_an_unexpected_error_is_one_line_and_the_traceback_comes_with_v(monkeypatch, tmp_path, capsys):
    def boom(args):
        raise RuntimeError(f"something broke while reading {tmp_path / 'x.npy'}\nsecond line")

    monkeypatch.setattr(cli.evaluate, "run", boom)
    argv = ["eval", "--cams", tmp_path, "--gt-root", tmp_path, "--split-file", tmp_path / "l.txt"]
    assert _run(argv) == EXIT_FAILURE
    err = _err(capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines == [f"error: RuntimeError: something broke while reading {tmp_path / 'x.npy'} second line "
                     f"(run with -v for the traceback)"]
    assert _run(argv + ["-v"]) == EXIT_FAILURE
    assert "Traceback (most recent call last)" in _err(capsys)


def test_an_os_error_names_its_file(monkeypatch, tmp_path, capsys):
    def denied(args):
        raise PermissionError(13, "Permission denied", str(tmp_path / "locked.png"))

    monkeypatch.setattr(cli.evaluate, "run", denied)
    assert _run(["eval", "--cams", tmp_path, "--gt-root", tmp_path, "--split-file", tmp_path / "l"]) == EXIT_USAGE
    assert f"{tmp_path / 'locked.png'}" in _err(capsys)


# -- one writer per output --------------------------------------------------------------------------
_HOLD = """
import sys, time
from vpl_plugin._lock import output_lock
with output_lock(sys.argv[1], "vpl cams --out held", folder=True):
    print("locked", flush=True)
    time.sleep(120)
"""


def _hold_lock(folder: Path, env=None) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(folder)], stdout=subprocess.PIPE, text=True,
                            cwd=REPO, env=env)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_writer_is_refused_naming_the_first_and_the_lock_dies_with_it(tmp_path, capsys):
    out = tmp_path / "masks"
    holder = _hold_lock(out)
    try:
        code = _run(["masks", "--cams", tmp_path, "--root", tmp_path, "--split-file", tmp_path / "l.txt",
                     "--out", out, "--no-progress"])
        err = _err(capsys)
        assert code == EXIT_USAGE
        assert f"process {holder.pid}" in err and "vpl cams --out held" in err and str(out) in err
    finally:
        holder.send_signal(signal.SIGKILL)  # the kernel releases a killed holder's lock
        holder.wait()
    from vpl_plugin._lock import output_lock

    with output_lock(out, "test"):
        pass


def test_processes_of_one_torchrun_job_share_the_lock(tmp_path):
    from vpl_plugin._lock import OutputLocked, output_lock

    env = {**os.environ, "TORCHELASTIC_RUN_ID": "job-1"}
    holder = _hold_lock(tmp_path / "o", env=env)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("TORCHELASTIC_RUN_ID", "job-1")
            with output_lock(tmp_path / "o", "rank 1"):
                pass
            mp.setenv("TORCHELASTIC_RUN_ID", "job-2")
            with pytest.raises(OutputLocked, match="being written by"):
                with output_lock(tmp_path / "o", "another job"):
                    pass
    finally:
        holder.kill()
        holder.wait()


def test_temporary_files_of_a_killed_run_are_removed_and_nothing_else(tmp_path):
    from vpl_plugin._lock import output_lock

    out = tmp_path / "cams"
    out.mkdir()
    stale = [out / ".2007_000032.k3x_9qzt.tmp.npy", out / ".vpl_cams.abcdefgh.tmp.yaml"]
    kept = [out / "2007_000032.npy", out / ".hidden", out / ".a.b.tmp", out / "x.tmp.npy"]
    for path in stale + kept:
        path.write_bytes(b"x")
    with output_lock(out, "test"):
        pass
    assert [p.exists() for p in stale] == [False, False] and all(p.exists() for p in kept)
    # beside a file output only that output's own temporary files go
    other = tmp_path / ".q.abcdefgh.tmp.pt"
    mine = tmp_path / ".p.abcdefgh.tmp.pt"
    for path in (other, mine):
        path.write_bytes(b"x")
    with output_lock(tmp_path / "p.pt", "test", folder=False):
        pass
    assert other.exists() and not mine.exists()


# -- outputs follow the umask -----------------------------------------------------------------------
def test_outputs_get_the_permissions_of_an_ordinary_file(tmp_path):
    from vpl_plugin._io import write_json

    old = os.umask(0o022)
    try:
        write_json(tmp_path / "a.json", {"x": 1})
        os.umask(0o027)
        write_json(tmp_path / "b.json", {"x": 1})
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "b.json").stat().st_mode & 0o777 == 0o640


# -- real runs: a CAM folder, then masks whose workers die with their parent ------------------------
@pytest.fixture(scope="module")
def cam_folder(voc_root, tiny_checkpoint, tmp_path_factory):
    pytest.importorskip("cv2", reason="OpenCV (pip install opencv-python-headless) is needed")
    pytest.importorskip("pydensecrf.densecrf", reason="pydensecrf2 is needed")
    from voc_helpers import FOUR_IDS, copy_voc_layout

    root = copy_voc_layout(voc_root, tmp_path_factory.mktemp("voc"))
    ids = []
    for k in range(6):  # enough work that the parent is still running when it is killed
        for i in FOUR_IDS:
            new = f"{i}_{k}"
            (root / "JPEGImages" / f"{new}.jpg").write_bytes((root / "JPEGImages" / f"{i}.jpg").read_bytes())
            (root / "Annotations" / f"{new}.xml").write_bytes((root / "Annotations" / f"{i}.xml").read_bytes())
            ids.append(new)
    (root / "ImageSets/Segmentation/many.txt").write_text("\n".join(ids) + "\n")
    cams = tmp_path_factory.mktemp("cams") / "cams"
    assert _run(["cams", "--clip", tiny_checkpoint, "--root", root, "--split-file", "many.txt",
                 "--out", cams, "--no-progress"]) == EXIT_OK
    return root, cams


def _children(pid: int):
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(c) for c in text.split()]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc to find the workers")
def test_mask_workers_die_with_a_killed_parent_and_a_rerun_gives_the_same_masks(cam_folder, tmp_path):
    root, cams = cam_folder
    args = ["masks", "--cams", str(cams), "--root", str(root), "--split-file", "many.txt", "--no-progress"]
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "vpl_plugin", *args, "--out", str(out), "--workers", "2"],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers = []
    deadline = time.monotonic() + 60
    while len(workers) < 2 and time.monotonic() < deadline and proc.poll() is None:
        workers = _children(proc.pid)
        time.sleep(0.05)
    assert len(workers) >= 2, "the pool never started"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 10
    while any(_alive(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(w) for w in workers), "workers outlived their killed parent"
    assert _run([*args, "--out", out, "--workers", "2"]) == EXIT_OK  # resume into the same folder
    assert _run([*args, "--out", tmp_path / "clean"]) == EXIT_OK
    names = sorted(p.name for p in (tmp_path / "clean").glob("*.png"))
    assert len(names) == 24 and names == sorted(p.name for p in out.glob("*.png"))
    for name in names:
        assert (out / name).read_bytes() == (tmp_path / "clean" / name).read_bytes(), name


def test_unreadable_record_of_an_existing_cam_folder_is_refused(cam_folder, tiny_checkpoint, tmp_path, capsys):
    root, cams = cam_folder
    copy = tmp_path / "cams"
    copy.mkdir()
    (copy / "2007_000032_0.npy").write_bytes((cams / "2007_000032_0.npy").read_bytes())
    (copy / "vpl_cams.yaml").write_text("a: &a [1, 2]\nb: [*a, *a]\n")
    code = _run(["cams", "--clip", tiny_checkpoint, "--root", root, "--split-file", "many.txt",
                 "--out", copy, "--limit", "1", "--no-progress"])
    err = _err(capsys)
    assert code == EXIT_USAGE and "vpl_cams.yaml" in err and "alias" in err
    record = json.loads(json.dumps({"kept": sorted(p.name for p in copy.iterdir())}))
    assert "2007_000032_0.npy" in record["kept"]
    assert np.load(copy / "2007_000032_0.npy", allow_pickle=True).item()["keys"].tolist() == [0, 14]


def test_a_forked_child_does_not_keep_the_parents_lock(tmp_path):
    from vpl_plugin._lock import OutputLocked, output_lock

    out = tmp_path / "o"
    read, write = os.pipe()
    with output_lock(out, "parent"):
        pid = os.fork()
        if pid == 0:  # the child outlives the parent's lock by a few seconds
            os.close(read)
            os.write(write, b"x")
            time.sleep(3)
            os._exit(0)
        os.close(write)
        os.read(read, 1)
    try:
        with output_lock(out, "next run"):  # would be refused if the child held the lock
            pass
    except OutputLocked:
        pytest.fail("a forked child kept the output locked after its parent released it")
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
