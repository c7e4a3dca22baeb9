"""Trunk and tail: run the frozen start of each tower once, differentiate only the rest.

Each tower is cut at the first module that holds a trainable parameter of the subset θ:

* ``pooled``  the pooled, pre-projection features (θ = projection heads): the tail is one matmul;
* ``block``   the hidden states entering transformer block b (LoRA, last-k): the tail is blocks b…,
              the final norm, pooling and projection; the text tail keeps the token ids because
              open_clip pools text at the end-of-text position;
* ``input``   no trunk (θ includes the embeddings, or a tower this module does not know how to cut):
              the tail is the whole tower.

The trunk runs under ``no_grad`` (``run_trunk``); every quantity that differentiates θ — query
gradients, G·V, the Nyström sketch, the scoring JVP, edits, trace-back — goes through
``Tail``, which replays the rest of open_clip's own forward on the cached features with the
modules' own code (``VisionTransformer._pool``, ``text_global_pool``), so the cached path equals
the uncached one to rounding (tests/test_trunk.py holds it to float64 precision).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from open_clip.model import CLIP
from open_clip.transformer import VisionTransformer, text_global_pool
from torch import nn

from ecif_ray.data.features import TrunkFeatures

CutKind = Literal["input", "block", "pooled"]
_ORDER = {"input": 0, "block": 1, "pooled": 2}


@dataclass(frozen=True)
class TowerCut:
    """Where one tower is cut; ``block`` is the first tail block (``kind == "block"``)."""

    kind: CutKind
    block: int = 0

    def __str__(self) -> str:
        return f"block {self.block}" if self.kind == "block" else self.kind


@dataclass(frozen=True)
class TrunkSplit:
    image: TowerCut
    text: TowerCut

    @classmethod
    def for_model(cls, model: nn.Module, trainable: list[str]) -> TrunkSplit:
        """The latest cut of each tower that still leaves every trainable tensor in the tail."""
        return cls(image=_image_cut(model, trainable), text=_text_cut(model, trainable))

    def describe(self) -> str:
        return f"image: {self.image}, text: {self.text}"


def _earliest(cuts: list[TowerCut], default: TowerCut) -> TowerCut:
    return min(cuts, key=lambda c: (_ORDER[c.kind], c.block), default=default)


def _stage(name: str, blocks: str, n_blocks: int, post: tuple[str, ...], head: tuple[str, ...]) -> TowerCut:
    if name.startswith(blocks):
        return TowerCut("block", int(name[len(blocks):].split(".", 1)[0]))
    if name.startswith(post):
        return TowerCut("block", n_blocks)
    if name.startswith(head):
        return TowerCut("pooled")
    return TowerCut("input")


def _image_cut(model: nn.Module, trainable: list[str]) -> TowerCut:
    visual = getattr(model, "visual", None)
    if not isinstance(visual, VisionTransformer):  # timm / ResNet towers: no trunk (exact, slower)
        return TowerCut("input")
    n_blocks = len(visual.transformer.resblocks)
    cuts = [_stage(n, "visual.transformer.resblocks.", n_blocks, ("visual.ln_post.", "visual.attn_pool"),
                   ("visual.proj",)) for n in trainable if n.startswith("visual.")]
    return _earliest(cuts, TowerCut("pooled"))


def _text_cut(model: nn.Module, trainable: list[str]) -> TowerCut:
    if not isinstance(model, CLIP):  # CustomTextCLIP (HF or custom text towers): no trunk
        return TowerCut("input")
    n_blocks = len(model.transformer.resblocks)
    cuts = [_stage(n, "transformer.resblocks.", n_blocks, ("ln_final.",), ("text_projection",))
            for n in trainable if not n.startswith(("visual.", "logit_"))]
    return _earliest(cuts, TowerCut("pooled"))


# -- the pieces of open_clip's forward, split at a block index ------------------------------------

def _blocks(transformer: nn.Module, x: torch.Tensor, start: int, stop: int,
            attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``transformer.resblocks[start:stop]`` on batch-first ``x`` (as ``Transformer.forward``)."""
    if not transformer.batch_first:
        x = x.transpose(0, 1)
    for block in transformer.resblocks[start:stop]:
        x = block(x, attn_mask=attn_mask)
    if not transformer.batch_first:
        x = x.transpose(0, 1)
    return x


def _project(x: torch.Tensor, projection: nn.Module | torch.Tensor | None) -> torch.Tensor:
    if projection is None:
        return x
    return projection(x) if isinstance(projection, nn.Module) else x @ projection


def _image_trunk(visual: VisionTransformer, cut: TowerCut, images: torch.Tensor) -> torch.Tensor:
    if cut.kind == "input":
        return images
    n_blocks = len(visual.transformer.resblocks)
    x = _blocks(visual.transformer, visual._embeds(images), 0, cut.block if cut.kind == "block" else n_blocks)
    return x if cut.kind == "block" else visual._pool(x)[0]


def _image_tail(visual: nn.Module, cut: TowerCut, x: torch.Tensor) -> torch.Tensor:
    if cut.kind == "input":
        return visual(x)
    if cut.kind == "block":
        x = visual._pool(_blocks(visual.transformer, x, cut.block, len(visual.transformer.resblocks)))[0]
    return _project(x, visual.proj)


def _text_embed(model: CLIP, tokens: torch.Tensor) -> torch.Tensor:
    cast = model.transformer.get_cast_dtype()
    return model.token_embedding(tokens).to(cast) + model.positional_embedding.to(cast)


def _text_pool(model: CLIP, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return text_global_pool(model.ln_final(x), tokens, model.text_pool_type, eos_token_id=model.text_eos_id)


def _text_trunk(model: nn.Module, cut: TowerCut, tokens: torch.Tensor) -> torch.Tensor:
    if cut.kind == "input":
        return tokens
    assert isinstance(model, CLIP)
    n_blocks = len(model.transformer.resblocks)
    x = _blocks(model.transformer, _text_embed(model, tokens), 0, cut.block if cut.kind == "block" else n_blocks,
                model.attn_mask)
    return x if cut.kind == "block" else _text_pool(model, x, tokens)


def _text_tail(model: nn.Module, cut: TowerCut, x: torch.Tensor, tokens: torch.Tensor | None) -> torch.Tensor:
    if cut.kind == "input":
        return model.encode_text(x)
    if cut.kind == "block":
        assert tokens is not None, "a block cut of the text tower keeps the token ids"
        x = _blocks(model.transformer, x, cut.block, len(model.transformer.resblocks), model.attn_mask)
        x = _text_pool(model, x, tokens)
    return _project(x, model.text_projection)


@torch.no_grad()
def run_trunk(model: nn.Module, split: TrunkSplit, images: torch.Tensor | None, tokens: torch.Tensor | None,
              source: str = "") -> TrunkFeatures:
    """The trunk's outputs for a batch (either tower may be skipped: pass None, get an empty tensor);
    ``source`` names the trunk (reuse of attached features checks it)."""
    empty = torch.empty(0)
    image = empty if images is None else _image_trunk(model.visual, split.image, images)
    text = empty if tokens is None else _text_trunk(model, split.text, tokens)
    keep_tokens = tokens is not None and split.text.kind == "block"
    return TrunkFeatures(image, text, tokens if keep_tokens else None, source)


class Tail(nn.Module):
    """The differentiable rest of both towers, as a module: ``torch.func.functional_call`` swaps θ in.

    Its parameters are the model's, under the prefix ``model.`` (see :meth:`params`)."""

    def __init__(self, model: nn.Module, split: TrunkSplit):
        super().__init__()
        self.model = model
        self.split = split

    @staticmethod
    def params(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {f"model.{name}": p for name, p in params.items()}

    def forward(self, image: torch.Tensor | None, text: torch.Tensor | None,
                tokens: torch.Tensor | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """L2-normalised (image, text) embeddings from trunk features; either may be None."""
        image_emb = None if image is None else F.normalize(_image_tail(self.model.visual, self.split.image, image),
                                                           dim=-1)
        text_emb = None if text is None else F.normalize(_text_tail(self.model, self.split.text, text, tokens), dim=-1)
        return image_emb, text_emb
