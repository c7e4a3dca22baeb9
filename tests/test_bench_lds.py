"""benchmarks/lds.py stays runnable: the LDS benchmark end to end at tiny sizes (digits, micro
model, 64 train pairs, 4 random 5% removals per subset) as a subprocess, writing finite results."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--dataset", "digits", "--train-size", "64", "--seeds", "0", "--subsets", "heads", "lora",
        "--subsets-count", "4", "--pretrain-size", "480", "--pretrain-epochs", "10", "--delta", "1.0"]


def test_lds_smoke(tmp_path: Path) -> None:
    out = tmp_path / "lds"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    command = [sys.executable, str(ROOT / "benchmarks" / "lds.py"), *TINY, "--work", str(tmp_path / "work"),
               "--out", str(out)]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"lds.py failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    payload = json.loads(out.with_suffix(".json").read_text())
    assert {(r["subset"], r["seed"]) for r in payload["rows"]} == {("heads", 0), ("lora", 0)}
    for r in payload["rows"]:
        assert r["n_subsets"] == 4 and r["removed_per_subset"] == round(0.05 * 64)
        values = [r[k] for k in ("lds_ecif", "lds_pos", "slope_ecif", "slope_pos", "grad_norm", "fit_seconds")]
        assert all(math.isfinite(v) for v in values), r
    assert all(len(p["actual"]) == 4 for p in payload["points"])
    assert out.with_suffix(".csv").stat().st_size > 0 and "LDS Pos+Neg" in result.stdout
