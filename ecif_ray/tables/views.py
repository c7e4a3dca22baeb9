"""DuckDB views over run directories: ``pairs``, ``scores``, ``errors``, ``trace`` and ``runs``.

``connect(location)`` accepts a run directory, or a directory whose children are run
directories (the views then span every run; ``run_id`` tells them apart). Local runs are read by
DuckDB itself (``read_parquet`` with Hive partitioning, in place). Runs on S3 or another fsspec
store are read through pyarrow datasets over the same fsspec filesystem, registered in DuckDB,
because DuckDB's own httpfs extension must be downloaded and the fsspec storage options (endpoint,
credentials) already describe how to reach the data. Either way DuckDB pushes projections and
filters down to the Parquet scan, so the views stay lazy on large runs.
"""

from __future__ import annotations

import posixpath
from collections.abc import Mapping
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.dataset as ds

from ecif_ray.tables.manifest import read_manifest, runs_table
from ecif_ray.tables.schema import PARTITION, TABLES, empty
from ecif_ray.tables.store import MANIFEST, RunStore

_HIVE = ds.partitioning(pa.schema([(PARTITION, pa.string())]), flavor="hive")


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
            database: str = ":memory:") -> duckdb.DuckDBPyConnection:
    """A DuckDB connection with the five views over the run(s) at ``location``."""
    stores = open_runs(location, storage_options)
    con = duckdb.connect(database)
    for table in TABLES:
        _create_view(con, table, stores)
    manifests = [(s.url, m) for s in stores if (m := read_manifest(s)) is not None]
    con.register("_ecif_runs", runs_table(manifests))
    con.execute("CREATE VIEW runs AS SELECT * FROM _ecif_runs")
    return con


def _create_view(con: duckdb.DuckDBPyConnection, table: str, stores: list[RunStore]) -> None:
    if all(s.local for s in stores):
        globs = [g for s in stores if (g := _local_glob(s, table))]
        if globs:
            files = ", ".join(_quote(g) for g in globs)
            con.execute(f"CREATE VIEW {table} AS SELECT * FROM read_parquet([{files}], hive_partitioning = true, "
                        f"hive_types = {{'{PARTITION}': 'VARCHAR'}})")
            return
        source: Any = empty(table)
    else:
        datasets = [d for s in stores if (d := _remote_dataset(s, table)) is not None]
        source = ds.dataset(datasets) if datasets else empty(table)
    con.register(f"_ecif_{table}", source)
    con.execute(f"CREATE VIEW {table} AS SELECT * FROM _ecif_{table}")


def _local_glob(store: RunStore, table: str) -> str | None:
    pattern = store.path(f"{table}/{PARTITION}=*/*.parquet")
    return pattern if store.fs.glob(pattern) else None


def _remote_dataset(store: RunStore, table: str) -> ds.Dataset | None:
    base = store.path(table)
    store.fs.invalidate_cache(base)
    if not store.fs.exists(base):
        return None
    dataset = ds.dataset(base, filesystem=store.fs, format="parquet", partitioning=_HIVE)
    return dataset if dataset.files else None


def _as_url(store: RunStore, path: str) -> str:
    return path if store.local else store.fs.unstrip_protocol(path)


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def table_url(store: RunStore, table: str) -> str:
    """Where a table's files live (for Spark/Trino users: point an external table here)."""
    return posixpath.join(store.url, table)
