"""DuckDB views over run directories: ``pairs`` (with ``misalignment``, tables.misalignment), ``scores``,
``errors``, ``trace`` and ``runs``.

``connect(location)`` accepts a run directory, or a directory whose children are run
directories (the views then span every run; ``run_id`` tells them apart). Local runs are read by
DuckDB itself (``read_parquet`` with Hive partitioning, in place). Runs on S3 or another fsspec
store are read through pyarrow datasets over the same fsspec filesystem, registered in DuckDB,
because DuckDB's own httpfs extension must be downloaded and the fsspec storage options (endpoint,
credentials) already describe how to reach the data. Either way DuckDB pushes projections and
filters down to the Parquet scan, so the views stay lazy on large runs.

A feature store (``tables.feature_store``: ``store.json`` at its root) connects too, with its own views:
``features`` (the stored trunk features), ``embeddings`` (every checkpoint's final embeddings and
``clip_score``, partition column ``checkpoint``; empty until ``ecif-ray embeddings`` ran) and ``errors``.

``connect(..., read_only=True)`` with :func:`check_read_only` on every query (what ``ecif-ray sql``
does by default) confines DuckDB to reading the run directories: local files are readable only
under them (plus the ``allow_read`` paths), no extension is installed or loaded, the
configuration is locked so that a query cannot lift these limits (DuckDB's
``enable_external_access``, ``allowed_directories``, ``allowed_paths`` and ``lock_configuration``
settings), and only SELECT statements (and EXPLAIN of them) run, so nothing is written anywhere.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.dataset as ds

from ecif_ray.tables.feature_store import (
    EMBEDDINGS_DIR,
    EMBEDDINGS_PARTITION,
    FEATURES_DIR,
    STORE_INFO,
    FeatureStore,
    embedding_schema,
    feature_schema,
)
from ecif_ray.tables.manifest import read_manifest, runs_table
from ecif_ray.tables.misalignment import misalignment_select
from ecif_ray.tables.schema import PARTITION, TABLES, empty
from ecif_ray.tables.store import MANIFEST, RunStore


class NotARunDirectory(ValueError):
    """The location holds no manifest.json, neither itself nor in its subdirectories."""


def open_runs(location: str, storage_options: Mapping[str, Any] | None = None) -> list[RunStore]:
    """The run directories at ``location``: itself, or its children that hold a manifest."""
    store = RunStore(location, storage_options)
    if store.exists(MANIFEST):
        return [store]
    if not store.exists():
        raise NotARunDirectory(f"{location}: no such run directory")
    children = [p for p in store.fs.ls(store.root, detail=False) if store.fs.isdir(p)]
    runs = [RunStore(_as_url(store, child), storage_options) for child in sorted(children)]
    runs = [run for run in runs if run.exists(MANIFEST)]
    if not runs:
        raise NotARunDirectory(f"{location}: not an ecif-ray run directory (no {MANIFEST} in it or its subdirectories)")
    return runs


def connect(location: str, storage_options: Mapping[str, Any] | None = None,
            database: str = ":memory:", *, read_only: bool = False,
            allow_read: Sequence[str] = ()) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection with the five views over the run(s) at ``location``.

    ``read_only``: DuckDB may touch local files only under the run directories and the
    ``allow_read`` files or directories; pass queries through :func:`check_read_only` as well,
    since DuckDB itself lets COPY ... TO write where it may read (see the module docstring).
    """
    feature_store = FeatureStore(location, storage_options)
    if feature_store.files.exists(STORE_INFO):
        return _connect_store(feature_store, database, read_only, allow_read)
    stores = open_runs(location, storage_options)
    con = duckdb.connect(database)
    if read_only:
        _confine(con, [s.root for s in stores if s.local], allow_read)
    for table in TABLES:
        _create_view(con, table, stores)
    manifests = [(s.url, m) for s in stores if (m := read_manifest(s)) is not None]
    con.register("_ecif_runs", runs_table(manifests))
    con.execute("CREATE VIEW runs AS SELECT * FROM _ecif_runs")
    if read_only:
        con.execute("SET lock_configuration = true")
    return con


def _connect_store(store: FeatureStore, database: str, read_only: bool,
                   allow_read: Sequence[str]) -> duckdb.DuckDBPyConnection:
    """The feature store's views (module docstring); the tables' layouts are ``tables.feature_store``'s."""
    con = duckdb.connect(database)
    if read_only:
        _confine(con, [store.files.root] if store.files.local else [], allow_read)
    info = store.info()
    # Shown while no embeddings exist: the columns, with a placeholder vector width.
    embeddings = pa.schema([*embedding_schema(1), (EMBEDDINGS_PARTITION, pa.string())])
    for table, partition, schema in ((FEATURES_DIR, None, feature_schema(info.columns if info else [])),
                                     (EMBEDDINGS_DIR, EMBEDDINGS_PARTITION, embeddings)):
        pattern = store.files.path(f"{table}/{partition + '=*/' if partition else ''}*.parquet")
        if store.files.local and store.files.fs.glob(pattern):
            hive = f"true, hive_types = {{'{partition}': 'VARCHAR'}}" if partition else "false"
            con.execute(f"CREATE VIEW {table} AS SELECT * FROM read_parquet({_quote(pattern)}, "
                        f"hive_partitioning = {hive})")
            continue
        dataset = None if store.files.local else _remote_dataset(store.files, table, partition)
        con.register(f"_ecif_{table}", dataset if dataset is not None else schema.empty_table())
        con.execute(f"CREATE VIEW {table} AS SELECT * FROM _ecif_{table}")
    con.register("_ecif_errors", store.errors())  # small: one row per bad sample
    con.execute("CREATE VIEW errors AS SELECT * FROM _ecif_errors")
    if read_only:
        con.execute("SET lock_configuration = true")
    return con


_EXPLAIN = re.compile(r"^\s*EXPLAIN\s+(ANALY[SZ]E\s+)?(\([^)]*\)\s*)?", re.IGNORECASE)


def check_read_only(con: duckdb.DuckDBPyConnection, query: str) -> None:
    """Raise ValueError unless every statement of ``query`` is a SELECT (DESCRIBE, SHOW, SUMMARIZE
    and FROM-first queries are SELECTs too) or an EXPLAIN of one (EXPLAIN ANALYZE runs it)."""
    for statement in con.extract_statements(query):
        kind = statement.type.name
        if kind == "EXPLAIN":
            inner, found = _EXPLAIN.subn("", statement.query, count=1)
            if not found:
                raise ValueError("SQL: this EXPLAIN form is refused by the read-only connection; write "
                                 "EXPLAIN [ANALYZE] SELECT ... (or use ecif-ray sql --allow-writes)")
            check_read_only(con, inner)
        elif kind != "SELECT":
            raise ValueError(f"SQL: {kind} statements are refused: the connection is read-only (only SELECT "
                             f"and EXPLAIN SELECT run; ecif-ray sql --allow-writes runs any)")


def _confine(con: duckdb.DuckDBPyConnection, run_roots: Sequence[str], allow_read: Sequence[str]) -> None:
    """Turn off DuckDB's access to files and extensions, except reads under the given roots and paths."""
    extra = [os.path.abspath(os.path.expanduser(p)) for p in allow_read]
    directories = [root.rstrip("/") + "/" for root in run_roots] + [p + "/" for p in extra if os.path.isdir(p)]
    files = [p for p in extra if not os.path.isdir(p)]
    con.execute("SET allowed_directories = $1", [directories])
    con.execute("SET allowed_paths = $1", [files])
    con.execute("SET autoinstall_known_extensions = false")
    con.execute("SET autoload_known_extensions = false")
    con.execute("SET enable_external_access = false")


def _create_view(con: duckdb.DuckDBPyConnection, table: str, stores: list[RunStore]) -> None:
    """``_ecif_<table>``: the files as stored; ``<table>``: what users query (``pairs`` adds ``misalignment``)."""
    raw = f"_ecif_{table}"
    globs = [g for s in stores if (g := _local_glob(s, table))] if all(s.local for s in stores) else []
    if globs:
        files = ", ".join(_quote(g) for g in globs)
        con.execute(f"CREATE VIEW {raw} AS SELECT * FROM read_parquet([{files}], hive_partitioning = true, "
                    f"hive_types = {{'{PARTITION}': 'VARCHAR'}})")
    else:
        datasets = [d for s in stores if not s.local and (d := _remote_dataset(s, table)) is not None]
        con.register(raw, ds.dataset(datasets) if datasets else empty(table))
    select = f"SELECT * FROM {raw}"
    if table == "pairs":
        stored = {row[0] for row in con.execute(f"DESCRIBE {raw}").fetchall()}
        select = misalignment_select(raw, PARTITION, "misalignment_pos_is" in stored)
    con.execute(f"CREATE VIEW {table} AS {select}")


def _local_glob(store: RunStore, table: str) -> str | None:
    pattern = store.path(f"{table}/{PARTITION}=*/*.parquet")
    return pattern if store.fs.glob(pattern) else None


def _remote_dataset(store: RunStore, table: str, partition: str | None = PARTITION) -> ds.Dataset | None:
    """The table's files under ``store`` as a pyarrow dataset (Hive-partitioned by ``partition``), or None."""
    base = store.path(table)
    # Every cached listing, not just ``base`` and its parents: the partition folders' listings (with
    # the files' ETags) would otherwise outlive a rerun that rewrote a shard's file.
    store.fs.invalidate_cache()
    if not store.fs.exists(base):
        return None
    partitioning = ds.partitioning(pa.schema([(partition, pa.string())]), flavor="hive") if partition else None
    dataset = ds.dataset(base, filesystem=store.fs, format="parquet", partitioning=partitioning)
    return dataset if dataset.files else None


def _as_url(store: RunStore, path: str) -> str:
    return path if store.local else store.fs.unstrip_protocol(path)


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"
