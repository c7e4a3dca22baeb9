"""Queries: the losses whose change the scores predict (docs/method.md §3).

A query yields one or more gradient vectors g' = ∇L'(θ̂) (rows of a [Q, D] block); the driver
turns each into a direction s = (G + δI)⁻¹ g' once, and the scoring pass projects every pair's
Pos/Neg gradients onto it. Three kinds:

* ``ValidationQuery``   L' = (1/N') Σ_m L_seg,m on a trusted pair set with its own fixed segments
                        → misalignment detection / data valuation;
* ``ZeroShotQuery``     mean cross-entropy of labelled images against class-prompt embeddings
                        → task-related IS;
* ``ExampleQuery``      one cross-entropy per test example (e.g. each mispredicted image)
                        → relative-IS trace-back.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ecif_ray.data.features import TrunkFeatures
from ecif_ray.data.segments import PairBatch
from ecif_ray.influence.autodiff import Params
from ecif_ray.influence.contrastive import mean_segment_loss
from ecif_ray.influence.task import InfluenceTask
from ecif_ray.models.zeroshot import ClassSet, labels_of, prompt_classifier, prompt_tokens

MISALIGNMENT_QUERY = "misalignment"
"""The primary query's direction solved again at the misalignment damping: it fills
``pairs.misalignment_pos_is`` and is not a query of its own (no ``scores`` rows)."""


@dataclass
class QueryGradients:
    names: list[str]       # one name per direction, e.g. "val" or "test-000000.tar/test0000042"
    gradients: torch.Tensor  # [Q, D]
    losses: torch.Tensor     # [Q] the query losses at θ̂


def _gradient(task: InfluenceTask, loss_fn) -> tuple[torch.Tensor, torch.Tensor]:
    params = task.requires_grad_params()
    loss = loss_fn(params)
    grads = torch.autograd.grad(loss, list(params.values()))
    return task.flatten(dict(zip(params, grads, strict=True))), loss.detach()


@dataclass
class ValidationQuery:
    """Validation contrastive loss with fixed batching (the engine's default query)."""

    batches: list[PairBatch]
    name: str = "val"

    def loss(self, task: InfluenceTask, params: Params) -> torch.Tensor:
        return mean_segment_loss(task.similarity_fn(b)(params) for b in self.batches)

    def gradients(self, task: InfluenceTask) -> QueryGradients:
        g, loss = _gradient(task, lambda p: self.loss(task, p))
        return QueryGradients([self.name], g[None], loss[None])


def zero_shot_logits(task: InfluenceTask, images: TrunkFeatures, classes: ClassSet, params: Params) -> torch.Tensor:
    """s · v̂ · t̂_cᵀ for each image (its trunk features) and class prompt embedding, both functions of θ."""
    prompts = task.embeddings(task.trunk(tokens=prompt_tokens(task.bundle, classes)), params)[1]
    image = task.embeddings(images, params)[0]
    return task.logit_scale * image @ prompt_classifier(prompts, classes).T


@dataclass
class ZeroShotQuery:
    """Mean zero-shot cross-entropy over labelled images (task-related IS)."""

    batches: list[PairBatch]
    classes: ClassSet
    name: str = "task"

    def loss(self, task: InfluenceTask, params: Params) -> torch.Tensor:
        n = sum(len(b) for b in self.batches)
        total = sum(F.cross_entropy(zero_shot_logits(task, task.trunk(images=b.images), self.classes, params),
                                    labels_of(b).to(task.device), reduction="sum") for b in self.batches)
        return total / n

    def gradients(self, task: InfluenceTask) -> QueryGradients:
        g, loss = _gradient(task, lambda p: self.loss(task, p))
        return QueryGradients([self.name], g[None], loss[None])


@dataclass
class ExampleQuery:
    """One zero-shot cross-entropy per selected test example (shard, key)."""

    examples: list[tuple[PairBatch, int]]  # (batch, index in batch)
    classes: ClassSet

    def gradients(self, task: InfluenceTask) -> QueryGradients:
        names, grads, losses = [], [], []
        for batch, i in self.examples:
            label = labels_of(batch)[i:i + 1].to(task.device)

            def loss_fn(params: Params, batch: PairBatch = batch, i: int = i, label: torch.Tensor = label):
                logits = zero_shot_logits(task, task.trunk(images=batch.images[i:i + 1]), self.classes, params)
                return F.cross_entropy(logits, label)

            g, loss = _gradient(task, loss_fn)
            names.append(f"{batch.shard}/{batch.keys[i]}")
            grads.append(g)
            losses.append(loss)
        return QueryGradients(names, torch.stack(grads), torch.stack(losses))


def stack_queries(parts: list[QueryGradients]) -> QueryGradients:
    names = [n for p in parts for n in p.names]
    if len(set(names)) != len(names):
        raise ValueError(f"query names must be unique, got {names}")
    return QueryGradients(names, torch.cat([p.gradients for p in parts]), torch.cat([p.losses for p in parts]))
