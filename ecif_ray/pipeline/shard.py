"""Scoring one shard: stream its segments, JVP-score each, write its tables, commit.

The shard is streamed (``data.segments.stream_segments``): a worker holds one segment of decoded
images at a time plus the decoder's read-ahead, and per pair only its scores, so its memory does not
grow with the shard. A run with a feature store (``--features``) streams the shard's stored trunk
features instead (``data.feature_source``): the same segments, the same errors rows, no images.
Nothing is written before the last segment is scored, so a storage failure midway
(``ShardUnavailable``) leaves nothing behind.

A plain generator (no Ray): the actor streams its items to the driver, which turns them into
progress. It yields a :class:`SegmentDone` after each segment and the shard's
:class:`~ecif_ray.tables.store.ShardRecord` last, after the commit. Everything it writes is named
after the shard, so running it again (a retry after a worker died) replaces, never duplicates.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

import torch

from ecif_ray.data.exclusions import ExclusionSet
from ecif_ray.data.feature_source import stored_errors, stored_segments
from ecif_ray.data.samples import DEFAULT_LIMITS, ErrorRecord, ReadLimits, ShardUnavailable
from ecif_ray.data.segments import PairBatch, Preprocess, Segment, Tokenizer, collate_segment, stream_segments
from ecif_ray.data.shards import Shard
from ecif_ray.influence.rows import pair_rows, score_rows
from ecif_ray.influence.scoring import SegmentScores, score_segment
from ecif_ray.influence.task import InfluenceTask
from ecif_ray.influence.traceback import CurvatureBasis, TopK, trace_segment
from ecif_ray.models.reference import ReferenceModel
from ecif_ray.tables.feature_store import FeatureStore
from ecif_ray.tables.ranking import top_indices
from ecif_ray.tables.rows import error_rows
from ecif_ray.tables.store import RunStore, ShardRecord

TOP_COLUMNS = ("shard", "key", "caption", "ecif_is")  # what a shard's record keeps of its top pairs


@dataclass(frozen=True)
class ShardJob:
    """Everything a worker needs to score and commit one shard (besides the directions)."""

    shard: Shard
    run_id: str
    fingerprint: str
    attempt: int
    queries: tuple[str, ...]  # named queries: the first rows of the directions; the first is primary
    lineage: dict[str, Any]  # written into every file's key-value metadata
    top_k: int = 10
    traced: tuple[str, ...] = ()  # trace-back examples: the remaining rows of the directions
    trace_top_k: int = 10


@dataclass(frozen=True)
class SegmentDone:
    shard: str
    segments_done: int
    pairs_done: int


@dataclass(frozen=True)
class ShardInputs:
    """How shards become model inputs (fixed for the whole run)."""

    segment_size: int
    preprocess: Preprocess
    tokenizer: Tokenizer
    exclude: ExclusionSet | None = None
    storage_options: dict[str, Any] | None = None
    chunk: int = 16  # directions per vmapped JVP
    pool: Executor | None = None  # threads that decode and preprocess images (None: this thread)
    limits: ReadLimits = DEFAULT_LIMITS
    reference: ReferenceModel | None = None  # its CLIP score of each pair goes into pairs.reference_clip_score
    features: FeatureStore | None = None  # read trunk features from this store, not the images (checked by the driver)

    def segments(self, task: InfluenceTask, shard: Shard, errors: list[ErrorRecord]) -> Iterator[Segment | PairBatch]:
        """The shard's segments in order: decoded ``Segment`` s, or, from the feature store, ``PairBatch`` es
        with ``task``'s features attached; bad samples go to ``errors`` either way. A store read that fails
        raises ``ShardUnavailable`` (retried, never committed), as a failed shard read does."""
        if self.features is None:
            return stream_segments(shard, segment_size=self.segment_size, exclude=self.exclude,
                                   storage_options=self.storage_options, pool=self.pool, limits=self.limits,
                                   errors=errors)
        return self._stored(task, shard, errors)

    def _stored(self, task: InfluenceTask, shard: Shard, errors: list[ErrorRecord]) -> Iterator[PairBatch]:
        assert self.features is not None
        try:
            errors.extend(stored_errors(self.features, shard.name))
            yield from stored_segments(self.features, shard.name, self.segment_size, task, self.exclude)
        except OSError as exc:
            raise ShardUnavailable(f"shard {shard.name}: features: {self.features.url}: {type(exc).__name__}: "
                                   f"{exc}") from exc

    def collate(self, item: Segment | PairBatch) -> PairBatch:
        """A segment as model inputs (a stored batch already is one)."""
        if isinstance(item, PairBatch):
            return item
        return collate_segment(item, self.preprocess, self.tokenizer, self.pool)


def score_shard(task: InfluenceTask, inputs: ShardInputs, job: ShardJob, directions: torch.Tensor,
                store: RunStore, basis: CurvatureBasis | None = None) -> Iterator[SegmentDone | ShardRecord]:
    """Score every good pair of the shard against ``directions`` [Q, D], write and commit its tables.

    With trace-back examples (``job.traced``, needs ``basis``), each pair's relative-IS against
    every example is computed too and the shard's top pairs per example go into its record.
    """
    start = time.perf_counter()
    errors: list[ErrorRecord] = []
    segments = inputs.segments(task, job.shard, errors)
    named = directions[: len(job.queries)]
    traced = directions[len(job.queries):]
    top = TopK(list(job.traced), job.trace_top_k) if job.traced else None
    results: list[SegmentScores] = []
    pairs = 0
    for done, segment in enumerate(segments, start=1):
        batch = inputs.collate(segment)
        scores = score_segment(task, batch, named, inputs.chunk)
        if inputs.reference is not None:
            assert isinstance(segment, Segment), "a reference needs the images (the config refuses it with features)"
            scores.reference_clip_score = inputs.reference.clip_scores([s.image for s in segment.samples],
                                                                       batch.captions)
        results.append(scores)
        if top is not None:
            assert basis is not None, "trace-back needs the curvature basis"
            top.add(batch, trace_segment(task, batch, traced, basis))
        pairs += len(batch)
        yield SegmentDone(job.shard.name, done, pairs)
    trace = top.rows() if top is not None else []
    yield write_shard(store, job, results, errors, trace, time.perf_counter() - start)


def write_shard(store: RunStore, job: ShardJob, results: Sequence[SegmentScores], errors: Sequence[ErrorRecord],
                trace: list[dict[str, Any]], seconds: float) -> ShardRecord:
    """Write the shard's non-empty tables (pairs last), then its commit record. A table this attempt
    has no rows for loses the file an earlier attempt left (e.g. the ``score`` error row of a run
    whose storage was down), so a table holds exactly what the commit record lists."""
    lineage = {**job.lineage, "attempt": job.attempt, "shard_seconds": round(seconds, 3)}
    name = job.shard.name
    pairs = pair_rows(results, job.queries)
    tables = {"errors": error_rows(errors), "scores": score_rows(results, job.queries), "pairs": pairs}
    for table, rows in tables.items():
        if not rows["shard"]:
            store.remove(store.table_file(table, job.run_id, name))
    files = [store.write_table(table, job.run_id, name, rows, lineage)
             for table, rows in tables.items() if rows["shard"]]
    by_stage: dict[str, int] = {}
    for e in errors:
        by_stage[e.stage] = by_stage.get(e.stage, 0) + 1
    record = ShardRecord(shard=name, run_id=job.run_id, fingerprint=job.fingerprint, files=files,
                         pairs=sum(len(r) for r in results), errors=len(errors), errors_by_stage=by_stage,
                         seconds=round(seconds, 3), attempt=job.attempt, top=top_pairs(pairs, job.top_k),
                         trace=trace)
    store.commit_shard(record)
    return record


def top_pairs(pairs: dict[str, list], k: int) -> list[dict[str, Any]]:
    """The shard's ``k`` most harmful pairs by the primary ecif_is (the driver merges them)."""
    return [{name: pairs[name][i] for name in TOP_COLUMNS} for i in top_indices(pairs["ecif_is"], k)]
