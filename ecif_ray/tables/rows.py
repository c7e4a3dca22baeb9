"""Rows of the ``errors`` table from the inputs that could not be scored (no I/O, no torch)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # data.samples imports webdataset, which imports torch
    from ecif_ray.data.samples import ErrorRecord

QUERY_INPUTS = "query-inputs"  # the file name of the query sets' error rows (no shard id ends without .tar)


def error_rows(errors: Sequence[ErrorRecord], stage: str | None = None) -> dict[str, list]:
    """One row per record; ``stage`` overrides theirs (``query``: a bad sample of a validation or test
    set, which is left out of the query, not scored)."""
    return {"shard": [e.shard for e in errors], "key": [e.key for e in errors],
            "stage": [stage or e.stage for e in errors], "error": [e.error for e in errors],
            "message": [e.message if stage is None else f"{e.message} ({e.stage}; left out of the {stage})"
                        for e in errors]}
