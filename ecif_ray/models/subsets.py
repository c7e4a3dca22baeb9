"""Influence parameter subsets: which tensors θ are fine-tuned and analysed, and which are frozen.

One mechanism serves training, the JVP scoring pass and the GGN products: ``ParamSubset.apply``
prepares the model (adds LoRA adapters when asked, sets ``requires_grad``) and
``ParamSubset.trainable`` returns the ordered name→tensor dict that torch.func
(``functional_call``/``jvp``/``vjp``) differentiates; everything else stays in the module as a
frozen constant.

The logit scale is never part of θ: docs/method.md holds it fixed during influence analysis, and the
fine-tuning objective R(θ) is defined with it fixed too.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from ecif_ray.models.lora import LORA_TARGETS, add_lora, is_lora_param

SubsetKind = Literal["all", "heads", "lora", "last-k"]

# Projection heads across open_clip model classes: CLIP (visual.proj, text_projection),
# CustomTextCLIP (text.text_projection, or text.proj.* for Hugging Face text towers),
# timm vision towers (visual.head.*).
_HEAD_PREFIXES = ("visual.proj", "visual.head.", "text_projection", "text.text_projection", "text.proj")
# Final norms that sit between the last block and the heads; they belong to "the last k blocks".
_FINAL_NORM_PREFIXES = ("visual.ln_post.", "ln_final.", "text.ln_final.")
_FROZEN_ALWAYS = ("logit_scale", "logit_bias")


class ParamSubset(BaseModel):
    """Which parameters form θ (see docs/method.md §1)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: SubsetKind = "heads"
    last_k: int = Field(1, ge=1, description="last-k: number of final blocks per tower")
    lora_rank: int = Field(4, ge=1, description="lora: adapter rank r")
    lora_blocks: int = Field(1, ge=1, description="lora: adapters on the last L blocks of both towers")
    lora_alpha: float = Field(4.0, gt=0, description="lora: update scale is alpha / rank")
    lora_targets: tuple[str, ...] = ("q", "k", "v", "out")

    @model_validator(mode="after")
    def _check_targets(self) -> ParamSubset:
        bad = [t for t in self.lora_targets if t not in LORA_TARGETS]
        if bad or not self.lora_targets:
            raise ValueError(f"lora_targets must be a non-empty subset of {LORA_TARGETS}, got {self.lora_targets}")
        return self

    def describe(self) -> str:
        if self.kind == "lora":
            return f"lora(r={self.lora_rank}, blocks={self.lora_blocks}, targets={','.join(self.lora_targets)})"
        if self.kind == "last-k":
            return f"last-k(k={self.last_k})"
        return self.kind

    # -- model preparation -------------------------------------------------------------------

    def apply(self, model: nn.Module) -> nn.Module:
        """Add adapters if needed and freeze everything outside θ. Returns the same model."""
        if self.kind == "lora":
            for blocks in tower_blocks(model).values():
                for block in _last(blocks, self.lora_blocks, "lora_blocks"):
                    add_lora(_attention_of(block), self.lora_rank, self.lora_alpha, self.lora_targets)
        selected = set(self.names(model))
        for name, p in model.named_parameters():
            p.requires_grad_(name in selected)
        return model

    def names(self, model: nn.Module) -> list[str]:
        """Names of θ's tensors, in the model's parameter order."""
        all_names = [n for n, _ in model.named_parameters()]
        if self.kind == "all":
            return [n for n in all_names if n not in _FROZEN_ALWAYS]
        if self.kind == "lora":
            chosen = [n for n in all_names if is_lora_param(n)]
            if not chosen:
                raise ValueError("parameter subset 'lora': model has no LoRA adapters; call ParamSubset.apply first")
            return chosen
        heads = [n for n in all_names if n.startswith(_HEAD_PREFIXES)]
        if not heads:
            raise ValueError(f"parameter subset '{self.kind}': no projection heads found (looked for {_HEAD_PREFIXES})")
        if self.kind == "heads":
            return heads
        prefixes = tuple(f"{path}." for blocks in tower_block_paths(model).values()
                         for path in _last(blocks, self.last_k, "last_k"))
        return [n for n in all_names
                if n.startswith(prefixes) or n.startswith(_FINAL_NORM_PREFIXES) or n in heads]

    def trainable(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """θ as an ordered dict of the model's own tensors (for torch.func.functional_call)."""
        params = dict(model.named_parameters())
        return {n: params[n] for n in self.names(model)}

    def initial_anchor(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """θ_0 of the δ term when fine-tuning starts: the current values, or 0 for LoRA adapters."""
        return {n: (torch.zeros_like(p) if is_lora_param(n) else p.detach().clone())
                for n, p in self.trainable(model).items()}


def _last(items: list, k: int, field: str) -> list:
    if k > len(items):
        raise ValueError(f"{field}={k} but the tower has only {len(items)} blocks")
    return items[-k:]


def tower_block_paths(model: nn.Module) -> dict[str, list[str]]:
    """Module paths of each tower's transformer blocks, e.g. {"visual": [...], "text": [...]}."""
    paths: dict[str, list[str]] = {}
    for name, module in model.named_modules():
        if name.endswith(("resblocks", "encoder.layer")) and isinstance(module, nn.ModuleList):
            tower = "visual" if name.startswith("visual.") else "text"
            if tower in paths:
                raise ValueError(f"ambiguous block lists in tower {tower!r}: {name}")
            paths[tower] = [f"{name}.{i}" for i in range(len(module))]
    if set(paths) != {"visual", "text"}:
        raise ValueError(f"could not find transformer blocks of both towers (found {sorted(paths)}); "
                         "use parameter subset 'heads' or 'all' for this architecture")
    return paths


def tower_blocks(model: nn.Module) -> dict[str, list[nn.Module]]:
    modules = dict(model.named_modules())
    return {tower: [modules[p] for p in paths] for tower, paths in tower_block_paths(model).items()}


def _attention_of(block: nn.Module) -> nn.MultiheadAttention:
    attn = getattr(block, "attn", None)
    if not isinstance(attn, nn.MultiheadAttention):
        raise ValueError(f"LoRA needs open_clip blocks with nn.MultiheadAttention, found {type(block).__name__}")
    return attn
