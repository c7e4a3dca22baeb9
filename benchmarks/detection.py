"""Misalignment detection: ECIF vs the baselines a data team already has (issue 5, item 1).

For each (seed, noise level, noise kind, parameter subset): build a Fashion-MNIST corpus with that
fraction of captions made wrong, pretrain the small CLIP on the clean pretrain split (once per seed),
fine-tune the subset on the noisy train split (in stages, for TracIn), then rank every training pair
by each method (larger = more suspicious) and score the ranking against the injected ground truth.

Methods (all on the same fine-tuned model θ̂):
  ecif-exact   ecif_is with exact negatives (one iHVP + one JVP scoring pass)
  ecif-taylor  ecif_is with first-order negatives (same directions, its own scoring pass)
  ecif-damped  ecif-exact with a larger damping δ in the analysis (--damped-delta, default 0.1) than
               the fine-tuning objective's δ: a sensitivity row (δ = 0.1 was chosen after seeing seed 0)
  ecif-auto    ecif-exact with the label-free analysis damping ``auto`` (0.1 × G's mean eigenvalue)
  pos-only     pos_is of the ecif-exact run: the classical pointwise influence function
  pos-damped   pos_is of the ecif-damped run; pos-auto: pos_is of the ecif-auto run
  misalignment the product's `misalignment` column without a reference model (tables.misalignment): the
               mean run-wide percentile of pos_is at the misalignment damping (0.1 × λ₁(G)) and of −clip_score
  misalignment-ref  the same column with the clean pretrained checkpoint as the run's reference
               (`--reference`): the CLIP-score percentile is the reference model's
  clip-score   −clip_score of θ̂ itself (the audited model's own CLIP score)
  external-clip-score  −clip_score of the clean pretrained checkpoint (a DataComp-style filter with a
               reference model that never saw the noisy corpus)
  loss         the pair's own contrastive loss
  tracin       −Σ_c η_c ∇L'(θ_c)·∇Pos_n(θ_c) over the fine-tuning stage checkpoints
  trak         the traker package (CLIP model output, CPU projector), targets = validation pairs,
               traker's defaults (λ = 0 in (ΦᵀΦ + λI)⁻¹, --trak-proj-dim 2048)
  trak-reg     the same with λ = --trak-lambda (default 1.0): a sensitivity row (chosen after seed 0)
  ekfac        kronfluence EK-FAC with a contrastive Task (heads only)

    python benchmarks/detection.py                                  # the issue's full grid
    python benchmarks/detection.py --train-size 4000 --noise 0.2 --subsets heads --seeds 0 1 2

Writes <out>.json (args, per-run rows, aggregates), <out>.csv (per-run rows) and <out>.png.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from common import (
    RESULTS,
    Recipe,
    add_method_flags,
    aggregate,
    corpus,
    finetune,
    locked,
    machine_notes,
    markdown_table,
    pm,
    pretrained,
    run_grid,
    setup_torch,
    timed,
    train_truth,
    write_outputs,
)

from ecif_ray.data.corpus import NOISE_KINDS
from ecif_ray.data.segments import PairBatch, load_segments
from ecif_ray.evaluation import evaluate
from ecif_ray.influence.contrastive import pair_terms
from ecif_ray.influence.curvature import Damping, SolverSettings
from ecif_ray.influence.engine import ECIF
from ecif_ray.influence.queries import MISALIGNMENT_QUERY, ValidationQuery
from ecif_ray.influence.settings import resolve_dtype
from ecif_ray.influence.task import InfluenceTask
from ecif_ray.metrics import detection_metrics
from ecif_ray.models.checkpoint import Checkpoint, load_checkpoint
from ecif_ray.models.factory import similarity_matrix
from ecif_ray.tables.misalignment import with_misalignment

METHODS = ("ecif-exact", "ecif-taylor", "ecif-damped", "ecif-auto", "pos-only", "pos-damped", "pos-auto",
           "misalignment", "misalignment-ref", "clip-score", "external-clip-score", "loss", "tracin", "trak",
           "trak-reg", "ekfac")
METRICS = ("auroc", "average_precision", "precision_at_k", "hits_top10", "seconds")
Scores = dict[tuple[str, str], float]
MISALIGNMENT_POS = "misalignment-pos"  # cached with "misalignment": pos_is at the misalignment damping


@dataclass
class Model:
    """θ̂ with its data: what every method scores."""

    ckpt: Checkpoint
    stages: list[Path]
    stage_lrs: list[float]
    train: list[PairBatch]
    val: list[PairBatch]


def load_model(ckpt_path: Path, stages: list[Path], stage_lrs: list[float], corpus_dir: Path) -> Model:
    ckpt = load_checkpoint(ckpt_path)
    spec = {"segment_size": ckpt.meta.segment_size, "preprocess": ckpt.bundle.preprocess,
            "tokenizer": ckpt.bundle.tokenizer}
    train, _ = load_segments(str(corpus_dir / "train"), **spec)
    val, _ = load_segments(str(corpus_dir / "val"), **spec)
    return Model(ckpt, stages, stage_lrs, train, val)


def by_pair(batches: list[PairBatch], values: list[float]) -> Scores:
    keys = [(b.shard, k) for b in batches for k in b.keys]
    return dict(zip(keys, values, strict=True))


def ecif_engine(model: Model, curvature_segments: int | None, solver: SolverSettings,
                damping: Damping = "exact", dtype: str = "float64") -> ECIF:
    """The in-process engine on a copy of θ̂ in ``dtype`` (``auto``: the product's default, float64 for
    heads and float32 otherwise), with the engine's defaults (curvature over every pair unless
    ``curvature_segments``); ``damping``: δ of the analysis."""
    ckpt = load_checkpoint(model.ckpt.path)
    ckpt.model.to(getattr(torch, resolve_dtype(dtype, ckpt.meta.param_subset.kind)))
    task = InfluenceTask.from_checkpoint(ckpt, sum(len(b) for b in model.train), "exact")
    return ECIF.from_task(task, model.train, curvature_segments=curvature_segments, solver=solver, damping=damping)


def table_scores(table: dict, column: str) -> Scores:
    return dict(zip(zip(table["shard"], table["key"], strict=True), table[column], strict=True))


def solver_note(directions) -> dict:
    return {"cg_iterations": directions.iterations, "converged": directions.converged,
            "relative_residual": float(directions.relative_residual.max()), "solve_seconds": directions.seconds}


def ecif_methods(model: Model, wanted: set[str], curvature_segments: int | None, damped_delta: float,
                 seconds: dict, solver_notes: dict, dtype: str = "float64") -> dict[str, Scores]:
    """ecif-exact, pos-only and ecif-taylor from one solve (each charged the engine's setup, the solve
    and its own scoring pass); ecif-damped and ecif-auto solve again with their analysis damping."""
    out: dict[str, Scores] = {}
    solver = SolverSettings()
    if wanted & {"ecif-exact", "pos-only", "ecif-taylor"}:
        solve: dict = {}
        with timed(solve, "s"):
            engine = ecif_engine(model, curvature_segments, solver, dtype=dtype)
            directions = engine.solve(ValidationQuery(model.val))
        solver_notes["ecif-exact"] = {**solver_note(directions), "delta": engine.task.delta,
                                      "curvature_pairs": engine.curvature_pairs}
        if wanted & {"ecif-exact", "pos-only"}:
            with timed(seconds, "ecif-exact"):
                table = engine.score(model.train, directions).to_pydict()
            out["ecif-exact"], out["pos-only"] = table_scores(table, "ecif_is"), table_scores(table, "pos_is")
            seconds["ecif-exact"] += solve["s"]
            seconds["pos-only"] = seconds["ecif-exact"]
        if "ecif-taylor" in wanted:
            engine.task.negative_term = "taylor"
            with timed(seconds, "ecif-taylor"):
                out["ecif-taylor"] = table_scores(engine.score(model.train, directions).to_pydict(), "ecif_is")
            seconds["ecif-taylor"] += solve["s"]
    if wanted & {"misalignment", "misalignment-ref"}:
        with timed(seconds, "misalignment"):
            engine = ecif_engine(model, curvature_segments, solver, dtype=dtype)
            directions = engine.solve(ValidationQuery(model.val), misalignment="auto")
            table = engine.score(model.train, directions).to_pydict()
        out["misalignment"] = table_scores(table, "misalignment")
        out[MISALIGNMENT_POS] = table_scores(table, "misalignment_pos_is")
        seconds[MISALIGNMENT_POS] = seconds["misalignment"]
        solver_notes["misalignment"] = {**solver_note(directions), "delta": engine.task.delta,
                                        "misalignment_delta": directions.settings[MISALIGNMENT_QUERY]["delta"]}
    for method, pos, damping in (("ecif-damped", "pos-damped", damped_delta), ("ecif-auto", "pos-auto", "auto")):
        if not wanted & {method, pos}:
            continue
        with timed(seconds, method):
            engine = ecif_engine(model, curvature_segments, solver, damping, dtype)
            directions = engine.solve(ValidationQuery(model.val))
            table = engine.score(model.train, directions).to_pydict()
        out[method], out[pos] = table_scores(table, "ecif_is"), table_scores(table, "pos_is")
        seconds[pos] = seconds[method]
        solver_notes[method] = {**solver_note(directions), "delta": engine.task.delta,
                                "curvature_pairs": engine.curvature_pairs}
    return out


def misalignment_with_reference(scores: dict[str, list[float]]) -> list[float]:
    """The ``misalignment`` column of a run with the clean pretrained checkpoint as ``--reference``,
    computed by the product's own definition from the cached per-pair columns."""
    import pyarrow as pa

    table = pa.table({"misalignment_pos_is": scores[MISALIGNMENT_POS],
                      "clip_score": [-v for v in scores["clip-score"]],
                      "reference_clip_score": [-v for v in scores["external-clip-score"]]})
    return with_misalignment(table)["misalignment"].to_pylist()


@torch.no_grad()
def forward_methods(model: Model, seconds: dict) -> dict[str, Scores]:
    """CLIP-score filtering and per-pair loss: one plain forward pass over the segments."""
    t0 = time.perf_counter()
    clip, loss = clip_and_loss(model.ckpt, model.train)
    seconds["clip-score"] = seconds["loss"] = time.perf_counter() - t0
    return {"clip-score": by_pair(model.train, clip), "loss": by_pair(model.train, loss)}


@torch.no_grad()
def clip_and_loss(ckpt: Checkpoint, batches: list[PairBatch]) -> tuple[list[float], list[float]]:
    """−clip_score and the own loss of every pair under ``ckpt``."""
    clip, loss = [], []
    for b in batches:
        terms = pair_terms(similarity_matrix(ckpt.model, b.images, b.tokens, ckpt.meta.logit_scale))
        clip += (-terms.clip_score).tolist()
        loss += terms.pos.tolist()
    return clip, loss


def external_clip_method(reference: Path, model: Model, seconds: dict) -> dict[str, Scores]:
    """−clip_score under the clean pretrained checkpoint (same preprocessing and tokenizer)."""
    with timed(seconds, "external-clip-score"):
        clip, _ = clip_and_loss(load_checkpoint(reference), model.train)
    return {"external-clip-score": by_pair(model.train, clip)}


def baseline_methods(model: Model, wanted: set[str], subset: str, trak_proj_dim: int, trak_lambda: float,
                     seed: int, seconds: dict, notes: dict) -> dict[str, Scores]:
    """TracIn, TRAK, EK-FAC (each timed on its own)."""
    out: dict[str, Scores] = {}
    if "tracin" in wanted:
        from baselines.tracin import tracin_scores

        with timed(seconds, "tracin"):
            out["tracin"] = tracin_scores(model.stages, model.stage_lrs, model.train, model.val)
    if "trak" in wanted:
        from baselines.trak import trak_scores

        with timed(seconds, "trak"):
            out["trak"] = trak_scores(model.ckpt, model.train, model.val, proj_dim=trak_proj_dim, seed=seed)
    if "trak-reg" in wanted:
        from baselines.trak import trak_scores

        with timed(seconds, "trak-reg"):
            out["trak-reg"] = trak_scores(model.ckpt, model.train, model.val, proj_dim=trak_proj_dim, seed=seed,
                                          lambda_reg=trak_lambda)
    if "ekfac" in wanted:
        if subset != "heads":
            notes["ekfac"] = "not run: kronfluence cannot track LoRA weight parametrizations (see baselines/ekfac.py)"
        else:
            from baselines.ekfac import ekfac_scores

            with timed(seconds, "ekfac"):
                out["ekfac"] = ekfac_scores(model.ckpt, model.train, model.val, seed=seed)
    return out


@dataclass
class Setting:
    """One fine-tuned model and every method's scores of its training pairs."""

    corpus_dir: Path
    finetune_seconds: float
    model: Model
    keys: list[tuple[str, str]]
    scores: dict[str, Scores]
    seconds: dict[str, float]
    notes: dict[str, str]
    solver: dict[str, dict]  # CG diagnostics of the ECIF solves


def score_setting(args: argparse.Namespace, recipe: Recipe, seed: int, noise: float, kind: str, subset: str
                  ) -> Setting:
    """Build (or reuse) the corpus, pretrained and fine-tuned models, then run every wanted method.

    Scores and their timings are cached next to the checkpoints (``scores.json``) so that the
    removal benchmark ranks with exactly the scores (and charges exactly the time) measured here."""
    work = Path(args.work)
    corpus_dir = corpus(work, recipe, args.train_size, noise, kind, seed)
    init = pretrained(work, recipe, seed, corpus_dir)
    ft = finetune(recipe, corpus_dir, init, subset, seed, work / f"ft-{corpus_dir.name}-{subset}")
    model = load_model(ft.final, ft.stages, ft.stage_lrs, corpus_dir)
    keys = [(b.shard, k) for b in model.train for k in b.keys]
    config = {"curvature_segments": args.curvature_segments, "trak_proj_dim": args.trak_proj_dim,
              "damped_delta": args.damped_delta, "trak_lambda": args.trak_lambda}
    if args.dtype != "float64":  # only then: caches written before the flag stay valid
        config["dtype"] = args.dtype
    cache = ft.final.parent / score_cache_name(config)
    with locked(cache.with_suffix(".lock")):  # concurrent runs compute each setting's scores once
        return _cached_scores(args, subset, seed, corpus_dir, ft, model, keys, cache, config, init)


def score_cache_name(config: dict) -> str:
    """scores.json for the default method settings, scores-<hash>.json for any other (sensitivity runs
    never overwrite the scores that the removal benchmark ranks with)."""
    defaults = parse_args([])
    if config == {k: getattr(defaults, k) for k in config}:
        return "scores.json"
    return f"scores-{hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12]}.json"


def _cached_scores(args: argparse.Namespace, subset: str, seed: int, corpus_dir: Path, ft, model: Model,
                   keys: list[tuple[str, str]], cache: Path, config: dict, reference: Path) -> Setting:
    cached = json.loads(cache.read_text()) if cache.exists() else {}
    if cached.get("config") != config:
        cached = {"config": config, "scores": {}, "seconds": {}, "notes": {}}
    wanted = set(args.methods) - set(cached["scores"]) - set(cached["notes"])
    seconds: dict[str, float] = {}
    notes: dict[str, str] = {}
    solver_notes: dict[str, dict] = {}
    scores = ecif_methods(model, wanted, args.curvature_segments, args.damped_delta, seconds, solver_notes,
                          args.dtype)
    if wanted & {"clip-score", "loss"}:
        scores.update(forward_methods(model, seconds))
    if "external-clip-score" in wanted:
        scores.update(external_clip_method(reference, model, seconds))
    scores.update(baseline_methods(model, wanted, subset, args.trak_proj_dim, args.trak_lambda, seed, seconds,
                                   notes))
    for method, values in scores.items():
        cached["scores"][method] = [values[k] for k in keys]
        cached["seconds"][method] = seconds[method]
    if "misalignment-ref" in wanted:
        cached["scores"]["misalignment-ref"] = misalignment_with_reference(cached["scores"])
        cached["seconds"]["misalignment-ref"] = cached["seconds"]["misalignment"] + \
            cached["seconds"]["external-clip-score"]
    cached["notes"].update(notes)
    cached.setdefault("solver", {}).update(solver_notes)
    cache.write_text(json.dumps(cached))
    return Setting(corpus_dir, ft.seconds, model, keys,
                   {m: dict(zip(keys, v, strict=True)) for m, v in cached["scores"].items()},
                   cached["seconds"], cached["notes"], cached.get("solver", {}))


def run_setting(args: argparse.Namespace, recipe: Recipe, seed: int, noise: float, kind: str, subset: str
                ) -> list[dict]:
    """One fine-tuned model, every method, one row per method."""
    setting = score_setting(args, recipe, seed, noise, kind, subset)
    quality = evaluate(setting.model.ckpt, str(setting.corpus_dir / "test"), str(setting.corpus_dir / "val"))
    truth = train_truth(setting.corpus_dir)
    misaligned = np.array([truth[k] for k in setting.keys])
    base = {"dataset": recipe.dataset, "train_size": len(setting.keys), "subset": subset, "noise_kind": kind,
            "noise": noise, "seed": seed, "finetune_seconds": setting.finetune_seconds,
            "zero_shot_accuracy": quality["zero_shot_accuracy"], "val_loss": quality["val_loss"]}
    rows = []
    for method in [m for m in args.methods if m in setting.scores]:
        values = np.array([setting.scores[method][k] for k in setting.keys], dtype=float)
        metrics = detection_metrics(values, misaligned)
        took = setting.seconds[method]
        solve = setting.solver.get("ecif-exact" if method in ("ecif-taylor", "pos-only") else method, {})
        rows.append({**base, "method": method, **metrics, "seconds": took, **solve,
                     "finite": bool(np.isfinite(values).all())})
        print(f"  {method:12} AUROC {metrics['auroc']:.3f}  AP {metrics['average_precision']:.3f}  "
              f"P@k {metrics['precision_at_k']:.3f}  top10 {metrics['hits_top10']:2d}  {took:7.1f} s", flush=True)
    for method, note in setting.notes.items():
        print(f"  {method:12} {note}")
    return rows


def summary_table(summary: list[dict]) -> str:
    header = ["subset", "noise kind", "noise", "method", "seeds", "AUROC", "AP", "P@k", "top-10 hits", "time (s)"]
    lines = [[s["subset"], s["noise_kind"], f"{s['noise']:g}", s["method"], s["n"], pm(s, "auroc"),
              pm(s, "average_precision"), pm(s, "precision_at_k"), pm(s, "hits_top10", 1), pm(s, "seconds", 1)]
             for s in summary]
    return markdown_table(header, lines)


def plot(summary: list[dict], path: Path) -> None:
    """AUROC (mean ± std over seeds) by noise level, one panel per (subset, noise kind)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(s["subset"], s["noise_kind"]) for s in summary})
    methods = list(dict.fromkeys(s["method"] for s in summary))
    colors = plt.get_cmap("tab20")(np.linspace(0, 1, 20))[::2 if len(methods) <= 10 else 1]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels) + 1.5, 4), squeeze=False)
    for ax, (subset, kind) in zip(axes[0], panels, strict=True):
        rows = [s for s in summary if s["subset"] == subset and s["noise_kind"] == kind]
        noises = sorted({s["noise"] for s in rows})
        width = 0.8 / len(methods)
        for i, method in enumerate(methods):
            cells = {s["noise"]: s for s in rows if s["method"] == method}
            xs = [j + i * width for j, n in enumerate(noises) if n in cells]
            ax.bar(xs, [cells[n]["auroc_mean"] for n in noises if n in cells], width, color=colors[i],
                   yerr=[cells[n]["auroc_std"] for n in noises if n in cells], label=method, capsize=2)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(noises))], [f"{n:.0%}" for n in noises])
        ax.set_ylim(0.4, 1.0)
        ax.axhline(0.5, color="grey", lw=0.8, ls="--")
        ax.set_title(f"{subset}, {kind}")
        ax.set_xlabel("misaligned fraction")
        ax.set_ylabel("AUROC")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="center right")
    fig.tight_layout(rect=(0, 0, 1 - 1.3 / fig.get_figwidth(), 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="fashion-mnist", choices=["fashion-mnist", "digits"])
    p.add_argument("--train-size", type=int, default=10000)
    p.add_argument("--noise", type=float, nargs="+", default=[0.1, 0.2, 0.3])
    p.add_argument("--kinds", nargs="+", default=["swap-class", "swap-pair"], choices=NOISE_KINDS,
                   help="substitute: systematic noise (common.SUBSTITUTIONS), --noise per source class")
    p.add_argument("--subsets", nargs="+", default=["heads", "lora"], choices=["heads", "lora"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    add_method_flags(p)
    p.add_argument("--dtype", default="float64", choices=["float64", "float32", "auto"],
                   help="dtype of the ECIF analyses (auto: the product's default, float32 for LoRA)")
    p.add_argument("--out", default=str(RESULTS / "detection"), help="output stem (.json/.csv/.png)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    setup_torch()
    args = parse_args(argv)
    started = time.perf_counter()
    recipe, rows = run_grid(args, "detection", run_setting)
    summary = aggregate(rows, ["subset", "noise_kind", "noise", "method"],
                        [*METRICS, "zero_shot_accuracy"])
    table = summary_table(summary)
    print(table)
    stem = Path(args.out)
    payload = {"args": vars(args), "recipe": recipe.__dict__, "machine": machine_notes(),
               "wall_seconds": time.perf_counter() - started, "summary": summary, "rows": rows, "table": table}
    written = write_outputs(stem, payload, rows)
    plot(summary, stem.with_suffix(".png"))
    print("wrote", *written, stem.with_suffix(".png"))


if __name__ == "__main__":
    main()
