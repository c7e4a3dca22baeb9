"""TracIn (Pruthi et al., 2020) over saved fine-tuning checkpoints, for the contrastive loss.

    TracIn(n, D') = Σ_c η_c · ∇L'(θ_c) · ∇ℓ_n(θ_c)

with ℓ_n the pair's own contrastive term Pos_n = −log P^r_nn − log P^c_nn (what a pointwise method
sees of a pair) and L' the validation loss. A positive TracIn means the steps taken on pair n
lowered L' (a proponent), so the harm score is −TracIn.

Why a JVP instead of explicit per-pair gradients: the dot product ∇L'·∇Pos_n for every pair of a
segment is the directional derivative of Pos_n along g' = ∇L'(θ_c), which the scoring kernel
(``score_segment``) computes exactly from one JVP of the similarity matrix per segment. So this is
TracIn with exact gradients, at the cost of one scoring pass per checkpoint — no approximation.
Note ``score_segment`` returns pos_is = −g'ᵀ∇Pos_n / N, hence harm = Σ_c η_c · N · pos_is_c.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ecif_ray.data.segments import PairBatch
from ecif_ray.influence.queries import ValidationQuery
from ecif_ray.influence.scoring import score_segment
from ecif_ray.influence.task import InfluenceTask
from ecif_ray.models.checkpoint import load_checkpoint


def checkpoint_scores(checkpoint: str | Path, train: Sequence[PairBatch], val: Sequence[PairBatch]
                      ) -> dict[tuple[str, str], float]:
    """−∇L'(θ_c)·∇Pos_n(θ_c) for every training pair at one checkpoint."""
    ckpt = load_checkpoint(checkpoint)
    n_train = sum(len(b) for b in train)
    task = InfluenceTask.from_checkpoint(ckpt, n_train)
    gradient = ValidationQuery(list(val)).gradients(task).gradients  # [1, D]
    out: dict[tuple[str, str], float] = {}
    for batch in train:
        scores = score_segment(task, batch, gradient)
        for key, value in zip(batch.keys, (scores.pos_is[0] * n_train).tolist(), strict=True):
            out[(batch.shard, key)] = value
    return out


def tracin_scores(checkpoints: Sequence[str | Path], learning_rates: Sequence[float], train: Sequence[PairBatch],
                  val: Sequence[PairBatch]) -> dict[tuple[str, str], float]:
    """Harm = −Σ_c η_c ∇L'(θ_c)·∇Pos_n(θ_c) (larger = more harmful)."""
    if len(checkpoints) != len(learning_rates):
        raise ValueError("one learning rate per checkpoint")
    total: dict[tuple[str, str], float] = {}
    for ckpt, lr in zip(checkpoints, learning_rates, strict=True):
        for key, value in checkpoint_scores(ckpt, train, val).items():
            total[key] = total.get(key, 0.0) + lr * value
    return total
