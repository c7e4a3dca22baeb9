"""Rankings over table rows, one rule each, shared by the workers, the driver and the report.

* the most harmful pairs: the largest ``ecif_is`` first, ties in input order;
* trace-back ranks: per traced example (``query_id``), the largest ``relative_is`` first, ties by
  (shard, key), ranked from 1; each shard keeps its own top k, so the run's top k per example is
  the k best among the shards' rows.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np


def top_indices(scores: Sequence[float] | np.ndarray, k: int) -> list[int]:
    """Positions of the ``k`` largest scores, largest first (ties in input order)."""
    if k <= 0:
        return []
    return np.argsort(-np.asarray(scores, dtype=float), kind="stable")[:k].tolist()


def rank_trace(rows: Iterable[Mapping[str, Any]], k: int) -> list[dict[str, Any]]:
    """The ``k`` best rows per ``query_id`` (by ``relative_is``), ranked from 1, query ids in order."""
    by_query: dict[str, list[Mapping[str, Any]]] = {}
    for row in rows:
        by_query.setdefault(row["query_id"], []).append(row)
    ranked = []
    for query_id in sorted(by_query):
        best = sorted(by_query[query_id], key=lambda h: (-h["relative_is"], h["shard"], h["key"]))[:k]
        ranked += [{**hit, "rank": rank} for rank, hit in enumerate(best, start=1)]
    return ranked
