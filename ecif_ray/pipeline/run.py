"""The driver: validate, resume, curvature pass, scoring pass, manifest, result.

``run_score(config)`` is what ``ecif-ray score`` and ``jobs/score.py`` call. In order:

1. everything that can be checked without a cluster is checked (config, checkpoint loaded once on
   CPU, shard specs, exclusions), so a bad run is refused before any cluster starts;
2. the run directory is opened: a rerun with the same fingerprint resumes (committed shards are
   skipped, saved directions reused); any other fingerprint is refused, naming what changed;
3. only if shards remain: Ray is joined (``address``/``RAY_ADDRESS``) or started locally, the actor
   pool is built, directions are solved (or reused), and the shards are scored;
4. the manifest is finalised and a :class:`ScoreResult` returned; its exit code tells callers
   whether every input was scored (0), some inputs were bad (3) or some shards failed (4).
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

from ecif_ray import __version__
from ecif_ray.config import ScoreConfig, absolute_local, digest
from ecif_ray.data.exclusions import ExclusionSet, read_exclusions
from ecif_ray.data.shards import Shard, list_shards
from ecif_ray.influence.curvature import Directions
from ecif_ray.influence.task import InfluenceTask
from ecif_ray.models.checkpoint import (
    ANCHOR_FILE,
    META_FILE,
    WEIGHTS_FILE,
    CheckpointError,
    checkpoint_fingerprint,
    load_checkpoint,
)
from ecif_ray.pipeline.events import Emitter, Listener, RunFinished, RunStarted
from ecif_ray.pipeline.progress import ProgressDisplay
from ecif_ray.pipeline.worker import peak_rss_bytes
from ecif_ray.tables.manifest import Manifest, now, read_manifest, write_manifest
from ecif_ray.tables.store import RunStore, ShardRecord

EXIT_OK = 0
EXIT_BAD_CONFIG = 2  # refused up front (also what the CLI uses for bad arguments)
EXIT_INPUT_ERRORS = 3  # complete, but some inputs became `errors` rows
EXIT_INCOMPLETE = 4  # some shards could not be scored (see errors stage 'score'); rerun to retry

logger = logging.getLogger(__name__)


class RunMismatch(ValueError):
    """The run directory holds a run made with another configuration or checkpoint."""


@dataclass
class Prepared:
    """A validated run, before any cluster is involved."""

    config: ScoreConfig
    store: RunStore
    shards: list[Shard]
    val: list[Shard]
    test: list[Shard]
    exclude: ExclusionSet | None
    checkpoint_dir: Path
    checkpoint: dict[str, Any]  # sha256, arch, subset, logit scale, delta, segment size, n_train, dim
    score_inputs: dict[str, Any]
    fingerprint: str
    run_id: str


@dataclass
class ScoreResult:
    run_id: str
    out: str
    manifest: Manifest
    exit_code: int
    exit_reason: str
    records: dict[str, ShardRecord]
    failed: dict[str, str] = field(default_factory=dict)
    top: list[dict[str, Any]] = field(default_factory=list)
    directions_reused: bool = False
    retries: int = 0
    worker_failures: int = 0


def run_score(config: ScoreConfig, listeners: Sequence[Listener] = ()) -> ScoreResult:
    """Run (or resume) one scoring job; see the module docstring."""
    started = time.perf_counter()
    prep = prepare(config)
    manifest = open_run(prep)
    emit = Emitter([ProgressDisplay(config.progress), *listeners])
    done = prep.store.completed_shards([s.name for s in prep.shards], prep.fingerprint)
    pending = [s for s in prep.shards if s.name not in done]
    emit(RunStarted(prep.run_id, prep.store.url, len(prep.shards), len(done), resumed=bool(done)))
    passes = PassResult()
    if pending:
        from ecif_ray.pipeline.passes import execute  # Ray is imported only when there is work

        passes = execute(prep, pending, emit)
    result = finish(prep, manifest, done, passes, time.perf_counter() - started)
    emit(RunFinished(result))
    return result


@dataclass
class PassResult:
    """What the cluster part of a run produced (empty when nothing was pending)."""

    records: dict[str, ShardRecord] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    directions: dict[str, Any] = field(default_factory=dict)  # directions.json content
    reused: bool = False
    retries: int = 0
    worker_failures: int = 0
    workers: dict[str, Any] = field(default_factory=dict)
    worker_memory: list[dict[str, Any]] = field(default_factory=list)  # pid, host, peak_rss_bytes per live actor
    timings: dict[str, float] = field(default_factory=dict)
    pairs_scored: int = 0


# -- 1. validation ---------------------------------------------------------------------------------

def prepare(config: ScoreConfig) -> Prepared:
    """Resolve and check everything that needs no cluster; raise ValueError naming the field."""
    so = config.storage_options
    checkpoint_dir = fetch_checkpoint(config.ckpt, so)
    checkpoint = describe_checkpoint(checkpoint_dir, config)
    shards = list_shards(absolute_local(config.train), so)
    val = list_shards(absolute_local(config.val), so) if "val" in config.queries else []
    test = list_shards(absolute_local(config.test), so) if "task" in config.queries or config.trace else []
    exclude = read_exclusions(str(absolute_local(config.exclude)), so) if config.exclude else None
    inputs = config.score_inputs()
    inputs.update(train=[s.name for s in shards], val=[s.name for s in val] or None,
                  test=[s.name for s in test] or None, checkpoint_sha256=checkpoint["sha256"],
                  segment_size=checkpoint["segment_size"], n_train=checkpoint["n_train"], delta=checkpoint["delta"],
                  exclude=_exclusion_digest(exclude))
    fingerprint = digest(inputs)
    store = RunStore(str(absolute_local(config.out)), so)
    return Prepared(config=config, store=store, shards=shards, val=val, test=test, exclude=exclude,
                    checkpoint_dir=checkpoint_dir, checkpoint=checkpoint, score_inputs=inputs,
                    fingerprint=fingerprint, run_id=config.run_id or fingerprint[:12])


def fetch_checkpoint(url: str, storage_options: dict[str, Any] | None) -> Path:
    """A local directory holding the checkpoint (remote checkpoints are downloaded once)."""
    fs, path = url_to_fs(str(absolute_local(url)), **(storage_options or {}))
    if isinstance(fs, LocalFileSystem):
        if not Path(path).is_dir():
            raise FileNotFoundError(f"ckpt: {url}: no such checkpoint directory")
        return Path(path)
    local = Path(tempfile.mkdtemp(prefix="ecif-ckpt-"))
    for name in (META_FILE, WEIGHTS_FILE, ANCHOR_FILE):
        try:
            (local / name).write_bytes(fs.cat_file(f"{path.rstrip('/')}/{name}"))
        except FileNotFoundError as exc:
            raise CheckpointError(f"ckpt: {url}: missing {name}") from exc
    return local


def describe_checkpoint(path: Path, config: ScoreConfig) -> dict[str, Any]:
    """Load the checkpoint once (CPU) to refuse a broken one up front; keep what the run needs."""
    ckpt = load_checkpoint(path)
    meta = ckpt.meta
    n_train = config.n_train or meta.training.get("n_pairs")
    if not n_train:
        raise ValueError("n_train: the checkpoint records no training pair count (training.n_pairs); set n_train")
    # The training δ (the analysis δ follows from config.damping on the driver, after the curvature pass).
    delta = meta.delta
    if delta <= 0:
        if config.damping in ("exact", "auto"):
            raise ValueError("damping: the checkpoint was trained with δ = 0; set damping to a number > 0")
        delta = float(config.damping)
    ckpt.model.to(getattr(torch, config.dtype))
    task = InfluenceTask.from_checkpoint(ckpt, n_train=int(n_train), negative_term=config.negative_term,
                                         delta=delta)
    return {"path": str(config.ckpt), "sha256": checkpoint_fingerprint(path), "arch": meta.arch,
            "param_subset": meta.param_subset.describe(), "logit_scale": meta.logit_scale, "delta": delta,
            "segment_size": config.segment_size or meta.segment_size, "n_train": int(n_train), "dim": task.dim,
            "trunk": task.split.describe(),
            "dtype": config.dtype}


def checkpoint_files(path: Path) -> dict[str, bytes]:
    """The checkpoint's files, shipped to workers through the object store (no shared disk needed)."""
    return {name: (path / name).read_bytes() for name in (META_FILE, WEIGHTS_FILE, ANCHOR_FILE)}


def _exclusion_digest(exclude: ExclusionSet | None) -> str | None:
    if not exclude:
        return None
    return digest({"pairs": sorted(exclude.pairs), "keys": sorted(exclude.keys)})


# -- 2. the run directory ------------------------------------------------------------------------

def open_run(prep: Prepared) -> Manifest:
    """Resume a matching run, refuse a different one, or start a new one; writes the manifest."""
    existing = read_manifest(prep.store)
    if existing is None and not prep.store.is_empty():
        raise RunMismatch(f"out: {prep.store.url} is not empty and holds no manifest.json; "
                          "give a new or empty directory")
    if existing is not None:
        check_same_run(prep, existing)
        prep.run_id = existing.run_id
        manifest = existing
        manifest.status = "running"
    else:
        manifest = Manifest(run_id=prep.run_id, fingerprint=prep.fingerprint, score_inputs=prep.score_inputs,
                            config=prep.config.public_dump(), checkpoint=prep.checkpoint,
                            queries=list(prep.config.queries), primary_query=prep.config.queries[0],
                            code_version=__version__)
    manifest.config = prep.config.public_dump()
    write_manifest(prep.store, manifest)
    return manifest


def check_same_run(prep: Prepared, existing: Manifest) -> None:
    if prep.config.run_id is not None and prep.config.run_id != existing.run_id:
        raise RunMismatch(f"run_id: {prep.store.url} holds run {existing.run_id!r}, not {prep.config.run_id!r}")
    if existing.fingerprint == prep.fingerprint:
        return
    changed = sorted(k for k in {*existing.score_inputs, *prep.score_inputs}
                     if existing.score_inputs.get(k) != prep.score_inputs.get(k))
    details = "; ".join(f"{k}: {_short(existing.score_inputs.get(k))} -> {_short(prep.score_inputs.get(k))}"
                        for k in changed)
    raise RunMismatch(f"out: {prep.store.url} holds run {existing.run_id!r} made with a different configuration "
                      f"or checkpoint (changed {details}); use a new --out, or rerun with the original settings")


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# -- 4. the result ---------------------------------------------------------------------------------

def finish(prep: Prepared, manifest: Manifest, done: dict[str, ShardRecord], passes: PassResult,
           seconds: float) -> ScoreResult:
    records = {**done, **passes.records}
    failed = {k: v for k, v in passes.failed.items() if k not in records}
    by_stage: dict[str, int] = {}
    for record in records.values():
        for stage, n in record.errors_by_stage.items():
            by_stage[stage] = by_stage.get(stage, 0) + n
    if failed:
        by_stage["score"] = by_stage.get("score", 0) + len(failed)
    errors = sum(by_stage.values())
    scoring_s = passes.timings.get("scoring_s", 0.0)
    manifest.counts = {
        "shards": len(prep.shards), "shards_committed": len(records), "shards_scored": len(passes.records),
        "shards_skipped": len(done), "shards_failed": len(failed), "pairs": sum(r.pairs for r in records.values()),
        "errors": errors, "errors_by_stage": by_stage, "pairs_scored_now": passes.pairs_scored,
        "pairs_per_s": round(passes.pairs_scored / scoring_s, 2) if scoring_s else 0.0,
        "retries": passes.retries, "worker_failures": passes.worker_failures,
    }
    if passes.directions:
        manifest.solver = {**passes.directions.get("settings", {}), "iterations": passes.directions["iterations"],
                           "converged": passes.directions["converged"],
                           "relative_residual": passes.directions["relative_residual"],
                           "seconds": passes.directions["seconds"], "reused": passes.reused,
                           "damping": passes.directions.get("damping", {})}
        manifest.curvature = passes.directions.get("curvature", {})
    if passes.records and any(r.trace for r in records.values()):
        manifest.counts["trace_rows"] = write_trace(prep, records.values())
    manifest.timings = {**passes.timings, "total_s": round(seconds, 3)}
    manifest.workers = passes.workers or manifest.workers
    manifest.memory = {"driver_peak_rss_bytes": peak_rss_bytes(),
                       "workers": passes.worker_memory or manifest.memory.get("workers", [])}
    history = list(getattr(manifest, "invocations", None) or [])
    history.append({"finished_at": now(), "shards_scored": len(passes.records), "timings": manifest.timings})
    manifest.invocations = history  # type: ignore[attr-defined]  (extra field)
    manifest.status = "incomplete" if len(records) < len(prep.shards) else "complete"
    manifest.finished_at = now()
    write_manifest(prep.store, manifest)
    code, reason = exit_status(failed, len(records) < len(prep.shards), errors)
    top = sorted((row for r in records.values() for row in r.top), key=lambda row: -row["ecif_is"])
    return ScoreResult(run_id=prep.run_id, out=prep.store.url, manifest=manifest, exit_code=code, exit_reason=reason,
                       records=records, failed=failed, top=top[: prep.config.top_k], directions_reused=passes.reused,
                       retries=passes.retries, worker_failures=passes.worker_failures)


def write_trace(prep: Prepared, records: Iterable[ShardRecord]) -> int:
    """Merge the shards' top pairs per traced example into the run's ``trace`` table (global ranks)."""
    by_query: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        for row in record.trace:
            by_query.setdefault(row["query_id"], []).append(row)
    k = prep.config.trace.top_k if prep.config.trace else 0
    rows = []
    for hits in by_query.values():
        best = sorted(hits, key=lambda h: (-h["relative_is"], h["shard"], h["key"]))[:k]
        rows += [{**hit, "rank": rank} for rank, hit in enumerate(best, start=1)]
    columns = {name: [row[name] for row in rows] for name in ("query_id", "rank", "shard", "key", "relative_is",
                                                               "ecif_is")}
    prep.store.write_table("trace", prep.run_id, "trace", columns, {"run_id": prep.run_id,
                                                                   "fingerprint": prep.fingerprint})
    return len(rows)


def exit_status(failed: dict[str, str], incomplete: bool, errors: int) -> tuple[int, str]:
    if failed or incomplete:
        return EXIT_INCOMPLETE, f"{len(failed)} shards could not be scored; rerun to retry them"
    if errors:
        return EXIT_INPUT_ERRORS, f"{errors} inputs could not be scored (see the errors table)"
    return EXIT_OK, "every input scored"


@contextlib.contextmanager
def ray_session(address: str | None) -> Iterator[None]:
    """Join the cluster at ``address`` / RAY_ADDRESS, or start a local one; leave it as found."""
    import ray

    if ray.is_initialized():
        yield
        return
    kwargs: dict[str, Any] = {"address": address, "logging_level": logging.WARNING}
    if address is None and not os.environ.get("RAY_ADDRESS"):
        kwargs["include_dashboard"] = False  # the embedded default: a private local cluster
    try:
        ray.init(**kwargs)
    except ConnectionError as exc:
        raise ValueError(f"address: cannot connect to a Ray cluster at {address or os.environ.get('RAY_ADDRESS')}: "
                         f"{exc}") from exc
    try:
        yield
    finally:
        ray.shutdown()


def lineage(prep: Prepared, directions: Directions, meta: dict[str, Any]) -> dict[str, Any]:
    """The key-value metadata every table file carries."""
    ckpt = prep.checkpoint
    return {
        "run_id": prep.run_id, "fingerprint": prep.fingerprint, "checkpoint_sha256": ckpt["sha256"],
        "arch": ckpt["arch"], "param_subset": ckpt["param_subset"], "delta": directions.settings["delta"],
        "training_delta": ckpt["delta"], "damping": str(prep.config.damping), "trunk": ckpt["trunk"],
        "negative_term": prep.config.negative_term, "n_train": ckpt["n_train"], "segment_size": ckpt["segment_size"],
        "dtype": prep.config.dtype, "queries": [n for n in directions.names if n not in (meta.get("traced") or [])],
        "primary_query": directions.names[0], "traced_examples": len(meta.get("traced") or []),
        "solver": {**prep.config.solver.model_dump(), "tol": directions.settings["tol"],
                   "iterations": directions.iterations,
                   "converged": directions.converged, "relative_residual": meta["relative_residual"]},
        "curvature_segments": meta.get("curvature", {}).get("segments"),
        "curvature_pairs": meta.get("curvature", {}).get("pairs"), "curvature_seed": prep.config.curvature_seed,
        "code_version": __version__,
    }
