"""Fidelity of predicted influence to actual retraining (docs/method.md §6.2), micro model on digits.

For each parameter subset: fit θ̂ tightly (L-BFGS, float64), score every training pair against
the validation query, then retrain without (a) single pairs and (b) random 5% groups and compare
the actual validation-loss change with the predicted sum of ecif_is (Pos+Neg) and of pos_is
(Pos-only, the classical pointwise influence function).

    python benchmarks/fidelity.py [--singles 30] [--groups 10] [--subsets heads lora] [--delta 1.0]

Prints a table and writes benchmarks/results/fidelity.json.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ecif_ray.data.corpus import CorpusSpec, build_corpus
from ecif_ray.data.exclusions import ExclusionSet
from ecif_ray.data.segments import load_segments
from ecif_ray.fidelity import LeaveOut, agreement, fitted_experiment
from ecif_ray.influence.curvature import SolverSettings, local_matvec
from ecif_ray.influence.edit import edit
from ecif_ray.influence.queries import zero_shot_logits
from ecif_ray.models.zeroshot import find_classes, labels_of
from ecif_ray.training import TrainConfig, train

RESULTS = Path(__file__).parent / "results"


def prepare(workdir: Path, train_size: int) -> Path:
    corpus = workdir / "corpus"
    build_corpus(CorpusSpec(dataset="digits", out=corpus, noise=0.2, shard_size=64, seed=0, pretrain_size=480,
                            train_size=train_size, val_size=64, test_size=64), progress=False)
    train(TrainConfig(train=str(corpus / "pretrain"), arch="ecif-micro", params={"kind": "all"}, segment_size=32,
                      epochs=30, lr=3e-3, delta=1e-4, out=str(workdir / "pre"), progress=False))
    return corpus


def run_subset(workdir: Path, corpus: Path, kind: str, delta: float, singles: int, groups: int, seed: int) -> dict:
    t0 = time.perf_counter()
    fitted = fitted_experiment(str(workdir / "pre"), str(corpus), kind, delta)
    fit_and_score_s = time.perf_counter() - t0
    leave_out, scores, load = fitted.leave_out, fitted.scores, fitted.load
    task = leave_out.task
    rng = random.Random(seed)
    keys = sorted(scores)
    sets = {"single": [[k] for k in rng.sample(keys, singles)],
            "group-5%": [rng.sample(keys, round(0.05 * len(keys))) for _ in range(groups)]}
    out: dict = {"subset": kind, "delta": delta, "n_train": task.n_train, "dim": task.dim,
                 "cg_iterations": fitted.cg_iterations, "fit_and_score_seconds": fit_and_score_s}
    t0 = time.perf_counter()
    for name, chosen in sets.items():
        actual = np.array([leave_out.actual_change(ExclusionSet.from_entries((None, k) for k in s)) for s in chosen])
        ecif = np.array([sum(sum(scores[k]) for k in s) for s in chosen])
        pos = np.array([sum(scores[k][0] for k in s) for s in chosen])
        out[name] = {"count": len(chosen), "ecif": agreement(actual, ecif), "pos_only": agreement(actual, pos)}
    out["retraining_seconds"] = time.perf_counter() - t0
    out["edit"] = edit_vs_retrain(leave_out, scores, corpus, load)
    return out


def edit_vs_retrain(leave_out: LeaveOut, scores: dict, corpus: Path, load: dict) -> dict:
    """Remove the top 10% harmful pairs by ecif_is: the ECIF edit θ̃ = θ̂ + ΣΔθ vs retraining."""
    task = leave_out.task
    test, _ = load_segments(str(corpus / "test"), **load)
    for b in test:
        b.images = b.images.double()
    classes = find_classes(str(corpus / "test"))
    harmful = sorted(scores, key=lambda k: -sum(scores[k]))[: round(0.1 * len(scores))]
    removed = ExclusionSet.from_entries((None, k) for k in harmful)
    t0 = time.perf_counter()
    change = edit(task, leave_out.batches, removed, local_matvec(task, leave_out.batches),
                  SolverSettings(tol=1e-10, max_iter=1000))
    edit_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    retrained = leave_out.refit(removed)
    retrain_s = time.perf_counter() - t0
    rows = {}
    for name, params in (("fine-tuned", leave_out.theta_hat), ("ecif-edit", change.apply(leave_out.theta_hat)),
                         ("retrain", retrained)):
        with torch.no_grad():
            val_loss = float(leave_out.query.loss(task, params))
            logits = [zero_shot_logits(task, task.trunk(images=b.images), classes, params) for b in test]
            correct = sum(int((lg.argmax(1) == labels_of(b)).sum()) for lg, b in zip(logits, test, strict=True))
        rows[name] = {"val_loss": val_loss, "zero_shot_accuracy": correct / sum(len(b) for b in test)}
    rows["removed"] = len(harmful)
    rows["edit_seconds"], rows["retrain_seconds"] = edit_s, retrain_s
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--singles", type=int, default=30)
    parser.add_argument("--groups", type=int, default=10)
    parser.add_argument("--subsets", nargs="+", default=["heads", "lora"])
    parser.add_argument("--delta", type=float, default=1.0)
    parser.add_argument("--train-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(RESULTS / "fidelity.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        corpus = prepare(Path(tmp), args.train_size)
        rows = [run_subset(Path(tmp), corpus, k, args.delta, args.singles, args.groups, args.seed)
                for k in args.subsets]
    print(f"{'subset':8} {'set':9} {'n':>3} {'Spearman Pos+Neg':>17} {'Spearman Pos-only':>18} "
          f"{'slope Pos+Neg':>14} {'slope Pos-only':>15}")
    for r in rows:
        for name in ("single", "group-5%"):
            e, p = r[name]["ecif"], r[name]["pos_only"]
            print(f"{r['subset']:8} {name:9} {r[name]['count']:>3} {e['spearman']:>17.3f} {p['spearman']:>18.3f} "
                  f"{e['slope']:>14.3f} {p['slope']:>15.3f}")
    print(f"\n{'subset':8} {'model':11} {'val loss':>9} {'zero-shot acc':>14}   (top 10% harmful removed)")
    for r in rows:
        for name in ("fine-tuned", "ecif-edit", "retrain"):
            e = r["edit"][name]
            print(f"{r['subset']:8} {name:11} {e['val_loss']:>9.4f} {e['zero_shot_accuracy']:>14.3f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "results": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
