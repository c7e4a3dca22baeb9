"""`ecif-ray trace`: the training pairs behind each of a model's mistakes (relative-IS).

A scoring run (the same distributed pipeline as `ecif-ray score`) whose query is the zero-shot
task loss on --test, with trace-back on: every training pair gets pos_is/neg_is/ecif_is against
the task, and the `trace` table gets the top-k pairs per mispredicted test example. Its flags are
``ScoreConfig`` fields (``cli.config_flags``), with the trace-back settings under short names.
"""

from __future__ import annotations

import argparse

from ecif_ray.cli.common import subcommand
from ecif_ray.cli.config_flags import FieldFlag, add_field_flags, field_overrides
from ecif_ray.config import ScoreConfig

FLAGS = (
    FieldFlag(("ckpt",), "--ckpt", required=True), FieldFlag(("train",), "--train", required=True),
    FieldFlag(("test",), "--test", required=True), FieldFlag(("out",), "--out", required=True),
    FieldFlag(("trace", "top_k"), "--top-k"), FieldFlag(("trace", "examples"), "--max-examples"),
    FieldFlag(("trace", "rank"), "--rank"), FieldFlag(("curvature_segments",), "--curvature-segments"),
    FieldFlag(("damping",), "--damping"), FieldFlag(("workers",), "--workers"), FieldFlag(("address",), "--address"),
)


def add_parser(subparsers) -> None:
    p = subcommand(subparsers, "trace", "For each mispredicted test image, the training pairs most responsible "
                   "(relative-IS), written to the run's `trace` table.",
                   "ecif-ray trace --ckpt ft --train corpus/train --test corpus/test --out runs/trace --top-k 10")
    add_field_flags(p, ScoreConfig, FLAGS, name_sections=False)  # trace-back is always on here
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from ecif_ray.pipeline import run_score
    from ecif_ray.pipeline.progress import format_summary

    overrides = field_overrides(args, ScoreConfig, FLAGS)
    config = ScoreConfig.load(None, {**overrides, "queries": ["task"], "trace": overrides.get("trace", {})})
    result = run_score(config)
    print(format_summary(result))
    return result.exit_code
