"""Matrix-free solvers for ``(G + δI) x = b`` (docs/method.md §5: the iHVP on the driver).

``G`` (the Gauss–Newton matrix, PSD) is available only through a *batched* matvec, because each
product costs a JVP + VJP over the curvature sample on the workers; solving several right-hand
sides (several queries) together shares that cost. Layout convention, everywhere in this module:
vectors are blocks ``[D, Q]`` — one column per right-hand side (a 1-D ``[D]`` vector is accepted
and returned as 1-D; the matvec then sees ``[D, 1]``). ``matvec`` returns ``G·V`` *without*
damping; the solvers add ``δ·V`` themselves so the damping is never counted twice.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "Matvec",
    "NystromPreconditioner",
    "SolveResult",
    "conjugate_gradient",
    "dense_preconditioner",
    "dense_solve",
    "hutchinson_trace",
    "nystrom_preconditioner",
]

Matvec = Callable[[Tensor], Tensor]


@dataclass
class SolveResult:
    """Outcome of a solve; ``relative_residual`` is the *true* residual, recomputed at the end."""

    x: Tensor  # [D, Q] (or [D] when b was 1-D)
    iterations: int  # CG iterations run (the slowest column's count)
    relative_residual: Tensor  # [Q] (or scalar): ‖b − (G+δI)x‖ / ‖b‖ per right-hand side
    converged: bool  # every column's true relative residual ≤ tol


def _as_block(b: Tensor) -> tuple[Tensor, bool]:
    if b.dim() == 1:
        return b.unsqueeze(-1), True
    if b.dim() != 2:
        raise ValueError(f"right-hand side must be [D] or [D, Q]; got shape {tuple(b.shape)}")
    return b, False


def _damped(matvec: Matvec, damping: float) -> Matvec:
    def apply(V: Tensor) -> Tensor:
        out = matvec(V)
        if out.shape != V.shape:
            raise ValueError(f"matvec returned shape {tuple(out.shape)} for input {tuple(V.shape)}")
        return out + damping * V

    return apply


def _matvec_active(A: Matvec, p: Tensor, active: Tensor) -> Tensor:
    """Apply A only to the columns still iterating (each column is a JVP+VJP on the workers)."""
    if bool(active.all()):
        return A(p)
    idx = active.nonzero().squeeze(-1)
    out = torch.zeros_like(p)
    out[:, idx] = A(p[:, idx])
    return out


def _safe_div(num: Tensor, den: Tensor, mask: Tensor) -> Tensor:
    """num/den where mask, else 0 — without ever dividing by a masked-out zero."""
    return torch.where(mask, num / torch.where(mask, den, torch.ones_like(den)), torch.zeros_like(num))


@dataclass
class _BlockCG:
    """State of Q independent (preconditioned) CG runs advanced in lock-step, one column each."""

    A: Matvec
    M: Matvec
    b: Tensor
    denom: Tensor  # ‖b‖ per column (1 for a zero column: its residual is then absolute)
    tol: float
    x: Tensor
    r: Tensor  # residual (recursive, or true when residual_is_true)
    p: Tensor  # search directions
    rz: Tensor  # rᵀM⁻¹r per column
    rel: Tensor  # ‖r‖/‖b‖ per column
    active: Tensor  # bool per column: still iterating
    residual_is_true: bool

    @classmethod
    def start(cls, A: Matvec, M: Matvec, b: Tensor, tol: float, x0: Tensor | None) -> _BlockCG:
        b_norm = b.norm(dim=0)
        denom = torch.where(b_norm > 0, b_norm, torch.ones_like(b_norm))
        x = torch.zeros_like(b) if x0 is None else _as_block(x0)[0].to(b).clone()
        r = b.clone() if x0 is None else b - A(x)  # no matvec wasted on x = 0
        rel = r.norm(dim=0) / denom
        z = M(r)
        return cls(A, M, b, denom, tol, x, r, z, (r * z).sum(dim=0), rel, rel > tol, True)

    def replace_residual(self, restart: bool) -> None:
        """Recompute ``r = b − Ax`` for all columns; active ones restart with ``p = M⁻¹r``.

        Why: the recursive residual drifts from the true one in finite precision, so apparent
        convergence is confirmed (and the reported residual is honest)."""
        self.r = self.b - self.A(self.x)
        self.rel = self.r.norm(dim=0) / self.denom
        self.active = self.rel > self.tol
        self.residual_is_true = True
        if restart and bool(self.active.any()):
            z = self.M(self.r)
            self.p = torch.where(self.active, z, self.p)
            self.rz = torch.where(self.active, (self.r * z).sum(dim=0), self.rz)

    def step(self) -> None:
        """One CG iteration on the active columns; inactive columns are left exactly as they are."""
        Ap = _matvec_active(self.A, self.p, self.active)
        pAp = (self.p * Ap).sum(dim=0)
        ok = self.active & (pAp > 0)  # pAp ≤ 0 only on breakdown (G not PSD): stop that column
        alpha = _safe_div(self.rz, pAp, ok)
        self.x = self.x + alpha * self.p
        self.r = self.r - alpha * Ap
        self.rel = torch.where(ok, self.r.norm(dim=0) / self.denom, self.rel)
        self.active = ok & (self.rel > self.tol)
        self.residual_is_true = False
        if bool(self.active.any()):
            z = self.M(self.r)
            rz_new = (self.r * z).sum(dim=0)
            beta = _safe_div(rz_new, self.rz, self.active & (self.rz != 0))
            self.p = torch.where(self.active, z + beta * self.p, self.p)
            self.rz = torch.where(self.active, rz_new, self.rz)


def conjugate_gradient(
    matvec: Matvec,
    b: Tensor,
    damping: float,
    *,
    tol: float = 1e-6,
    max_iter: int = 500,
    preconditioner: Matvec | None = None,
    x0: Tensor | None = None,
    callback: Callable[[int, Tensor], None] | None = None,
) -> SolveResult:
    """Solve ``(G + δI) x = b`` for every column of ``b`` by (preconditioned) conjugate gradients.

    The columns are independent CG runs advanced in lock-step so that each iteration costs one
    *batched* matvec; a column stops updating once its residual ``‖r‖/‖b‖ ≤ tol`` and is then
    left out of later matvecs. Apparent convergence is confirmed on the true residual
    ``b − (G+δI)x``; columns that fail the check restart from it while iterations remain.

    ``preconditioner`` applies ``M⁻¹ ≈ (G + δI)⁻¹`` to a block (e.g. :func:`nystrom_preconditioner`).
    ``callback(iteration, relative_residuals)`` is called after every iteration with the
    (recursive) residual estimates of all columns, e.g. for progress logs.
    """
    if damping < 0:
        raise ValueError(f"damping must be ≥ 0; got {damping}")
    b_block, squeeze = _as_block(b)
    cg = _BlockCG.start(_damped(matvec, damping), preconditioner or (lambda V: V), b_block, tol, x0)
    iterations = 0
    while True:
        if not bool(cg.active.any()):
            if cg.residual_is_true:
                break
            cg.replace_residual(restart=True)
            continue
        if iterations >= max_iter:
            break
        iterations += 1
        cg.step()
        if callback is not None:
            callback(iterations, cg.rel)
    if not cg.residual_is_true:
        cg.replace_residual(restart=False)
    converged = bool((cg.rel <= tol).all())
    x, rel = (cg.x.squeeze(-1), cg.rel.squeeze(-1)) if squeeze else (cg.x, cg.rel)
    return SolveResult(x=x, iterations=iterations, relative_residual=rel, converged=converged)


@dataclass
class NystromPreconditioner:
    """``P⁻¹ = (λ̂_ℓ + μ) U (Λ̂ + μI)⁻¹ Uᵀ + (I − UUᵀ)`` from a rank-ℓ Nyström approximation
    ``Ĝ = U Λ̂ Uᵀ`` of G (Frangella, Tropp & Udell 2021, "Randomized Nyström preconditioning").

    With ℓ above the number of eigenvalues of G that exceed ~μ, the preconditioned system has
    condition number O(1), so CG needs a few iterations instead of ~√κ.
    """

    U: Tensor  # [D, ℓ] orthonormal
    eigenvalues: Tensor  # [ℓ] descending, ≥ 0
    damping: float

    def __call__(self, V: Tensor) -> Tensor:
        block, squeeze = _as_block(V)
        scale = (self.eigenvalues[-1] + self.damping) / (self.eigenvalues + self.damping) - 1.0
        coeff = self.U.T @ block
        out = block + self.U @ (scale.unsqueeze(-1) * coeff)
        return out.squeeze(-1) if squeeze else out


def nystrom_preconditioner(
    matvec: Matvec,
    dim: int,
    rank: int,
    damping: float,
    *,
    dtype: torch.dtype,
    device: torch.device | str,
    generator: torch.Generator | None = None,
) -> NystromPreconditioner:
    """Build the randomized Nyström preconditioner for ``G + δI`` from ``rank`` matvecs (one block).

    The test matrix is drawn on the generator's device (CPU by default) and then moved, so a seeded
    generator gives the same preconditioner whatever the compute device.
    """
    if not 0 < rank <= dim:
        raise ValueError(f"rank must be in [1, dim={dim}]; got {rank}")
    if damping < 0:
        raise ValueError(f"damping must be ≥ 0; got {damping}")
    gen_device = generator.device if generator is not None else torch.device("cpu")
    omega = torch.randn(dim, rank, generator=generator, dtype=dtype, device=gen_device).to(device)
    omega, _ = torch.linalg.qr(omega)
    U, eig = _stable_nystrom(omega, matvec(omega))
    if float(eig[-1]) + damping <= 0:
        raise ValueError("G's sketch has a zero eigenvalue and damping is 0: preconditioner undefined")
    return NystromPreconditioner(U=U, eigenvalues=eig, damping=damping)


def dense_preconditioner(matvec: Matvec, dim: int, damping: float, *, dtype: torch.dtype,
                         device: torch.device | str, block: int = 512) -> NystromPreconditioner:
    """G formed exactly (``dim`` matvecs of the identity, ``block`` columns at a time) and
    eigendecomposed: the full-rank case of :class:`NystromPreconditioner`, whose P⁻¹ is then
    exactly (λ_min + δ)(G + δI)⁻¹, so CG converges in one step. For small θ (heads: a few thousand
    parameters) this costs seconds and gives exact eigenpairs (relative-IS norms, damping sweeps)."""
    columns = []
    for start in range(0, dim, block):
        eye = torch.zeros(dim, min(block, dim - start), dtype=dtype, device=device)
        eye[start:start + eye.shape[1]].fill_diagonal_(1.0)
        columns.append(matvec(eye))
    G = torch.cat(columns, dim=1)
    eigenvalues, U = torch.linalg.eigh(0.5 * (G + G.T))
    return NystromPreconditioner(U=U.flip(-1), eigenvalues=eigenvalues.flip(-1).clamp_min(0.0), damping=damping)


def hutchinson_trace(matvec: Matvec, dim: int, probes: int, *, dtype: torch.dtype, device: torch.device | str,
                     generator: torch.Generator | None = None) -> float:
    """An unbiased estimate of tr(G) from ``probes`` Rademacher vectors (one batched matvec)."""
    z = torch.randint(0, 2, (dim, probes), generator=generator, dtype=torch.int8).to(device=device, dtype=dtype)
    z = 2 * z - 1
    return float((z * matvec(z)).sum() / probes)


def _shift(Y: Tensor) -> float:
    """ν = √D · eps(‖Y‖₂): the small shift that makes the core Cholesky factorisation safe."""
    return math.sqrt(Y.shape[0]) * torch.finfo(Y.dtype).eps * float(torch.linalg.matrix_norm(Y, ord=2))


def _stable_nystrom(omega: Tensor, Y: Tensor) -> tuple[Tensor, Tensor]:
    """Algorithm 2.1 of Frangella et al.: Ĝ = Y_ν (Ωᵀ Y_ν)⁻¹ Y_νᵀ via Cholesky, then a thin SVD;
    returns ``(U, λ̂)`` with ``λ̂ = max(σ² − ν, 0)`` (the shift removed again), descending.

    The shift is increased tenfold if the Cholesky factorisation still fails (float32 sketches of
    badly conditioned G), at the cost of a slightly larger bias that is subtracted afterwards.
    """
    nu = _shift(Y)
    for _ in range(8):
        Y_nu = Y + nu * omega
        core = omega.T @ Y_nu
        L, info = torch.linalg.cholesky_ex(0.5 * (core + core.T))
        if int(info) == 0:
            Bm = torch.linalg.solve_triangular(L, Y_nu.T, upper=False).T  # Y_ν L⁻ᵀ
            U, sigma, _ = torch.linalg.svd(Bm, full_matrices=False)
            return U, (sigma.square() - nu).clamp_min(0.0)
        nu = max(10 * nu, torch.finfo(Y.dtype).eps)
    raise RuntimeError("Nyström sketch: Cholesky of ΩᵀYν failed even after raising the shift")


def dense_solve(matrix: Tensor, b: Tensor, damping: float) -> Tensor:
    """Reference ``(G + δI)⁻¹ b`` by Cholesky, for tests and tiny problems."""
    block, squeeze = _as_block(b)
    eye = torch.eye(matrix.shape[0], dtype=matrix.dtype, device=matrix.device)
    L = torch.linalg.cholesky(0.5 * (matrix + matrix.T) + damping * eye)
    x = torch.cholesky_solve(block, L)
    return x.squeeze(-1) if squeeze else x
