"""Arrow/Parquet schemas of the influence tables, and what every column means.

Every table is stored as one Parquet file per training shard under a Hive partition
``<table>/run_id=<run id>/<shard>.parquet``. ``run_id`` is a *partition column*: it is not stored
inside the files (Spark refuses a column that is both in the data and in the path), every reader
that understands Hive partitioning (DuckDB, Spark, Trino, pyarrow) adds it from the path, and
each file also records it in its key-value metadata (``ecif_ray.lineage``).

Row identity is ``(shard, key)``: ``shard`` is the shard's basename (``train-000003.tar``) and
``key`` its webdataset ``__key__``. A key repeated inside one shard is never merged: the first
occurrence is scored, every repeat is an ``errors`` row with stage ``duplicate``.

Sign convention of every ``*_is`` column (docs/method.md §3): the score is the predicted change of the
query loss when the pair is *removed* from training, L'(θ̂) − L'(θ̂₋ₙ):

* ``> 0``  removing the pair lowers the query loss: the pair is **harmful** (misalignment candidate);
* ``< 0``  removing it raises the loss: the pair is **valuable**.

``pos_is`` is the pair's positive role (its own image↔text match), ``neg_is`` its negative role
(in the other anchors' softmax denominators), ``ecif_is = pos_is + neg_is``.
"""

from __future__ import annotations

import pyarrow as pa

TABLES = ("pairs", "scores", "errors", "trace")
PARTITION = "run_id"

PAIRS = pa.schema(
    [
        pa.field("shard", pa.string(), nullable=False),       # shard id (basename of the tar)
        pa.field("key", pa.string(), nullable=False),         # webdataset __key__
        pa.field("shard_index", pa.int64(), nullable=False),  # ordinal of the sample in the tar (bad ones counted)
        pa.field("segment", pa.int64(), nullable=False),      # segment index within the shard
        pa.field("caption", pa.string(), nullable=False),
        pa.field("clip_score", pa.float64(), nullable=False),  # s · û · v̂ of the pair itself
        pa.field("reference_clip_score", pa.float64(), nullable=True),  # the same under --reference, else null
        pa.field("loss", pa.float64(), nullable=False),       # Pos_n = −log P^r_nn − log P^c_nn
        pa.field("query", pa.string(), nullable=False),       # which query the *_is columns hold (primary)
        pa.field("pos_is", pa.float64(), nullable=False),     # positive-role IS; > 0 harmful
        pa.field("neg_is", pa.float64(), nullable=False),     # negative-role IS; > 0 harmful
        pa.field("ecif_is", pa.float64(), nullable=False),    # pos_is + neg_is; > 0 harmful
        # pos_is of the primary query at the misalignment damping (tables.misalignment); null when absent
        pa.field("misalignment_pos_is", pa.float64(), nullable=True),
    ]
)
"""One row per scored pair; the score columns hold the primary query (the first in ``queries``).
The views add ``misalignment`` (tables.misalignment), a rank over the whole run, not stored."""

SCORES = pa.schema(
    [
        pa.field("query", pa.string(), nullable=False),
        pa.field("shard", pa.string(), nullable=False),
        pa.field("key", pa.string(), nullable=False),
        pa.field("pos_is", pa.float64(), nullable=False),
        pa.field("neg_is", pa.float64(), nullable=False),
        pa.field("ecif_is", pa.float64(), nullable=False),
    ]
)
"""Long form for the further queries (all but the primary): one row per (query, pair)."""

ERRORS = pa.schema(
    [
        pa.field("shard", pa.string(), nullable=False),
        pa.field("key", pa.string(), nullable=False),    # "" when the whole shard is unreadable
        # stage: read | key | limit | image | caption | duplicate | score | query | features
        pa.field("stage", pa.string(), nullable=False),
        pa.field("error", pa.string(), nullable=False),  # short class, e.g. EmptyCaption, OSError
        pa.field("message", pa.string(), nullable=False),
    ]
)
"""Every input that could not be scored (``data.samples`` documents the stages), plus ``score``:
a shard whose scoring failed ``max_attempts`` times (not committed; a rerun retries it)."""

TRACE = pa.schema(
    [
        pa.field("query_id", pa.string(), nullable=False),  # the test example, "<shard>/<key>"
        pa.field("rank", pa.int64(), nullable=False),       # 1 = strongest
        pa.field("shard", pa.string(), nullable=False),
        pa.field("key", pa.string(), nullable=False),
        pa.field("relative_is", pa.float64(), nullable=False),  # −∇ℓ_xᵀ Δθ₋ₙ / ‖Δθ₋ₙ‖
        pa.field("ecif_is", pa.float64(), nullable=False),
    ]
)
"""Misprediction trace-back: the top-k training pairs by relative-IS for each mispredicted test
example (filled when the run has a ``trace`` section)."""

SCHEMAS: dict[str, pa.Schema] = {"pairs": PAIRS, "scores": SCORES, "errors": ERRORS, "trace": TRACE}


def with_partition(schema: pa.Schema) -> pa.Schema:
    """The schema as query engines see it: the Hive partition column appended."""
    return schema.append(pa.field(PARTITION, pa.string()))


def empty(table: str) -> pa.Table:
    """A table with no rows (and the partition column): what a view shows before any file exists."""
    return with_partition(SCHEMAS[table]).empty_table()


def conform(table: str, data: pa.Table | dict[str, list]) -> pa.Table:
    """Cast rows to the table's schema (column order and types), refusing missing required or extra
    columns; a missing nullable column (e.g. ``reference_clip_score`` without a reference) is null."""
    schema = SCHEMAS[table]
    if isinstance(data, dict):
        data = pa.table(data)
    for field in schema:
        if field.nullable and field.name not in data.column_names:
            data = data.append_column(field.name, pa.nulls(data.num_rows, field.type))
    names = set(data.column_names)
    expected = set(schema.names)
    if names != expected:
        raise ValueError(f"{table}: columns {sorted(names)} do not match the schema {schema.names}")
    return data.select(schema.names).cast(schema)
