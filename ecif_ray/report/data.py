"""Loading a run for the report: its tables (for one query) and manifest, the ground truth, captions.

Only this module and ``report.build`` touch storage; the rest of the package works on DataFrames.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from ecif_ray.tables.manifest import Manifest, read_manifest
from ecif_ray.tables.views import NotARunDirectory, connect, open_runs

TRUTH_COLUMNS = ("shard", "key", "misaligned", "true_class", "caption_class")
PAIR_COLUMNS = ("shard", "key", "shard_index", "clip_score", "reference_clip_score", "loss", "pos_is", "neg_is",
                "ecif_is", "misalignment")


class ReportError(ValueError):
    """A bad argument of the report; ``argument`` names it (run_dir, truth, query, top, out_dir)."""

    def __init__(self, argument: str, message: str):
        super().__init__(f"{argument}: {message}")
        self.argument, self.detail = argument, message


@dataclass
class RunData:
    """What the report is built from: one run's tables (the chosen query) and its manifest."""

    url: str
    manifest: Manifest
    query: str
    pairs: pd.DataFrame  # PAIR_COLUMNS (+ caption for the rows shown, + truth columns when given)
    errors: pd.DataFrame  # shard, key, stage, error, message
    trace: pd.DataFrame  # query_id, rank, shard, key, relative_is, ecif_is
    captions: dict[tuple[str, str], str] = field(default_factory=dict)  # (shard, key) -> caption, rows shown


def load_run(run_dir: str, query: str | None = None,
             storage_options: Mapping[str, Any] | None = None) -> tuple[RunData, Any]:
    """The run's tables for ``query`` (default: the primary one) and an open DuckDB connection."""
    try:
        stores = open_runs(str(run_dir), storage_options)
    except NotARunDirectory as exc:
        raise ReportError("run_dir", str(exc)) from exc
    if len(stores) > 1:
        ids = ", ".join(posixpath.basename(s.root) for s in stores[:5]) + (", ..." if len(stores) > 5 else "")
        raise ReportError("run_dir", f"{run_dir} holds {len(stores)} runs ({ids}); give one run directory")
    store = stores[0]
    manifest = read_manifest(store)
    assert manifest is not None  # open_runs only returns directories with a manifest
    query = query or manifest.primary_query
    if query not in manifest.queries:
        raise ReportError("query", f"{query!r} is not a query of this run (it has {', '.join(manifest.queries)})")
    con = connect(store.url, storage_options)
    if query == manifest.primary_query:
        pairs = con.sql(f"SELECT {', '.join(PAIR_COLUMNS)} FROM pairs").df()
    else:
        pairs = con.execute("""
            SELECT p.shard, p.key, p.shard_index, p.clip_score, p.reference_clip_score, p.loss, s.pos_is, s.neg_is,
                   s.ecif_is, p.misalignment
            FROM pairs p JOIN scores s USING (shard, key) WHERE s.query = ?""", [query]).df()
    pairs = pairs.sort_values(["shard", "shard_index"], kind="stable").reset_index(drop=True)
    errors = con.sql("SELECT shard, key, stage, error, message FROM errors ORDER BY shard, key").df()
    trace = con.sql("SELECT query_id, rank, shard, key, relative_is, ecif_is FROM trace").df()
    return RunData(url=store.url, manifest=manifest, query=query, pairs=pairs, errors=errors, trace=trace), con


def read_truth(path: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None) -> pd.DataFrame:
    """Ground truth: one row per (shard, key) with ``misaligned`` (bool), ``true_class``, ``caption_class``."""
    import fsspec
    import pyarrow.parquet as pq

    path = os.fspath(path)
    try:
        with fsspec.open(path, "rb", **dict(storage_options or {})) as f:
            table = pq.read_table(f)
    except FileNotFoundError as exc:
        raise ReportError("truth", f"{path}: no such file") from exc
    except Exception as exc:  # not Parquet, unreadable
        raise ReportError("truth", f"{path}: not a readable Parquet file: {type(exc).__name__}: {exc}") from exc
    missing = [c for c in TRUTH_COLUMNS if c not in table.column_names]
    if missing:
        raise ReportError("truth", f"{path}: missing columns {missing} (needs {', '.join(TRUTH_COLUMNS)})")
    truth = table.select(list(TRUTH_COLUMNS)).to_pandas()
    truth["misaligned"] = truth["misaligned"].astype(bool)
    return truth.drop_duplicates(["shard", "key"], keep="first")


def join_truth(pairs: pd.DataFrame, truth: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """Pairs with the truth columns (left join); returns also how many pairs have no truth row."""
    joined = pairs.merge(truth, on=["shard", "key"], how="left", validate="one_to_one")
    missing = int(joined["misaligned"].isna().sum())
    return joined, missing


def read_captions(con: Any, idents: Iterable[tuple[str, str]]) -> dict[tuple[str, str], str]:
    """Captions of the pairs shown (read for those rows only)."""
    wanted = pd.DataFrame(sorted(idents), columns=["shard", "key"])
    if wanted.empty:
        return {}
    con.register("_report_wanted", wanted)
    try:
        rows = con.sql("SELECT p.shard, p.key, p.caption FROM pairs p JOIN _report_wanted w USING (shard, key)")
        return {(s, k): c for s, k, c in rows.fetchall()}
    finally:
        con.unregister("_report_wanted")
