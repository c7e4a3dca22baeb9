"""The driver: validate, resume, curvature pass, scoring pass, manifest, result.

``run_score(config)`` is what ``ecif-ray score`` and ``jobs/score.py`` call. In order:

1. everything that can be checked without a cluster is checked (``pipeline.prepare``: config,
   checkpoint loaded once on CPU, shard specs, exclusions), so a bad run is refused before any
   cluster starts;
2. the run directory's lease is taken (``tables.lease``; a live driver already on it is refused)
   and the directory opened: a rerun with the same fingerprint resumes (committed shards are
   skipped, saved directions reused, temp files of killed writers removed); any other fingerprint
   is refused, naming what changed;
3. only if shards remain (``pipeline.passes``): Ray is joined (``address``/``RAY_ADDRESS``) or
   started locally, the actor pool is built, directions are solved (or reused), and the shards are
   scored;
4. the manifest is finalised and a ``pipeline.results.ScoreResult`` returned; its exit code tells callers
   whether every input was scored (0), some inputs were bad (3) or some shards failed (4).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from typing import Any

from ecif_ray import __version__
from ecif_ray.config import ScoreConfig
from ecif_ray.pipeline.events import Emitter, Listener, RunFinished, RunStarted
from ecif_ray.pipeline.prepare import Prepared, prepare
from ecif_ray.pipeline.progress import ProgressDisplay
from ecif_ray.pipeline.results import PassResult, ScoreResult, checkpoint_training, exit_status, model_check
from ecif_ray.pipeline.worker import peak_rss_bytes
from ecif_ray.tables.lease import LeaseHeld, RunLease
from ecif_ray.tables.manifest import Manifest, now, read_manifest, write_manifest
from ecif_ray.tables.ranking import rank_trace, top_indices
from ecif_ray.tables.store import ShardRecord


class RunMismatch(ValueError):
    """The run directory holds a run made with another configuration or checkpoint."""


class RunLocked(RunMismatch):
    """Another driver is running on the run directory (its lease is live)."""


def run_score(config: ScoreConfig, listeners: Sequence[Listener] = ()) -> ScoreResult:
    """Run (or resume) one scoring job, holding the run directory's lease; see the module docstring."""
    started = time.perf_counter()
    prep = prepare(config)
    with take_lease(prep):
        return score_run(prep, listeners, started)


def score_run(prep: Prepared, listeners: Sequence[Listener], started: float) -> ScoreResult:
    """The run, once its lease is held: open (or resume) it, remove killed writers' temp files, passes, finish."""
    config = prep.config
    manifest = open_run(prep)
    prep.store.remove_temp_files()  # no live writer owns one: we hold the lease, no worker has started
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


# -- the run directory ---------------------------------------------------------------------------

def take_lease(prep: Prepared) -> RunLease:
    """The run directory's lease, taken before the manifest is read or written; a live owner is
    refused as RunLocked, so the CLI exits 2 with one line, as for RunMismatch."""
    try:
        return RunLease.acquire(prep.store, prep.run_id)
    except LeaseHeld as exc:
        raise RunLocked(str(exc)) from None


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
                            config=prep.config.public_dump(), checkpoint=prep.checkpoint.to_json(),
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


# -- the result ------------------------------------------------------------------------------------

def finish(prep: Prepared, manifest: Manifest, done: dict[str, ShardRecord], passes: PassResult,
           seconds: float) -> ScoreResult:
    """Complete the manifest (counts, solver, trace, timings, memory, status), write it, return the result."""
    records = {**done, **passes.records}
    failed = {k: v for k, v in passes.failed.items() if k not in records}
    query_errors = passes.directions.query_input_errors if passes.directions is not None else \
        manifest.counts.get("errors_by_stage", {}).get("query", 0)  # directions from an earlier invocation
    manifest.counts = run_counts(prep, records, done, failed, passes, query_errors)
    if passes.directions is not None:
        solved = passes.directions
        manifest.solver = {**solved.settings, "iterations": solved.iterations, "converged": solved.converged,
                           "relative_residual": solved.relative_residual, "seconds": solved.seconds,
                           "reused": passes.reused, "damping": solved.damping}
        manifest.curvature = solved.curvature
        manifest.model_check = model_check(
            solved, prep.checkpoint.segment_size, checkpoint_training(prep.checkpoint_dir))
    if passes.records and any(r.trace for r in records.values()):
        manifest.counts["trace_rows"] = write_trace(prep, records.values())
    record_invocation(manifest, passes, seconds)
    manifest.status = "incomplete" if len(records) < len(prep.shards) else "complete"
    manifest.finished_at = now()
    write_manifest(prep.store, manifest)
    code, reason = exit_status(failed, len(records) < len(prep.shards), manifest.counts["errors"])
    candidates = [row for r in records.values() for row in r.top]
    top = [candidates[i] for i in top_indices([row["ecif_is"] for row in candidates], prep.config.top_k)]
    return ScoreResult(run_id=prep.run_id, out=prep.store.url, manifest=manifest, exit_code=code, exit_reason=reason,
                       records=records, failed=failed, top=top, directions_reused=passes.reused,
                       retries=passes.retries, worker_failures=passes.worker_failures)


def run_counts(prep: Prepared, records: dict[str, ShardRecord], done: dict[str, ShardRecord],
               failed: dict[str, str], passes: PassResult, query_errors: int = 0) -> dict[str, Any]:
    """The manifest's ``counts``: shards, pairs, error rows by stage (a failed shard counts as stage 'score',
    a bad sample of a query set as 'query')."""
    by_stage: dict[str, int] = {}
    for record in records.values():
        for stage, n in record.errors_by_stage.items():
            by_stage[stage] = by_stage.get(stage, 0) + n
    if failed:
        by_stage["score"] = by_stage.get("score", 0) + len(failed)
    if query_errors:
        by_stage["query"] = query_errors
    scoring_s = passes.timings.get("scoring_s", 0.0)
    return {
        "shards": len(prep.shards), "shards_committed": len(records), "shards_scored": len(passes.records),
        "shards_skipped": len(done), "shards_failed": len(failed), "pairs": sum(r.pairs for r in records.values()),
        "errors": sum(by_stage.values()), "errors_by_stage": by_stage, "pairs_scored_now": passes.pairs_scored,
        "pairs_per_s": round(passes.pairs_scored / scoring_s, 2) if scoring_s else 0.0,
        "retries": passes.retries, "worker_failures": passes.worker_failures,
    }


def record_invocation(manifest: Manifest, passes: PassResult, seconds: float) -> None:
    """This invocation's timings, workers and peak memory, and its entry in the manifest's history."""
    manifest.timings = {**passes.timings, "total_s": round(seconds, 3)}
    manifest.workers = passes.workers or manifest.workers
    manifest.memory = {"driver_peak_rss_bytes": peak_rss_bytes(),
                       "workers": passes.worker_memory or manifest.memory.get("workers", [])}
    history = list(manifest.invocations)
    history.append({"finished_at": now(), "shards_scored": len(passes.records), "timings": manifest.timings})
    manifest.invocations = history


def write_trace(prep: Prepared, records: Iterable[ShardRecord]) -> int:
    """Merge the shards' top pairs per traced example into the run's ``trace`` table (global ranks)."""
    k = prep.config.trace.top_k if prep.config.trace else 0
    rows = rank_trace((row for record in records for row in record.trace), k)
    columns = {name: [row[name] for row in rows] for name in ("query_id", "rank", "shard", "key", "relative_is",
                                                               "ecif_is")}
    prep.store.write_table("trace", prep.run_id, "trace", columns, {"run_id": prep.run_id,
                                                                   "fingerprint": prep.fingerprint})
    return len(rows)
