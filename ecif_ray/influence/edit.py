"""Model edit without retraining (docs/method.md §3): θ̃ = θ̂ + Σ_{n∈D*} Δθ_{−n}.

For a removal set D*, the parameter change is one Newton step on R − F_{D*}/N:

    Δθ = (G + δI)⁻¹ ∇F_{D*}(θ̂) / N,   F_{D*} = Σ_m F_{D*_m}

where, per segment, F_{D*_m} is the loss change of deleting D*_m: their positive terms plus
their negative role among the *kept* anchors (docs/method.md §2). With ``exact`` negatives that is
exactly L_seg(S) − L_seg(S without D*_m); with ``taylor``, the first-order negative term.
One CG solve gives Δθ for the whole set.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ecif_ray.data.exclusions import ExclusionSet
from ecif_ray.data.segments import PairBatch
from ecif_ray.influence.autodiff import Params, segment_vjp
from ecif_ray.influence.contrastive import pair_terms, segment_loss
from ecif_ray.influence.curvature import DEFAULT_SOLVER, SolverSettings, solve_directions
from ecif_ray.influence.queries import QueryGradients
from ecif_ray.influence.solvers import Matvec, NystromPreconditioner
from ecif_ray.influence.task import InfluenceTask


def removal_loss_change(s: torch.Tensor, removed: torch.Tensor, negative_term: str = "exact") -> torch.Tensor:
    """F_{D*_m}(S): the segment-loss change of deleting the pairs where ``removed`` [B] is True."""
    kept = ~removed
    if negative_term == "exact":
        return segment_loss(s) - segment_loss(s[kept][:, kept])
    pos = pair_terms(s).pos[removed].sum()
    p_row, p_col = torch.softmax(s, dim=1), torch.softmax(s, dim=0)
    # Mass the kept anchors put on the removed pairs as wrong matches (rows k ∈ kept, columns n ∈ D*).
    neg = p_row[kept][:, removed].sum() + p_col[removed][:, kept].sum()
    return pos + neg


def removal_gradient(task: InfluenceTask, batches: list[PairBatch], removed: ExclusionSet) -> torch.Tensor:
    """∇_θ F_{D*}(θ̂) as a flat [D] vector."""
    total = torch.zeros(task.dim, dtype=task.dtype, device=task.device)
    for batch in batches:
        mask = torch.tensor([removed.contains(batch.shard, k) for k in batch.keys], device=task.device)
        if not bool(mask.any()):
            continue
        similarity = task.similarity_fn(batch)
        with torch.no_grad():
            s = similarity(task.params)
        s = s.detach().requires_grad_(True)
        (cotangent,) = torch.autograd.grad(removal_loss_change(s, mask, task.negative_term), s)
        total += task.flatten(segment_vjp(similarity, task.params, cotangent))
    return total


@dataclass
class Edit:
    delta_theta: Params     # Δθ per tensor
    removed_pairs: int
    relative_residual: float
    iterations: int

    def apply(self, params: Params) -> Params:
        return {n: p + self.delta_theta[n] for n, p in params.items()}


def edit(task: InfluenceTask, batches: list[PairBatch], removed: ExclusionSet, matvec: Matvec,
         settings: SolverSettings = DEFAULT_SOLVER, preconditioner: NystromPreconditioner | None = None) -> Edit:
    """Δθ for removing ``removed`` from the training set (no retraining)."""
    count = sum(removed.contains(b.shard, k) for b in batches for k in b.keys)
    g = removal_gradient(task, batches, removed) / task.n_train
    # The same (preconditioned) solve as every query direction: Δθ = (G + δI)⁻¹ ∇F_{D*} / N.
    solved = solve_directions(task, QueryGradients(["edit"], g[None], torch.zeros(1)), matvec, settings,
                              preconditioner=preconditioner)
    return Edit(delta_theta=task.unflatten(solved.vectors[0]), removed_pairs=int(count),
                relative_residual=float(solved.relative_residual.max()), iterations=solved.iterations)
