"""`ecif-ray sql`: query a run's influence tables with DuckDB.

Views: ``pairs``, ``scores``, ``errors``, ``trace``, ``runs`` (docs/pipeline.md has the schema and a
cookbook). RUN_DIR may also be a directory of run directories; ``run_id`` tells the runs apart, or a
feature store (``ecif-ray features``), whose views are ``features``, ``embeddings`` and ``errors``.

Read-only by default: only SELECT statements (and EXPLAIN of them) run, and DuckDB reads local
files only under RUN_DIR and the ``--allow-read`` paths (a query cannot read ``~/.ray/auth_token``
or write a file); ``--allow-writes`` gives DuckDB its full access back (``COPY ... TO`` exports).
Exit status 0, or 2 for a bad run directory, an unreachable one, or SQL that fails or is refused.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from typing import Any

from ecif_ray.cli.common import subcommand


def add_parser(subparsers) -> None:
    p = subcommand(subparsers, "sql", "Run SQL (DuckDB) over a run's tables: pairs, scores, errors, trace, runs.",
                   "ecif-ray sql runs/r1 \"SELECT shard, key, ecif_is FROM pairs ORDER BY ecif_is DESC LIMIT 10\"")
    p.add_argument("run_dir", metavar="RUN_DIR", help="run directory (local or s3://), a directory of runs, or a "
                   "feature store (views features, embeddings, errors)")
    p.add_argument("query", metavar="SQL", help="one SQL statement")
    p.add_argument("--format", default="table", choices=["table", "csv", "json"],
                   help="table (aligned, for people), csv (with header) or json (an array of objects)")
    p.add_argument("--max-rows", type=int, default=1000, help="table format: rows shown at most (default 1000)")
    p.add_argument("--storage-options", type=json.loads, help="fsspec options as JSON, e.g. an S3 endpoint")
    p.add_argument("--allow-read", action="append", default=[], metavar="PATH",
                   help="a local file or directory queries may also read (e.g. corpus/truth.parquet to join "
                        "with); repeatable. Without it only RUN_DIR is readable")
    p.add_argument("--allow-writes", action="store_true",
                   help="give DuckDB full access: any statement (COPY ... TO, ATTACH, INSTALL), any file. "
                        "Default: read-only, confined to RUN_DIR")
    p.set_defaults(func=_run_sql)


def _run_sql(args: argparse.Namespace) -> int:
    import duckdb

    from ecif_ray.tables.views import check_read_only

    con = _connect(args)
    if con.sql("SELECT 1 FROM duckdb_views() WHERE view_name = 'runs'").fetchall():  # not for a feature store
        for run_id, status in con.sql("SELECT run_id, status FROM runs WHERE status <> 'complete'").fetchall():
            print(f"ecif-ray sql: note: run {run_id} is {status}: its tables hold the shards committed so far",
                  file=sys.stderr)
    try:
        if not args.allow_writes:
            check_read_only(con, args.query)
        relation = con.sql(args.query)
    except duckdb.Error as exc:
        raise _sql_error(exc) from exc
    if relation is None:  # a statement without a result (COPY ... TO, CREATE ...)
        return 0
    try:
        write(relation, args.format, args.max_rows)
    except BrokenPipeError:  # the reader (head, less) closed the pipe: not an error; mute the exit flush
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except duckdb.Error as exc:
        raise _sql_error(exc) from exc
    return 0


def _sql_error(exc: Exception) -> ValueError:
    import duckdb

    message = f"SQL: {str(exc).splitlines()[0]}"
    if isinstance(exc, duckdb.PermissionException):
        message += " (read-only: only RUN_DIR and --allow-read paths are readable; --allow-writes gives full access)"
    return ValueError(message)


def _connect(args: argparse.Namespace) -> Any:
    """The views over RUN_DIR; a remote one that cannot be reached says what may be missing."""
    from ecif_ray.tables.views import NotARunDirectory, connect

    try:
        return connect(args.run_dir, args.storage_options, read_only=not args.allow_writes,
                       allow_read=args.allow_read)
    except NotARunDirectory:
        raise
    except Exception as exc:  # s3fs/botocore and other filesystems raise many types
        if "://" not in args.run_dir or args.run_dir.startswith("file://"):
            raise
        raise ValueError(_unreachable(args.run_dir, args.storage_options, exc)) from exc


def _unreachable(run_dir: str, storage_options: dict | None, exc: Exception) -> str:
    reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    if storage_options:
        return f"{run_dir}: cannot read the run with the given --storage-options ({reason})"
    return (f"{run_dir}: cannot read the run ({reason}); no --storage-options given: pass the store's endpoint "
            f"and credentials as fsspec options, e.g. --storage-options '{{\"client_kwargs\": {{\"endpoint_url\": "
            f"\"http://HOST:PORT\"}}, \"key\": \"...\", \"secret\": \"...\"}}' (for AWS itself, credentials "
            f"in the environment or ~/.aws are enough)")


def write(relation: Any, fmt: str, max_rows: int) -> None:
    if fmt == "table":
        relation.show(max_rows=max_rows, max_width=10_000)
        return
    columns = relation.columns
    rows = relation.fetchall()
    if fmt == "csv":
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows(rows)
    else:
        json.dump([dict(zip(columns, row)) for row in rows], sys.stdout, default=str, indent=1)
        sys.stdout.write("\n")
