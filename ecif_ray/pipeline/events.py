"""What the driver reports while it runs: a stream of small events, handed to listeners.

The progress display is one listener; a caller may add its own (a log shipper, a test that
injects a fault at a precise moment). Listeners run on the driver thread, in order.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ecif_ray.tables.store import ShardRecord


@dataclass(frozen=True)
class RunStarted:
    run_id: str
    out: str
    shards: int
    shards_done: int  # committed by an earlier invocation, skipped now
    resumed: bool


@dataclass(frozen=True)
class WorkersReady:
    workers: int
    resources: dict[str, float]  # per actor: CPU, GPU
    info: list[dict[str, Any]]
    seconds: float
    actors: list[Any]  # the Ray actor handles, in pool order


@dataclass(frozen=True)
class CurvatureLoaded:
    groups: int
    segments: int
    pairs: int


@dataclass(frozen=True)
class SolverStep:
    iteration: int
    max_residual: float


@dataclass(frozen=True)
class DirectionsReady:
    names: list[str]
    reused: bool
    iterations: int
    converged: bool
    max_residual: float
    seconds: float


@dataclass(frozen=True)
class ShardSubmitted:
    shard: str
    attempt: int
    actor: Any  # the Ray actor handle the task went to


@dataclass(frozen=True)
class ShardProgress:
    shard: str
    attempt: int
    segments_done: int  # so far (a shard is streamed: its total is known when it commits)
    pairs_done: int


@dataclass(frozen=True)
class ShardCommitted:
    record: ShardRecord


@dataclass(frozen=True)
class ShardRetried:
    shard: str
    attempt: int  # the attempt that failed
    reason: str
    worker_died: bool


@dataclass(frozen=True)
class ShardFailed:
    shard: str
    attempts: int
    reason: str


@dataclass(frozen=True)
class RunFinished:
    summary: Any  # pipeline.results.ScoreResult


Event = (RunStarted | WorkersReady | CurvatureLoaded | SolverStep | DirectionsReady | ShardSubmitted | ShardProgress
         | ShardCommitted | ShardRetried | ShardFailed | RunFinished)
Listener = Callable[[Event], None]


class Emitter:
    """Fans events out to listeners."""

    def __init__(self, listeners: list[Listener]):
        self.listeners = listeners

    def __call__(self, event: Event) -> None:
        for listener in self.listeners:
            listener(event)
