"""The report's figures, drawn with matplotlib's object API on the Agg canvas (no pyplot, no global
backend state) and returned as PNG bytes."""

from __future__ import annotations

import io
import math

import numpy as np
import pandas as pd

from ecif_ray.report.numbers import FLAG_FRACTION, METHODS

SCATTER_POINTS = 20_000  # the pos/neg scatter shows a fixed random sample of larger runs
SHARDS_SHOWN = 60  # per-shard figure and table: the shards with the highest flagged rate
METHOD_COLORS = ("#c0392b", "#2e86c1", "#7f8c8d")
CLEAN_COLOR, MISALIGNED_COLOR = "#4c72b0", "#d62728"


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
           label=f"flagged (run-wide top {fraction:.0%})")
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
