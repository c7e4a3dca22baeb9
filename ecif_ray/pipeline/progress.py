"""Progress on the driver (tqdm bars on stderr) and the one-screen summary at the end.

Scoring progress counts shards (done/total, with ETA) and shows pairs/s measured over this
invocation, updated after every segment so that long shards do not look stalled.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from tqdm.auto import tqdm

from ecif_ray.pipeline.events import (
    CurvatureLoaded,
    DirectionsReady,
    Event,
    RunStarted,
    ShardCommitted,
    ShardFailed,
    ShardProgress,
    ShardRetried,
    SolverStep,
    WorkersReady,
)
from ecif_ray.pipeline.results import ScoreResult


class ProgressDisplay:
    """A listener that draws the solver and scoring bars."""

    def __init__(self, enabled: bool = True, stream: Any = None):
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self._solver: tqdm | None = None
        self._shards: tqdm | None = None
        self._pairs: dict[str, int] = {}  # pairs done per in-flight shard
        self._scored = 0
        self._started = 0.0

    def __call__(self, event: Event) -> None:
        if not self.enabled:
            return
        if isinstance(event, RunStarted):
            self._shards_total, self._shards_done = event.shards, event.shards_done
            resumed = f", resuming: {event.shards_done} already done" if event.resumed else ""
            self._write(f"run {event.run_id}: {event.shards} shards{resumed} -> {event.out}")
        elif isinstance(event, WorkersReady):
            self._write(f"{event.workers} workers ready in {event.seconds:.1f}s ({_resources(event.resources)})")
        elif isinstance(event, CurvatureLoaded):
            self._write(f"curvature sample: {event.segments} segments, {event.pairs} pairs, {event.groups} groups")
            self._solver = tqdm(desc="iHVP (CG)", unit="it", file=self.stream, leave=False)
        elif isinstance(event, SolverStep) and self._solver is not None:
            self._solver.update(1)
            self._solver.set_postfix(residual=f"{event.max_residual:.2e}")
        elif isinstance(event, DirectionsReady):
            self._close_solver()
            how = "reused from the run dir" if event.reused else f"solved in {event.seconds:.1f}s"
            names = ", ".join(event.names) if len(event.names) <= 4 else f"{len(event.names)} queries"
            self._write(f"directions ({names}): {how} ({event.iterations} CG iterations, "
                        f"residual {event.max_residual:.1e}{'' if event.converged else ', NOT converged'})")
        elif isinstance(event, ShardProgress):
            self._on_progress(event)
        elif isinstance(event, ShardCommitted):
            self._on_commit(event)
        elif isinstance(event, ShardRetried | ShardFailed):
            verb = "failed for good" if isinstance(event, ShardFailed) else "retrying"
            self._pairs.pop(event.shard, None)
            self._write(f"shard {event.shard}: {event.reason}; {verb}")

    def _bar(self) -> tqdm:
        if self._shards is None:
            self._started = time.perf_counter()
            self._shards = tqdm(total=self._shards_total, initial=self._shards_done, desc="scoring", unit="shard",
                                file=self.stream, dynamic_ncols=True)
        return self._shards

    def _on_progress(self, event: ShardProgress) -> None:
        self._pairs[event.shard] = event.pairs_done
        self._show_rate(self._bar())

    def _on_commit(self, event: ShardCommitted) -> None:
        bar = self._bar()
        self._pairs.pop(event.record.shard, None)
        self._scored += event.record.pairs
        bar.update(1)
        self._show_rate(bar)
        if bar.n >= bar.total:
            bar.close()

    def _show_rate(self, bar: tqdm) -> None:
        pairs = self._scored + sum(self._pairs.values())
        elapsed = max(time.perf_counter() - self._started, 1e-9)
        bar.set_postfix(pairs=pairs, pairs_s=f"{pairs / elapsed:.0f}", refresh=False)
        bar.refresh()

    def _close_solver(self) -> None:
        if self._solver is not None:
            self._solver.close()
            self._solver = None

    def _write(self, text: str) -> None:
        tqdm.write(text, file=self.stream)


def _resources(resources: dict[str, float]) -> str:
    return ", ".join(f"{v:g} {k}" for k, v in resources.items() if v) + " per worker"


def _memory_text(memory: dict[str, Any]) -> str:
    workers = ", ".join(f"{w['peak_rss_bytes'] / 2**20:.0f}" for w in memory.get("workers", [])) or "n/a"
    return (f"peak RSS: driver {memory.get('driver_peak_rss_bytes', 0) / 2**20:.0f} MiB, "
            f"workers {workers} MiB")


def near_chance_warning(check: dict[str, Any] | None) -> list[str]:
    """The summary's warning line when the model is near chance (manifest ``model_check``)."""
    if not check or not check.get("near_chance"):
        return []
    if check.get("val_loss") is not None:
        why = (f"validation loss {check['val_loss']:.4g} per pair is {check['loss_ratio']:.2f} x chance "
               f"({check['chance_loss']:.4g} = 2*log(segment size))")
    else:
        why = "its training ended near chance (checkpoint ecif.json training.near_chance)"
    return [f"  WARNING   the model is near chance: {why}.",
            "            It learned (almost) nothing, so these scores say nothing about the data: train it until it",
            "            beats chance (ecif-ray train warns when it does not), then score again."]


def model_lines(check: dict[str, Any] | None) -> list[str]:
    """The summary's ``model`` line: the validation loss against chance, and the training warnings."""
    if not check:
        return []
    if check.get("val_loss") is not None:
        verdict = "NEAR CHANCE" if check.get("near_chance") else "above chance"
        lines = [f"  model     val loss {check['val_loss']:.4g} per pair = {check['loss_ratio']:.2f} x chance "
                 f"({check['chance_loss']:.4g}): {verdict}"]
    else:
        lines = [f"  model     {check.get('note', 'no validation loss measured')}"]
    warnings = (check.get("training") or {}).get("warnings") or []
    if warnings:
        lines.append(f"  training  {len(warnings)} warning(s) recorded by ecif-ray train: {warnings[0]}")
    return lines


def format_summary(result: ScoreResult) -> str:
    """The end-of-run report: counts, errors, the model against chance (a warning first when it is near
    chance), top flagged pairs, time per pass, peak memory."""
    m = result.manifest
    c, t = m.counts, m.timings
    stages = ", ".join(f"{k} {v}" for k, v in sorted(c.get("errors_by_stage", {}).items())) or "none"
    solver = m.solver
    residual = max((solver.get("relative_residual") or {0: 0.0}).values())
    lines = [
        f"ecif-ray score: run {m.run_id} {m.status} (exit {result.exit_code}: {result.exit_reason})",
        *near_chance_warning(m.model_check),
        f"  run dir   {result.out}",
        f"  shards    {c['shards']} total, {c['shards_scored']} scored now, {c['shards_skipped']} done earlier, "
        f"{c['shards_failed']} failed",
        f"  pairs     {c['pairs']} scored, {c['errors']} error rows ({stages})",
        f"  queries   {', '.join(m.queries)} (primary: {m.primary_query}; pairs.*_is > 0 = harmful)",
        *model_lines(m.model_check),
        f"  solver    {solver.get('iterations')} CG iterations, residual {residual:.1e}, "
        f"{'converged' if solver.get('converged') else 'NOT converged'}"
        f"{', reused' if solver.get('reused') else ''}; curvature {m.curvature.get('segments')} segments / "
        f"{m.curvature.get('pairs')} pairs",
        f"  time      workers {t.get('startup_s', 0):.1f}s, curvature {t.get('curvature_s', 0):.1f}s, "
        f"scoring {t.get('scoring_s', 0):.1f}s ({c.get('pairs_per_s', 0):.0f} pairs/s), "
        f"total {t.get('total_s', 0):.1f}s",
    ]
    if m.memory:
        lines.append(f"  memory    {_memory_text(m.memory)}")
    if c.get("trace_rows"):
        lines.append(f"  trace     {c['trace_rows']} rows: top training pairs per mispredicted test example "
                     f"(SELECT * FROM trace ORDER BY query_id, rank)")
    if result.top:
        lines.append(f"  top {len(result.top)} flagged pairs (ecif_is, {m.primary_query}):")
        for rank, row in enumerate(result.top, start=1):
            caption = row["caption"] if len(row["caption"]) <= 40 else row["caption"][:37] + "..."
            lines.append(f"    {rank:>3}  {row['ecif_is']:+.3e}  {row['shard']}/{row['key']}  {caption!r}")
    if c["errors"]:
        query = "SELECT stage, error, count(*) AS n FROM errors GROUP BY ALL"
        lines.append(f"  errors    ecif-ray sql {result.out} \"{query}\"")
    return "\n".join(lines)
