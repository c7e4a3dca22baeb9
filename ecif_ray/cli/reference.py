"""Render the CLI reference (docs/cli.md) from the parsers themselves, so it cannot drift:
``python -m ecif_ray.cli.reference > docs/cli.md`` (tests/test_readme.py checks it is current)."""

from __future__ import annotations

import argparse
import os

from ecif_ray.cli import build_parser


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def render(width: int = 100) -> str:
    os.environ["COLUMNS"] = str(width)  # argparse wraps help to the terminal width; fix it
    parser = build_parser()
    lines = ["# CLI reference", "", "Generated from the parsers by `python -m ecif_ray.cli.reference`; every command",
             "also prints this with `--help`.", ""]
    for name, sub in _subparsers(parser).items():
        commands = _subparsers(sub) or {None: sub}
        for child, command in commands.items():
            title = f"ecif-ray {name}" + (f" {child}" if child else "")
            lines += [f"## `{title}`", "", "```", command.format_help().rstrip(), "```", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    print(render(), end="")
