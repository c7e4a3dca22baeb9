"""Shared pieces of the benchmarks: recipes, cached corpora/pretraining/fine-tuning, tables, output.

Why a cache: every benchmark needs the same expensive prefix (build a corpus with injected
misalignment → pretrain the small CLIP on the clean pretrain split → fine-tune on the noisy train
split in stages). Those artefacts are keyed by everything that determines them and reused across
scripts and reruns, so a benchmark's measured time is the time of what it measures.

The pretrain split depends only on the corpus seed (not on the noise level or kind), so one
pretrained model per seed serves every noise setting; ``pretrained`` checks that claim by hashing
the pretrain shards of each corpus it is used with.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import hashlib
import json
import os
import platform
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from ecif_ray.data.corpus import CONFUSABLE_SUBSTITUTIONS, CorpusSpec, build_corpus
from ecif_ray.models.checkpoint import read_meta
from ecif_ray.training import TrainConfig, train

RESULTS = Path(__file__).parent / "results"
DEFAULT_WORK = Path(os.environ.get("ECIF_BENCH_WORK", Path.home() / ".cache" / "ecif-ray-bench"))
SUBSETS: dict[str, dict] = {"heads": {"kind": "heads"}, "lora": {"kind": "lora"}}


def setup_torch() -> None:
    """One intra-op thread: on this 2-core shared box 2-thread OpenMP is ~40× slower, and the
    throughput numbers are meant per process/thread anyway."""
    torch.set_num_threads(1)
    with contextlib.suppress(RuntimeError):  # only settable before the first parallel op
        torch.set_num_interop_threads(1)


@dataclass(frozen=True)
class Recipe:
    """How a dataset's model is built: the recipes that work on this machine (README)."""

    dataset: str
    arch: str
    segment_size: int
    pretrain_size: int
    val_size: int
    test_size: int
    pretrain_epochs: int
    pretrain_lr: float
    finetune_epochs: int   # in total, split into ``stages`` equal stages (TracIn checkpoints)
    stages: int
    finetune_lr: dict[str, float] = field(default_factory=dict)  # per subset
    finetune_delta: float = 1e-3

    @property
    def shard_size(self) -> int:
        """A multiple of the segment size: segments never straddle a shard boundary, so the
        sequential batches of a plain DataLoader (kronfluence) are exactly the segments."""
        return 16 * self.segment_size


RECIPES: dict[str, Recipe] = {
    "fashion-mnist": Recipe("fashion-mnist", "ecif-small", segment_size=64, pretrain_size=10000, val_size=500,
                            test_size=2000, pretrain_epochs=5, pretrain_lr=2e-3, finetune_epochs=8, stages=4,
                            finetune_lr={"heads": 5e-3, "lora": 2e-3}),
    "digits": Recipe("digits", "ecif-micro", segment_size=32, pretrain_size=600, val_size=200, test_size=397,
                     pretrain_epochs=40, pretrain_lr=3e-3, finetune_epochs=20, stages=4,
                     finetune_lr={"heads": 5e-3, "lora": 5e-3}),
}


def recipe_for(dataset: str, pretrain_size: int | None = None, pretrain_epochs: int | None = None,
               finetune_epochs: int | None = None) -> Recipe:
    """The dataset's recipe with optional overrides (the smoke test shrinks everything)."""
    base = RECIPES[dataset]
    changes = {k: v for k, v in (("pretrain_size", pretrain_size), ("pretrain_epochs", pretrain_epochs),
                                 ("finetune_epochs", finetune_epochs)) if v is not None}
    return Recipe(**{**asdict(base), **changes})


# ------------------------------------------------------------------------------------------------
# Cached artefacts


# Systematic noise (kind "substitute"): the demo's substitutions, ``noise`` = fraction of each source class.
SUBSTITUTIONS = CONFUSABLE_SUBSTITUTIONS


def corpus(work: Path, recipe: Recipe, train_size: int, noise: float, kind: str, seed: int) -> Path:
    """A built corpus (reused when its manifest exists)."""
    out = work / f"corpus-{recipe.dataset}-p{recipe.pretrain_size}-n{train_size}-{kind}-{noise:g}-s{seed}"
    if not (out / "corpus.json").exists():
        build_corpus(CorpusSpec(dataset=recipe.dataset, out=out, noise=noise, noise_kind=kind,
                                shard_size=recipe.shard_size, seed=seed, pretrain_size=recipe.pretrain_size,
                                train_size=train_size, val_size=recipe.val_size, test_size=recipe.test_size,
                                substitutions=SUBSTITUTIONS[recipe.dataset] if kind == "substitute" else (),
                                overwrite=True), progress=False)
    return out


def split_hash(corpus_dir: Path, split: str = "pretrain") -> str:
    """sha256 over a split's shard bytes, in order."""
    digest = hashlib.sha256()
    for path in sorted((corpus_dir / split).glob("*.tar")):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive advisory lock (fcntl) held for the block."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def pretrained(work: Path, recipe: Recipe, seed: int, corpus_dir: Path) -> Path:
    """The model pretrained (all parameters) on the clean pretrain split, once per seed.

    Raises if ``corpus_dir``'s pretrain split differs from the one the model was trained on."""
    out = work / f"pretrained-{recipe.dataset}-p{recipe.pretrain_size}-e{recipe.pretrain_epochs}-s{seed}"
    digest = split_hash(corpus_dir)
    stamp = out / "pretrain_split.sha256"
    with locked(out.with_name(out.name + ".lock")):  # concurrent benchmark runs share the cache
        if not stamp.exists():
            train(TrainConfig(train=str(corpus_dir / "pretrain"), arch=recipe.arch, params={"kind": "all"},
                              segment_size=recipe.segment_size, epochs=recipe.pretrain_epochs, lr=recipe.pretrain_lr,
                              delta=1e-4, segments_per_step=1, seed=seed, out=str(out), progress=False))
            stamp.write_text(digest)
    if stamp.read_text() != digest:
        raise RuntimeError(f"{corpus_dir}/pretrain differs from the split {out} was pretrained on")
    return out


@dataclass
class FineTune:
    """A staged fine-tuning run: one checkpoint per stage (the last is θ̂)."""

    stages: list[Path]
    stage_lrs: list[float]  # mean learning rate over each stage (cosine schedule from lr to 0)
    seconds: float          # wall time of all stages (from the checkpoints' metadata)

    @property
    def final(self) -> Path:
        return self.stages[-1]


def finetune(recipe: Recipe, corpus_dir: Path, init: Path, subset: str, seed: int, out: Path,
             exclude: Path | None = None) -> FineTune:
    """Fine-tune ``subset`` on the train split in ``recipe.stages`` stages, each warm-started from
    the previous stage's checkpoint (same subset ⇒ same anchor θ_0, so the stages minimise the
    same R(θ)). Stages are what TracIn needs; retraining uses the identical recipe."""
    epochs = recipe.finetune_epochs // recipe.stages
    lr = recipe.finetune_lr[subset]
    stages: list[Path] = []
    previous = init
    with locked(out.with_name(out.name + ".lock")):
        for stage in range(recipe.stages):
            path = out / f"stage{stage}"
            if not (path / "ecif.json").exists():
                train(TrainConfig(train=str(corpus_dir / "train"), init=str(previous), params=SUBSETS[subset],
                                  segment_size=recipe.segment_size, epochs=epochs, lr=lr,
                                  delta=recipe.finetune_delta, segments_per_step=1, seed=seed + 1000 * stage,
                                  exclude=str(exclude) if exclude else None, out=str(path), progress=False))
            stages.append(path)
            previous = path
    seconds = sum(float(read_meta(p).training["wall_time_s"]) for p in stages)
    return FineTune(stages=stages, stage_lrs=[lr / 2] * len(stages), seconds=seconds)


def train_truth(corpus_dir: Path) -> dict[tuple[str, str], bool]:
    """(shard, key) → misaligned, for the train split."""
    table = pq.read_table(corpus_dir / "truth.parquet", columns=["shard", "key", "split", "misaligned"])
    rows = table.to_pylist()
    return {(r["shard"], r["key"]): bool(r["misaligned"]) for r in rows if r["split"] == "train"}


# ------------------------------------------------------------------------------------------------
# Timing, aggregation, output


@contextlib.contextmanager
def timed(into: dict, name: str) -> Iterator[None]:
    """Add the block's wall time (seconds) to ``into[name]``."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        into[name] = into.get(name, 0.0) + time.perf_counter() - t0


def machine_notes() -> dict:
    """What the numbers were measured on (contention matters on this shared box)."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"python": sys.version.split()[0], "torch": torch.__version__, "platform": platform.platform(),
            "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "loadavg_at_end": load}


def aggregate(rows: Sequence[dict], group: Sequence[str], metrics: Sequence[str]) -> list[dict]:
    """Mean and std (over seeds) of each metric per group, in first-seen group order."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(r[g] for g in group), []).append(r)
    out = []
    for key, members in groups.items():
        entry = dict(zip(group, key, strict=True))
        entry["n"] = len(members)
        for m in metrics:
            values = np.array([r[m] for r in members if r.get(m) is not None], dtype=float)
            entry[f"{m}_mean"] = float(values.mean()) if values.size else None
            entry[f"{m}_std"] = float(values.std(ddof=1)) if values.size > 1 else 0.0
        out.append(entry)
    return out


def pm(entry: dict, metric: str, digits: int = 3) -> str:
    """'mean ± std' for a table cell."""
    mean = entry.get(f"{metric}_mean")
    if mean is None:
        return "n/a"
    return f"{mean:.{digits}f} ± {entry[f'{metric}_std']:.{digits}f}"


def markdown_table(header: Sequence[str], lines: Sequence[Sequence[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in line) + " |" for line in lines]
    return "\n".join(out)


def included_rows(paths: Sequence[str], rows: Sequence[dict], identity: Sequence[str]) -> list[dict]:
    """Rows of earlier runs' JSON outputs (``--include``) followed by ``rows``; a row of this run
    replaces an earlier one with the same identity. Lets a grid be run in pieces (e.g. one process
    per subset on a contended machine) and reported as one table."""
    merged: dict[tuple, dict] = {}
    for path in paths:
        for row in json.loads(Path(path).read_text())["rows"]:
            merged[tuple(row.get(k) for k in identity)] = row
    for row in rows:
        merged[tuple(row.get(k) for k in identity)] = row
    return list(merged.values())


def write_table_result(out: str | Path, args: object, rows: Sequence[dict], table: str) -> Path:
    """Print ``table`` and write ``<out>.json`` with the arguments, the machine, the rows and the table."""
    print(table)
    path = Path(out).with_suffix(".json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"args": vars(args), "machine": machine_notes(), "rows": list(rows), "table": table},
                               indent=2))
    print("wrote", path)
    return path


def write_outputs(stem: Path, payload: dict, rows: Sequence[dict]) -> list[Path]:
    """``stem.json`` (everything) and ``stem.csv`` (the per-run rows)."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    json_path, csv_path = stem.with_suffix(".json"), stem.with_suffix(".csv")
    json_path.write_text(json.dumps(payload, indent=2, default=str))
    fields = sorted({k for r in rows for k in r})
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return [json_path, csv_path]


def add_method_flags(p) -> None:
    """Flags shared by detection.py and removal.py: how each method is run and where the cache is."""
    p.add_argument("--curvature-segments", type=int, default=None,
                   help="curvature sample size (default: the engine's, every segment up to the memory cap)")
    p.add_argument("--trak-proj-dim", type=int, default=2048)
    p.add_argument("--damped-delta", type=float, default=0.1, help="analysis damping δ of the ecif-damped method")
    p.add_argument("--trak-lambda", type=float, default=1.0, help="λ of the trak-reg method")
    p.add_argument("--pretrain-size", type=int, default=None, help="override the recipe (smoke tests)")
    p.add_argument("--pretrain-epochs", type=int, default=None, help="override the recipe (smoke tests)")
    p.add_argument("--finetune-epochs", type=int, default=None, help="override the recipe (smoke tests)")
    p.add_argument("--work", default=str(DEFAULT_WORK), help="cache of corpora and checkpoints")
    p.add_argument("--include", nargs="*", default=[], help="earlier outputs (.json) whose rows join the tables")


GRID_IDENTITY = ("dataset", "train_size", "subset", "noise_kind", "noise", "seed", "method")


def run_grid(args, label: str, run_setting, identity: Sequence[str] = ()) -> tuple[Recipe, list[dict]]:
    """The recipe the flags select and the rows of ``run_setting(args, recipe, seed, noise, kind,
    subset)`` over the grid, joined by the rows of the ``--include`` outputs (rows of the same
    setting, by ``GRID_IDENTITY`` + ``identity``, come from this run)."""
    recipe = recipe_for(args.dataset, args.pretrain_size, args.pretrain_epochs, args.finetune_epochs)
    rows = grid_rows(args, label, lambda *setting: run_setting(args, recipe, *setting))
    return recipe, included_rows(args.include, rows, [*GRID_IDENTITY, *identity])


def grid_rows(args, label: str, run_setting) -> list[dict]:
    """Run ``run_setting(seed, noise, kind, subset)`` over the grid the flags select."""
    rows: list[dict] = []
    for seed in args.seeds:
        for kind in args.kinds:
            for noise in args.noise:
                for subset in args.subsets:
                    print(f"[{label}] seed {seed} {kind} {noise:.0%} {subset}", flush=True)
                    rows += run_setting(seed, noise, kind, subset)
    return rows
