"""Shared pieces of the command line: the parser class, common flags."""

from __future__ import annotations

import argparse

EXIT_BAD_ARGS = 2


class Parser(argparse.ArgumentParser):
    """argparse with examples in --help and one-line errors."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_BAD_ARGS, f"{self.prog}: error: {message}\n")


def subcommand(subparsers, name: str, help_text: str, example: str) -> argparse.ArgumentParser:
    return subparsers.add_parser(name, help=help_text, description=help_text, epilog=f"example:\n  {example}",
                                 formatter_class=argparse.RawDescriptionHelpFormatter)


def add_subset_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--params", default="heads", choices=["all", "heads", "lora", "last-k"],
                   help="influence parameter subset θ (default: heads)")
    p.add_argument("--last-k", type=int, default=1, help="last-k: number of final blocks per tower (default 1)")
    p.add_argument("--lora-rank", type=int, default=4, help="lora: adapter rank r (default 4)")
    p.add_argument("--lora-blocks", type=int, default=1, help="lora: adapters on the last L blocks (default 1)")
    p.add_argument("--lora-alpha", type=float, default=4.0, help="lora: update scale alpha/r (default 4)")


def add_runtime_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: small models on shared cores run fastest single-threaded)")


def apply_runtime(args: argparse.Namespace) -> None:
    import torch

    if getattr(args, "threads", None):
        if args.threads < 1:
            raise ValueError("--threads: must be >= 1")
        torch.set_num_threads(args.threads)


def subset_from(args: argparse.Namespace) -> dict:
    return {"kind": args.params, "last_k": args.last_k, "lora_rank": args.lora_rank,
            "lora_blocks": args.lora_blocks, "lora_alpha": args.lora_alpha}


