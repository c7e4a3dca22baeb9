"""The scoring pass: one task per shard on the actor pool, retried elsewhere when it fails.

Each task is a streaming call (``num_returns="streaming"``): the actor yields after every segment
and once more with the shard's commit record, so the driver shows progress inside long shards
and learns about a dead actor at its next item. On failure the shard goes back to the front of
the queue for another actor: a dead actor is replaced first and its shard retried at once; an
actor whose task raised (storage down, see ``data.samples.ShardUnavailable``) stays in the pool
(other shards may go to it) but the retry waits for a different actor and for the backoff
(``RetryPolicy``: doubling per attempt), so that a short outage passes within the run. After
``retry.attempts`` failures the shard is reported (an ``errors`` row with stage ``score``) and left
uncommitted for a rerun to retry.
Nothing a failed attempt wrote can duplicate rows: the retry rewrites the same files.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import ray
from ray.actor import ActorHandle
from ray.exceptions import RayActorError, RayTaskError

from ecif_ray.data.shards import Shard
from ecif_ray.pipeline.events import (
    Listener,
    ShardCommitted,
    ShardFailed,
    ShardProgress,
    ShardRetried,
    ShardSubmitted,
)
from ecif_ray.pipeline.pool import RetryPolicy, WorkerPool
from ecif_ray.pipeline.shard import SegmentDone, ShardJob
from ecif_ray.tables.store import ShardRecord

JobFactory = Callable[[Shard, int], ShardJob]

# A worker runs at most this many items ahead of the driver's bookkeeping: progress events do not
# pile up, and a fault seen by the driver after segment k is known to land before segment k + 5.
STREAM_AHEAD = 4


@dataclass
class _Attempt:
    shard: Shard
    attempt: int
    actor: ActorHandle


@dataclass(frozen=True)
class _Queued:
    shard: Shard
    attempt: int
    avoid: ActorHandle | None = None  # the actor whose task just raised on this shard
    not_before: float = 0.0  # time.monotonic() before which it is not retried


@dataclass
class ScoringOutcome:
    records: dict[str, ShardRecord] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)  # shard -> last failure
    retries: int = 0


class ShardScheduler:
    def __init__(self, pool: WorkerPool, make_job: JobFactory, arrays: tuple[ray.ObjectRef, ray.ObjectRef | None],
                 retry: RetryPolicy, emit: Listener, on_failure: Callable[[Shard, str], None]):
        self.pool = pool
        self.make_job = make_job
        self.arrays = arrays  # the directions, and G's eigenbasis when tracing back (put once, shared)
        self.retry = retry
        self.emit = emit
        self.on_failure = on_failure
        self.outcome = ScoringOutcome()
        self._queue: deque[_Queued] = deque()
        self._idle: list[ActorHandle] = []
        self._inflight: dict[ray.ObjectRefGenerator, _Attempt] = {}

    def run(self, shards: Sequence[Shard]) -> ScoringOutcome:
        self._queue.extend(_Queued(shard, 1) for shard in shards)
        self._idle = list(self.pool.actors)
        while self._queue or self._inflight:
            self._submit()
            if not self._inflight:  # only retries waiting out their backoff
                time.sleep(min(1.0, max(0.0, min(q.not_before for q in self._queue) - time.monotonic())))
                continue
            ready, _ = ray.wait(list(self._inflight), num_returns=1, timeout=1.0)
            for stream in ready:
                self._advance(stream)
        return self.outcome

    def _submit(self) -> None:
        for actor in list(self._idle):
            job = self._next_for(actor)
            if job is None:
                continue
            shard, attempt = job
            self._idle.remove(actor)
            options = {"num_returns": "streaming", "_generator_backpressure_num_objects": STREAM_AHEAD}
            stream = actor.score_shard.options(**options).remote(self.make_job(shard, attempt), *self.arrays)
            self._inflight[stream] = _Attempt(shard, attempt, actor)
            self.emit(ShardSubmitted(shard.name, attempt, actor))

    def _next_for(self, actor: ActorHandle) -> tuple[Shard, int] | None:
        """The first queued shard this actor may take: not one still waiting out its backoff, nor one whose
        task just raised on this actor unless it is the only one (the retry then waits for another)."""
        now = time.monotonic()
        for i, queued in enumerate(self._queue):
            if queued.not_before <= now and (queued.avoid != actor or len(self.pool.actors) == 1):
                del self._queue[i]
                return queued.shard, queued.attempt
        return None

    def _advance(self, stream: ray.ObjectRefGenerator) -> None:
        attempt = self._inflight[stream]
        try:
            item = ray.get(next(stream))
        except StopIteration:
            self._finish(stream, attempt.actor)
            self._retry(attempt, "the worker ended the shard without committing it", died=False)
        except RayActorError as exc:
            self._finish(stream, self.pool.replace(attempt.actor))
            self._retry(attempt, f"worker died: {type(exc).__name__}", died=True)
        except RayTaskError as exc:
            self._finish(stream, attempt.actor)
            self._retry(attempt, _task_error(exc), died=False)
        else:
            if isinstance(item, SegmentDone):
                self.emit(ShardProgress(item.shard, attempt.attempt, item.segments_done, item.pairs_done))
            else:
                self._finish(stream, attempt.actor)
                self.outcome.records[item.shard] = item
                self.emit(ShardCommitted(item))

    def _finish(self, stream: ray.ObjectRefGenerator, actor: ActorHandle) -> None:
        del self._inflight[stream]
        self._idle.append(actor)

    def _retry(self, attempt: _Attempt, reason: str, died: bool) -> None:
        name = attempt.shard.name
        if attempt.attempt < self.retry.attempts:
            self.outcome.retries += 1
            wait = 0.0 if died else self.retry.wait(attempt.attempt)
            self._queue.appendleft(_Queued(attempt.shard, attempt.attempt + 1, None if died else attempt.actor,
                                           time.monotonic() + wait))
            self.emit(ShardRetried(name, attempt.attempt, reason if not wait else f"{reason} (retry in {wait:g} s)",
                                   died))
            return
        self.outcome.failed[name] = reason
        self.on_failure(attempt.shard, reason)
        self.emit(ShardFailed(name, attempt.attempt, reason))


def _task_error(exc: RayTaskError) -> str:
    cause = exc.cause if getattr(exc, "cause", None) is not None else exc
    lines = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {lines[-1] if lines else ''}"
