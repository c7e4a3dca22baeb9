"""Curvature and the iHVP (docs/method.md §5): s = (G + δI)⁻¹ g' for every query gradient g'.

G = (1/N) Σ_m J_mᵀ Λ_m J_m is estimated on the *curvature sample* of segments: (1/n) Σ_{m ∈ sample}
J_mᵀ Λ_m J_m with n the sample's pair count. The sample is the whole training set up to a cap
(``influence.sample``), and it is held as trunk features stacked by segment size
(``InfluenceTask.stack``), so a product runs the tail only, in a few large calls.
The solver only needs a matvec on [D, Q] blocks, so the same ``solve_directions`` runs with the
local matvec below or with one whose products are computed by Ray actors and summed on the
driver (pipeline/).

Damping of the analysis (docs/method.md §5): ``exact`` is the δ the model was trained with (the
counterfactual of the method), ``auto`` is kronfluence's label-free rule, 0.1 × the mean
eigenvalue of G (never below the training δ), or a number.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch

from ecif_ray.data.segments import PairBatch
from ecif_ray.influence.autodiff import ggn_product
from ecif_ray.influence.queries import MISALIGNMENT_QUERY, QueryGradients
from ecif_ray.influence.settings import DEFAULT_SOLVER, SolverSettings
from ecif_ray.influence.solvers import (
    Matvec,
    NystromPreconditioner,
    conjugate_gradient,
    dense_preconditioner,
    hutchinson_trace,
    nystrom_preconditioner,
)
from ecif_ray.influence.task import InfluenceTask, SegmentStack

Damping = Literal["exact", "auto"] | float
MisalignmentDamping = Literal["auto"] | float
AUTO_DAMPING_FACTOR = 0.1  # kronfluence's default: 0.1 × the mean eigenvalue of the curvature
# δ of the misalignment direction = this × G's largest eigenvalue (chosen on Fashion-MNIST settings:
# benchmarks/misalignment_damping.py, BENCHMARKS.md "The misalignment column").
MISALIGNMENT_DAMPING_FACTOR = 0.1
POWER_ITERATIONS = 30  # λ₁ without a preconditioner (preconditioner "none")
TRACE_PROBES = 64  # Hutchinson probes for the mean eigenvalue (CG path; the dense path is exact)
DENSE_MAX_DIM = 16384  # G as a dense [D, D] matrix: 2 GiB in float64 at this size
# Elements of the largest per-call tensor (Q vectors × pairs × (segment size + trunk features per
# pair)): large enough to amortise per-call overhead, small enough to stay in cache (measured:
# 256–512-pair calls for 32 vectors beat 2,560-pair calls by 2×, float64, ecif-small heads).
CALL_ELEMENTS = 2**21


@dataclass(frozen=True)
class SolveSpace:
    """The parts of an ``InfluenceTask`` that ``solve_directions`` reads (the driver holds no model)."""

    dim: int
    delta: float
    dtype: torch.dtype
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))


class SolveTarget(Protocol):
    """What a solve needs to know of the task: an ``InfluenceTask``, or the driver's ``SolveSpace``
    (which holds no model)."""

    @property
    def dim(self) -> int: ...
    @property
    def delta(self) -> float: ...
    @property
    def dtype(self) -> torch.dtype: ...
    @property
    def device(self) -> torch.device: ...


def curvature_stacks(task: InfluenceTask, batches: list[PairBatch]) -> list[SegmentStack]:
    """The segments' trunk features (computed once, attached to the batches), stacked by segment size."""
    return task.stack(batches) if batches else []


def ggn_sum(task: InfluenceTask, stacks: list[SegmentStack], V: torch.Tensor, chunk: int = 32) -> torch.Tensor:
    """Σ_m J_mᵀ Λ_m J_m V over the stacked segments for a [D, Q] block (unnormalised: callers
    divide by pairs). Each tail call covers as many segments as ``CALL_ELEMENTS`` allows."""
    out = torch.zeros_like(V)
    for start in range(0, V.shape[1], chunk):
        block = task.unflatten(V[:, start:start + chunk].T.contiguous())
        q = min(chunk, V.shape[1] - start)
        for stack in stacks:
            rows = CALL_ELEMENTS // (q * (stack.segment_size + stack.features.numel_per_pair))
            for part in task.slices(stack, rows):
                product = ggn_product(task.similarity_fn(part), task.params, block)
                out[:, start:start + chunk] += task.flatten(product, leading=1).T
    return out


def local_matvec(task: InfluenceTask, batches: list[PairBatch], chunk: int = 32) -> Matvec:
    """G·V on segments held by this process (G without δ; the solver adds δ); their trunk features
    are computed here, once."""
    stacks = curvature_stacks(task, batches)
    n_pairs = sum(s.pairs for s in stacks)
    if n_pairs == 0:
        raise ValueError("the curvature sample is empty")

    def matvec(V: torch.Tensor) -> torch.Tensor:
        return ggn_sum(task, stacks, V, chunk) / n_pairs

    return matvec


def mean_eigenvalue(matvec: Matvec, dim: int, *, dtype: torch.dtype, device: torch.device | str, seed: int = 0,
                    preconditioner: NystromPreconditioner | None = None) -> float:
    """tr(G)/D: exact from a dense eigendecomposition, else a seeded Hutchinson estimate."""
    if preconditioner is not None and preconditioner.U.shape[1] == dim:
        return float(preconditioner.eigenvalues.sum()) / dim
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return hutchinson_trace(matvec, dim, TRACE_PROBES, dtype=dtype, device=device, generator=generator) / dim


def resolve_damping(damping: Damping, training_delta: float, mean_eig: Callable[[], float]) -> float:
    """δ of the analysis: ``exact`` (the training δ), ``auto`` (0.1 × mean eigenvalue of G, at least
    the training δ) or a number. ``mean_eig`` is only called for ``auto``."""
    if damping == "exact":
        return training_delta
    if damping == "auto":
        return max(training_delta, AUTO_DAMPING_FACTOR * mean_eig())
    value = float(damping)
    if value <= 0:
        raise ValueError(f"damping must be > 0, got {value}")
    return value


def top_eigenvalue(matvec: Matvec, dim: int, *, dtype: torch.dtype, device: torch.device | str, seed: int = 0,
                   preconditioner: NystromPreconditioner | None = None) -> float:
    """λ₁(G): the preconditioner's largest eigenvalue (exact when dense; the Nyström sketch's top
    eigenvalue is accurate for the top of the spectrum), else a seeded power iteration."""
    if preconditioner is not None:
        return float(preconditioner.eigenvalues.max())
    generator = torch.Generator(device="cpu").manual_seed(seed)
    v = torch.randn(dim, 1, generator=generator, dtype=torch.float64).to(device=device, dtype=dtype)
    value = 0.0
    for _ in range(POWER_ITERATIONS):
        v = v / v.norm()
        w = matvec(v)
        value = float((v * w).sum())
        v = w
    return value


def resolve_misalignment_damping(rule: MisalignmentDamping, analysis_delta: float,
                                 lambda1: Callable[[], float]) -> float:
    """δ of the misalignment direction: ``auto`` (``MISALIGNMENT_DAMPING_FACTOR`` × λ₁, at least the
    analysis δ) or a number. ``lambda1`` is only called for ``auto``."""
    if rule == "auto":
        return max(analysis_delta, MISALIGNMENT_DAMPING_FACTOR * lambda1())
    value = float(rule)
    if value <= 0:
        raise ValueError(f"misalignment_damping must be > 0, got {value}")
    return value


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

    def inserted(self, at: int, other: Directions) -> Directions:
        """``other``'s rows inserted before row ``at``; solver records merged (the settings keep this
        solve's δ; ``other``'s go under ``settings[<its first name>]``)."""
        def cat(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return torch.cat([a[:at], b, a[at:]])

        settings = {**self.settings, other.names[0]: other.settings}
        return Directions(self.names[:at] + other.names + self.names[at:], cat(self.vectors, other.vectors),
                          cat(self.query_losses, other.query_losses),
                          cat(self.relative_residual, other.relative_residual),
                          max(self.iterations, other.iterations), self.converged and other.converged, settings,
                          self.seconds + other.seconds)


def build_preconditioner(task: SolveTarget, matvec: Matvec,
                         settings: SolverSettings = DEFAULT_SOLVER) -> NystromPreconditioner | None:
    """The settings' preconditioner of (G + δI) on ``matvec``'s curvature sample (None: plain CG).

    It depends only on G, δ and the settings, not on the right-hand sides: build it once and pass
    it to every solve on the same sample (its sketch costs ``nystrom_rank`` products with G)."""
    if settings.preconditioner == "none":
        return None
    if settings.preconditioner == "dense":
        if task.dim > DENSE_MAX_DIM:
            raise ValueError(f"preconditioner 'dense' forms G as a [D, D] matrix; D = {task.dim} > {DENSE_MAX_DIM}: "
                             "use 'nystrom'")
        return dense_preconditioner(matvec, task.dim, task.delta, dtype=task.dtype, device=task.device)
    generator = torch.Generator(device="cpu").manual_seed(settings.seed)
    return nystrom_preconditioner(matvec, task.dim, min(settings.nystrom_rank, task.dim), task.delta,
                                  dtype=task.dtype, device=task.device, generator=generator)


def solve_directions(task: SolveTarget, queries: QueryGradients, matvec: Matvec,
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
    tol = settings.tolerance(task.dtype)
    result = conjugate_gradient(matvec, queries.gradients.T.contiguous(), task.delta, tol=tol,
                                max_iter=settings.max_iter, preconditioner=preconditioner, callback=callback)
    residual = result.relative_residual.reshape(-1)
    return Directions(names=queries.names, vectors=result.x.T.contiguous(), query_losses=queries.losses,
                      relative_residual=residual, iterations=result.iterations, converged=result.converged,
                      settings={"tol": tol, "max_iter": settings.max_iter,
                                "preconditioner": settings.preconditioner, "nystrom_rank": settings.nystrom_rank,
                                "delta": task.delta},
                      seconds=time.perf_counter() - t0)


def solve_misalignment(task: SolveTarget, queries: QueryGradients, matvec: Matvec, rule: MisalignmentDamping,
                       settings: SolverSettings = DEFAULT_SOLVER,
                       preconditioner: NystromPreconditioner | None = None,
                       callback: Callable[[int, torch.Tensor], None] | None = None) -> Directions:
    """The primary query (row 0 of ``queries``) solved at the misalignment damping (``task.delta`` is
    the analysis δ), named ``MISALIGNMENT_QUERY``. ``preconditioner``: the analysis solve's, re-targeted."""
    delta = resolve_misalignment_damping(rule, task.delta, lambda: top_eigenvalue(
        matvec, task.dim, dtype=task.dtype, device=task.device, seed=settings.seed, preconditioner=preconditioner))
    space = SolveSpace(dim=task.dim, delta=delta, dtype=task.dtype, device=torch.device(task.device))
    primary = QueryGradients([MISALIGNMENT_QUERY], queries.gradients[:1], queries.losses[:1])
    if preconditioner is not None:
        preconditioner = dataclasses.replace(preconditioner, damping=delta)
    return solve_directions(space, primary, matvec, settings, callback=callback, preconditioner=preconditioner)
