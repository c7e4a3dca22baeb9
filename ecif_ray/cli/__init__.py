"""`ecif-ray` command line.

One module per command (``ecif_ray/cli/<name>.py`` with ``add_parser(subparsers)``); the
command names and flags are a contract other tools rely on: add options, never rename.
Bad arguments exit with status 2 and one line naming the argument.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from pydantic import ValidationError

from ecif_ray.cli.common import EXIT_BAD_ARGS, Parser, apply_runtime

# Registration order is the order `ecif-ray --help` lists the commands.
COMMAND_MODULES = ("demo", "corpus", "train", "evaluate", "score", "sql", "trace", "report")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="ecif-ray", description="ECIF influence scoring of image-text corpora on Ray.")
    subparsers = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for name in COMMAND_MODULES:
        importlib.import_module(f"ecif_ray.cli.{name}").add_parser(subparsers)
    return parser


def _field_error(e: ValidationError) -> str:
    err = e.errors()[0]
    # Fields nested in params/solver are flat flags (--lora-rank, --tol); trace.* are --trace-*.
    parts = [str(p) for p in err["loc"] if p not in ("params", "solver")]
    field = "-".join(parts).replace("_", "-")
    return f"--{field}: {err['msg']}" if field else err["msg"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        apply_runtime(args)
        return args.func(args)
    except ValidationError as e:
        print(f"ecif-ray {args.command}: error: {_field_error(e)}", file=sys.stderr)
        return EXIT_BAD_ARGS
    except (ValueError, FileNotFoundError) as e:
        print(f"ecif-ray {args.command}: error: {e}", file=sys.stderr)
        return EXIT_BAD_ARGS


if __name__ == "__main__":
    sys.exit(main())
