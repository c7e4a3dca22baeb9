"""TRAK (Park et al., 2023) with the ``traker`` package's own CLIP model output, run on CPU.

What is the package's and what is ours:

* ``trak.TRAKer`` does the work: per-example gradients of ``CLIPModelOutput`` (the CLIP margin
  against a simulated batch of other embeddings, TRAK paper §5.1) by ``torch.func`` vmap, a random
  projection (on CPU ``traker`` selects its ``BasicProjector`` with a Gaussian matrix; the CUDA
  ``fast_jl`` kernel is not needed), the features Φ(ΦᵀΦ)⁻¹, the out-to-loss reweighting (1 − p)
  and the final scores.
* Adapter (ours): (1) ``CLIPModelOutput.get_embeddings`` hard-codes ``.cuda()``, so the simulated
  batch embeddings are computed here on CPU and set on the class exactly as that method would;
  (2) the model handed to ``TRAKer`` is a copy whose only ``nn.Parameter``s are θ (the fine-tuned
  subset: heads or LoRA adapters) and whose frozen weights are buffers — ``TRAKer(grad_wrt=...)``
  would otherwise compute per-example gradients of *every* weight (the 3.2M-entry token
  embedding included) and drop them afterwards; (3) forward-AD-safe attention kernels (math SDPA,
  no MHA fast path) are selected while TRAK differentiates, because ``vmap`` over the fused
  kernels fails just as forward mode does; (4) ``CLIPModelOutput.get_out_to_loss_grad`` returns
  shape [B] where ``TRAKer.featurize`` stores [B, 1] (a shape bug in traker 0.3.2: featurizing
  raises "shape mismatch"); the subclass below only adds that trailing dimension; (5) a second
  traker bug with one-block projections, see ``_restore_projection``.

Targets are the validation pairs; TRAK's score for (train j, target z) estimates how including j
changes z's model output (the margin: larger = better aligned), so the harm score of a training pair
is −Σ_z score(j, z).
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from ecif_ray.data.segments import PairBatch
from ecif_ray.influence.autodiff import forward_ad_attention
from ecif_ray.models.checkpoint import Checkpoint


def _clip_output_class():
    from trak.modelout_functions import CLIPModelOutput

    class CLIPOutput(CLIPModelOutput):
        """traker's CLIP model output with the out-to-loss term shaped [B, 1] as its saver expects."""

        def get_out_to_loss_grad(self, model, weights, buffers, batch):
            return super().get_out_to_loss_grad(model, weights, buffers, batch).reshape(-1, 1)

    return CLIPOutput


def _restore_projection(projector) -> None:
    """traker 0.3.2's BasicProjector frees its matrix in ``finalize_features`` and, when it fits in
    one block (proj_dim ≤ 100), never regenerates it before scoring targets (AttributeError
    'proj_matrix'); regenerate it from the same generator state, as the multi-block path does."""
    if getattr(projector, "num_blocks", 0) == 1 and not getattr(projector, "proj_matrix_available", True):
        projector.generate_sketch_matrix(projector.generator_states[0])


def theta_only(model: nn.Module, theta: Sequence[str]) -> nn.Module:
    """A copy of ``model`` in which every parameter outside ``theta`` is a buffer (so gradients,
    and TRAK's per-example gradients, are taken with respect to θ only)."""
    clone = copy.deepcopy(model)
    keep = set(theta)
    for name, param in list(clone.named_parameters()):
        if name in keep:
            continue
        owner_path, _, attr = name.rpartition(".")
        owner = clone.get_submodule(owner_path) if owner_path else clone
        delattr(owner, attr)
        owner.register_buffer(attr, param.detach())
    missing = keep - {n for n, _ in clone.named_parameters()}
    if missing:
        raise ValueError(f"θ names not found in the model: {sorted(missing)[:3]}")
    return clone.eval()


@torch.no_grad()
def set_simulated_batch(model: nn.Module, train: Sequence[PairBatch]) -> None:
    """What ``CLIPModelOutput.get_embeddings`` does, on CPU: the normalised image/text embeddings of
    the training pairs that TRAK's model output draws its simulated batch from."""
    from trak.modelout_functions import CLIPModelOutput

    images, texts = [], []
    for batch in train:
        image, text, _ = model(batch.images, batch.tokens)[:3]
        images.append(image)
        texts.append(text)
    CLIPModelOutput.image_embeddings = torch.cat(images)
    CLIPModelOutput.text_embeddings = torch.cat(texts)
    CLIPModelOutput.num_computed_embeddings = CLIPModelOutput.image_embeddings.shape[0]


def trak_scores(ckpt: Checkpoint, train: Sequence[PairBatch], val: Sequence[PairBatch], proj_dim: int = 2048,
                simulated_batch_size: int = 300, seed: int = 0,
               lambda_reg: float = 0.0) -> dict[tuple[str, str], float]:
    """Harm = −Σ_{z ∈ val} TRAK(j, z) for every training pair j (larger = more harmful)."""
    from trak import TRAKer

    torch.manual_seed(seed)  # the simulated batches are drawn with torch.multinomial
    theta = ckpt.meta.param_subset.names(ckpt.model)
    model = theta_only(ckpt.model, theta)
    n_train = sum(len(b) for b in train)
    set_simulated_batch(model, train)
    task = _clip_output_class()(simulated_batch_size=min(simulated_batch_size, n_train - 1))
    with tempfile.TemporaryDirectory(prefix="trak-") as save_dir, forward_ad_attention():
        traker = TRAKer(model=model, task=task, train_set_size=n_train, save_dir=save_dir, device="cpu",
                        proj_dim=min(proj_dim, sum(p.numel() for p in model.parameters())),
                        use_half_precision=False, projector_seed=seed, lambda_reg=lambda_reg, logging_level=40)
        traker.load_checkpoint(model.state_dict(), model_id=0)
        for batch in train:
            traker.featurize(batch=(batch.images, batch.tokens), num_samples=len(batch))
        traker.finalize_features()
        _restore_projection(traker.projector)
        traker.start_scoring_checkpoint(exp_name="val", checkpoint=model.state_dict(), model_id=0,
                                        num_targets=sum(len(b) for b in val))
        for batch in val:
            traker.score(batch=(batch.images, batch.tokens), num_samples=len(batch))
        scores = np.asarray(traker.finalize_scores(exp_name="val"), dtype=np.float64)  # [n_train, n_val]
    harm = -scores.sum(axis=1)
    keys = [(b.shard, k) for b in train for k in b.keys]
    return dict(zip(keys, harm.tolist(), strict=True))
