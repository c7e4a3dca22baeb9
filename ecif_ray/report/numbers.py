"""The report's numbers, computed from DataFrames: detection quality against ground truth, per-shard
rates, the top flagged pairs and the trace-back ranking (the rankings are ``tables.ranking``'s)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from ecif_ray.tables.ranking import rank_trace, top_indices

FLAG_FRACTION = 0.2  # "flagged" = the run-wide top 20% by the ranking column (the demo's convention)

# Rankings compared: (label, score column, sign) where sign * column is "larger = more suspicious";
# a column the run does not have (all null) is left out.
METHODS = (
    ("misalignment (highest first)", "misalignment", 1.0),
    ("ecif_is (highest first)", "ecif_is", 1.0),
    ("reference CLIP score (lowest first)", "reference_clip_score", -1.0),
    ("CLIP score (lowest first)", "clip_score", -1.0),
    ("per-pair loss (highest first)", "loss", 1.0),
)


def ranking_column(pairs: pd.DataFrame) -> str:
    """What "flagged" ranks by: ``misalignment`` (tables.misalignment), or ``ecif_is`` for runs without it."""
    return "misalignment" if "misalignment" in pairs and pairs["misalignment"].notna().any() else "ecif_is"


def methods(pairs: pd.DataFrame) -> list[tuple[str, str, float]]:
    return [m for m in METHODS if m[1] in pairs and pairs[m[1]].notna().any()]


def at_k_curves(pairs: pd.DataFrame) -> pd.DataFrame:
    """Precision@k and recall@k of each method, k = 1..n, over the pairs that have truth."""
    known = pairs[pairs["misaligned"].notna()]
    truth = known["misaligned"].to_numpy(dtype=bool)
    n, positives = len(truth), int(truth.sum())
    k = np.arange(1, n + 1)
    frames = []
    for label, column, sign in methods(known):
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
    for label, column, sign in methods(known):
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
    """The run-wide top ``fraction`` of pairs by the ranking column (at least one pair)."""
    n = len(pairs)
    flagged = np.zeros(n, dtype=bool)
    if n:
        scores = pairs[ranking_column(pairs)].to_numpy(dtype=float)
        flagged[top_indices(scores, max(1, math.ceil(fraction * n)))] = True
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
    """The ``top`` pairs by the ranking column (most likely misaligned first), ranked from 1."""
    ranked = pairs.iloc[top_indices(pairs[ranking_column(pairs)].to_numpy(dtype=float), top)].copy()
    ranked.insert(0, "rank", np.arange(1, len(ranked) + 1))
    return ranked.reset_index(drop=True)


def rerank_trace(trace: pd.DataFrame) -> pd.DataFrame:
    """Trace rows ranked across shards: each shard keeps its own top k per test example, so the run's
    top k per example is the k largest relative_is among them (k = the per-shard k)."""
    if trace.empty:
        return trace.assign(rank=pd.Series(dtype="int64"))
    ranked = rank_trace(trace.to_dict("records"), int(trace["rank"].max()))
    return pd.DataFrame(ranked, columns=trace.columns)


def split_query_id(query_id: str) -> tuple[str, str]:
    """``"<shard>/<key>"`` -> (shard, key)."""
    shard, _, key = query_id.rpartition("/")
    return shard, key
