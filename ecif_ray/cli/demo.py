"""`ecif-ray demo`: the embedded default, end to end (corpus, training, distributed scoring, SQL)."""

from __future__ import annotations

import argparse

from ecif_ray.cli.common import add_runtime_flags, subcommand


def add_parser(subparsers) -> None:
    p = subcommand(subparsers, "demo", "Build a corpus with known misalignment, train, score it on a local Ray "
                   "cluster and show what ECIF finds (reruns reuse finished steps).",
                   "ecif-ray demo --workdir ecif-demo --workers 2")
    p.add_argument("--workdir", default="ecif-demo", help="where corpus, checkpoints and tables go (default ecif-demo)")
    p.add_argument("--workers", type=int, default=2, help="Ray actors for the scoring pass (default 2)")
    p.add_argument("--noise", type=float, default=0.4,
                   help="fraction of each substituted class captioned as its neighbour (default 0.4)")
    p.add_argument("--seed", type=int, default=0)
    add_runtime_flags(p)
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from ecif_ray.demo import run_demo

    if args.workers < 1:
        raise ValueError("--workers: must be >= 1")
    summary = run_demo(args.workdir, workers=args.workers, noise=args.noise, seed=args.seed)
    return int(summary["exit_code"])
