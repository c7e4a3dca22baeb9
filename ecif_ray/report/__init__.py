"""The audit report of one scoring run: figures (PNG) and one self-contained HTML page.

``build_report(run_dir, out_dir, truth=None, top=24, query=None)`` reads a run directory (the
``pairs``, ``scores``, ``errors`` and ``trace`` tables through DuckDB, and ``manifest.json``),
fetches the images of the pairs it shows from the training (and test) shards recorded in the
manifest, and writes into ``out_dir``::

    index.html                   the report; every figure and thumbnail embedded as a data: URI,
                                 so the file can be mailed or attached on its own
    ecif_is_distribution.png     the figures, also as files
    pos_vs_neg.png
    precision_recall_at_k.png    only with ground truth
    shard_rates.png
    thumbnails/*.png             the images of the top flagged pairs and of the trace-back
    summary.json                 the numbers of the report (counts, detection quality, top pairs)

Ground truth (``truth``) is a Parquet file with one row per pair: ``shard, key, misaligned,
true_class, caption_class`` (``ecif-ray corpus`` writes one as ``truth.parquet``). With it the
report adds precision@k / recall@k curves of ECIF against two baselines (CLIP score, lowest
first, and the pair's own loss, highest first), colours the plots by truth and marks each
thumbnail as misaligned or clean.

The pieces are plain functions: data in (DataFrames), PNG bytes or HTML text out; only
:func:`build_report` and the loaders touch storage. Figures are drawn with matplotlib's
object API on the Agg canvas (no pyplot, no global backend state).
"""

from ecif_ray.report.build import build_report
from ecif_ray.report.data import ReportError, RunData, join_truth, load_run, read_truth
from ecif_ray.report.figures import figure_at_k, figure_distribution, figure_roles, figure_shards
from ecif_ray.report.html import Report, render_html
from ecif_ray.report.numbers import (
    FLAG_FRACTION,
    at_k_curves,
    detection_table,
    flagged_mask,
    rerank_trace,
    shard_rates,
    split_query_id,
    top_pairs,
)
from ecif_ray.report.thumbnails import fetch_images, thumbnail

__all__ = [
    "FLAG_FRACTION",
    "Report",
    "ReportError",
    "RunData",
    "at_k_curves",
    "build_report",
    "detection_table",
    "fetch_images",
    "figure_at_k",
    "figure_distribution",
    "figure_roles",
    "figure_shards",
    "flagged_mask",
    "join_truth",
    "load_run",
    "read_truth",
    "render_html",
    "rerank_trace",
    "shard_rates",
    "split_query_id",
    "thumbnail",
    "top_pairs",
]
