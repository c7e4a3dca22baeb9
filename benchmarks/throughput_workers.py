"""Throughput of the scoring pass (pairs/s) with 1 and 2 Ray workers on this machine.

    .venv/bin/python benchmarks/throughput_workers.py                 # Fashion-MNIST + ecif-small
    .venv/bin/python benchmarks/throughput_workers.py --dataset digits --train-size 600 --shard-size 100

Builds a corpus and a heads-fine-tuned checkpoint once (under --work, reused on reruns), then runs
the real pipeline (local Ray cluster, one single-threaded actor per worker) once per dtype and
worker count into fresh run directories. pairs/s is the scoring pass only (read + decode + JVP
scoring + Parquet writes, from the first task submitted to the last shard committed), taken from
the run's manifest; actor start-up and the curvature pass are reported separately. Prints a table
and writes benchmarks/results/throughput_workers.json. The machine's load average is recorded next
to the numbers, because another process on a 2-core box takes a core away from the workers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    args = parse_args()
    import ray
    import torch

    from ecif_ray.config import ScoreConfig
    from ecif_ray.pipeline import run_score

    torch.set_num_threads(1)
    work = Path(args.work).resolve()
    ckpt, corpus = prepare(args, work)
    ray.init(num_cpus=max(args.workers), include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    rows = []
    try:
        for dtype in args.dtypes:
            for workers in args.workers:
                out = work / f"run-{dtype}-{workers}w"
                shutil.rmtree(out, ignore_errors=True)
                load = os.getloadavg()[0]
                result = run_score(ScoreConfig(ckpt=str(ckpt), train=str(corpus / "train"), val=str(corpus / "val"),
                                               out=str(out), workers=workers, dtype=dtype, progress=False,
                                               curvature_segments=args.curvature_segments))
                m = result.manifest
                rows.append({"dtype": dtype, "workers": workers, "pairs": m.counts["pairs"],
                             "shards": m.counts["shards"], "scoring_s": m.timings["scoring_s"],
                             "pairs_per_s": m.counts["pairs_per_s"], "startup_s": m.timings["startup_s"],
                             "curvature_s": m.timings["curvature_s"], "load_avg_before": round(load, 2)})
    finally:
        ray.shutdown()
    for row in rows:
        base = next(r for r in rows if r["dtype"] == row["dtype"])["pairs_per_s"]
        row["speedup"] = round(row["pairs_per_s"] / base, 2)
    report(args, rows)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="fashion-mnist", choices=["fashion-mnist", "digits", "mnist"])
    p.add_argument("--train-size", type=int, default=4000)
    p.add_argument("--shard-size", type=int, default=250)
    p.add_argument("--segment-size", type=int, default=64)
    p.add_argument("--dtypes", nargs="+", default=["float64", "float32"], choices=["float32", "float64"])
    p.add_argument("--curvature-segments", type=int, default=8, help="not measured here: keep the solve short")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--work", default=str(ROOT / "benchmarks" / "results" / "tmp" / "throughput"))
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "throughput_workers.json"))
    return p.parse_args()


def prepare(args: argparse.Namespace, work: Path) -> tuple[Path, Path]:
    """Corpus and checkpoint (model quality is irrelevant here: a short real training run)."""
    from ecif_ray.data.corpus import CorpusSpec, build_corpus
    from ecif_ray.training import TrainConfig, train

    corpus, pre, ft = work / "corpus", work / "pretrained", work / "finetuned"
    arch = "ecif-micro" if args.dataset == "digits" else "ecif-small"
    if not (corpus / "corpus.json").exists():
        build_corpus(CorpusSpec(dataset=args.dataset, out=corpus, noise=0.2, shard_size=args.shard_size, seed=0,
                                pretrain_size=2000 if args.dataset != "digits" else 600,
                                train_size=args.train_size, val_size=500 if args.dataset != "digits" else 200,
                                test_size=200, overwrite=True), progress=False)
    if not (pre / "ecif.json").exists():
        train(TrainConfig(train=str(corpus / "pretrain"), arch=arch, params={"kind": "all"},
                          segment_size=args.segment_size, epochs=2, lr=2e-3, delta=1e-4, out=str(pre), progress=False))
    if not (ft / "ecif.json").exists():
        train(TrainConfig(train=str(corpus / "train"), init=str(pre), params={"kind": "heads"},
                          segment_size=args.segment_size, epochs=1, lr=5e-3, delta=1e-3, out=str(ft), progress=False))
    return ft, corpus


def report(args: argparse.Namespace, rows: list[dict]) -> None:
    import torch

    print(f"\nscoring pass, {args.dataset}, {rows[0]['pairs']} pairs in {rows[0]['shards']} shards, "
          f"segment {args.segment_size}, {os.cpu_count()} CPUs")
    print(f"{'dtype':>8} {'workers':>7} {'pairs/s':>9} {'speedup':>8} {'scoring s':>10} {'startup s':>10} "
          f"{'curvature s':>12} {'load avg':>9}")
    for r in rows:
        print(f"{r['dtype']:>8} {r['workers']:>7} {r['pairs_per_s']:>9.1f} {r['speedup']:>8.2f} "
              f"{r['scoring_s']:>10.2f} {r['startup_s']:>10.2f} {r['curvature_s']:>12.2f} {r['load_avg_before']:>9.2f}")
    result = {"benchmark": "throughput_workers", "command": "python benchmarks/throughput_workers.py "
              + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
                         if k in ("dataset", "train_size", "shard_size", "segment_size", "curvature_segments")),
              "dataset": args.dataset, "segment_size": args.segment_size, "rows": rows,
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
              "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
