"""The influence task: what is differentiated, at which point, under which objective.

Like kronfluence's ``Task``, an ``InfluenceTask`` fixes the model, the parameter subset θ and
its fitted value θ̂, the logit scale s, the damping δ of the analysis and N (the training-set size
that scales every score, docs/method.md §3). Everything downstream (queries, curvature, scoring,
edits) takes a task and segments; none of it knows about files or Ray.

The task also owns the trunk/tail split (``influence.trunk``): ``features`` runs the frozen trunk
once for a batch (or returns the features already attached to it), and every function of θ
(``similarity_fn``, ``embeddings``) runs the tail only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ecif_ray.data.features import TrunkFeatures
from ecif_ray.data.segments import PairBatch
from ecif_ray.influence.autodiff import Params, SimilarityFn, flatten, unflatten
from ecif_ray.influence.contrastive import NegativeTerm
from ecif_ray.influence.trunk import Tail, TrunkSplit, run_trunk
from ecif_ray.models.checkpoint import Checkpoint
from ecif_ray.models.factory import ClipBundle
from ecif_ray.models.subsets import ParamSubset


@dataclass
class SegmentStack:
    """Trunk features of M equal-size segments, one after the other: one tail call gives all M
    similarity matrices ([M, B, B]), so a G·V product is a few large calls, not one per segment."""

    features: TrunkFeatures
    segment_size: int

    @property
    def segments(self) -> int:
        return len(self.features) // self.segment_size

    @property
    def pairs(self) -> int:
        return len(self.features)


@dataclass
class InfluenceTask:
    bundle: ClipBundle
    subset: ParamSubset
    logit_scale: float
    delta: float
    n_train: int
    negative_term: NegativeTerm = "exact"
    params: Params = field(init=False)
    split: TrunkSplit = field(init=False)
    _tail: Tail = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.n_train < 1:
            raise ValueError(f"n_train must be >= 1, got {self.n_train}")
        if self.delta <= 0:
            raise ValueError(f"delta must be > 0 (it makes G + δI invertible), got {self.delta}")
        self.bundle.model.eval()
        self.params = {n: p.detach() for n, p in self.subset.trainable(self.bundle.model).items()}
        self.split = TrunkSplit.for_model(self.bundle.model, self.names)
        self._tail = Tail(self.bundle.model, self.split)

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

    # -- trunk (once per pair, no gradients) and tail (a function of θ) ---------------------------

    @property
    def trunk_source(self) -> str:
        """Identifies this task's trunk (model object, cut, dtype): attached features from another
        trunk are never reused."""
        return f"{id(self.bundle.model):x}:{self.split.describe()}:{self.dtype}"

    def trunk(self, images: torch.Tensor | None = None, tokens: torch.Tensor | None = None) -> TrunkFeatures:
        """The trunk's outputs for raw inputs (either may be None)."""
        return run_trunk(self.bundle.model, self.split,
                         None if images is None else images.to(self.device, self.dtype),
                         None if tokens is None else tokens.to(self.device), self.trunk_source)

    def features(self, batch: PairBatch) -> TrunkFeatures:
        """The batch's trunk features: the attached ones when this trunk computed them, else computed now."""
        if batch.features is not None and batch.features.source == self.trunk_source:
            return batch.features.to(self.device)
        return self.trunk(batch.images, batch.tokens)

    def featurize(self, batch: PairBatch) -> PairBatch:
        """The batch with this trunk's features attached (computed once, reused by every later call)."""
        return dataclasses.replace(batch, features=self.features(batch))

    def stack(self, batches: Sequence[PairBatch]) -> list[SegmentStack]:
        """The segments' trunk features stacked, one stack per segment size (in first-seen order).

        Each batch keeps a view of its rows as ``batch.features``, so the features are computed once
        and held once, and later calls (scoring the same batches) reuse them."""
        by_size: dict[int, list[PairBatch]] = {}
        for batch in batches:
            by_size.setdefault(len(batch), []).append(batch)
        stacks = []
        for size, members in by_size.items():
            features = TrunkFeatures.cat([self.features(b) for b in members])
            for i, batch in enumerate(members):
                batch.features = features.rows(i * size, (i + 1) * size)
            stacks.append(SegmentStack(features, size))
        return stacks

    def slices(self, stack: SegmentStack, rows: int) -> list[SegmentStack]:
        """The stack in consecutive parts of at most ``rows`` pairs (at least one segment each)."""
        step = max(1, rows // stack.segment_size) * stack.segment_size
        return [SegmentStack(stack.features.rows(start, start + step), stack.segment_size)
                for start in range(0, stack.pairs, step)]

    def embeddings(self, features: TrunkFeatures, params: Params) -> tuple[torch.Tensor, torch.Tensor]:
        """L2-normalised (image, text) embeddings of θ from trunk features (a skipped tower gives an
        empty tensor)."""
        image = features.image if features.image.numel() else None
        text = features.text if features.text.numel() else None
        out = torch.func.functional_call(self._tail, Tail.params(params), (image, text, features.tokens),
                                         strict=False)
        return tuple(torch.empty(0) if e is None else e for e in out)  # type: ignore[return-value]

    def clip_scores(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """s·û·v̂ of each pair from its own embeddings: the diagonal of S without the [B, B] matrix."""
        return self.logit_scale * (text * image).sum(-1)

    def similarity_fn(self, batch: PairBatch | SegmentStack) -> SimilarityFn:
        """θ ↦ S(θ): [B, B] for one segment, [M, B, B] for a stack (row i = text i, column j = image j)."""
        if isinstance(batch, SegmentStack):
            features, segments = batch.features.to(self.device), batch.segments
        else:
            features, segments = self.features(batch), 0

        def similarity(params: Params) -> torch.Tensor:
            image, text = self.embeddings(features, params)
            if segments:
                image, text = image.unflatten(0, (segments, -1)), text.unflatten(0, (segments, -1))
            return self.logit_scale * text @ image.mT

        return similarity

    def flatten(self, tensors: Params, leading: int = 0) -> torch.Tensor:
        return flatten(tensors, self.names, leading)

    def unflatten(self, flat: torch.Tensor) -> Params:
        return unflatten(flat, self.params)

    def requires_grad_params(self) -> Params:
        """A fresh differentiable copy of θ̂ (for query gradients by reverse mode)."""
        return {n: p.clone().requires_grad_(True) for n, p in self.params.items()}
