"""`ecif-ray` command line.

One module per command (``ecif_ray/cli/<name>.py`` with ``add_parser(subparsers)``); the
command names and flags are a contract other tools rely on: add options, never rename.
Bad arguments exit with status 2 and one line naming the argument.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Mapping, Sequence

from pydantic import ValidationError

from ecif_ray.cli.common import EXIT_BAD_ARGS, Parser, apply_runtime

# Registration order is the order `ecif-ray --help` lists the commands.
COMMAND_MODULES = ("demo", "corpus", "train", "evaluate", "features", "embeddings", "score", "sql", "trace", "report")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="ecif-ray", description="ECIF influence scoring of image-text corpora on Ray.")
    subparsers = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for name in COMMAND_MODULES:
        importlib.import_module(f"ecif_ray.cli.{name}").add_parser(subparsers)
    return parser


def _field_error(e: ValidationError, flags: Mapping[tuple[str, ...], str]) -> str:
    """The first error, named by its flag: the generated flag of the field (``cli.config_flags``),
    else the field's path without params/solver (flat flags: --lora-rank, --tol)."""
    err = e.errors()[0]
    loc = tuple(str(p) for p in err["loc"])
    if loc in flags:
        return f"{flags[loc]}: {err['msg']}"
    field = "-".join(p for p in loc if p not in ("params", "solver")).replace("_", "-")
    return f"--{field}: {err['msg']}" if field else err["msg"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        apply_runtime(args)
        return args.func(args)
    except ValidationError as e:
        print(f"ecif-ray {args.command}: error: {_field_error(e, getattr(args, 'field_flags', {}))}", file=sys.stderr)
        return EXIT_BAD_ARGS
    except (ValueError, FileNotFoundError) as e:
        print(f"ecif-ray {args.command}: error: {e}", file=sys.stderr)
        return EXIT_BAD_ARGS


if __name__ == "__main__":
    sys.exit(main())
