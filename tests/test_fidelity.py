"""Fidelity to retraining (docs/method.md §6.2) on the micro model, heads subset (near-convex):
predicted ecif_is vs the actual validation-loss change after leave-one-out and leave-group-out
retraining. Takes about a minute: every point is a real (warm-started, L-BFGS) retraining."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from ecif_ray.data.exclusions import ExclusionSet
from ecif_ray.fidelity import agreement, fitted_experiment
from ecif_ray.influence.curvature import SolverSettings, local_matvec

DELTA = 1.0  # strong enough that L-BFGS reaches θ̂ to ‖∇R‖ ≈ 1e-8 within seconds


@pytest.fixture(scope="module")
def experiment(digits_corpus, micro_pretrained):
    fitted = fitted_experiment(str(micro_pretrained), str(digits_corpus), "heads", DELTA)
    return fitted.leave_out, fitted.scores


def test_predicted_is_tracks_leave_one_out_and_leave_group_out_retraining(experiment):
    leave_out, scores = experiment
    rng = random.Random(0)
    keys = sorted(scores)
    singles = [[k] for k in rng.sample(keys, 30)]
    groups = [rng.sample(keys, round(0.05 * len(keys))) for _ in range(10)]
    results, points = {}, []
    for name, sets in (("single", singles), ("group", groups)):
        actual = np.array([leave_out.actual_change(ExclusionSet.from_entries((None, k) for k in s)) for s in sets])
        ecif = np.array([sum(sum(scores[k]) for k in s) for s in sets])
        pos_only = np.array([sum(scores[k][0] for k in s) for s in sets])
        results[name] = (agreement(actual, ecif), agreement(actual, pos_only))
        points.append((actual, ecif, pos_only))
    actual, ecif, pos_only = (np.concatenate(parts) for parts in zip(*points, strict=True))
    results["all"] = (agreement(actual, ecif), agreement(actual, pos_only))
    for name, (ecif, _) in results.items():
        assert ecif["spearman"] >= 0.9, (name, ecif)
        assert 0.7 <= ecif["slope"] <= 1.3, (name, ecif)
    # The classical pointwise IF (positive role only) ranks the removal effects worse: on single
    # pairs and on all 40 removals together (on the 10 groups alone the two are within noise).
    for name in ("single", "all"):
        assert results[name][0]["spearman"] > results[name][1]["spearman"], (name, results)


def test_edit_tracks_retraining_without_the_set(experiment, digits_corpus):
    from ecif_ray.influence.edit import edit

    leave_out, scores = experiment
    task = leave_out.task
    harmful = sorted(scores, key=lambda k: -sum(scores[k]))[:6]  # top-6 harmful by ecif_is
    removed = ExclusionSet.from_entries((None, k) for k in harmful)
    change = edit(task, leave_out.batches, removed, local_matvec(task, leave_out.batches),
                  SolverSettings(tol=1e-10, max_iter=500))
    edited = change.apply(leave_out.theta_hat)
    retrained = leave_out.refit(removed)
    with torch.no_grad():
        base = leave_out.base_loss
        edited_loss = float(leave_out.query.loss(task, edited))
        retrained_loss = float(leave_out.query.loss(task, retrained))
    assert change.removed_pairs == 6
    assert retrained_loss < base  # removing the pairs ECIF flags as harmful helps
    # The edit moves the validation loss the same way and by a similar amount as retraining.
    assert abs((base - edited_loss) - (base - retrained_loss)) <= 0.3 * abs(base - retrained_loss)
    step = torch.cat([(edited[n] - leave_out.theta_hat[n]).flatten() for n in edited])
    true_step = torch.cat([(retrained[n] - leave_out.theta_hat[n]).flatten() for n in edited])
    assert float(torch.nn.functional.cosine_similarity(step, true_step, dim=0)) > 0.9
