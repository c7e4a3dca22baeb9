"""The damping of the `misalignment` column: detection quality of damped pos_is over a δ sweep.

For each cached heads model (detection.py builds them: ``--kinds substitute swap-class``), solve the
validation query at every δ of a log grid (the product's solver: Nyström-preconditioned CG; λ₁ from
the sketch, the mean eigenvalue by Hutchinson), score
every training pair, and rate pos_is and the rank combination with the self / external CLIP score
against the injected truth. Each row also records δ/λ₁ and δ/mean-eigenvalue, so that a label-free
rule (δ relative to G's spectrum) can be read off settings other than the ones it is judged on.

    python benchmarks/misalignment_damping.py --settings swap-class-0.2-s0 substitute-0.4-s0

Writes <out>.json and <out>.csv (one row per setting × δ × ranking).
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from common import DEFAULT_WORK, RESULTS, markdown_table, setup_torch
from detection import clip_and_loss
from scipy.stats import rankdata

from ecif_ray.data.segments import load_segments
from ecif_ray.influence.curvature import top_eigenvalue
from ecif_ray.influence.engine import ECIF
from ecif_ray.influence.queries import ValidationQuery
from ecif_ray.influence.task import InfluenceTask
from ecif_ray.metrics import detection_metrics
from ecif_ray.models.checkpoint import load_checkpoint

DELTAS = (1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0)


def percentile(x: np.ndarray) -> np.ndarray:
    return rankdata(x) / len(x)


def sweep(work: Path, setting: str, train_size: int, deltas: tuple[float, ...]) -> list[dict]:
    corpus = work / f"corpus-fashion-mnist-p10000-n{train_size}-{setting}"
    ft = work / f"ft-{corpus.name}-heads"
    ckpt = load_checkpoint(max(ft.glob("stage*"), key=lambda p: int(p.name.removeprefix("stage"))))
    spec = {"segment_size": ckpt.meta.segment_size, "preprocess": ckpt.bundle.preprocess,
            "tokenizer": ckpt.bundle.tokenizer}
    train, _ = load_segments(str(corpus / "train"), **spec)
    val, _ = load_segments(str(corpus / "val"), **spec)
    clip = np.asarray(clip_and_loss(ckpt, train)[0])  # −clip_score: larger = more suspicious
    ckpt.model.double()
    task = InfluenceTask.from_checkpoint(ckpt, sum(len(b) for b in train), "exact")
    engine = ECIF.from_task(task, train)  # the product's defaults: every pair, Nyström-preconditioned CG
    lam1 = top_eigenvalue(engine.matvec(), task.dim, dtype=task.dtype, device=task.device,
                          preconditioner=engine.preconditioner())
    mean = engine.mean_eigenvalue()
    truth = pq.read_table(corpus / "truth.parquet").to_pandas().query("split == 'train'")
    y = truth["misaligned"].to_numpy(bool)
    keys = [(b.shard, k) for b in train for k in b.keys]
    seed = setting.rsplit("-s", 1)[1]
    external = np.asarray(clip_and_loss(load_checkpoint(
        work / f"pretrained-fashion-mnist-p10000-e5-s{seed}"), train)[0])
    query = ValidationQuery(val)
    rows = []
    for delta in deltas:
        engine.set_damping(delta)
        table = engine.score(train, engine.solve(query)).to_pydict()
        assert list(zip(table["shard"], table["key"], strict=True)) == keys
        pos, ecif = np.asarray(table["pos_is"]), np.asarray(table["ecif_is"])
        rankings = {"pos_is": pos, "ecif_is": ecif,
                    "pos+self-clip": percentile(pos) + percentile(clip),
                    "pos+external-clip": percentile(pos) + percentile(external)}
        for name, values in rankings.items():
            m = detection_metrics(values, y)
            rows.append({"setting": setting, "delta": delta, "delta_over_lambda1": delta / lam1,
                         "delta_over_mean": delta / mean, "lambda1": lam1, "mean_eigenvalue": mean,
                         "training_delta": engine.training_delta, "ranking": name, "auroc": m["auroc"],
                         "average_precision": m["average_precision"]})
        best = {r["ranking"]: f"{r['average_precision']:.3f}" for r in rows[-len(rankings):]}
        print(f"{setting} δ={delta:g} (δ/λ1 {delta / lam1:.3g}, δ/mean {delta / mean:.3g}) AP {best}", flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--settings", nargs="+", required=True, help="e.g. substitute-0.4-s0 swap-class-0.2-s1")
    p.add_argument("--train-size", type=int, default=10000)
    p.add_argument("--deltas", type=float, nargs="+", default=list(DELTAS))
    p.add_argument("--work", default=str(DEFAULT_WORK))
    p.add_argument("--out", default=str(RESULTS / "misalignment_damping"))
    args = p.parse_args()
    setup_torch()
    out = Path(args.out)
    done: list[dict] = json.loads(out.with_suffix(".json").read_text())["rows"] if out.with_suffix(".json").exists() \
        else []
    rows = [r for r in done if r["setting"] not in args.settings]
    for setting in args.settings:  # written after each setting
        rows += sweep(Path(args.work), setting, args.train_size, tuple(args.deltas))
        write(out, args, rows)
    table = markdown_table(
        ["setting", "δ", "δ/λ1", "δ/mean eig", "ranking", "AUROC", "AP"],
        [[r["setting"], f"{r['delta']:g}", f"{r['delta_over_lambda1']:.3g}", f"{r['delta_over_mean']:.3g}",
          r["ranking"], f"{r['auroc']:.3f}", f"{r['average_precision']:.3f}"] for r in rows])
    print(table)


def write(out: Path, args: argparse.Namespace, rows: list[dict]) -> None:
    out.with_suffix(".json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    with out.with_suffix(".csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


if __name__ == "__main__":
    main()
