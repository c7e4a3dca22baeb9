"""Segment-exact fine-tuning: minimise R(θ) of docs/method.md §1 over a fixed segment partition.

    R(θ) = (1/N) Σ_m L_seg,m(θ) + (δ/2) ‖θ − θ_0‖²

Segments are formed once from the shards (data.segments.load_segments) and never re-mixed:
each step draws a few whole segments, so every gradient is an unbiased estimate of ∇R for the
*same* partition that the influence analysis assumes. Only the order of segments is reshuffled
per epoch. Excluded pairs leave their segment; all other memberships stay as they were.

The model runs in eval mode (deterministic objective: no dropout), the logit scale is fixed.

Is the result worth auditing? Two checks, recorded in the checkpoint's ``training`` section
(``warnings``) and raised as :class:`TrainingWarning`:

* **too few steps**: Adam took fewer than ``min_steps`` optimizer steps (default 300). Measured
  (ecif-micro from scratch, lr 1e-3, 20 epochs on 600 digits pairs in 21 segments of <= 32): 120
  steps (4 segments per step) stay at chance, 10% zero-shot accuracy; 140 steps reach 25%, 220
  50%, 420 82%. The default ``segments_per_step`` therefore adapts: the largest k <= 4 with
  ``epochs * ceil(M / k) >= min_steps`` (M segments), else 1; big corpora keep 4 segments per
  step, small ones get the steps they need.
* **near chance**: the median training pair's own loss at θ̂ (−log P^r_nn − log P^c_nn) is at least
  ``NEAR_CHANCE`` (0.9) of chance, the loss of a uniform guess. ``segment_loss`` sums −log P over both
  directions (text→image and image→text), so a uniform softmax costs 2·log B per pair, and the mean
  chance loss of a partition is ``(2/N) Σ_m B_m log B_m`` (2·log B when every segment is full). The
  median, not the mean: training data is the noisy corpus being audited, and misaligned pairs cost
  a model that did learn far more than chance. Measured: heads fine-tuned on 20%-misaligned digits
  have mean training loss 1.24 x chance (val loss 0.68 x) but median pair 0.50 x; models that learned
  nothing sit at 1.0-1.1 x either way.
"""

from __future__ import annotations

import hashlib
import math
import time
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from tqdm.auto import tqdm

from ecif_ray.data.exclusions import read_exclusions
from ecif_ray.data.segments import PairBatch, load_segments
from ecif_ray.influence import contrastive
from ecif_ray.models.checkpoint import (
    CheckpointMeta,
    checkpoint_fingerprint,
    load_checkpoint,
    logit_scale_of,
    save_checkpoint,
    set_logit_scale,
)
from ecif_ray.models.factory import ClipBundle, create_model, similarity_matrix
from ecif_ray.models.subsets import ParamSubset

MIN_STEPS = 300  # Adam steps below which a fresh model typically learns nothing (module docstring)
MAX_SEGMENTS_PER_STEP = 4  # the automatic segments_per_step never exceeds this
NEAR_CHANCE = 0.9  # loss / chance at or above this: the model is near chance


class TrainingWarning(UserWarning):
    """The trained model may not be worth auditing (too few steps, or near chance)."""


class TrainConfig(BaseModel):
    """Arguments of ``ecif-ray train`` (validated up front; errors name the field)."""

    model_config = ConfigDict(extra="forbid")

    train: str | list[str] = Field(description="training shards: dir, brace pattern, glob or s3:// URL")
    out: str = Field(description="checkpoint directory to write")
    arch: str | None = Field(None, description="open_clip architecture (fresh start)")
    pretrained: str | None = Field(None, description="open_clip pretrained tag or weights path, with --arch")
    init: str | None = Field(None, description="ecif-ray checkpoint to start from")
    params: ParamSubset = Field(default_factory=ParamSubset)
    segment_size: int = Field(32, ge=2)
    epochs: int = Field(10, ge=1)
    delta: float = Field(1e-3, ge=0)
    seed: int = 0
    exclude: str | None = None
    lr: float = Field(1e-3, gt=0)
    segments_per_step: int | None = Field(None, ge=1, description="Adam: segments per step; default: the largest "
                                          "k <= 4 that gives at least min_steps optimizer steps, else 1")
    min_steps: int = Field(MIN_STEPS, ge=0, description="warn when Adam takes fewer optimizer steps than this")
    optimizer: Literal["adam", "lbfgs"] = "adam"
    logit_scale: float | None = Field(None, gt=0, description="fixed s; default: the init model's")
    device: str = "cpu"
    storage_options: dict | None = None
    new_anchor: bool = Field(False, description="with --init: restart θ_0 at the initial values even if the "
                                                "checkpoint was fine-tuned with the same subset")
    progress: bool = True

    @model_validator(mode="after")
    def _one_start(self) -> TrainConfig:
        if (self.arch is None) == (self.init is None):
            raise ValueError("give exactly one of --arch (fresh start) or --init (an ecif-ray checkpoint)")
        if self.pretrained and not self.arch:
            raise ValueError("--pretrained goes with --arch")
        return self


def _start(cfg: TrainConfig) -> tuple[ClipBundle, dict[str, torch.Tensor] | None, str | None]:
    """The model to train, the anchor to keep (if warm-starting the same subset), the parent id."""
    if cfg.arch is not None:
        torch.manual_seed(cfg.seed)
        return create_model(cfg.arch, cfg.pretrained, device=cfg.device), None, None
    ckpt = load_checkpoint(cfg.init, device=cfg.device)
    previous = ckpt.meta.param_subset
    if previous.kind == "lora" and cfg.params.kind == "lora" and previous != cfg.params:
        raise ValueError(f"--init checkpoint has adapters {previous.describe()}; --params asks for "
                         f"{cfg.params.describe()}: start from the checkpoint it was built on instead")
    keep_anchor = previous == cfg.params and not cfg.new_anchor
    parent = checkpoint_fingerprint(cfg.init)
    return ckpt.bundle, (ckpt.anchor if keep_anchor else None), parent


def data_fingerprint(batches: list[PairBatch]) -> str:
    """sha256 over the partition: segment ids, keys, captions and pixels, in order."""
    digest = hashlib.sha256()
    for b in batches:
        digest.update(f"{b.shard}/{b.segment}:{','.join(b.keys)}|{'|'.join(b.captions)}".encode())
        digest.update(b.images.detach().to(torch.float32).numpy().tobytes())
    return digest.hexdigest()


def penalty(params: dict[str, torch.Tensor], anchor: dict[str, torch.Tensor]) -> torch.Tensor:
    """‖θ − θ_0‖² (the δ term of R without its factor δ/2)."""
    return sum(((params[n] - anchor[n]) ** 2).sum() for n in params)


def total_segment_loss(bundle: ClipBundle, batches: list[PairBatch], scale: float,
                       params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Σ_m L_seg,m over the given segments."""
    similarities = (similarity_matrix(bundle.model, b.images, b.tokens, scale, params) for b in batches)
    return contrastive.total_segment_loss(similarities)


def train(cfg: TrainConfig) -> Path:
    """Fine-tune, then write the checkpoint; returns its path. Warns (:class:`TrainingWarning`, also
    recorded in the checkpoint) when the model may not be worth auditing (module docstring)."""
    t0 = time.perf_counter()
    bundle, anchor, parent = _start(cfg)
    cfg.params.apply(bundle.model)
    bundle.model.eval()
    scale = cfg.logit_scale or logit_scale_of(bundle.model)
    set_logit_scale(bundle.model, scale)
    params = cfg.params.trainable(bundle.model)
    if anchor is None:
        anchor = cfg.params.initial_anchor(bundle.model)

    exclude = read_exclusions(cfg.exclude, cfg.storage_options) if cfg.exclude else None
    batches, errors = load_segments(cfg.train, segment_size=cfg.segment_size, preprocess=bundle.preprocess,
                                    tokenizer=bundle.tokenizer, exclude=exclude,
                                    storage_options=cfg.storage_options)
    if not batches:
        raise ValueError(f"no trainable pairs in {cfg.train} ({len(errors)} bad samples)")
    batches = [_to_device(b, cfg.device) for b in batches]
    per_step = cfg.segments_per_step or default_segments_per_step(len(batches), cfg.epochs, cfg.min_steps)
    settings = FitSettings(delta=cfg.delta, logit_scale=scale, epochs=cfg.epochs, lr=cfg.lr,
                           segments_per_step=per_step, optimizer=cfg.optimizer, seed=cfg.seed,
                           progress=cfg.progress)
    history = fit(bundle, params, anchor, batches, settings)
    check = learning_check(bundle, batches, settings, cfg.min_steps)

    meta = CheckpointMeta(
        arch=bundle.arch, pretrained=cfg.pretrained, param_subset=cfg.params, logit_scale=scale,
        delta=cfg.delta, segment_size=cfg.segment_size, seed=cfg.seed, data_fingerprint=data_fingerprint(batches),
        training={
            "train": cfg.train, "init": cfg.init, "parent_fingerprint": parent, "exclude": cfg.exclude,
            "excluded_pairs": len(exclude) if exclude else 0, "epochs": cfg.epochs, "lr": cfg.lr,
            "segments_per_step": per_step, "segments_per_step_auto": cfg.segments_per_step is None,
            "optimizer": cfg.optimizer, "n_pairs": sum(len(b) for b in batches), "n_segments": len(batches),
            "bad_samples": len(errors), "final_objective": history[-1], "objective_per_epoch": history,
            **check, "wall_time_s": round(time.perf_counter() - t0, 2),
        },
    )
    return save_checkpoint(cfg.out, bundle, meta, anchor)


# -- is the trained model worth auditing? ----------------------------------------------------------

def default_segments_per_step(n_segments: int, epochs: int, min_steps: int = MIN_STEPS) -> int:
    """The largest k <= MAX_SEGMENTS_PER_STEP whose run takes at least ``min_steps`` Adam steps
    (``epochs · ⌈n_segments / k⌉``); 1 when none does (the most steps the run can take)."""
    for k in range(MAX_SEGMENTS_PER_STEP, 1, -1):
        if adam_steps(n_segments, epochs, k) >= min_steps:
            return k
    return 1


def adam_steps(n_segments: int, epochs: int, segments_per_step: int) -> int:
    return epochs * math.ceil(n_segments / segments_per_step)


def chance_loss(segment_sizes: Iterable[int]) -> float:
    """Mean per-pair loss of a model that cannot tell pairs apart (uniform softmax in every segment):
    each pair pays log B in both directions, so ``(2/N) Σ_m B_m log B_m`` (2·log B for full segments)."""
    sizes = [int(b) for b in segment_sizes]
    return 2.0 * sum(b * math.log(b) for b in sizes) / max(sum(sizes), 1)


def loss_check(loss: float, chance: float) -> dict[str, Any]:
    """``loss`` against ``chance``: the ratio and whether it is near chance (ratio >= NEAR_CHANCE)."""
    ratio = loss / chance if chance > 0 else None
    return {"chance_loss": chance, "loss_ratio": ratio, "near_chance": ratio is not None and ratio >= NEAR_CHANCE,
            "near_chance_threshold": NEAR_CHANCE}


@torch.no_grad()
def pair_loss_ratios(bundle: ClipBundle, batches: list[PairBatch], scale: float) -> tuple[float, torch.Tensor]:
    """The mean per-pair loss (1/N) Σ_m L_seg,m at the model's current parameters, and each pair's own
    loss over its chance 2·log B_m (pairs of segments with B_m >= 2)."""
    losses, ratios = [], []
    for b in batches:
        own = contrastive.pair_terms(similarity_matrix(bundle.model, b.images, b.tokens, scale)).pos.double()
        losses.append(own)
        if len(b) > 1:
            ratios.append(own / (2 * math.log(len(b))))
    return float(torch.cat(losses).mean()), torch.cat(ratios) if ratios else torch.zeros(0, dtype=torch.float64)


def learning_check(bundle: ClipBundle, batches: list[PairBatch], settings: FitSettings,
                   min_steps: int) -> dict[str, Any]:
    """The ``training`` fields of the two checks (module docstring); warns for each that fails."""
    loss, ratios = pair_loss_ratios(bundle, batches, settings.logit_scale)
    median = float(ratios.median()) if len(ratios) else None
    check = {"final_train_loss": loss, **loss_check(loss, chance_loss(len(b) for b in batches)),
             "median_loss_ratio": median, "near_chance": median is not None and median >= NEAR_CHANCE}
    steps = adam_steps(len(batches), settings.epochs, settings.segments_per_step) \
        if settings.optimizer == "adam" else None
    found = []
    if steps is not None and steps < min_steps:
        found.append(f"training took {steps} optimizer steps ({settings.epochs} epochs x "
                     f"ceil({len(batches)} segments / {settings.segments_per_step} per step)), fewer than "
                     f"min_steps={min_steps}: a model trained this briefly may have learned nothing "
                     "(raise --epochs or lower --segments-per-step)")
    if check["near_chance"]:
        found.append(f"the model is near chance: the median training pair's loss is {median:.2f} x chance "
                     "(2*log(segment size), the loss of a uniform guess); it learned (almost) nothing and an "
                     "influence audit of it is meaningless (train with more steps or a higher --lr)")
    for message in found:
        warnings.warn(message, TrainingWarning, stacklevel=3)
    return {**check, "optimizer_steps": steps, "min_steps": min_steps, "warnings": found}


def _to_device(batch: PairBatch, device: str) -> PairBatch:
    batch.images, batch.tokens = batch.images.to(device), batch.tokens.to(device)
    return batch


@dataclass(frozen=True)
class FitSettings:
    """How R(θ) is minimised (independent of where the data and model come from)."""

    delta: float
    logit_scale: float
    epochs: int = 10
    lr: float = 1e-3
    segments_per_step: int = 4
    optimizer: Literal["adam", "lbfgs"] = "adam"
    seed: int = 0
    progress: bool = True
    # N of R(θ) = (1/N) Σ L_seg + ...; default: the pairs being fitted. ECIF's removal analysis
    # (docs/method.md §3) keeps the original N when pairs are removed; leave-out experiments set it.
    n_pairs: int | None = None


def fit(bundle: ClipBundle, params: dict[str, torch.Tensor], anchor: dict[str, torch.Tensor],
        batches: list[PairBatch], settings: FitSettings) -> list[float]:
    """Minimise R(θ) in place over ``params``; returns R after each epoch (or L-BFGS round)."""
    if settings.optimizer == "lbfgs":
        return _fit_lbfgs(bundle, params, anchor, batches, settings)
    return _fit_adam(bundle, params, anchor, batches, settings)


def objective(bundle: ClipBundle, params: dict[str, torch.Tensor], anchor: dict[str, torch.Tensor],
              batches: list[PairBatch], delta: float, scale: float, n_pairs: int | None = None) -> torch.Tensor:
    """R(θ) over the whole partition (differentiable)."""
    n_pairs = n_pairs or sum(len(b) for b in batches)
    return total_segment_loss(bundle, batches, scale, params) / n_pairs + 0.5 * delta * penalty(params, anchor)


def _fit_adam(bundle: ClipBundle, params: dict[str, torch.Tensor], anchor: dict[str, torch.Tensor],
              batches: list[PairBatch], settings: FitSettings) -> list[float]:
    """Adam on unbiased minibatch estimates of R, cosine-decayed so the last epochs settle at θ̂."""
    generator = torch.Generator().manual_seed(settings.seed)
    optimizer = torch.optim.Adam(list(params.values()), lr=settings.lr)
    steps_per_epoch = math.ceil(len(batches) / settings.segments_per_step)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=settings.epochs * steps_per_epoch)
    n_pairs = settings.n_pairs or sum(len(b) for b in batches)
    weight = len(batches) / n_pairs  # M/N: a draw of segments estimates (1/N) Σ_m L_seg,m
    history: list[float] = []
    bar = tqdm(range(settings.epochs), desc="fine-tune", unit="epoch", disable=not settings.progress)
    for _ in bar:
        order = torch.randperm(len(batches), generator=generator).tolist()
        total = 0.0
        for start in range(0, len(order), settings.segments_per_step):
            chosen = [batches[i] for i in order[start:start + settings.segments_per_step]]
            seg_loss = total_segment_loss(bundle, chosen, settings.logit_scale)
            loss = weight * seg_loss / len(chosen) + 0.5 * settings.delta * penalty(params, anchor)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += float(seg_loss.detach())
        # R along the epoch: the running segment losses plus the δ term at the epoch's end.
        history.append(total / n_pairs + 0.5 * settings.delta * float(penalty(params, anchor).detach()))
        bar.set_postfix(objective=f"{history[-1]:.5f}")
    return history


def _fit_lbfgs(bundle: ClipBundle, params: dict[str, torch.Tensor], anchor: dict[str, torch.Tensor],
               batches: list[PairBatch], settings: FitSettings) -> list[float]:
    """Full-batch L-BFGS on R itself: converges to θ̂ tightly (for small subsets/corpora, where
    leave-one-out retraining must resolve loss changes of order 1/N)."""
    optimizer = torch.optim.LBFGS(list(params.values()), lr=settings.lr, max_iter=50, history_size=50,
                                  tolerance_grad=1e-12, tolerance_change=1e-15, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        loss = objective(bundle, params, anchor, batches, settings.delta, settings.logit_scale, settings.n_pairs)
        loss.backward()
        return loss

    history: list[float] = []
    bar = tqdm(range(settings.epochs), desc="fine-tune (L-BFGS)", unit="round", disable=not settings.progress)
    for _ in bar:
        history.append(float(optimizer.step(closure).detach()))
        bar.set_postfix(objective=f"{history[-1]:.8f}")
        if len(history) > 1 and abs(history[-2] - history[-1]) <= 1e-14 * max(1.0, abs(history[-1])):
            break
    return history
