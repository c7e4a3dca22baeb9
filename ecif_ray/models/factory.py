"""Model creation: any open_clip architecture, plus the tiny configs this package ships.

``create_model`` wraps ``open_clip.create_model_and_transforms`` so that a user's cluster loads a
pretrained tag (downloaded as usual) or a local weights file, while tests and the demo use the
shipped tiny configs (``ecif-micro``: 8×8 digits; ``ecif-small``: 28×28 Fashion-MNIST/MNIST)
trained in-process. Images of another size are resized by the model's own preprocessing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
from torch import nn

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
TINY_ARCHS = ("ecif-micro", "ecif-small")

open_clip.add_model_config(MODEL_CONFIG_DIR)


@dataclass
class ClipBundle:
    """A model with the preprocessing and tokenizer that belong to it."""

    arch: str
    model: nn.Module
    preprocess: Callable  # PIL image -> [3, H, W] tensor (open_clip's eval transform)
    tokenizer: Callable   # list[str] -> [N, L] token tensor


def create_model(arch: str, pretrained: str | None = None, device: str | torch.device = "cpu") -> ClipBundle:
    """Build an open_clip model; ``pretrained`` is a tag (downloaded) or a local weights path."""
    if arch not in open_clip.list_models() and not arch.startswith(("hf-hub:", "local-dir:")):
        raise ValueError(f"unknown architecture {arch!r}; known: {', '.join(open_clip.list_models()[:8])}, ... "
                         f"and the shipped tiny configs {', '.join(TINY_ARCHS)}")
    # Random init is expected for the tiny configs; open_clip logs a warning for it.
    level = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            arch, pretrained=pretrained, device=device, pretrained_text=pretrained is not None)
    finally:
        logging.getLogger().setLevel(level)
    model.eval()
    return ClipBundle(arch=arch, model=model, preprocess=preprocess, tokenizer=open_clip.get_tokenizer(arch))


def encode(model: nn.Module, images: torch.Tensor | None = None, tokens: torch.Tensor | None = None,
           params: dict[str, torch.Tensor] | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """L2-normalised (image, text) features; either input may be None.

    With ``params`` the model is called functionally (torch.func.functional_call), so the
    features are functions of θ that jvp/vjp can differentiate.
    """
    outputs = (model(images, tokens) if params is None
               else torch.func.functional_call(model, params, (images, tokens)))
    return outputs[0], outputs[1]


def similarity_matrix(model: nn.Module, images: torch.Tensor, tokens: torch.Tensor, logit_scale: float,
                      params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """S_ij = s · û_i · v̂_j for one segment (docs/method.md §1): row i = text i, column j = image j."""
    image, text = encode(model, images, tokens, params)
    return logit_scale * text @ image.T
