"""`ecif-ray score`: distributed ECIF scoring of a corpus into Parquet influence tables.

The flags are generated from ``ScoreConfig`` (``cli.config_flags``): one per field, nested
``solver``/``trace``/``limits`` fields as the flat flags below.

Exit status: 0 every input scored; 2 refused up front (bad argument, config, checkpoint, or a run
directory made with another config); 3 complete, but some inputs became ``errors`` rows; 4 some
shards could not be scored (rerun the same command to retry them); 1 unexpected failure.
"""

from __future__ import annotations

import argparse
import sys

from ecif_ray.cli.common import subcommand
from ecif_ray.cli.config_flags import FieldFlag, add_field_flags, field_overrides, top_level_flags
from ecif_ray.config import ScoreConfig

SECTION_FLAGS = {  # the nested fields that have flags, and their names
    "solver": (FieldFlag(("solver", "tol"), "--tol"), FieldFlag(("solver", "max_iter"), "--max-iter"),
               FieldFlag(("solver", "preconditioner"), "--preconditioner"),
               FieldFlag(("solver", "nystrom_rank"), "--nystrom-rank")),
    "trace": (FieldFlag(("trace", "examples"), "--trace", metavar="N"),
              FieldFlag(("trace", "top_k"), "--trace-top-k")),
    "limits": tuple(FieldFlag(("limits", name), "--" + name.replace("_", "-"))
                    for name in ("max_member_bytes", "max_image_pixels", "max_caption_chars")),
}
FLAGS = [flag for field in top_level_flags(ScoreConfig) for flag in SECTION_FLAGS.get(field.dest, (field,))]


def add_parser(subparsers) -> None:
    p = subcommand(subparsers, "score", "Score every training pair against the query directions on a Ray cluster.",
                   "ecif-ray score --ckpt ft --train corpus/train --val corpus/val --out runs/r1 --workers 2")
    p.add_argument("--config", help="YAML file of ScoreConfig fields (flags given here override it)")
    add_field_flags(p, ScoreConfig, FLAGS)
    p.add_argument("--json", action="store_true", help="print the manifest as JSON instead of the summary")
    p.set_defaults(func=_run_score, threads=1)


def config_from(args: argparse.Namespace) -> ScoreConfig:
    """YAML (if any) overridden by the flags that were given."""
    overrides = field_overrides(args, ScoreConfig, FLAGS)
    if args.config is None and not {"ckpt", "train", "out"} <= set(overrides):
        raise ValueError("give --config YAML, or at least --ckpt, --train and --out (and --val for the 'val' query)")
    return ScoreConfig.load(args.config, overrides)


def _run_score(args: argparse.Namespace) -> int:
    from ecif_ray.pipeline import run_score
    from ecif_ray.pipeline.pool import RunInterrupted
    from ecif_ray.pipeline.progress import format_summary
    from ecif_ray.pipeline.results import EXIT_INCOMPLETE

    config = config_from(args)
    try:
        result = run_score(config)
    except RunInterrupted as exc:
        print(f"ecif-ray score: error: {exc}; rerun to resume", file=sys.stderr)
        return EXIT_INCOMPLETE
    if args.json:
        print(result.manifest.model_dump_json(indent=2))
    else:
        print(format_summary(result))
    return result.exit_code
