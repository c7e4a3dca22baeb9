"""Detection quality of a ranking against ground truth (which pairs are really misaligned)."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score


def detection_metrics(scores: np.ndarray, misaligned: np.ndarray, top: int = 10) -> dict[str, float]:
    """AUROC, average precision, precision@k (k = number of misaligned pairs) and hits in the top
    ``top``, for a score where larger = more suspicious."""
    scores = np.asarray(scores, dtype=float)
    truth = np.asarray(misaligned, dtype=bool)
    if truth.all() or not truth.any():
        raise ValueError("detection metrics need both misaligned and clean pairs")
    order = np.argsort(-scores, kind="stable")
    k = int(truth.sum())
    return {
        "auroc": float(roc_auc_score(truth, scores)),
        "average_precision": float(average_precision_score(truth, scores)),
        "precision_at_k": float(truth[order[:k]].mean()),
        "k": k,
        f"hits_top{top}": int(truth[order[:top]].sum()),
    }
