"""`ecif-ray trace`: the training pairs behind each of a model's mistakes (relative-IS)."""

from __future__ import annotations

import argparse

from ecif_ray.cli.common import add_runtime_flags, subcommand


def add_parser(subparsers) -> None:
    p = subcommand(subparsers, "trace", "For each mispredicted test image, the training pairs most responsible "
                   "(relative-IS), written to the run's `trace` table.",
                   "ecif-ray trace --ckpt ft --train corpus/train --test corpus/test --out runs/audit --top-k 10")
    p.add_argument("--ckpt", required=True, help="fine-tuned ecif-ray checkpoint")
    p.add_argument("--train", required=True, nargs="+", help="training shards (dir, brace pattern, glob, s3://)")
    p.add_argument("--test", required=True, help="labelled test shards (json 'label' per sample)")
    p.add_argument("--out", required=True, help="run directory (a scoring run's, or a new one)")
    p.add_argument("--top-k", type=int, default=10, help="training pairs per test example (default 10)")
    p.add_argument("--max-examples", type=int, default=20, help="mispredicted examples traced (default 20)")
    p.add_argument("--rank", type=int, default=128, help="curvature eigenpairs for ‖Δθ‖ (default 128)")
    p.add_argument("--curvature-segments", type=int, default=32, help="segments in the curvature sample")
    add_runtime_flags(p)
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from ecif_ray.trace import TraceSettings, run_trace

    for flag in ("top_k", "max_examples", "rank", "curvature_segments"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')}: must be >= 1")
    settings = TraceSettings(top_k=args.top_k, max_examples=args.max_examples, rank=args.rank,
                             curvature_segments=args.curvature_segments)
    table = run_trace(args.ckpt, args.train if len(args.train) > 1 else args.train[0], args.test, args.out, settings)
    examples = sorted(set(table.column("query_id").to_pylist()))
    print(f"traced {len(examples)} mispredicted test examples -> {args.out} (trace table, {table.num_rows} rows)")
    for row in table.to_pylist()[: 3 * args.top_k]:
        print(f"  {row['query_id']:32} #{row['rank']:<3} {row['shard']}/{row['key']}  "
              f"relative_is={row['relative_is']:.4g}")
    return 0
