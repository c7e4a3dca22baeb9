"""Relative-IS trace-back (docs/method.md §3): which training pairs caused a test example's mistake.

    relative-IS(x, n) = −∇ℓ_x(θ̂)ᵀ Δθ_{−n} / ‖Δθ_{−n}‖,   Δθ_{−n} = H⁻¹ ∇F_n / N

The numerator is the ordinary score against the direction s_x = H⁻¹∇ℓ_x (−s_xᵀ∇F_n / N). The
denominator needs every pair's own ‖H⁻¹∇F_n‖, hence per-pair gradients: they are computed
exactly, segment by segment, as vmapped VJPs of S with cotangents ∂F_n/∂S (chunked to bound
memory), and the inverse curvature is applied in closed form from a rank-k eigenbasis of G
(randomized Nyström, exact when k = D):

    ‖H⁻¹g‖² = Σ_i (u_iᵀg)² / (λ_i + δ)² + (‖g‖² − Σ_i (u_iᵀg)²) / δ²

Approximation (documented for users): directions of G outside its top-k eigenspace are given
curvature 0, which over-estimates ‖Δθ_{−n}‖ for pairs whose gradients live there.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

import torch
from torch.func import jacrev

from ecif_ray.data.segments import PairBatch
from ecif_ray.influence.autodiff import segment_vjp
from ecif_ray.influence.contrastive import pair_terms
from ecif_ray.influence.curvature import SolveTarget
from ecif_ray.influence.queries import zero_shot_logits
from ecif_ray.influence.solvers import Matvec, nystrom_preconditioner
from ecif_ray.influence.task import InfluenceTask
from ecif_ray.models.zeroshot import ClassSet, labels_of


@dataclass
class CurvatureBasis:
    """Top-k eigenpairs of G (from the curvature sample) and the damping δ."""

    U: torch.Tensor            # [D, k] orthonormal
    eigenvalues: torch.Tensor  # [k]
    delta: float

    def inverse_norms(self, grads: torch.Tensor) -> torch.Tensor:
        """‖(G + δI)⁻¹ g‖ for each row g of [B, D]."""
        coeff = grads @ self.U
        inside = (coeff.square() / (self.eigenvalues + self.delta).square()).sum(dim=1)
        outside = (grads.square().sum(dim=1) - coeff.square().sum(dim=1)).clamp_min(0.0) / self.delta**2
        return torch.sqrt(inside + outside)


def curvature_basis(task: SolveTarget, matvec: Matvec, rank: int, seed: int = 0) -> CurvatureBasis:
    rank = min(rank, task.dim)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    nystrom = nystrom_preconditioner(matvec, task.dim, rank, task.delta, dtype=task.dtype, device=task.device,
                                     generator=generator)
    return CurvatureBasis(U=nystrom.U, eigenvalues=nystrom.eigenvalues, delta=task.delta)


def _removal_terms(task: InfluenceTask):
    def f(s: torch.Tensor) -> torch.Tensor:
        terms = pair_terms(s)
        return terms.pos + (terms.neg_exact if task.negative_term == "exact" else terms.neg_taylor)

    return f


def per_pair_gradients(task: InfluenceTask, batch: PairBatch, chunk: int = 8) -> torch.Tensor:
    """∇_θ F_n = ∇(Pos_n + Neg_n) for every pair of the segment, [B, D]."""
    similarity = task.similarity_fn(batch)
    with torch.no_grad():
        s = similarity(task.params)
    cotangents = jacrev(_removal_terms(task))(s)  # [B, B, B]: ∂F_n/∂S for each n
    rows = []
    for start in range(0, len(batch), chunk):
        grads = segment_vjp(similarity, task.params, cotangents[start:start + chunk])
        rows.append(task.flatten(grads, leading=1))
    return torch.cat(rows)


@dataclass
class TraceScores:
    relative_is: torch.Tensor  # [Q, B]
    ecif_is: torch.Tensor      # [Q, B] −s_xᵀ∇F_n / N


def trace_segment(task: InfluenceTask, batch: PairBatch, directions: torch.Tensor, basis: CurvatureBasis
                  ) -> TraceScores:
    grads = per_pair_gradients(task, batch)               # [B, D]
    numerator = -(directions @ grads.T)                   # [Q, B] = −s_xᵀ∇F_n
    norms = basis.inverse_norms(grads).clamp_min(1e-30)   # ‖H⁻¹∇F_n‖ (N cancels in the ratio)
    return TraceScores(relative_is=numerator / norms, ecif_is=numerator / task.n_train)


@dataclass(order=True)
class TraceHit:
    relative_is: float
    ecif_is: float = field(compare=False)
    shard: str = field(compare=False)
    key: str = field(compare=False)


class TopK:
    """Per-query top-k training pairs by relative-IS (largest = most responsible for the error)."""

    def __init__(self, query_ids: list[str], k: int) -> None:
        self.query_ids, self.k = query_ids, k
        self.heaps: list[list[TraceHit]] = [[] for _ in query_ids]

    def add(self, batch: PairBatch, scores: TraceScores) -> None:
        for q, heap in enumerate(self.heaps):
            for n, key in enumerate(batch.keys):
                hit = TraceHit(float(scores.relative_is[q, n]), float(scores.ecif_is[q, n]), batch.shard, key)
                if len(heap) < self.k:
                    heapq.heappush(heap, hit)
                else:
                    heapq.heappushpop(heap, hit)

    def rows(self) -> list[dict]:
        out = []
        for query_id, heap in zip(self.query_ids, self.heaps, strict=True):
            for rank, hit in enumerate(sorted(heap, reverse=True), start=1):
                out.append({"query_id": query_id, "rank": rank, "shard": hit.shard, "key": hit.key,
                            "relative_is": hit.relative_is, "ecif_is": hit.ecif_is})
        return out


@torch.no_grad()
def mispredicted(task: InfluenceTask, batches: list[PairBatch], classes: ClassSet, limit: int | None = None
                 ) -> list[tuple[PairBatch, int]]:
    """Test examples the model gets wrong, in shard order (at most ``limit``)."""
    wrong: list[tuple[PairBatch, int]] = []
    for batch in batches:
        predicted = zero_shot_logits(task, task.trunk(images=batch.images), classes, task.params).argmax(dim=1).cpu()
        for i in torch.nonzero(predicted != labels_of(batch)).flatten().tolist():
            wrong.append((batch, i))
            if limit is not None and len(wrong) >= limit:
                return wrong
    return wrong
