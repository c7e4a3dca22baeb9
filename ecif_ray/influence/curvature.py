"""Curvature and the iHVP (ECIF.md §5): s = (G + δI)⁻¹ g' for every query gradient g'.

G = (1/N) Σ_m J_mᵀ Λ_m J_m is estimated on a fixed *curvature sample* of segments, whose size
does not grow with the corpus: (1/n) Σ_{m ∈ sample} J_mᵀ Λ_m J_m with n the sample's pair count.
The solver only needs a matvec on [D, Q] blocks, so the same ``solve_directions`` runs with the
local matvec below or with one whose products are computed by Ray actors and summed on the
driver (pipeline/).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch

from ecif_ray.data.segments import PairBatch
from ecif_ray.influence.autodiff import ggn_product
from ecif_ray.influence.queries import QueryGradients
from ecif_ray.influence.solvers import Matvec, NystromPreconditioner, conjugate_gradient, nystrom_preconditioner
from ecif_ray.influence.task import InfluenceTask

Preconditioner = Literal["none", "nystrom"]


@dataclass(frozen=True)
class SolverSettings:
    tol: float = 1e-5        # float32 reaches ~1e-6 at best on ill-conditioned G (eps · κ)
    max_iter: int = 500
    # Nyström (rank 64) costs one batched block of matvecs and cut CG from 142 to 18 iterations
    # (7.2 s → 0.85 s) on the micro model with δ = 1e-2 (see tests/test_traceback.py setup).
    preconditioner: Preconditioner = "nystrom"
    nystrom_rank: int = 64
    seed: int = 0
    chunk: int = 32  # vectors per JVP/VJP vmap (memory bound)


DEFAULT_SOLVER = SolverSettings()


def ggn_sum(task: InfluenceTask, batches: list[PairBatch], V: torch.Tensor, chunk: int = 32) -> torch.Tensor:
    """Σ_{m ∈ batches} J_mᵀ Λ_m J_m V for a [D, Q] block (unnormalised: callers divide by pairs)."""
    out = torch.zeros_like(V)
    for start in range(0, V.shape[1], chunk):
        block = task.unflatten(V[:, start:start + chunk].T.contiguous())
        for batch in batches:
            product = ggn_product(task.similarity_fn(batch), task.params, block)
            out[:, start:start + chunk] += task.flatten(product, leading=1).T
    return out


def local_matvec(task: InfluenceTask, batches: list[PairBatch], chunk: int = 32) -> Matvec:
    """G·V on this process's curvature sample (G without δ; the solver adds δ)."""
    n_pairs = sum(len(b) for b in batches)
    if n_pairs == 0:
        raise ValueError("the curvature sample is empty")

    def matvec(V: torch.Tensor) -> torch.Tensor:
        return ggn_sum(task, batches, V, chunk) / n_pairs

    return matvec


@dataclass
class Directions:
    """Solved query directions s_q = (G + δI)⁻¹ g'_q, rows of ``vectors`` [Q, D]."""

    names: list[str]
    vectors: torch.Tensor
    query_losses: torch.Tensor
    relative_residual: torch.Tensor
    iterations: int
    converged: bool
    settings: dict = field(default_factory=dict)
    seconds: float = 0.0

    def select(self, names: list[str]) -> Directions:
        idx = [self.names.index(n) for n in names]
        return Directions(names, self.vectors[idx], self.query_losses[idx], self.relative_residual[idx],
                          self.iterations, self.converged, self.settings, self.seconds)


def build_preconditioner(task: InfluenceTask, matvec: Matvec,
                         settings: SolverSettings = DEFAULT_SOLVER) -> NystromPreconditioner | None:
    """The settings' preconditioner of (G + δI) on ``matvec``'s curvature sample (None: plain CG).

    It depends only on G, δ and the settings, not on the right-hand sides: build it once and pass
    it to every solve on the same sample (its sketch costs ``nystrom_rank`` products with G)."""
    if settings.preconditioner != "nystrom":
        return None
    generator = torch.Generator(device="cpu").manual_seed(settings.seed)
    return nystrom_preconditioner(matvec, task.dim, min(settings.nystrom_rank, task.dim), task.delta,
                                  dtype=task.dtype, device=task.device, generator=generator)


def solve_directions(task: InfluenceTask, queries: QueryGradients, matvec: Matvec,
                     settings: SolverSettings = DEFAULT_SOLVER,
                     callback: Callable[[int, torch.Tensor], None] | None = None,
                     preconditioner: NystromPreconditioner | None = None) -> Directions:
    """CG (optionally Nyström-preconditioned) on (G + δI) S = Gᵀ' for all queries at once.

    ``preconditioner``: one built earlier by :func:`build_preconditioner` for the same G, δ and
    settings (default: build it here)."""
    t0 = time.perf_counter()
    if preconditioner is None:
        preconditioner = build_preconditioner(task, matvec, settings)
    elif preconditioner.damping != task.delta:
        raise ValueError(f"the preconditioner was built for δ = {preconditioner.damping}, the task has {task.delta}")
    result = conjugate_gradient(matvec, queries.gradients.T.contiguous(), task.delta, tol=settings.tol,
                                max_iter=settings.max_iter, preconditioner=preconditioner, callback=callback)
    residual = result.relative_residual.reshape(-1)
    return Directions(names=queries.names, vectors=result.x.T.contiguous(), query_losses=queries.losses,
                      relative_residual=residual, iterations=result.iterations, converged=result.converged,
                      settings={"tol": settings.tol, "max_iter": settings.max_iter,
                                "preconditioner": settings.preconditioner, "nystrom_rank": settings.nystrom_rank,
                                "delta": task.delta},
                      seconds=time.perf_counter() - t0)
