"""Solving the directions on the cluster: query gradients, the distributed GGN matvec, CG.

Workers hold the curvature sample (``influence.sample``) group by group, as trunk features, and return one partial
product Σ_m J_mᵀ Λ_m J_m V per group; the driver adds them in group order and divides by the
sample's pair count, which is exactly the matvec the single-process engine's ``local_matvec``
computes, and runs the engine's own ``solve_directions`` with it. A worker that dies mid-pass is
replaced; the replacement reloads the dead one's groups (the plan makes them reproducible) and
the interrupted products are recomputed.

The solved directions are saved in the run directory (``tables.directions``) with the run's
fingerprint and reused by a rerun with the same fingerprint, so the iHVP is solved once per run,
not once per invocation; the last functions here convert between the solve's tensors and the
arrays saved there.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray
import torch
from ray.actor import ActorHandle
from ray.exceptions import RayActorError, RayTaskError

from ecif_ray.data.shards import Shard
from ecif_ray.influence.curvature import (
    Damping,
    Directions,
    MisalignmentDamping,
    SolverSettings,
    SolveSpace,
    build_preconditioner,
    mean_eigenvalue,
    resolve_damping,
    solve_directions,
    solve_misalignment,
)
from ecif_ray.influence.queries import QueryGradients
from ecif_ray.influence.sample import CurvatureGroup, CurvaturePlanner, CurvatureRequest
from ecif_ray.influence.traceback import CurvatureBasis, curvature_basis
from ecif_ray.pipeline.events import CurvatureLoaded, Listener, SolverStep
from ecif_ray.pipeline.pool import RunInterrupted, WorkerPool
from ecif_ray.pipeline.worker import QueryResult, QuerySpec
from ecif_ray.tables.directions import DirectionsMeta, SavedDirections

PARTIALS_BYTES = 256 * 2**20  # partial products fetched per chunk of a distributed G·V


@dataclass
class CurvatureSample:
    groups: list[CurvatureGroup] = field(default_factory=list)

    @property
    def pairs(self) -> int:
        return sum(g.pairs for g in self.groups)

    @property
    def segments(self) -> int:
        return sum(len(g.segments) for g in self.groups)

    def describe(self) -> dict[str, Any]:
        return {"segments": self.segments, "pairs": self.pairs, "groups": len(self.groups),
                "sample": [{"shard": g.shard, "segments": list(g.segments)} for g in self.groups]}  # summation order


def call_with_recovery(pool: WorkerPool, actor: ActorHandle, call: Callable[[ActorHandle], Any], what: str,
                       reload: Callable[[ActorHandle], None] = lambda actor: None) -> Any:
    """``ray.get(call(actor))``; if the actor dies, replace it, ``reload`` the replacement, try again; if
    the storage did not deliver a shard, try again after the pool's backoff (``RetryPolicy``)."""
    attempt = 1
    while True:
        try:
            return ray.get(call(actor))
        except RayActorError:
            actor = pool.replace(actor)
            reload(actor)
        except RayTaskError as exc:
            attempt = pool.retry.after(exc, attempt, what)


def query_gradients(pool: WorkerPool, spec: QuerySpec) -> QueryResult:
    return call_with_recovery(pool, pool.actors[0], lambda actor: actor.query_gradients.remote(spec), "queries")


def feature_bytes_per_pair(pool: WorkerPool, shards: list[Shard]) -> int:
    """Trunk-feature bytes per pair, measured by a worker on the first readable shard."""
    error: Exception | None = None
    for shard in shards[:8]:
        try:
            return call_with_recovery(pool, pool.actors[0],
                                      lambda actor, s=shard: actor.feature_bytes_per_pair.remote(s),
                                      f"curvature size, shard {shard.name}")
        except (RayTaskError, RunInterrupted) as exc:  # bad or undelivered shard: size on the next one
            error = exc
    raise ValueError(f"train: no readable shard among the first {min(len(shards), 8)}: {error}")


class DistributedCurvature:
    """The curvature sample spread over the pool's actors, and G·V over it."""

    def __init__(self, pool: WorkerPool, planner: CurvaturePlanner):
        self.pool = pool
        self.planner = planner
        self.requests: dict[int, CurvatureRequest] = {}
        self.owner: dict[int, ActorHandle] = {}
        self.sample = CurvatureSample()

    def load(self) -> CurvatureSample:
        """Draw the sample round by round (see ``influence.sample``); groups that got nothing are dropped."""
        while requests := self.planner.next_round():
            round_groups = self._load_round(requests)
            self.planner.record(round_groups)
            self.sample.groups += [g for g in round_groups if g.pairs > 0]
        if self.sample.pairs == 0:
            raise ValueError("train: no readable segments for the curvature sample (every sampled shard is bad)")
        self.sample.groups.sort(key=lambda g: g.group)
        return self.sample

    def _load_round(self, requests: list[CurvatureRequest]) -> list[CurvatureGroup]:
        actors = self.pool.actors
        refs = {}
        for i, request in enumerate(requests):
            self.requests[request.group] = request
            self.owner[request.group] = actors[i % len(actors)]
            refs[request.group] = self.owner[request.group].load_curvature.remote(request)
        return [self._get_group(group, ref) for group, ref in refs.items()]

    def _get_group(self, group: int, ref: ray.ObjectRef) -> CurvatureGroup:
        """The group's load result; a dead owner is replaced, a shard the storage did not deliver is
        read again after a backoff (a sample drawn without it would differ from the plan)."""
        attempt = 1
        while True:
            try:
                return ray.get(ref)
            except RayActorError:
                self._recover(self.owner[group])
            except RayTaskError as exc:
                shard = self.requests[group].shard.name
                attempt = self.pool.retry.after(exc, attempt, f"curvature sample, shard {shard}")
            ref = self.owner[group].load_curvature.remote(self.requests[group])

    def _recover(self, dead: ActorHandle) -> ActorHandle:
        """Replace a dead actor and give the replacement every group the dead one held."""
        fresh = self.pool.replace(dead)
        mine = [g for g, owner in self.owner.items() if owner == dead]
        for g in mine:
            self.owner[g] = fresh
        known = {g.group: g for g in self.sample.groups}
        for g in mine:
            reloaded = call_with_recovery(self.pool, fresh, lambda a, g=g: a.load_curvature.remote(self.requests[g]),
                                          f"curvature sample, shard {self.requests[g].shard.name}")
            if g in known and reloaded.segments != known[g].segments:
                raise RuntimeError(f"curvature group {g} reloaded different segments: shard changed during the run?")
        return fresh

    def matvec(self, V: torch.Tensor) -> torch.Tensor:
        """G·V for a [D, Q] block: per-group partials from the actors, summed in group order (so the result
        does not depend on which actor holds which group). Groups are asked for a chunk at a time so that
        the partials in flight stay under ``PARTIALS_BYTES`` on the driver and the actors whatever the
        number of groups (a rank-128 sketch of 4,096 parameters is 4 MB per group: a 1,000-shard sample
        fetched at once held 4 GB)."""
        vectors = ray.put(np.ascontiguousarray(V.detach().cpu().numpy()))
        groups = [g.group for g in self.sample.groups]
        chunk = max(len(self.pool.actors), PARTIALS_BYTES // max(1, V.numel() * V.element_size()))
        total: np.ndarray | None = None
        for start in range(0, len(groups), chunk):
            partials = self._partials(groups[start:start + chunk], vectors)
            for g in groups[start:start + chunk]:
                if total is None:
                    total = np.zeros_like(partials[g])
                total += partials[g]
        assert total is not None
        return torch.from_numpy(total / self.sample.pairs).to(V.dtype)

    def _partials(self, groups: list[int], vectors: ray.ObjectRef) -> dict[int, np.ndarray]:
        """Each group's unnormalised partial product, from its owner; a dead owner's groups are redone."""
        partials: dict[int, np.ndarray] = {}
        pending = groups
        while pending:
            by_actor: dict[ActorHandle, list[int]] = {}
            for g in pending:
                by_actor.setdefault(self.owner[g], []).append(g)
            refs = {actor: actor.ggn.remote(mine, vectors) for actor, mine in by_actor.items()}
            pending = []
            for actor, ref in refs.items():
                try:
                    partials.update(zip(by_actor[actor], ray.get(ref)))
                except RayActorError:
                    self._recover(actor)
                    pending += by_actor[actor]
        return partials

    def release(self) -> None:
        ray.get([actor.drop_curvature.remote() for actor in set(self.owner.values()) if actor in self.pool.actors])


def solve(pool: WorkerPool, planner: CurvaturePlanner, queries: QueryResult, space: SolveSpace,
          settings: SolverSettings, damping: Damping, emit: Listener, basis_rank: int | None = None,
          misalignment: MisalignmentDamping | None = "auto"
          ) -> tuple[Directions, CurvatureSample, CurvatureBasis | None]:
    """Load the sample, set the analysis δ (``space.delta`` is the training δ), run CG with the
    distributed matvec; unless ``misalignment`` is None, solve the primary query again at the
    misalignment damping (inserted after the named queries); optionally take G's top eigenpairs
    (for trace-back's ‖Δθ₋ₙ‖); free the sample."""
    curvature = DistributedCurvature(pool, planner)
    sample = curvature.load()
    emit(CurvatureLoaded(groups=len(sample.groups), segments=sample.segments, pairs=sample.pairs))
    gradients = QueryGradients(queries.names, torch.tensor(queries.gradients, dtype=space.dtype),
                               torch.tensor(queries.losses, dtype=space.dtype))
    # Built once, here, so that the misalignment solve and trace-back's basis reuse it.
    preconditioner = build_preconditioner(space, curvature.matvec, settings)
    delta = resolve_damping(damping, space.delta, lambda: mean_eigenvalue(
        curvature.matvec, space.dim, dtype=space.dtype, device=space.device, seed=settings.seed,
        preconditioner=preconditioner))
    space = dataclasses.replace(space, delta=delta)
    if preconditioner is not None:
        preconditioner = dataclasses.replace(preconditioner, damping=delta)

    def progress(iteration: int, residual: torch.Tensor) -> None:
        emit(SolverStep(iteration, float(residual.max())))

    directions = solve_directions(space, gradients, curvature.matvec, settings, callback=progress,
                                  preconditioner=preconditioner)
    if misalignment is not None:
        named = len(queries.names) - len(queries.traced)
        directions = directions.inserted(named, solve_misalignment(
            space, gradients, curvature.matvec, misalignment, settings, preconditioner, progress))
    basis = None
    if basis_rank and preconditioner is not None and preconditioner.U.shape[1] == space.dim:  # dense: exact norms
        basis = CurvatureBasis(U=preconditioner.U, eigenvalues=preconditioner.eigenvalues, delta=delta)
    elif basis_rank:
        basis = curvature_basis(space, curvature.matvec, basis_rank, settings.seed)
    curvature.release()
    return directions, sample, basis


# -- the saved form (tables.directions holds numpy arrays) -----------------------------------------

def directions_arrays(directions: Directions, basis: CurvatureBasis | None) -> dict[str, np.ndarray]:
    """The tensors of a solve as the arrays ``tables.directions`` saves."""
    tensors = {"vectors": directions.vectors, "query_losses": directions.query_losses,
               "relative_residual": directions.relative_residual}
    if basis is not None:
        tensors.update(basis_U=basis.U, basis_eigenvalues=basis.eigenvalues)
    return {name: t.detach().cpu().numpy() for name, t in tensors.items()}


def directions_meta(directions: Directions, fingerprint: str, **extra: Any) -> DirectionsMeta:
    return DirectionsMeta(fingerprint=fingerprint, names=directions.names, iterations=directions.iterations,
                          converged=directions.converged,
                          relative_residual=dict(zip(directions.names, directions.relative_residual.tolist())),
                          settings=directions.settings, seconds=round(directions.seconds, 3), **extra)


def saved_solution(saved: SavedDirections) -> tuple[Directions, CurvatureBasis | None]:
    """Directions (and the eigenbasis, when saved) as tensors again."""
    meta, tensors = saved.meta, {name: torch.from_numpy(a) for name, a in saved.arrays.items()}
    directions = Directions(names=meta.names, vectors=tensors["vectors"], query_losses=tensors["query_losses"],
                            relative_residual=tensors["relative_residual"], iterations=meta.iterations,
                            converged=meta.converged, settings=meta.settings, seconds=meta.seconds)
    basis = None
    if "basis_U" in tensors:
        basis = CurvatureBasis(U=tensors["basis_U"], eigenvalues=tensors["basis_eigenvalues"],
                               delta=directions.settings["delta"])
    return directions, basis
