"""The iHVP solver's settings (docs/method.md §5), free of torch and models so that the job config and
the command line can import them without loading either."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import torch

Preconditioner = Literal["none", "nystrom", "dense"]
AnalysisDType = Literal["auto", "float32", "float64"]


def resolve_dtype(dtype: AnalysisDType, subset_kind: str) -> Literal["float32", "float64"]:
    """``auto``: float64 where it costs little, float32 elsewhere. With the heads subset every
    derivative runs on two linear maps over cached trunk features, and float64 cost 2.5× float32
    end to end (heads, 10k pairs: 19.9 s vs 7.8 s, BENCHMARKS.md); with LoRA, last-k or all the
    tail holds transformer blocks and float64 cost 3.4× (LoRA, 4k pairs: 1,215 s vs 353 s)."""
    if dtype != "auto":
        return dtype
    return "float64" if subset_kind == "heads" else "float32"


@dataclass(frozen=True)
class SolverSettings:
    tol: float | None = None  # default: 1e-8 in float64; 1e-5 in float32, which stalls near 1e-6 (eps · κ)
    max_iter: int = 500
    # Nyström (rank 64) costs one batched block of matvecs and cut CG from 142 to 18 iterations
    # (7.2 s → 0.85 s) on the micro model with δ = 1e-2 (see tests/test_traceback.py setup).
    # "dense" forms G exactly (D ≤ curvature.DENSE_MAX_DIM): CG then takes one step.
    preconditioner: Preconditioner = "nystrom"
    nystrom_rank: int = 64
    seed: int = 0
    chunk: int = 32  # vectors per JVP/VJP vmap (memory bound)

    def tolerance(self, dtype: torch.dtype) -> float:
        return self.tol if self.tol is not None else (1e-8 if str(dtype) == "torch.float64" else 1e-5)


DEFAULT_SOLVER = SolverSettings()
