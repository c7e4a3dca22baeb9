"""A reference model: a second CLIP whose own CLIP score of each pair is reported beside the audited
model's (``pairs.reference_clip_score``).

Data teams already filter with a large pretrained CLIP that never saw their corpus (DataComp-style
CLIP-score filtering). Beside the audited model it answers a different question: the audited
model's own CLIP score is blind to the misalignment it has learned, a reference model is not
(BENCHMARKS.md §1, systematic misalignment: AUROC 0.851 self vs 0.912 reference).

A reference is either an ecif-ray checkpoint directory (loaded with the same safety rules as the
audited checkpoint: safetensors only, builtin architectures or ``trusted_arch``), or an open_clip
model named ``ARCH:TAG`` (e.g. ``ViT-B-32:laion2b_s34b_b79k``), whose weights open_clip downloads
as usual on the cluster. It brings its own preprocessing and tokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
from PIL import Image

from ecif_ray.models.checkpoint import load_checkpoint
from ecif_ray.models.factory import ClipBundle, create_model, similarity_matrix


@dataclass
class ReferenceModel:
    bundle: ClipBundle
    logit_scale: float

    @classmethod
    def load(cls, spec: str, device: str = "cpu", trusted_arch: str | None = None) -> ReferenceModel:
        """``spec``: an ecif-ray checkpoint directory, or ``ARCH:TAG`` of a builtin open_clip model."""
        if Path(spec).is_dir():
            ckpt = load_checkpoint(spec, device, trusted_arch=trusted_arch)
            return cls(ckpt.bundle, float(ckpt.meta.logit_scale))
        arch, _, tag = spec.rpartition(":")
        if arch not in open_clip.list_models() or not tag:
            raise ValueError(f"reference: {spec!r} is neither a checkpoint directory nor ARCH:TAG of an open_clip "
                             "model (e.g. ViT-B-32:laion2b_s34b_b79k)")
        bundle = create_model(arch, pretrained=tag, device=device)
        return cls(bundle, float(bundle.model.logit_scale.exp()))

    @torch.no_grad()
    def clip_scores(self, images: list[Image.Image], captions: list[str]) -> torch.Tensor:
        """s · û · v̂ of each (image, caption) pair under this model, [B] float64 on the CPU."""
        device = next(self.bundle.model.parameters()).device
        dtype = next(self.bundle.model.parameters()).dtype
        pixels = torch.stack([self.bundle.preprocess(image) for image in images]).to(device, dtype)
        tokens = torch.as_tensor(self.bundle.tokenizer(captions)).long().to(device)
        return similarity_matrix(self.bundle.model, pixels, tokens, self.logit_scale).diagonal().double().cpu()
