"""The feature store (issue 14): the feature pass against plain inference, and an analysis from the store
against the same analysis from the images, side by side in one run, on the same model and corpus.

Setting: Fashion-MNIST, 10,000 training pairs with substitution noise (seed 0), ecif-small with its
projection heads fine-tuned (``detection.py``'s cached model; built here if missing).

Rows:
  plain-inference   one process, one thread: the shards read with the ``webdataset`` library, decoded and
                    preprocessed, then open_clip's ``encode_image`` / ``encode_text`` under ``no_grad`` in
                    the store's dtype, ``--batch-size`` pairs at a time (the full towers: a little more than
                    the trunk, which stops before the projections)
  feature-pass      ``ecif-ray features`` (Ray Data, one actor with one thread; ``--workers`` more rows
                    with more actors): pairs / feature_s, feature_s = the Ray Data part (actor start-up and
                    model load included), store written and committed; ``actor_pairs_per_s`` = pairs / the
                    time the actors spent on their shards (read, decode, trunk, write), × actors
  score-images      ``ecif-ray score`` (2 workers) over the images: curvature over every pair, float64
                    solve, scoring of every pair (a new query: val and task, misalignment)
  score-store       the same with ``--features STORE``: no image is read; its tables are compared with
                    score-images' (max relative difference of every score column)
  engine-images / engine-store   the notebook engine: ``ECIF.from_checkpoint`` + solve + score, in process

    python benchmarks/feature_store.py
    python benchmarks/feature_store.py --workers 1 2 --out benchmarks/results/feature_store
    python benchmarks/feature_store.py --pass-only ~/.cache/ecif-ray-bench/million/shards-100000 --rounds 1 \
        --out benchmarks/results/feature_store_pass_100k        # the first two rows at 100,000 pairs

Writes <out>.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
import webdataset as wds
from common import (
    DEFAULT_WORK,
    RESULTS,
    corpus,
    finetune,
    machine_notes,
    markdown_table,
    pretrained,
    recipe_for,
    setup_torch,
)

from ecif_ray.config import ScoreConfig
from ecif_ray.influence.engine import ECIF
from ecif_ray.influence.queries import ValidationQuery
from ecif_ray.models.checkpoint import load_checkpoint
from ecif_ray.pipeline import run_score
from ecif_ray.pipeline.features import FeatureJob, run_features
from ecif_ray.tables import connect

SCORE_COLUMNS = ("clip_score", "loss", "pos_is", "neg_is", "ecif_is", "misalignment_pos_is")


def plain_inference(ckpt: Path, train: Path, batch_size: int, dtype: torch.dtype) -> dict:
    """open_clip inference over the shards with the webdataset library: pairs/s, decode included."""
    bundle = load_checkpoint(str(ckpt)).bundle
    model = bundle.model.to(dtype).eval()
    urls = [str(p) for p in sorted(train.glob("*.tar"))]
    dataset = wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode("pil").to_tuple("png", "txt")
    start, pairs = time.perf_counter(), 0
    images, captions = [], []

    def run() -> None:
        with torch.no_grad():
            model.encode_image(torch.stack([bundle.preprocess(i) for i in images]).to(dtype))
            model.encode_text(torch.as_tensor(bundle.tokenizer(captions)).long())

    for image, caption in dataset:
        images.append(image)
        captions.append(caption)
        if len(images) == batch_size:
            run()
            pairs += len(images)
            images, captions = [], []
    if images:
        run()
        pairs += len(images)
    seconds = time.perf_counter() - start
    return {"row": "plain-inference", "pairs": pairs, "seconds": round(seconds, 3), "pairs_per_s": pairs / seconds}


def feature_pass(ckpt: Path, train: Path, out: Path, workers: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    result = run_features(FeatureJob(ckpt=str(ckpt), train=str(train), out=str(out), workers=workers,
                                     progress=False))
    assert not result.failed and result.exit_code == 0, result.to_json()
    busy = sum(r.seconds for r in result.written.values())  # inside the actors: read, decode, trunk, write
    return {"row": f"feature-pass-{workers}w", "workers": workers, "pairs": result.pairs_written,
            "seconds": round(result.feature_s, 3), "pairs_per_s": result.pairs_per_s,
            "actor_pairs_per_s": round(result.pairs_written / busy * workers, 1),
            "disk_bytes_per_pair": round(result.bytes_per_pair, 1), "total_s": round(result.seconds, 3)}


def score_run(ckpt: Path, setting: Path, out: Path, features: Path | None) -> tuple[dict, pa.Table]:
    shutil.rmtree(out, ignore_errors=True)
    config = ScoreConfig(ckpt=str(ckpt), train=str(setting / "train"), val=str(setting / "val"),
                         test=str(setting / "test"), queries=["val", "task"], out=str(out), workers=2, progress=False,
                         features=str(features) if features else None)
    start = time.perf_counter()
    result = run_score(config)
    wall = time.perf_counter() - start
    manifest = result.manifest
    pairs = connect(str(out)).sql("SELECT * FROM pairs ORDER BY shard, key").to_arrow_table()
    row = {"row": "score-store" if features else "score-images", "pairs": manifest.counts["pairs"],
           "seconds": round(wall, 3), **{k: manifest.timings.get(k) for k in ("startup_s", "curvature_s",
                                                                              "scoring_s", "total_s")},
           "curvature_pairs": manifest.curvature.get("pairs"), "cg_iterations": manifest.solver.get("iterations")}
    row["analysis_s"] = round(row["curvature_s"] + row["scoring_s"], 3)
    return row, pairs


def engine_run(ckpt: Path, setting: Path, features: Path | None) -> tuple[dict, pa.Table]:
    start = time.perf_counter()
    engine = ECIF.from_checkpoint(str(ckpt), str(setting / "train"), features=str(features) if features else None)
    loaded = time.perf_counter()
    directions = engine.solve(ValidationQuery(engine.load(str(setting / "val"))), misalignment="auto")
    table = engine.score(engine.train_batches, directions)
    seconds = time.perf_counter() - start
    return {"row": "engine-store" if features else "engine-images", "pairs": table.num_rows,
            "seconds": round(seconds, 3), "load_s": round(loaded - start, 3)}, table.sort_by([("shard", "ascending"),
                                                                                             ("key", "ascending")])


def max_relative_difference(a: pa.Table, b: pa.Table, columns: tuple[str, ...]) -> float:
    assert a.column("key").to_pylist() == b.column("key").to_pylist()
    worst = 0.0
    for name in columns:
        if name not in a.column_names:
            continue
        x, y = (np.asarray(t.column(name).to_pylist(), dtype=float) for t in (a, b))
        scale = np.maximum(np.abs(x).max(), 1e-300)
        worst = max(worst, float(np.abs(x - y).max() / scale))
    return worst


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train-size", type=int, default=10000)
    p.add_argument("--noise", type=float, default=0.4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="actor counts of the feature pass rows")
    p.add_argument("--rounds", type=int, default=2, help="plain-inference / 1-actor feature-pass rounds, alternated")
    p.add_argument("--work", default=str(DEFAULT_WORK))
    p.add_argument("--out", default=str(RESULTS / "feature_store"))
    p.add_argument("--pass-only", metavar="SHARDS", help="only the plain-inference / 1-actor feature-pass rounds, "
                   "over these shards (e.g. the 100,000 pairs benchmarks/million.py --keep leaves), same model")
    args = p.parse_args()
    setup_torch()
    import ray

    recipe = recipe_for("fashion-mnist")
    work = Path(args.work)
    setting = corpus(work, recipe, args.train_size, args.noise, "substitute", args.seed)
    init = pretrained(work, recipe, args.seed, setting)
    ckpt = finetune(recipe, setting, init, "heads", args.seed, work / f"ft-{setting.name}-heads").final
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="ecif-fs-bench-") as tmp:
        store = Path(tmp) / "store"
        train = Path(args.pass_only) if args.pass_only else setting / "train"
        for r in range(args.rounds):  # alternate: load from other processes hits both alike
            rows.append({**plain_inference(ckpt, train, recipe.segment_size, torch.float64), "round": r})
            rows.append({**feature_pass(ckpt, train, store, 1), "round": r})
        if args.pass_only:
            ray.shutdown()
            ratio = statistics.median(r["pairs_per_s"] for r in rows if r["row"] == "feature-pass-1w") / \
                statistics.median(r["pairs_per_s"] for r in rows if r["row"] == "plain-inference")
            Path(args.out).with_suffix(".json").write_text(json.dumps(
                {"args": vars(args), "machine": machine_notes(), "checkpoint": str(ckpt), "rows": rows,
                 "ratios": {"feature_pass_1w_vs_plain": ratio}}, indent=2, default=str))
            print(json.dumps(rows, indent=1), "\nfeature pass / plain:", round(ratio, 3))
            return
        for workers in [w for w in args.workers if w != 1]:
            rows.append(feature_pass(ckpt, setting / "train", store, workers))
        images_row, images_pairs = score_run(ckpt, setting, Path(tmp) / "run-images", None)
        store_row, store_pairs = score_run(ckpt, setting, Path(tmp) / "run-store", store)
        store_row["max_rel_diff_vs_images"] = max_relative_difference(images_pairs, store_pairs, SCORE_COLUMNS)
        rows += [images_row, store_row]
        engine_images, table_images = engine_run(ckpt, setting, None)
        engine_store, table_store = engine_run(ckpt, setting, store)
        engine_store["max_rel_diff_vs_images"] = max_relative_difference(table_images, table_store, SCORE_COLUMNS)
        rows += [engine_images, engine_store]
    ray.shutdown()

    def median(name: str, key: str = "pairs_per_s") -> float:
        return statistics.median(r[key] for r in rows if r["row"] == name)

    ratios = {"feature_pass_1w_vs_plain": median("feature-pass-1w") / median("plain-inference"),
              "feature_actor_1w_vs_plain": median("feature-pass-1w", "actor_pairs_per_s") / median("plain-inference"),
              "scoring_pass_images_over_store": images_row["scoring_s"] / store_row["scoring_s"],
              "score_total_images_over_store": images_row["seconds"] / store_row["seconds"],
              "score_analysis_images_over_store": images_row["analysis_s"] / store_row["analysis_s"],
              "engine_images_over_store": engine_images["seconds"] / engine_store["seconds"]}
    payload = {"args": vars(args), "machine": machine_notes(), "checkpoint": str(ckpt), "rows": rows,
               "ratios": ratios}
    Path(args.out).with_suffix(".json").write_text(json.dumps(payload, indent=2, default=str))
    print(markdown_table(["row", "pairs", "seconds", "pairs/s", "notes"], [
        [r["row"], str(r["pairs"]), f"{r['seconds']:.1f}", f"{r['pairs'] / r['seconds']:.0f}",
         ", ".join(f"{k}={v}" for k, v in r.items() if k not in ("row", "pairs", "seconds", "pairs_per_s"))]
        for r in rows]))
    print(json.dumps(ratios, indent=2))


if __name__ == "__main__":
    main()
