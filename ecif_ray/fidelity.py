"""Leave-out retraining: the ground truth that influence predictions are held to (docs/method.md §6.2).

``LeaveOut`` holds a fitted θ̂ and re-fits R without a set D* (warm-started from θ̂, same anchor,
same segments minus D*, and the original N in R, as ECIF's removal step R − F_{D*}/N assumes),
then reports the actual change of the validation loss L'(θ̂) − L'(θ̂_{−D*}) — the quantity
``ecif_is`` predicts. Used by the fidelity tests and the LDS benchmark.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, replace

import numpy as np
import torch
from scipy.stats import spearmanr

from ecif_ray.data.exclusions import ExclusionSet
from ecif_ray.data.segments import PairBatch, load_segments
from ecif_ray.influence.curvature import (
    Damping,
    SolverSettings,
    local_matvec,
    mean_eigenvalue,
    resolve_damping,
    solve_directions,
)
from ecif_ray.influence.queries import ValidationQuery
from ecif_ray.influence.scoring import score_segment
from ecif_ray.influence.task import InfluenceTask
from ecif_ray.models.checkpoint import load_checkpoint
from ecif_ray.models.subsets import ParamSubset
from ecif_ray.training import FitSettings, fit


@dataclass
class LeaveOut:
    task: InfluenceTask             # at θ̂
    anchor: dict[str, torch.Tensor]
    batches: list[PairBatch]
    query: ValidationQuery
    settings: FitSettings           # how θ̂ was fitted (L-BFGS for tight optima)

    def __post_init__(self) -> None:
        self.theta_hat = {n: p.detach().clone() for n, p in self.task.params.items()}
        self.settings = replace(self.settings, n_pairs=self.task.n_train, progress=False)
        with torch.no_grad():
            self.base_loss = float(self.query.loss(self.task, self.theta_hat))

    def refit(self, removed: ExclusionSet) -> dict[str, torch.Tensor]:
        """θ̂_{−D*}: minimise (1/N)(Σ L_seg without D*) + (δ/2)‖θ − θ_0‖² from θ̂."""
        params = self.task.subset.trainable(self.task.bundle.model)
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(self.theta_hat[name])
        kept = [b for b in (batch.without(removed) for batch in self.batches) if b is not None]
        fit(self.task.bundle, params, self.anchor, kept, self.settings)
        refitted = {n: p.detach().clone() for n, p in params.items()}
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(self.theta_hat[name])
        return refitted

    def actual_change(self, removed: ExclusionSet) -> float:
        """L'(θ̂) − L'(θ̂_{−D*}): positive when removing D* lowers the validation loss."""
        refitted = self.refit(removed)
        with torch.no_grad():
            return self.base_loss - float(self.query.loss(self.task, refitted))


@dataclass
class Experiment:
    leave_out: LeaveOut
    scores: dict[str, tuple[float, float]]  # key -> (pos_is, neg_is) against the validation query
    load: dict                              # segment loading arguments (preprocess, tokenizer, size)
    cg_iterations: int


def fitted_experiment(ckpt: str, corpus: str, kind: str, delta: float, segment_size: int = 16) -> Experiment:
    """Fit θ̂ for ``kind`` on ``corpus/train`` from a pretrained checkpoint (float64, L-BFGS to a
    tight optimum) and score every training pair against ``corpus/val``."""
    checkpoint = load_checkpoint(ckpt)
    subset = ParamSubset(kind=kind)
    subset.apply(checkpoint.model)
    checkpoint.model.double()
    load = {"preprocess": checkpoint.bundle.preprocess, "tokenizer": checkpoint.bundle.tokenizer,
            "segment_size": segment_size}
    batches, _ = load_segments(f"{corpus}/train", **load)
    val, _ = load_segments(f"{corpus}/val", **load)
    for b in batches + val:
        b.images = b.images.double()
    anchor = subset.initial_anchor(checkpoint.model)
    settings = FitSettings(delta=delta, logit_scale=checkpoint.meta.logit_scale, epochs=40, lr=1.0,
                           optimizer="lbfgs", progress=False)
    fit(checkpoint.bundle, subset.trainable(checkpoint.model), anchor, batches, settings)
    task = InfluenceTask(bundle=checkpoint.bundle, subset=subset, logit_scale=checkpoint.meta.logit_scale,
                         delta=delta, n_train=sum(len(b) for b in batches))
    leave_out = LeaveOut(task, anchor, batches, ValidationQuery(val), settings)
    scores, iterations, _ = score_experiment(leave_out)
    return Experiment(leave_out, scores, load, iterations)


def score_experiment(leave_out: LeaveOut, damping: Damping = "exact"
                     ) -> tuple[dict[str, tuple[float, float]], int, float]:
    """(pos_is, neg_is) of every training pair against the validation query, with the analysis δ
    that ``damping`` picks (``exact``: the δ θ̂ was fitted with); also the CG iterations and that δ."""
    matvec = local_matvec(leave_out.task, leave_out.batches)
    delta = resolve_damping(damping, leave_out.task.delta, lambda: mean_eigenvalue(
        matvec, leave_out.task.dim, dtype=leave_out.task.dtype, device=leave_out.task.device))
    task = dataclasses.replace(leave_out.task, delta=delta)
    directions = solve_directions(task, leave_out.query.gradients(task), matvec,
                                  SolverSettings(tol=1e-10, max_iter=1000))
    if not directions.converged:
        raise RuntimeError(f"CG did not converge (residual {directions.relative_residual.tolist()})")
    scores = {}
    for batch in leave_out.batches:
        s = score_segment(task, batch, directions.vectors)
        for i, key in enumerate(s.keys):
            scores[key] = (float(s.pos_is[0, i]), float(s.neg_is[0, i]))
    return scores, directions.iterations, delta


def agreement(actual: np.ndarray, predicted: np.ndarray) -> dict[str, float]:
    """Spearman rank correlation and the least-squares slope of actual on predicted."""
    slope = float(np.polyfit(predicted, actual, 1)[0])
    return {"spearman": float(spearmanr(actual, predicted)[0]), "slope": slope,
            "mean_abs_actual": float(np.abs(actual).mean()), "mean_abs_predicted": float(np.abs(predicted).mean())}
