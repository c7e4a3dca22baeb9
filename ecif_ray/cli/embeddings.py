"""`ecif-ray embeddings`: a checkpoint's final embeddings and CLIP score of every pair of a feature store.

The pass is ``pipeline.embeddings`` (no images, no trunk: the checkpoint's tail over the stored trunk
features); the table lands in the store (``embeddings/checkpoint=<id>/``, ``tables.feature_store``) and
``ecif-ray sql STORE`` queries it. Exit status: 0 done; 2 refused (bad argument or checkpoint, a store of
another trunk, a store in use); 4 some shards' stored features could not be read (named; the others are
written); 1 unexpected failure.
"""

from __future__ import annotations

import argparse
import json
import sys

from ecif_ray.cli.common import add_runtime_flags, subcommand
from ecif_ray.cli.config_flags import FieldFlag, add_field_flags, field_overrides
from ecif_ray.config import ScoreConfig

SHARED = (FieldFlag(("ckpt",), "--ckpt", required=True), FieldFlag(("dtype",), "--dtype"),
          FieldFlag(("trusted_arch",), "--trusted-arch"), FieldFlag(("storage_options",), "--storage-options"),
          FieldFlag(("progress",), "--no-progress"))


def add_parser(subparsers) -> None:
    p = subcommand(subparsers, "embeddings", "Write a checkpoint's L2-normalised image/text embeddings and CLIP "
                   "score of every pair into its feature store (no images read; for CLIP-score filtering and "
                   "dedup with `ecif-ray sql STORE`).",
                   "ecif-ray embeddings --ckpt ft --features corpus/features-ft")
    add_field_flags(p, ScoreConfig, SHARED[:1])
    p.add_argument("--features", required=True, metavar="STORE",
                   help="feature store of this checkpoint's trunk (`ecif-ray features`); the table is written into "
                        "it, one partition per checkpoint; complete shards are skipped")
    p.add_argument("--batch-size", type=int, default=8192, help="pairs per tail call (default 8192)")
    add_runtime_flags(p)
    add_field_flags(p, ScoreConfig, SHARED[1:])
    p.add_argument("--json", action="store_true", help="print the result as JSON instead of the summary")
    p.set_defaults(func=_run_embeddings)


def _run_embeddings(args: argparse.Namespace) -> int:
    from ecif_ray.pipeline.embeddings import EmbeddingJob, run_embeddings

    job = EmbeddingJob(**field_overrides(args, ScoreConfig, SHARED), features=args.features,
                       batch_size=args.batch_size, device=args.device)
    result = run_embeddings(job).to_json()
    if args.json:
        print(json.dumps(result, indent=2))
        return result["exit_code"]
    print(f"embeddings of checkpoint {result['checkpoint_id']} ({result['dim']} dims) in {result['store']}: "
          f"{result['shards']} shards ({result['shards_written']} written now, {result['shards_skipped']} already "
          f"complete)")
    if result["pairs_written"]:
        print(f"this pass: {result['pairs_written']} pairs in {result['seconds']:.1f} s ({result['pairs_per_s']:.0f} "
              f"pairs/s), {result['disk_bytes_per_pair']:.0f} bytes per pair on disk")
    for why in result["failed"].values():
        print(f"failed: {why} (rewrite the shard: delete its _state/shards record, rerun `ecif-ray features`, then "
              "this command)", file=sys.stderr)
    print(f"query: ecif-ray sql {result['store']} \"SELECT key, clip_score FROM embeddings WHERE checkpoint = "
          f"'{result['checkpoint_id']}' ORDER BY clip_score LIMIT 10\"")
    return result["exit_code"]
