"""The single-process ECIF engine on a real (micro) open_clip model, in float64:
JVP scoring vs explicit per-pair gradients, CG vs a dense solve, query gradients."""

from __future__ import annotations

import pytest
import torch

from ecif_ray.data.segments import load_segments
from ecif_ray.influence.contrastive import pair_terms
from ecif_ray.influence.curvature import SolverSettings, local_matvec, solve_directions
from ecif_ray.influence.queries import ValidationQuery, ZeroShotQuery
from ecif_ray.influence.scoring import score_segment
from ecif_ray.influence.solvers import dense_solve
from ecif_ray.influence.task import InfluenceTask
from ecif_ray.models.checkpoint import load_checkpoint
from ecif_ray.models.subsets import ParamSubset
from ecif_ray.models.zeroshot import find_classes


def _task(ckpt_path, kind: str, negative_term: str = "exact", n_train: int = 128) -> InfluenceTask:
    ckpt = load_checkpoint(ckpt_path)
    subset = ParamSubset(kind=kind)  # analyse a subset of the pretrained model (adds LoRA adapters if asked)
    subset.apply(ckpt.model)
    ckpt.model.double()
    return InfluenceTask(bundle=ckpt.bundle, subset=subset, logit_scale=ckpt.meta.logit_scale,
                         delta=1e-2, n_train=n_train, negative_term=negative_term)


@pytest.fixture(scope="module")
def train_batches(digits_corpus, micro_pretrained):
    ckpt = load_checkpoint(micro_pretrained)
    batches, _ = load_segments(str(digits_corpus / "train"), segment_size=16, preprocess=ckpt.bundle.preprocess,
                               tokenizer=ckpt.bundle.tokenizer)
    for b in batches:
        b.images = b.images.double()
    return batches


@pytest.mark.parametrize("kind", ["heads", "lora", "last-k"])
@pytest.mark.parametrize("negative_term", ["exact", "taylor"])
def test_jvp_scores_equal_per_pair_gradients_dotted_with_s(micro_pretrained, train_batches, kind, negative_term):
    task = _task(micro_pretrained, kind, negative_term)
    batch = train_batches[0]
    directions = torch.randn(3, task.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    scores = score_segment(task, batch, directions)

    params = task.requires_grad_params()
    terms = pair_terms(task.similarity_fn(batch)(params))
    neg = terms.neg_exact if negative_term == "exact" else terms.neg_taylor
    for n in range(len(batch)):
        for values, got in ((terms.pos, scores.pos_is), (neg, scores.neg_is)):
            grads = torch.autograd.grad(values[n], list(params.values()), retain_graph=True)
            per_pair = task.flatten(dict(zip(params, grads, strict=True)))
            expected = -(directions @ per_pair) / task.n_train
            torch.testing.assert_close(got[:, n], expected, rtol=1e-9, atol=1e-14)
    torch.testing.assert_close(scores.loss, terms.pos.detach())
    torch.testing.assert_close(scores.clip_score, torch.diagonal(task.similarity_fn(batch)(task.params)))


def test_cg_matches_dense_solve_on_heads(micro_pretrained, train_batches, digits_corpus):
    task = _task(micro_pretrained, "heads")
    sample = train_batches[:2]
    matvec = local_matvec(task, sample)
    dense_g = matvec(torch.eye(task.dim, dtype=torch.float64))
    torch.testing.assert_close(dense_g, dense_g.T, rtol=1e-8, atol=1e-10)  # G is symmetric
    assert float(torch.linalg.eigvalsh(dense_g).min()) > -1e-8  # and PSD (Gauss–Newton)

    ckpt = load_checkpoint(micro_pretrained)
    val, _ = load_segments(str(digits_corpus / "val"), segment_size=16, preprocess=ckpt.bundle.preprocess,
                           tokenizer=ckpt.bundle.tokenizer)
    queries = ValidationQuery(val).gradients(task)
    for preconditioner in ("none", "nystrom"):
        directions = solve_directions(task, queries, matvec,
                                      SolverSettings(tol=1e-10, max_iter=500, preconditioner=preconditioner))
        assert directions.converged and float(directions.relative_residual.max()) <= 1e-10
        expected = dense_solve(dense_g, queries.gradients.T, task.delta).T
        rel = (directions.vectors - expected).norm() / expected.norm()
        assert float(rel) < 1e-6, float(rel)


def test_query_gradients_match_finite_differences(micro_pretrained, digits_corpus):
    task = _task(micro_pretrained, "heads")
    ckpt = load_checkpoint(micro_pretrained)
    test, _ = load_segments(str(digits_corpus / "test"), segment_size=32, preprocess=ckpt.bundle.preprocess,
                            tokenizer=ckpt.bundle.tokenizer)
    classes = find_classes(str(digits_corpus / "test"))
    query = ZeroShotQuery(test, classes)
    g = query.gradients(task).gradients[0]
    v = torch.randn(task.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    eps = 1e-6
    plus = task.unflatten(task.flatten(task.params) + eps * v)
    minus = task.unflatten(task.flatten(task.params) - eps * v)
    fd = (query.loss(task, plus) - query.loss(task, minus)) / (2 * eps)
    torch.testing.assert_close(g @ v, fd, rtol=1e-6, atol=1e-9)


def test_auto_dtype_is_float64_only_where_it_costs_little():
    from ecif_ray.influence.settings import resolve_dtype

    assert resolve_dtype("auto", "heads") == "float64"
    assert {resolve_dtype("auto", kind) for kind in ("lora", "last-k", "all")} == {"float32"}
    assert resolve_dtype("float64", "lora") == "float64" and resolve_dtype("float32", "heads") == "float32"
