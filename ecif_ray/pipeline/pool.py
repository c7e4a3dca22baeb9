"""The Ray session and the actor pool: N ``InfluenceWorker`` actors, and their replacement when one dies.

``ray_session`` joins the cluster at ``address`` / RAY_ADDRESS or starts a private local one.

Actors are created with ``max_restarts=0``: a restarted actor would come back without the state
the driver gave it (curvature groups), so the driver replaces a dead actor itself, knowing what
the new one must be given, and retries the dead one's work elsewhere. Each actor reserves
``num_gpus`` GPUs when the cluster has them, and as many CPUs as it runs torch threads; actors
are spread over nodes so a multi-node cluster shares the load from the start.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import ray
from ray.actor import ActorHandle
from ray.exceptions import RayActorError, RayTaskError

from ecif_ray.data.samples import ShardUnavailable
from ecif_ray.pipeline.worker import InfluenceWorker, WorkerSettings


@contextlib.contextmanager
def ray_session(address: str | None) -> Iterator[None]:
    """Join the cluster at ``address`` / RAY_ADDRESS, or start a local one; leave it as found."""
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


class RunInterrupted(RuntimeError):
    """The run stopped before it finished; what it committed stays and a rerun resumes (exit 4)."""


class WorkerFailure(RunInterrupted):
    """Workers cannot start, or keep dying (more deaths than ``max_worker_failures``)."""


@dataclass(frozen=True)
class RetryPolicy:
    """How often a call whose shard the storage did not deliver is tried, and how long to wait between
    tries (``backoff_s`` doubling per attempt): long enough for a short outage to pass."""

    attempts: int = 3
    backoff_s: float = 5.0

    def wait(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
        return self.backoff_s * 2 ** (attempt - 1)

    def after(self, exc: RayTaskError, attempt: int, what: str) -> int:
        """Sleep and return the next attempt number if ``exc`` is a storage failure with tries left;
        otherwise raise (a storage failure as :class:`RunInterrupted`, anything else as it is)."""
        cause = getattr(exc, "cause", None)
        if not isinstance(cause, ShardUnavailable):
            raise exc
        if attempt >= self.attempts:
            raise RunInterrupted(f"{what}: {cause} (tried {attempt} times); nothing of it was used, "
                                 "rerun when the storage is back") from exc
        time.sleep(self.wait(attempt))
        return attempt + 1


@dataclass(frozen=True)
class PoolSize:
    workers: int
    num_cpus: float
    num_gpus: float
    max_failures: int


def plan_pool(workers: int | None, num_gpus_per_worker: float | None, threads: int,
              max_failures: int | None) -> PoolSize:
    """Actors and their resources from the config and what the cluster offers. A request the cluster
    cannot place at all is refused here, naming the flag, instead of waiting forever for actors."""
    resources = ray.cluster_resources()
    gpus = resources.get("GPU", 0.0)
    per_gpu = (1.0 if gpus > 0 else 0.0) if num_gpus_per_worker is None else num_gpus_per_worker
    if per_gpu > 0 and gpus <= 0:
        raise ValueError(f"num_gpus_per_worker: {per_gpu} requested but the cluster has no GPUs")
    capacity = actor_capacity(_node_resources(), float(threads), per_gpu)
    if capacity == 0:
        raise ValueError(f"threads_per_worker (--threads-per-worker {threads}): no node of the cluster has "
                         f"{threads} CPUs{f' and {per_gpu:g} GPUs' if per_gpu else ''} for one worker "
                         f"(largest node: {_largest_node()})")
    if workers is None:
        workers = capacity
    if workers > capacity:
        raise ValueError(f"workers (--workers {workers}): the cluster fits {capacity} workers of {threads} CPUs"
                         f"{f' and {per_gpu:g} GPUs' if per_gpu else ''} each (nodes: {_largest_node()} at most); "
                         "lower --workers or --threads-per-worker")
    failures = 2 * workers + 2 if max_failures is None else max_failures
    return PoolSize(workers=workers, num_cpus=float(threads), num_gpus=per_gpu, max_failures=failures)


def actor_capacity(nodes: list[dict[str, float]], cpus: float, gpus: float) -> int:
    """How many actors of ``cpus`` CPUs and ``gpus`` GPUs the nodes can hold at once (each on one node)."""
    total = 0
    for node in nodes:
        fits = [node.get("CPU", 0.0) / cpus] + ([node.get("GPU", 0.0) / gpus] if gpus > 0 else [])
        total += math.floor(min(fits) + 1e-9)
    return total


def _node_resources() -> list[dict[str, float]]:
    return [node["Resources"] for node in ray.nodes() if node.get("Alive")]


def _largest_node() -> str:
    nodes = _node_resources() or [{}]
    cpus = max(n.get("CPU", 0.0) for n in nodes)
    gpus = max(n.get("GPU", 0.0) for n in nodes)
    return f"{cpus:g} CPUs" + (f", {gpus:g} GPUs" if gpus else "")


class WorkerPool:
    """Owns the actors of one run."""

    def __init__(self, checkpoint: ray.ObjectRef, settings: WorkerSettings, size: PoolSize,
                 retry: RetryPolicy | None = None, start_timeout_s: float = 600.0):
        self._remote = ray.remote(InfluenceWorker)
        self._checkpoint = checkpoint
        self._settings = settings
        self.size = size
        self.retry = retry or RetryPolicy()  # for calls whose shard the storage did not deliver
        self.start_timeout_s = start_timeout_s
        self.actors: list[ActorHandle] = []
        self.failures = 0

    def start(self, count: int | None = None) -> list[dict[str, Any]]:
        """Create the actors and wait until each has loaded the model; returns their info. Actors that
        cannot be placed (the cluster is busy with other work) end the wait after ``start_timeout_s``."""
        self.actors = [self._spawn() for _ in range(count or self.size.workers)]
        refs = [actor.info.remote() for actor in self.actors]
        _, waiting = ray.wait(refs, num_returns=len(refs), timeout=self.start_timeout_s)
        if waiting:
            free = ray.available_resources().get("CPU", 0.0)
            self.shutdown()
            raise WorkerFailure(f"{len(waiting)} of {len(refs)} workers did not start within "
                                f"{self.start_timeout_s:g} s "
                                f"(each needs {self.size.num_cpus:g} CPUs, {self.size.num_gpus:g} GPUs; {free:g} CPUs "
                                "are free): lower --workers or --threads-per-worker, or free the cluster")
        try:
            return ray.get(refs)
        except RayActorError as exc:
            self.shutdown()
            raise WorkerFailure(f"a worker failed to start (loading the checkpoint): {_cause(exc)}") from exc

    def replace(self, dead: ActorHandle) -> ActorHandle:
        """A fresh actor in place of a dead one (counted against ``max_failures``)."""
        self.failures += 1
        if self.failures > self.size.max_failures:
            raise WorkerFailure(f"{self.failures} worker deaths (max_worker_failures = {self.size.max_failures}); "
                                "workers are probably running out of memory: see the Ray logs")
        ray.kill(dead, no_restart=True)
        fresh = self._spawn()
        self.actors[self.actors.index(dead)] = fresh
        return fresh

    def memory(self) -> list[dict[str, Any]]:
        """Each live actor's pid, host and peak RSS in bytes (``InfluenceWorker.memory``); a dead one is left out."""
        out = []
        for actor in self.actors:
            try:
                out.append(ray.get(actor.memory.remote()))
            except RayActorError:
                continue
        return out

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors = []

    def _spawn(self) -> ActorHandle:
        return self._remote.options(num_cpus=self.size.num_cpus, num_gpus=self.size.num_gpus, max_restarts=0,
                                    max_task_retries=0, scheduling_strategy="SPREAD").remote(self._checkpoint,
                                                                                             self._settings)


def _cause(exc: BaseException) -> str:
    """The first line of the actor's own error, without Ray's framing."""
    text = str(exc)
    for marker in ("CheckpointError: ", "ValueError: ", "Error: "):
        if marker in text:
            return text.split(marker, 1)[1].strip().splitlines()[0]
    return text.strip().splitlines()[-1] if text.strip() else type(exc).__name__
