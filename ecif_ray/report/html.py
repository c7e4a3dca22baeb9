"""The report as one self-contained HTML page: every figure and thumbnail inline as a data: URI, the
style sheet (``report.css``, package data) inline too, so the file can be mailed on its own."""

from __future__ import annotations

import base64
import html
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

import numpy as np
import pandas as pd

from ecif_ray.report.data import RunData
from ecif_ray.report.figures import SHARDS_SHOWN
from ecif_ray.report.numbers import FLAG_FRACTION, ranking_column, split_query_id
from ecif_ray.tables.manifest import Manifest

CSS = resources.files("ecif_ray.report").joinpath("report.css").read_text(encoding="utf-8")
TRACE_EXAMPLES_SHOWN = 20
ERROR_MESSAGES_SHOWN = 20

QUERY_MEANING = {
    "val": "the contrastive loss on the trusted validation pairs",
    "task": "the zero-shot classification loss on the labelled test images",
}


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
    value = row.get("misalignment")
    lead = [] if value is None or value != value else [f"misalignment <b>{_num(row['misalignment'], 3)}</b>"]
    return [*lead, f"ecif_is {_num(row['ecif_is'])}",
            f"pos {_num(row['pos_is'])} · neg {_num(row['neg_is'])}",
            f"clip {_num(row['clip_score'], 3)} · loss {_num(row['loss'], 3)}"]


NAV = (("how-to-read", "How to read"), ("distribution", "Score distribution"), ("detection", "Detection quality"),
       ("flagged", "Top flagged pairs"), ("shards", "Per shard"), ("errors", "Errors"), ("trace", "Trace-back"),
       ("lineage", "Run lineage"))


def render_html(report: Report) -> str:
    """The report as one self-contained HTML document (images inline as data: URIs)."""
    run, m = report.run, report.run.manifest
    sections = [
        _how_to_read(report), _distribution(report), _detection(report), _flagged(report), _shards(report),
        f'<section id="errors"><h2>Errors</h2>{_errors_html(run, m)}</section>',
        f'<section id="trace"><h2>Trace-back: the training pairs behind mistakes</h2>{_trace_html(report)}</section>',
        f'<section id="lineage"><h2>Run lineage</h2>{_lineage_html(run)}</section>',
    ]
    title = f"ecif-ray report · run {m.run_id}"
    nav_html = "".join(f'<a href="#{i}">{_esc(t)}</a>' for i, t in NAV)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_esc(title)}</title><style>{CSS}</style></head>
<body><main>
<h1>ECIF audit report</h1>
<div class="muted">run <b>{_esc(m.run_id)}</b> · {_esc(run.url)} · query <b>{_esc(run.query)}</b> ·
checkpoint sha256 {_esc(str(m.checkpoint.get("sha256", ""))[:16])}… · finished {_esc(m.finished_at or "–")}</div>
<nav>{nav_html}</nav>
{_model_banner(m.model_check)}
{"".join(sections)}
</main></body></html>
"""



def _model_banner(check: dict[str, Any] | None) -> str:
    """A prominent warning at the top of the page when the model is near chance."""
    if not check or not check.get("near_chance"):
        return ""
    if check.get("val_loss") is not None:
        why = (f"Its validation loss ({_num(check['val_loss'])} per pair) is {check['loss_ratio']:.2f} × the loss "
               f"of a uniform guess (chance: 2·log(segment size) = {_num(check['chance_loss'])})")
    else:
        why = "Its training ended near chance (the checkpoint's ecif.json, training.near_chance)"
    return (f'<div class="alert" id="near-chance"><b>Warning: the model is near chance.</b> {_esc(why)}. '
            "It learned (almost) nothing, so the scores below say nothing about the data: an audit of this model "
            "is meaningless. Train it until it clearly beats chance (<code>ecif-ray train</code> warns when it "
            "does not), then score again.</div>")


def _model_text(check: dict[str, Any] | None) -> str:
    """The model check as one line of the lineage table."""
    if not check:
        return "–"
    if check.get("val_loss") is None:
        return str(check.get("note", "not measured"))
    verdict = "NEAR CHANCE" if check.get("near_chance") else "above chance"
    return (f"val loss {_num(check['val_loss'])} per pair = {check['loss_ratio']:.2f} × chance "
            f"({_num(check['chance_loss'])}, threshold {check.get('near_chance_threshold', 0.9)}): {verdict}")


def _has_truth(report: Report) -> bool:
    return report.truth_path is not None


def _how_to_read(report: Report) -> str:
    run, pairs = report.run, report.run.pairs
    harmful = int((pairs["ecif_is"] > 0).sum())
    stats = [(f"{len(pairs):,}", "pairs scored"), (f"{harmful:,}", "ecif_is > 0 (harmful)"),
             (f"{len(pairs) - harmful:,}", "ecif_is ≤ 0 (valuable/neutral)"),
             (f"{len(run.errors):,}", "inputs not scored"), (run.manifest.status, "run status"), (run.query, "query")]
    if _has_truth(report):
        known = pairs["misaligned"].notna()
        stats.insert(1, (f"{int(pairs.loc[known, 'misaligned'].astype(bool).sum()):,}", "truly misaligned"))
    meaning = QUERY_MEANING.get(run.query, f"the {run.query!r} query loss")
    return f"""
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
<p><b>misalignment</b> (0–1, higher = more likely a wrong caption) ranks pairs for review: the mean of two
run-wide percentiles, the pair's influence at a larger damping and its CLIP score (under the reference model
when the run has one, else this model's). ecif_is answers another question — the effect of removing the pair.</p>
<p>“Flagged” below means the run-wide top {report.flag_fraction:.0%} of pairs by {ranking_column(pairs)}.
{"Ground truth from " + _esc(report.truth_path) + " marks pairs as misaligned or clean." if _has_truth(report)
 else "No ground truth was given (<code>--truth</code>), so detection quality is not shown."}</p>
</div>
<div class="stats">{"".join(f'<div class="stat"><b>{_esc(v)}</b><span>{_esc(k)}</span></div>' for v, k in stats)}</div>
{_notes(report.notes)}
</section>"""


def _distribution(report: Report) -> str:
    figs, has_truth = report.figures, _has_truth(report)
    return f"""
<section id="distribution"><h2>Score distribution</h2>
<p>Left: how ecif_is is distributed{" for clean and misaligned pairs" if has_truth else ""}; the dashed line is 0.
Right: each pair's two roles; pairs above the dashed diagonal have ecif_is &gt; 0.</p>
<div class="figures">{_figure_html(figs, "ecif_is_distribution.png", "Distribution of ecif_is")}
{_figure_html(figs, "pos_vs_neg.png", "pos_is vs neg_is per pair")}</div>
</section>"""


def _detection(report: Report) -> str:
    figs = report.figures
    if not (_has_truth(report) and "precision_recall_at_k.png" in figs):
        detection = ("<p>Not available: give ground truth with <code>--truth truth.parquet</code> (columns "
                     "shard, key, misaligned, true_class, caption_class) to see precision@k and recall@k.</p>")
        return f'<section id="detection"><h2>Detection quality</h2>{detection}</section>'
    rows = [(d["method"], d["auroc"], d["average_precision"], d["precision_at_k"], d["hits_top"])
            for d in report.detection]
    k = report.detection[0]["k"] if report.detection else 0
    top = report.detection[0]["top"] if report.detection else 0
    missing = (f'<p class="notes">{report.truth_missing:,} scored pairs have no row in the truth file and '
               f"are left out of these numbers.</p>" if report.truth_missing else "")
    detection = f"""
<p>How well each ranking finds the truly misaligned pairs: flag the k highest-ranked pairs and count how many
are misaligned (precision@k) and what share of all misaligned pairs that is (recall@k). misalignment and ecif_is
are compared with common filters: CLIP score (flag the pairs the model itself — or the reference model — matches
worst) and the pair's own training loss. Dotted lines: a random ranking.</p>
{_table(["method", "AUROC", "average precision", f"precision@{k}", f"misaligned in top {top}"], rows,
        [False, True, True, True, True])}
{missing}
<div class="figures">{_figure_html(figs, "precision_recall_at_k.png", "precision@k and recall@k")}</div>"""
    return f'<section id="detection"><h2>Detection quality</h2>{detection}</section>'


def _flagged(report: Report) -> str:
    cards = []
    for row in report.top.to_dict("records"):
        ident = (row["shard"], row["key"])
        cards.append(_card(report.thumbnails.get(ident), f"#{row['rank']}", f"{row['shard']} / {row['key']}",
                           report.run.captions.get(ident), _score_lines(row), _truth_badge(row)))
    hits = ""
    if _has_truth(report) and len(report.top):
        n_bad = int(report.top["misaligned"].fillna(False).astype(bool).sum())
        hits = f" {n_bad} of these {len(report.top)} are truly misaligned."
    return f"""
<section id="flagged"><h2>Top {len(report.top)} flagged pairs</h2>
<p>The pairs with the largest {ranking_column(report.run.pairs)}, with their images and captions.{hits}</p>
<div class="grid">{"".join(cards)}</div></section>"""


def _shards(report: Report) -> str:
    rates = report.rates
    columns = ["shard", "pairs", "flagged rate", "ecif_is > 0", "mean ecif_is", "errors"]
    keys = ["shard", "pairs", "flagged_rate", "harmful_rate", "mean_ecif_is", "errors"]
    if "misaligned_rate" in rates:
        columns.insert(3, "truly misaligned")
        keys.insert(3, "misaligned_rate")
    shown = rates.sort_values("flagged_rate", ascending=False, kind="stable").head(SHARDS_SHOWN)
    more = f" (the {SHARDS_SHOWN} with the highest flagged rate of {len(rates)})" if len(rates) > SHARDS_SHOWN else ""
    return f"""
<section id="shards"><h2>Per shard</h2>
<p>Which shards hold the flagged pairs{more}: the share of each shard's pairs in the run-wide top
{report.flag_fraction:.0%}{", next to the share that is truly misaligned" if _has_truth(report) else ""}.
A shard far above the dotted line concentrates suspicious pairs (a bad source or crawl).</p>
<div class="figures">{_figure_html(report.figures, "shard_rates.png", "Per-shard flagged rate")}</div>
{_table(columns, shown[keys].itertuples(index=False), [False] + [True] * (len(keys) - 1))}
</section>"""


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
        ("model vs chance", _model_text(m.model_check)),
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
