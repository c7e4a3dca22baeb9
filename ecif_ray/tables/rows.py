"""Table rows from the engine's per-segment results (no I/O): what ``pairs``, ``scores`` and
``errors`` files and the notebook API's Arrow tables are made of."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ecif_ray.data.samples import ErrorRecord
from ecif_ray.influence.scoring import SegmentScores


def pair_rows(results: Sequence[SegmentScores], queries: Sequence[str], q: int = 0) -> dict[str, list]:
    """``pairs`` columns: identities, CLIP score, own loss and query ``q``'s scores (default: the
    primary query)."""
    rows: dict[str, list] = {name: [] for name in ("shard", "key", "shard_index", "segment", "caption",
                                                   "clip_score", "loss", "query", "pos_is", "neg_is", "ecif_is")}
    for r in results:
        n = len(r)
        rows["shard"] += [r.shard] * n
        rows["key"] += r.keys
        rows["shard_index"] += r.shard_indices
        rows["segment"] += [r.segment] * n
        rows["caption"] += r.captions
        rows["clip_score"] += _floats(r.clip_score)
        rows["loss"] += _floats(r.loss)
        rows["query"] += [queries[q]] * n
        rows["pos_is"] += _floats(r.pos_is[q])
        rows["neg_is"] += _floats(r.neg_is[q])
        rows["ecif_is"] += _floats(r.ecif_is[q])
    return rows


def score_rows(results: Sequence[SegmentScores], queries: Sequence[str]) -> dict[str, list]:
    """``scores`` columns: one row per further query (all but the primary) and pair."""
    rows: dict[str, list] = {name: [] for name in ("query", "shard", "key", "pos_is", "neg_is", "ecif_is")}
    for q, query in enumerate(queries[1:], start=1):
        for r in results:
            rows["query"] += [query] * len(r)
            rows["shard"] += [r.shard] * len(r)
            rows["key"] += r.keys
            rows["pos_is"] += _floats(r.pos_is[q])
            rows["neg_is"] += _floats(r.neg_is[q])
            rows["ecif_is"] += _floats(r.ecif_is[q])
    return rows


def error_rows(errors: Sequence[ErrorRecord]) -> dict[str, list]:
    return {"shard": [e.shard for e in errors], "key": [e.key for e in errors], "stage": [e.stage for e in errors],
            "error": [e.error for e in errors], "message": [e.message for e in errors]}


def _floats(values: torch.Tensor) -> list[float]:
    return values.double().tolist()
