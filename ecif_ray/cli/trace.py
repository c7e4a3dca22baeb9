"""`ecif-ray trace`: the training pairs behind each of a model's mistakes (relative-IS).

A scoring run (the same distributed pipeline as `ecif-ray score`) whose query is the zero-shot
task loss on --test, with trace-back on: every training pair gets pos_is/neg_is/ecif_is against
the task, and the `trace` table gets the top-k pairs per mispredicted test example.
"""

from __future__ import annotations

import argparse

from ecif_ray.cli.common import subcommand


def add_parser(subparsers) -> None:
    p = subcommand(subparsers, "trace", "For each mispredicted test image, the training pairs most responsible "
                   "(relative-IS), written to the run's `trace` table.",
                   "ecif-ray trace --ckpt ft --train corpus/train --test corpus/test --out runs/trace --top-k 10")
    p.add_argument("--ckpt", required=True, help="fine-tuned ecif-ray checkpoint")
    p.add_argument("--train", required=True, nargs="+", help="training shards (dir, brace pattern, glob, s3://)")
    p.add_argument("--test", required=True, nargs="+", help="labelled test shards (json 'label' per sample)")
    p.add_argument("--out", required=True, help="run directory (local or s3://)")
    p.add_argument("--top-k", type=int, default=10, help="training pairs per test example (default 10)")
    p.add_argument("--max-examples", type=int, default=20, help="mispredicted examples traced (default 20)")
    p.add_argument("--rank", type=int, default=128, help="curvature eigenpairs for ‖Δθ‖ (default 128)")
    p.add_argument("--curvature-segments", type=int,
                   help="segments in the curvature sample (default: every segment up to the memory cap)")
    p.add_argument("--damping", default="exact", help="δ of the analysis: exact (default), auto or a number")
    p.add_argument("--workers", type=int, help="Ray actors (default: one per GPU, else one per CPU)")
    p.add_argument("--address", help="Ray cluster to join (default: RAY_ADDRESS or a new local cluster)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from ecif_ray.config import ScoreConfig, TraceConfig
    from ecif_ray.pipeline.progress import format_summary
    from ecif_ray.pipeline.run import run_score

    config = ScoreConfig(
        ckpt=args.ckpt, train=args.train if len(args.train) > 1 else args.train[0],
        test=args.test if len(args.test) > 1 else args.test[0], out=args.out, queries=["task"],
        trace=TraceConfig(examples=args.max_examples, top_k=args.top_k, rank=args.rank),
        curvature_segments=args.curvature_segments, damping=args.damping, workers=args.workers,
        address=args.address)
    result = run_score(config)
    print(format_summary(result))
    return result.exit_code
