"""The influence task: what is differentiated, at which point, under which objective.

Like kronfluence's ``Task``, an ``InfluenceTask`` fixes the model, the parameter subset θ and
its fitted value θ̂, the logit scale s, the damping δ of R(θ) and N (the training-set size that
scales every score, ECIF.md §3). Everything downstream (queries, curvature, scoring, edits)
takes a task and segments; none of it knows about files or Ray.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ecif_ray.data.segments import PairBatch
from ecif_ray.influence.autodiff import Params, SimilarityFn, flatten, unflatten
from ecif_ray.influence.contrastive import NegativeTerm
from ecif_ray.models.checkpoint import Checkpoint
from ecif_ray.models.factory import ClipBundle, similarity_matrix
from ecif_ray.models.subsets import ParamSubset


@dataclass
class InfluenceTask:
    bundle: ClipBundle
    subset: ParamSubset
    logit_scale: float
    delta: float
    n_train: int
    negative_term: NegativeTerm = "exact"
    params: Params = field(init=False)

    def __post_init__(self) -> None:
        if self.n_train < 1:
            raise ValueError(f"n_train must be >= 1, got {self.n_train}")
        if self.delta <= 0:
            raise ValueError(f"delta must be > 0 (it makes G + δI invertible), got {self.delta}")
        self.bundle.model.eval()
        self.params = {n: p.detach() for n, p in self.subset.trainable(self.bundle.model).items()}

    @classmethod
    def from_checkpoint(cls, ckpt: Checkpoint, n_train: int, negative_term: NegativeTerm = "exact",
                        delta: float | None = None) -> InfluenceTask:
        """δ defaults to the checkpoint's: the analysis then uses the objective that was trained."""
        return cls(bundle=ckpt.bundle, subset=ckpt.meta.param_subset, logit_scale=ckpt.meta.logit_scale,
                   delta=ckpt.meta.delta if delta is None else delta, n_train=n_train,
                   negative_term=negative_term)

    @property
    def names(self) -> list[str]:
        return list(self.params)

    @property
    def dim(self) -> int:
        return sum(p.numel() for p in self.params.values())

    @property
    def device(self) -> torch.device:
        return next(iter(self.params.values())).device

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.params.values())).dtype

    def similarity_fn(self, batch: PairBatch) -> SimilarityFn:
        """θ ↦ S(θ) for one segment."""
        images, tokens = batch.images.to(self.device, self.dtype), batch.tokens.to(self.device)

        def similarity(params: Params) -> torch.Tensor:
            return similarity_matrix(self.bundle.model, images, tokens, self.logit_scale, params)

        return similarity

    def flatten(self, tensors: Params, leading: int = 0) -> torch.Tensor:
        return flatten(tensors, self.names, leading)

    def unflatten(self, flat: torch.Tensor) -> Params:
        return unflatten(flat, self.params)

    def requires_grad_params(self) -> Params:
        """A fresh differentiable copy of θ̂ (for query gradients by reverse mode)."""
        return {n: p.clone().requires_grad_(True) for n, p in self.params.items()}
