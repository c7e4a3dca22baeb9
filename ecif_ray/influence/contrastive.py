"""Closed forms of the segment-level symmetric InfoNCE loss (docs/method.md §1, §2, §4, §5).

Everything here is pure torch on a segment's similarity matrix ``S`` (``S_ij = s·û_i·v̂_j``; row i =
text anchor i over the segment's images, column j = image anchor j over the segment's texts).
Functions accept extra leading batch dimensions (``[..., B, B]``), never branch on values, and
are therefore usable under ``torch.func.vmap`` / ``jvp`` / ``grad``.

Numerics: fine-tuned CLIP models put almost all softmax mass on one entry per row, so ``P`` is
often within ``1e-13`` of 1. Quantities such as ``log(1 − P)``, ``P/(1 − P)`` and ``Ṡ_kn − r_k``
then cancel catastrophically if formed naively. Each row therefore also gets a softmax with its
*largest* entry removed ("leave-top-out"): every other entry has ``P ≤ 1/2`` (naive forms are
fine), and the top entry's quantities are rebuilt from the leave-top-out softmax without
cancellation. Columns are handled as rows of ``Sᵀ``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import Tensor

NegativeTerm = Literal["taylor", "exact"]

__all__ = [
    "NegativeTerm",
    "PairTerms",
    "logit_hessian_product",
    "mean_segment_loss",
    "pair_directional_derivatives",
    "pair_terms",
    "segment_loss",
    "total_segment_loss",
    "zeta_perturbed_segment_loss",
    "zeta_perturbed_similarity",
]


# ----------------------------------------------------------------------------------------------
# Per-row building blocks (columns = rows of Sᵀ)
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _RowStats:
    """Row-softmax statistics of ``S`` that stay accurate when some ``P`` is close to 1."""

    log_p: Tensor  # [..., B, B] row log-softmax
    is_top: Tensor  # [..., B, B] bool, True at each row's argmax (exactly one per row)
    log1m_p: Tensor  # [..., B, B] log(1 − P), accurate everywhere (−inf only when B == 1)
    loo_p: Tensor  # [..., B, B] softmax of each row with its top entry removed (0 at the top)


def _eye_like(S: Tensor) -> Tensor:
    B = S.shape[-1]
    return torch.eye(B, dtype=torch.bool, device=S.device)


def _row_stats(S: Tensor) -> _RowStats:
    """Why leave-top-out: only the argmax of a row can have ``P > 1/2``, so only it needs care.

    Requires ``B ≥ 2`` (a single-entry row has nothing left once its top is removed).
    """
    B = S.shape[-1]
    top = S.argmax(dim=-1, keepdim=True)
    is_top = torch.arange(B, device=S.device) == top
    s_top = S.gather(-1, top)  # not amax: on ties amax would split the gradient between entries
    rest = S.masked_fill(is_top, float("-inf"))
    # x = log(Σ_{j≠top} P_j / P_top) ≤ log(B − 1): both log P_top = −log1p(eˣ) and
    # log(1 − P_top) = x − log1p(eˣ) keep full relative accuracy as P_top → 1 (log_softmax would
    # round −log P_top ≈ 1e-20 to 0).
    x = torch.logsumexp(rest, dim=-1, keepdim=True) - s_top
    log1p_ex = torch.log1p(x.exp())
    log_p = torch.where(is_top, -log1p_ex, S - (s_top + log1p_ex))
    # Off-top entries: P ≤ 1/2, so log1p(−P) is accurate. Masking the top *before* log1p keeps
    # log1p(−1) = −inf (and its inf gradient) out of the graph entirely.
    p_off_top = log_p.exp().masked_fill(is_top, 0.0)
    log1m_p = torch.where(is_top, x - log1p_ex, torch.log1p(-p_off_top))
    loo_p = torch.softmax(rest, dim=-1)
    return _RowStats(log_p=log_p, is_top=is_top, log1m_p=log1m_p, loo_p=loo_p)


def _row_tangent_terms(stats: _RowStats, S_dot: Tensor, exact: bool) -> tuple[Tensor, Tensor]:
    """Row parts of docs/method.md §4 for tangents ``S_dot`` (``[..., B, B]``, broadcast against S).

    Returns ``(D, M)``:
      * ``D_kn = Ṡ_kn − r_k`` (``r_k = Σ_j P_kj Ṡ_kj``), so that ``∂(−log P_kk)·Ṡ = −D_kk``;
      * ``M_kn = w_kn · D_kn`` with ``w = P`` (taylor; this is M1 of §4 and the row part of ΛṠ)
        or ``w = P/(1 − P)`` (exact), so that ``Σ_{k≠n} M_kn`` is the row part of ``sᵀ∇Neg_n``.

    At the top entry ``D = (1 − P)(Ṡ_kn − r̃_k)`` with ``r̃`` the leave-top-out mean, which is the
    same number without the cancellation of ``Ṡ_kn − r_k`` when ``P ≈ 1``; likewise the exact
    weight's ``1/(1 − P)`` cancels analytically, leaving ``M = P(Ṡ_kn − r̃_k)`` (no overflow).
    """
    p = stats.log_p.exp()
    r = (p * S_dot).sum(dim=-1, keepdim=True)
    r_loo = (stats.loo_p * S_dot).sum(dim=-1, keepdim=True)
    centred_loo = S_dot - r_loo
    D = torch.where(stats.is_top, stats.log1m_p.exp() * centred_loo, S_dot - r)
    if not exact:
        return D, p * D
    ratio = (stats.log_p - stats.log1m_p.masked_fill(stats.is_top, 0.0)).exp()  # P/(1−P), off top
    M = torch.where(stats.is_top, p * centred_loo, ratio.masked_fill(stats.is_top, 0.0) * D)
    return D, M


def _diag(X: Tensor) -> Tensor:
    return X.diagonal(dim1=-2, dim2=-1)


def _offdiag_colsum(X: Tensor) -> Tensor:
    """``Σ_{k≠n} X_kn`` per column n; the (unused) diagonal is masked, not subtracted."""
    return X.masked_fill(_eye_like(X), 0.0).sum(dim=-2)


def _check_square(S: Tensor) -> int:
    if S.dim() < 2 or S.shape[-1] != S.shape[-2]:
        raise ValueError(f"S must be [..., B, B]; got shape {tuple(S.shape)}")
    if not S.is_floating_point():
        raise TypeError(f"S must be a floating tensor; got {S.dtype}")
    return S.shape[-1]


def _check_negative_term(negative_term: str) -> bool:
    if negative_term not in get_args(NegativeTerm):
        raise ValueError(f"negative_term must be one of {get_args(NegativeTerm)}; got {negative_term!r}")
    return negative_term == "exact"


# ----------------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------------


def segment_loss(S: Tensor) -> Tensor:
    """``L_seg = Σ_i [−log P^r_ii − log P^c_ii]`` — a *sum* over anchors, so that removing a pair
    changes it by exactly that pair's ``Pos + Neg^exact`` (docs/method.md §2). Returns shape ``[...]``."""
    _check_square(S)
    row = _diag(torch.log_softmax(S, dim=-1)).sum(dim=-1)
    col = _diag(torch.log_softmax(S, dim=-2)).sum(dim=-1)
    return -(row + col)


def total_segment_loss(similarities: Iterable[Tensor]) -> Tensor:
    """``Σ_m L_seg,m`` over segments given by their similarity matrices (the numerator of R(θ) and
    of the validation loss)."""
    return sum(segment_loss(S) for S in similarities)


def mean_segment_loss(similarities: Iterable[Tensor]) -> Tensor:
    """``L' = (1/N') Σ_m L_seg,m``: the validation loss with fixed segments, N' the pairs of all
    segments (docs/method.md §3)."""
    matrices = list(similarities)
    return total_segment_loss(matrices) / sum(S.shape[-1] for S in matrices)


def zeta_perturbed_similarity(S: Tensor, log_zeta: Tensor) -> Tensor:
    """The literal ζ construction of docs/method.md §2: add ``log ζ_n`` to row n and to column n of S.

    The diagonal entry ``S_nn`` lies in both and gets ``log ζ_n`` *once*; only then does every
    entry of row n (and of column n) shift by the same amount, leaving pair n's own softmaxes
    unchanged. For several ζ at once: ``S'_ij = S_ij + log ζ_i + log ζ_j`` (i ≠ j),
    ``S'_ii = S_ii + log ζ_i``. Finite ``log_zeta`` only (ζ = 0 makes row n all −inf); use
    :func:`zeta_perturbed_segment_loss` for the loss, which also allows ζ = 0.
    """
    _check_square(S)
    a = log_zeta.to(S.dtype)
    both = a.unsqueeze(-1) + a.unsqueeze(-2)
    return S + torch.where(_eye_like(S), a.unsqueeze(-1).expand_as(both), both)


def zeta_perturbed_segment_loss(S: Tensor, log_zeta: Tensor) -> Tensor:
    """``L_seg`` of the ζ-perturbed segment (docs/method.md §2), with ``log_zeta`` of shape ``[..., B]``.

    Equal to ``segment_loss(zeta_perturbed_similarity(S, log_zeta))``, but computed without each
    anchor's own uniform shift (which its softmax ignores): row k sees ``S_kj + log ζ_j`` for
    ``j ≠ k`` and column k sees ``S_ik + log ζ_i`` for ``i ≠ k``. That makes ``log ζ_n = −inf``
    legal and exact: pair n then vanishes from every other anchor's denominator while its own
    terms stay. Hence ``∂L/∂log ζ_n |_{ζ=1} = Neg_n`` and ``L(ζ=1) − L(ζ_n=0) = Neg^exact_n``.
    """
    _check_square(S)
    a = log_zeta.to(S.dtype)
    eye = _eye_like(S)
    rows = S + a.unsqueeze(-2).masked_fill(eye, 0.0)  # entry (k, j) += log ζ_j, j ≠ k
    cols = S + a.unsqueeze(-1).masked_fill(eye, 0.0)  # entry (i, k) += log ζ_i, i ≠ k
    row = _diag(torch.log_softmax(rows, dim=-1)).sum(dim=-1)
    col = _diag(torch.log_softmax(cols, dim=-2)).sum(dim=-1)
    return -(row + col)


# ----------------------------------------------------------------------------------------------
# Per-pair terms and their directional derivatives
# ----------------------------------------------------------------------------------------------


@dataclass
class PairTerms:
    """Per-pair quantities of one segment, each ``[..., B]`` (docs/method.md §2)."""

    pos: Tensor  # Pos_n = −log P^r_nn − log P^c_nn (the pair's own loss)
    neg_taylor: Tensor  # Neg_n = Σ_{k≠n} (P^r_kn + P^c_nk)
    neg_exact: Tensor  # Neg^exact_n = −Σ_{k≠n} [log(1−P^r_kn) + log(1−P^c_nk)]
    clip_score: Tensor  # S_nn


def pair_terms(S: Tensor) -> PairTerms:
    """Positive/negative role of every pair in the segment; differentiable (autograd, torch.func)."""
    B = _check_square(S)
    if B == 1:  # no negatives; pos is identically 0 but keeps its graph
        pos = -(_diag(torch.log_softmax(S, dim=-1)) + _diag(torch.log_softmax(S, dim=-2)))
        zero = torch.zeros_like(pos)
        return PairTerms(pos=pos, neg_taylor=zero, neg_exact=zero.clone(), clip_score=_diag(S))
    rows, cols = _row_stats(S), _row_stats(S.mT)
    pos = -(_diag(rows.log_p) + _diag(cols.log_p))
    neg_taylor = _offdiag_colsum(rows.log_p.exp()) + _offdiag_colsum(cols.log_p.exp())
    neg_exact = -(_offdiag_colsum(rows.log1m_p) + _offdiag_colsum(cols.log1m_p))
    return PairTerms(pos=pos, neg_taylor=neg_taylor, neg_exact=neg_exact, clip_score=_diag(S))


def _check_tangent(S: Tensor, S_dot: Tensor) -> None:
    if S_dot.shape[-2:] != S.shape[-2:]:
        raise ValueError(f"S_dot must end in {tuple(S.shape[-2:])}; got shape {tuple(S_dot.shape)}")


def pair_directional_derivatives(
    S: Tensor, S_dot: Tensor, negative_term: NegativeTerm = "exact"
) -> tuple[Tensor, Tensor]:
    """``(sᵀ∇Pos_n, sᵀ∇Neg_n)`` for every pair n from one tangent ``Ṡ = (∂S/∂θ)·s`` (docs/method.md §4).

    This is the O(B²) scoring kernel: one JVP of the similarity matrix per query direction,
    then closed forms instead of per-pair gradients. ``S_dot`` is ``[B, B]`` or a stack
    ``[Q, B, B]`` (any leading dims broadcasting against ``S``); outputs are ``[..., B]``.
    ``negative_term`` picks ``∇Neg`` ("taylor") or ``∇Neg^exact`` ("exact"). A single-pair
    segment has no negatives: its ``d_neg`` is 0 (and ``d_pos`` is 0, its softmaxes are constant).
    """
    B = _check_square(S)
    _check_tangent(S, S_dot)
    exact = _check_negative_term(negative_term)
    if B == 1:
        shape = torch.broadcast_shapes(S.shape, S_dot.shape)[:-1]
        zero = S_dot.new_zeros(shape, dtype=torch.promote_types(S.dtype, S_dot.dtype))
        return zero, zero.clone()
    D_r, M_r = _row_tangent_terms(_row_stats(S), S_dot, exact)
    D_c, M_c = _row_tangent_terms(_row_stats(S.mT), S_dot.mT, exact)
    d_pos = -(_diag(D_r) + _diag(D_c))  # = r_n + c_n − 2 Ṡ_nn
    d_neg = _offdiag_colsum(M_r) + _offdiag_colsum(M_c)  # Σ_{k≠n} M1_kn + Σ_{k≠n} M2_nk
    return d_pos, d_neg


def logit_hessian_product(S: Tensor, S_dot: Tensor) -> Tensor:
    """``Λ·Ṡ`` with ``Λ = ∇²_S L_seg`` (docs/method.md §5), the middle factor of a GGN-vector product.

    Each row softmax contributes ``p ⊙ ṡ − p (pᵀṡ)`` on its row and each column softmax the same
    on its column; the two are summed. ``S_dot`` may carry leading dims (e.g. ``[Q, B, B]``).
    """
    B = _check_square(S)
    _check_tangent(S, S_dot)
    if B == 1:
        shape = torch.broadcast_shapes(S.shape, S_dot.shape)
        return S_dot.new_zeros(shape, dtype=torch.promote_types(S.dtype, S_dot.dtype))
    _, M_r = _row_tangent_terms(_row_stats(S), S_dot, exact=False)
    _, M_c = _row_tangent_terms(_row_stats(S.mT), S_dot.mT, exact=False)
    return M_r + M_c.mT
