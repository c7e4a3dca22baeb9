"""Linear datamodeling score (LDS) of ECIF on real data (docs/method.md §6.2; issue 5, item 3).

For each seed and parameter subset: build the corpus (swap-class misalignment), take the model
pretrained on its clean pretrain split (cached, see common.py), fit θ̂ tightly on the noisy train
split (full-batch L-BFGS, float64), score every training pair against the validation query, then
retrain without each of K random subsets (each a fraction of the train pairs, drawn with the seed)
and compare the actual validation-loss change L'(θ̂) − L'(θ̂_{−D*}) with the summed prediction:

    LDS Pos+Neg  = Spearman(actual, Σ_{D*} ecif_is)   (ECIF: positive + negative roles)
    LDS Pos-only = Spearman(actual, Σ_{D*} pos_is)    (the classical pointwise influence function)
    LDS auto     = the same for ecif_is with the analysis damping ``auto`` (0.1 × G's mean eigenvalue,
                   at least the fitted δ) instead of the fitted δ (``exact``, the counterfactual)

plus the least-squares slope of actual on predicted (1 = calibrated). δ is per subset: LoRA needs
a small one: A = B = 0 (the adapters' anchor) is a stationary point of R and a local minimum once δ
exceeds the largest singular value of ∂L/∂W over the adapted weights (≈ 0.5 for ecif-small on
Fashion-MNIST), where the fit collapses and every influence is zero. Each row reports ‖∇R(θ̂)‖ and
‖θ̂ − θ_0‖ to show the fit converged and did not collapse.

    python benchmarks/lds.py [--dataset fashion-mnist] [--seeds 0 1 2] [--subsets heads lora]
        [--subsets-count 50] [--fraction 0.05] [--train-size 200] [--noise 0.2]
        [--delta heads=1.0 lora=0.1] [--work ~/.cache/ecif-ray-bench] [--out benchmarks/results/lds]
        [--include earlier-run.json ...]

Prints a markdown table (mean ± std over seeds) and writes OUT.json (rows, per-subset points) and
OUT.csv (one row per seed and subset) after every setting. ``--include`` merges rows of earlier runs
into the table (``--seeds`` with no values only merges). SIGINT/SIGTERM during the retrainings ends
the run keeping the retrainings done (the row's n_subsets says how many).
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import signal
import time
from pathlib import Path

import common
import numpy as np
import torch

from ecif_ray.data.exclusions import ExclusionSet
from ecif_ray.fidelity import Experiment, LeaveOut, agreement, fitted_experiment, score_experiment
from ecif_ray.training import objective

IDENTITY = ("dataset", "subset", "seed", "train_size")
METRICS = ("lds_ecif", "lds_pos", "lds_auto", "slope_ecif", "slope_pos", "slope_auto", "fit_seconds",
           "refit_seconds_mean", "n_subsets")


def parse_deltas(values: list[str], subsets: list[str]) -> dict[str, float]:
    """``["1.0"]`` (every subset) or ``["heads=1.0", "lora=0.01"]`` → {subset: δ}."""
    if len(values) == 1 and "=" not in values[0]:
        return dict.fromkeys(subsets, float(values[0]))
    deltas = {k: float(v) for k, v in (item.split("=", 1) for item in values)}
    missing = [s for s in subsets if s not in deltas]
    if missing:
        raise SystemExit(f"--delta has no value for {missing}")
    return deltas


def random_subsets(keys: list[str], count: int, fraction: float, seed: int) -> list[list[str]]:
    """``count`` random subsets of ``round(fraction · len(keys))`` keys each (seeded)."""
    rng = random.Random(seed)
    size = max(1, round(fraction * len(keys)))
    return [rng.sample(sorted(keys), size) for _ in range(count)]


def fit_diagnostics(leave_out: LeaveOut) -> dict[str, float]:
    """‖∇R(θ̂)‖ (how well the fit converged) and ‖θ̂ − θ_0‖ (whether it left the anchor)."""
    task = leave_out.task
    params = {n: p.detach().clone().requires_grad_(True) for n, p in leave_out.theta_hat.items()}
    loss = objective(task.bundle, params, leave_out.anchor, leave_out.batches, task.delta, task.logit_scale)
    grads = torch.autograd.grad(loss, list(params.values()))
    distance = sum(float(((leave_out.theta_hat[n] - leave_out.anchor[n]) ** 2).sum()) for n in params)
    return {"grad_norm": float(torch.sqrt(sum((g.detach() ** 2).sum() for g in grads))),
            "theta_distance": distance ** 0.5, "objective": float(loss.detach())}


def removal_points(fitted: Experiment, auto: dict[str, tuple[float, float]], chosen: list[list[str]]
                   ) -> dict[str, list[float]]:
    """Actual change and the summed predictions for each removed subset (retrains each); ``auto``:
    the scores under the ``auto`` damping. SIGINT or SIGTERM stops early and keeps the subsets done
    so far (the row records how many)."""
    points: dict[str, list[float]] = {"actual": [], "ecif": [], "pos": [], "auto": [], "refit_seconds": []}
    try:
        for i, keys in enumerate(chosen):
            if i % 5 == 0:
                print(f"[lds]   retraining {i}/{len(chosen)}", flush=True)
            t0 = time.perf_counter()
            actual = fitted.leave_out.actual_change(ExclusionSet.from_entries((None, k) for k in keys))
            points["refit_seconds"].append(time.perf_counter() - t0)
            points["actual"].append(actual)
            points["ecif"].append(sum(sum(fitted.scores[k]) for k in keys))
            points["pos"].append(sum(fitted.scores[k][0] for k in keys))
            points["auto"].append(sum(sum(auto[k]) for k in keys))
    except KeyboardInterrupt:
        print(f"[lds]   interrupted: keeping {len(points['actual'])} of {len(chosen)} retrainings", flush=True)
    return points


def lds_metrics(points: dict[str, list[float]]) -> dict[str, float]:
    actual = np.array(points["actual"])
    ecif, pos = agreement(actual, np.array(points["ecif"])), agreement(actual, np.array(points["pos"]))
    auto = agreement(actual, np.array(points["auto"])) if points.get("auto") else {"spearman": None, "slope": None}
    return {"lds_ecif": ecif["spearman"], "lds_pos": pos["spearman"], "lds_auto": auto["spearman"],
            "slope_ecif": ecif["slope"], "slope_pos": pos["slope"], "slope_auto": auto["slope"],
            "mean_abs_actual": ecif["mean_abs_actual"], "mean_abs_ecif": ecif["mean_abs_predicted"],
            "mean_abs_pos": pos["mean_abs_predicted"], "refit_seconds_mean": float(np.mean(points["refit_seconds"]))}


def run_setting(args, recipe: common.Recipe, seed: int, subset: str, delta: float) -> tuple[dict, dict]:
    """One (seed, subset): fit, score, retrain without each random subset; the row and its points."""
    corpus_dir = common.corpus(Path(args.work), recipe, args.train_size, args.noise, "swap-class", seed)
    ckpt = common.pretrained(Path(args.work), recipe, seed, corpus_dir)
    times: dict[str, float] = {}
    with common.timed(times, "fit_seconds"):
        fitted = fitted_experiment(str(ckpt), str(corpus_dir), subset, delta, recipe.segment_size)
    chosen = random_subsets(list(fitted.scores), args.subsets_count, args.fraction, seed)
    auto, _, auto_delta = score_experiment(fitted.leave_out, "auto")
    with common.timed(times, "retrain_seconds"):
        points = removal_points(fitted, auto, chosen)
    task = fitted.leave_out.task
    row = {"dataset": recipe.dataset, "arch": recipe.arch, "subset": subset, "seed": seed,
           "train_size": args.train_size, "noise": args.noise, "n_train": task.n_train, "dim": task.dim,
           "delta": delta, "auto_delta": auto_delta, "n_subsets": len(points["actual"]),
           "removed_per_subset": len(chosen[0]),
           "cg_iterations": fitted.cg_iterations, **fit_diagnostics(fitted.leave_out), **lds_metrics(points),
           **times}
    return row, {"dataset": recipe.dataset, "subset": subset, "seed": seed, "train_size": args.train_size, **points}


def included_points(earlier: list[dict], points: list[dict]) -> list[dict]:
    """The per-subset points of earlier runs' payloads (``--include``) and this run's, keyed like the rows."""
    merged: dict[tuple, dict] = {}
    for entry in [p for run in earlier for p in run["points"]] + points:
        merged[tuple(entry[k] for k in IDENTITY)] = entry
    return list(merged.values())


def table(rows: list[dict]) -> str:
    summary = common.aggregate(rows, ("dataset", "subset", "train_size", "delta"), METRICS)
    lines = [[s["subset"], s["n"], s["train_size"], f"{s['delta']:g}", f"{s['n_subsets_mean']:g}",
              common.pm(s, "lds_ecif"), common.pm(s, "lds_pos"), common.pm(s, "lds_auto"),
              common.pm(s, "slope_ecif", 2), common.pm(s, "slope_pos", 2), common.pm(s, "slope_auto", 2),
              common.pm(s, "fit_seconds", 0), common.pm(s, "refit_seconds_mean", 1)]
             for s in summary]
    header = ["subset", "seeds", "N", "δ", "subsets/seed", "LDS Pos+Neg", "LDS Pos-only", "LDS Pos+Neg auto δ",
              "slope Pos+Neg", "slope Pos-only", "slope auto", "fit+score s", "s/retrain"]
    return common.markdown_table(header, lines)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="fashion-mnist", choices=sorted(common.RECIPES))
    p.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2], help="none: only merge --include")
    p.add_argument("--subsets", nargs="+", default=["heads", "lora"], choices=sorted(common.SUBSETS))
    p.add_argument("--subsets-count", type=int, default=50, help="random removal subsets per seed")
    p.add_argument("--fraction", type=float, default=0.05, help="share of the train pairs in each removal subset")
    p.add_argument("--train-size", type=int, default=200)
    p.add_argument("--noise", type=float, default=0.2, help="swap-class misalignment rate of the train split")
    p.add_argument("--delta", nargs="+", default=["heads=1.0", "lora=0.1"],
                   help="damping δ of the fit: one value, or SUBSET=VALUE per subset")
    p.add_argument("--pretrain-size", type=int, default=None, help="override the recipe (smoke tests)")
    p.add_argument("--pretrain-epochs", type=int, default=None, help="override the recipe (smoke tests)")
    p.add_argument("--work", default=str(common.DEFAULT_WORK), help="cache of corpora and checkpoints")
    p.add_argument("--include", nargs="*", default=[], help="JSON outputs of earlier runs to merge into the table")
    p.add_argument("--out", default=str(common.RESULTS / "lds"), help="output stem (.json and .csv)")
    return p.parse_args()


def save(args, rows: list[dict], points: list[dict]) -> tuple[list[dict], list[Path]]:
    """Merge with ``--include`` and write OUT.json/.csv (after every setting, so a long run that is
    stopped keeps what finished); returns the merged rows and the files written."""
    earlier = [json.loads(Path(path).read_text()) for path in args.include]
    rows = common.included_rows(args.include, rows, IDENTITY)
    payload = {"args": vars(args), "machine": common.machine_notes(), "rows": rows,
               "points": included_points(earlier, points),
               "included_runs": [{k: run[k] for k in ("args", "machine")} for run in earlier]}
    return rows, common.write_outputs(Path(args.out), payload, rows)


def main() -> None:
    args = parse_args()
    common.setup_torch()
    recipe = common.recipe_for(args.dataset, args.pretrain_size, args.pretrain_epochs)
    deltas = parse_deltas(args.delta, args.subsets)
    for sig in (signal.SIGINT, signal.SIGTERM):  # also under nohup/&, where SIGINT starts ignored
        signal.signal(sig, signal.default_int_handler)
    rows, points = [], []
    for seed, subset in itertools.product(args.seeds, args.subsets):
        print(f"[lds] seed {seed} {subset} δ={deltas[subset]:g}", flush=True)
        row, pts = run_setting(args, recipe, seed, subset, deltas[subset])
        print(f"[lds]   LDS Pos+Neg {row['lds_ecif']:.3f}  Pos-only {row['lds_pos']:.3f}  "
              f"slope {row['slope_ecif']:.2f}  ({row['fit_seconds']:.0f}s fit, {row['retrain_seconds']:.0f}s "
              f"retraining)", flush=True)
        rows.append(row)
        points.append(pts)
        save(args, rows, points)
        if row["n_subsets"] < args.subsets_count:
            break  # interrupted: keep what finished
    merged, written = save(args, rows, points)
    print(table(merged))
    for path in written:
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
