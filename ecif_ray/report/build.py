"""``build_report``: the whole report of one run, assembled from the package's parts and written out."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ecif_ray.report.data import ReportError, RunData, join_truth, load_run, read_captions, read_truth
from ecif_ray.report.figures import figure_at_k, figure_distribution, figure_roles, figure_shards
from ecif_ray.report.html import TRACE_EXAMPLES_SHOWN, Report, render_html
from ecif_ray.report.numbers import (
    FLAG_FRACTION,
    at_k_curves,
    detection_table,
    rerank_trace,
    shard_rates,
    split_query_id,
    top_pairs,
)
from ecif_ray.report.thumbnails import fetch_images, thumbnail


def build_report(run_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str],
                 truth: str | os.PathLike[str] | None = None, top: int = 24, query: str | None = None,
                 storage_options: Mapping[str, Any] | None = None,
                 flag_fraction: float = FLAG_FRACTION) -> Path:
    """Write the report of the run at ``run_dir`` into ``out_dir``; returns the path of ``index.html``.

    ``truth``: ground-truth Parquet (shard, key, misaligned, true_class, caption_class), optional.
    ``top``: flagged pairs shown as thumbnails. ``query``: which query's scores (default: primary).
    ``storage_options``: fsspec options for a remote run directory, truth file and shards.
    """
    if top < 0:
        raise ReportError("top", f"must be >= 0, got {top}")
    if not 0 < flag_fraction <= 1:
        raise ReportError("flag_fraction", f"must be in (0, 1], got {flag_fraction}")
    run, con = load_run(os.fspath(run_dir), query, storage_options)
    if run.pairs.empty:
        raise ReportError("run_dir", f"{run.url}: the run has no scored pairs yet (status {run.manifest.status})")
    notes: list[str] = []
    if run.manifest.status != "complete":
        notes.append(f"the run is {run.manifest.status}: only committed shards are shown")
    truth_frame = read_truth(truth, storage_options) if truth is not None else None
    truth_missing = 0
    if truth_frame is not None:
        run.pairs, truth_missing = join_truth(run.pairs, truth_frame)
        if truth_missing == len(run.pairs):
            raise ReportError("truth", f"{truth}: no row matches a scored pair by (shard, key)")
        if truth_missing:
            notes.append(f"{truth_missing} scored pairs have no row in the truth file")

    top_frame = top_pairs(run.pairs, top)
    trace = rerank_trace(run.trace)
    if truth_frame is not None and not trace.empty:
        trace = trace.merge(truth_frame, on=["shard", "key"], how="left")
    shown = {*zip(top_frame["shard"], top_frame["key"]), *zip(trace["shard"], trace["key"])}
    run.captions = read_captions(con, shown)
    images = _images(run, shown, trace, truth_frame, storage_options, notes)
    figures, detection, rates = _figures(run, truth_frame, top, flag_fraction, notes)
    report = Report(run=run, top=top_frame, figures=figures, thumbnails=images.thumbnails,
                    test_thumbnails=images.test_thumbnails, rates=rates, trace=trace, detection=detection,
                    truth_path=None if truth is None else os.fspath(truth), truth_missing=truth_missing,
                    test_truth=images.test_truth, notes=notes, flag_fraction=flag_fraction)
    return write_report(report, Path(out_dir))


@dataclass
class _Images:
    thumbnails: dict[tuple[str, str], bytes]  # train (shard, key) -> PNG
    test_thumbnails: dict[tuple[str, str], bytes]  # test (shard, key) -> PNG
    test_truth: dict[tuple[str, str], str]  # test (shard, key) -> true class, when truth is given


def _images(run: RunData, shown: set[tuple[str, str]], trace: pd.DataFrame, truth: pd.DataFrame | None,
            storage_options: Mapping[str, Any] | None, notes: list[str]) -> _Images:
    """Thumbnails of the pairs shown and of the traced test images (from the shards the manifest names)."""
    cfg = run.manifest.config or {}
    so = storage_options if storage_options is not None else _usable_options(cfg.get("storage_options"))
    images, image_notes = fetch_images(cfg.get("train"), shown, so)
    test_ids = [split_query_id(q) for q in dict.fromkeys(trace["query_id"])][:TRACE_EXAMPLES_SHOWN]
    test_images, test_notes = fetch_images(cfg.get("test"), test_ids, so) if test_ids else ({}, [])
    notes += [f"thumbnails: {n}" for n in image_notes + test_notes]
    test_truth: dict[tuple[str, str], str] = {}
    if truth is not None and test_ids:
        wanted = pd.DataFrame(test_ids, columns=["shard", "key"]).merge(truth, on=["shard", "key"])
        test_truth = {(r.shard, r.key): r.true_class for r in wanted.itertuples(index=False)}
    return _Images(thumbnails={ident: thumbnail(img) for ident, img in images.items()},
                   test_thumbnails={ident: thumbnail(img) for ident, img in test_images.items()},
                   test_truth=test_truth)


def _figures(run: RunData, truth: pd.DataFrame | None, top: int, flag_fraction: float, notes: list[str]
             ) -> tuple[dict[str, bytes], list[dict[str, Any]], pd.DataFrame]:
    """The figures (file name -> PNG), the detection table (with truth) and the per-shard rates."""
    figures = {"ecif_is_distribution.png": figure_distribution(run.pairs), "pos_vs_neg.png": figure_roles(run.pairs)}
    detection: list[dict[str, Any]] = []
    if truth is not None:
        known = run.pairs[run.pairs["misaligned"].notna()]
        positives = int(known["misaligned"].astype(bool).sum())
        figures["precision_recall_at_k.png"] = figure_at_k(at_k_curves(run.pairs), positives, len(known))
        detection = detection_table(run.pairs, top=max(1, min(top or 10, len(known))))
        if not detection:
            notes.append("the truth file marks every matched pair alike (all misaligned or all clean): "
                         "no detection quality to compute")
    rates = shard_rates(run.pairs, run.errors, flag_fraction)
    figures["shard_rates.png"] = figure_shards(rates, flag_fraction)
    return figures, detection, rates


def write_report(report: Report, out: Path) -> Path:
    """The figures, thumbnails, summary.json and index.html (written last, atomically) into ``out``."""
    page = render_html(report)
    (out / "thumbnails").mkdir(parents=True, exist_ok=True)
    for name, png in report.figures.items():
        (out / name).write_bytes(png)
    thumbs, top = report.thumbnails, list(zip(report.top["shard"], report.top["key"]))
    for rank, (shard, key) in enumerate(top, start=1):
        if (shard, key) in thumbs:
            (out / "thumbnails" / f"top-{rank:04d}_{_safe(shard)}_{_safe(key)}.png").write_bytes(thumbs[shard, key])
    for (shard, key), png in report.test_thumbnails.items():
        (out / "thumbnails" / f"test_{_safe(shard)}_{_safe(key)}.png").write_bytes(png)
    for (shard, key), png in thumbs.items():
        if (shard, key) not in set(top):
            (out / "thumbnails" / f"trace_{_safe(shard)}_{_safe(key)}.png").write_bytes(png)
    (out / "summary.json").write_text(json.dumps(_summary(report), indent=2, default=_json_default))
    index = out / "index.html"
    tmp = out / ".index.html.tmp"
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(index)
    return index


def _usable_options(options: Any) -> dict[str, Any] | None:
    """The manifest's storage options, unless redacted (then the caller must pass them)."""
    return options if isinstance(options, dict) else None


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)[:80]


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    return str(value)


def _summary(report: Report) -> dict[str, Any]:
    run = report.run
    columns = [c for c in ("rank", "shard", "key", "misalignment", "ecif_is", "pos_is", "neg_is", "clip_score",
                           "reference_clip_score", "loss", "misaligned", "true_class", "caption_class")
               if c in report.top]
    top = report.top[columns].astype(object).where(report.top[columns].notna(), None).to_dict("records")
    return {
        "run_id": run.manifest.run_id, "run_dir": run.url, "query": run.query, "status": run.manifest.status,
        "pairs": len(run.pairs), "harmful": int((run.pairs["ecif_is"] > 0).sum()), "errors": len(run.errors),
        "truth": report.truth_path, "truth_missing": report.truth_missing, "detection": report.detection,
        "flag_fraction": report.flag_fraction, "model_check": run.manifest.model_check, "top": top,
        "trace_examples": int(report.trace["query_id"].nunique()) if not report.trace.empty else 0,
        "notes": report.notes,
    }
