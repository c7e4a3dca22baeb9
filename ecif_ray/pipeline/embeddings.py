"""A checkpoint's final embeddings and CLIP scores of every pair of a feature store: ``ecif-ray
embeddings`` calls :func:`run_embeddings`.

The store holds what the frozen trunk outputs; the embeddings are the tail of one checkpoint on top
(for heads: one projection and a normalisation per tower). So this pass reads no image and runs no
trunk: it streams each committed shard of the store through ``InfluenceTask.embeddings``, the very
function every score, curvature product and query gradient is computed with, and writes the shard's
``embeddings`` file (layout and columns: ``tables.feature_store``). ``clip_score`` is s·û·v̂ in the
analysis dtype, the value a run's ``pairs.clip_score`` holds for the same checkpoint; the vectors are
stored as float32 (what filtering and dedup need, at half the bytes).

It runs in the calling process, without Ray: for heads the work is a matrix product per batch and the
pass is bound by reading the store (see BENCHMARKS.md for its rate at a million pairs); lora/last-k
tails run transformer blocks, in the driver too (``--threads`` torch threads, or ``--device cuda``).
Shards whose file is complete are skipped, so a rerun resumes; the store's lease keeps a concurrent
``features`` pass or another embeddings pass out. A shard whose stored features cannot be read is
reported (``failed``, naming the shard and the error; exit 4) and the other shards are written.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from ecif_ray import __version__
from ecif_ray.config import absolute_local
from ecif_ray.data.feature_source import open_task_store, to_trunk_features
from ecif_ray.data.limits import ReadLimits
from ecif_ray.influence.settings import AnalysisDType, resolve_dtype
from ecif_ray.influence.task import InfluenceTask
from ecif_ray.models.checkpoint import checkpoint_fingerprint, load_checkpoint
from ecif_ray.pipeline.prepare import fetch_checkpoint
from ecif_ray.pipeline.results import EXIT_INCOMPLETE, EXIT_OK
from ecif_ray.tables.feature_store import EMBEDDINGS_PARTITION, FeatureStore, open_store
from ecif_ray.tables.lease import RunLease


@dataclass(frozen=True)
class EmbeddingJob:
    """Arguments of ``ecif-ray embeddings`` (flags of the same name; see ``cli.embeddings``)."""

    ckpt: str
    features: str
    batch_size: int = 8192  # pairs per tail call
    dtype: AnalysisDType = "auto"  # must be the store's: it is part of the trunk's fingerprint
    device: str = "cpu"
    storage_options: dict[str, Any] | None = None
    trusted_arch: str | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"--batch-size: must be >= 1, got {self.batch_size}")


@dataclass
class EmbeddingResult:
    store: str
    checkpoint_id: str  # the embeddings table's partition value
    dim: int
    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # complete from an earlier pass
    failed: dict[str, str] = field(default_factory=dict)  # shard -> why its stored features could not be read
    pairs_written: int = 0
    bytes_written: int = 0
    seconds: float = 0.0

    @property
    def pairs_per_s(self) -> float:
        return self.pairs_written / self.seconds if self.seconds else 0.0

    def to_json(self) -> dict[str, Any]:
        return {"store": self.store, "checkpoint_id": self.checkpoint_id, "partition": EMBEDDINGS_PARTITION,
                "dim": self.dim, "shards": len(self.written) + len(self.skipped) + len(self.failed),
                "shards_written": len(self.written), "shards_skipped": len(self.skipped), "failed": self.failed,
                "exit_code": EXIT_INCOMPLETE if self.failed else EXIT_OK, "pairs_written": self.pairs_written,
                "disk_bytes_per_pair": round(self.bytes_written / self.pairs_written, 1) if self.pairs_written else 0,
                "pairs_per_s": round(self.pairs_per_s, 1), "seconds": round(self.seconds, 3)}


def shard_embeddings(task: InfluenceTask, store: FeatureStore, shard: str, batch_size: int) -> dict[str, Any]:
    """One committed shard's rows with the task's embeddings and CLIP scores (``write_embeddings`` columns)."""
    dim = embedding_dim(task)
    ids: dict[str, list] = {"shard": [], "key": [], "caption": []}
    arrays: dict[str, list[np.ndarray]] = {"shard_index": [np.zeros(0, np.int64)],  # empty shards concatenate too
                                           "image_embedding": [np.zeros((0, dim))],
                                           "text_embedding": [np.zeros((0, dim))], "clip_score": [np.zeros(0)]}
    for rows in store.iter_shard(shard, batch_size):
        with torch.no_grad():
            image, text = task.embeddings(to_trunk_features(rows, task.trunk_source, task.device), task.params)
        ids["shard"] += [shard] * len(rows)
        ids["key"] += rows.keys
        ids["caption"] += rows.captions
        for name, values in (("shard_index", rows.shard_index), ("image_embedding", image.cpu().numpy()),
                             ("text_embedding", text.cpu().numpy()),
                             ("clip_score", task.clip_scores(image, text).cpu().numpy())):
            arrays[name].append(values)
    return {**ids, **{name: np.concatenate(parts) for name, parts in arrays.items()}}


def embedding_dim(task: InfluenceTask) -> int:
    """The width of the model's (shared) embedding space."""
    return int(task.bundle.model.visual.output_dim)


def run_embeddings(job: EmbeddingJob) -> EmbeddingResult:
    """Write (or complete) ``job.ckpt``'s embeddings table in the feature store ``job.features``."""
    started = time.perf_counter()
    so = job.storage_options
    checkpoint_dir = fetch_checkpoint(str(absolute_local(job.ckpt)), so)
    ckpt = load_checkpoint(checkpoint_dir, job.device, trusted_arch=job.trusted_arch)
    ckpt.model.to(getattr(torch, resolve_dtype(job.dtype, ckpt.meta.param_subset.kind)))
    # δ and N play no part in embeddings; the task only needs valid ones.
    task = InfluenceTask.from_checkpoint(ckpt, n_train=1, delta=ckpt.meta.delta if ckpt.meta.delta > 0 else 1.0)
    url = str(absolute_local(job.features))
    # The read limits decided which samples became rows, not what a row's features are: take the store's.
    info = open_store(url, so).info()
    assert info is not None  # open_store checked it
    store = open_task_store(url, task, ckpt.meta.arch, so, ReadLimits(**info.identity.get("limits", {})))
    sha256 = checkpoint_fingerprint(checkpoint_dir)
    result = EmbeddingResult(store=store.url, checkpoint_id=sha256[:16], dim=embedding_dim(task))
    lineage = {"checkpoint": job.ckpt, "checkpoint_sha256": sha256, "arch": ckpt.meta.arch,
               "logit_scale": task.logit_scale, "analysis_dtype": str(task.dtype).removeprefix("torch."),
               "store_fingerprint": info.fingerprint, "code_version": __version__}
    with RunLease.acquire(store.files, f"embeddings-{result.checkpoint_id}"):
        store.files.remove_temp_files()
        shards = store.shards()
        for shard in tqdm(shards, desc="embeddings", unit="shard", disable=not job.progress):
            if store.embeddings_complete(result.checkpoint_id, shard):
                result.skipped.append(shard)
                continue
            try:
                columns = shard_embeddings(task, store, shard, job.batch_size)
            except (OSError, ValueError) as exc:  # a damaged or vanished features file: the other shards go on
                result.failed[shard] = f"features: {store.url}: shard {shard}: {type(exc).__name__}: {exc}"
                continue
            record = store.write_embeddings(result.checkpoint_id, shard, columns, lineage)
            result.written.append(shard)
            result.pairs_written += record.rows
            result.bytes_written += store.file_bytes(record.path)
    result.seconds = time.perf_counter() - started
    return result
