"""What a run produces: the cluster part's :class:`PassResult`, the run's :class:`ScoreResult`, the
exit status that tells callers whether every input was scored, and the manifest's ``model_check``
(is the model worth auditing at all?)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ecif_ray.models.checkpoint import read_meta
from ecif_ray.tables.directions import DirectionsMeta
from ecif_ray.tables.manifest import Manifest
from ecif_ray.tables.store import ShardRecord
from ecif_ray.training import chance_loss, loss_check

EXIT_OK = 0
EXIT_BAD_CONFIG = 2  # refused up front (also what the CLI uses for bad arguments)
EXIT_INPUT_ERRORS = 3  # complete, but some inputs became `errors` rows
EXIT_INCOMPLETE = 4  # some shards could not be scored (see errors stage 'score'); rerun to retry


@dataclass
class PassResult:
    """What the cluster part of a run produced (empty when nothing was pending)."""

    records: dict[str, ShardRecord] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    directions: DirectionsMeta | None = None
    reused: bool = False
    retries: int = 0
    worker_failures: int = 0
    workers: dict[str, Any] = field(default_factory=dict)
    worker_memory: list[dict[str, Any]] = field(default_factory=list)  # pid, host, peak_rss_bytes per live actor
    timings: dict[str, float] = field(default_factory=dict)
    pairs_scored: int = 0


@dataclass
class ScoreResult:
    run_id: str
    out: str
    manifest: Manifest
    exit_code: int
    exit_reason: str
    records: dict[str, ShardRecord]
    failed: dict[str, str] = field(default_factory=dict)
    top: list[dict[str, Any]] = field(default_factory=list)
    directions_reused: bool = False
    retries: int = 0
    worker_failures: int = 0


def exit_status(failed: dict[str, str], incomplete: bool, errors: int) -> tuple[int, str]:
    if failed or incomplete:
        return EXIT_INCOMPLETE, f"{len(failed)} shards could not be scored; rerun to retry them"
    if errors:
        return EXIT_INPUT_ERRORS, f"{errors} inputs could not be scored (see the errors table)"
    return EXIT_OK, "every input scored"


# -- is the model worth auditing? --------------------------------------------------------------------

TRAINING_FIELDS = ("final_train_loss", "chance_loss", "loss_ratio", "median_loss_ratio", "near_chance",
                   "optimizer_steps", "warnings")


def model_check(directions: DirectionsMeta, segment_size: int, training: Mapping[str, Any]) -> dict[str, Any]:
    """The manifest's ``model_check``: the validation loss at θ̂ against chance, and what the checkpoint's
    own training recorded (``ecif-ray train``'s checks; empty for checkpoints from elsewhere).

    Chance is the loss of a model that cannot tell pairs apart, 2·log B per pair in a segment of B
    (``training.chance_loss``), for the validation pairs cut into segments of the checkpoint's size;
    exact when every validation shard but the last holds a multiple of B pairs (else the true chance is
    slightly lower, and the ratio slightly understated). ``near_chance``: val loss ≥ 0.9 × chance.
    Without a ``val`` query nothing is measured here: ``near_chance`` is then the training check's."""
    trained = {k: training[k] for k in TRAINING_FIELDS if k in training}
    val = directions.queries.get("val")
    if val is None:
        return {"query": None, "val_loss": None, "val_pairs": None, "chance_loss": None, "loss_ratio": None,
                "near_chance": trained.get("near_chance"), "training": trained,
                "note": "no 'val' query: the model's validation loss was not compared with chance"}
    pairs = int(val["examples"])
    sizes = [segment_size] * (pairs // segment_size) + ([pairs % segment_size] if pairs % segment_size else [])
    return {"query": "val", "val_loss": float(val["loss"]), "val_pairs": pairs, "segment_size": segment_size,
            **loss_check(float(val["loss"]), chance_loss(sizes)), "training": trained}


def checkpoint_training(checkpoint_dir: Path) -> dict[str, Any]:
    """The ``training`` section of a checkpoint's ecif.json ({} when it has none)."""
    return dict(read_meta(checkpoint_dir).training or {})
