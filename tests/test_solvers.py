"""Matrix-free CG and Nyström preconditioning (ecif_ray.influence.solvers) against dense Cholesky."""

from __future__ import annotations

import pytest
import torch

from ecif_ray.influence.solvers import (
    NystromPreconditioner,
    conjugate_gradient,
    dense_preconditioner,
    dense_solve,
    nystrom_preconditioner,
)

F64 = torch.float64
CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))




def psd_matrix(eigenvalues: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Q diag(λ) Qᵀ with a random orthogonal Q."""
    g = torch.Generator().manual_seed(seed)
    D = eigenvalues.numel()
    Q, _ = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=F64))
    return (Q * eigenvalues.to(F64)) @ Q.T


def ill_conditioned(D: int = 80, seed: int = 0) -> torch.Tensor:
    """Eigenvalues spread log-uniformly over 1e-4 .. 1e2 (κ = 1e6 before damping)."""
    return psd_matrix(torch.logspace(-4, 2, D, dtype=F64), seed)


def fast_decay(D: int = 300, seed: int = 0) -> torch.Tensor:
    """A GGN-like spectrum: a few large directions, the rest decaying geometrically."""
    return psd_matrix(100.0 * torch.exp(-torch.arange(D, dtype=F64) / 4.0), seed)


class CountingMatvec:
    """G·V that records how many block products and column products the solver asked for."""

    def __init__(self, G: torch.Tensor) -> None:
        self.G, self.calls, self.columns = G, 0, 0

    def __call__(self, V: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.columns += V.shape[-1]
        return self.G @ V


def rhs(D: int, Q: int, seed: int = 1, dtype: torch.dtype = F64) -> torch.Tensor:
    return torch.randn(D, Q, generator=torch.Generator().manual_seed(seed), dtype=F64).to(dtype)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).norm(dim=0) / b.norm(dim=0)


def test_cg_matches_dense_solve_on_ill_conditioned_matrix() -> None:
    G = ill_conditioned()
    b = rhs(80, 4)
    damping = 1e-3
    res = conjugate_gradient(CountingMatvec(G), b, damping, tol=1e-11, max_iter=3000)
    assert res.converged and res.x.shape == (80, 4)
    assert rel_err(res.x, dense_solve(G, b, damping)).max() < 1e-8
    assert res.relative_residual.shape == (4,) and (res.relative_residual <= 1e-11).all()


def test_reported_residual_is_the_true_residual() -> None:
    G = ill_conditioned(seed=2)
    b = rhs(80, 3, seed=5)
    damping = 1e-2
    for max_iter in (5, 40, 2000):
        res = conjugate_gradient(lambda V: G @ V, b, damping, tol=1e-12, max_iter=max_iter)
        true = (b - (G @ res.x + damping * res.x)).norm(dim=0) / b.norm(dim=0)
        torch.testing.assert_close(res.relative_residual, true, rtol=1e-10, atol=1e-16)
        assert res.converged == bool((true <= 1e-12).all())


def test_non_convergence_is_reported() -> None:
    G = ill_conditioned()
    b = rhs(80, 2)
    res = conjugate_gradient(lambda V: G @ V, b, 1e-4, tol=1e-10, max_iter=3)
    assert not res.converged
    assert res.iterations == 3
    assert (res.relative_residual > 1e-10).all()


def test_multiple_rhs_equal_separate_solves_and_converged_columns_stop() -> None:
    G = fast_decay(D=120)
    damping = 1e-2
    b = rhs(120, 3)
    b[:, 1] = G[:, 0] + damping * torch.eye(120, dtype=F64)[:, 0]  # exact solution e_0: quick
    mv = CountingMatvec(G)
    block = conjugate_gradient(mv, b, damping, tol=1e-12, max_iter=1000)
    assert block.converged
    for q in range(3):
        single = conjugate_gradient(lambda v: G @ v, b[:, q], damping, tol=1e-12, max_iter=1000)
        assert single.x.shape == (120,) and single.relative_residual.shape == ()
        assert rel_err(block.x[:, q : q + 1], single.x.unsqueeze(-1)).item() < 1e-9
    # one block product per iteration (+ the final true-residual check), fewer columns than Q·iters
    assert mv.calls <= block.iterations + 2
    assert mv.columns < 3 * (block.iterations + 2)


def test_zero_rhs_column_and_warm_start() -> None:
    G = ill_conditioned(D=60)
    damping = 1e-2
    b = rhs(60, 2)
    b[:, 0] = 0.0
    res = conjugate_gradient(lambda V: G @ V, b, damping, tol=1e-12, max_iter=2000)
    assert res.converged and torch.equal(res.x[:, 0], torch.zeros(60, dtype=F64))
    exact = dense_solve(G, b, damping)
    warm = conjugate_gradient(lambda V: G @ V, b, damping, tol=1e-12, max_iter=2000, x0=exact)
    assert warm.converged and warm.iterations <= 1


def test_callback_sees_every_iteration() -> None:
    G = ill_conditioned(D=60)
    seen: list[int] = []
    res = conjugate_gradient(
        lambda V: G @ V, rhs(60, 2), 1e-2, tol=1e-8, max_iter=500, callback=lambda i, rel: seen.append(i)
    )
    assert seen == list(range(1, res.iterations + 1))


def test_nystrom_preconditioner_cuts_iterations_and_keeps_the_solution() -> None:
    G = fast_decay()
    b = rhs(300, 3)
    damping = 1e-3
    plain = conjugate_gradient(lambda V: G @ V, b, damping, tol=1e-10, max_iter=2000)
    P = nystrom_preconditioner(
        lambda V: G @ V, 300, 60, damping, dtype=F64, device="cpu", generator=torch.Generator().manual_seed(0)
    )
    assert isinstance(P, NystromPreconditioner)
    pre = conjugate_gradient(lambda V: G @ V, b, damping, tol=1e-10, max_iter=2000, preconditioner=P)
    assert plain.converged and pre.converged
    assert pre.iterations <= plain.iterations // 2, (pre.iterations, plain.iterations)
    exact = dense_solve(G, b, damping)
    assert rel_err(pre.x, exact).max() < 1e-8
    assert rel_err(plain.x, exact).max() < 1e-8


def test_nystrom_recovers_top_eigenvalues_and_preconditions_well() -> None:
    lam = 100.0 * torch.exp(-torch.arange(200, dtype=F64) / 4.0)
    G = psd_matrix(lam, seed=3)
    damping = 1e-3
    P = nystrom_preconditioner(lambda V: G @ V, 200, 50, damping, dtype=F64, device="cpu")
    torch.testing.assert_close(P.eigenvalues[:5], lam[:5], rtol=1e-3, atol=0)
    assert (P.eigenvalues >= 0).all() and (P.eigenvalues.diff() <= 0).all()
    # P^{-1/2}(G+δI)P^{-1/2} has condition number O(1) when λ_ℓ ≲ δ (Frangella et al., Prop. 5.3)
    M = P(torch.eye(200, dtype=F64))
    evals = torch.linalg.eigvals(M @ (G + damping * torch.eye(200, dtype=F64))).real
    assert evals.max() / evals.min() < 10


def test_nystrom_rejects_bad_rank() -> None:
    with pytest.raises(ValueError, match="rank"):
        nystrom_preconditioner(lambda V: V, 10, 11, 1e-3, dtype=F64, device="cpu")


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_float32_solve_with_preconditioner(device: str) -> None:
    G = fast_decay(D=200).to(device=device, dtype=torch.float32)
    b = rhs(200, 2, dtype=torch.float32).to(device)
    damping = 1e-1  # float32's residual floor is ~eps·κ: keep κ = 1e3 so tol = 1e-4 is reachable
    P = nystrom_preconditioner(lambda V: G @ V, 200, 40, damping, dtype=torch.float32, device=device)
    res = conjugate_gradient(lambda V: G @ V, b, damping, tol=1e-4, max_iter=500, preconditioner=P)
    assert res.converged and res.x.dtype == torch.float32 and res.x.device.type == device
    assert res.iterations <= 10
    exact = dense_solve(G.double().cpu(), b.double().cpu(), damping)
    assert rel_err(res.x.double().cpu(), exact).max() < 1e-3


def test_misalignment_damping_is_a_tenth_of_the_top_eigenvalue_and_never_below_the_analysis_delta():
    from ecif_ray.influence.curvature import resolve_misalignment_damping, top_eigenvalue

    generator = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(40, 40, generator=generator, dtype=torch.float64))
    eigenvalues = torch.cat([torch.tensor([5.0, 1.0], dtype=torch.float64), torch.rand(38, generator=generator,
                                                                                        dtype=torch.float64) * 0.5])
    G = Q @ torch.diag(eigenvalues) @ Q.T

    def matvec(V):
        return G @ V

    power = top_eigenvalue(matvec, 40, dtype=torch.float64, device="cpu")
    assert power == pytest.approx(5.0, rel=1e-9)  # power iteration: gap 5 : 1, 30 steps
    exact = top_eigenvalue(matvec, 40, dtype=torch.float64, device="cpu",
                           preconditioner=dense_preconditioner(matvec, 40, 1e-3, dtype=torch.float64, device="cpu"))
    assert exact == pytest.approx(5.0, rel=1e-12)
    assert resolve_misalignment_damping("auto", 1e-3, lambda: exact) == pytest.approx(0.5)
    assert resolve_misalignment_damping("auto", 2.0, lambda: exact) == 2.0  # at least the analysis δ
    assert resolve_misalignment_damping(0.25, 1e-3, lambda: pytest.fail("λ₁ not needed")) == 0.25
    with pytest.raises(ValueError, match="misalignment_damping"):
        resolve_misalignment_damping(0.0, 1e-3, lambda: exact)
