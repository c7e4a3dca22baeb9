"""ECIF analysis time (iHVP solve + scoring of every training pair), before and after the cached
trunk, side by side in one run, with kronfluence EK-FAC on the same model and data.

Rows per (subset, train size):
  before           the release before the trunk/tail split (``--before`` git ref, run from a
                   temporary worktree in a subprocess) with its defaults: 32 curvature segments,
                   float32, Nyström CG to 1e-5
  after-same       this release on the before-run's settings (32 segments, float32, tol 1e-5):
                   the like-for-like speed-up; its scores are compared with the before-run's
  after            this release with its defaults: curvature over every training pair (cached
                   trunk features), float64, CG to 1e-8
  after-f32        as ``after`` in float32 (CG to 1e-5): the precision EK-FAC runs in
  after-dense      as ``after`` with the dense preconditioner (G formed exactly; heads only)
  ekfac            kronfluence EK-FAC (heads only), time of factors + pairwise scores

Data loading (reading and decoding the shards) is excluded from every row: each method starts
from the same in-memory segments (the before-run loads its own copy before its clock starts).

    python benchmarks/analysis_speed.py --subsets heads --train-size 10000
    python benchmarks/analysis_speed.py --subsets lora --train-size 4000
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from common import RESULTS, corpus, finetune, machine_notes, markdown_table, pretrained, recipe_for, setup_torch
from scipy.stats import spearmanr

from ecif_ray.data.segments import load_segments
from ecif_ray.influence.curvature import SolverSettings
from ecif_ray.influence.engine import ECIF
from ecif_ray.influence.queries import ValidationQuery
from ecif_ray.influence.task import InfluenceTask
from ecif_ray.models.checkpoint import load_checkpoint

BEFORE_REF = "0add6a6"  # the last release before the trunk/tail split

# Runs inside the before-release's worktree (its own engine API): prints one JSON line.
BEFORE_SCRIPT = r"""
import json, sys, time
import torch
torch.set_num_threads(1)
import pyarrow.parquet as pq
from ecif_ray.influence.engine import ECIF
from ecif_ray.influence.queries import ValidationQuery
ckpt, train, val, segments, out = sys.argv[1:]
engine = ECIF.from_checkpoint(ckpt, train, curvature_segments=int(segments))
query = ValidationQuery(engine.load(val))
t0 = time.perf_counter()
directions = engine.solve(query)
solve = time.perf_counter() - t0
t1 = time.perf_counter()
table = engine.score(engine.train_batches, directions)
score = time.perf_counter() - t1
pq.write_table(table, out)
print(json.dumps({"solve_s": solve, "score_s": score, "iterations": directions.iterations,
                  "converged": directions.converged, "curvature_pairs": sum(len(b) for b in engine.curvature),
                  "dtype": str(engine.task.dtype)}))
"""


def run_before(ref: str, ckpt: Path, corpus_dir: Path, segments: int, out: Path) -> dict:
    """The before-release in a temporary git worktree (a subprocess: its modules shadow ours)."""
    repo = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory(prefix="ecif-before-") as tmp:
        tree = Path(tmp) / "tree"
        subprocess.run(["git", "-C", str(repo), "worktree", "add", "--detach", str(tree), ref], check=True,
                       capture_output=True)
        try:
            env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
            done = subprocess.run([sys.executable, "-c", BEFORE_SCRIPT, str(ckpt), str(corpus_dir / "train"),
                                   str(corpus_dir / "val"), str(segments), str(out)],
                                  env=env, capture_output=True, text=True, check=True)
        finally:
            subprocess.run(["git", "-C", str(repo), "worktree", "remove", "--force", str(tree)], check=False)
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_after(ckpt_path: Path, train, val, dtype: torch.dtype, curvature_segments: int | None,
              solver: SolverSettings) -> tuple[dict, pa.Table]:
    ckpt = load_checkpoint(ckpt_path)
    ckpt.model.to(dtype)
    task = InfluenceTask.from_checkpoint(ckpt, sum(len(b) for b in train), "exact")
    query = ValidationQuery(val)
    t0 = time.perf_counter()
    engine = ECIF.from_task(task, train, curvature_segments=curvature_segments, solver=solver)
    directions = engine.solve(query)
    solve = time.perf_counter() - t0
    t1 = time.perf_counter()
    table = engine.score(train, directions)
    score = time.perf_counter() - t1
    return {"solve_s": solve, "score_s": score, "iterations": directions.iterations,
            "converged": directions.converged, "curvature_pairs": engine.curvature_pairs,
            "dtype": str(dtype)}, table


def run_ekfac(ckpt_path: Path, train, val) -> dict:
    sys.path.insert(0, str(Path(__file__).parent))
    from baselines.ekfac import ekfac_scores

    ckpt = load_checkpoint(ckpt_path)
    t0 = time.perf_counter()
    ekfac_scores(ckpt, train, val)
    return {"solve_s": time.perf_counter() - t0, "score_s": 0.0, "dtype": "torch.float32"}


def compare(a: pa.Table, b: pa.Table) -> dict:
    """Agreement of two runs' ecif_is, matched by (shard, key)."""
    def by_key(t: pa.Table) -> dict:
        d = t.to_pydict()
        return dict(zip(zip(d["shard"], d["key"], strict=True), d["ecif_is"], strict=True))
    x, y = by_key(a), by_key(b)
    keys = sorted(x)
    u, v = np.array([x[k] for k in keys]), np.array([y[k] for k in keys])
    return {"spearman_vs_before": float(spearmanr(u, v).statistic),
            "max_rel_diff_vs_before": float(np.abs(u - v).max() / np.abs(v).max())}


def run_subset(args: argparse.Namespace, subset: str) -> list[dict]:
    recipe = recipe_for("fashion-mnist")
    work = Path(args.work)
    corpus_dir = corpus(work, recipe, args.train_size, args.noise, "swap-class", args.seed)
    init = pretrained(work, recipe, args.seed, corpus_dir)
    ft = finetune(recipe, corpus_dir, init, subset, args.seed, work / f"ft-{corpus_dir.name}-{subset}").final
    bundle = load_checkpoint(ft).bundle
    spec = {"segment_size": recipe.segment_size, "preprocess": bundle.preprocess, "tokenizer": bundle.tokenizer}
    train, val = load_segments(str(corpus_dir / "train"), **spec)[0], load_segments(str(corpus_dir / "val"), **spec)[0]
    base = {"subset": subset, "train_size": sum(len(b) for b in train), "seed": args.seed}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        before_table = Path(tmp) / "before.parquet"
        rows.append({**base, "method": "before", **run_before(args.before, ft, corpus_dir, 32, before_table)})
        before = pq.read_table(before_table)
        old_solver = SolverSettings(tol=1e-5)
        same, same_table = run_after(ft, train, val, torch.float32, 32, old_solver)
        rows.append({**base, "method": "after-same", **same, **compare(same_table, before)})
        after, after_table = run_after(ft, train, val, torch.float64, None, SolverSettings())
        rows.append({**base, "method": "after", **after, **compare(after_table, before)})
        f32, f32_table = run_after(ft, train, val, torch.float32, None, SolverSettings())
        rows.append({**base, "method": "after-f32", **f32, **compare(f32_table, before)})
        if subset == "heads":
            dense, dense_table = run_after(ft, train, val, torch.float64, None,
                                           SolverSettings(preconditioner="dense"))
            rows.append({**base, "method": "after-dense", **dense, **compare(dense_table, before)})
            rows.append({**base, "method": "ekfac", **run_ekfac(ft, train, val)})
    for r in rows:
        r["total_s"] = r["solve_s"] + r["score_s"]
        r["speedup_vs_before"] = rows[0]["solve_s"] + rows[0]["score_s"]
        r["speedup_vs_before"] /= r["total_s"]
        print(f"  {subset:5} {r['method']:11} solve {r['solve_s']:7.1f} s  score {r['score_s']:6.1f} s  "
              f"×{r['speedup_vs_before']:.1f}  CG {r.get('iterations', '-')}  "
              f"curvature {r.get('curvature_pairs', '-')}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    setup_torch()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--subsets", nargs="+", default=["heads", "lora"], choices=["heads", "lora"])
    p.add_argument("--train-size", type=int, default=10000)
    p.add_argument("--noise", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--before", default=BEFORE_REF, help="git ref of the release to compare with")
    p.add_argument("--work", default=str(Path.home() / ".cache" / "ecif-ray-bench"))
    p.add_argument("--out", default=str(RESULTS / "analysis_speed"))
    args = p.parse_args(argv)
    rows = [r for subset in args.subsets for r in run_subset(args, subset)]
    header = ["subset", "pairs", "method", "dtype", "curvature pairs", "CG iterations", "solve (s)", "score (s)",
              "total (s)", "× before", "Spearman vs before"]
    table = markdown_table(header, [[r["subset"], str(r["train_size"]), r["method"], r["dtype"].removeprefix("torch."),
                                     str(r.get("curvature_pairs", "-")), str(r.get("iterations", "-")),
                                     f"{r['solve_s']:.1f}", f"{r['score_s']:.1f}", f"{r['total_s']:.1f}",
                                     f"{r['speedup_vs_before']:.1f}",
                                     f"{r['spearman_vs_before']:.4f}" if "spearman_vs_before" in r else "-"]
                                    for r in rows])
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"args": vars(args), "machine": machine_notes(), "rows": rows,
                                                    "table": table}, indent=2))
    print("wrote", out.with_suffix(".json"))


if __name__ == "__main__":
    main()
