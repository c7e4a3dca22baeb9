"""Scale: peak RSS as the corpus grows 4×, driver iHVP time vs curvature-sample size, TRAK / EK-FAC alongside.

    .venv/bin/python benchmarks/scale.py                  # Fashion-MNIST + ecif-small, 4096 → 8192 → 16384 pairs
    .venv/bin/python benchmarks/scale.py --dataset digits --sizes 512 1024 --curvature 4 8 \\
        --pretrain-size 128 --pretrain-epochs 4 --finetune-epochs 4 --model-train-size 1024 --trak-proj-dim 64

Three measurements on one fine-tuned checkpoint (heads subset, the cached recipe model of
``common.py``) and one corpus whose train split is cut into growing prefixes of whole shards:

a. corpus growth: the real pipeline (``run_score``: local Ray cluster, 2 single-threaded workers,
   float32) on each prefix; per-worker and driver peak RSS (from the run's manifest: ``VmHWM``),
   pairs/s and seconds per pass. A worker decodes one shard per task, never the corpus, so its peak
   should stay flat;
b. curvature-sample size: the pipeline on the smallest prefix with ``--curvature`` segments each;
   the curvature pass (query gradients + loading the sample + CG on the driver), the CG solve alone,
   its iterations, and the driver's and workers' peak RSS;
c. TRAK and EK-FAC (``baselines/``) on each prefix, in-process on the whole corpus as ``detection.py``
   runs them: data loading and scoring seconds and the process's peak RSS;
d. shard size: one worker on a single shard of ``--shard-sizes`` pairs of real 427×640 JPEGs (the two
   photos scikit-learn ships, 0.8 MB each decoded): a worker streams a shard segment by segment, so
   its peak should stay flat while the decoded shard grows 16× (holding it whole would cost
   pairs × 0.8 MB).

    .venv/bin/python benchmarks/scale.py --studies shard-size --shard-sizes 256 1024 4096

Every run is a fresh subprocess (this script with ``--job``), so each peak is that run's own. Peaks
are ``VmHWM`` (``pipeline.worker.peak_rss_bytes``), not ``ru_maxrss``: a child's ``ru_maxrss``
starts at its parent's RSS at the fork. Much of every peak is the floor of imported libraries
(torch alone is ~0.5 GiB here), so rows also give "peak − floor": for a worker, its peak minus
its peak once the model was loaded; for the driver, minus its peak after imports; for a baseline,
minus its peak after imports and loading the checkpoint. "seconds" is the pipeline's own total
(manifest: worker start-up + curvature pass + scoring, no ``ray.init``) and a baseline's loading +
scoring; "process wall s" is the whole subprocess (interpreter, imports and, for ECIF,
``ray.init``). The machine's 1-minute load average is recorded beside each row (another job on a
2-core box takes a core). Prints markdown tables and writes ``--out`` (.json and .csv).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import (
    DEFAULT_WORK,
    RESULTS,
    corpus,
    finetune,
    machine_notes,
    markdown_table,
    pretrained,
    recipe_for,
    setup_torch,
    write_outputs,
)

MIB = 2**20
NOISE, KIND, SEED, SUBSET = 0.2, "swap-class", 0, "heads"


# ------------------------------------------------------------------------------------------------
# The parent: prepare the model and corpus once, run every measurement in its own subprocess


def main() -> None:
    args = parse_args()
    if args.job:
        run_job(json.loads(args.job))
        return
    started = time.perf_counter()
    ckpt, corpus_dir, shard_urls, shard_size = prepare(args)
    runs = Path(tempfile.mkdtemp(prefix="ecif-scale-"))  # the pipeline's run directories
    try:
        jobs = [j for j in plan_jobs(args, ckpt, corpus_dir, shard_urls, shard_size, runs)
                if j["study"] in args.studies]
        if "shard-size" in args.studies:
            jobs += shard_size_jobs(args, ckpt, corpus_dir, runs)
        rows = measure_all(jobs,
                           Path(args.out).with_suffix(".partial.jsonl"))
    finally:
        shutil.rmtree(runs, ignore_errors=True)
    report(args, rows, time.perf_counter() - started)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="fashion-mnist", choices=["fashion-mnist", "digits"])
    p.add_argument("--sizes", type=int, nargs="+", default=[4096, 8192, 16384],
                   help="training pairs per run: multiples of the recipe's shard size (16 segments)")
    p.add_argument("--growth-curvature", type=int, default=8, help="curvature segments of the corpus-growth runs")
    p.add_argument("--curvature", type=int, nargs="+", default=[8, 16, 32, 64],
                   help="curvature segments of the iHVP runs (on the smallest size)")
    p.add_argument("--baselines", nargs="*", default=["trak", "ekfac"], choices=["trak", "ekfac"])
    p.add_argument("--baseline-sizes", type=int, nargs="*", default=None, help="default: --sizes")
    p.add_argument("--corpus-size", type=int, default=None, help="train pairs of the corpus cut (default: the largest)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--studies", nargs="+", default=["growth", "curvature", "baseline", "shard-size"],
                   choices=["growth", "curvature", "baseline", "shard-size"])
    p.add_argument("--shard-sizes", type=int, nargs="+", default=[256, 1024, 4096],
                   help="pairs in the single shard of the shard-size study")
    p.add_argument("--trak-proj-dim", type=int, default=2048)
    p.add_argument("--max-iter", type=int, default=None, help="CG iteration cap (default: the solver's; smoke tests)")
    p.add_argument("--model-train-size", type=int, default=4000,
                   help="train pairs the checkpoint is fine-tuned on (the cached recipe model)")
    p.add_argument("--pretrain-size", type=int, default=None, help="override the recipe (smoke tests)")
    p.add_argument("--pretrain-epochs", type=int, default=None, help="override the recipe (smoke tests)")
    p.add_argument("--finetune-epochs", type=int, default=None, help="override the recipe (smoke tests)")
    p.add_argument("--work", default=str(DEFAULT_WORK), help="cache of corpora and checkpoints")
    p.add_argument("--out", default=str(RESULTS / "scale"), help="output stem (.json and .csv)")
    p.add_argument("--job", help=argparse.SUPPRESS)  # internal: one measurement, as JSON
    return p.parse_args()


def prepare(args: argparse.Namespace) -> tuple[Path, Path, list[str], int]:
    """The fine-tuned checkpoint (cached), and the corpus whose train prefixes are measured."""
    recipe = recipe_for(args.dataset, args.pretrain_size, args.pretrain_epochs, args.finetune_epochs)
    bad = [n for n in args.sizes + (args.baseline_sizes or []) if n % recipe.shard_size]
    if bad:
        raise SystemExit(f"--sizes: {bad} are not multiples of the shard size {recipe.shard_size}")
    work = Path(args.work)
    model_corpus = corpus(work, recipe, args.model_train_size, NOISE, KIND, SEED)
    init = pretrained(work, recipe, SEED, model_corpus)
    ft = finetune(recipe, model_corpus, init, SUBSET, SEED, work / f"ft-{model_corpus.name}-{SUBSET}")
    big = corpus(work, recipe, args.corpus_size or max(args.sizes + (args.baseline_sizes or [])), NOISE, KIND, SEED)
    shard_urls = [str(p) for p in sorted((big / "train").glob("*.tar"))]
    return ft.final, big, shard_urls, recipe.shard_size


def plan_jobs(args: argparse.Namespace, ckpt: Path, corpus_dir: Path, shard_urls: list[str],
              shard_size: int, runs: Path) -> list[dict]:
    """Growth runs, baselines, then curvature runs (the growth run of the same curvature size is not repeated)."""

    def job(method: str, study: str, size: int, curvature: int | None = None) -> dict:
        name = f"{method}-{size}" + (f"-k{curvature}" if curvature else "")
        return {"method": method, "study": study, "pairs": size, "ckpt": str(ckpt),
                "train": shard_urls[: size // shard_size], "val": str(corpus_dir / "val"),
                "curvature_segments": curvature, "workers": args.workers, "trak_proj_dim": args.trak_proj_dim,
                "max_iter": args.max_iter, "out": str(runs / name)}

    smallest = min(args.sizes)
    sizes = sorted(args.sizes if args.baseline_sizes is None else args.baseline_sizes)
    jobs = [job("ecif", "growth", n, args.growth_curvature) for n in sorted(args.sizes)]
    jobs += [job(m, "baseline", n) for m in args.baselines for n in sizes]
    return jobs + [job("ecif", "curvature", smallest, k) for k in sorted(args.curvature)
                   if k != args.growth_curvature]


def shard_size_jobs(args: argparse.Namespace, ckpt: Path, corpus_dir: Path, runs: Path) -> list[dict]:
    """One single-shard corpus per size, of real photos (large decoded images), scored by one worker."""
    jobs = []
    for n in sorted(args.shard_sizes):
        shard = write_photo_shard(runs / f"photos-{n}" / "photos-000000.tar", n)
        jobs.append({"method": "ecif", "study": "shard-size", "pairs": n, "ckpt": str(ckpt), "train": [str(shard)],
                     "val": str(corpus_dir / "val"), "curvature_segments": args.growth_curvature, "workers": 1,
                     "trak_proj_dim": args.trak_proj_dim, "max_iter": args.max_iter,
                     "out": str(runs / f"ecif-shard-{n}")})
    return jobs


def write_photo_shard(path: Path, pairs: int) -> Path:
    """A webdataset shard of ``pairs`` samples alternating scikit-learn's two sample photos (JPEG)."""
    import io
    import tarfile

    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = []
    for array in load_sample_images().images:
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="JPEG", quality=90)
        photos.append(buffer.getvalue())
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for i in range(pairs):
            for name, data in ((f"{i:08d}.jpg", photos[i % 2]), (f"{i:08d}.txt", b"a photo of a bag.")):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def measure_all(jobs: list[dict], partial: Path) -> list[dict]:
    """Every job in turn; rows are appended to ``partial`` as they come, should the run be cut short."""
    partial.parent.mkdir(parents=True, exist_ok=True)
    partial.write_text("")
    rows = []
    for job in jobs:
        rows.append(measure(job))
        with partial.open("a") as f:
            f.write(json.dumps(rows[-1]) + "\n")
    return rows


def measure(job: dict) -> dict:
    """Run one job in a fresh single-threaded subprocess; its row (or the failure) comes back."""
    print(f"[scale] {job['method']} {job['study']} {job['pairs']} pairs"
          + (f", {job['curvature_segments']} curvature segments" if job["curvature_segments"] else ""), flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--job", json.dumps(job)], env=env, capture_output=True,
                          text=True)
    wall = time.perf_counter() - t0
    base = {k: job[k] for k in ("method", "study", "pairs", "curvature_segments")}
    base |= {"shards": len(job["train"]), "load_avg_before": round(load, 2), "process_wall_s": round(wall, 2)}
    if proc.returncode != 0:
        print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
        return {**base, "error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
    return {**base, **json.loads(Path(job["out"] + ".row.json").read_text())}


# ------------------------------------------------------------------------------------------------
# The child: one measurement


def run_job(job: dict) -> None:
    setup_torch()
    row = ecif_job(job) if job["method"] == "ecif" else baseline_job(job)
    Path(job["out"] + ".row.json").write_text(json.dumps(row))


def ecif_job(job: dict) -> dict:
    """The real pipeline on a fresh local cluster; everything reported comes from its manifest."""
    import ray

    from ecif_ray.config import ScoreConfig
    from ecif_ray.pipeline import run_score
    from ecif_ray.pipeline.worker import peak_rss_bytes

    solver = {"max_iter": job["max_iter"]} if job["max_iter"] else {}
    config = ScoreConfig(ckpt=job["ckpt"], train=job["train"], val=job["val"], out=job["out"], workers=job["workers"],
                         dtype="float32", n_train=job["pairs"], curvature_segments=job["curvature_segments"],
                         solver=solver, progress=False)
    floor = peak_rss_bytes()  # interpreter and libraries, before the run
    ray.init(num_cpus=job["workers"], include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    try:
        m = run_score(config).manifest
    finally:
        ray.shutdown()
    workers = [w["peak_rss_bytes"] / MIB for w in m.memory["workers"]]
    work = [(w["peak_rss_bytes"] - w["ready_peak_rss_bytes"]) / MIB for w in m.memory["workers"]]
    driver = m.memory["driver_peak_rss_bytes"] / MIB
    t = m.timings
    return {"scored_pairs": m.counts["pairs"], "pairs_per_s": m.counts["pairs_per_s"],
            "startup_s": t["startup_s"], "curvature_s": t["curvature_s"], "solve_s": m.solver["seconds"],
            "cg_iterations": m.solver["iterations"], "converged": m.solver["converged"],
            "curvature_pairs": m.curvature["pairs"], "scoring_s": t["scoring_s"], "total_s": t["total_s"],
            "driver_peak_rss_mib": round(driver, 1), "driver_above_floor_mib": round(driver - floor / MIB, 1),
            "worker_peak_rss_mib": [round(w, 1) for w in workers], "worker_peak_rss_max_mib": round(max(workers), 1),
            "worker_above_ready_mib": [round(w, 1) for w in work],
            "peak_rss_sum_mib": round(driver + sum(workers), 1),
            "above_floor_sum_mib": round(driver - floor / MIB + sum(work), 1)}


def baseline_job(job: dict) -> dict:
    """TRAK or EK-FAC on the whole prefix, loaded into memory as ``detection.py`` does."""
    from ecif_ray.data.segments import load_segments
    from ecif_ray.models.checkpoint import load_checkpoint
    from ecif_ray.pipeline.worker import peak_rss_bytes

    t0 = time.perf_counter()
    ckpt = load_checkpoint(job["ckpt"])
    __import__("trak" if job["method"] == "trak" else "kronfluence")
    floor = peak_rss_bytes() / MIB  # interpreter, libraries and the model, before any data
    spec = {"segment_size": ckpt.meta.segment_size, "preprocess": ckpt.bundle.preprocess,
            "tokenizer": ckpt.bundle.tokenizer}
    train, _ = load_segments(job["train"], **spec)
    val, _ = load_segments(job["val"], **spec)
    t1 = time.perf_counter()
    if job["method"] == "trak":
        from baselines.trak import trak_scores

        scores = trak_scores(ckpt, train, val, proj_dim=job["trak_proj_dim"], seed=SEED)
    else:
        from baselines.ekfac import ekfac_scores

        scores = ekfac_scores(ckpt, train, val, seed=SEED)
    t2 = time.perf_counter()
    peak = peak_rss_bytes() / MIB
    return {"scored_pairs": len(scores), "finite": all(math.isfinite(v) for v in scores.values()),
            "load_s": round(t1 - t0, 3), "scores_s": round(t2 - t1, 3), "total_s": round(t2 - t0, 3),
            "pairs_per_s": round(len(scores) / (t2 - t1), 2), "peak_rss_mib": round(peak, 1),
            "floor_rss_mib": round(floor, 1), "peak_rss_sum_mib": round(peak, 1),
            "above_floor_sum_mib": round(peak - floor, 1)}


# ------------------------------------------------------------------------------------------------
# Output


def report(args: argparse.Namespace, rows: list[dict], seconds: float) -> None:
    ok = [r for r in rows if "error" not in r]
    tables = {"growth": growth_table(ok), "curvature": curvature_table(ok, args.growth_curvature),
              "comparison": comparison_table(ok), "shard size": shard_size_table(ok)}
    for name, table in tables.items():
        print(f"\n### {name}\n\n{table}")
    for r in rows:
        if "error" in r:
            print(f"\nFAILED: {r['method']} {r['pairs']} pairs: {r['error']}")
    payload = {"benchmark": "scale", "command": "python benchmarks/scale.py " + " ".join(sys.argv[1:]),
               "args": vars(args), "machine": machine_notes(), "wall_seconds": round(seconds, 1), "rows": rows,
               "tables": tables, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    paths = write_outputs(Path(args.out), payload, rows)
    Path(args.out).with_suffix(".partial.jsonl").unlink(missing_ok=True)
    print("\nwritten: " + ", ".join(map(str, paths)))


def _mib(values: list[float]) -> str:
    return " / ".join(f"{v:.0f}" for v in values)


def growth_table(rows: list[dict]) -> str:
    lines = [[r["pairs"], r["shards"], _mib(r["worker_peak_rss_mib"]), _mib(r["worker_above_ready_mib"]),
              f"{r['driver_peak_rss_mib']:.0f}", f"{r['driver_above_floor_mib']:.0f}", f"{r['pairs_per_s']:.0f}",
              f"{r['scoring_s']:.1f}", f"{r['total_s']:.1f}", r["load_avg_before"]]
             for r in rows if r["study"] == "growth"]
    return markdown_table(["pairs", "shards", "worker peak RSS MiB", "worker peak − ready MiB", "driver peak RSS MiB",
                           "driver peak − floor MiB", "pairs/s", "scoring s", "total s", "load avg"], lines)


def shard_size_table(rows: list[dict]) -> str:
    lines = [[r["pairs"], f"{r['pairs'] * 427 * 640 * 3 / MIB:.0f}", _mib(r["worker_peak_rss_mib"]),
              _mib(r["worker_above_ready_mib"]), f"{r['pairs_per_s']:.0f}", f"{r['total_s']:.1f}", r["load_avg_before"]]
             for r in rows if r["study"] == "shard-size"]
    return markdown_table(["pairs in the shard", "decoded shard MiB", "worker peak RSS MiB", "worker peak − ready MiB",
                           "pairs/s", "total s", "load avg"], lines)


def curvature_table(rows: list[dict], growth_curvature: int) -> str:
    smallest = min((r["pairs"] for r in rows if r["study"] in ("growth", "curvature")), default=0)
    chosen = [r for r in rows if r["method"] == "ecif" and r["pairs"] == smallest
              and (r["study"] == "curvature" or r["curvature_segments"] == growth_curvature)]
    lines = [[r["curvature_segments"], r["curvature_pairs"], r["cg_iterations"], f"{r['solve_s']:.2f}",
              f"{r['curvature_s']:.1f}", f"{r['driver_peak_rss_mib']:.0f}", f"{r['driver_above_floor_mib']:.0f}",
              _mib(r["worker_above_ready_mib"]), r["load_avg_before"]]
             for r in sorted(chosen, key=lambda r: r["curvature_segments"])]
    return markdown_table(["curvature segments", "curvature pairs", "CG iterations", "CG solve s", "curvature pass s",
                           "driver peak RSS MiB", "driver peak − floor MiB", "worker peak − ready MiB", "load avg"],
                          lines)


def comparison_table(rows: list[dict]) -> str:
    def per_process(r: dict) -> str:
        if r["method"] != "ecif":
            return f"{r['peak_rss_mib']:.0f}"
        return f"driver {r['driver_peak_rss_mib']:.0f} + workers {_mib(r['worker_peak_rss_mib'])}"

    chosen = [r for r in rows if r["study"] in ("growth", "baseline")]
    lines = [[r["method"] + (f" ({len(r['worker_peak_rss_mib'])} workers, K={r['curvature_segments']})"
                             if r["method"] == "ecif" else ""),
              r["pairs"], f"{r['total_s']:.1f}", f"{r['process_wall_s']:.1f}", per_process(r),
              f"{r['above_floor_sum_mib']:.0f}", r["load_avg_before"]]
             for r in sorted(chosen, key=lambda r: (r["pairs"], r["method"]))]
    return markdown_table(["method", "pairs", "seconds", "process wall s", "peak RSS MiB per process",
                           "Σ peak − floor MiB", "load avg"], lines)


if __name__ == "__main__":
    main()
