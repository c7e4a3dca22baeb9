"""`ecif-ray corpus build`: webdataset corpora with known misalignment."""

from __future__ import annotations

import argparse

from ecif_ray.cli.common import Parser, subcommand


def add_parser(subparsers) -> None:
    corpus = subcommand(subparsers, "corpus", "Build webdataset corpora with known misalignment.",
                         "ecif-ray corpus build --dataset digits --out /tmp/corpus --noise 0.2")
    actions = corpus.add_subparsers(dest="corpus_command", required=True, parser_class=Parser)
    p = subcommand(actions, "build", "Write pretrain/train/val/test shards, truth.parquet and classes.json.",
                    "ecif-ray corpus build --dataset fashion-mnist --out corpus --noise 0.2 "
                    "--noise-kind swap-class --shard-size 1000 --seed 0")
    p.add_argument("--dataset", required=True, choices=["fashion-mnist", "digits", "mnist"])
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--noise", type=float, default=0.0, help="fraction of train pairs made misaligned (default 0); "
                   "with --noise-kind substitute: the fraction of each source class's train pairs")
    p.add_argument("--noise-kind", default="swap-class", choices=["swap-class", "swap-pair", "substitute"],
                   help="swap-class: a random other class's caption; swap-pair: captions exchanged between pairs; "
                   "substitute: systematic, source class captioned as target (--substitutions)")
    p.add_argument("--substitutions", type=_substitutions, default=(), metavar="SRC=DST[,SRC=DST...]",
                   help="class-name pairs for --noise-kind substitute, e.g. 'shirt=t-shirt/top,sneaker=sandal'")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per tar shard (default 1000)")
    p.add_argument("--seed", type=int, default=0)
    for split in ("pretrain", "train", "val", "test"):
        p.add_argument(f"--{split}-size", type=int, default=None, help=f"{split} samples (default: per dataset)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing corpus in --out")
    p.set_defaults(func=_run_corpus_build)


def _substitutions(text: str) -> tuple[tuple[str, str], ...]:
    pairs = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        source, sep, target = item.partition("=")
        if not sep or not source.strip() or not target.strip():
            raise argparse.ArgumentTypeError(f"{item!r} is not SRC=DST")
        pairs.append((source.strip(), target.strip()))
    return tuple(pairs)


def _run_corpus_build(args: argparse.Namespace) -> int:
    from ecif_ray.data.corpus import CorpusSpec, build_corpus

    spec = CorpusSpec(dataset=args.dataset, out=args.out, noise=args.noise, noise_kind=args.noise_kind,
                      shard_size=args.shard_size, seed=args.seed, pretrain_size=args.pretrain_size,
                      train_size=args.train_size, val_size=args.val_size, test_size=args.test_size,
                      overwrite=args.overwrite, substitutions=args.substitutions)
    print(build_corpus(spec).describe())
    return 0
