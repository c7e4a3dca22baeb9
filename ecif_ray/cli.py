"""`ecif-ray` command line: corpus build, train, eval (score, sql, demo, report, trace follow).

Command names and flags are a contract other tools rely on; add options, never rename.
Bad arguments exit with status 2 and one line naming the argument.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence

from pydantic import ValidationError

EXIT_BAD_ARGS = 2


class _Parser(argparse.ArgumentParser):
    """argparse with examples in --help and one-line errors."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_BAD_ARGS, f"{self.prog}: error: {message}\n")


def _subcommand(subparsers, name: str, help_text: str, example: str) -> argparse.ArgumentParser:
    return subparsers.add_parser(name, help=help_text, description=help_text, epilog=f"example:\n  {example}",
                                 formatter_class=argparse.RawDescriptionHelpFormatter)


def _add_subset_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--params", default="heads", choices=["all", "heads", "lora", "last-k"],
                   help="influence parameter subset θ (default: heads)")
    p.add_argument("--last-k", type=int, default=1, help="last-k: number of final blocks per tower (default 1)")
    p.add_argument("--lora-rank", type=int, default=4, help="lora: adapter rank r (default 4)")
    p.add_argument("--lora-blocks", type=int, default=1, help="lora: adapters on the last L blocks (default 1)")
    p.add_argument("--lora-alpha", type=float, default=4.0, help="lora: update scale alpha/r (default 4)")


def _add_runtime_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: small models on shared cores run fastest single-threaded)")


def _apply_runtime(args: argparse.Namespace) -> None:
    import torch

    if getattr(args, "threads", None):
        if args.threads < 1:
            raise ValueError("--threads: must be >= 1")
        torch.set_num_threads(args.threads)


def _subset_from(args: argparse.Namespace) -> dict:
    return {"kind": args.params, "last_k": args.last_k, "lora_rank": args.lora_rank,
            "lora_blocks": args.lora_blocks, "lora_alpha": args.lora_alpha}


# -- corpus -----------------------------------------------------------------------------------

def _add_corpus(subparsers) -> None:
    corpus = _subcommand(subparsers, "corpus", "Build webdataset corpora with known misalignment.",
                         "ecif-ray corpus build --dataset digits --out /tmp/corpus --noise 0.2")
    actions = corpus.add_subparsers(dest="corpus_command", required=True, parser_class=_Parser)
    p = _subcommand(actions, "build", "Write pretrain/train/val/test shards, truth.parquet and classes.json.",
                    "ecif-ray corpus build --dataset fashion-mnist --out corpus --noise 0.2 "
                    "--noise-kind swap-class --shard-size 1000 --seed 0")
    p.add_argument("--dataset", required=True, choices=["fashion-mnist", "digits", "mnist"])
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--noise", type=float, default=0.0, help="fraction of train pairs made misaligned (default 0)")
    p.add_argument("--noise-kind", default="swap-class", choices=["swap-class", "swap-pair"])
    p.add_argument("--shard-size", type=int, default=1000, help="samples per tar shard (default 1000)")
    p.add_argument("--seed", type=int, default=0)
    for split in ("pretrain", "train", "val", "test"):
        p.add_argument(f"--{split}-size", type=int, default=None, help=f"{split} samples (default: per dataset)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing corpus in --out")
    p.set_defaults(func=_run_corpus_build)


def _run_corpus_build(args: argparse.Namespace) -> int:
    from ecif_ray.data.corpus import CorpusSpec, build_corpus

    spec = CorpusSpec(dataset=args.dataset, out=args.out, noise=args.noise, noise_kind=args.noise_kind,
                      shard_size=args.shard_size, seed=args.seed, pretrain_size=args.pretrain_size,
                      train_size=args.train_size, val_size=args.val_size, test_size=args.test_size,
                      overwrite=args.overwrite)
    print(build_corpus(spec).describe())
    return 0


# -- train ------------------------------------------------------------------------------------

def _add_train(subparsers) -> None:
    p = _subcommand(subparsers, "train", "Fine-tune θ by minimising R(θ) over a fixed segment partition.",
                    "ecif-ray train --train corpus/train --init pre --params heads --segment-size 32 "
                    "--epochs 10 --delta 1e-3 --seed 0 --out ft")
    p.add_argument("--train", required=True, nargs="+", help="training shards: dir, brace pattern, glob, s3://")
    start = p.add_mutually_exclusive_group(required=True)
    start.add_argument("--arch", help="open_clip architecture for a fresh start, e.g. ecif-small or ViT-B-32")
    start.add_argument("--init", help="ecif-ray checkpoint directory to start from")
    p.add_argument("--pretrained", help="with --arch: open_clip pretrained tag or local weights file")
    _add_subset_flags(p)
    p.add_argument("--segment-size", type=int, default=32, help="segment (batch) size B (default 32)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--delta", type=float, default=1e-3, help="δ of R(θ): damping toward θ_0 (default 1e-3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--exclude", help="file of 'shard,key' or 'key' lines (or Parquet) to leave out")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (cosine-decayed)")
    p.add_argument("--segments-per-step", type=int, default=4, help="Adam: segments per step (default 4)")
    p.add_argument("--optimizer", default="adam", choices=["adam", "lbfgs"],
                   help="adam (minibatches of segments) or lbfgs (full batch, tight optimum for small runs)")
    p.add_argument("--logit-scale", type=float, help="fixed logit scale s (default: the model's)")
    p.add_argument("--new-anchor", action="store_true", help="with --init: reset θ_0 to the starting values")
    _add_runtime_flags(p)
    p.add_argument("--out", required=True, help="checkpoint directory to write")
    p.set_defaults(func=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    from ecif_ray.training import TrainConfig, train

    cfg = TrainConfig(train=args.train if len(args.train) > 1 else args.train[0], out=args.out, arch=args.arch,
                      pretrained=args.pretrained, init=args.init, params=_subset_from(args),
                      segment_size=args.segment_size, epochs=args.epochs, delta=args.delta, seed=args.seed,
                      exclude=args.exclude, lr=args.lr, segments_per_step=args.segments_per_step,
                      optimizer=args.optimizer,
                      logit_scale=args.logit_scale, new_anchor=args.new_anchor, device=args.device)
    path = train(cfg)
    print(f"checkpoint written to {path}")
    return 0


# -- eval -------------------------------------------------------------------------------------

def _add_eval(subparsers) -> None:
    p = _subcommand(subparsers, "eval", "Zero-shot test accuracy and validation contrastive loss of a checkpoint.",
                    "ecif-ray eval --ckpt ft --test corpus/test --val corpus/val --json")
    p.add_argument("--ckpt", required=True)
    p.add_argument("--test", required=True, help="labelled test shards (json 'label' per sample)")
    p.add_argument("--val", help="validation pairs: also report val_loss with the engine's fixed batching")
    p.add_argument("--classes", help="classes.json (default: the corpus's, next to --test)")
    _add_runtime_flags(p)
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


# -- entry point ------------------------------------------------------------------------------

COMMANDS: tuple[Callable, ...] = (_add_corpus, _add_train, _add_eval)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ecif-ray", description="ECIF influence scoring of image-text corpora on Ray.")
    subparsers = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for add in COMMANDS:
        add(subparsers)
    return parser


def _field_error(e: ValidationError) -> str:
    err = e.errors()[0]
    # Nested fields (params.lora_rank) are flat flags on the command line (--lora-rank).
    field = str(err["loc"][-1]).replace("_", "-") if err["loc"] else ""
    return f"--{field}: {err['msg']}" if field else err["msg"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        _apply_runtime(args)
        return args.func(args)
    except ValidationError as e:
        print(f"ecif-ray {args.command}: error: {_field_error(e)}", file=sys.stderr)
        return EXIT_BAD_ARGS
    except (ValueError, FileNotFoundError) as e:
        print(f"ecif-ray {args.command}: error: {e}", file=sys.stderr)
        return EXIT_BAD_ARGS


if __name__ == "__main__":
    sys.exit(main())
