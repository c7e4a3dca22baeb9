"""The benchmark scripts stay runnable: each runs end to end at tiny sizes (digits, ~200 pairs, one
seed, every method) as a subprocess, exactly as a user would start it, and writes finite results."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
TINY = ["--dataset", "digits", "--train-size", "192", "--noise", "0.25", "--kinds", "swap-class", "--seeds", "0",
        "--pretrain-size", "256", "--pretrain-epochs", "4", "--finetune-epochs", "4", "--trak-proj-dim", "64",
        "--curvature-segments", "4"]


# TRAK and EK-FAC come from optional packages (traker, kronfluence); without them those rows are skipped.
OPTIONAL = {"trak": "trak", "trak-reg": "trak", "ekfac": "kronfluence"}
METHODS = [m for m in ("ecif-exact", "ecif-taylor", "ecif-damped", "pos-only", "clip-score", "loss", "tracin", "trak",
                       "trak-reg", "ekfac") if m not in OPTIONAL or importlib.util.find_spec(OPTIONAL[m])]


def run(script: str, *args: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    result = subprocess.run([sys.executable, str(BENCH / script), *args], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, f"{script} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"


def finite(values) -> bool:
    return all(isinstance(v, int | float) and math.isfinite(v) for v in values)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bench-work")


def test_detection_smoke(work: Path, tmp_path: Path) -> None:
    out = tmp_path / "detection"
    run("detection.py", *TINY, "--subsets", "heads", "lora", "--methods", *METHODS, "--work", str(work),
        "--out", str(out))
    payload = json.loads(out.with_suffix(".json").read_text())
    methods = {(r["subset"], r["method"]) for r in payload["rows"]}
    assert {("heads", m) for m in METHODS} == {m for m in methods if m[0] == "heads"}
    assert {("lora", m) for m in METHODS if m != "ekfac"} == {m for m in methods if m[0] == "lora"}
    for r in payload["rows"]:
        assert r["finite"] and finite([r["auroc"], r["average_precision"], r["precision_at_k"], r["seconds"]])
    assert out.with_suffix(".csv").stat().st_size > 0 and out.with_suffix(".png").stat().st_size > 0


def test_removal_smoke(work: Path, tmp_path: Path) -> None:
    out = tmp_path / "removal"
    run("removal.py", *TINY, "--subsets", "heads", "--methods", "ecif-exact", "clip-score", "--work", str(work),
        "--out", str(out))
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert {(r["method"], r["removal"]) for r in rows} == {
        ("none", "none"), ("ecif-exact", "retrain"), ("ecif-edit", "edit"), ("clip-score", "retrain"),
        ("random", "retrain")}
    assert all(finite([r["zero_shot_accuracy"], r["val_loss"], r["seconds"]]) for r in rows)


def test_throughput_smoke(tmp_path: Path) -> None:
    out = tmp_path / "throughput"
    run("throughput_inference.py", "--arch", "ecif-micro", "--segment-size", "16", "--segments", "2", "--rounds", "1",
        "--out", str(out))
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert {r["subset"] for r in rows} == {"heads", "lora"}
    assert all(finite([r["inference_pairs_per_s"], r["scoring_pairs_per_s"], r["ratio"]]) for r in rows)


def test_throughput_gpu_smoke(tmp_path: Path, ray_auth_token: Path) -> None:
    """The GPU script's both halves on CPU at micro size: side by side, then the pipeline on its own Ray."""
    out = tmp_path / "gpu"
    run("throughput_gpu.py", "--device", "cpu", "--arch", "ecif-micro", "--subsets", "heads", "--segment-sizes", "16",
        "--segments", "2", "--rounds", "1", "--pairs", "64", "--shard-size", "32", "--workers", "1",
        "--work", str(tmp_path / "work"), "--out", str(out))
    payload = json.loads(out.with_suffix(".json").read_text())
    assert [(r["subset"], r["device"]) for r in payload["side_by_side"]] == [("heads", "cpu")]
    (run_row,) = payload["pipeline"]
    assert run_row["pairs"] == 64 and run_row["devices"] == ["cpu"]
    assert finite([run_row["pairs_per_s"], run_row["curvature_s"]])
    assert all(w["peak_rss_bytes"] > 0 for w in run_row["memory"]["workers"])
