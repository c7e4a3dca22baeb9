"""Rows of the ``errors`` table from the inputs that could not be scored (no I/O, no torch)."""

from __future__ import annotations

from collections.abc import Sequence

from ecif_ray.data.samples import ErrorRecord


def error_rows(errors: Sequence[ErrorRecord]) -> dict[str, list]:
    return {"shard": [e.shard for e in errors], "key": [e.key for e in errors], "stage": [e.stage for e in errors],
            "error": [e.error for e in errors], "message": [e.message for e in errors]}
