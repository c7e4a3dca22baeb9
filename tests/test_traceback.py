"""Relative-IS trace-back and the notebook API, on the micro model (float64 where exactness is checked)."""

from __future__ import annotations

import dataclasses

import duckdb
import pytest
import torch

from ecif_ray.data.exclusions import ExclusionSet
from ecif_ray.data.segments import load_segments
from ecif_ray.influence.contrastive import pair_terms
from ecif_ray.influence.curvature import local_matvec
from ecif_ray.influence.edit import edit
from ecif_ray.influence.engine import ECIF
from ecif_ray.influence.queries import ValidationQuery
from ecif_ray.influence.solvers import dense_solve
from ecif_ray.influence.task import InfluenceTask
from ecif_ray.influence.traceback import curvature_basis, per_pair_gradients, trace_segment
from ecif_ray.models.checkpoint import load_checkpoint
from ecif_ray.models.subsets import ParamSubset
from ecif_ray.models.zeroshot import find_classes
from ecif_ray.training import TrainConfig, train


@pytest.fixture(scope="module")
def heads_task(micro_pretrained, digits_corpus):
    ckpt = load_checkpoint(micro_pretrained)
    subset = ParamSubset(kind="heads")
    subset.apply(ckpt.model)
    ckpt.model.double()
    batches, _ = load_segments(str(digits_corpus / "train"), segment_size=16, preprocess=ckpt.bundle.preprocess,
                               tokenizer=ckpt.bundle.tokenizer)
    for b in batches:
        b.images = b.images.double()
    task = InfluenceTask(bundle=ckpt.bundle, subset=subset, logit_scale=ckpt.meta.logit_scale, delta=0.1,
                         n_train=128)
    return task, batches


def test_per_pair_gradients_match_autograd(heads_task):
    task, batches = heads_task
    batch = batches[1]
    grads = per_pair_gradients(task, batch, chunk=5)
    params = task.requires_grad_params()
    terms = pair_terms(task.similarity_fn(batch)(params))
    for n in range(len(batch)):
        g = torch.autograd.grad(terms.pos[n] + terms.neg_exact[n], list(params.values()), retain_graph=True)
        torch.testing.assert_close(grads[n], task.flatten(dict(zip(params, g, strict=True))), rtol=1e-9, atol=1e-13)


def test_relative_is_with_a_full_rank_basis_is_exact(heads_task):
    task, batches = heads_task
    sample = batches[:2]
    matvec = local_matvec(task, sample)
    basis = curvature_basis(task, matvec, rank=task.dim)  # rank = D: no approximation
    dense = matvec(torch.eye(task.dim, dtype=torch.float64))
    batch = batches[2]
    grads = per_pair_gradients(task, batch)
    expected_norms = dense_solve(dense, grads.T, task.delta).norm(dim=0)
    torch.testing.assert_close(basis.inverse_norms(grads), expected_norms, rtol=1e-6, atol=0)

    direction = torch.randn(2, task.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    scores = trace_segment(task, batch, direction, basis)
    torch.testing.assert_close(scores.relative_is, -(direction @ grads.T) / expected_norms, rtol=1e-6, atol=0)
    torch.testing.assert_close(scores.ecif_is, -(direction @ grads.T) / task.n_train)


def test_notebook_api_scores_traces_and_edits(digits_corpus, micro_pretrained, tmp_path):
    ft = train(TrainConfig(train=str(digits_corpus / "train"), init=str(micro_pretrained), params={"kind": "heads"},
                           segment_size=16, epochs=3, lr=1e-2, delta=1e-2, out=str(tmp_path / "ft"), progress=False))
    engine = ECIF.from_checkpoint(str(ft), str(digits_corpus / "train"), curvature_segments=4)
    damped = ECIF.from_checkpoint(str(ft), str(digits_corpus / "train"), curvature_segments=4, damping=0.5)
    assert (engine.task.delta, damped.task.delta) == (1e-2, 0.5)  # the trained δ unless the analysis sets one
    val = engine.load(str(digits_corpus / "val"))
    directions = engine.solve(ValidationQuery(val))
    assert directions.names == ["val"] and directions.converged
    scores = engine.score(engine.train_batches, directions)
    assert scores.num_rows == 128 and set(scores.column("query").to_pylist()) == {"val"}
    top = duckdb.sql("SELECT key, ecif_is FROM scores ORDER BY ecif_is DESC LIMIT 5").fetchall()
    assert len(top) == 5 and top[0][1] >= top[-1][1]
    pairs = scores.to_pylist()
    assert all(abs(r["ecif_is"] - (r["pos_is"] + r["neg_is"])) <= 1e-6 * abs(r["ecif_is"]) + 1e-12 for r in pairs)

    harmful = [k for (k,) in duckdb.sql("SELECT key FROM scores ORDER BY ecif_is DESC LIMIT 3").fetchall()]
    removed = ExclusionSet.from_entries((None, k) for k in harmful)
    sketch = engine.preconditioner()  # built by solve(), reused by the edit's solve
    change = engine.edit(removed)
    assert change.removed_pairs == 3 and engine.preconditioner() is sketch
    rebuilt = edit(engine.task, engine.train_batches, removed, engine.matvec(), engine.solver)
    for name, value in rebuilt.delta_theta.items():
        torch.testing.assert_close(change.delta_theta[name], value, rtol=1e-6, atol=1e-12)
    wrong_delta = dataclasses.replace(sketch, damping=2 * engine.task.delta)
    with pytest.raises(ValueError, match="preconditioner was built for"):
        edit(engine.task, engine.train_batches, removed, engine.matvec(), engine.solver, wrong_delta)
    before = {n: p.clone() for n, p in engine.task.params.items()}
    engine.apply_edit(change)  # θ̃ = θ̂ + Δθ in the model itself (its quality: tests/test_fidelity.py)
    for name, value in engine.task.subset.trainable(engine.task.bundle.model).items():
        torch.testing.assert_close(value.detach(), before[name] + change.delta_theta[name])
    assert engine.preconditioner() is not sketch  # G moved with θ̂

    test = engine.load(str(digits_corpus / "test"))
    trace = engine.trace(test, find_classes(str(digits_corpus / "test")), top_k=3, max_examples=4)
    assert trace.num_rows == 4 * 3  # a weakly trained micro model gets at least 4 test digits wrong
    ranks = trace.to_pylist()
    for query in {r["query_id"] for r in ranks}:
        values = [r["relative_is"] for r in ranks if r["query_id"] == query]
        assert values == sorted(values, reverse=True)


def test_trace_command_writes_the_trace_table(ray_cluster, digits_corpus, heads_ckpt, tmp_path, capsys):
    from ecif_ray.cli import main
    from ecif_ray.tables.views import connect

    run = tmp_path / "run"
    assert main(["trace", "--ckpt", str(heads_ckpt), "--train", str(digits_corpus / "train"), "--test",
                 str(digits_corpus / "test"), "--out", str(run), "--top-k", "3", "--max-examples", "2",
                 "--curvature-segments", "4", "--workers", "2"]) == 0
    con = connect(str(run))
    rows = con.execute("SELECT query_id, rank, shard, key, relative_is FROM trace ORDER BY query_id, rank").fetchall()
    assert len(rows) == 6 and [r[1] for r in rows] == [1, 2, 3, 1, 2, 3]
    assert all(rows[i][4] >= rows[i + 1][4] for i in (0, 1, 3, 4))
    # The same run scored every training pair against the task (zero-shot) loss.
    assert con.execute("SELECT count(*), min(query) FROM pairs").fetchall() == [(128, "task")]
