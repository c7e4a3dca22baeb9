"""benchmarks/scale.py stays runnable: digits at tiny sizes (two corpus prefixes; TRAK and EK-FAC on the
smaller), run as a subprocess exactly as a user would start it. Each pipeline run is a subprocess with its
own ``ray.init`` (~10-15 s here), so the curvature sweep gets no extra size: its table shows the growth run
of the same curvature size (the same code path)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# TRAK and EK-FAC come from optional packages (traker, kronfluence); without them those rows are skipped.
BASELINES = [m for m, package in (("trak", "trak"), ("ekfac", "kronfluence")) if importlib.util.find_spec(package)]
TINY = ["--dataset", "digits", "--sizes", "512", "1024", "--curvature", "4", "--growth-curvature", "4",
        "--max-iter", "30", "--workers", "1", "--baselines", *BASELINES, "--baseline-sizes", "512",
        "--pretrain-size", "128", "--pretrain-epochs", "4", "--finetune-epochs", "4", "--model-train-size", "1024",
        "--trak-proj-dim", "64", "--shard-sizes", "48"]


def finite(values) -> bool:
    return all(isinstance(v, int | float) and math.isfinite(v) for v in values)


def test_scale_smoke(tmp_path: Path) -> None:
    out = tmp_path / "scale"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "scale.py"), *TINY, "--work",
                             str(tmp_path / "work"), "--out", str(out)], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, f"scale.py failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert not [r for r in rows if "error" in r]
    assert {(r["method"], r["study"], r["pairs"], r["curvature_segments"]) for r in rows} == {
        ("ecif", "growth", 512, 4), ("ecif", "growth", 1024, 4), ("ecif", "shard-size", 48, 4),
        *((m, "baseline", 512, None) for m in BASELINES)}
    for r in rows:
        assert finite([r["total_s"], r["process_wall_s"], r["peak_rss_sum_mib"], r["above_floor_sum_mib"]])
        assert r["scored_pairs"] == r["pairs"] and r["peak_rss_sum_mib"] > 0
        if r["method"] == "ecif":
            assert finite([r["pairs_per_s"], r["solve_s"], r["driver_peak_rss_mib"], *r["worker_peak_rss_mib"]])
            assert r["cg_iterations"] > 0 and min(r["worker_peak_rss_mib"]) > 0
        else:
            assert r["finite"] and r["peak_rss_mib"] >= r["floor_rss_mib"] > 0
    assert all(f"### {t}" in result.stdout for t in ("growth", "curvature", "comparison", "shard size"))
    assert "| 4 | 128 |" in result.stdout  # the curvature table: K = 4 segments of 32 pairs
