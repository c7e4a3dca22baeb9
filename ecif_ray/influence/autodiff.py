"""Differentiating a segment's similarity matrix S(θ) through the model with torch.func.

Three primitives, all over the parameter subset θ (a name → tensor dict):
  * ``segment_jvp``   Ṡ = (∂S/∂θ)·t for a stack of Q tangents (forward mode, vmapped), with S itself;
  * ``segment_vjp``   (∂S/∂θ)ᵀ·C for one cotangent C;
  * ``ggn_product``   Σ_m J_mᵀ Λ_m J_m v (JVP → closed-form Λ → VJP), the Gauss–Newton product.

Forward-mode AD has no rule for PyTorch's fused attention kernels, so every call here runs
inside ``forward_ad_attention()``, which selects the math SDPA backend and disables the
nn.MultiheadAttention fast path for the duration of the call only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping

import torch
from torch.func import jvp, vjp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from ecif_ray.influence.contrastive import logit_hessian_product

Params = dict[str, torch.Tensor]
SimilarityFn = Callable[[Params], torch.Tensor]


@contextlib.contextmanager
def forward_ad_attention() -> Iterator[None]:
    """Attention kernels that support forward-mode AD, scoped to the block."""
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel([SDPBackend.MATH]):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


def segment_jvp(similarity: SimilarityFn, params: Params, tangents: Params) -> tuple[torch.Tensor, torch.Tensor]:
    """(S [B,B], Ṡ [Q,B,B]) for tangents stacked along a leading Q dimension."""
    primals = {n: p.detach() for n, p in params.items()}

    def one(tangent: Params) -> tuple[torch.Tensor, torch.Tensor]:
        return jvp(similarity, (primals,), (tangent,))

    with forward_ad_attention():
        s, s_dot = vmap(one, out_dims=(None, 0))(dict(tangents))
    return s, s_dot


def segment_vjp(similarity: SimilarityFn, params: Params, cotangent: torch.Tensor) -> Params:
    """(∂S/∂θ)ᵀ C; C may carry a leading Q dimension (vmapped)."""
    primals = {n: p.detach() for n, p in params.items()}
    with forward_ad_attention():
        _, pullback = vjp(similarity, primals)
        if cotangent.dim() == 2:
            return pullback(cotangent)[0]
        return vmap(lambda c: pullback(c)[0])(cotangent)


def ggn_product(similarity: SimilarityFn, params: Params, vectors: Params) -> Params:
    """J ᵀ Λ J v for one segment and a stack of Q vectors (leading dim), Λ = ∇²_S L_seg."""
    s, s_dot = segment_jvp(similarity, params, vectors)
    return segment_vjp(similarity, params, logit_hessian_product(s, s_dot))


# -- flat-vector views of parameter dicts (the solvers work on [D, Q] blocks) ------------------

def flatten(tensors: Mapping[str, torch.Tensor], names: list[str], leading: int = 0) -> torch.Tensor:
    """Concatenate a dict's tensors in ``names`` order; keep ``leading`` batch dims in front."""
    return torch.cat([tensors[n].reshape(*tensors[n].shape[:leading], -1) for n in names], dim=-1)


def unflatten(flat: torch.Tensor, like: Mapping[str, torch.Tensor]) -> Params:
    """Inverse of ``flatten`` for a [..., D] tensor; ``like`` gives names, order and shapes."""
    out, offset = {}, 0
    lead = flat.shape[:-1]
    for name, ref in like.items():
        size = ref.numel()
        out[name] = flat[..., offset:offset + size].reshape(*lead, *ref.shape)
        offset += size
    if offset != flat.shape[-1]:
        raise ValueError(f"flat vector has {flat.shape[-1]} entries, parameters need {offset}")
    return out
