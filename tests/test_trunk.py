"""The trunk/tail split is exact: every quantity computed from cached trunk features equals the
same quantity computed through the whole open_clip model (float64), for every parameter subset.

The reference path ("uncached") is ``models.factory.similarity_matrix`` — open_clip's own forward,
differentiated end to end — which is what the engine used before the split."""

from __future__ import annotations

import pytest
import torch

from ecif_ray.data.segments import load_segments
from ecif_ray.influence.autodiff import ggn_product, segment_jvp
from ecif_ray.influence.contrastive import segment_loss
from ecif_ray.influence.curvature import (
    SolverSettings,
    build_preconditioner,
    ggn_sum,
    local_matvec,
    mean_eigenvalue,
    resolve_damping,
    solve_directions,
)
from ecif_ray.influence.queries import ValidationQuery, ZeroShotQuery
from ecif_ray.influence.scoring import score_segment
from ecif_ray.influence.task import InfluenceTask
from ecif_ray.influence.trunk import TowerCut
from ecif_ray.models.checkpoint import load_checkpoint
from ecif_ray.models.factory import encode, similarity_matrix
from ecif_ray.models.subsets import ParamSubset
from ecif_ray.models.zeroshot import find_classes, prompt_classifier, prompt_tokens

SUBSETS = {"heads": {"kind": "heads"}, "lora": {"kind": "lora"}, "last-k": {"kind": "last-k"},
           "last-2": {"kind": "last-k", "last_k": 2}, "all": {"kind": "all"}}


def _task(ckpt_path, subset: dict) -> InfluenceTask:
    ckpt = load_checkpoint(ckpt_path)
    sub = ParamSubset(**subset)
    sub.apply(ckpt.model)
    ckpt.model.double()
    with torch.no_grad():  # non-zero adapters, so LoRA's tail differs from the base model's
        for name, p in ckpt.model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name)), dtype=p.dtype))
    return InfluenceTask(bundle=ckpt.bundle, subset=sub, logit_scale=ckpt.meta.logit_scale, delta=1e-2, n_train=128)


@pytest.fixture(scope="module")
def segments(digits_corpus, micro_pretrained):
    bundle = load_checkpoint(micro_pretrained).bundle

    def load(split: str, size: int):
        batches = load_segments(str(digits_corpus / split), segment_size=size, preprocess=bundle.preprocess,
                                tokenizer=bundle.tokenizer)[0]
        for b in batches:
            b.images = b.images.double()
        return batches

    return {"train": load("train", 16), "val": load("val", 16), "test": load("test", 64)}


def _uncached(task: InfluenceTask, batch):
    return lambda params: similarity_matrix(task.bundle.model, batch.images, batch.tokens, task.logit_scale, params)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def test_cuts_follow_the_first_trainable_module(micro_pretrained):
    cuts = {name: _task(micro_pretrained, spec).split for name, spec in SUBSETS.items()}
    assert cuts["heads"].image == cuts["heads"].text == TowerCut("pooled")
    assert cuts["lora"].image == cuts["lora"].text == TowerCut("block", 1)  # ecif-micro: 2 blocks per tower
    assert cuts["last-k"].image == TowerCut("block", 1)
    assert cuts["last-2"].text == TowerCut("block", 0)
    assert cuts["all"].image == cuts["all"].text == TowerCut("input")


@pytest.mark.parametrize("subset", list(SUBSETS))
def test_similarity_jvp_and_ggn_equal_the_whole_model(micro_pretrained, segments, subset):
    task = _task(micro_pretrained, SUBSETS[subset])
    batch = segments["train"][0]
    tangents = task.unflatten(torch.randn(3, task.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    cached, full = task.similarity_fn(task.featurize(batch)), _uncached(task, batch)
    assert _rel(cached(task.params), full(task.params)) <= 1e-12
    _, dot_cached = segment_jvp(cached, task.params, tangents)
    _, dot_full = segment_jvp(full, task.params, tangents)
    assert _rel(dot_cached, dot_full) <= 1e-9
    ggn_cached = task.flatten(ggn_product(cached, task.params, tangents), leading=1)
    ggn_full = task.flatten(ggn_product(full, task.params, tangents), leading=1)
    assert _rel(ggn_cached, ggn_full) <= 1e-9


@pytest.mark.parametrize("subset", ["heads", "lora", "last-k"])
def test_stacked_products_equal_per_segment_products(micro_pretrained, segments, subset):
    """G·V over stacks of segments (one tail call for many) = the sum of per-segment whole-model products."""
    task = _task(micro_pretrained, SUBSETS[subset])
    batches = segments["train"]
    V = torch.randn(task.dim, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    stacks = task.stack(batches)
    assert [s.segments for s in stacks] == [8]
    assert [p.segments for p in task.slices(stacks[0], rows=48)] == [3, 3, 2]
    assert all(b.features is not None and b.features.source == task.trunk_source for b in batches)
    expected = torch.zeros_like(V)
    vectors = task.unflatten(V.T.contiguous())
    for b in batches:
        expected += task.flatten(ggn_product(_uncached(task, b), task.params, vectors), leading=1).T
    assert _rel(ggn_sum(task, stacks, V, chunk=2), expected) <= 1e-9
    assert _rel(ggn_sum(task, task.slices(stacks[0], rows=48), V, chunk=5), expected) <= 1e-9
    assert _rel(local_matvec(task, batches, chunk=4)(V), expected / sum(len(b) for b in batches)) <= 1e-9


@pytest.mark.parametrize("subset", ["heads", "lora", "last-k"])
def test_query_gradients_and_scores_equal_the_whole_model(micro_pretrained, segments, digits_corpus, subset):
    task = _task(micro_pretrained, SUBSETS[subset])
    classes = find_classes(str(digits_corpus / "test"))
    model = task.bundle.model

    def uncached_val(params):
        batches = segments["val"]
        return sum(segment_loss(_uncached(task, b)(params)) for b in batches) / sum(len(b) for b in batches)

    def uncached_task(params):
        tokens = prompt_tokens(task.bundle, classes)
        classifier = prompt_classifier(encode(model, tokens=tokens, params=params)[1], classes)
        total = 0.0
        for b in segments["test"]:
            logits = task.logit_scale * encode(model, images=b.images, params=params)[0] @ classifier.T
            labels = torch.tensor([int(m["label"]) for m in b.meta])
            total = total + torch.nn.functional.cross_entropy(logits, labels, reduction="sum")
        return total / sum(len(b) for b in segments["test"])

    for query, reference in ((ValidationQuery(segments["val"]), uncached_val),
                             (ZeroShotQuery(segments["test"], classes), uncached_task)):
        params = task.requires_grad_params()
        grads = torch.autograd.grad(reference(params), list(params.values()))
        expected = task.flatten(dict(zip(params, grads, strict=True)))
        assert _rel(query.gradients(task).gradients[0], expected) <= 1e-9

    directions = torch.randn(2, task.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    batch = segments["train"][1]
    cached = score_segment(task, task.featurize(batch), directions)
    plain = score_segment(task, batch, directions)
    for name in ("pos_is", "neg_is", "clip_score", "loss"):
        assert _rel(getattr(cached, name), getattr(plain, name)) <= 1e-12
    # and the scores are the per-pair whole-model gradients projected on s (tests/test_engine.py checks
    # the closed forms; here the JVP of the whole model gives the same Ṡ)
    _, dot_full = segment_jvp(_uncached(task, batch), task.params, task.unflatten(directions))
    _, dot_cached = segment_jvp(task.similarity_fn(batch), task.params, task.unflatten(directions))
    assert _rel(dot_cached, dot_full) <= 1e-9


def test_dense_solve_matches_cg_and_gives_the_exact_mean_eigenvalue(micro_pretrained, segments):
    task = _task(micro_pretrained, SUBSETS["heads"])
    matvec = local_matvec(task, segments["train"])
    query = ValidationQuery(segments["val"]).gradients(task)
    dense = build_preconditioner(task, matvec, SolverSettings(preconditioner="dense"))
    assert dense is not None and dense.U.shape == (task.dim, task.dim)
    by_dense = solve_directions(task, query, matvec, SolverSettings(preconditioner="dense"), preconditioner=dense)
    by_cg = solve_directions(task, query, matvec, SolverSettings(preconditioner="nystrom", tol=1e-11))
    assert by_dense.iterations <= 2 and by_cg.iterations > by_dense.iterations
    assert _rel(by_dense.vectors, by_cg.vectors) <= 1e-8
    eye = torch.eye(task.dim, dtype=torch.float64)
    exact = float(torch.trace(matvec(eye))) / task.dim
    assert mean_eigenvalue(matvec, task.dim, dtype=task.dtype, device="cpu", preconditioner=dense) == pytest.approx(
        exact, rel=1e-10)
    estimate = mean_eigenvalue(matvec, task.dim, dtype=task.dtype, device="cpu", seed=0)
    assert estimate == pytest.approx(exact, rel=0.3)  # Hutchinson, 64 probes


def test_damping_rules():
    mean_eig = iter([5.0]).__next__  # called at most once, and only for "auto"
    assert resolve_damping("exact", 1e-3, lambda: pytest.fail("exact needs no eigenvalue")) == 1e-3
    assert resolve_damping(0.25, 1e-3, lambda: pytest.fail("a number needs no eigenvalue")) == 0.25
    assert resolve_damping("auto", 1e-3, mean_eig) == pytest.approx(0.5)
    assert resolve_damping("auto", 1.0, lambda: 5.0) == 1.0  # never below the training δ
    with pytest.raises(ValueError, match="damping"):
        resolve_damping(-1.0, 1e-3, lambda: 1.0)


def test_attached_features_are_reused_only_by_their_own_trunk(micro_pretrained, segments):
    heads, lora = _task(micro_pretrained, SUBSETS["heads"]), _task(micro_pretrained, SUBSETS["lora"])
    batch = heads.featurize(segments["train"][0])
    assert heads.features(batch) is not None and batch.features.source == heads.trunk_source
    assert lora.features(batch).source == lora.trunk_source  # recomputed: another trunk (a block cut)
    assert _rel(lora.similarity_fn(batch)(lora.params), _uncached(lora, batch)(lora.params)) <= 1e-12
