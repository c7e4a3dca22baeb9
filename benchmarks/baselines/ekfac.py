"""EK-FAC influence (Grosse et al., 2023) with the ``kronfluence`` package and a contrastive Task.

Model: kronfluence tracks ``nn.Linear``/``nn.Conv2d`` modules. open_clip keeps its projection heads
as bare matrices (``visual.proj``, ``text_projection``), so for the *heads* subset the analysed model
is the exact equivalent: the frozen towers' pooled features (computed once, ``proj`` removed) feeding
two bias-free ``nn.Linear`` heads initialised from θ̂, then S = s·û·v̂ᵀ. ``check_equivalence`` asserts
it reproduces the real model's similarity matrix. LoRA is not supported: our adapters are weight
parametrizations of the fused ``nn.MultiheadAttention`` in-projection, which kronfluence cannot see
(it would need the attention rewritten as separate tracked Linear layers).

Task (the contrastive part):
* ``compute_train_loss(batch)`` = the segment's symmetric InfoNCE, Σ_i[−log P^r_ii − log P^c_ii];
  batches are the training segments exactly (sequential sampler, batch size = segment size, shards
  a multiple of it); with ``sample=True`` (true Fisher) each row's/column's target is drawn from
  that row's/column's softmax instead of the diagonal.
* ``compute_measurement(batch)`` = the same loss on a validation segment (the query ECIF uses).

Batch coupling — what it means: kronfluence assumes a batch loss is a sum of per-example losses
and forms example n's gradient from its hooks as (∂L_batch/∂output_n) ⊗ input_n. For InfoNCE the
batch loss is not such a sum; the hook-level "per-example gradient" of pair n is then the gradient
of the *whole segment loss* through pair n's own embeddings: its own anchors plus its appearances
in every other anchor's denominator, seen only through n's features (other pairs' embeddings are
held fixed). That is neither the pointwise ∇Pos_n nor ECIF's removal gradient ∇(Pos_n + Neg_n)
(which also moves the other anchors' softmaxes through *their* own features' coupling to n); the
EK-FAC curvature is likewise fitted to these coupled pseudo-gradients. Damping: δ of R(θ) (the
fine-tuning objective's own ridge), passed as kronfluence's ``damping_factor``.

Sign: kronfluence's score is ∇f(query)ᵀ H⁻¹ ∇L(train); positive = up-weighting the pair lowers the
validation loss (helpful), so harm = −Σ_query score.
"""

from __future__ import annotations

import copy
import logging
import tempfile
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import data

from ecif_ray.data.segments import PairBatch
from ecif_ray.influence.contrastive import segment_loss
from ecif_ray.models.checkpoint import Checkpoint
from ecif_ray.models.factory import similarity_matrix


class ProjectionHeads(nn.Module):
    """S = s · normalize(text_feats @ Wt) · normalize(image_feats @ Wv)ᵀ with tracked Linear heads."""

    def __init__(self, visual_proj: torch.Tensor, text_proj: torch.Tensor, logit_scale: float) -> None:
        super().__init__()
        self.image = nn.Linear(visual_proj.shape[0], visual_proj.shape[1], bias=False)
        self.text = nn.Linear(text_proj.shape[0], text_proj.shape[1], bias=False)
        with torch.no_grad():
            self.image.weight.copy_(visual_proj.T)
            self.text.weight.copy_(text_proj.T)
        self.logit_scale = logit_scale

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        image = F.normalize(self.image(image_features), dim=-1)
        text = F.normalize(self.text(text_features), dim=-1)
        return self.logit_scale * text @ image.T


@torch.no_grad()
def pooled_features(ckpt: Checkpoint, batches: Sequence[PairBatch]) -> tuple[torch.Tensor, torch.Tensor]:
    """Frozen towers' pooled features before the projection heads, [N, width] each."""
    towers = copy.deepcopy(ckpt.model).eval()
    towers.visual.proj = None
    towers.text_projection = None
    images = torch.cat([towers.encode_image(b.images) for b in batches])
    texts = torch.cat([towers.encode_text(b.tokens) for b in batches])
    return images, texts


def heads_model(ckpt: Checkpoint) -> ProjectionHeads:
    theta = ckpt.meta.param_subset.names(ckpt.model)
    if sorted(theta) != ["text_projection", "visual.proj"]:
        raise ValueError(f"EK-FAC adapter supports the 'heads' subset of a CLIP model only, got θ = {theta[:4]}")
    params = dict(ckpt.model.named_parameters())
    return ProjectionHeads(params["visual.proj"].detach(), params["text_projection"].detach(),
                           ckpt.meta.logit_scale)


@torch.no_grad()
def check_equivalence(ckpt: Checkpoint, heads: ProjectionHeads, batch: PairBatch,
                      features: tuple[torch.Tensor, torch.Tensor]) -> None:
    expected = similarity_matrix(ckpt.model, batch.images, batch.tokens, ckpt.meta.logit_scale)
    got = heads(features[0][: len(batch)], features[1][: len(batch)])
    if not torch.allclose(expected, got, atol=1e-4, rtol=1e-4):
        raise AssertionError(f"heads model differs from the CLIP model: {float((expected - got).abs().max())}")


def _task_class():
    from kronfluence.task import Task

    class ContrastiveTask(Task):
        """Segment-level symmetric InfoNCE for kronfluence (see the module docstring)."""

        def compute_train_loss(self, batch, model, sample: bool = False) -> torch.Tensor:
            s = model(*batch)
            if not sample:
                return segment_loss(s)
            with torch.no_grad():
                rows = torch.multinomial(torch.softmax(s.detach(), dim=1), 1).flatten()
                cols = torch.multinomial(torch.softmax(s.detach().T, dim=1), 1).flatten()
            return F.cross_entropy(s, rows, reduction="sum") + F.cross_entropy(s.T, cols, reduction="sum")

        def compute_measurement(self, batch, model) -> torch.Tensor:
            return segment_loss(model(*batch))

    return ContrastiveTask


def ekfac_scores(ckpt: Checkpoint, train: Sequence[PairBatch], val: Sequence[PairBatch],
                 seed: int = 0) -> dict[tuple[str, str], float]:
    """Harm = −Σ_{val} EK-FAC influence for every training pair (larger = more harmful)."""
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments

    segment = ckpt.meta.segment_size
    if any(len(b) != segment for b in train[:-1]):
        raise ValueError("EK-FAC needs every training segment but the last to be full (shard size a multiple of "
                         "the segment size) so that kronfluence's sequential batches are the segments")
    torch.manual_seed(seed)
    train_features, val_features = pooled_features(ckpt, train), pooled_features(ckpt, val)
    heads = heads_model(ckpt)
    check_equivalence(ckpt, heads, train[0], train_features)
    task = _task_class()()
    model = prepare_model(heads, task)
    train_set = data.TensorDataset(*train_features)
    val_set = data.TensorDataset(*val_features)
    logging.getLogger("kronfluence").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="kronfluence-") as out:
        analyzer = Analyzer("ecif-bench", model, task, cpu=True, disable_tqdm=True, output_dir=out)
        analyzer.fit_all_factors("ekfac", dataset=train_set, per_device_batch_size=segment,
                                 factor_args=FactorArguments(strategy="ekfac"), overwrite_output_dir=True)
        analyzer.compute_pairwise_scores("val", factors_name="ekfac", query_dataset=val_set, train_dataset=train_set,
                                         per_device_query_batch_size=segment, per_device_train_batch_size=segment,
                                         score_args=ScoreArguments(damping_factor=ckpt.meta.delta),
                                         overwrite_output_dir=True)
        scores = analyzer.load_pairwise_scores("val")["all_modules"].to(torch.float64)  # [n_val, n_train]
    harm = (-scores.sum(dim=0)).tolist()
    keys = [(b.shard, k) for b in train for k in b.keys]
    return dict(zip(keys, harm, strict=True))
