"""The solved directions in the run directory: ``directions/directions.safetensors`` and ``.json``.

The arrays (the [Q, D] directions, the query losses, the residuals and, when tracing back, G's
eigenbasis) are saved as safetensors from numpy, so this module, like all of ``tables/``, needs no
torch; the pipeline turns them into tensors. The JSON names what was solved and how
(:class:`DirectionsMeta`); it is written last, so a directory holding it is complete. A rerun with
the same fingerprint reuses the directions instead of solving again.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from safetensors.numpy import load as load_arrays
from safetensors.numpy import save as save_arrays

from ecif_ray.tables.store import DIRECTIONS_DIR, RunStore

DIRECTIONS_TENSORS = f"{DIRECTIONS_DIR}/directions.safetensors"
DIRECTIONS_META = f"{DIRECTIONS_DIR}/directions.json"


@dataclass(frozen=True)
class DirectionsMeta:
    """``directions.json``: what was solved for which run, and how."""

    fingerprint: str  # of the run the directions were solved for
    names: list[str]  # one per direction: the named queries, then the traced test examples
    iterations: int
    converged: bool
    relative_residual: dict[str, float]  # per direction name
    settings: dict[str, Any]  # the solver settings as resolved (tol, delta, preconditioner, ...)
    seconds: float
    curvature: dict[str, Any] = field(default_factory=dict)  # the sample: segments, pairs, summation order
    damping: dict[str, Any] = field(default_factory=dict)  # rule, training δ, analysis δ
    queries: dict[str, Any] = field(default_factory=dict)  # per named query: examples, loss
    traced: list[str] = field(default_factory=list)  # names of the trace-back examples (a suffix of names)
    basis_rank: int | None = None
    query_input_errors: int = 0

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> DirectionsMeta:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass(frozen=True)
class SavedDirections:
    meta: DirectionsMeta
    arrays: dict[str, np.ndarray]  # vectors, query_losses, relative_residual (+ basis_U, basis_eigenvalues)


def save_directions(store: RunStore, arrays: Mapping[str, np.ndarray], meta: DirectionsMeta) -> None:
    """Arrays first, then the JSON that names them: a directory with JSON is complete."""
    store.put(DIRECTIONS_TENSORS, save_arrays({k: np.ascontiguousarray(v) for k, v in arrays.items()}))
    store.put_json(DIRECTIONS_META, meta.to_json())


def load_directions(store: RunStore, fingerprint: str) -> SavedDirections | None:
    """The saved directions if they were solved for this fingerprint, else None."""
    meta = store.get_json(DIRECTIONS_META)
    data = store.get(DIRECTIONS_TENSORS)
    if meta is None or data is None or meta.get("fingerprint") != fingerprint:
        return None
    return SavedDirections(DirectionsMeta.from_json(meta), load_arrays(data))
