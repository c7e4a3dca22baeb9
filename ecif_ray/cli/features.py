"""`ecif-ray features`: write a checkpoint's trunk features for a corpus into a feature store.

The flags shared with ``ecif-ray score`` are generated from the same ``ScoreConfig`` fields
(``cli.config_flags``), so they parse and mean the same; ``--train``, ``--out`` and ``--batch-size``
are this command's own. The pass itself is ``pipeline.features`` (Ray Data); the store's layout is
``tables.feature_store``.

Exit status: 0 every input featurized; 2 refused up front (bad argument or checkpoint, a store of
another trunk, a store in use); 3 complete, but some inputs became ``errors`` rows; 4 some shards
could not be read (rerun the same command to retry them); 1 unexpected failure.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Any

from ecif_ray.cli.common import subcommand
from ecif_ray.cli.config_flags import FieldFlag, add_field_flags, field_overrides
from ecif_ray.config import ScoreConfig
from ecif_ray.data.limits import DEFAULT_LIMITS, ReadLimits

SHARED = (  # ScoreConfig fields that mean the same here
    FieldFlag(("ckpt",), "--ckpt", required=True), FieldFlag(("trusted_arch",), "--trusted-arch"),
    FieldFlag(("storage_options",), "--storage-options"), FieldFlag(("dtype",), "--dtype"),
    FieldFlag(("address",), "--address"), FieldFlag(("workers",), "--workers"),
    FieldFlag(("num_gpus_per_worker",), "--num-gpus-per-worker"),
    FieldFlag(("threads_per_worker",), "--threads-per-worker"), FieldFlag(("max_attempts",), "--max-attempts"),
    FieldFlag(("retry_backoff_s",), "--retry-backoff-s"),
    *(FieldFlag(("limits", name), "--" + name.replace("_", "-"))
      for name in ("max_member_bytes", "max_image_pixels", "max_caption_chars")),
    FieldFlag(("progress",), "--no-progress"),
)


def add_parser(subparsers) -> None:
    p = subcommand(subparsers, "features", "Compute a checkpoint's frozen-trunk features for every pair of a corpus, "
                   "once, into a Parquet feature store (a Ray Data pass; reruns resume).",
                   "ecif-ray features --ckpt ft --train corpus/train --out corpus/features-ft --workers 2")
    add_field_flags(p, ScoreConfig, SHARED[:1])
    p.add_argument("--train", nargs="+", required=True, metavar="TRAIN",
                   help="shards to featurize: dir, brace pattern, glob, s3://..., or several")
    p.add_argument("--out", required=True, help="feature store directory (local path or s3://...); an existing "
                   "store must hold the same trunk (its fingerprint), and its committed shards are skipped")
    p.add_argument("--batch-size", type=int, help="pairs per trunk call (default: the checkpoint's segment size, "
                   "which gives exactly the features `ecif-ray score` computes)")
    add_field_flags(p, ScoreConfig, SHARED[1:])
    p.add_argument("--json", action="store_true", help="print the result as JSON instead of the summary")
    p.set_defaults(func=_run_features, threads=1)


def job_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """``FeatureJob`` fields from the parsed flags (flags not given keep their defaults)."""
    overrides = field_overrides(args, ScoreConfig, SHARED)
    limits = overrides.pop("limits", {})
    train = args.train[0] if len(args.train) == 1 else list(args.train)
    kwargs: dict[str, Any] = {**overrides, "train": train, "out": args.out, "batch_size": args.batch_size,
                              "limits": ReadLimits(**{**dataclasses.asdict(DEFAULT_LIMITS), **limits})}
    return kwargs


def _run_features(args: argparse.Namespace) -> int:
    from ecif_ray.pipeline.features import FeatureJob, run_features
    from ecif_ray.pipeline.pool import RunInterrupted
    from ecif_ray.pipeline.results import EXIT_INCOMPLETE

    job = FeatureJob(**job_kwargs(args))
    try:
        result = run_features(job)
    except RunInterrupted as exc:
        print(f"ecif-ray features: error: {exc}", file=sys.stderr)
        return EXIT_INCOMPLETE
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
    else:
        print(format_summary(result.to_json()))
    return result.exit_code


def format_summary(result: dict[str, Any]) -> str:
    columns = ", ".join(f"{c['name']} {c['dtype']}{c['shape']}" for c in result["columns"])
    errors = ", ".join(f"{stage}: {n}" for stage, n in sorted(result["errors_by_stage"].items())) or "none"
    lines = [
        f"feature store {result['store']} (fingerprint {result['fingerprint'][:12]}; trunk {result['trunk']}, "
        f"{result['dtype']})",
        f"shards: {result['shards']} ({result['shards_written']} written now, {result['shards_skipped']} already "
        f"committed, {result['shards_failed']} failed); pairs: {result['pairs']}; errors: {errors}",
        f"features per pair: {columns} = {result['feature_bytes_per_pair']} bytes"
        + (f"; on disk {result['disk_bytes_per_pair']:.0f} bytes per pair" if result["pairs_written"] else ""),
    ]
    if result["pairs_written"]:
        lines.append(f"this pass: {result['pairs_written']} pairs in {result['feature_s']:.1f} s "
                     f"({result['pairs_per_s']:.1f} pairs/s, worker start included)")
    for shard, why in sorted(result["failed"].items()):
        lines.append(f"failed: {shard}: {why} (rerun to retry)")
    return "\n".join(lines)
