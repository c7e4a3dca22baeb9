"""What the trunk cache saves per G·V product at a realistic depth (issue 10's LoRA rows, CPU).

benchmarks/analysis_speed.py measures the whole analysis before/after the trunk cache on ecif-small,
whose towers have three blocks: LoRA's tail (the last block) is a third of the model there, which
caps what caching the trunk can save. This script measures the two costs that decide the ratio, per
segment, for ecif-small and ViT-B-32 side by side in one process (one thread, float32, random init:
timing only, nothing is downloaded):

  trunk forward   ``task.trunk(images, tokens)`` under no_grad: what the release before the cache
                  ran (at least) twice per G·V product — the JVP and the VJP each went through the
                  frozen towers
  tail G·V        ``ggn_product`` on cached trunk features: one G·V product as the solver runs it now

so ``(tail G·V + 2 × trunk forward) / tail G·V`` is a lower bound of the per-product speedup (it
leaves out the cost of differentiating through the trunk, which the old path also paid).

    python benchmarks/tail_cost.py          # ecif-small and ViT-B-32, lora and heads, 16-pair segments

Writes <out>.json.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from common import RESULTS, markdown_table, setup_torch, write_table_result
from throughput_inference import synthetic_batches

from ecif_ray.influence.autodiff import ggn_product
from ecif_ray.influence.task import InfluenceTask
from ecif_ray.models.checkpoint import logit_scale_of
from ecif_ray.models.factory import create_model
from ecif_ray.models.subsets import ParamSubset


def fastest(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def measure(arch: str, subset: str, segment: int, repeats: int) -> dict:
    torch.manual_seed(0)
    bundle = create_model(arch)
    ParamSubset(kind=subset).apply(bundle.model)
    bundle.model.eval()
    [batch] = synthetic_batches(bundle, 1, segment, torch.float32)
    task = InfluenceTask(bundle=bundle, subset=ParamSubset(kind=subset), logit_scale=logit_scale_of(bundle.model),
                         delta=1e-3, n_train=segment)
    vector = task.unflatten(torch.randn(1, task.dim, generator=torch.Generator().manual_seed(1)))
    with torch.no_grad():
        trunk = fastest(lambda: task.trunk(batch.images, batch.tokens), repeats)
    similarity = task.similarity_fn(task.featurize(batch))
    product = fastest(lambda: ggn_product(similarity, task.params, vector), repeats)
    return {"arch": arch, "subset": subset, "theta_dim": task.dim, "trunk": task.split.describe(), "segment": segment,
            "trunk_forward_s": trunk, "tail_gv_s": product, "speedup_lower_bound": (product + 2 * trunk) / product}


def main() -> None:
    setup_torch()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archs", nargs="+", default=["ecif-small", "ViT-B-32"])
    p.add_argument("--subsets", nargs="+", default=["lora", "heads"], choices=["lora", "heads"])
    p.add_argument("--segment", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=str(RESULTS / "tail_cost"))
    args = p.parse_args()
    rows = [measure(arch, subset, args.segment, args.repeats) for arch in args.archs for subset in args.subsets]
    table = markdown_table(
        ["arch", "subset", "θ dim", "cut", "trunk forward s", "tail G·V s", "per-product speedup ≥"],
        [[r["arch"], r["subset"], f"{r['theta_dim']:,}", r["trunk"], f"{r['trunk_forward_s']:.3f}",
          f"{r['tail_gv_s']:.3f}", f"{r['speedup_lower_bound']:.1f}×"] for r in rows])
    write_table_result(args.out, args, rows, table)


if __name__ == "__main__":
    main()
