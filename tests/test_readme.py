"""The README's two commands stay true: CI runs exactly the README's test command, and the
main-job command names a real CLI command. Every command has --help with an example."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ecif_ray.cli import COMMAND_MODULES, build_parser, main

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    return [line.strip() for line in (ROOT / "README.md").read_text().splitlines()
            if line.startswith("    python3 -m venv .venv")]


def test_ci_runs_the_readme_test_command():
    demo, tests = _readme_commands()
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert tests in [line.strip() for line in ci]
    assert demo.endswith(".venv/bin/ecif-ray demo")
    assert demo.split(" && ")[:2] == tests.split(" && ")[:2]  # same install steps


def test_every_command_has_help_with_an_example(capsys):
    parser = build_parser()
    names = set(parser._subparsers._group_actions[0].choices)
    assert {"demo", "corpus", "train", "eval", "score", "sql"} <= names
    assert len(COMMAND_MODULES) == len(names)
    for name in sorted(names):
        argv = [name, "build", "--help"] if name == "corpus" else [name, "--help"]
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 0
        out = capsys.readouterr().out
        assert re.search(r"example:\n  ecif-ray ", out), f"{name} --help has no example"


def test_cli_reference_is_current():
    from ecif_ray.cli.reference import render

    hint = "regenerate: python -m ecif_ray.cli.reference > docs/cli.md"
    assert (ROOT / "docs" / "cli.md").read_text() == render(), hint
