"""`ecif-ray score`: distributed ECIF scoring of a corpus into Parquet influence tables.

Exit status: 0 every input scored; 2 refused up front (bad argument, config, checkpoint, or a run
directory made with another config); 3 complete, but some inputs became ``errors`` rows; 4 some
shards could not be scored (rerun the same command to retry them); 1 unexpected failure.
"""

from __future__ import annotations

import argparse
import json
import sys

from ecif_ray.cli.common import subcommand

_EPILOG_FLAGS = ("ckpt", "train", "val", "test", "classes", "exclude", "out", "run_id", "negative_term",
                 "segment_size", "n_train", "damping", "curvature_segments", "curvature_shards", "curvature_seed",
                 "curvature_memory_mb",
                 "dtype", "address", "workers", "num_gpus_per_worker", "threads_per_worker", "max_attempts",
                 "max_worker_failures", "top_k")
_SOLVER_FLAGS = ("tol", "max_iter", "preconditioner", "nystrom_rank")


def add_parser(subparsers) -> None:
    p = subcommand(subparsers, "score", "Score every training pair against the query directions on a Ray cluster.",
                   "ecif-ray score --ckpt ft --train corpus/train --val corpus/val --out runs/r1 --workers 2")
    p.add_argument("--config", help="YAML file of ScoreConfig fields (flags given here override it)")
    p.add_argument("--ckpt", help="ecif-ray checkpoint directory")
    p.add_argument("--train", nargs="+", help="training shards to score: dir, brace pattern, glob, s3://")
    p.add_argument("--val", nargs="+", help="trusted validation pairs (the 'val' query)")
    p.add_argument("--test", nargs="+", help="labelled test images (the 'task' query)")
    p.add_argument("--classes", help="classes.json for the task query (default: next to --test)")
    p.add_argument("--queries", nargs="+", choices=["val", "task"], help="query losses; the first is primary")
    p.add_argument("--exclude", help="pairs to leave out: 'shard,key' lines or Parquet")
    p.add_argument("--out", help="run directory (local or s3://)")
    p.add_argument("--run-id", help="Hive partition value run_id=<id> (default: derived from the fingerprint)")
    p.add_argument("--negative-term", choices=["exact", "taylor"])
    p.add_argument("--segment-size", type=int, help="pairs per segment (default: the checkpoint's)")
    p.add_argument("--n-train", type=int, help="N of R(θ) (default: the checkpoint's training pairs)")
    p.add_argument("--damping", help="δ of the analysis: exact (the checkpoint's training δ, default), auto "
                                     "(0.1 × G's mean eigenvalue, at least the training δ) or a number")
    p.add_argument("--curvature-segments", type=int,
                   help="segments in the curvature sample (default: every segment up to the memory cap)")
    p.add_argument("--curvature-memory-mb", type=int,
                   help="MiB of trunk features per worker for the curvature sample (default 2048; caps it)")
    p.add_argument("--curvature-shards", type=int, help="shards the sample is spread over (default 8)")
    p.add_argument("--curvature-seed", type=int)
    p.add_argument("--tol", type=float, help="CG relative residual (default: 1e-8 in float64, 1e-5 in float32)")
    p.add_argument("--max-iter", type=int, help="CG iterations at most (default: the engine's)")
    p.add_argument("--preconditioner", choices=["none", "nystrom", "dense"],
                   help="default: nystrom; dense forms G exactly (small θ: one CG step, exact trace-back norms)")
    p.add_argument("--nystrom-rank", type=int)
    p.add_argument("--trace", type=int, metavar="N",
                   help="also trace back up to N mispredicted --test examples (trace table; top --trace-top-k)")
    p.add_argument("--trace-top-k", type=int, help="training pairs kept per traced example (default 10)")
    p.add_argument("--dtype", choices=["float32", "float64"])
    p.add_argument("--address", help="Ray cluster to join ('auto', host:port, ray://...); default: RAY_ADDRESS or "
                                     "a new local cluster")
    p.add_argument("--workers", type=int, help="actors (default: one per GPU, else one per CPU)")
    p.add_argument("--num-gpus-per-worker", type=float, help="default: 1 when the cluster has GPUs, else 0")
    p.add_argument("--threads-per-worker", type=int,
                   help="CPUs per actor: torch threads on CPU, image-decoding threads on GPU (default 1)")
    p.add_argument("--max-attempts", type=int, help="tries per shard (default 3)")
    p.add_argument("--max-worker-failures", type=int, help="actor deaths tolerated (default 2 × workers + 2)")
    p.add_argument("--top-k", type=int, help="flagged pairs in the summary (default 10)")
    p.add_argument("--storage-options", type=json.loads, help="fsspec options as JSON, e.g. an S3 endpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help="print the manifest as JSON instead of the summary")
    p.set_defaults(func=_run_score, threads=1)


def config_from(args: argparse.Namespace):
    """YAML (if any) overridden by the flags that were given."""
    from ecif_ray.config import ScoreConfig

    overrides = {name: getattr(args, name) for name in (*_EPILOG_FLAGS, "queries", "storage_options")}
    for name in ("train", "val", "test"):
        value = overrides[name]
        if value is not None and len(value) == 1:
            overrides[name] = value[0]
    solver = {name: getattr(args, name) for name in _SOLVER_FLAGS if getattr(args, name) is not None}
    if solver:
        overrides["solver"] = solver
    trace = {"examples": args.trace, "top_k": args.trace_top_k}
    if any(v is not None for v in trace.values()):
        overrides["trace"] = {k: v for k, v in trace.items() if v is not None}
    if args.no_progress:
        overrides["progress"] = False
    if args.config is None and (args.ckpt is None or args.train is None or args.out is None):
        raise ValueError("give --config YAML, or at least --ckpt, --train and --out (and --val for the 'val' query)")
    return ScoreConfig.load(args.config, overrides)


def _run_score(args: argparse.Namespace) -> int:
    from ecif_ray.pipeline import run_score
    from ecif_ray.pipeline.pool import WorkerFailure
    from ecif_ray.pipeline.progress import format_summary
    from ecif_ray.pipeline.run import EXIT_INCOMPLETE

    config = config_from(args)
    try:
        result = run_score(config)
    except WorkerFailure as exc:
        print(f"ecif-ray score: error: {exc}; rerun to resume", file=sys.stderr)
        return EXIT_INCOMPLETE
    if args.json:
        print(result.manifest.model_dump_json(indent=2))
    else:
        print(format_summary(result))
    return result.exit_code
