"""The ``misalignment`` column: one number per pair for "is this caption wrong for this image?".

Higher = more likely misaligned. Within one run (``run_id``) it is the mean of two percentiles:

    misalignment = ½ · [ cume_dist(misalignment_pos_is) + cume_dist(−similarity) ]

* ``misalignment_pos_is``: the pair's positive-role influence on the primary (validation) query,
  solved at the *misalignment damping* (docs/concepts.md "Which column answers what"), a larger δ
  than the analysis δ; stored in ``pairs`` by every run;
* ``similarity``: ``reference_clip_score`` when the run has a reference model (``--reference``), else
  the audited model's own ``clip_score``.

Why a rank combination: the two signals are in different units and fail in different places — a
random caption swap is dissimilar (the CLIP score finds it) while a learned, systematic error looks
aligned to the model and is found by influence (BENCHMARKS.md §1). A rank over the run is the only
calibration that needs no labels; it is why the column is computed by the SQL views
(``tables.views``) at query time rather than stored: every shard a resumed run adds moves every
rank. Spark or Trino users compute it with the same window expression over the Parquet files.
"""

from __future__ import annotations

import duckdb
import pyarrow as pa

SIMILARITY = "coalesce(reference_clip_score, clip_score)"


def misalignment_select(source: str, partition: str = "run_id", present: bool = True) -> str:
    """``SELECT *, <misalignment> FROM source``: the column as a window expression over a ``pairs``
    relation, ranked within each ``partition`` (the run column; ``1`` for rows of one run held in
    memory). ``present=False`` (files written before the column existed) gives NULL.

    The two percentiles are computed in two nested selects: DuckDB 2.0 fails on two windows with
    different orders over the same Hive partition column in one select ("partition columns not
    supported"); any SQL engine computes the same values either way."""
    if not present:
        return f"SELECT *, CAST(NULL AS DOUBLE) AS misalignment FROM {source}"
    return (f"SELECT * EXCLUDE (_influence_percentile), CASE WHEN misalignment_pos_is IS NULL THEN NULL ELSE "
            f"(_influence_percentile + cume_dist() OVER (PARTITION BY {partition} ORDER BY -{SIMILARITY})) / 2 "
            f"END AS misalignment FROM (SELECT *, cume_dist() OVER (PARTITION BY {partition} ORDER BY "
            f"misalignment_pos_is) AS _influence_percentile FROM {source})")


def with_misalignment(pairs: pa.Table, partition: str = "1") -> pa.Table:
    """``pairs`` rows held in memory (e.g. the notebook engine's) with the ``misalignment`` column, ranked
    within each value of the ``partition`` column (default: all rows together), in the input's row order."""
    con = duckdb.connect()
    con.register("pairs_in", pairs)
    numbered = "(SELECT *, row_number() OVER () AS _row FROM pairs_in)"
    ranked = con.sql(f"SELECT misalignment FROM ({misalignment_select(numbered, partition)}) ORDER BY _row"
                     ).to_arrow_table()
    return pairs.append_column("misalignment", ranked["misalignment"])
