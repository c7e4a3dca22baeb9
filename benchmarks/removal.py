"""Removal vs retraining: the paper's "Retrain vs ECIF" table on our data (issue 5, item 2).

For each (seed, noise level, noise kind, subset), starting from the same fine-tuned θ̂ and the
per-pair scores of ``detection.py`` (reused from its cache, or computed here):

  none           θ̂ itself (no removal)
  <method>       remove the top ``--fraction`` most harmful pairs by that method and retrain: the same
                 staged fine-tuning recipe from the same pretrained checkpoint, with ``exclude=``
  random         remove a random ``--fraction`` and retrain
  (methods: detection.py's, e.g. misalignment, misalignment-ref, external-clip-score)
  ecif-edit      θ̃ = θ̂ + ΣΔθ for the ecif-exact top ``--fraction`` (one preconditioned CG solve, no
                 retraining; ``ECIF.edit``)

Runtime of a row = the method's scoring time (as measured by detection) + retraining (or + the
edit solve). Zero-shot test accuracy and validation loss for each; on substitution corpora also the
accuracy on the substituted (source) classes, ``affected_accuracy``.

    python benchmarks/removal.py --train-size 4000 --noise 0.2 --kinds swap-class --subsets heads

Writes <out>.json (args, rows, aggregates) and <out>.csv.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import numpy as np
import torch
from common import (
    RESULTS,
    add_method_flags,
    aggregate,
    finetune,
    machine_notes,
    markdown_table,
    pm,
    pretrained,
    run_grid,
    setup_torch,
    timed,
    train_truth,
    write_outputs,
)
from detection import METHODS, Setting, ecif_engine, score_setting

from ecif_ray.data.exclusions import ExclusionSet
from ecif_ray.evaluation import evaluate
from ecif_ray.influence.curvature import SolverSettings
from ecif_ray.models.checkpoint import load_checkpoint

DEFAULT_METHODS = [
    "ecif-exact", "ecif-damped", "pos-only", "clip-score", "loss", "tracin", "trak", "trak-reg", "ekfac"]
METRICS = ("zero_shot_accuracy", "affected_accuracy", "val_loss", "seconds", "removed_misaligned")


def top_harmful(setting: Setting, method: str, count: int) -> list[tuple[str, str]]:
    """The ``count`` pairs with the largest harm score (ties broken by key order)."""
    order = np.argsort(-np.array([setting.scores[method][k] for k in setting.keys]), kind="stable")
    return [setting.keys[i] for i in order[:count]]


def write_exclusions(path: Path, pairs: list[tuple[str, str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("shard,key\n" + "".join(f"{s},{k}\n" for s, k in pairs))
    return path


def quality(ckpt, corpus_dir: Path) -> dict:
    """Zero-shot accuracy overall and, on substitution corpora, on the substituted (source) classes."""
    result = evaluate(ckpt, str(corpus_dir / "test"), str(corpus_dir / "val"))
    row = {"zero_shot_accuracy": result["zero_shot_accuracy"], "val_loss": result["val_loss"]}
    spec = json.loads((corpus_dir / "corpus.json").read_text()).get("spec", {})
    sources = [source for source, _ in spec.get("substitutions") or ()]
    if sources:
        row["affected_accuracy"] = float(np.mean([result["per_class_accuracy"][c] for c in sources]))
    return row


def retrain_row(args: argparse.Namespace, recipe, setting: Setting, seed: int, subset: str, name: str,
                removed: list[tuple[str, str]], scoring_seconds: float) -> dict:
    """Retrain without ``removed`` (cached by method) and evaluate."""
    work = Path(args.work)
    base = work / f"ft-{setting.corpus_dir.name}-{subset}"
    out = base / f"removal-{args.fraction:g}" / name
    exclude = write_exclusions(out / "exclude.csv", removed)
    init = pretrained(work, recipe, seed, setting.corpus_dir)
    ft = finetune(recipe, setting.corpus_dir, init, subset, seed, out, exclude=exclude)
    return {"removal": "retrain", **quality(load_checkpoint(ft.final), setting.corpus_dir),
            "retrain_seconds": ft.seconds, "scoring_seconds": scoring_seconds,
            "seconds": scoring_seconds + ft.seconds}


def edit_row(setting: Setting, removed: list[tuple[str, str]], scoring_seconds: float,
             curvature_segments: int | None) -> dict:
    """θ̃ = θ̂ + ΣΔθ for the removed set, solved in float64 and applied to the in-memory θ̂ (reloaded after).

    The engine (trunk features of the curvature sample, the Nyström sketch) is what the scoring
    already built — in a notebook or the pipeline the edit reuses it — so ``edit_seconds`` is the
    edit's own cost (the removed pairs' gradient and one CG solve); ``engine_seconds`` rebuilding it
    here is reported beside it, and charged to the row's total instead of being hidden."""
    model = setting.model
    took: dict = {}
    with timed(took, "engine"):
        engine = ecif_engine(model, curvature_segments, SolverSettings())
        engine.preconditioner()
    with timed(took, "edit"):
        change = engine.edit(ExclusionSet.from_entries(removed))
    with torch.no_grad():
        for name, p in model.ckpt.model.named_parameters():
            if name in change.delta_theta:
                p.add_(change.delta_theta[name].to(p))
    row = {"removal": "edit", **quality(model.ckpt, setting.corpus_dir), "edit_seconds": took["edit"],
           "engine_seconds": took["engine"], "scoring_seconds": scoring_seconds,
           "seconds": scoring_seconds + took["engine"] + took["edit"],
           "edit_residual": change.relative_residual, "edit_iterations": change.iterations}
    setting.model.ckpt = load_checkpoint(model.ckpt.path)  # back to θ̂
    return row


def run_setting(args: argparse.Namespace, recipe, seed: int, noise: float, kind: str, subset: str) -> list[dict]:
    setting = score_setting(args, recipe, seed, noise, kind, subset)
    truth = train_truth(setting.corpus_dir)
    count = round(args.fraction * len(setting.keys))
    base = {"dataset": recipe.dataset, "train_size": len(setting.keys), "subset": subset, "noise_kind": kind,
            "noise": noise, "seed": seed, "removed": count}
    rows = [{**base, "method": "none", "removal": "none", **quality(setting.model.ckpt, setting.corpus_dir),
             "seconds": setting.finetune_seconds, "removed": 0, "removed_misaligned": 0.0}]
    plan = [(m, top_harmful(setting, m, count), setting.seconds[m]) for m in args.methods if m in setting.scores]
    plan.append(("random", random.Random(seed).sample(setting.keys, count), 0.0))
    for method, removed, scoring in plan:
        hit = float(np.mean([truth[k] for k in removed]))
        rows.append({**base, "method": method, "removed_misaligned": hit,
                     **retrain_row(args, recipe, setting, seed, subset, method, removed, scoring)})
        if method == "ecif-exact":
            rows.append({**base, "method": "ecif-edit", "removed_misaligned": hit,
                         **edit_row(setting, removed, scoring, args.curvature_segments)})
    for r in rows:
        print(f"  {r['method']:11} {r['removal']:8} acc {r['zero_shot_accuracy']:.4f}  val {r['val_loss']:.4f}  "
              f"removed misaligned {r['removed_misaligned']:.2f}  {r['seconds']:7.1f} s", flush=True)
    return rows


def summary_table(summary: list[dict]) -> str:
    header = ["subset", "noise kind", "noise", "method", "model", "seeds", "zero-shot acc (%)",
              "substituted classes acc (%)", "val loss", "misaligned among removed", "time (s)"]
    lines = []
    for s in summary:
        acc = {k: (v * 100 if isinstance(v, float) and k.startswith(("zero_shot_accuracy", "affected_accuracy"))
                   else v) for k, v in s.items()}
        lines.append([s["subset"], s["noise_kind"], f"{s['noise']:g}", s["method"], s["removal"], s["n"],
                      pm(acc, "zero_shot_accuracy", 2), pm(acc, "affected_accuracy", 2), pm(s, "val_loss", 4),
                      pm(s, "removed_misaligned", 2), pm(s, "seconds", 1)])
    return markdown_table(header, lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="fashion-mnist", choices=["fashion-mnist", "digits"])
    p.add_argument("--train-size", type=int, default=10000)
    p.add_argument("--noise", type=float, nargs="+", default=[0.2])
    p.add_argument("--kinds", nargs="+", default=["swap-class"])
    p.add_argument("--subsets", nargs="+", default=["heads"], choices=["heads", "lora"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=METHODS)
    p.add_argument("--fraction", type=float, default=0.1, help="fraction of training pairs removed")
    p.add_argument("--dtype", default="float64", choices=["float64", "float32", "auto"],
                   help="dtype of the ECIF analysis (as detection.py; its scores are reused from the same cache)")
    add_method_flags(p)
    p.add_argument("--out", default=str(RESULTS / "removal"), help="output stem (.json/.csv)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    setup_torch()
    args = parse_args(argv)
    started = time.perf_counter()
    recipe, rows = run_grid(args, "removal", run_setting, ["removal", "removed"])
    summary = aggregate(rows, ["subset", "noise_kind", "noise", "method", "removal"], METRICS)
    table = summary_table(summary)
    print(table)
    payload = {"args": vars(args), "recipe": recipe.__dict__, "machine": machine_notes(),
               "wall_seconds": time.perf_counter() - started, "summary": summary, "rows": rows, "table": table}
    print("wrote", *write_outputs(Path(args.out), payload, rows))


if __name__ == "__main__":
    main()
