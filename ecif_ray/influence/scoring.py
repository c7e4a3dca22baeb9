"""The scoring pass for one segment (docs/method.md §4): one JVP per direction, then closed forms.

For a direction s (a solved query), Ṡ = (∂S/∂θ)·s gives every pair's sᵀ∇Pos_n and sᵀ∇Neg_n in
O(B²); the scores are then

    pos_is_n = −sᵀ∇Pos_n / N,   neg_is_n = −sᵀ∇Neg_n / N,   ecif_is_n = pos_is_n + neg_is_n

so each score is the predicted change L'(θ̂) − L'(θ̂_{−n}) of the query loss: positive = removing
the pair lowers the query loss = the pair is harmful.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ecif_ray.data.segments import PairBatch
from ecif_ray.influence.autodiff import segment_jvp
from ecif_ray.influence.contrastive import pair_directional_derivatives, pair_terms
from ecif_ray.influence.task import InfluenceTask


@dataclass
class SegmentScores:
    """Per-pair results of one segment; score arrays are [Q, B] for Q query directions."""

    shard: str
    segment: int
    keys: list[str]
    shard_indices: list[int]
    captions: list[str]
    clip_score: torch.Tensor  # [B] s·û·v̂
    loss: torch.Tensor        # [B] the pair's own anchor terms (Pos_n)
    pos_is: torch.Tensor      # [Q, B]
    neg_is: torch.Tensor      # [Q, B]
    reference_clip_score: torch.Tensor | None = None  # [B] under a reference model (models.reference)

    @property
    def ecif_is(self) -> torch.Tensor:
        return self.pos_is + self.neg_is

    def __len__(self) -> int:
        return len(self.keys)


def directional_derivatives(task: InfluenceTask, batch: PairBatch, tangents: torch.Tensor, chunk: int = 16
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(S, sᵀ∇Pos [Q,B], sᵀ∇Neg [Q,B]) for flat tangents [Q, D], vmapped in chunks of Q."""
    similarity = task.similarity_fn(batch)
    d_pos, d_neg, s = [], [], None
    for start in range(0, tangents.shape[0], chunk):
        block = task.unflatten(tangents[start:start + chunk])
        s, s_dot = segment_jvp(similarity, task.params, block)
        p, n = pair_directional_derivatives(s, s_dot, task.negative_term)
        d_pos.append(p)
        d_neg.append(n)
    return s, torch.cat(d_pos), torch.cat(d_neg)


@torch.no_grad()
def score_segment(task: InfluenceTask, batch: PairBatch, directions: torch.Tensor, chunk: int = 16) -> SegmentScores:
    """Every pair's pos_is / neg_is against each direction (rows of [Q, D])."""
    s, d_pos, d_neg = directional_derivatives(task, batch, directions, chunk)
    terms = pair_terms(s)
    return SegmentScores(
        shard=batch.shard, segment=batch.segment, keys=list(batch.keys), shard_indices=list(batch.shard_indices),
        captions=list(batch.captions), clip_score=terms.clip_score.cpu(), loss=terms.pos.cpu(),
        pos_is=(-d_pos / task.n_train).cpu(), neg_is=(-d_neg / task.n_train).cpu(),
    )
