"""benchmarks/demo_robustness.py: the plan's analysis on fabricated demo folders (known answers)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("scipy")
ROOT = Path(__file__).resolve().parents[1]


def _module():
    spec = importlib.util.spec_from_file_location("demo_robustness", ROOT / "benchmarks" / "demo_robustness.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _confusion(rng, n, acc):
    """(n, 2, 2) per-scene confusions whose diagonal share is about ``acc``."""
    out = np.zeros((n, 2, 2), np.int64)
    for i in range(n):
        good = rng.binomial(100, acc, size=2)
        out[i] = [[good[0], 100 - good[0]], [100 - good[1], good[1]]]
    return out


def _write_run(folder: Path, mod, accs: dict, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    folder.mkdir()
    arrays = {"names": np.array(list(accs), dtype=str)}
    conf = {}
    for i, (name, acc) in enumerate(accs.items()):
        seed_c = np.stack([_confusion(rng, 30, acc), _confusion(rng, 30, acc - 0.1)])  # two exponents
        mask_c = _confusion(rng, 30, acc)
        arrays[f"row{i:02d}_seed"], arrays[f"row{i:02d}_mask"] = seed_c, mask_c
        arrays[f"row{i:02d}_exponents"] = np.array([1.0, 2.0])
        conf[name] = (seed_c, mask_c)
    np.savez(folder / "confusion.npz", **arrays)
    (folder / "report.json").write_text(json.dumps({"gates": {"label_set_accuracy": 0.99}, "checkpoint": "x"}))
    return conf


def test_rows_gains_and_across_clips(tmp_path):
    mod = _module()
    accs = {mod.CLIP_ES: 0.6, mod.PAPER_LITERAL: 0.5, "text prototypes, GradCAM, no CAA": 0.7,
            "text prototypes, dense map (control)": 0.4, mod.RECOMMENDED: 0.8}
    confs = [_write_run(tmp_path / f"c{k}", mod, accs, k) for k in range(2)]
    out = tmp_path / "r.json"
    assert mod.main(["--run", f"a={tmp_path / 'c0'}", "--run", f"b={tmp_path / 'c1'}", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    for name, conf in zip("ab", confs):
        clip = r["clips"][name]
        # the best text row is the text row with the highest point mIoU, per measure (a known answer here)
        assert clip["rows"]["best text-prototype row"]["seed"]["row"] == "text prototypes, GradCAM, no CAA"
        # point values: best exponent of the summed matrices, by hand
        s = conf[mod.RECOMMENDED][0].sum(axis=1)
        iou = np.diagonal(s, axis1=1, axis2=2) / (s.sum(1) + s.sum(2) - np.diagonal(s, axis1=1, axis2=2))
        assert clip["rows"]["recommended VPL"]["seed"]["miou"] == pytest.approx(100 * iou.mean(1).max())
        g = clip["gains"]["recommended VPL - best text-prototype row"]["seed"]
        assert g["ci95"][0] < g["difference"] < g["ci95"][1]
    across = r["across_clips"]["recommended VPL - best text-prototype row"]["seed"]
    per = [r["clips"][n]["gains"]["recommended VPL - best text-prototype row"]["seed"]["difference"] for n in "ab"]
    assert across["mean"] == pytest.approx(np.mean(per))
    assert across["holds_across_clips"] is True  # 0.8 vs 0.7 on 30 scenes of 200 pixels: clearly positive
    lit = r["across_clips"]["paper-literal VPL - CLIP-ES"]["mask"]
    assert lit["mean"] < 0 and lit["holds_across_clips"] is False


def test_one_clip_writes_no_across_part(tmp_path):
    mod = _module()
    accs = {mod.CLIP_ES: 0.6, mod.PAPER_LITERAL: 0.5, mod.RECOMMENDED: 0.8}
    _write_run(tmp_path / "c0", mod, accs, 0)
    out = tmp_path / "r.json"
    mod.main(["--run", f"a={tmp_path / 'c0'}", "--out", str(out)])
    r = json.loads(out.read_text())
    assert r["across_clips"] is None and "two more" in r["across_clips_reason"]


def test_interim_marking_and_archived_clip_identity(tmp_path):
    """Two of three planned CLIPs: marked incomplete; a folder's clip.json names a CLIP no longer on disk,
    a checkpoint on disk is hashed (sha256 of its bytes, the known answer)."""
    import hashlib

    mod = _module()
    accs = {mod.CLIP_ES: 0.6, mod.PAPER_LITERAL: 0.5, mod.RECOMMENDED: 0.8}
    _write_run(tmp_path / "c0", mod, accs, 0)
    _write_run(tmp_path / "c1", mod, accs, 1)
    (tmp_path / "c0" / "clip.json").write_text(json.dumps({"checkpoint": "clip_seed1.pt", "sha256": "ab" * 32}))
    ckpt = tmp_path / "real.pt"
    ckpt.write_bytes(b"weights")
    (tmp_path / "c1" / "report.json").write_text(json.dumps({"gates": {}, "checkpoint": str(ckpt)}))
    out = tmp_path / "r.json"
    mod.main(["--run", f"a={tmp_path / 'c0'}", "--run", f"b={tmp_path / 'c1'}", "--out", str(out)])
    r = json.loads(out.read_text())
    assert r["complete"] is False and "2 of the 3" in r["interim_reason"]
    assert r["clips"]["a"]["checkpoint"] == "clip_seed1.pt" and r["clips"]["a"]["checkpoint_sha256"] == "ab" * 32
    assert r["clips"]["b"]["checkpoint_sha256"] == hashlib.sha256(b"weights").hexdigest()
    mod.main(["--run", f"a={tmp_path / 'c0'}", "--run", f"b={tmp_path / 'c1'}", "--planned", "2",
              "--out", str(out)])
    r = json.loads(out.read_text())
    assert r["complete"] is True and "interim_reason" not in r
