"""Low-rank adapters (LoRA) on open_clip attention projections.

open_clip's towers use ``nn.MultiheadAttention``, whose query/key/value projections are *fused*
into one ``in_proj_weight`` of shape [3d, d]. Wrapping the module would change its forward; a
weight parametrization instead adds the low-rank update to the fused matrix in place, so the
module's own forward (including its fused kernels outside influence analysis) keeps running.
Each of q, k, v gets its own adapter pair, placed in its own row block of the fused matrix.

Parametrized weights stay visible to ``torch.func.functional_call``: the adapter tensors are
ordinary parameters (``...parametrizations.in_proj_weight.0.lora_A_q``) that a parameter dict
can replace.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn
from torch.nn.utils import parametrize

LORA_TARGETS = ("q", "k", "v", "out")


class FusedLoRA(nn.Module):
    """Adds ``scale * B_t @ A_t`` to the row block of each targeted projection t.

    For the fused in-projection the row blocks are q=[0:d], k=[d:2d], v=[2d:3d]; for the output
    projection the single block "out" covers the whole matrix.
    """

    def __init__(self, out_features: int, in_features: int, blocks: tuple[str, ...], targets: Iterable[str],
                 rank: int, alpha: float) -> None:
        super().__init__()
        self.blocks = blocks
        self.targets = tuple(t for t in blocks if t in set(targets))
        self.block_rows = out_features // len(blocks)
        self.scale = alpha / rank
        for t in self.targets:
            a = torch.empty(rank, in_features)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            # B starts at zero so the adapted model equals the base model at initialisation.
            self.register_parameter(f"lora_A_{t}", nn.Parameter(a))
            self.register_parameter(f"lora_B_{t}", nn.Parameter(torch.zeros(self.block_rows, rank)))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        deltas = []
        for t in self.blocks:
            if t in self.targets:
                a, b = getattr(self, f"lora_A_{t}"), getattr(self, f"lora_B_{t}")
                deltas.append(self.scale * (b @ a))
            else:
                deltas.append(weight.new_zeros(self.block_rows, weight.shape[1]))
        return weight + torch.cat(deltas, dim=0)


def add_lora(attn: nn.MultiheadAttention, rank: int, alpha: float, targets: Iterable[str]) -> None:
    """Attach LoRA adapters to one attention module (idempotent per module)."""
    if not isinstance(attn, nn.MultiheadAttention) or attn.in_proj_weight is None:
        raise TypeError(f"LoRA expects nn.MultiheadAttention with a fused in_proj_weight, got {type(attn).__name__}")
    targets = tuple(targets)
    if parametrize.is_parametrized(attn, "in_proj_weight"):
        return
    d_out, d_in = attn.in_proj_weight.shape
    in_targets = [t for t in targets if t in ("q", "k", "v")]
    if in_targets:
        parametrize.register_parametrization(
            attn, "in_proj_weight", FusedLoRA(d_out, d_in, ("q", "k", "v"), in_targets, rank, alpha))
    if "out" in targets:
        w = attn.out_proj.weight
        parametrize.register_parametrization(
            attn.out_proj, "weight", FusedLoRA(w.shape[0], w.shape[1], ("out",), ["out"], rank, alpha))


def is_lora_param(name: str) -> bool:
    return ".lora_A_" in name or ".lora_B_" in name

