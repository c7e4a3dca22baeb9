"""`ecif-ray train`: segment-exact fine-tuning."""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

from ecif_ray.cli.common import add_runtime_flags, add_subset_flags, subcommand, subset_from


def add_parser(subparsers) -> None:
    p = subcommand(subparsers, "train", "Fine-tune θ by minimising R(θ) over a fixed segment partition.",
                    "ecif-ray train --train corpus/train --init pre --params heads --segment-size 32 "
                    "--epochs 10 --delta 1e-3 --seed 0 --out ft")
    p.add_argument("--train", required=True, nargs="+", help="training shards: dir, brace pattern, glob, s3://")
    start = p.add_mutually_exclusive_group(required=True)
    start.add_argument("--arch", help="open_clip architecture for a fresh start, e.g. ecif-small or ViT-B-32")
    start.add_argument("--init", help="ecif-ray checkpoint directory to start from")
    p.add_argument("--pretrained", help="with --arch: open_clip pretrained tag or local weights file")
    add_subset_flags(p)
    p.add_argument("--segment-size", type=int, default=32, help="segment (batch) size B (default 32)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--delta", type=float, default=1e-3, help="δ of R(θ): damping toward θ_0 (default 1e-3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--exclude", help="file of 'shard,key' or 'key' lines (or Parquet) to leave out")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (cosine-decayed)")
    p.add_argument("--segments-per-step", type=int,
                   help="Adam: segments per step (default: the largest k <= 4 giving at least --min-steps "
                        "optimizer steps, else 1)")
    p.add_argument("--min-steps", type=int, default=300,
                   help="warn when Adam takes fewer optimizer steps than this (default 300)")
    p.add_argument("--optimizer", default="adam", choices=["adam", "lbfgs"],
                   help="adam (minibatches of segments) or lbfgs (full batch, tight optimum for small runs)")
    p.add_argument("--logit-scale", type=float, help="fixed logit scale s (default: the model's)")
    p.add_argument("--new-anchor", action="store_true", help="with --init: reset θ_0 to the starting values")
    add_runtime_flags(p)
    p.add_argument("--out", required=True, help="checkpoint directory to write")
    p.set_defaults(func=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    from ecif_ray.training import TrainConfig, TrainingWarning, train

    cfg = TrainConfig(train=args.train if len(args.train) > 1 else args.train[0], out=args.out, arch=args.arch,
                      pretrained=args.pretrained, init=args.init, params=subset_from(args),
                      segment_size=args.segment_size, epochs=args.epochs, delta=args.delta, seed=args.seed,
                      exclude=args.exclude, lr=args.lr, segments_per_step=args.segments_per_step,
                      min_steps=args.min_steps, optimizer=args.optimizer,
                      logit_scale=args.logit_scale, new_anchor=args.new_anchor, device=args.device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TrainingWarning)  # printed below, from the checkpoint
        path = train(cfg)
    print(f"checkpoint written to {path}")
    training = json.loads((Path(path) / "ecif.json").read_text())["training"]
    print(_outcome(training))
    for message in training.get("warnings", []):
        print(f"ecif-ray train: warning: {message}", file=sys.stderr)
    return 0


def _outcome(training: dict) -> str:
    steps = training.get("optimizer_steps")
    how = f"{steps} Adam steps ({training['segments_per_step']} segments/step)" if steps is not None \
        else f"{len(training['objective_per_epoch'])} L-BFGS rounds"
    ratio, median = training.get("loss_ratio"), training.get("median_loss_ratio")
    versus = f" = {ratio:.2f} x chance ({training['chance_loss']:.4g})" if ratio is not None else ""
    middle = f"; median pair {median:.2f} x chance" if median is not None else ""
    return f"{how}; final training loss {training['final_train_loss']:.4g} per pair{versus}{middle}"
