"""The influence tables: Parquet schemas, atomic per-shard writers, manifest, DuckDB views.

Free of Ray and of torch: anything that reads or writes a run directory (the pipeline's workers,
the driver, ``ecif-ray sql``, a notebook) goes through this package.
"""

from ecif_ray.tables.manifest import Manifest, read_manifest, runs_table, write_manifest
from ecif_ray.tables.schema import ERRORS, PAIRS, SCHEMAS, SCORES, TABLES, TRACE
from ecif_ray.tables.store import FileRecord, RunStore, ShardRecord
from ecif_ray.tables.views import NotARunDirectory, connect, open_runs

__all__ = [
    "ERRORS",
    "PAIRS",
    "SCHEMAS",
    "SCORES",
    "TABLES",
    "TRACE",
    "FileRecord",
    "Manifest",
    "NotARunDirectory",
    "RunStore",
    "ShardRecord",
    "connect",
    "open_runs",
    "read_manifest",
    "runs_table",
    "write_manifest",
]
