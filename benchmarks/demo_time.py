"""`ecif-ray demo` wall time, this tree against an earlier release, side by side in one run.

Each version runs the demo cold in its own work directory and its own subprocess (corpus,
pretraining, fine-tuning, the scoring job on a local Ray cluster with 2 workers, the report); the
rows give the demo's own per-step timings (``demo_summary.json``) and its detection numbers. The
earlier release runs from a temporary git worktree, so its modules never mix with these.

    python benchmarks/demo_time.py [--before 0add6a6]

Writes <out>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import RESULTS, markdown_table, write_table_result

REPO = Path(__file__).resolve().parents[1]


def run_demo(tree: Path, workdir: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "from ecif_ray.cli import main; raise SystemExit(main())", "demo",
                    "--workdir", str(workdir)], env=env, check=True, capture_output=True, text=True)
    summary = json.loads((workdir / "demo_summary.json").read_text())
    return {"process_wall_s": round(time.perf_counter() - t0, 1), **summary}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--before", default="0add6a6", help="git ref of the earlier release")
    p.add_argument("--out", default=str(RESULTS / "demo_time"))
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="ecif-demo-time-") as tmp:
        tree = Path(tmp) / "before"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(tree), args.before], check=True,
                       capture_output=True)
        try:
            for name, source in ((f"before ({args.before})", tree), ("after", REPO)):
                row = {"version": name, **run_demo(source, Path(tmp) / f"work-{len(rows)}")}
                rows.append(row)
                print(f"  {name:18} {row['wall_time_s']:7.1f} s  (score step {row['timings']['score_s']:.1f} s)",
                      flush=True)
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)], check=False)
    steps = ("corpus_s", "pretrain_s", "finetune_s", "score_s")
    table = markdown_table(
        ["version", *steps, "demo wall s", "process wall s", "ECIF AUROC"],
        [[r["version"], *(f"{r['timings'][s]:.1f}" for s in steps), f"{r['wall_time_s']:.1f}",
          f"{r['process_wall_s']:.1f}", f"{next(iter(r['detection'].values()))['auroc']:.3f}"] for r in rows])
    write_table_result(args.out, args, rows, table)


if __name__ == "__main__":
    main()
