"""Candidate definitions of a `misalignment` column, scored from detection.py's cached per-pair scores.

detection.py caches every method's per-pair scores next to each fine-tuned model (``scores.json``,
and ``scores-<hash>.json`` for runs with another ``--damped-delta``). This script reads them for every
cached heads model of the given train size and scores rank combinations against the ground truth:

  rank(pos-damped δ) + rank(−clip_score)            stands on the audited model alone
  rank(pos-damped δ) + rank(−external clip_score)   with a reference model (``--reference``)

Run detection.py first for the settings (e.g. ``--kinds substitute swap-class --methods pos-damped
clip-score external-clip-score``, and ``--damped-delta 1``). Nothing is retrained or re-solved here.

    python benchmarks/misalignment_candidates.py [--train-size 10000]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from common import DEFAULT_WORK, RESULTS, markdown_table
from scipy.stats import rankdata

from ecif_ray.metrics import detection_metrics

BASES = ("clip-score", "external-clip-score", "loss", "pos-damped@0.1", "pos-damped@1")


def cached_scores(ft: Path) -> dict[str, np.ndarray]:
    """Every cached method's scores (larger = more suspicious), pos/ecif-damped tagged with their δ."""
    merged: dict[str, np.ndarray] = {}
    for path in sorted(ft.glob("scores*.json")):
        data = json.loads(path.read_text())
        delta = data["config"].get("damped_delta")
        for method, values in data["scores"].items():
            name = f"{method}@{delta:g}" if method in ("ecif-damped", "pos-damped") else method
            merged[name] = np.asarray(values)
    return merged


def candidates(scores: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    def rank(x: np.ndarray) -> np.ndarray:
        return rankdata(x) / len(x)

    out = {name: scores[name] for name in BASES if name in scores}
    for delta in ("0.1", "1"):
        pos = scores.get(f"pos-damped@{delta}")
        for base in ("clip-score", "external-clip-score"):
            if pos is not None and base in scores:
                out[f"rank(pos-damped@{delta}) + rank({base})"] = rank(pos) + rank(scores[base])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train-size", type=int, default=10000)
    p.add_argument("--work", default=str(DEFAULT_WORK))
    p.add_argument("--out", default=str(RESULTS / "misalignment_candidates"))
    args = p.parse_args()
    rows = []
    for ft in sorted(Path(args.work).glob(f"ft-corpus-*-n{args.train_size}-*-heads")):
        corpus = Path(args.work) / ft.name.removeprefix("ft-").removesuffix("-heads")
        truth = pq.read_table(corpus / "truth.parquet").to_pandas().query("split == 'train'")
        y = truth["misaligned"].to_numpy(bool)  # the same shard/tar order as the cached scores
        setting = ft.name.split(f"n{args.train_size}-", 1)[1].removesuffix("-heads")
        for name, values in candidates(cached_scores(ft)).items():
            if len(values) != len(y):
                raise SystemExit(f"{ft}: {name} has {len(values)} scores for {len(y)} train pairs")
            metrics = detection_metrics(values, y)
            rows.append({"setting": setting, "method": name, "auroc": metrics["auroc"],
                         "average_precision": metrics["average_precision"]})
    table = markdown_table(["setting", "method", "AUROC", "AP"],
                           [[r["setting"], r["method"], f"{r['auroc']:.3f}", f"{r['average_precision']:.3f}"]
                            for r in rows])
    print(table)
    out = Path(args.out).with_suffix(".json")
    out.write_text(json.dumps({"args": vars(args), "rows": rows, "table": table}, indent=2))
    print("wrote", out)


if __name__ == "__main__":
    main()
