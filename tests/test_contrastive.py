"""Closed forms of ecif_ray.influence.contrastive against autograd, slicing and 50-digit references.

Everything is cross-checked against independent constructions of the same quantity:
  * the ζ construction of docs/method.md §2 (derivatives by torch.func),
  * explicit formulas (softmax sums, leave-n-out logsumexp by slicing),
  * the actual segment with pair n deleted,
  * an mpmath evaluation of the §4 logit derivatives (for P within 1e-13 of 1, where a float64
    autograd reference itself loses all relative accuracy).
"""

from __future__ import annotations

import mpmath
import pytest
import torch
from torch.func import grad, jacrev, jvp, vmap

from ecif_ray.influence.contrastive import (
    logit_hessian_product,
    pair_directional_derivatives,
    pair_terms,
    segment_loss,
    zeta_perturbed_segment_loss,
    zeta_perturbed_similarity,
)

F64 = torch.float64
CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))




# ---------------------------------------------------------------------------------------------
# Segments
# ---------------------------------------------------------------------------------------------


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def make_segment(kind: str, B: int = 7, seed: int = 0, dtype: torch.dtype = F64) -> torch.Tensor:
    """Similarity matrices spanning the regimes that matter: soft, CLIP-scale, P → 1, misaligned."""
    g = torch.Generator().manual_seed(seed)
    if kind == "gaussian":
        return 3.0 * torch.randn(B, B, generator=g, dtype=F64).to(dtype)
    u = _unit(torch.randn(B, 8, generator=g, dtype=F64))
    if kind == "cosine30":
        v = _unit(torch.randn(B, 8, generator=g, dtype=F64))
        scale = 30.0
    else:  # aligned: each image near its caption, so P_nn → 1 at large scale
        v = _unit(u + 0.25 * torch.randn(B, 8, generator=g, dtype=F64))
        scale = 100.0 if kind.endswith("100") else 30.0
        if kind.startswith("misaligned"):  # swap two images: rows 0,1 put P ≈ 1 off the diagonal
            v = v[torch.tensor([1, 0, *range(2, B)])]
    return (scale * u @ v.T).to(dtype)


KINDS = ["gaussian", "cosine30", "aligned30", "misaligned30", "aligned100", "misaligned100"]


def tangents(B: int, Q: int = 3, seed: int = 1, dtype: torch.dtype = F64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(Q, B, B, generator=g, dtype=F64).to(dtype)


# ---------------------------------------------------------------------------------------------
# Independent references
# ---------------------------------------------------------------------------------------------


def ref_pos(S: torch.Tensor) -> torch.Tensor:
    return -(torch.log_softmax(S, -1).diagonal() + torch.log_softmax(S, -2).diagonal())


def ref_neg_taylor(S: torch.Tensor) -> torch.Tensor:
    off = ~torch.eye(S.shape[-1], dtype=torch.bool)
    pr, pc = torch.softmax(S, -1), torch.softmax(S, -2)
    return (pr * off).sum(0) + (pc * off).sum(1)


def _loo_lse(S: torch.Tensor) -> torch.Tensor:
    """[n, k] = logsumexp_{j≠n} S_kj, by masking column n out of every row (O(B³) slicing)."""
    B = S.shape[-1]
    eye = torch.eye(B, dtype=torch.bool)
    S3 = S.unsqueeze(0).expand(B, B, B).masked_fill(eye.unsqueeze(1), float("-inf"))
    return torch.logsumexp(S3, -1)


def ref_neg_exact(S: torch.Tensor) -> torch.Tensor:
    """Σ_{k≠n}: anchor k's loss with n in its denominator minus without (rows, then columns)."""
    off = ~torch.eye(S.shape[-1], dtype=torch.bool)
    rows = torch.logsumexp(S, -1).unsqueeze(0) - _loo_lse(S)  # [n, k] = −log(1 − P^r_kn)
    cols = torch.logsumexp(S.T, -1).unsqueeze(0) - _loo_lse(S.T)  # [n, k] = −log(1 − P^c_nk)
    return ((rows + cols) * off).sum(-1)


def zeta_neg_taylor(S: torch.Tensor) -> torch.Tensor:
    """Neg_n = ∂L_seg(ζ)/∂log ζ_n at ζ = 1."""
    return grad(zeta_perturbed_segment_loss, argnums=1)(S, torch.zeros(S.shape[-1], dtype=S.dtype))


def zeta_neg_exact(S: torch.Tensor) -> torch.Tensor:
    """Neg^exact_n = L_seg(ζ = 1) − L_seg(ζ_n = 0)."""
    B = S.shape[-1]
    deletions = torch.zeros(B, B, dtype=S.dtype).fill_diagonal_(float("-inf"))
    full = zeta_perturbed_segment_loss(S, torch.zeros(B, dtype=S.dtype))
    return full - vmap(zeta_perturbed_segment_loss, in_dims=(None, 0))(S, deletions)


def directional(f, S: torch.Tensor, S_dot: torch.Tensor) -> torch.Tensor:
    """Σ_ij ∂f/∂S_ij · Ṡ_ij for a stack of tangents, by forward-mode AD."""
    return vmap(lambda t: jvp(f, (S,), (t,))[1])(S_dot)


def assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-10, floor: float = 0.0) -> None:
    """Max-norm relative error: ``max|a − e| ≤ rtol · max|e| + floor``.

    ``floor`` is the float64 reference's *own* rounding where it is formed by cancellation (an
    autograd derivative of log_softmax is ``Ṡ_nn − Σ_j P_nj Ṡ_nj``, accurate to ~1e-16·|Ṡ| only):
    when P → 1 every true value can be far below that, and the elementwise truth is then
    checked against mpmath instead (test_*_when_p_is_near_one).
    """
    err = (actual - expected).abs().max().item()
    bound = rtol * expected.abs().max().item() + floor
    assert err <= bound, f"max abs error {err:.3e} > {bound:.3e} (max |expected| {expected.abs().max():.3e})"


def ad_floor(X: torch.Tensor) -> float:
    """Rounding floor of a float64 autograd/logsumexp reference built from X (64 ulps of max|X|)."""
    return 64 * torch.finfo(F64).eps * X.abs().max().item()


# ---------------------------------------------------------------------------------------------
# Loss, ζ construction, pair terms
# ---------------------------------------------------------------------------------------------


def test_segment_loss_is_sum_of_pair_losses() -> None:
    S = make_segment("gaussian")
    expected = torch.nn.functional.cross_entropy(S, torch.arange(7), reduction="sum") + (
        torch.nn.functional.cross_entropy(S.T, torch.arange(7), reduction="sum")
    )
    torch.testing.assert_close(segment_loss(S), expected, rtol=1e-14, atol=0)
    torch.testing.assert_close(segment_loss(S), pair_terms(S).pos.sum(), rtol=1e-14, atol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_zeta_shortcut_equals_literal_construction(kind: str) -> None:
    S = make_segment(kind)
    a = 0.7 * torch.randn(7, generator=torch.Generator().manual_seed(3), dtype=F64)
    literal = segment_loss(zeta_perturbed_similarity(S, a))
    torch.testing.assert_close(zeta_perturbed_segment_loss(S, a), literal, rtol=1e-13, atol=1e-13)


def test_zeta_construction_leaves_pair_n_own_softmaxes_unchanged() -> None:
    S = make_segment("gaussian")
    n, a = 2, torch.zeros(7, dtype=F64)
    a[n] = -1.3
    S2 = zeta_perturbed_similarity(S, a)
    torch.testing.assert_close(torch.log_softmax(S2, -1)[n], torch.log_softmax(S, -1)[n])
    torch.testing.assert_close(torch.log_softmax(S2, -2)[:, n], torch.log_softmax(S, -2)[:, n])
    # every other anchor does feel it
    assert not torch.allclose(torch.log_softmax(S2, -1)[0], torch.log_softmax(S, -1)[0])


@pytest.mark.parametrize("kind", KINDS)
def test_pair_terms_match_explicit_and_zeta_definitions(kind: str) -> None:
    S = make_segment(kind)
    t = pair_terms(S)
    # Max-norm relative: the logsumexp-difference references are themselves only accurate to
    # ~1e-16 absolute on tiny entries (elementwise accuracy is tested against mpmath below).
    floor = ad_floor(S)
    assert_close_rel(t.pos, ref_pos(S), rtol=1e-12, floor=floor)
    assert_close_rel(t.neg_taylor, ref_neg_taylor(S), rtol=1e-12)
    assert_close_rel(t.neg_taylor, zeta_neg_taylor(S), rtol=1e-12)
    assert_close_rel(t.neg_exact, ref_neg_exact(S), rtol=1e-12, floor=floor)
    assert_close_rel(t.neg_exact, zeta_neg_exact(S), rtol=1e-12, floor=floor)
    torch.testing.assert_close(t.clip_score, S.diagonal())
    assert (t.neg_exact >= t.neg_taylor).all()  # −log(1 − p) ≥ p


@pytest.mark.parametrize("kind", KINDS)
def test_removing_a_pair_changes_segment_loss_by_pos_plus_neg_exact(kind: str) -> None:
    S = make_segment(kind)
    t = pair_terms(S)
    for n in range(S.shape[0]):
        keep = torch.tensor([k for k in range(S.shape[0]) if k != n])
        drop = segment_loss(S) - segment_loss(S[keep][:, keep])
        torch.testing.assert_close(t.pos[n] + t.neg_exact[n], drop, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["gaussian", "misaligned30"])
def test_neg_exact_is_change_of_other_anchors_losses(kind: str) -> None:
    """Each other anchor's loss, with and without n in its denominator, by explicit slicing."""
    S = make_segment(kind)
    B = S.shape[0]
    t = pair_terms(S)
    for n in range(B):
        change = torch.zeros((), dtype=F64)
        for k in range(B):
            if k == n:
                continue
            kept = [j for j in range(B) if j != n]
            row_full = torch.logsumexp(S[k], 0) - S[k, k]
            row_without = torch.logsumexp(S[k, kept], 0) - S[k, k]
            col_full = torch.logsumexp(S[:, k], 0) - S[k, k]
            col_without = torch.logsumexp(S[kept, k], 0) - S[k, k]
            change = change + (row_full - row_without) + (col_full - col_without)
        torch.testing.assert_close(t.neg_exact[n], change, rtol=1e-12, atol=1e-13)


def test_neg_is_first_order_term_of_neg_exact() -> None:
    """Scaling S down makes every P small, so −log(1 − P) → P."""
    S = 0.01 * make_segment("gaussian", B=50)
    t = pair_terms(S)
    assert ((t.neg_exact - t.neg_taylor) / t.neg_taylor).abs().max() < 0.02


# ---------------------------------------------------------------------------------------------
# Directional derivatives (docs/method.md §4)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_directional_derivatives_match_autograd_of_explicit_formulas(kind: str) -> None:
    S = make_segment(kind)
    S_dot = tangents(7)
    d_pos_t, d_neg_t = pair_directional_derivatives(S, S_dot, "taylor")
    d_pos_e, d_neg_e = pair_directional_derivatives(S, S_dot, "exact")
    assert d_pos_t.shape == d_neg_e.shape == (3, 7)
    torch.testing.assert_close(d_pos_t, d_pos_e, rtol=0, atol=0)
    floor = ad_floor(S_dot)
    assert_close_rel(d_pos_e, directional(ref_pos, S, S_dot), floor=floor)
    assert_close_rel(d_neg_t, directional(ref_neg_taylor, S, S_dot), floor=floor)
    assert_close_rel(d_neg_e, directional(ref_neg_exact, S, S_dot), floor=floor)


@pytest.mark.parametrize("kind", KINDS)
def test_directional_derivatives_match_autograd_of_zeta_construction(kind: str) -> None:
    S = make_segment(kind)
    S_dot = tangents(7, seed=5)
    _, d_neg_t = pair_directional_derivatives(S, S_dot, "taylor")
    _, d_neg_e = pair_directional_derivatives(S, S_dot, "exact")
    floor = ad_floor(S_dot)
    assert_close_rel(d_neg_t, directional(zeta_neg_taylor, S, S_dot), floor=floor)
    assert_close_rel(d_neg_e, directional(zeta_neg_exact, S, S_dot), floor=floor)


@pytest.mark.parametrize("kind", ["gaussian", "misaligned30"])
def test_directional_derivatives_match_full_jacobians(kind: str) -> None:
    """Reverse mode too: contract the full ∂(·)_n/∂S_ij Jacobians with Ṡ."""
    S = make_segment(kind, B=5)
    S_dot = tangents(5, Q=4, seed=9)
    for term, ref in [("taylor", ref_neg_taylor), ("exact", ref_neg_exact)]:
        d_pos, d_neg = pair_directional_derivatives(S, S_dot, term)
        J_neg = jacrev(ref)(S)  # [n, i, j]
        J_pos = jacrev(ref_pos)(S)
        assert_close_rel(d_neg, torch.einsum("nij,qij->qn", J_neg, S_dot))
        assert_close_rel(d_pos, torch.einsum("nij,qij->qn", J_pos, S_dot))


def _mp_reference(S: torch.Tensor, S_dot: torch.Tensor) -> dict[str, list[mpmath.mpf]]:
    """The §4 logit derivatives, evaluated term by term with 60 significant digits."""
    B = S.shape[0]
    with mpmath.workdps(60):
        s = [[mpmath.mpf(float(x)) for x in row] for row in S.tolist()]
        sd = [[mpmath.mpf(float(x)) for x in row] for row in S_dot.tolist()]
        e = [[mpmath.exp(x) for x in row] for row in s]
        pr = [[e[i][j] / mpmath.fsum(e[i]) for j in range(B)] for i in range(B)]
        col = [mpmath.fsum(e[i][j] for i in range(B)) for j in range(B)]
        pc = [[e[i][j] / col[j] for j in range(B)] for i in range(B)]
        r = [mpmath.fsum(pr[i][j] * sd[i][j] for j in range(B)) for i in range(B)]
        c = [mpmath.fsum(pc[i][j] * sd[i][j] for i in range(B)) for j in range(B)]
        out: dict[str, list[mpmath.mpf]] = {k: [] for k in ("pos", "taylor", "exact", "Pos", "Neg", "NegX")}
        for n in range(B):
            out["pos"].append(r[n] + c[n] - 2 * sd[n][n])
            ks = [k for k in range(B) if k != n]
            out["Pos"].append(-mpmath.log(pr[n][n]) - mpmath.log(pc[n][n]))
            out["Neg"].append(mpmath.fsum(pr[k][n] + pc[n][k] for k in ks))
            out["NegX"].append(-mpmath.fsum(mpmath.log(1 - pr[k][n]) + mpmath.log(1 - pc[n][k]) for k in ks))
            m1 = [pr[k][n] * (sd[k][n] - r[k]) for k in ks]
            m2 = [pc[n][k] * (sd[n][k] - c[k]) for k in ks]
            w1 = [1 / (1 - pr[k][n]) for k in ks]
            w2 = [1 / (1 - pc[n][k]) for k in ks]
            out["taylor"].append(mpmath.fsum(m1) + mpmath.fsum(m2))
            out["exact"].append(mpmath.fsum(a * w for a, w in zip(m1 + m2, w1 + w2)))
    return out


@pytest.mark.parametrize("kind", ["aligned100", "misaligned100", "misaligned30"])
def test_terms_and_derivatives_are_elementwise_accurate_when_p_is_near_one(kind: str) -> None:
    """Every entry to 1e-10 relative — including values of order 1e-26, which a naive
    ``r_n − Ṡ_nn`` or ``−log_softmax`` (or a float64 autograd reference) only gets to 1e-16 absolute."""
    S = make_segment(kind, B=5, seed=2)
    assert torch.softmax(S, -1).max() > 1 - 1e-4  # the regime under test
    S_dot = tangents(5, Q=1, seed=4)[0]
    ref = _mp_reference(S, S_dot)
    d_pos, d_neg_t = pair_directional_derivatives(S, S_dot, "taylor")
    _, d_neg_e = pair_directional_derivatives(S, S_dot, "exact")
    t = pair_terms(S)
    checks = [("pos", d_pos), ("taylor", d_neg_t), ("exact", d_neg_e)]
    checks += [("Pos", t.pos), ("Neg", t.neg_taylor), ("NegX", t.neg_exact)]
    for name, ours in checks:
        for n, value in enumerate(ours.tolist()):
            truth = float(ref[name][n])
            assert abs(value - truth) <= 1e-10 * abs(truth) + 1e-300, (name, n, value, truth)


def test_stack_broadcasting_and_vmap_agree_with_single_tangents() -> None:
    S = torch.stack([make_segment(k) for k in KINDS])  # [6, 7, 7]
    S_dot = tangents(7, Q=4, seed=8)  # [4, 7, 7]
    for term in ("taylor", "exact"):
        d_pos, d_neg = pair_directional_derivatives(S.unsqueeze(1), S_dot, term)  # [6, 4, 7]
        vp, vn = vmap(lambda s, t=term: pair_directional_derivatives(s, S_dot, t))(S)
        torch.testing.assert_close(vp, d_pos, rtol=1e-14, atol=1e-14)
        torch.testing.assert_close(vn, d_neg, rtol=1e-14, atol=1e-14)
        for m in range(S.shape[0]):
            for q in range(S_dot.shape[0]):
                p1, n1 = pair_directional_derivatives(S[m], S_dot[q], term)
                torch.testing.assert_close(p1, d_pos[m, q], rtol=1e-14, atol=1e-14)
                torch.testing.assert_close(n1, d_neg[m, q], rtol=1e-14, atol=1e-14)


def test_rejects_unknown_negative_term_and_bad_shapes() -> None:
    S = make_segment("gaussian")
    with pytest.raises(ValueError, match="negative_term"):
        pair_directional_derivatives(S, S, "ratio")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="S_dot"):
        pair_directional_derivatives(S, S[:3, :3])
    with pytest.raises(ValueError, match=r"\[..., B, B\]"):
        segment_loss(S[:, :3])


# ---------------------------------------------------------------------------------------------
# Logit Hessian (docs/method.md §5)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_logit_hessian_product_matches_autograd_hvp(kind: str) -> None:
    S = make_segment(kind)
    S_dot = tangents(7, Q=3, seed=11)
    hvp = vmap(lambda t: jvp(grad(segment_loss), (S,), (t,))[1])(S_dot)
    assert_close_rel(logit_hessian_product(S, S_dot), hvp, rtol=1e-12, floor=ad_floor(S_dot))


def test_logit_hessian_is_symmetric_psd_and_kills_row_and_column_shifts() -> None:
    S = make_segment("cosine30", B=5)
    basis = torch.eye(25, dtype=F64).reshape(25, 5, 5)
    H = logit_hessian_product(S, basis).reshape(25, 25)
    torch.testing.assert_close(H, H.T, rtol=0, atol=1e-13)
    assert torch.linalg.eigvalsh(H).min() > -1e-12
    shift = torch.zeros(5, 5, dtype=F64)
    shift[1] += 1.0  # a row shift: the row softmax ignores it, but the columns see it
    shift[:, 1] += 1.0
    assert logit_hessian_product(S, shift).abs().max() > 1e-3
    const = torch.ones(5, 5, dtype=F64)  # all anchors shift uniformly: Λ·1 = 0
    assert logit_hessian_product(S, const).abs().max() < 1e-13


# ---------------------------------------------------------------------------------------------
# Edge cases, dtypes, devices
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("term", ["taylor", "exact"])
def test_single_pair_segment(term: str) -> None:
    S = torch.tensor([[25.0]], dtype=F64, requires_grad=True)
    S_dot = torch.randn(3, 1, 1, dtype=F64)
    d_pos, d_neg = pair_directional_derivatives(S, S_dot, term)
    assert d_pos.shape == d_neg.shape == (3, 1)
    assert torch.equal(d_neg, torch.zeros(3, 1, dtype=F64)) and torch.isfinite(d_pos).all()
    torch.testing.assert_close(d_pos, torch.zeros(3, 1, dtype=F64))
    t = pair_terms(S)
    assert t.pos.item() == 0.0 and t.neg_taylor.item() == 0.0 and t.neg_exact.item() == 0.0
    (t.pos + t.neg_exact).sum().backward()
    assert torch.isfinite(S.grad).all()
    assert logit_hessian_product(S, S_dot).abs().max() == 0.0
    assert segment_loss(S).item() == 0.0


@pytest.mark.parametrize("kind", ["gaussian", "aligned100", "misaligned100"])
def test_two_pair_segment(kind: str) -> None:
    S = make_segment(kind, B=2, seed=4)
    S_dot = tangents(2, Q=2)
    t = pair_terms(S)
    for n in range(2):
        drop = segment_loss(S) - segment_loss(S[1 - n : 2 - n, 1 - n : 2 - n])
        torch.testing.assert_close(t.pos[n] + t.neg_exact[n], drop, rtol=1e-12, atol=1e-12)
    for term, ref in [("taylor", ref_neg_taylor), ("exact", ref_neg_exact)]:
        d_pos, d_neg = pair_directional_derivatives(S, S_dot, term)
        assert_close_rel(d_neg, directional(ref, S, S_dot), floor=ad_floor(S_dot))
        assert_close_rel(d_pos, directional(ref_pos, S, S_dot), floor=ad_floor(S_dot))


def test_gradients_of_pair_terms_are_finite_when_p_is_one_in_float() -> None:
    """P_nn rounds to exactly 1 in float64 at this gap; no inf/nan may leak into the graph."""
    S = make_segment("misaligned100").requires_grad_()
    t = pair_terms(S)
    (t.pos + t.neg_exact + t.neg_taylor).sum().backward()
    assert torch.isfinite(S.grad).all()


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("kind", ["aligned100", "misaligned100"])
def test_float32_is_finite_and_matches_float64_at_extreme_scale(kind: str, device: str) -> None:
    S32 = make_segment(kind, dtype=torch.float32).to(device)
    S_dot32 = tangents(7, dtype=torch.float32).to(device)
    S64, S_dot64 = S32.double(), S_dot32.double()  # the same inputs, exactly
    for term in ("taylor", "exact"):
        outs32 = pair_directional_derivatives(S32, S_dot32, term)
        outs64 = pair_directional_derivatives(S64, S_dot64, term)
        for a, b in zip(outs32, outs64):
            assert a.dtype == torch.float32 and torch.isfinite(a).all()
            assert_close_rel(a.double(), b, rtol=1e-5)
    t32, t64 = pair_terms(S32), pair_terms(S64)
    for name in ("pos", "neg_taylor", "neg_exact"):
        a, b = getattr(t32, name), getattr(t64, name)
        assert torch.isfinite(a).all()
        assert_close_rel(a.double(), b, rtol=1e-5)
    h32 = logit_hessian_product(S32, S_dot32)
    assert torch.isfinite(h32).all()
    assert_close_rel(h32.double(), logit_hessian_product(S64, S_dot64), rtol=1e-5)
    assert torch.isfinite(segment_loss(S32))


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_runs_on_device(device: str) -> None:
    S = make_segment("cosine30").to(device)
    S_dot = tangents(7).to(device)
    d_pos, d_neg = pair_directional_derivatives(S, S_dot)
    assert d_pos.device.type == device and d_neg.device.type == device
    ref = directional(ref_neg_exact, S.cpu(), S_dot.cpu())
    assert_close_rel(d_neg.cpu(), ref)


@pytest.mark.parametrize("case", ["constant", "duplicate_image"])
def test_ties_in_a_row(case: str) -> None:
    """Exact ties (all-equal logits, or two identical images) pick one 'top' entry; the values and
    gradients must not depend on which (e.g. amax would split the gradient between the ties)."""
    S = torch.zeros(4, 4, dtype=F64) if case == "constant" else make_segment("aligned30", B=5)
    if case == "duplicate_image":
        S[:, 3] = S[:, 2]
    S_dot = tangents(S.shape[0], Q=2, seed=13)
    t = pair_terms(S)
    assert_close_rel(t.neg_exact, ref_neg_exact(S), rtol=1e-13)
    assert_close_rel(t.pos, ref_pos(S), rtol=1e-13)
    for name, ref in [("pos", ref_pos), ("neg_taylor", ref_neg_taylor), ("neg_exact", ref_neg_exact)]:
        assert_close_rel(jacrev(lambda s, n=name: getattr(pair_terms(s), n))(S), jacrev(ref)(S), rtol=1e-12)
    for term, ref in [("taylor", ref_neg_taylor), ("exact", ref_neg_exact)]:
        d_pos, d_neg = pair_directional_derivatives(S, S_dot, term)
        assert_close_rel(d_neg, directional(ref, S, S_dot), rtol=1e-12)
        assert_close_rel(d_pos, directional(ref_pos, S, S_dot), rtol=1e-12)
