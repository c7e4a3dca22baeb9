"""``manifest.json``: the lineage of one run, and the ``runs`` table built from manifests.

The manifest is written when a run starts (status ``running``) and rewritten when it ends
(``complete``, or ``incomplete`` when some shard could not be scored). It records everything
needed to know where a score came from: the config (storage options redacted), the checkpoint
sha256 and its analysis settings, the query names, solver settings and outcome, the curvature
sample, counts, timings, peak memory (driver and workers) and the code version. ``fingerprint``
is the sha256 of ``score_inputs``: a rerun on the same directory must reproduce it, or it is
refused.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any, Literal

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from ecif_ray.tables.store import MANIFEST, RunStore

MANIFEST_FORMAT = "ecif-ray-run/1"
RunStatus = Literal["running", "complete", "incomplete"]


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class Manifest(BaseModel):
    model_config = ConfigDict(extra="allow")

    format: str = MANIFEST_FORMAT
    run_id: str
    status: RunStatus = "running"
    created_at: str = Field(default_factory=now)
    updated_at: str = Field(default_factory=now)
    finished_at: str | None = None
    fingerprint: str
    score_inputs: dict[str, Any]  # what the fingerprint hashes (config fields, shard ids, checkpoint sha256)
    config: dict[str, Any]
    checkpoint: dict[str, Any]  # path, sha256, arch, param_subset, logit_scale, delta, segment_size, n_train
    queries: list[str]
    primary_query: str
    solver: dict[str, Any] = Field(default_factory=dict)  # settings, iterations, residuals, converged, reused
    curvature: dict[str, Any] = Field(default_factory=dict)  # segments, pairs, sample (shard -> segments)
    counts: dict[str, Any] = Field(default_factory=dict)
    timings: dict[str, float] = Field(default_factory=dict)  # seconds per pass
    workers: dict[str, Any] = Field(default_factory=dict)
    memory: dict[str, Any] = Field(default_factory=dict)  # peak RSS bytes: driver_peak_rss_bytes, workers
    model_check: dict[str, Any] | None = None  # validation loss vs chance (pipeline.results.model_check)
    invocations: list[dict[str, Any]] = Field(default_factory=list)  # one entry per run_score call
    code_version: str = ""


def read_manifest(store: RunStore) -> Manifest | None:
    data = store.get_json(MANIFEST)
    return None if data is None else Manifest.model_validate(data)


def write_manifest(store: RunStore, manifest: Manifest) -> None:
    manifest.updated_at = now()
    store.put_json(MANIFEST, manifest.model_dump(mode="json"))


RUNS = pa.schema(
    [
        ("run_id", pa.string()),
        ("status", pa.string()),
        ("run_dir", pa.string()),
        ("created_at", pa.string()),
        ("finished_at", pa.string()),
        ("checkpoint_sha256", pa.string()),
        ("arch", pa.string()),
        ("param_subset", pa.string()),
        ("negative_term", pa.string()),
        ("delta", pa.float64()),
        ("n_train", pa.int64()),
        ("primary_query", pa.string()),
        ("queries", pa.list_(pa.string())),
        ("solver_iterations", pa.int64()),
        ("solver_converged", pa.bool_()),
        ("solver_max_residual", pa.float64()),
        ("curvature_segments", pa.int64()),
        ("curvature_pairs", pa.int64()),
        ("shards", pa.int64()),
        ("shards_committed", pa.int64()),
        ("pairs", pa.int64()),
        ("errors", pa.int64()),
        ("curvature_s", pa.float64()),
        ("scoring_s", pa.float64()),
        ("total_s", pa.float64()),
        ("code_version", pa.string()),
        ("fingerprint", pa.string()),
        ("manifest", pa.string()),  # the whole manifest as JSON, for fields not flattened here
    ]
)
"""The ``runs`` view: one row per run directory, flattened from its manifest."""


def runs_table(manifests: list[tuple[str, Manifest]]) -> pa.Table:
    """``(run_dir, manifest)`` pairs as the ``runs`` table."""
    rows = [_run_row(run_dir, m) for run_dir, m in manifests]
    return pa.Table.from_pylist(rows, schema=RUNS)


def _run_row(run_dir: str, m: Manifest) -> dict[str, Any]:
    residuals = (m.solver.get("relative_residual") or {}).values()
    return {
        "run_id": m.run_id, "status": m.status, "run_dir": run_dir, "created_at": m.created_at,
        "finished_at": m.finished_at, "checkpoint_sha256": m.checkpoint.get("sha256"),
        "arch": m.checkpoint.get("arch"), "param_subset": m.checkpoint.get("param_subset"),
        "negative_term": m.score_inputs.get("negative_term"), "delta": m.checkpoint.get("delta"),
        "n_train": m.checkpoint.get("n_train"), "primary_query": m.primary_query, "queries": m.queries,
        "solver_iterations": m.solver.get("iterations"), "solver_converged": m.solver.get("converged"),
        "solver_max_residual": max(residuals) if residuals else None,
        "curvature_segments": m.curvature.get("segments"), "curvature_pairs": m.curvature.get("pairs"),
        "shards": m.counts.get("shards"), "shards_committed": m.counts.get("shards_committed"),
        "pairs": m.counts.get("pairs"), "errors": m.counts.get("errors"),
        "curvature_s": m.timings.get("curvature_s"), "scoring_s": m.timings.get("scoring_s"),
        "total_s": m.timings.get("total_s"), "code_version": m.code_version, "fingerprint": m.fingerprint,
        "manifest": json.dumps(m.model_dump(mode="json"), sort_keys=True),
    }
