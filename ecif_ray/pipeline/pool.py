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
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import ray
from ray.actor import ActorHandle
from ray.exceptions import RayActorError

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


class WorkerFailure(RuntimeError):
    """Workers cannot start, or keep dying (more deaths than ``max_worker_failures``)."""


@dataclass(frozen=True)
class PoolSize:
    workers: int
    num_cpus: float
    num_gpus: float
    max_failures: int


def plan_pool(workers: int | None, num_gpus_per_worker: float | None, threads: int,
              max_failures: int | None) -> PoolSize:
    """Actors and their resources from the config and what the cluster offers."""
    resources = ray.cluster_resources()
    gpus, cpus = resources.get("GPU", 0.0), resources.get("CPU", 1.0)
    per_gpu = (1.0 if gpus > 0 else 0.0) if num_gpus_per_worker is None else num_gpus_per_worker
    if per_gpu > 0 and gpus <= 0:
        raise ValueError(f"num_gpus_per_worker: {per_gpu} requested but the cluster has no GPUs")
    if workers is None:
        workers = int(gpus // per_gpu) if per_gpu > 0 else int(cpus // threads)
    workers = max(1, workers)
    failures = 2 * workers + 2 if max_failures is None else max_failures
    return PoolSize(workers=workers, num_cpus=float(threads), num_gpus=per_gpu, max_failures=failures)


class WorkerPool:
    """Owns the actors of one run."""

    def __init__(self, checkpoint: ray.ObjectRef, settings: WorkerSettings, size: PoolSize):
        self._remote = ray.remote(InfluenceWorker)
        self._checkpoint = checkpoint
        self._settings = settings
        self.size = size
        self.actors: list[ActorHandle] = []
        self.failures = 0

    def start(self, count: int | None = None) -> list[dict[str, Any]]:
        """Create the actors and wait until each has loaded the model; returns their info."""
        self.actors = [self._spawn() for _ in range(count or self.size.workers)]
        try:
            return ray.get([actor.info.remote() for actor in self.actors])
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
