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

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import posixpath
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from ecif_ray.tables.manifest import Manifest, read_manifest
from ecif_ray.tables.views import NotARunDirectory, connect, open_runs

TRUTH_COLUMNS = ("shard", "key", "misaligned", "true_class", "caption_class")
PAIR_COLUMNS = ("shard", "key", "shard_index", "clip_score", "loss", "pos_is", "neg_is", "ecif_is")
FLAG_FRACTION = 0.2  # "flagged" = the run-wide top 20% by ecif_is (the demo's convention)
SCATTER_POINTS = 20_000  # the pos/neg scatter shows a fixed random sample of larger runs
SHARDS_SHOWN = 60  # per-shard figure and table: the shards with the highest flagged rate
TRACE_EXAMPLES_SHOWN = 20
ERROR_MESSAGES_SHOWN = 20

QUERY_MEANING = {
    "val": "the contrastive loss on the trusted validation pairs",
    "task": "the zero-shot classification loss on the labelled test images",
}

# Detection baselines: (label, score column, sign) where sign * column is "larger = more suspicious".
METHODS = (
    ("ECIF (ecif_is, highest first)", "ecif_is", 1.0),
    ("CLIP score (lowest first)", "clip_score", -1.0),
    ("per-pair loss (highest first)", "loss", 1.0),
)
METHOD_COLORS = ("#c0392b", "#2e86c1", "#7f8c8d")
CLEAN_COLOR, MISALIGNED_COLOR = "#4c72b0", "#d62728"


class ReportError(ValueError):
    """A bad argument of the report; ``argument`` names it (run_dir, truth, query, top, out_dir)."""

    def __init__(self, argument: str, message: str):
        super().__init__(f"{argument}: {message}")
        self.argument, self.detail = argument, message


# ---------------------------------------------------------------------------------------------
# Loading


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
            SELECT p.shard, p.key, p.shard_index, p.clip_score, p.loss, s.pos_is, s.neg_is, s.ecif_is
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


# ---------------------------------------------------------------------------------------------
# Numbers


def at_k_curves(pairs: pd.DataFrame) -> pd.DataFrame:
    """Precision@k and recall@k of each method, k = 1..n, over the pairs that have truth."""
    known = pairs[pairs["misaligned"].notna()]
    truth = known["misaligned"].to_numpy(dtype=bool)
    n, positives = len(truth), int(truth.sum())
    k = np.arange(1, n + 1)
    frames = []
    for label, column, sign in METHODS:
        order = np.argsort(-sign * known[column].to_numpy(dtype=float), kind="stable")
        hits = np.cumsum(truth[order])
        frames.append(pd.DataFrame({"method": label, "k": k, "precision": hits / k,
                                    "recall": hits / positives if positives else np.zeros(n)}))
    return pd.concat(frames, ignore_index=True)


def detection_table(pairs: pd.DataFrame, top: int) -> list[dict[str, Any]]:
    """AUROC, AP, precision@k (k = number of misaligned pairs) and hits in the top ``top``, per method."""
    from ecif_ray.metrics import detection_metrics

    known = pairs[pairs["misaligned"].notna()]
    truth = known["misaligned"].to_numpy(dtype=bool)
    rows = []
    for label, column, sign in METHODS:
        scores = sign * known[column].to_numpy(dtype=float)
        try:
            m = detection_metrics(scores, truth, top=top)
        except ValueError:  # truth all one class: nothing to rank against
            continue
        rows.append({"method": label, "auroc": m["auroc"], "average_precision": m["average_precision"],
                     "precision_at_k": m["precision_at_k"], "k": m["k"], "top": top,
                     "hits_top": m[f"hits_top{top}"]})
    return rows


def flagged_mask(pairs: pd.DataFrame, fraction: float = FLAG_FRACTION) -> np.ndarray:
    """The run-wide top ``fraction`` of pairs by ecif_is (at least one pair)."""
    n = len(pairs)
    flagged = np.zeros(n, dtype=bool)
    if n:
        count = max(1, math.ceil(fraction * n))
        flagged[np.argsort(-pairs["ecif_is"].to_numpy(dtype=float), kind="stable")[:count]] = True
    return flagged


def shard_rates(pairs: pd.DataFrame, errors: pd.DataFrame, fraction: float = FLAG_FRACTION) -> pd.DataFrame:
    """Per shard: pairs, flagged rate (run-wide top ``fraction``), harmful rate (ecif_is > 0), mean
    ecif_is, error rows and, with truth, the truly misaligned rate."""
    frame = pairs.assign(flagged=flagged_mask(pairs, fraction), harmful=pairs["ecif_is"] > 0)
    agg: dict[str, tuple[str, str]] = {"pairs": ("key", "size"), "flagged_rate": ("flagged", "mean"),
                                       "harmful_rate": ("harmful", "mean"), "mean_ecif_is": ("ecif_is", "mean")}
    if "misaligned" in frame:
        frame["misaligned_f"] = frame["misaligned"].astype(float)
        agg["misaligned_rate"] = ("misaligned_f", "mean")
    rates = frame.groupby("shard", sort=True).agg(**agg).reset_index()
    error_counts = errors.groupby("shard").size().rename("errors")
    rates = rates.merge(error_counts, left_on="shard", right_index=True, how="outer")
    rates["errors"] = rates["errors"].fillna(0).astype(int)
    rates["pairs"] = rates["pairs"].fillna(0).astype(int)
    return rates.sort_values("shard").reset_index(drop=True)


def top_pairs(pairs: pd.DataFrame, top: int) -> pd.DataFrame:
    """The ``top`` most harmful pairs (largest ecif_is), ranked from 1."""
    ranked = pairs.sort_values("ecif_is", ascending=False, kind="stable").head(top).copy()
    ranked.insert(0, "rank", np.arange(1, len(ranked) + 1))
    return ranked.reset_index(drop=True)


def rerank_trace(trace: pd.DataFrame) -> pd.DataFrame:
    """Trace rows ranked across shards: each shard keeps its own top k per test example, so the run's
    top k per example is the k largest relative_is among them (k = the per-shard k)."""
    if trace.empty:
        return trace.assign(rank=pd.Series(dtype="int64"))
    k = int(trace["rank"].max())
    ordered = trace.sort_values(["query_id", "relative_is"], ascending=[True, False], kind="stable")
    ordered = ordered.groupby("query_id", sort=True).head(k).copy()
    ordered["rank"] = ordered.groupby("query_id").cumcount() + 1
    return ordered.reset_index(drop=True)


def split_query_id(query_id: str) -> tuple[str, str]:
    """``"<shard>/<key>"`` -> (shard, key)."""
    shard, _, key = query_id.rpartition("/")
    return shard, key


# ---------------------------------------------------------------------------------------------
# Figures (PNG bytes)


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=110, layout="constrained")


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", facecolor="white")
    return buf.getvalue()


def _has_truth(pairs: pd.DataFrame) -> bool:
    return "misaligned" in pairs and bool(pairs["misaligned"].notna().any())


def figure_distribution(pairs: pd.DataFrame) -> bytes:
    """Histogram of ecif_is (clean vs misaligned when truth is known), 0 marked."""
    fig = _figure(6.4, 3.8)
    ax = fig.add_subplot()
    values = pairs["ecif_is"].to_numpy(dtype=float)
    bins = np.histogram_bin_edges(values, bins=min(60, max(10, int(math.sqrt(len(values))) * 2)))
    if _has_truth(pairs):
        truth = pairs["misaligned"]
        clean, bad = values[(truth == False).to_numpy()], values[(truth == True).to_numpy()]  # noqa: E712
        ax.hist(clean, bins=bins, color=CLEAN_COLOR, alpha=0.65, label=f"clean ({len(clean)})")
        ax.hist(bad, bins=bins, color=MISALIGNED_COLOR, alpha=0.65, label=f"misaligned ({len(bad)})")
        unknown = values[truth.isna().to_numpy()]
        if len(unknown):
            ax.hist(unknown, bins=bins, color="#999999", alpha=0.5, label=f"no truth ({len(unknown)})")
        ax.legend(frameon=False)
    else:
        ax.hist(values, bins=bins, color="#555555", alpha=0.8)
    ax.axvline(0.0, color="black", lw=1, ls="--")
    ax.text(0.99, 0.97, "harmful →", transform=ax.transAxes, ha="right", va="top", fontsize=9)
    ax.text(0.01, 0.97, "← valuable", transform=ax.transAxes, ha="left", va="top", fontsize=9)
    ax.set_xlabel("ecif_is  (> 0: removing the pair lowers the query loss)")
    ax.set_ylabel("pairs")
    ax.set_title("Distribution of ecif_is")
    return _png(fig)


def figure_roles(pairs: pd.DataFrame, max_points: int = SCATTER_POINTS) -> bytes:
    """pos_is vs neg_is, one point per pair (a fixed sample of large runs); the line ecif_is = 0."""
    fig = _figure(6.4, 3.8)
    ax = fig.add_subplot()
    shown = pairs.sample(max_points, random_state=0) if len(pairs) > max_points else pairs
    pos, neg = shown["pos_is"].to_numpy(dtype=float), shown["neg_is"].to_numpy(dtype=float)
    if _has_truth(shown):
        truth = shown["misaligned"]
        for mask, color, label in (((truth == False).to_numpy(), CLEAN_COLOR, "clean"),  # noqa: E712
                                   ((truth == True).to_numpy(), MISALIGNED_COLOR, "misaligned"),  # noqa: E712
                                   (truth.isna().to_numpy(), "#999999", "no truth")):
            if mask.any():
                ax.scatter(pos[mask], neg[mask], s=12, alpha=0.7, color=color, label=label, linewidths=0)
        ax.legend(frameon=False, loc="best")
    else:
        ecif = shown["ecif_is"].to_numpy(dtype=float)
        limit = float(np.abs(ecif).max()) or 1.0
        points = ax.scatter(pos, neg, s=12, c=ecif, cmap="coolwarm", vmin=-limit, vmax=limit, linewidths=0)
        fig.colorbar(points, ax=ax, label="ecif_is")
    xlim, ylim = ax.get_xlim(), ax.get_ylim()
    xs = np.linspace(max(xlim[0], -ylim[1]), min(xlim[1], -ylim[0]), 2)  # the part of pos + neg = 0 in view
    ax.plot(xs, -xs, color="black", lw=1, ls="--", label="_ecif_is = 0")
    ax.set_xlim(xlim)
    ax.set_ylim(ylim)
    ax.axhline(0, color="#bbbbbb", lw=0.8)
    ax.axvline(0, color="#bbbbbb", lw=0.8)
    ax.set_xlabel("pos_is (own image↔caption match)")
    ax.set_ylabel("neg_is (as a negative for others)")
    sampled = f", {len(shown)} of {len(pairs)} shown" if len(shown) < len(pairs) else ""
    ax.set_title(f"Positive vs negative role (above the dashed line: harmful){sampled}", fontsize=10)
    return _png(fig)


def figure_at_k(curves: pd.DataFrame, positives: int, total: int) -> bytes:
    """Precision@k and recall@k per method, with the random-ranking baseline."""
    fig = _figure(11.5, 3.9)
    axes = fig.subplots(1, 2)
    base_rate = positives / total if total else 0.0
    for (label, _, _), color in zip(METHODS, METHOD_COLORS):
        curve = curves[curves["method"] == label]
        axes[0].plot(curve["k"], curve["precision"], color=color, lw=1.8, label=label)
        axes[1].plot(curve["k"], curve["recall"], color=color, lw=1.8, label=label)
    k = np.arange(1, total + 1)
    axes[0].axhline(base_rate, color="black", lw=1, ls=":", label=f"random ({base_rate:.2f})")
    axes[1].plot(k, k / total if total else k, color="black", lw=1, ls=":", label="random")
    for ax, name in zip(axes, ("precision@k", "recall@k")):
        ax.axvline(positives, color="#888888", lw=1, ls="--")
        ax.set_xlabel(f"k (pairs flagged; dashed: k = {positives} misaligned pairs)")
        ax.set_ylabel(name)
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlim(1, max(total, 2))
        if total > 2000:
            ax.set_xscale("log")
        ax.set_title(f"{name} against the ground truth")
        ax.grid(alpha=0.3)
    axes[0].legend(frameon=False, fontsize=8, loc="upper right")
    return _png(fig)


def figure_shards(rates: pd.DataFrame, fraction: float = FLAG_FRACTION, limit: int = SHARDS_SHOWN) -> bytes:
    """Flagged rate per shard (and the true misaligned rate when known), highest flagged first if many."""
    shown = rates[rates["pairs"] > 0]
    if len(shown) > limit:
        shown = shown.sort_values("flagged_rate", ascending=False, kind="stable").head(limit)
    width = min(12.0, max(6.4, 0.35 * len(shown) + 2))
    fig = _figure(width, 3.6)
    ax = fig.add_subplot()
    x = np.arange(len(shown))
    with_truth = "misaligned_rate" in shown and bool(shown["misaligned_rate"].notna().any())
    bar = 0.4 if with_truth else 0.7
    ax.bar(x - (bar / 2 if with_truth else 0), shown["flagged_rate"], width=bar, color=METHOD_COLORS[0],
           label=f"flagged (run-wide top {fraction:.0%} by ecif_is)")
    if with_truth:
        ax.bar(x + bar / 2, shown["misaligned_rate"], width=bar, color="#333333", alpha=0.7,
               label="truly misaligned")
    ax.axhline(fraction, color="black", lw=1, ls=":")
    ax.set_xticks(x, shown["shard"], rotation=45 if len(shown) > 4 else 0, ha="right" if len(shown) > 4 else "center",
                  fontsize=8)
    ax.set_ylabel("fraction of the shard's pairs")
    ax.set_ylim(0, 1)
    ax.legend(frameon=False, fontsize=8)
    ax.set_title("Per-shard rates" + (f" ({limit} shards with the highest flagged rate)"
                                      if len(rates) > limit else ""))
    return _png(fig)


# ---------------------------------------------------------------------------------------------
# Images


def fetch_images(spec: str | list[str] | None, wanted: Iterable[tuple[str, str]],
                 storage_options: Mapping[str, Any] | None = None) -> tuple[dict[tuple[str, str], Image.Image],
                                                                           list[str]]:
    """The images of ``wanted`` (shard, key) pairs from the shards named by ``spec``.

    Only the shards that hold a wanted pair are opened, and each is read only up to its last
    wanted key. Returns the images found and notes on what could not be found (never raises on
    missing or broken input: the report then shows a placeholder).
    """
    from ecif_ray.data.samples import Sample, iter_shard
    from ecif_ray.data.shards import list_shards

    wanted_by_shard: dict[str, set[str]] = {}
    for shard, key in wanted:
        wanted_by_shard.setdefault(shard, set()).add(key)
    if not wanted_by_shard:
        return {}, []
    if not spec:
        return {}, ["the manifest records no shard location for these images"]
    try:
        shards = list_shards(spec, storage_options)
    except Exception as exc:  # moved, deleted, unreachable storage
        return {}, [f"cannot list the shards {spec!r}: {exc}"]
    images: dict[tuple[str, str], Image.Image] = {}
    notes: list[str] = []
    by_name = {s.name: s for s in shards}
    for name, keys in sorted(wanted_by_shard.items()):
        shard = by_name.get(name)
        if shard is None:
            notes.append(f"shard {name} is not among the shards at {spec!r}")
            continue
        remaining = set(keys)
        for item in iter_shard(shard, storage_options):
            if isinstance(item, Sample):
                if item.key in remaining:
                    images[name, item.key] = item.image
                    remaining.discard(item.key)
                    if not remaining:
                        break
            elif item.stage in ("open", "read"):
                notes.append(item.message)
        if remaining:
            notes.append(f"shard {name}: {len(remaining)} image(s) not found (e.g. key {sorted(remaining)[0]!r})")
    return images, notes


def thumbnail(image: Image.Image, size: int = 128) -> bytes:
    """A PNG of at most ``size`` pixels a side; small images (8×8 digits) are enlarged without blur."""
    image = image.convert("RGB")
    longest = max(image.size)
    if longest < size:
        factor = max(1, size // longest)
        image = image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)
    else:
        image = image.copy()
        image.thumbnail((size, size), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# HTML


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _num(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, bool | np.bool_):
        return "yes" if value else "no"
    if isinstance(value, int | np.integer):
        return f"{int(value):,}"
    if isinstance(value, float | np.floating):
        value = float(value)
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
            return f"{value:.{digits - 1}e}"
        return f"{value:.{digits}g}" if abs(value) >= 1 else f"{value:.{digits}f}".rstrip("0").rstrip(".")
    return _esc(value)


def _table(columns: Sequence[str], rows: Iterable[Sequence[Any]], numeric: Sequence[bool] | None = None) -> str:
    numeric = numeric or [False] * len(columns)
    head = "".join(f"<th>{_esc(c)}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f'<td class="{"num" if n else ""}">{_num(v) if n else _esc(v)}</td>'
                         for v, n in zip(row, numeric)) + "</tr>"
        for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _figure_html(figures: Mapping[str, bytes], name: str, alt: str) -> str:
    return (f'<figure><img src="{data_uri(figures[name])}" alt="{_esc(alt)}">'
            f'<figcaption>{_esc(alt)} <span class="muted">({_esc(name)})</span></figcaption></figure>')


def _truth_badge(row: Mapping[str, Any]) -> str:
    misaligned = row.get("misaligned")
    if misaligned is None or (isinstance(misaligned, float) and math.isnan(misaligned)):
        return ""
    if bool(misaligned):
        return (f'<div class="badge bad">MISALIGNED: image is a {_esc(row.get("true_class"))}, caption says '
                f'{_esc(row.get("caption_class"))}</div>')
    return f'<div class="badge ok">clean: {_esc(row.get("true_class"))}</div>'


def _card(png: bytes | None, label: str, ident: str, caption: str | None, lines: Sequence[str], badge: str = "",
          extra_class: str = "") -> str:
    image = (f'<img class="thumb" src="{data_uri(png)}" alt="{_esc(label)} {_esc(ident)}">' if png is not None
             else '<div class="thumb missing">image unavailable</div>')
    caption_html = f'<div class="caption">“{_esc(caption)}”</div>' if caption is not None else ""
    body = "".join(f"<div>{line}</div>" for line in lines)
    return (f'<div class="card {extra_class}">{image}<div class="title">{_esc(label)}</div>'
            f'<div class="ident">{_esc(ident)}</div>{caption_html}<div class="scores">{body}</div>{badge}</div>')


CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 0; color: #222;
       background: #fafafa; line-height: 1.45; }
main { max-width: 1220px; margin: 0 auto; padding: 16px 28px 48px; }
h1 { font-size: 26px; margin: 8px 0 4px; }
h2 { font-size: 20px; margin: 34px 0 8px; padding-bottom: 4px; border-bottom: 2px solid #e2e2e2; }
h3 { font-size: 16px; margin: 18px 0 6px; }
nav { font-size: 13px; margin: 6px 0 14px; }
nav a { margin-right: 12px; color: #1f5fa0; text-decoration: none; }
.muted { color: #777; font-size: 12px; }
.explain { background: #fff8e5; border: 1px solid #f0d890; border-radius: 6px; padding: 10px 16px; }
.explain p { margin: 6px 0; }
.stats { display: flex; flex-wrap: wrap; gap: 10px; margin: 14px 0; }
.stat { background: white; border: 1px solid #ddd; border-radius: 6px; padding: 8px 14px; min-width: 110px; }
.stat b { display: block; font-size: 20px; }
.stat span { font-size: 12px; color: #666; }
.figures { display: flex; flex-wrap: wrap; gap: 14px; }
.figures > figure { flex: 1 1 460px; }
figure { margin: 0; background: white; border: 1px solid #ddd; border-radius: 6px; padding: 6px; }
figure img { max-width: 100%; height: auto; display: block; }
figcaption { font-size: 12px; color: #444; padding: 4px 2px 0; }
table { border-collapse: collapse; background: white; font-size: 13px; margin: 8px 0; }
th, td { border: 1px solid #ddd; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f0f0f0; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(172px, 1fr)); gap: 12px; }
.card { background: white; border: 1px solid #ddd; border-radius: 6px; padding: 8px; font-size: 12px; }
.card.query { border: 2px solid #555; background: #f4f4f4; }
.thumb { width: 128px; height: 128px; object-fit: contain; image-rendering: pixelated; display: block;
         margin: 0 auto 6px; background: #111; border-radius: 3px; }
.thumb.missing { background: #eee; color: #888; display: flex; align-items: center; justify-content: center; }
.title { font-weight: 700; font-size: 13px; }
.ident { color: #555; font-size: 11px; overflow-wrap: anywhere; }
.grid.compact { grid-template-columns: repeat(auto-fill, minmax(138px, 1fr)); gap: 8px; }
.grid.compact .thumb { width: 96px; height: 96px; }
.caption { font-style: italic; margin: 3px 0; }
.scores { font-variant-numeric: tabular-nums; color: #333; }
.badge { margin-top: 5px; border-radius: 4px; padding: 2px 6px; font-weight: 600; }
.badge.bad { background: #fde2e1; color: #a11; }
.badge.ok { background: #e3f4e1; color: #256b1f; }
.trace-row { display: grid; grid-template-columns: 160px 1fr; gap: 12px; margin: 12px 0; align-items: start; }
.notes { color: #8a5a00; font-size: 13px; }
details { margin: 8px 0; }
pre { background: white; border: 1px solid #ddd; padding: 8px; overflow-x: auto; font-size: 12px; }
"""


@dataclass
class Report:
    """Everything the HTML page shows; assembled by :func:`build_report`, rendered by :func:`render_html`."""

    run: RunData
    top: pd.DataFrame
    figures: dict[str, bytes]  # file name -> PNG
    thumbnails: dict[tuple[str, str], bytes]  # train (shard, key) -> PNG
    test_thumbnails: dict[tuple[str, str], bytes]  # test (shard, key) -> PNG
    rates: pd.DataFrame
    trace: pd.DataFrame  # re-ranked, with caption (+ truth) columns
    detection: list[dict[str, Any]]
    truth_path: str | None
    truth_missing: int
    test_truth: dict[tuple[str, str], str]  # test (shard, key) -> true class, when truth is given
    notes: list[str]
    flag_fraction: float = FLAG_FRACTION


def _score_lines(row: Mapping[str, Any]) -> list[str]:
    return [f"ecif_is <b>{_num(row['ecif_is'])}</b>",
            f"pos {_num(row['pos_is'])} · neg {_num(row['neg_is'])}",
            f"clip {_num(row['clip_score'], 3)} · loss {_num(row['loss'], 3)}"]


def render_html(report: Report) -> str:
    """The report as one self-contained HTML document (images inline as data: URIs)."""
    run, m = report.run, report.run.manifest
    pairs = run.pairs
    has_truth = report.truth_path is not None
    sections: list[str] = []
    nav = [("how-to-read", "How to read"), ("distribution", "Score distribution"),
           ("detection", "Detection quality"), ("flagged", "Top flagged pairs"), ("shards", "Per shard"),
           ("errors", "Errors"), ("trace", "Trace-back"), ("lineage", "Run lineage")]

    harmful = int((pairs["ecif_is"] > 0).sum())
    stats = [(f"{len(pairs):,}", "pairs scored"), (f"{harmful:,}", "ecif_is > 0 (harmful)"),
             (f"{len(pairs) - harmful:,}", "ecif_is ≤ 0 (valuable/neutral)"),
             (f"{len(run.errors):,}", "inputs not scored"), (m.status, "run status"), (run.query, "query")]
    if has_truth:
        known = pairs["misaligned"].notna()
        stats.insert(1, (f"{int(pairs.loc[known, 'misaligned'].astype(bool).sum()):,}", "truly misaligned"))
    meaning = QUERY_MEANING.get(run.query, f"the {run.query!r} query loss")
    sections.append(f"""
<section id="how-to-read"><h2>How to read this report</h2><div class="explain">
<p>Every training pair (image + caption) got a score, <b>ecif_is</b>: the predicted change of the query
loss — here {_esc(meaning)} (query <code>{_esc(run.query)}</code>) — if that one pair were removed from training
and the model re-fitted: <code>ecif_is = loss(trained model) − loss(model trained without the pair)</code>.</p>
<p><b>Positive ecif_is = harmful</b>: removing the pair would <i>lower</i> the loss. These are the candidates
to inspect first — typically pairs whose caption does not describe the image.
<b>Negative ecif_is = valuable</b>: removing the pair would raise the loss. Near zero: little effect.</p>
<p>Each score is the sum of two parts: <b>pos_is</b> (the pair's own image↔caption match) and
<b>neg_is</b> (its role as a negative example for the other pairs trained alongside it);
<code>ecif_is = pos_is + neg_is</code>. Scores are first-order predictions: rank by them, do not read them
as exact loss changes.</p>
<p>“Flagged” below means the run-wide top {report.flag_fraction:.0%} of pairs by ecif_is.
{"Ground truth from " + _esc(report.truth_path) + " marks pairs as misaligned or clean." if has_truth
 else "No ground truth was given (<code>--truth</code>), so detection quality is not shown."}</p>
</div>
<div class="stats">{"".join(f'<div class="stat"><b>{_esc(v)}</b><span>{_esc(k)}</span></div>' for v, k in stats)}</div>
{_notes(report.notes)}
</section>""")

    figs = report.figures
    sections.append(f"""
<section id="distribution"><h2>Score distribution</h2>
<p>Left: how ecif_is is distributed{" for clean and misaligned pairs" if has_truth else ""}; the dashed line is 0.
Right: each pair's two roles; pairs above the dashed diagonal have ecif_is &gt; 0.</p>
<div class="figures">{_figure_html(figs, "ecif_is_distribution.png", "Distribution of ecif_is")}
{_figure_html(figs, "pos_vs_neg.png", "pos_is vs neg_is per pair")}</div>
</section>""")

    if has_truth and "precision_recall_at_k.png" in figs:
        rows = [(d["method"], d["auroc"], d["average_precision"], d["precision_at_k"], d["hits_top"])
                for d in report.detection]
        k = report.detection[0]["k"] if report.detection else 0
        top = report.detection[0]["top"] if report.detection else 0
        missing = (f'<p class="notes">{report.truth_missing:,} scored pairs have no row in the truth file and '
                   f"are left out of these numbers.</p>" if report.truth_missing else "")
        detection = f"""
<p>How well each ranking finds the truly misaligned pairs: flag the k highest-ranked pairs and count how many
are misaligned (precision@k) and what share of all misaligned pairs that is (recall@k). ECIF is compared with
two common filters: CLIP score (flag the pairs the model itself matches worst) and the pair's own training
loss. Dotted lines: a random ranking.</p>
{_table(["method", "AUROC", "average precision", f"precision@{k}", f"misaligned in top {top}"], rows,
        [False, True, True, True, True])}
{missing}
<div class="figures">{_figure_html(figs, "precision_recall_at_k.png", "precision@k and recall@k")}</div>"""
    else:
        detection = ("<p>Not available: give ground truth with <code>--truth truth.parquet</code> (columns "
                     "shard, key, misaligned, true_class, caption_class) to see precision@k and recall@k.</p>")
    sections.append(f'<section id="detection"><h2>Detection quality</h2>{detection}</section>')

    cards = []
    for row in report.top.to_dict("records"):
        ident = (row["shard"], row["key"])
        cards.append(_card(report.thumbnails.get(ident), f"#{row['rank']}", f"{row['shard']} / {row['key']}",
                           run.captions.get(ident), _score_lines(row), _truth_badge(row)))
    hits = ""
    if has_truth and len(report.top):
        n_bad = int(report.top["misaligned"].fillna(False).astype(bool).sum())
        hits = f" {n_bad} of these {len(report.top)} are truly misaligned."
    sections.append(f"""
<section id="flagged"><h2>Top {len(report.top)} flagged pairs</h2>
<p>The pairs with the largest ecif_is — the most harmful according to ECIF — with their images and captions.{hits}</p>
<div class="grid">{"".join(cards)}</div></section>""")

    rates = report.rates
    columns = ["shard", "pairs", "flagged rate", "ecif_is > 0", "mean ecif_is", "errors"]
    keys = ["shard", "pairs", "flagged_rate", "harmful_rate", "mean_ecif_is", "errors"]
    if "misaligned_rate" in rates:
        columns.insert(3, "truly misaligned")
        keys.insert(3, "misaligned_rate")
    shown = rates.sort_values("flagged_rate", ascending=False, kind="stable").head(SHARDS_SHOWN)
    more = f" (the {SHARDS_SHOWN} with the highest flagged rate of {len(rates)})" if len(rates) > SHARDS_SHOWN else ""
    sections.append(f"""
<section id="shards"><h2>Per shard</h2>
<p>Which shards hold the flagged pairs{more}: the share of each shard's pairs in the run-wide top
{report.flag_fraction:.0%}{", next to the share that is truly misaligned" if has_truth else ""}.
A shard far above the dotted line concentrates suspicious pairs (a bad source or crawl).</p>
<div class="figures">{_figure_html(figs, "shard_rates.png", "Per-shard flagged rate")}</div>
{_table(columns, shown[keys].itertuples(index=False), [False] + [True] * (len(keys) - 1))}
</section>""")

    sections.append(f'<section id="errors"><h2>Errors</h2>{_errors_html(run, m)}</section>')
    sections.append(f'<section id="trace"><h2>Trace-back: the training pairs behind mistakes</h2>'
                    f"{_trace_html(report)}</section>")
    sections.append(f'<section id="lineage"><h2>Run lineage</h2>{_lineage_html(run)}</section>')

    title = f"ecif-ray report · run {m.run_id}"
    nav_html = "".join(f'<a href="#{i}">{_esc(t)}</a>' for i, t in nav)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_esc(title)}</title><style>{CSS}</style></head>
<body><main>
<h1>ECIF audit report</h1>
<div class="muted">run <b>{_esc(m.run_id)}</b> · {_esc(run.url)} · query <b>{_esc(run.query)}</b> ·
checkpoint sha256 {_esc(str(m.checkpoint.get("sha256", ""))[:16])}… · finished {_esc(m.finished_at or "–")}</div>
<nav>{nav_html}</nav>
{"".join(sections)}
</main></body></html>
"""


def _notes(notes: Sequence[str]) -> str:
    if not notes:
        return ""
    return '<div class="notes">' + "".join(f"<div>⚠ {_esc(n)}</div>" for n in notes) + "</div>"


def _errors_html(run: RunData, m: Manifest) -> str:
    errors = run.errors
    counts = m.counts or {}
    if errors.empty:
        return (f"<p>No errors: every input was scored ({_num(counts.get('pairs', len(run.pairs)))} pairs, "
                f"{_num(counts.get('shards_committed', 0))} of {_num(counts.get('shards', 0))} shards).</p>")
    summary = (errors.groupby(["stage", "error"]).agg(rows=("key", "size"), shards=("shard", "nunique"))
               .reset_index().sort_values("rows", ascending=False))
    sample = errors.head(ERROR_MESSAGES_SHOWN)
    return (f"<p>{len(errors):,} inputs could not be scored and are left out of every score above "
            "(see the <code>errors</code> table for all of them).</p>"
            + _table(["stage", "error", "rows", "shards"], summary.itertuples(index=False),
                     [False, False, True, True])
            + f"<h3>First {len(sample)} messages</h3>"
            + _table(["shard", "key", "stage", "message"],
                     sample[["shard", "key", "stage", "message"]].itertuples(index=False)))


def _trace_html(report: Report) -> str:
    trace = report.trace
    if trace.empty:
        return ("<p>No trace-back rows in this run. A run with trace-back (<code>ecif-ray trace</code>, or "
                "<code>ecif-ray score</code> with a <code>trace:</code> section and labelled test images) lists, for "
                "each test image the model gets wrong, the training pairs most responsible for the mistake.</p>")
    examples = list(dict.fromkeys(trace["query_id"]))
    shown = examples[:TRACE_EXAMPLES_SHOWN]
    parts = [f"<p>For each test image the model gets wrong ({len(examples)} traced"
             f"{f', the first {len(shown)} shown' if len(shown) < len(examples) else ''}), the training pairs "
             "whose removal would most reduce that mistake, ranked by relative influence (relative_is: influence "
             "on this example per unit of parameter change, so pairs that merely move the model a lot do not "
             "dominate).</p>"]
    for query_id in shown:
        ident = split_query_id(query_id)
        true_class = report.test_truth.get(ident)
        query_card = _card(report.test_thumbnails.get(ident), "mispredicted test image", query_id, None,
                           [f"true class: <b>{_esc(true_class)}</b>" if true_class else "mispredicted test image"],
                           extra_class="query")
        cards = []
        for row in trace[trace["query_id"] == query_id].to_dict("records"):
            hit = (row["shard"], row["key"])
            cards.append(_card(report.thumbnails.get(hit), f"#{row['rank']}", f"{row['shard']} / {row['key']}",
                               report.run.captions.get(hit),
                               [f"relative_is <b>{_num(row['relative_is'])}</b>", f"ecif_is {_num(row['ecif_is'])}"],
                               _truth_badge(row)))
        parts.append(f'<div class="trace-row">{query_card}<div class="grid compact">{"".join(cards)}</div></div>')
    return "".join(parts)


def _lineage_html(run: RunData) -> str:
    m = run.manifest
    ck, solver, curv, cfg = m.checkpoint, m.solver or {}, m.curvature or {}, m.config or {}
    residuals = solver.get("relative_residual") or {}
    timings = m.timings or {}
    counts = m.counts or {}
    rows: list[tuple[str, Any]] = [
        ("run id", m.run_id), ("status", m.status), ("created", m.created_at), ("finished", m.finished_at),
        ("fingerprint", m.fingerprint), ("code version", m.code_version),
        ("checkpoint", ck.get("path")), ("checkpoint sha256", ck.get("sha256")), ("architecture", ck.get("arch")),
        ("parameter subset θ", ck.get("param_subset")), ("δ (damping)", ck.get("delta")),
        ("N (training pairs of the model)", ck.get("n_train")), ("segment size", ck.get("segment_size")),
        ("dtype", ck.get("dtype")), ("negative term", m.score_inputs.get("negative_term")),
        ("queries", ", ".join(m.queries) + f" (primary {m.primary_query}; this report: {run.query})"),
        ("training shards", _spec_text(cfg.get("train"), m.score_inputs.get("train"))),
        ("validation shards", _spec_text(cfg.get("val"), m.score_inputs.get("val"))),
        ("test shards", _spec_text(cfg.get("test"), m.score_inputs.get("test"))),
        ("solver", ", ".join(f"{k}={solver[k]}" for k in ("preconditioner", "tol", "max_iter", "nystrom_rank")
                             if k in solver) or "–"),
        ("solver iterations / converged", f"{solver.get('iterations', '–')} / {solver.get('converged', '–')}"
                                          + (" (directions reused)" if solver.get("reused") else "")),
        ("solver relative residual", _residual_text(residuals, m.queries)),
        ("curvature sample", f"{curv.get('segments', '–')} segments, {curv.get('pairs', '–')} pairs"),
        ("counts", ", ".join(f"{k}={v}" for k, v in counts.items() if not isinstance(v, dict)) or "–"),
        ("timings (s)", ", ".join(f"{k.removesuffix('_s')} {float(v):.1f}" for k, v in timings.items()) or "–"),
        ("workers", _workers_text(m.workers or {})),
    ]
    table = "<table>" + "".join(f"<tr><th>{_esc(k)}</th><td>{_esc('–' if v is None else v)}</td></tr>"
                                for k, v in rows) + "</table>"
    manifest = json.dumps(m.model_dump(mode="json"), indent=2, sort_keys=True, default=str)
    return (table + "<details><summary>the whole manifest.json</summary>"
            f"<pre>{_esc(manifest)}</pre></details>")


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _spec_text(spec: Any, names: Any) -> str:
    if not spec:
        return "–"
    where = spec if isinstance(spec, str) else ", ".join(map(str, spec))
    count = f" ({_plural(len(names), 'shard')})" if isinstance(names, list) else ""
    return where + count


def _residual_text(residuals: Mapping[str, Any], queries: Sequence[str]) -> str:
    """Per named query; the trace-back examples (the other directions) as their worst case."""
    parts = [f"{q}: {float(residuals[q]):.2e}" for q in queries if q in residuals]
    traced = [float(r) for q, r in residuals.items() if q not in queries]
    if traced:
        parts.append(f"{_plural(len(traced), 'trace-back example')}: at most {max(traced):.2e}")
    return ", ".join(parts) or "–"


def _workers_text(workers: Mapping[str, Any]) -> str:
    if not workers:
        return "–"
    info = workers.get("info") or []
    devices = sorted({str(i.get("device")) for i in info if isinstance(i, dict)})
    return _plural(int(workers.get("workers", len(info))), "worker") + (f" on {', '.join(devices)}" if devices else "")


# ---------------------------------------------------------------------------------------------
# The whole report


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
    run.captions = _captions(con, shown)

    cfg = run.manifest.config or {}
    so = storage_options if storage_options is not None else _usable_options(cfg.get("storage_options"))
    images, image_notes = fetch_images(cfg.get("train"), shown, so)
    test_ids = [split_query_id(q) for q in dict.fromkeys(trace["query_id"])][:TRACE_EXAMPLES_SHOWN]
    test_images, test_notes = fetch_images(cfg.get("test"), test_ids, so) if test_ids else ({}, [])
    notes += [f"thumbnails: {n}" for n in image_notes + test_notes]
    test_truth: dict[tuple[str, str], str] = {}
    if truth_frame is not None and test_ids:
        wanted = pd.DataFrame(test_ids, columns=["shard", "key"]).merge(truth_frame, on=["shard", "key"])
        test_truth = {(r.shard, r.key): r.true_class for r in wanted.itertuples(index=False)}

    figures = {"ecif_is_distribution.png": figure_distribution(run.pairs), "pos_vs_neg.png": figure_roles(run.pairs)}
    detection: list[dict[str, Any]] = []
    if truth_frame is not None:
        known = run.pairs[run.pairs["misaligned"].notna()]
        positives = int(known["misaligned"].astype(bool).sum())
        figures["precision_recall_at_k.png"] = figure_at_k(at_k_curves(run.pairs), positives, len(known))
        detection = detection_table(run.pairs, top=max(1, min(top or 10, len(known))))
        if not detection:
            notes.append("the truth file marks every matched pair alike (all misaligned or all clean): "
                         "no detection quality to compute")
    rates = shard_rates(run.pairs, run.errors, flag_fraction)
    figures["shard_rates.png"] = figure_shards(rates, flag_fraction)

    thumbs = {ident: thumbnail(img) for ident, img in images.items()}
    test_thumbs = {ident: thumbnail(img) for ident, img in test_images.items()}
    report = Report(run=run, top=top_frame, figures=figures, thumbnails=thumbs, test_thumbnails=test_thumbs,
                    rates=rates, trace=trace, detection=detection,
                    truth_path=None if truth is None else os.fspath(truth), truth_missing=truth_missing,
                    test_truth=test_truth, notes=notes, flag_fraction=flag_fraction)
    page = render_html(report)

    out = Path(out_dir)
    (out / "thumbnails").mkdir(parents=True, exist_ok=True)
    for name, png in figures.items():
        (out / name).write_bytes(png)
    for rank, (shard, key) in enumerate(zip(top_frame["shard"], top_frame["key"]), start=1):
        if (shard, key) in thumbs:
            (out / "thumbnails" / f"top-{rank:04d}_{_safe(shard)}_{_safe(key)}.png").write_bytes(thumbs[shard, key])
    for (shard, key), png in test_thumbs.items():
        (out / "thumbnails" / f"test_{_safe(shard)}_{_safe(key)}.png").write_bytes(png)
    for (shard, key), png in thumbs.items():
        if (shard, key) not in set(zip(top_frame["shard"], top_frame["key"])):
            (out / "thumbnails" / f"trace_{_safe(shard)}_{_safe(key)}.png").write_bytes(png)
    (out / "summary.json").write_text(json.dumps(_summary(report), indent=2, default=_json_default))
    index = out / "index.html"
    tmp = out / ".index.html.tmp"
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(index)
    return index


def _captions(con: Any, idents: Iterable[tuple[str, str]]) -> dict[tuple[str, str], str]:
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
    columns = [c for c in ("rank", "shard", "key", "ecif_is", "pos_is", "neg_is", "clip_score", "loss",
                           "misaligned", "true_class", "caption_class") if c in report.top]
    top = report.top[columns].astype(object).where(report.top[columns].notna(), None).to_dict("records")
    return {
        "run_id": run.manifest.run_id, "run_dir": run.url, "query": run.query, "status": run.manifest.status,
        "pairs": len(run.pairs), "harmful": int((run.pairs["ecif_is"] > 0).sum()), "errors": len(run.errors),
        "truth": report.truth_path, "truth_missing": report.truth_missing, "detection": report.detection,
        "flag_fraction": report.flag_fraction, "top": top,
        "trace_examples": int(report.trace["query_id"].nunique()) if not report.trace.empty else 0,
        "notes": report.notes,
    }
