"""`ecif-ray eval`: zero-shot accuracy and validation loss."""

from __future__ import annotations

import argparse
import json

from ecif_ray.cli.common import add_runtime_flags, subcommand


def add_parser(subparsers) -> None:
    p = subcommand(subparsers, "eval", "Zero-shot test accuracy and validation contrastive loss of a checkpoint.",
                    "ecif-ray eval --ckpt ft --test corpus/test --val corpus/val --json")
    p.add_argument("--ckpt", required=True)
    p.add_argument("--test", required=True, help="labelled test shards (json 'label' per sample)")
    p.add_argument("--val", help="validation pairs: also report val_loss with the engine's fixed batching")
    p.add_argument("--classes", help="classes.json (default: the corpus's, next to --test)")
    add_runtime_flags(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_run_eval)


def _run_eval(args: argparse.Namespace) -> int:
    from ecif_ray.evaluation import evaluate
    from ecif_ray.models.checkpoint import load_checkpoint

    result = evaluate(load_checkpoint(args.ckpt, args.device), args.test, args.val, args.classes)
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:>20}: {value}")
    return 0
