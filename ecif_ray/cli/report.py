"""`ecif-ray report`: the audit report of a scoring run, as one self-contained HTML file plus PNGs.

Exit status 0, or 2 for a bad argument (run directory, truth file, query, --top).
"""

from __future__ import annotations

import argparse
import json
import os
import posixpath

from ecif_ray.cli.common import subcommand

# The report's argument names (ecif_ray.report.ReportError.argument) as the command line spells them.
_FLAG_NAMES = {"run_dir": "RUN_DIR", "truth": "--truth", "query": "--query", "top": "--top", "out_dir": "--out"}


def add_parser(subparsers) -> None:
    p = subcommand(subparsers, "report", "Write the audit report of a scoring run: score distributions, "
                   "precision@k against ground truth, the top flagged pairs as thumbnails, per-shard rates, "
                   "errors, trace-back and lineage, as one self-contained HTML file (plus the PNGs).",
                   "ecif-ray report runs/r1 --truth corpus/truth.parquet  # writes runs/r1/report/index.html")
    p.add_argument("run_dir", metavar="RUN_DIR", help="run directory written by `ecif-ray score` (local or s3://)")
    p.add_argument("--truth", metavar="PATH", help="ground truth Parquet with columns shard, key, misaligned, "
                                                  "true_class, caption_class (default: none)")
    p.add_argument("--out", metavar="DIR", help="where index.html and the PNGs go (default: RUN_DIR/report)")
    p.add_argument("--top", metavar="N", type=int, default=24, help="flagged pairs shown as thumbnails (default 24)")
    p.add_argument("--query", metavar="NAME", help="whose scores to report, e.g. val or task (default: the run's "
                                                  "primary query)")
    p.add_argument("--storage-options", type=json.loads, help="fsspec options as JSON, e.g. an S3 endpoint "
                                                              "(for the run directory, truth file and shards)")
    p.set_defaults(func=_run_report, threads=1)


def _run_report(args: argparse.Namespace) -> int:
    from ecif_ray.report import ReportError, build_report

    if args.top < 0:
        raise ValueError(f"--top: must be >= 0, got {args.top}")
    out = args.out
    if out is None:
        if "://" in args.run_dir or "::" in args.run_dir:
            raise ValueError("--out: give a local directory for the report when RUN_DIR is not a local path")
        out = os.path.join(args.run_dir, "report")
    try:
        index = build_report(args.run_dir, out, truth=args.truth, top=args.top, query=args.query,
                             storage_options=args.storage_options)
    except ReportError as exc:
        raise ValueError(f"{_FLAG_NAMES.get(exc.argument, exc.argument)}: {exc.detail}") from exc
    print(f"report: {index}  (open it in a browser; figures and thumbnails are next to it in "
          f"{posixpath.join(os.fspath(index.parent), '')})")
    return 0
