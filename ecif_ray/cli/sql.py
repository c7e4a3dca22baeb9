"""`ecif-ray sql`: query a run's influence tables with DuckDB.

Views: ``pairs``, ``scores``, ``errors``, ``trace``, ``runs`` (docs/pipeline.md has the schema and a
cookbook). RUN_DIR may also be a directory of run directories; ``run_id`` tells the runs apart.
Exit status 0, or 2 for a bad run directory or SQL.
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
    p.add_argument("run_dir", metavar="RUN_DIR", help="run directory (local or s3://), or a directory of runs")
    p.add_argument("query", metavar="SQL", help="one SQL statement")
    p.add_argument("--format", default="table", choices=["table", "csv", "json"],
                   help="table (aligned, for people), csv (with header) or json (an array of objects)")
    p.add_argument("--max-rows", type=int, default=1000, help="table format: rows shown at most (default 1000)")
    p.add_argument("--storage-options", type=json.loads, help="fsspec options as JSON, e.g. an S3 endpoint")
    p.set_defaults(func=_run_sql)


def _run_sql(args: argparse.Namespace) -> int:
    import duckdb

    from ecif_ray.tables.views import connect

    con = connect(args.run_dir, args.storage_options)
    for run_id, status in con.sql("SELECT run_id, status FROM runs WHERE status <> 'complete'").fetchall():
        print(f"ecif-ray sql: note: run {run_id} is {status}: its tables hold the shards committed so far",
              file=sys.stderr)
    try:
        relation = con.sql(args.query)
    except duckdb.Error as exc:
        raise ValueError(f"SQL: {str(exc).splitlines()[0]}") from exc
    if relation is None:  # a statement without a result (COPY ... TO, CREATE ...)
        return 0
    try:
        write(relation, args.format, args.max_rows)
    except BrokenPipeError:  # the reader (head, less) closed the pipe: not an error; mute the exit flush
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except duckdb.Error as exc:
        raise ValueError(f"SQL: {str(exc).splitlines()[0]}") from exc
    return 0


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
