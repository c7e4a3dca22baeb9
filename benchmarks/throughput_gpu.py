"""The scoring pass on a GPU at a realistic model size (issue 5, item 5): ViT-B-32, random init.

Two measurements in one run, both on whatever accelerator the machine has (``--device cuda``):

1. *Side by side, one process*: open_clip embedding inference vs the scoring pass (JVP along one
   solved direction + the closed forms), same model, same segments, same synthetic pairs already on
   the device (``throughput_inference.measure``), per parameter subset and segment size.
2. *The real pipeline*: synthetic webdataset shards (smooth random JPEGs, captions from templates)
   and a random-init checkpoint written here, scored by ``run_score`` on a local Ray cluster whose
   actors hold GPUs (``num_gpus_per_worker`` = 1 / workers). pairs/s is the manifest's scoring pass
   (read + JPEG decode + preprocessing on the actor's CPU thread + JVP scoring + Parquet writes).
   The curvature sample and solver are deliberately tiny (the weights are random, so the scores'
   values mean nothing here; the solve is measured by benchmarks/scale.py).

    python benchmarks/throughput_gpu.py --device cuda                      # ViT-B-32, as reported
    python benchmarks/throughput_gpu.py --device cpu --arch ecif-micro \\
        --segment-sizes 16 --segments 2 --rounds 1 --pairs 64 --shard-size 32 --workers 1   # smoke

Writes <out>.json and prints the tables.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from common import RESULTS, machine_notes, markdown_table
from PIL import Image
from throughput_inference import CLASSES, measure, rate_table
from webdataset import TarWriter

from ecif_ray.config import ScoreConfig, SolverConfig
from ecif_ray.models.checkpoint import CheckpointMeta, logit_scale_of, save_checkpoint
from ecif_ray.models.factory import create_model
from ecif_ray.models.subsets import ParamSubset

TEMPLATES = ("a photo of a {}.", "a blurry photo of a {}.", "a close-up photo of the {}.",
             "a {} on a white background.")


def synthetic_image(rng: np.random.Generator, size: int) -> bytes:
    """A smooth random colour field as a JPEG: decodes like a photo (unlike white noise, which
    compresses ~10× worse and would make the benchmark about JPEG decoding)."""
    coarse = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    image = Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def write_shards(out: Path, pairs: int, shard_size: int, image_size: int, seed: int) -> Path:
    """``pairs`` image–text pairs in webdataset shards of ``shard_size`` (.jpg + .txt members)."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for shard in range(-(-pairs // shard_size)):
        with TarWriter(str(out / f"{shard:05d}.tar"), encoder=False) as writer:
            for i in range(shard * shard_size, min(pairs, (shard + 1) * shard_size)):
                caption = TEMPLATES[i % len(TEMPLATES)].format(CLASSES[int(rng.integers(len(CLASSES)))])
                writer.write({"__key__": f"{i:08d}", "jpg": synthetic_image(rng, image_size),
                              "txt": caption.encode()})
    return out


def random_checkpoint(out: Path, arch: str, subset: str, segment_size: int, n_pairs: int) -> Path:
    """A random-init model saved as an ecif-ray checkpoint, θ_0 = its initial θ (timing only)."""
    torch.manual_seed(0)
    bundle = create_model(arch)
    params = ParamSubset(kind=subset)
    params.apply(bundle.model)
    meta = CheckpointMeta(arch=arch, param_subset=params, logit_scale=logit_scale_of(bundle.model), delta=1e-3,
                          segment_size=segment_size, training={"n_pairs": n_pairs, "note": "random init (benchmark)"})
    return save_checkpoint(out, bundle, meta, params.initial_anchor(bundle.model))


def side_by_side(args: argparse.Namespace) -> list[dict]:
    return [measure(args.arch, subset, torch.float32, size, args.segments, args.rounds, 1, args.device)
            for subset in args.subsets for size in args.segment_sizes]


def pipeline_runs(args: argparse.Namespace, work: Path) -> Iterator[dict]:
    """Score the synthetic shards with each worker count; one local Ray cluster for all runs."""
    import ray

    from ecif_ray.pipeline import run_score

    segment = max(args.segment_sizes)
    image_size = 256 if args.arch.startswith("ViT") else 32
    train = write_shards(work / "train", args.pairs, args.shard_size, image_size, seed=0)
    val = write_shards(work / "val", 2 * segment, segment, image_size, seed=1)
    ray.init(include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    try:
        gpus = ray.cluster_resources().get("GPU", 0.0)
        for subset in args.subsets:
            ckpt = random_checkpoint(work / f"ckpt-{subset}", args.arch, subset, segment, args.pairs)
            for workers in args.workers:
                out = work / f"run-{subset}-{workers}w"
                shutil.rmtree(out, ignore_errors=True)
                config = ScoreConfig(
                    ckpt=str(ckpt), train=str(train), val=str(val), out=str(out), workers=workers,
                    num_gpus_per_worker=gpus / workers if gpus else 0, threads_per_worker=args.threads_per_worker,
                    dtype="float32", progress=False,
                    curvature_segments=args.curvature_segments, curvature_shards=args.curvature_segments,
                    solver=SolverConfig(nystrom_rank=args.nystrom_rank, max_iter=args.max_iter, tol=1e-3, chunk=4))
                t0 = time.perf_counter()
                manifest = run_score(config).manifest
                yield {"arch": args.arch, "subset": subset, "workers": workers,
                       "threads_per_worker": args.threads_per_worker,
                       "gpus_per_worker": config.num_gpus_per_worker, "segment_size": segment,
                       "pairs": manifest.counts["pairs"], "pairs_per_s": manifest.counts["pairs_per_s"],
                       "scoring_s": manifest.timings["scoring_s"], "startup_s": manifest.timings["startup_s"],
                       "curvature_s": manifest.timings["curvature_s"], "wall_s": time.perf_counter() - t0,
                       "devices": sorted({str(w.get("device")) for w in manifest.workers.get("info", [])}),
                       "memory": manifest.memory}
                shutil.rmtree(out, ignore_errors=True)
    finally:
        ray.shutdown()


def pipeline_table(rows: list[dict]) -> str:
    return markdown_table(
        ["arch", "subset", "workers", "GPU per worker", "threads per worker", "segment", "pairs", "scoring pairs/s",
         "scoring s", "actor start s", "curvature s", "actor devices"],
        [[r["arch"], r["subset"], r["workers"], f"{r['gpus_per_worker']:g}", r.get("threads_per_worker", 1),
          r["segment_size"], r["pairs"],
          f"{r['pairs_per_s']:.0f}", f"{r['scoring_s']:.1f}", f"{r['startup_s']:.1f}", f"{r['curvature_s']:.1f}",
          " ".join(r["devices"])] for r in rows])


def accelerator() -> dict:
    if not torch.cuda.is_available():
        return {"cuda": False}
    props = torch.cuda.get_device_properties(0)
    return {"cuda": True, "name": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
            "torch_cuda": torch.version.cuda}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="ViT-B-32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--subsets", nargs="+", default=["heads", "lora"], choices=["heads", "lora"])
    p.add_argument("--segment-sizes", nargs="+", type=int, default=[64, 256])
    p.add_argument("--segments", type=int, default=8, help="segments per side-by-side round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--pairs", type=int, default=8192, help="synthetic training pairs for the pipeline runs")
    p.add_argument("--shard-size", type=int, default=512)
    p.add_argument("--workers", nargs="+", type=int, default=[1, 4], help="actors per run (sharing the GPUs)")
    p.add_argument("--threads-per-worker", type=int, default=1, help="CPUs per actor (image-decoding threads on GPU)")
    p.add_argument("--curvature-segments", type=int, default=2)
    p.add_argument("--nystrom-rank", type=int, default=8)
    p.add_argument("--max-iter", type=int, default=10)
    p.add_argument("--skip-pipeline", action="store_true")
    p.add_argument("--skip-side-by-side", action="store_true")
    p.add_argument("--work", default=str(RESULTS / "tmp" / "throughput_gpu"))
    p.add_argument("--out", default=str(RESULTS / "throughput_gpu"), help="output stem (.json)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    out = Path(args.out).with_suffix(".json")
    out.parent.mkdir(parents=True, exist_ok=True)
    rates = [] if args.skip_side_by_side else side_by_side(args)
    print(rate_table(rates), flush=True)
    save(out, args, rates, [])
    runs: list[dict] = []
    for row in [] if args.skip_pipeline else pipeline_runs(args, work):
        runs.append(row)
        print(pipeline_table(runs[-1:]), flush=True)
        save(out, args, rates, runs)  # row by row: a run cut short by a time limit keeps what it measured
    print(pipeline_table(runs) if runs else "", "\nwrote", out)


def save(out: Path, args: argparse.Namespace, rates: list[dict], runs: list[dict]) -> None:
    out.write_text(json.dumps({"args": vars(args), "machine": {**machine_notes(), "accelerator": accelerator()},
                               "side_by_side": rates, "pipeline": runs,
                               "tables": [rate_table(rates), pipeline_table(runs) if runs else ""]}, indent=2))


if __name__ == "__main__":
    main()
