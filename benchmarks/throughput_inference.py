"""Scoring-pass throughput vs plain open_clip embedding inference, side by side (issue 5, item 4).

The claim (docs/method.md §4): per-pair scoring is ~ a forward pass plus a JVP, so it should run near
embedding-inference speed. Measured here on one process and one thread, same model, same batch
(= segment) size, same synthetic pairs, in float32 (and optionally float64):

  inference   with torch.no_grad(): model.encode_image(images); model.encode_text(tokens)
              (open_clip's normal inference path, fused attention kernels allowed)
  scoring     ecif_ray.influence.scoring.score_segment(task, batch, directions) — the JVP of S
              along Q solved directions (math attention, forward-mode AD) plus the closed forms

A third column times the scoring pass's primal part alone (S(θ) through functional_call with the
math attention kernels that forward-mode AD requires), to show how much of the gap is the kernel
choice rather than the JVP. Rounds alternate the passes (inference, scoring, forward, inference, ...)
so that load from other processes on this shared machine hits all alike; rates are medians over rounds.
On a GPU (``--device cuda``) the batches sit on the device beforehand and every pass ends with a
synchronize, so the rates are the model's, not the host's (benchmarks/throughput_gpu.py runs this
for ViT-B-32).

    python benchmarks/throughput_inference.py [--subsets heads lora] [--segment-size 64] [--rounds 5]

Writes <out>.json.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import RESULTS, markdown_table, setup_torch, write_table_result

from ecif_ray.data.segments import PairBatch
from ecif_ray.influence.autodiff import forward_ad_attention
from ecif_ray.influence.scoring import score_segment
from ecif_ray.influence.task import InfluenceTask
from ecif_ray.models.checkpoint import logit_scale_of
from ecif_ray.models.factory import create_model
from ecif_ray.models.subsets import ParamSubset

CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot")


def synthetic_batches(bundle, count: int, size: int, dtype: torch.dtype, seed: int = 0) -> list[PairBatch]:
    """Random images at the model's input size and real-looking captions (timing only)."""
    generator = torch.Generator().manual_seed(seed)
    image_size = bundle.model.visual.image_size
    image_size = image_size if isinstance(image_size, tuple) else (image_size, image_size)
    batches = []
    for m in range(count):
        captions = [f"a photo of a {CLASSES[int(i)]}." for i in torch.randint(0, len(CLASSES), (size,),
                                                                             generator=generator)]
        batches.append(PairBatch(
            shard="synthetic", segment=m, keys=[f"{m}-{i}" for i in range(size)], shard_indices=list(range(size)),
            captions=captions, meta=[{} for _ in range(size)],
            images=torch.randn(size, 3, *image_size, generator=generator).to(dtype),
            tokens=bundle.tokenizer(captions)))
    return batches


def finished(device: torch.device) -> float:
    """perf_counter once the device's queued work is done (CUDA kernels run asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def inference_pass(model, batches: list[PairBatch]) -> float:
    device = batches[0].images.device
    t0 = finished(device)
    with torch.no_grad():
        for b in batches:
            model.encode_image(b.images)
            model.encode_text(b.tokens)
    return finished(device) - t0


def math_forward_pass(task: InfluenceTask, batches: list[PairBatch]) -> float:
    """The scoring pass's primal part alone: S(θ) via functional_call with the math attention kernels
    that forward-mode AD needs (separates the kernel choice from the JVP's own cost)."""
    t0 = finished(task.device)
    with torch.no_grad(), forward_ad_attention():
        for b in batches:
            task.similarity_fn(b)(task.params)
    return finished(task.device) - t0


def scoring_pass(task: InfluenceTask, batches: list[PairBatch], directions: torch.Tensor) -> float:
    t0 = finished(task.device)
    for b in batches:
        score_segment(task, b, directions)  # ends with the scores' copy to the host: synchronous
    return finished(task.device) - t0


def measure(arch: str, subset: str, dtype: torch.dtype, segment_size: int, segments: int, rounds: int,
            queries: int, device: str = "cpu") -> dict:
    """Median pairs/s of both passes over alternating rounds (after one warm-up round each)."""
    torch.manual_seed(0)
    bundle = create_model(arch)
    ParamSubset(kind=subset).apply(bundle.model)
    bundle.model.to(device=device, dtype=dtype).eval()
    batches = [b.to(device) for b in synthetic_batches(bundle, segments, segment_size, dtype)]
    pairs = segments * segment_size
    task = InfluenceTask(bundle=bundle, subset=ParamSubset(kind=subset), logit_scale=logit_scale_of(bundle.model),
                         delta=1e-3, n_train=pairs)
    directions = torch.randn(queries, task.dim, dtype=dtype, generator=torch.Generator().manual_seed(1)).to(device)
    inference_pass(bundle.model, batches[:1])
    scoring_pass(task, batches[:1], directions)
    inference, scoring, forward = [], [], []
    for _ in range(rounds):
        inference.append(pairs / inference_pass(bundle.model, batches))
        scoring.append(pairs / scoring_pass(task, batches, directions))
        forward.append(pairs / math_forward_pass(task, batches))
    inf, sco = statistics.median(inference), statistics.median(scoring)
    return {"arch": arch, "subset": subset, "device": device, "dtype": str(dtype).removeprefix("torch."),
            "segment_size": segment_size,
            "queries": queries, "theta_dim": task.dim, "pairs_per_round": pairs, "rounds": rounds,
            "inference_pairs_per_s": inf, "scoring_pairs_per_s": sco, "ratio": sco / inf,
            "math_forward_pairs_per_s": statistics.median(forward),
            "inference_rounds": inference, "scoring_rounds": scoring, "math_forward_rounds": forward}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="ecif-small")
    p.add_argument("--subsets", nargs="+", default=["heads", "lora"], choices=["heads", "lora", "all"])
    p.add_argument("--dtypes", nargs="+", default=["float32"], choices=["float32", "float64"])
    p.add_argument("--segment-size", type=int, default=64)
    p.add_argument("--segments", type=int, default=16, help="segments per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--queries", type=int, default=1, help="solved directions scored at once (Q)")
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda)")
    p.add_argument("--out", default=str(RESULTS / "throughput_inference"), help="output stem (.json)")
    return p.parse_args(argv)


def rate_table(rows: list[dict]) -> str:
    return markdown_table(
        ["arch", "subset", "device", "dtype", "segment", "Q", "inference pairs/s", "scoring pairs/s", "ratio",
         "math-attention forward pairs/s"],
        [[r["arch"], r["subset"], r["device"], r["dtype"], r["segment_size"], r["queries"],
          f"{r['inference_pairs_per_s']:.0f}", f"{r['scoring_pairs_per_s']:.0f}", f"{r['ratio']:.2f}",
          f"{r['math_forward_pairs_per_s']:.0f}"] for r in rows])


def main(argv: list[str] | None = None) -> None:
    setup_torch()
    args = parse_args(argv)
    rows = [measure(args.arch, subset, getattr(torch, dtype), args.segment_size, args.segments, args.rounds,
                    args.queries, args.device)
            for dtype in args.dtypes for subset in args.subsets]
    table = rate_table(rows)
    write_table_result(args.out, args, rows, table)


if __name__ == "__main__":
    main()
