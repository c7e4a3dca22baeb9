"""Trace-back precision@10: which training pairs taught the model a systematic mistake?

Corpus with *substitution* noise (``common.SUBSTITUTIONS``: on Fashion-MNIST a fraction ``--noise``
of each source class's training pairs is captioned as a neighbouring target class: shirt → "t-shirt/top",
pullover → "coat", sneaker → "sandal"), heads fine-tuned on it exactly as ``detection.py --kinds
substitute`` does (same cache names; built here if missing). The fine-tuned model learns the wrong
mapping, so some test shirts are classified "t-shirt/top" and so on.

Test examples: the test images misclassified *in a substituted direction* (true class = a source,
zero-shot prediction = its target), up to ``--examples`` per model, taken round-robin over the
directions (each direction's in shard order) so that every substitution is represented.

For each such example every method ranks all training pairs (larger = more responsible for the
mistake) and we count how many of the top ``--top-k`` are substituted pairs:
  any    the pair is misaligned (every misaligned pair of this corpus is a substitution)
  same   the pair is substituted in the example's own direction (true = source, caption = target)

Methods (one fine-tuned model θ̂, query = the test image's zero-shot cross-entropy against the class
prompts, i.e. the ``ExampleQuery`` of ``ECIF.trace``):
  ecif         relative-IS, what ``ECIF.trace`` ranks (engine defaults: δ of the checkpoint, rank-128
               Nyström basis for the norms); positive = removing the pair lowers the example's loss
  ecif-is      the numerator alone: plain ECIF influence −s_xᵀ∇F_n / N (same pass)
  ecif-damped  relative-IS with analysis damping --damped-delta (sensitivity row, as in detection.py)
  ecif-damped-is  its numerator
  ecif-dense   (opt-in) relative-IS with exact norms: the dense preconditioner's full eigenbasis of G
  pos-is       diagnostic: −s_xᵀ∇Pos_n / N, the pointwise influence function (no negative terms)
  grad-dot     diagnostic: −∇ℓ_x(θ̂)ᵀ∇F_n / N, ECIF's removal gradient without the inverse curvature
  tracin       −Σ_c η_c ∇ℓ_x(θ_c)·∇Pos_n(θ_c) over the fine-tuning stage checkpoints
  trak         traker (CLIP model output, CPU projector, λ = 0); targets = the test pairs (image with
               its own caption, which names its true class); harm = −score
  trak-zs      the same TRAKer, targets = the image with every prompt of its true and of its predicted
               class: harm = mean TRAK(j, predicted prompts) − mean TRAK(j, true prompts)
  trak-reg, trak-reg-zs  the same with λ = --trak-lambda
  ekfac        kronfluence EK-FAC on the heads, train loss as in baselines/ekfac.py, measurement =
               each test example's zero-shot cross-entropy; harm = −score (heads only)
  nn-image     cosine similarity of the test image's embedding and each training image's (θ̂)
  nn-text      cosine similarity of the predicted class's zero-shot classifier and each training
               caption's embedding (captions are template × class: massive ties, broken by corpus order)
  nn-joint     nn-image + nn-text (an image that looks like x, captioned as the wrong prediction)
  random       the expected precision of a random ranking (the base rates), not a run

    python benchmarks/traceback_precision.py                       # 0.4, seeds 0 1 2, 20 examples each
    python benchmarks/traceback_precision.py --noise 0.2 0.4 --out benchmarks/results/traceback_precision

Writes <out>.json (args, per-run rows, per-direction rows, per-example precisions, aggregates) and
<out>.csv (per-run rows).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from common import (
    RESULTS,
    SUBSTITUTIONS,
    add_method_flags,
    aggregate,
    corpus,
    finetune,
    included_rows,
    machine_notes,
    markdown_table,
    pm,
    pretrained,
    recipe_for,
    setup_torch,
    timed,
    write_outputs,
)
from detection import Model, ecif_engine, load_model

from ecif_ray.data.prompts import class_prompts
from ecif_ray.data.segments import PairBatch, load_segments
from ecif_ray.influence.curvature import SolverSettings
from ecif_ray.influence.engine import ECIF
from ecif_ray.influence.queries import ExampleQuery, zero_shot_logits
from ecif_ray.influence.scoring import score_segment
from ecif_ray.influence.task import InfluenceTask
from ecif_ray.influence.traceback import TopK, trace_segment
from ecif_ray.models.checkpoint import Checkpoint, load_checkpoint
from ecif_ray.models.factory import encode
from ecif_ray.models.zeroshot import ClassSet, class_embeddings, find_classes, labels_of, prompt_tokens

METHODS = ("ecif", "ecif-is", "ecif-damped", "ecif-damped-is", "ecif-dense", "pos-is", "grad-dot", "tracin", "trak",
           "trak-zs", "trak-reg", "trak-reg-zs", "ekfac", "nn-image", "nn-text", "nn-joint", "random")
DEFAULT_METHODS = tuple(m for m in METHODS if m != "ecif-dense")  # ecif-dense forms G densely: minutes per model
METRICS = ("precision_any", "precision_same", "seconds")
KIND = "substitute"


@dataclass
class Example:
    """One test image misclassified in a substituted direction."""

    batch: PairBatch
    index: int
    source: str  # its true class
    target: str  # the predicted class (the substitution's target)

    @property
    def name(self) -> str:
        return f"{self.batch.shard}/{self.batch.keys[self.index]}"

    @property
    def direction(self) -> str:
        return f"{self.source}->{self.target}"


@dataclass
class Truth:
    """Ground truth of the training pairs, in the order of ``keys``."""

    misaligned: np.ndarray  # [N] bool
    true_class: np.ndarray  # [N] str
    caption_class: np.ndarray

    def same_direction(self, example: Example) -> np.ndarray:
        return (self.true_class == example.source) & (self.caption_class == example.target)


def train_truth(corpus_dir: Path, keys: Sequence[tuple[str, str]]) -> Truth:
    table = pq.read_table(corpus_dir / "truth.parquet",
                          columns=["shard", "key", "split", "misaligned", "true_class", "caption_class"])
    rows = {(r["shard"], r["key"]): r for r in table.to_pylist() if r["split"] == "train"}
    picked = [rows[k] for k in keys]
    return Truth(np.array([bool(r["misaligned"]) for r in picked]), np.array([r["true_class"] for r in picked]),
                 np.array([r["caption_class"] for r in picked]))


# ------------------------------------------------------------------------------------------------
# The test examples


@torch.no_grad()
def substituted_mistakes(task: InfluenceTask, test: list[PairBatch], classes: ClassSet,
                         substitutions: Sequence[tuple[str, str]], limit: int) -> tuple[list[Example], dict]:
    """Test images predicted as their class's substitution target (what ``mispredicted`` computes,
    restricted to the substituted directions), round-robin over the directions; and the pool sizes."""
    pools: dict[tuple[str, str], list[Example]] = {pair: [] for pair in substitutions}
    total = correct = 0
    for batch in test:
        predicted = zero_shot_logits(task, task.trunk(images=batch.images), classes, task.params).argmax(dim=1).cpu()
        labels = labels_of(batch)
        total += len(batch)
        correct += int((predicted == labels).sum())
        for i, (y, p) in enumerate(zip(labels.tolist(), predicted.tolist(), strict=True)):
            pair = (classes.names[y], classes.names[p])
            if pair in pools:
                pools[pair].append(Example(batch, i, *pair))
    chosen: list[Example] = []
    for rank in range(max((len(p) for p in pools.values()), default=0)):
        chosen += [pool[rank] for pool in pools.values() if rank < len(pool)]
    info = {"zero_shot_accuracy": correct / max(total, 1),
            "substituted_mistakes": {f"{s}->{t}": len(p) for (s, t), p in pools.items()}}
    return chosen[:limit], info


def example_pairs(examples: Sequence[Example]) -> list[tuple[PairBatch, int]]:
    return [(e.batch, e.index) for e in examples]


# ------------------------------------------------------------------------------------------------
# The methods: each returns harm scores [Q examples, N training pairs] (larger = more responsible)


def ecif_methods(model: Model, examples: list[Example], classes: ClassSet, args: argparse.Namespace,
                 wanted: set[str], seconds: dict, notes: dict) -> dict[str, np.ndarray]:
    """Relative-IS and its numerator from one trace pass per damping, as ``ECIF.trace`` computes them
    (``trace_segment`` against ``engine.solve(ExampleQuery)`` and ``engine.basis(rank)``).

    ecif-dense (opt-in): the engine with the dense preconditioner, whose ``basis`` is every
    eigenpair of G, so the relative-IS norms are exact (no rank-k truncation); numerator as ecif-is."""
    out: dict[str, np.ndarray] = {}
    variants = [(rel, plain, damping, solver) for rel, plain, damping, solver in
                (("ecif", "ecif-is", "exact", SolverSettings()),
                 ("ecif-damped", "ecif-damped-is", args.damped_delta, SolverSettings()),
                 ("ecif-dense", None, "exact", SolverSettings(preconditioner="dense")))
                if wanted & {rel, plain}]
    engines: dict[str, tuple[ECIF, float]] = {}
    for rel, plain, damping, solver in variants:
        if solver.preconditioner not in engines:
            setup: dict = {}
            with timed(setup, "s"):  # shared by the variants: θ̂ in float64, the sample's features, the sketch
                engine = ecif_engine(model, args.curvature_segments, solver)
                engine.stacks()
                engine.preconditioner()
            engines[solver.preconditioner] = engine, setup["s"]
        engine, setup_seconds = engines[solver.preconditioner]
        with timed(seconds, rel):
            engine.set_damping(damping)
            out[rel], numerator, check = trace_scores(engine, model.train, examples, classes, args.rank, args.top_k)
        seconds[rel] += setup_seconds
        if plain is not None:
            out[plain], seconds[plain] = numerator, seconds[rel]
        notes[rel] = {"delta": engine.task.delta, "curvature_pairs": engine.curvature_pairs, **check}
    if wanted & {"pos-is", "grad-dot"}:
        if "nystrom" not in engines:
            setup = {}
            with timed(setup, "s"):
                engine = ecif_engine(model, args.curvature_segments, SolverSettings())
                engine.stacks()
                engine.preconditioner()
            engines["nystrom"] = engine, setup["s"]
        engine, setup_seconds = engines["nystrom"]
        engine.set_damping("exact")
        out.update(diagnostics(engine, model.train, examples, classes, wanted, seconds))
        for method in wanted & {"pos-is", "grad-dot"}:
            seconds[method] += setup_seconds
    return out


def diagnostics(engine: ECIF, train: list[PairBatch], examples: list[Example], classes: ClassSet, wanted: set[str],
                seconds: dict) -> dict[str, np.ndarray]:
    """Which part of ECIF matters: pos-is = −s_xᵀ∇Pos_n / N (the pointwise influence function, same
    directions as ecif-is, without the pair's negative terms); grad-dot = −∇ℓ_x(θ̂)ᵀ∇F_n / N (ECIF's
    removal gradient with H = I: no curvature)."""
    out: dict[str, np.ndarray] = {}
    query = ExampleQuery(example_pairs(examples), classes)
    if "pos-is" in wanted:
        with timed(seconds, "pos-is"):
            directions = engine.solve(query).vectors
            out["pos-is"] = torch.cat([score_segment(engine.task, b, directions).pos_is for b in train],
                                      dim=1).numpy()
    if "grad-dot" in wanted:
        with timed(seconds, "grad-dot"):
            gradients = query.gradients(engine.task).gradients
            out["grad-dot"] = torch.cat([score_segment(engine.task, b, gradients).ecif_is for b in train],
                                        dim=1).numpy()
    return out


def trace_scores(engine: ECIF, train: list[PairBatch], examples: list[Example], classes: ClassSet, rank: int,
                 top_k: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """[Q, N] relative-IS and ecif_is; also checks that ``TopK`` (what ``ECIF.trace`` writes) keeps
    exactly the top ``top_k`` of the relative-IS computed here."""
    directions = engine.solve(ExampleQuery(example_pairs(examples), classes))
    basis = engine.basis(rank)
    top = TopK(directions.names, top_k)
    relative, plain = [], []
    for batch in train:
        scores = trace_segment(engine.task, batch, directions.vectors, basis)
        top.add(batch, scores)
        relative.append(scores.relative_is)
        plain.append(scores.ecif_is)
    rel = torch.cat(relative, dim=1).numpy()
    keys = [(b.shard, k) for b in train for k in b.keys]
    expected = {name: {keys[j] for j in np.argsort(-rel[q], kind="stable")[:top_k]}
                for q, name in enumerate(directions.names)}
    got: dict[str, set] = {}
    for row in top.rows():
        got.setdefault(row["query_id"], set()).add((row["shard"], row["key"]))
    check = {"cg_iterations": directions.iterations, "converged": directions.converged,
             "relative_residual": float(directions.relative_residual.max()), "basis_rank": int(basis.U.shape[1]),
             "topk_matches_trace": all(got.get(n) == expected[n] for n in directions.names)}
    return rel, torch.cat(plain, dim=1).numpy(), check


def tracin_matrix(model: Model, examples: list[Example], classes: ClassSet) -> np.ndarray:
    """−Σ_c η_c ∇ℓ_x(θ_c)·∇Pos_n(θ_c): baselines/tracin.py with one query per test example (the
    scoring kernel's pos_is = −gᵀ∇Pos_n / N, hence harm = Σ_c η_c N pos_is_c)."""
    n_train = sum(len(b) for b in model.train)
    total: torch.Tensor | None = None
    for stage, lr in zip(model.stages, model.stage_lrs, strict=True):
        task = InfluenceTask.from_checkpoint(load_checkpoint(stage), n_train)
        gradients = ExampleQuery(example_pairs(examples), classes).gradients(task).gradients  # [Q, D]
        harm = torch.cat([score_segment(task, b, gradients).pos_is for b in model.train], dim=1) * n_train
        total = lr * harm if total is None else total + lr * harm
    assert total is not None
    return total.to(torch.float64).numpy()


def trak_matrices(ckpt: Checkpoint, train: list[PairBatch], examples: list[Example], classes: ClassSet,
                  proj_dim: int, seed: int, lambda_reg: float = 0.0, simulated_batch_size: int = 300
                  ) -> tuple[np.ndarray, np.ndarray]:
    """baselines/trak.py's TRAKer scoring, per test example, two sets of targets (one featurization):

    own  the test pair itself (image, its caption: its true class): harm = −TRAK(j, z)
    zs   the image with every prompt of the true and of the predicted class (the zero-shot classifier's
         prompts): harm = mean_t TRAK(j, (x, t(pred))) − mean_t TRAK(j, (x, t(true))), i.e. j raises the
         wrong match and lowers the right one (the structure of the zero-shot cross-entropy's gradient)."""
    from baselines.trak import _clip_output_class, _restore_projection, set_simulated_batch, theta_only
    from trak import TRAKer

    from ecif_ray.influence.autodiff import forward_ad_attention

    torch.manual_seed(seed)
    model = theta_only(ckpt.model, ckpt.meta.param_subset.names(ckpt.model))
    n_train = sum(len(b) for b in train)
    set_simulated_batch(model, train)
    task = _clip_output_class()(simulated_batch_size=min(simulated_batch_size, n_train - 1))
    q, t = len(examples), len(classes.templates)
    images = torch.stack([e.batch.images[e.index] for e in examples])
    own = torch.stack([e.batch.tokens[e.index] for e in examples])
    prompts = class_prompts(classes.names, classes.templates)
    true = ckpt.bundle.tokenizer([p for e in examples for p in prompts[classes.names.index(e.source)]])
    wrong = ckpt.bundle.tokenizer([p for e in examples for p in prompts[classes.names.index(e.target)]])
    target_images = torch.cat([images, images.repeat_interleave(t, dim=0), images.repeat_interleave(t, dim=0)])
    target_tokens = torch.cat([own, true, wrong])
    with tempfile.TemporaryDirectory(prefix="trak-") as save_dir, forward_ad_attention():
        traker = TRAKer(model=model, task=task, train_set_size=n_train, save_dir=save_dir, device="cpu",
                        proj_dim=min(proj_dim, sum(p.numel() for p in model.parameters())),
                        use_half_precision=False, projector_seed=seed, lambda_reg=lambda_reg, logging_level=40)
        traker.load_checkpoint(model.state_dict(), model_id=0)
        for batch in train:
            traker.featurize(batch=(batch.images, batch.tokens), num_samples=len(batch))
        traker.finalize_features()
        _restore_projection(traker.projector)
        traker.start_scoring_checkpoint(exp_name="test", checkpoint=model.state_dict(), model_id=0,
                                        num_targets=len(target_tokens))
        for start in range(0, len(target_tokens), 64):
            traker.score(batch=(target_images[start:start + 64], target_tokens[start:start + 64]),
                         num_samples=len(target_tokens[start:start + 64]))
        scores = np.asarray(traker.finalize_scores(exp_name="test"), dtype=np.float64).T  # [targets, n_train]
    true_mean = scores[q:q + q * t].reshape(q, t, -1).mean(axis=1)
    wrong_mean = scores[q + q * t:].reshape(q, t, -1).mean(axis=1)
    return -scores[:q], wrong_mean - true_mean


@torch.no_grad()
def image_pooled_features(ckpt: Checkpoint, images: torch.Tensor) -> torch.Tensor:
    """The frozen image tower's pooled features (before ``visual.proj``)."""
    towers = copy.deepcopy(ckpt.model).eval()
    towers.visual.proj = None
    return towers.encode_image(images)


@torch.no_grad()
def prompt_features(ckpt: Checkpoint, classes: ClassSet) -> torch.Tensor:
    """The frozen text tower's pooled features (before ``text_projection``) of every class prompt."""
    towers = copy.deepcopy(ckpt.model).eval()
    towers.text_projection = None
    return towers.encode_text(prompt_tokens(ckpt.bundle, classes))


def ekfac_matrix(ckpt: Checkpoint, train: list[PairBatch], examples: list[Example], classes: ClassSet,
                 seed: int) -> np.ndarray:
    """baselines/ekfac.py's EK-FAC factors and train gradients, with one measurement per test example:
    its zero-shot cross-entropy through the tracked heads. Each query row carries its own copy of the
    prompt features ([Q, C·T, width]), so kronfluence's per-sample gradient of the text head (summed
    over the middle dimension) is exactly that example's gradient. Harm = −score."""
    from baselines.ekfac import _task_class, check_equivalence, heads_model, pooled_features
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from torch.utils import data

    segment = ckpt.meta.segment_size
    if any(len(b) != segment for b in train[:-1]):
        raise ValueError("EK-FAC needs every training segment but the last to be full")
    torch.manual_seed(seed)
    train_features = pooled_features(ckpt, train)
    heads = heads_model(ckpt)
    check_equivalence(ckpt, heads, train[0], train_features)
    images = torch.stack([e.batch.images[e.index] for e in examples])
    image_features = image_pooled_features(ckpt, images)
    prompts = prompt_features(ckpt, classes)
    labels = torch.tensor([classes.names.index(e.source) for e in examples])
    n_classes, n_templates = len(classes.names), len(classes.templates)

    def zero_shot(model: torch.nn.Module, image: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
        v = F.normalize(model.image(image), dim=-1)                                   # [Q, e]
        t = F.normalize(model.text(prompt), dim=-1)                                   # [Q, C·T, e]
        classifier = F.normalize(t.unflatten(1, (n_classes, n_templates)).mean(dim=2), dim=-1)  # [Q, C, e]
        return heads.logit_scale * torch.einsum("qe,qce->qc", v, classifier)

    with torch.no_grad():  # the adapter's zero-shot logits are the model's
        classifier = class_embeddings(ckpt.bundle, classes)
        expected = ckpt.meta.logit_scale * encode(ckpt.model, images=images)[0] @ classifier.T
        got = zero_shot(heads, image_features, prompts.expand(len(examples), -1, -1))
        if not torch.allclose(expected, got, atol=1e-4, rtol=1e-4):
            raise AssertionError(f"EK-FAC query logits differ: {float((expected - got).abs().max())}")

    class ExampleTask(_task_class()):
        def compute_measurement(self, batch, model) -> torch.Tensor:
            image, prompt, label = batch
            return F.cross_entropy(zero_shot(model, image, prompt), label, reduction="sum")

    task = ExampleTask()
    tracked = prepare_model(heads, task)
    train_set = data.TensorDataset(*train_features)
    query_set = data.TensorDataset(image_features, prompts.expand(len(examples), -1, -1).contiguous(), labels)
    logging.getLogger("kronfluence").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="kronfluence-") as out:
        analyzer = Analyzer("ecif-trace", tracked, task, cpu=True, disable_tqdm=True, output_dir=out)
        analyzer.fit_all_factors("ekfac", dataset=train_set, per_device_batch_size=segment,
                                 factor_args=FactorArguments(strategy="ekfac"), overwrite_output_dir=True)
        analyzer.compute_pairwise_scores("test", factors_name="ekfac", query_dataset=query_set,
                                         train_dataset=train_set, per_device_query_batch_size=len(examples),
                                         per_device_train_batch_size=segment,
                                         score_args=ScoreArguments(damping_factor=ckpt.meta.delta),
                                         overwrite_output_dir=True)
        scores = analyzer.load_pairwise_scores("test")["all_modules"].to(torch.float64)  # [Q, n_train]
    return (-scores).numpy()


@torch.no_grad()
def neighbour_matrices(ckpt: Checkpoint, train: list[PairBatch], examples: list[Example], classes: ClassSet
                       ) -> dict[str, np.ndarray]:
    """Cosine similarities in θ̂'s embedding space (the embeddings are L2-normalised)."""
    train_images, train_texts = [], []
    for b in train:
        image, text = encode(ckpt.model, b.images, b.tokens)
        train_images.append(image)
        train_texts.append(text)
    images, texts = torch.cat(train_images), torch.cat(train_texts)
    test = encode(ckpt.model, images=torch.stack([e.batch.images[e.index] for e in examples]))[0]
    classifier = class_embeddings(ckpt.bundle, classes)
    predicted = classifier[[classes.names.index(e.target) for e in examples]]
    by_image = (test @ images.T).double().numpy()
    by_text = (predicted @ texts.T).double().numpy()
    return {"nn-image": by_image, "nn-text": by_text, "nn-joint": by_image + by_text}


# ------------------------------------------------------------------------------------------------
# One model


def precision(scores: np.ndarray, examples: list[Example], truth: Truth, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per example: fraction of the top k that are substituted (any direction / the example's own)."""
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    any_ = truth.misaligned[top].mean(axis=1)
    same = np.array([truth.same_direction(e)[top[q]].mean() for q, e in enumerate(examples)])
    return any_, same


def load_setting(args: argparse.Namespace, seed: int, noise: float) -> tuple[Path, Model]:
    """The corpus and fine-tuned model of detection.py's cache (built the same way if missing)."""
    recipe = recipe_for(args.dataset, args.pretrain_size, args.pretrain_epochs, args.finetune_epochs)
    work = Path(args.work)
    corpus_dir = corpus(work, recipe, args.train_size, noise, KIND, seed)
    init = pretrained(work, recipe, seed, corpus_dir)
    ft = finetune(recipe, corpus_dir, init, args.subset, seed, work / f"ft-{corpus_dir.name}-{args.subset}")
    return corpus_dir, load_model(ft.final, ft.stages, ft.stage_lrs, corpus_dir)


def run_setting(args: argparse.Namespace, seed: int, noise: float) -> tuple[list[dict], list[dict], dict]:
    """Rows (one per method), per-direction rows and per-example details for one fine-tuned model."""
    corpus_dir, model = load_setting(args, seed, noise)
    keys = [(b.shard, k) for b in model.train for k in b.keys]
    truth = train_truth(corpus_dir, keys)
    ckpt = model.ckpt
    test, _ = load_segments(str(corpus_dir / "test"), segment_size=256, preprocess=ckpt.bundle.preprocess,
                            tokenizer=ckpt.bundle.tokenizer)
    classes = find_classes(str(corpus_dir / "test"))
    # the examples are picked with the same float64 task the ECIF methods use (as ECIF.trace does)
    selector = InfluenceTask.from_checkpoint(_double(model.ckpt.path), len(keys))
    examples, info = substituted_mistakes(selector, test, classes, SUBSTITUTIONS[args.dataset], args.examples)
    base = {"dataset": args.dataset, "train_size": len(keys), "subset": args.subset, "noise_kind": KIND,
            "noise": noise, "seed": seed, "examples": len(examples), **info}
    print(f"  {len(examples)} examples ({', '.join(f'{d} {n}' for d, n in info['substituted_mistakes'].items())} "
          f"substituted mistakes), zero-shot accuracy {info['zero_shot_accuracy']:.3f}", flush=True)
    if not examples:
        return [], [], {**base, "note": "no substituted-direction mistakes"}
    wanted = set(args.methods)
    seconds: dict[str, float] = {}
    notes: dict = {}
    scores = ecif_methods(model, examples, classes, args, wanted, seconds, notes)
    if "tracin" in wanted:
        with timed(seconds, "tracin"):
            scores["tracin"] = tracin_matrix(model, examples, classes)
    for own, zs, lam in (("trak", "trak-zs", 0.0), ("trak-reg", "trak-reg-zs", args.trak_lambda)):
        if wanted & {own, zs}:
            with timed(seconds, own):
                scores[own], scores[zs] = trak_matrices(ckpt, model.train, examples, classes, args.trak_proj_dim,
                                                        seed, lam)
            seconds[zs] = seconds[own]
    if "ekfac" in wanted:
        if args.subset != "heads":
            notes["ekfac"] = "not run: kronfluence cannot track LoRA weight parametrizations (see baselines/ekfac.py)"
        else:
            with timed(seconds, "ekfac"):
                scores["ekfac"] = ekfac_matrix(ckpt, model.train, examples, classes, seed)
    if wanted & {"nn-image", "nn-text", "nn-joint"}:
        with timed(seconds, "nn-image"):
            scores.update(neighbour_matrices(ckpt, model.train, examples, classes))
        seconds["nn-text"] = seconds["nn-joint"] = seconds["nn-image"]
    rows, direction_rows, details = [], [], {"examples": [e.name for e in examples],
                                             "directions": [e.direction for e in examples], "precision": {}}
    for method in [m for m in args.methods if m in scores or m == "random"]:
        if method == "random":  # expectation of a uniformly random top-k: the base rates
            any_ = np.full(len(examples), truth.misaligned.mean())
            same = np.array([truth.same_direction(e).mean() for e in examples])
            finite, took = True, 0.0
        else:
            values = scores[method]
            finite, took = bool(np.isfinite(values).all()), seconds[method]
            any_, same = precision(values, examples, truth, args.top_k)
        rows.append({**{k: v for k, v in base.items() if k != "substituted_mistakes"}, "method": method,
                     "precision_any": float(any_.mean()), "precision_same": float(same.mean()), "seconds": took,
                     "finite": finite, **_flat(notes.get(method, {}))})
        details["precision"][method] = {"any": any_.tolist(), "same": same.tolist()}
        for direction in dict.fromkeys(e.direction for e in examples):
            pick = np.array([e.direction == direction for e in examples])
            direction_rows.append({"noise": noise, "seed": seed, "method": method, "direction": direction,
                                   "examples": int(pick.sum()), "precision_any": float(any_[pick].mean()),
                                   "precision_same": float(same[pick].mean())})
        print(f"  {method:15} P@{args.top_k} any {any_.mean():.3f}  same {same.mean():.3f}  {took:7.1f} s", flush=True)
    for method, note in notes.items():
        if isinstance(note, str):
            print(f"  {method:15} {note}")
    return rows, direction_rows, {**base, "notes": notes, **details}


def _double(path: Path) -> Checkpoint:
    ckpt = load_checkpoint(path)
    ckpt.model.double()
    return ckpt


def _flat(note) -> dict:
    return {k: v for k, v in note.items() if k in ("delta", "cg_iterations", "converged", "topk_matches_trace")
            } if isinstance(note, dict) else {"note": note}


# ------------------------------------------------------------------------------------------------


def summary_table(summary: list[dict], k: int) -> str:
    header = ["noise", "method", "seeds", "examples/seed", f"P@{k} any substituted", f"P@{k} same direction",
              "time (s)"]
    lines = [[f"{s['noise']:g}", s["method"], s["n"], f"{s['examples_mean']:.0f}", pm(s, "precision_any"),
              pm(s, "precision_same"), pm(s, "seconds", 1)] for s in summary]
    return markdown_table(header, lines)


def direction_table(rows: list[dict]) -> str:
    """Same-direction P@k per substitution, pooled over every example of every seed."""
    cells: dict[tuple, list[tuple[int, float]]] = {}
    for r in rows:
        cells.setdefault((r["noise"], r["method"], r["direction"]), []).append((r["examples"], r["precision_same"]))
    directions = list(dict.fromkeys(r["direction"] for r in rows))
    methods = list(dict.fromkeys((r["noise"], r["method"]) for r in rows))
    lines = []
    for noise, method in methods:
        line = [f"{noise:g}", method]
        for d in directions:
            parts = cells.get((noise, method, d), [])
            n = sum(c for c, _ in parts)
            line.append(f"{sum(c * p for c, p in parts) / n:.3f} (n={n})" if n else "n/a")
        lines.append(line)
    return markdown_table(["noise", "method", *directions], lines)


def included_extras(paths: Sequence[str], direction_rows: list[dict], details: list[dict]
                    ) -> tuple[list[dict], list[dict]]:
    """The per-direction rows and per-example details of earlier outputs (``--include``) merged with
    this run's (a method this run scored on the same model replaces the earlier one's)."""
    rows: dict[tuple, dict] = {}
    merged: dict[tuple, dict] = {}
    for payload in [json.loads(Path(path).read_text()) for path in paths] + [
            {"direction_rows": direction_rows, "details": details}]:
        for r in payload.get("direction_rows", []):
            rows[(r["noise"], r["seed"], r["method"], r["direction"])] = r
        for d in payload.get("details", []):
            key = (d["noise"], d["seed"])
            if key in merged and merged[key].get("examples") != d.get("examples"):
                raise ValueError(f"noise {key[0]} seed {key[1]}: the included run traced other test examples")
            old = merged.get(key, {})
            merged[key] = {**old, **d, "precision": {**old.get("precision", {}), **d.get("precision", {})},
                           "notes": {**old.get("notes", {}), **d.get("notes", {})}}
    return list(rows.values()), list(merged.values())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="fashion-mnist", choices=sorted(SUBSTITUTIONS))
    p.add_argument("--train-size", type=int, default=10000)
    p.add_argument("--noise", type=float, nargs="+", default=[0.4], help="substituted fraction of each source class")
    p.add_argument("--subset", default="heads", choices=["heads", "lora"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--examples", type=int, default=20, help="test examples per model (substituted mistakes)")
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--rank", type=int, default=128, help="Nyström rank of the relative-IS norms (ECIF.trace's)")
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=METHODS,
                   help="ecif-dense (exact relative-IS norms, forms G densely) is opt-in")
    add_method_flags(p)
    p.add_argument("--out", default=str(RESULTS / "traceback_precision"), help="output stem (.json/.csv)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    setup_torch()
    args = parse_args(argv)
    started = time.perf_counter()
    rows: list[dict] = []
    direction_rows: list[dict] = []
    details: list[dict] = []
    for noise in args.noise:
        for seed in args.seeds:
            print(f"[traceback] seed {seed} {KIND} {noise:.0%} {args.subset}", flush=True)
            r, d, detail = run_setting(args, seed, noise)
            rows += r
            direction_rows += d
            details.append(detail)
    rows = included_rows(args.include, rows, ["subset", "noise", "seed", "method"])
    direction_rows, details = included_extras(args.include, direction_rows, details)
    order = {m: i for i, m in enumerate(METHODS)}
    rows.sort(key=lambda r: (r["noise"], r["seed"], order[r["method"]]))
    direction_rows.sort(key=lambda r: (r["noise"], r["seed"], order[r["method"]]))
    summary = aggregate(rows, ["subset", "noise", "method"], [*METRICS, "examples"])
    table = summary_table(summary, args.top_k)
    by_direction = direction_table(direction_rows)
    print(table)
    print()
    print(by_direction)
    stem = Path(args.out)
    payload = {"args": vars(args), "machine": machine_notes(), "wall_seconds": time.perf_counter() - started,
               "summary": summary, "rows": rows, "direction_rows": direction_rows, "details": details,
               "table": table, "direction_table": by_direction}
    print("wrote", *write_outputs(stem, payload, rows))


if __name__ == "__main__":
    main()
