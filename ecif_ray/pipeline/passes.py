"""The cluster part of a run: start the pool, get directions (saved or solved), score pending shards."""

from __future__ import annotations

import time
from typing import Any

import ray
import torch

from ecif_ray import __version__
from ecif_ray.data.shards import Shard
from ecif_ray.influence.curvature import Directions, SolveSpace
from ecif_ray.influence.queries import MISALIGNMENT_QUERY
from ecif_ray.influence.sample import CurvaturePlanner, max_segments
from ecif_ray.influence.traceback import CurvatureBasis
from ecif_ray.pipeline import solve
from ecif_ray.pipeline.events import DirectionsReady, Listener, WorkersReady
from ecif_ray.pipeline.pool import RetryPolicy, WorkerPool, plan_pool, ray_session
from ecif_ray.pipeline.prepare import Prepared, checkpoint_files
from ecif_ray.pipeline.results import PassResult
from ecif_ray.pipeline.scheduler import ShardScheduler
from ecif_ray.pipeline.shard import ShardJob
from ecif_ray.pipeline.worker import QuerySpec, WorkerSettings
from ecif_ray.tables.directions import DirectionsMeta, load_directions, save_directions
from ecif_ray.tables.rows import QUERY_INPUTS, error_rows
from ecif_ray.tables.store import RunStore


def execute(prep: Prepared, pending: list[Shard], emit: Listener) -> PassResult:
    """Start the pool, get the directions (saved or solved), score the pending shards, stop the pool."""
    cfg = prep.config
    result = PassResult()
    with ray_session(cfg.address):
        t0 = time.perf_counter()
        size = plan_pool(cfg.workers, cfg.num_gpus_per_worker, cfg.threads_per_worker, cfg.max_worker_failures)
        pool = WorkerPool(ray.put(checkpoint_files(prep.checkpoint_dir)), worker_settings(prep, size.num_gpus > 0),
                          size, RetryPolicy(cfg.max_attempts, cfg.retry_backoff_s), cfg.start_timeout_s)
        try:
            info = pool.start(min(size.workers, len(pending)))
            result.timings["startup_s"] = round(time.perf_counter() - t0, 3)
            resources = {"CPU": size.num_cpus, "GPU": size.num_gpus}
            result.workers = {"workers": len(pool.actors), **resources, "info": info}
            emit(WorkersReady(len(pool.actors), resources, info, result.timings["startup_s"], list(pool.actors)))

            t1 = time.perf_counter()
            directions, basis, meta, result.reused = directions_for(prep, pool, emit)
            result.directions = meta
            result.timings["curvature_s"] = round(time.perf_counter() - t1, 3)
            emit(DirectionsReady(directions.names, result.reused, directions.iterations, directions.converged,
                                 float(directions.relative_residual.max()), directions.seconds))

            t2 = time.perf_counter()
            basis_ref = None if basis is None else ray.put((basis.U.numpy(), basis.eigenvalues.numpy(), basis.delta))
            arrays = (ray.put(directions.vectors.numpy()), basis_ref)  # put once, shared by every task
            scheduler = ShardScheduler(pool, job_factory(prep, directions, meta), arrays, pool.retry, emit,
                                       failure_writer(prep, directions, meta))
            outcome = scheduler.run(pending)
            result.timings["scoring_s"] = round(time.perf_counter() - t2, 3)
            result.worker_memory = pool.memory()
        finally:
            result.worker_failures = pool.failures
            pool.shutdown()
    result.records, result.failed, result.retries = outcome.records, outcome.failed, outcome.retries
    result.pairs_scored = sum(r.pairs for r in outcome.records.values())
    return result


def worker_settings(prep: Prepared, use_gpu: bool) -> WorkerSettings:
    cfg, ckpt = prep.config, prep.checkpoint
    return WorkerSettings(out=prep.store.url, dtype=ckpt.dtype, threads=cfg.threads_per_worker, use_gpu=use_gpu,
                          n_train=ckpt.n_train, delta=ckpt.delta, negative_term=cfg.negative_term,
                          segment_size=ckpt.segment_size, ggn_chunk=cfg.solver.chunk, exclude=prep.exclude,
                          storage_options=cfg.storage_options, limits=cfg.limits.read_limits(),
                          trusted_arch=cfg.trusted_arch, reference=cfg.reference, features=cfg.paths.features,
                          reference_files=None if prep.reference_dir is None
                          else ray.put(checkpoint_files(prep.reference_dir)))


def directions_for(prep: Prepared, pool: WorkerPool, emit: Listener
                   ) -> tuple[Directions, CurvatureBasis | None, DirectionsMeta, bool]:
    """The saved directions when the fingerprint matches, else the curvature pass (and save them)."""
    saved = load_directions(prep.store, prep.fingerprint)
    if saved is not None:
        return *solve.saved_solution(saved), saved.meta, True
    cfg, ckpt = prep.config, prep.checkpoint
    spec = QuerySpec(names=tuple(cfg.queries), val=tuple(prep.val), test=tuple(prep.test),
                     test_spec=cfg.paths.test, classes=cfg.paths.classes,
                     trace_examples=cfg.trace.examples if cfg.trace else 0)
    queries = solve.query_gradients(pool, spec)
    cap = max_segments(solve.feature_bytes_per_pair(pool, prep.shards), ckpt.segment_size, len(pool.actors),
                       cfg.curvature_memory_mb)
    segments = cap if cfg.curvature_segments is None else min(cfg.curvature_segments, cap)
    planner = CurvaturePlanner(prep.shards, segments, cfg.curvature_shards, cfg.curvature_seed)
    space = SolveSpace(dim=ckpt.dim, delta=ckpt.delta, dtype=getattr(torch, ckpt.dtype))
    rank = cfg.trace.rank if cfg.trace and queries.traced else None
    directions, sample, basis = solve.solve(pool, planner, queries, space, cfg.solver_settings(), cfg.damping, emit,
                                            rank, cfg.misalignment_damping)
    meta = solve.directions_meta(
        directions, prep.fingerprint,
        curvature={**sample.describe(), "seed": cfg.curvature_seed, "cap_segments": cap},
        damping={"rule": cfg.damping, "training_delta": ckpt.delta, "delta": directions.settings["delta"],
                 "misalignment_rule": cfg.misalignment_damping,
                 "misalignment_delta": directions.settings.get(MISALIGNMENT_QUERY, {}).get("delta")},
        queries={name: {"examples": queries.pairs[name], "loss": float(loss)}
                 for name, loss in zip(queries.names, queries.losses) if name in queries.pairs},
        traced=queries.traced, basis_rank=None if basis is None else int(basis.U.shape[1]),
        query_input_errors=len(queries.errors))
    if queries.errors:  # written before the directions: a run that has directions has these rows too
        prep.store.write_table("errors", prep.run_id, QUERY_INPUTS, error_rows(queries.errors, stage="query"),
                               lineage(prep, directions, meta))
    save_directions(prep.store, solve.directions_arrays(directions, basis), meta)
    saved = load_directions(prep.store, prep.fingerprint)
    assert saved is not None, "directions were just saved"
    return *solve.saved_solution(saved), saved.meta, False


def job_factory(prep: Prepared, directions: Directions, meta: DirectionsMeta):
    file_lineage = lineage(prep, directions, meta)
    traced = tuple(meta.traced)
    named = tuple(n for n in directions.names if n not in traced)
    trace_top_k = prep.config.trace.top_k if prep.config.trace else 0

    def make(shard: Shard, attempt: int) -> ShardJob:
        return ShardJob(shard=shard, run_id=prep.run_id, fingerprint=prep.fingerprint, attempt=attempt,
                        queries=named, lineage=file_lineage, top_k=prep.config.top_k, traced=traced,
                        trace_top_k=trace_top_k)

    return make


def failure_writer(prep: Prepared, directions: Directions, meta: DirectionsMeta):
    """Record a shard that failed every attempt as an ``errors`` row (stage 'score'); it stays uncommitted."""
    store: RunStore = prep.store
    file_lineage = lineage(prep, directions, meta)

    def write(shard: Shard, reason: str) -> None:
        rows = {"shard": [shard.name], "key": [""], "stage": ["score"], "error": [reason.split(":", 1)[0]],
                "message": [f"shard {shard.name}: scoring failed {prep.config.max_attempts} times: {reason}"]}
        store.write_table("errors", prep.run_id, shard.name, rows, file_lineage)

    return write


def lineage(prep: Prepared, directions: Directions, meta: DirectionsMeta) -> dict[str, Any]:
    """The key-value metadata every table file carries."""
    cfg, ckpt = prep.config, prep.checkpoint
    return {
        "run_id": prep.run_id, "fingerprint": prep.fingerprint, "checkpoint_sha256": ckpt.sha256,
        "arch": ckpt.arch, "param_subset": ckpt.param_subset, "delta": directions.settings["delta"],
        "training_delta": ckpt.delta, "damping": str(cfg.damping), "trunk": ckpt.trunk,
        "negative_term": cfg.negative_term, "n_train": ckpt.n_train, "segment_size": ckpt.segment_size,
        "dtype": ckpt.dtype,
        "queries": [n for n in directions.names if n not in meta.traced and n != MISALIGNMENT_QUERY],
        "misalignment_delta": directions.settings.get(MISALIGNMENT_QUERY, {}).get("delta"),
        "primary_query": directions.names[0], "traced_examples": len(meta.traced),
        "solver": {**cfg.solver.model_dump(), "tol": directions.settings["tol"], "iterations": directions.iterations,
                   "converged": directions.converged, "relative_residual": meta.relative_residual},
        "curvature_segments": meta.curvature.get("segments"), "curvature_pairs": meta.curvature.get("pairs"),
        "curvature_seed": cfg.curvature_seed, "code_version": __version__,
    }
