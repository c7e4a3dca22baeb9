"""`ecif-ray trace`: for each test image the model gets wrong, the training pairs most responsible.

Streams the training shards once (one shard in memory at a time) after solving one direction
per mispredicted example on a fixed curvature sample, and writes the ``trace`` table
(relative-IS, ECIF.md §3) into the run directory, next to a scoring run's tables when the
directory already holds one.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass

import pyarrow as pa

from ecif_ray import __version__
from ecif_ray.data.segments import iter_segments, load_segments
from ecif_ray.data.shards import list_shards
from ecif_ray.evaluation import find_classes
from ecif_ray.influence.engine import ECIF, sample_segments
from ecif_ray.influence.task import InfluenceTask
from ecif_ray.models.checkpoint import checkpoint_fingerprint, load_checkpoint
from ecif_ray.tables.manifest import Manifest, read_manifest, write_manifest
from ecif_ray.tables.store import RunStore


@dataclass(frozen=True)
class TraceSettings:
    top_k: int = 10
    max_examples: int = 20
    rank: int = 128              # eigenpairs of G used for ‖Δθ₋ₙ‖ (exact when ≥ D)
    curvature_segments: int = 32
    curvature_shards: int = 8    # the curvature sample is drawn from the first shards
    seed: int = 0


def run_trace(ckpt: str, train: str | list[str], test: str | list[str], out: str,
              settings: TraceSettings | None = None, storage_options: dict | None = None) -> pa.Table:
    """Trace every mispredicted test example (up to ``max_examples``) back to training pairs."""
    settings = settings or TraceSettings()
    started = time.perf_counter()
    checkpoint = load_checkpoint(ckpt)
    bundle, meta = checkpoint.bundle, checkpoint.meta
    load = {"segment_size": meta.segment_size, "preprocess": bundle.preprocess, "tokenizer": bundle.tokenizer,
            "storage_options": storage_options}
    shards = list_shards(train, storage_options)
    sample_pool, _ = load_segments(shards[: settings.curvature_shards], **load)
    n_train = int(meta.training.get("n_pairs") or 0) or sum(len(b) for b in iter_segments(shards, **load))
    engine = ECIF(InfluenceTask.from_checkpoint(checkpoint, n_train),
                  sample_segments(sample_pool, settings.curvature_segments, settings.seed),
                  segment_size=meta.segment_size)
    test_batches, _ = load_segments(test, **{**load, "segment_size": 256})
    classes = find_classes(test if isinstance(test, str) else test[0], storage_options=storage_options,
                           batches=test_batches)
    table = engine.trace(test_batches, classes, top_k=settings.top_k, max_examples=settings.max_examples,
                         rank=settings.rank, train_batches=iter_segments(shards, **load))
    _write(out, table, ckpt, train, test, settings, storage_options, time.perf_counter() - started)
    return table


def _write(out: str, table: pa.Table, ckpt: str, train, test, settings: TraceSettings,
           storage_options: dict | None, seconds: float) -> None:
    store = RunStore(out, storage_options)
    manifest = read_manifest(store)
    sha = checkpoint_fingerprint(ckpt)
    inputs = {"ckpt_sha256": sha, "train": train, "test": test, "trace": settings.__dict__}
    if manifest is None:  # a trace-only run directory
        digest = hashlib.sha256(repr(sorted(inputs.items())).encode()).hexdigest()
        manifest = Manifest(run_id=digest[:12], status="complete", fingerprint=digest, score_inputs=inputs,
                            config={"ckpt": ckpt, "train": train, "test": test}, checkpoint={"sha256": sha},
                            queries=["trace"], primary_query="trace", code_version=__version__)
    lineage = {"checkpoint_sha256": sha, "code_version": __version__, "trace": settings.__dict__}
    store.write_table("trace", manifest.run_id, "trace", table, lineage)
    manifest.timings = {**manifest.timings, "trace_s": round(seconds, 2)}
    manifest.counts = {**manifest.counts, "trace_rows": table.num_rows,
                       "trace_examples": len(set(table.column("query_id").to_pylist()))}
    write_manifest(store, manifest)

