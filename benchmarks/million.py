"""A million pairs on this machine: `ecif-ray features` + `ecif-ray score --features`, 2 workers (issue 14).

The corpus: the 10,000 training pairs of ``detection.py``'s substitution setting (Fashion-MNIST, 40% of
shirts / pullovers / sneakers captioned as their neighbour class: 1,221 misaligned pairs, real images)
re-keyed ``--replicas`` times into shards of 1,000 pairs (distinct keys ``r<replica>-<key>``, the same
bytes otherwise), so a 1M corpus is 1,000 shards. The model: that setting's fine-tuned heads (seed 0).

For each size (``--sizes``, default 100,000 and 1,000,000), each command as its own process (so that
its peak RSS is its own):

  features   ``ecif-ray features --workers 2`` into a fresh store
  score      ``ecif-ray score --features STORE --workers 2 --n-train N`` (val query, misalignment):
             curvature over every pair up to the memory cap, float64 solve, scoring of every pair
  sql        ``ecif-ray sql RUN "SELECT key, misalignment FROM pairs ORDER BY misalignment DESC LIMIT 100"``
  embeddings ``ecif-ray embeddings`` into the store, then ``ecif-ray sql STORE`` for the 100 lowest
             ``clip_score``

``--stages`` picks some of them (without ``features``, the store a ``--keep`` run left is read);
``--curvature-memory-mb`` caps score's curvature sample per worker.

Reported: wall time per stage, bytes per pair of the store and of the run directory, the number of
files, the driver's and the workers' peak RSS (features: the command's and each actor's; score: the
command's and the manifest's), and the top-100 query's time. Nothing here is in the test suite; it
needs ~1 h of this machine at 1M.

    python benchmarks/million.py                         # 100k and 1M
    python benchmarks/million.py --sizes 100000          # a quick look
    python benchmarks/million.py --sizes 100000 1000000 --stages score --curvature-memory-mb 32 --keep \
        --out benchmarks/results/million_capped            # the store kept, the curvature sample capped

Writes <out>.json.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from common import DEFAULT_WORK, RESULTS, corpus, finetune, machine_notes, markdown_table, pretrained, recipe_for

SHARD_PAIRS = 1000
TOP_100 = "SELECT key, misalignment FROM pairs ORDER BY misalignment DESC LIMIT 100"
LOWEST_100 = "SELECT shard, key, caption, clip_score FROM embeddings ORDER BY clip_score LIMIT 100"


def source_samples(train: Path) -> list[list[tuple[str, str, bytes]]]:
    """The source corpus's samples in order, each as its list of (key, member suffix, bytes)."""
    samples: dict[str, list[tuple[str, bytes]]] = {}
    for shard in sorted(train.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, _, suffix = member.name.partition(".")
                data = tar.extractfile(member)
                assert data is not None
                samples.setdefault(key, []).append((suffix, data.read()))
    return [[(key, suffix, data) for suffix, data in members] for key, members in samples.items()]


def build(out: Path, pairs: int, samples: list) -> int:
    """``pairs`` re-keyed samples in shards of SHARD_PAIRS; returns the number of shards (reused when complete)."""
    shards = -(-pairs // SHARD_PAIRS)
    done = out / "BUILT"
    if done.exists() and done.read_text() == str(pairs):
        return shards
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    for s in range(shards):
        with tarfile.open(out / f"million-{s:06d}.tar", "w") as tar:
            for i in range(s * SHARD_PAIRS, min(pairs, (s + 1) * SHARD_PAIRS)):
                replica, members = divmod(i, len(samples))
                for key, suffix, data in samples[members]:
                    info = tarfile.TarInfo(f"r{replica:03d}-{key}.{suffix}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    done.write_text(str(pairs))
    return shards


PEAK = "ecif-bench-peak-rss"
# The peak RSS is read from /proc here, not with pipeline.worker.peak_rss_bytes: importing that module
# (torch, ray) would add seconds to light commands such as `ecif-ray sql`.
RUNNER = ("import sys\nfrom ecif_ray.cli import main\ncode = main(sys.argv[1:])\n"
          "hwm = next(line for line in open('/proc/self/status') if line.startswith('VmHWM:'))\n"
          "print('{peak}', int(hwm.split()[1]) * 1024, file=sys.stderr)\nsys.exit(code)")


def timed_process(args: list[str], env: dict[str, str]) -> tuple[float, int, str]:
    """Run an ``ecif-ray`` command in its own process: (wall seconds, its peak RSS in bytes, its stdout)."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", RUNNER.format(peak=PEAK), *args], env=env, capture_output=True,
                          text=True)
    seconds = time.perf_counter() - start
    if proc.returncode not in (0, 3):
        raise RuntimeError(f"{args[:1]} exited {proc.returncode}: {proc.stderr[-3000:]}")
    peak = next(int(line.split()[1]) for line in proc.stderr.splitlines() if line.startswith(PEAK))
    return seconds, peak, proc.stdout


def directory_stats(path: Path) -> tuple[int, int]:
    files = [p for p in path.rglob("*") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files)


STAGES = ("features", "score", "embeddings")


def run_size(pairs: int, samples: list, ckpt: Path, setting: Path, work: Path, env: dict[str, str],
             stages: tuple[str, ...] = STAGES, curvature_memory_mb: int | None = None) -> dict:
    """The stages for one size; a stage left out uses what an earlier ``--keep`` run left (the store)."""
    shards_dir = work / f"shards-{pairs}"
    t0 = time.perf_counter()
    shards = build(shards_dir, pairs, samples)
    row: dict = {"pairs": pairs, "shards": shards, "build_s": round(time.perf_counter() - t0, 1)}
    shard_files, shard_bytes = directory_stats(shards_dir)
    row.update(shard_bytes_per_pair=round(shard_bytes / pairs, 1), files={"shards": shard_files})
    store, run = work / f"store-{pairs}", work / f"run-{pairs}"
    if "features" in stages:
        row.update(features_stage(shards_dir, store, ckpt, env))
        store_files, store_bytes = directory_stats(store)  # before the embeddings add their own files
        row.update(store_bytes_per_pair=round(store_bytes / pairs, 1))
        row["files"]["store"] = store_files
    if "score" in stages:
        row.update(score_stage(shards_dir, store, run, ckpt, setting, pairs, env, curvature_memory_mb))
        run_files, run_bytes = directory_stats(run)
        row.update(run_bytes_per_pair=round(run_bytes / pairs, 1))
        row["files"]["run"] = run_files
    if "embeddings" in stages:
        row["embeddings"] = embeddings_stage(store, ckpt, env)
    row["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    return row


def features_stage(shards_dir: Path, store: Path, ckpt: Path, env: dict[str, str]) -> dict:
    shutil.rmtree(store, ignore_errors=True)
    seconds, rss, out = timed_process(["features", "--ckpt", str(ckpt), "--train", str(shards_dir), "--out",
                                       str(store), "--workers", "2", "--no-progress", "--json"], env)
    workers = json.loads(out)["worker_peak_rss_bytes"]
    return {"features_s": round(seconds, 1), "features_driver_peak_rss_mib": round(rss / 2**20),
            "features_worker_peak_rss_mib": [round(b / 2**20) for b in workers.values()]}


def score_stage(shards_dir: Path, store: Path, run: Path, ckpt: Path, setting: Path, pairs: int,
                env: dict[str, str], curvature_memory_mb: int | None) -> dict:
    """``ecif-ray score --features`` into a fresh run directory, then the top-100 query over it."""
    shutil.rmtree(run, ignore_errors=True)
    cap = ["--curvature-memory-mb", str(curvature_memory_mb)] if curvature_memory_mb else []
    seconds, rss, _ = timed_process(
        ["score", "--ckpt", str(ckpt), "--train", str(shards_dir), "--val", str(setting / "val"), "--features",
         str(store), "--out", str(run), "--workers", "2", "--n-train", str(pairs), "--no-progress", *cap], env)
    sql_s, _, _ = timed_process(["sql", str(run), TOP_100], env)
    manifest = json.loads((run / "manifest.json").read_text())
    return {"score_s": round(seconds, 1), "sql_top100_s": round(sql_s, 2), "score_timings": manifest["timings"],
            "curvature_memory_mb": curvature_memory_mb, "curvature_pairs": manifest["curvature"].get("pairs"),
            "cg_iterations": manifest["solver"].get("iterations"), "scored_pairs": manifest["counts"]["pairs"],
            "score_driver_peak_rss_mib": round(rss / 2**20),
            "score_worker_peak_rss_mib": [round(w["peak_rss_bytes"] / 2**20) for w in manifest["memory"]["workers"]]}


def embeddings_stage(store: Path, ckpt: Path, env: dict[str, str]) -> dict:
    """``ecif-ray embeddings`` into the store, then the CLIP-score filter query over the view."""
    seconds, rss, out = timed_process(["embeddings", "--ckpt", str(ckpt), "--features", str(store), "--no-progress",
                                       "--json"], env)
    result = json.loads(out)
    sql_s, _, _ = timed_process(["sql", str(store), LOWEST_100], env)
    return {"embeddings_s": round(seconds, 1), "pairs_per_s": result["pairs_per_s"],
            "disk_bytes_per_pair": result["disk_bytes_per_pair"], "peak_rss_mib": round(rss / 2**20),
            "sql_lowest100_s": round(sql_s, 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES,
                   help="what to run; without features the store an earlier --keep run left is used")
    p.add_argument("--curvature-memory-mb", type=int, help="score's cap on the curvature sample per worker")
    p.add_argument("--work", default=str(DEFAULT_WORK))
    p.add_argument("--scratch", default=None, help="where shards, stores and runs go (default: <work>/million)")
    p.add_argument("--keep", action="store_true", help="keep the shards, stores and runs")
    p.add_argument("--out", default=str(RESULTS / "million"))
    args = p.parse_args()
    recipe = recipe_for("fashion-mnist")
    work = Path(args.work)
    setting = corpus(work, recipe, 10000, 0.4, "substitute", 0)
    ckpt = finetune(recipe, setting, pretrained(work, recipe, 0, setting), "heads", 0,
                    work / f"ft-{setting.name}-heads").final
    scratch = Path(args.scratch or work / "million")
    samples = source_samples(setting / "train")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    rows = []
    for size in args.sizes:
        print(f"[million] {size:,} pairs", flush=True)
        rows.append(run_size(size, samples, ckpt, setting, scratch, env, tuple(args.stages), args.curvature_memory_mb))
        print(json.dumps(rows[-1]), flush=True)
        Path(args.out).with_suffix(".json").write_text(json.dumps(
            {"args": vars(args), "machine": machine_notes(), "checkpoint": str(ckpt), "rows": rows}, indent=2))
    if not args.keep:
        shutil.rmtree(scratch, ignore_errors=True)

    def get(row: dict, *path: str) -> str:
        for key in path:
            row = row.get(key, {}) if isinstance(row, dict) else {}
        return "—" if row in ({}, None) else ", ".join(map(str, row)) if isinstance(row, list) else str(row)

    print(markdown_table(
        ["pairs", "features s", "score s", "curvature / scoring s", "top-100 SQL s", "embeddings s",
         "store B/pair", "driver peak MiB (features / score)", "worker peak MiB (features / score)"],
        [[f"{r['pairs']:,}", get(r, "features_s"), get(r, "score_s"),
          f"{get(r, 'score_timings', 'curvature_s')} / {get(r, 'score_timings', 'scoring_s')}",
          get(r, "sql_top100_s"), get(r, "embeddings", "embeddings_s"), get(r, "store_bytes_per_pair"),
          f"{get(r, 'features_driver_peak_rss_mib')} / {get(r, 'score_driver_peak_rss_mib')}",
          f"{get(r, 'features_worker_peak_rss_mib')} / {get(r, 'score_worker_peak_rss_mib')}"] for r in rows]))


if __name__ == "__main__":
    main()
