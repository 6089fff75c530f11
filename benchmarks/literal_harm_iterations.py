"""Follow-up to ``literal_harm_factorial.py``: the paper-literal recipe stopped early.

The factorial experiment found that the harm of the paper-literal swap comes with the learned
foreground prototypes themselves (not the background prototypes, not the temperature). The
paper's recipe starts every prototype at its text prototype; this script asks whether stopping
its 3000 halving steps early keeps a useful part of the change. Exploratory (designed after the
factorial result), so a truncation counts as removing the harm only if its seed mIoU (with CAA)
is not below CLIP-ES's (upper end of the paired 95 % interval >= 0) on the evaluation scenes
**and** on the 300 validation scenes.

The literal recipe (token rows, seed-hardened targets, tau_I 0.03, lr 10, halving rule) is run once with
snapshots after 10, 100 and 1000 steps (the halving rule's first ``n`` steps do not
depend on how many follow, so a snapshot is exactly the recipe with ``iters = n``); 3000 steps is
the factorial experiment's literal set. Each snapshot goes into CLIP-ES's GradCAM with logit scale
1/0.03, vision background prototypes (the literal swap), and again with the text background
prototypes and CLIP's own scale::

    python benchmarks/literal_harm_iterations.py      # about 10 min; after literal_harm_factorial.py

Writes benchmarks/results/literal_harm_iterations.json and .md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import literal_harm_factorial as lh
from _common import RESULTS, machine

SNAPSHOTS = (10, 100, 1000)


def snapshots(world: lh.World, probes, steps: tuple = SNAPSHOTS) -> dict:
    """The literal recipe's prototypes after each of ``steps`` halving steps."""
    from vpl_plugin.prototypes import PrototypeSet, build_targets, learn_vision_prototypes

    text = world.text
    tau_text = 1.0 / float(text.logit_scale)
    xs, qs, cs = [], [], []
    for feats, cams, labels, _ in probes:
        q, cand = build_targets(feats, text.prototypes, cams, labels, text.num_fg, phi=lh.PHI,
                                tau_text=tau_text, mode="seed_hardened")
        xs.append(feats)
        qs.append(q)
        cs.append(cand[None].expand(q.shape[0], -1))
    kept = {}

    def keep(iteration: int, w: torch.Tensor) -> bool:
        if iteration in steps:
            kept[iteration] = PrototypeSet(w.detach().float().cpu().clone(), text.class_names,
                                           text.background_names, tau=lh.TAU_LITERAL, kind="vision")
        return iteration >= max(steps)

    learn_vision_prototypes(torch.cat(xs), torch.cat(qs), text.prototypes, torch.cat(cs), tau=lh.TAU_LITERAL,
                            lr=lh.LR, iters=max(steps), step_rule="halving", callback=keep)
    return kept


def first_steps(world: lh.World, probes, scenes, resamples: int) -> dict:
    """How far the first halving steps move the prototypes, and the seed after 1 and 3 steps.

    Descriptive (nothing is chosen from it): the mean cosine between each foreground prototype that
    moved and its text prototype after 1, 3, 10 and 100 steps, and the literal swap's seed with
    CAA after 1 and 3 steps, on the evaluation scenes.
    """
    from vpl_plugin.bootstrap import resample_counts

    sets = snapshots(world, probes, (1, 3, 10, 100))
    nf, text = world.text.num_fg, world.text.prototypes[: world.text.num_fg]
    out: dict = {"cosine_to_text": {}, "seed": {}}
    for n, ps in sorted(sets.items()):
        cos = (ps.prototypes[:nf] * text).sum(1) / (ps.prototypes[:nf].norm(dim=1) * text.norm(dim=1))
        out["cosine_to_text"][n] = round(float(cos[cos < 1 - 1e-6].mean()), 4)
    counts = resample_counts(len(scenes), resamples, seed=0)
    base = lh.score_cell(world, lh.cell_set(world, None, "text", "text", world.clip_scale), scenes)["seed"]
    for n in (1, 3):
        r = lh.score_cell(world, lh.cell_set(world, sets[n], "vision", "vision", 1 / lh.TAU_LITERAL), scenes)
        out["seed"][n] = {"seed": lh.interval(lh.point(r["seed"]), lh.resampled(r["seed"], counts)),
                          "vs_clip_es": lh.interval(lh.point(r["seed"]) - lh.point(base),
                                                    lh.resampled(r["seed"], counts) - lh.resampled(base, counts))}
    return out


def smaller_steps(world: lh.World, probes, resamples: int, lrs=(0.1, 1.0)) -> dict:
    """The literal recipe (3000 halving steps) with a smaller first step ``lr``, as the literal swap.

    Exploratory: lr 10 throws the prototypes across the sphere in its first step (``--first-steps``);
    a smaller lr keeps them nearer their text start. Rule as for the early stops: a variant removes the
    harm only if its seed is not below CLIP-ES's on the evaluation and on the validation scenes.
    """
    from vpl_plugin.bootstrap import resample_counts
    from vpl_plugin.prototypes import PrototypeSet, build_targets, learn_vision_prototypes

    text, nf = world.text, world.text.num_fg
    tau_text = 1.0 / float(text.logit_scale)
    parts = [build_targets(f, text.prototypes, c, lab, nf, phi=lh.PHI, tau_text=tau_text, mode="seed_hardened")
             for f, c, lab, _ in probes]
    x = torch.cat([p[0] for p in probes])
    q = torch.cat([t[0] for t in parts])
    cand = torch.cat([t[1][None].expand(t[0].shape[0], -1) for t in parts])
    out: dict = {}
    for lr in lrs:
        w = learn_vision_prototypes(x, q, text.prototypes, cand, tau=lh.TAU_LITERAL, lr=lr, iters=lh.ITERS,
                                    step_rule="halving")
        ps = PrototypeSet(w, text.class_names, text.background_names, tau=lh.TAU_LITERAL, kind="vision")
        cos = (w[:nf] * text.prototypes[:nf]).sum(1)
        row: dict = {"cosine_to_text": round(float(cos[cos < 1 - 1e-6].mean()), 4)}
        for split, scenes, seed in (("evaluation", world.evaluation, 0), ("validation", world.validation, 1)):
            counts = resample_counts(len(scenes), resamples, seed=seed)
            base = lh.score_cell(world, lh.cell_set(world, None, "text", "text", world.clip_scale), scenes)
            r = lh.score_cell(world, lh.cell_set(world, ps, "vision", "vision", 1 / lh.TAU_LITERAL), scenes)
            for m in ("seed", "mask"):
                row[f"{split}_{m}"] = lh.interval(lh.point(r[m]), lh.resampled(r[m], counts))
                row[f"{split}_{m}_vs_clip_es"] = lh.interval(
                    lh.point(r[m]) - lh.point(base[m]), lh.resampled(r[m], counts) - lh.resampled(base[m], counts))
        row["removes_harm"] = bool(row["evaluation_seed_vs_clip_es"]["ci95"][1] >= 0
                                   and row["validation_seed_vs_clip_es"]["ci95"][1] >= 0)
        out[f"lr {lr}"] = row
        print(f"lr {lr}: {row}", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clip", default=None)
    parser.add_argument("--scenes", type=int, default=300, help="evaluation and validation scenes each")
    parser.add_argument("--resamples", type=int, default=2000)
    parser.add_argument("--cache", required=True, help="the factorial experiment's --cache (its literal set)")
    parser.add_argument("--first-steps", action="store_true",
                        help="only the first steps: prototype movement and the seed after 1 and 3 steps "
                             "(writes literal_harm_first_steps.json)")
    parser.add_argument("--smaller-steps", action="store_true",
                        help="only the literal recipe with lr 0.1 and 1 (writes literal_harm_lr.json)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    from vpl_plugin.bootstrap import resample_counts
    from vpl_plugin.prototypes import PrototypeSet

    start = time.time()
    world = lh.load_world(args.clip, args.scenes, args.scenes)
    if args.smaller_steps:
        res = smaller_steps(world, lh.learning_probes(world), args.resamples)
        res["seconds"], res["machine"] = round(time.time() - start, 1), machine()
        (RESULTS / "literal_harm_lr.json").write_text(json.dumps(res, indent=1) + "\n")
        return
    if args.first_steps:
        res = first_steps(world, lh.learning_probes(world), world.evaluation, args.resamples)
        res["seconds"], res["machine"] = round(time.time() - start, 1), machine()
        (RESULTS / "literal_harm_first_steps.json").write_text(json.dumps(res, indent=1) + "\n")
        print(json.dumps(res, indent=1))
        return
    sets = snapshots(world, lh.learning_probes(world))
    sets[lh.ITERS] = PrototypeSet.load(Path(args.cache) / "prototypes_token.pt")
    print(f"learned snapshots in {time.time() - start:.0f} s", flush=True)
    variants = {"text (0 steps), CLIP's scale": (None, "text", "text", world.clip_scale)}
    for n, ps in sorted(sets.items()):
        variants[f"{n} steps, vision bg, 1/0.03"] = (ps, "vision", "vision", 1 / lh.TAU_LITERAL)
        variants[f"{n} steps, text bg, CLIP's scale"] = (ps, "vision", "text", world.clip_scale)
    out = {"design": __doc__, "scenes": args.scenes, "resamples": args.resamples}
    for split, scenes, seed in (("evaluation", world.evaluation, 0), ("validation", world.validation, 1)):
        counts = resample_counts(len(scenes), args.resamples, seed=seed)
        res = {name: lh.score_cell(world, lh.cell_set(world, ps, fg, bg, scale), scenes)
               for name, (ps, fg, bg, scale) in variants.items()}
        base = {m: lh.resampled(res["text (0 steps), CLIP's scale"][m], counts) for m in ("seed", "mask")}
        rows = []
        for name, r in res.items():
            row = {"variant": name}
            for m in ("seed", "mask"):
                samples = lh.resampled(r[m], counts)
                row[m] = lh.interval(lh.point(r[m]), samples)
                row[f"{m}_vs_clip_es"] = lh.interval(lh.point(r[m]) - lh.point(res["text (0 steps), CLIP's scale"][m]),
                                                     samples - base[m])
            rows.append(row)
            print(f"{split:10s} {name:36s} seed {lh.fmt(row['seed'])}  vs CLIP-ES {lh.fmt(row['seed_vs_clip_es'])}",
                  flush=True)
        out[split] = rows
    out["removes_harm"] = [r["variant"] for r, v in zip(out["evaluation"], out["validation"])
                           if r["variant"] != "text (0 steps), CLIP's scale"
                           and r["seed_vs_clip_es"]["ci95"][1] >= 0 and v["seed_vs_clip_es"]["ci95"][1] >= 0]
    out["seconds"], out["machine"] = round(time.time() - start, 1), machine()
    (RESULTS / "literal_harm_iterations.json").write_text(json.dumps(out, indent=1) + "\n")
    lines = ["# The paper-literal recipe stopped early (follow-up to literal_harm.md)", "",
             (f"`python benchmarks/literal_harm_iterations.py`; {args.scenes} evaluation and {args.scenes} "
             f"validation scenes, paired 95 % bootstrap intervals ({args.resamples} resamples), mIoU points; "
             f"{out['seconds']:.0f} s."), "",
             "| variant | eval seed | eval seed - CLIP-ES | eval mask - CLIP-ES | val seed | val seed - CLIP-ES |",
             "|---|---|---|---|---|---|"]
    for r, v in zip(out["evaluation"], out["validation"]):
        lines.append(f"| {r['variant']} | {lh.fmt(r['seed'])} | {lh.fmt(r['seed_vs_clip_es'])} | "
                     f"{lh.fmt(r['mask_vs_clip_es'])} | {lh.fmt(v['seed'])} | {lh.fmt(v['seed_vs_clip_es'])} |")
    lines += ["", "Not below CLIP-ES on both splits: " + (", ".join(out["removes_harm"]) or "none") + "."]
    (RESULTS / "literal_harm_iterations.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
