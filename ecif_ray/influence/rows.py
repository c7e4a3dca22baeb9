"""Table rows of the engine's per-segment scores (no I/O): the columns of the ``pairs`` and ``scores``
files a worker writes, and of the notebook API's Arrow tables.

The conversion from tensors to Python lists happens here, on the influence side, so that
``tables/`` (which writes and reads the files) never needs torch.
"""

from __future__ import annotations

from collections.abc import Sequence

import pyarrow as pa
import torch

from ecif_ray.influence.queries import MISALIGNMENT_QUERY
from ecif_ray.influence.scoring import SegmentScores
from ecif_ray.tables.schema import conform


def pair_rows(results: Sequence[SegmentScores], queries: Sequence[str], q: int = 0) -> dict[str, list]:
    """``pairs`` columns: identities, CLIP score, own loss and query ``q``'s scores (default: the
    primary query)."""
    rows: dict[str, list] = {name: [] for name in ("shard", "key", "shard_index", "segment", "caption",
                                                   "clip_score", "reference_clip_score", "loss", "query", "pos_is",
                                                   "neg_is", "ecif_is", "misalignment_pos_is")}
    m = queries.index(MISALIGNMENT_QUERY) if MISALIGNMENT_QUERY in queries else None
    for r in results:
        n = len(r)
        rows["shard"] += [r.shard] * n
        rows["key"] += r.keys
        rows["shard_index"] += r.shard_indices
        rows["segment"] += [r.segment] * n
        rows["caption"] += r.captions
        rows["clip_score"] += _floats(r.clip_score)
        rows["reference_clip_score"] += [None] * n if r.reference_clip_score is None else \
            _floats(r.reference_clip_score)
        rows["loss"] += _floats(r.loss)
        rows["query"] += [queries[q]] * n
        rows["pos_is"] += _floats(r.pos_is[q])
        rows["neg_is"] += _floats(r.neg_is[q])
        rows["ecif_is"] += _floats(r.ecif_is[q])
        rows["misalignment_pos_is"] += [None] * n if m is None else _floats(r.pos_is[m])
    return rows


def score_rows(results: Sequence[SegmentScores], queries: Sequence[str]) -> dict[str, list]:
    """``scores`` columns: one row per further query (all but the primary and the misalignment
    direction) and pair."""
    rows: dict[str, list] = {name: [] for name in ("query", "shard", "key", "pos_is", "neg_is", "ecif_is")}
    for q, query in enumerate(queries[1:], start=1):
        if query == MISALIGNMENT_QUERY:
            continue
        for r in results:
            rows["query"] += [query] * len(r)
            rows["shard"] += [r.shard] * len(r)
            rows["key"] += r.keys
            rows["pos_is"] += _floats(r.pos_is[q])
            rows["neg_is"] += _floats(r.neg_is[q])
            rows["ecif_is"] += _floats(r.ecif_is[q])
    return rows


def scores_to_arrow(scores: list[SegmentScores], query_names: list[str]) -> pa.Table:
    """The ``pairs`` schema in long format: one row per (pair, query), the misalignment direction (when
    solved) in every row's ``misalignment_pos_is``. Positive ecif_is = removing the pair lowers that
    query's loss = harmful."""
    wanted = [q for q, name in enumerate(query_names) if name != MISALIGNMENT_QUERY]
    return pa.concat_tables([conform("pairs", pair_rows(scores, query_names, q)) for q in wanted])


def _floats(values: torch.Tensor) -> list[float]:
    return values.double().tolist()
