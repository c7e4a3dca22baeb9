"""Is the model worth auditing? `ecif-ray train`'s step and chance checks (warned and recorded in the
checkpoint), and `ecif-ray score`'s ``model_check`` (manifest, summary, report) for a model that
learned nothing and for one that did."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from ecif_ray.cli import main
from ecif_ray.influence.contrastive import segment_loss
from ecif_ray.models.checkpoint import load_checkpoint
from ecif_ray.pipeline.progress import format_summary
from ecif_ray.pipeline.results import model_check
from ecif_ray.report import build_report
from ecif_ray.tables.directions import DirectionsMeta
from ecif_ray.training import (
    NEAR_CHANCE,
    TrainConfig,
    TrainingWarning,
    chance_loss,
    default_segments_per_step,
    loss_check,
    train,
)

# -- the rules ---------------------------------------------------------------------------------------


def test_segments_per_step_adapts_so_small_corpora_get_enough_steps():
    assert default_segments_per_step(19, 20, 300) == 1  # 600 digits pairs, B 32: 4 per step gave 100 steps
    assert default_segments_per_step(100, 10, 300) == 3  # 4 per step: 250 steps; 3: 340
    assert default_segments_per_step(320, 8, 300) == 4  # a big corpus keeps 4 segments per step
    assert default_segments_per_step(8, 2, 300) == 1  # out of reach: as many steps as the run can take
    assert default_segments_per_step(8, 2, 0) == 4


def test_chance_is_the_loss_of_a_uniform_guess_two_log_b_per_pair():
    assert chance_loss([32] * 6) == pytest.approx(2 * math.log(32))
    assert chance_loss([32] * 6 + [8]) == pytest.approx(2 * (192 * math.log(32) + 8 * math.log(8)) / 200)
    # segment_loss (summed over both directions) of a model that scores every pair alike:
    assert float(segment_loss(torch.zeros(16, 16, dtype=torch.float64))) / 16 == pytest.approx(chance_loss([16]))
    assert loss_check(NEAR_CHANCE * 5.0, 5.0)["near_chance"]
    assert not loss_check(0.89 * 5.0, 5.0)["near_chance"]


def _directions(queries: dict) -> DirectionsMeta:
    return DirectionsMeta(fingerprint="f", names=list(queries), iterations=1, converged=True,
                          relative_residual={}, settings={}, seconds=0.0, queries=queries)


def test_model_check_compares_the_val_loss_with_chance_or_says_it_could_not():
    chance = chance_loss([16] * 4)
    near = model_check(_directions({"val": {"examples": 64, "loss": 0.95 * chance}}), 16, {})
    assert near["near_chance"] and near["loss_ratio"] == pytest.approx(0.95) and near["val_pairs"] == 64
    fine = model_check(_directions({"val": {"examples": 64, "loss": 0.5 * chance}}), 16, {"near_chance": False})
    assert fine["near_chance"] is False and fine["training"] == {"near_chance": False}
    short = model_check(_directions({"val": {"examples": 40, "loss": 1.0}}), 16, {})  # segments 16, 16, 8
    assert short["chance_loss"] == pytest.approx(chance_loss([16, 16, 8]))
    # No val query: nothing measured here; the checkpoint's own training check stands in.
    task_only = model_check(_directions({"task": {"examples": 64, "loss": 2.3}}), 16, {"near_chance": True})
    assert task_only["val_loss"] is None and task_only["near_chance"] is True and "no 'val' query" in task_only["note"]
    assert model_check(_directions({"task": {"examples": 64, "loss": 2.3}}), 16, {})["near_chance"] is None


# -- ecif-ray train ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chance_ckpt(digits_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """Random ecif-micro heads 'trained' for 8 steps at lr 1e-9: a model that learned nothing."""
    out = tmp_path_factory.mktemp("ckpt") / "chance"
    with pytest.warns(TrainingWarning) as caught:
        path = train(TrainConfig(train=str(digits_corpus / "train"), arch="ecif-micro", params={"kind": "heads"},
                                 segment_size=16, epochs=1, lr=1e-9, out=str(out), progress=False))
    return path, [str(w.message) for w in caught if issubclass(w.category, TrainingWarning)]


def test_train_warns_and_records_when_the_model_learned_nothing(chance_ckpt):
    path, warned = chance_ckpt
    training = load_checkpoint(path).meta.training
    assert training["segments_per_step_auto"] and training["segments_per_step"] == 1
    assert training["optimizer_steps"] == 8 and training["min_steps"] == 300
    assert training["chance_loss"] == pytest.approx(2 * math.log(16))
    assert training["near_chance"] and training["median_loss_ratio"] >= NEAR_CHANCE
    assert training["warnings"] == warned and len(warned) == 2
    assert "8 optimizer steps" in warned[0] and "fewer than min_steps=300" in warned[0]
    assert "near chance" in warned[1]


def test_trained_checkpoints_are_above_chance(micro_pretrained, heads_ckpt):
    pre = load_checkpoint(micro_pretrained).meta.training
    # The fixture pins 4 segments per step (the recipe the fidelity tests were measured on): 15 segments x
    # 30 epochs = 120 steps, below min_steps, so it carries the step warning; it learned all the same.
    assert pre["segments_per_step"] == 4 and pre["optimizer_steps"] == 120
    assert len(pre["warnings"]) == 1 and "120 optimizer steps" in pre["warnings"][0]
    assert not pre["near_chance"] and pre["median_loss_ratio"] < NEAR_CHANCE and pre["loss_ratio"] < NEAR_CHANCE
    heads = load_checkpoint(heads_ckpt).meta.training
    assert heads["segments_per_step"] == 1  # the default on a small corpus: as many steps as it can get
    assert not heads["near_chance"] and heads["median_loss_ratio"] < NEAR_CHANCE
    # 20% of its training pairs are misaligned: they pull the mean up, not the median.
    assert heads["loss_ratio"] > heads["median_loss_ratio"]
    assert len(heads["warnings"]) == 1 and "16 optimizer steps" in heads["warnings"][0]  # 8 segments x 2 epochs


def test_cli_train_prints_the_outcome_and_the_warnings(digits_corpus, tmp_path, capsys):
    argv = ["train", "--train", str(digits_corpus / "train"), "--arch", "ecif-micro", "--params", "heads",
            "--segment-size", "16", "--epochs", "1", "--lr", "1e-9"]
    assert main([*argv, "--out", str(tmp_path / "a")]) == 0
    captured = capsys.readouterr()
    assert "8 Adam steps (1 segments/step)" in captured.out and "x chance" in captured.out
    assert "ecif-ray train: warning: training took 8 optimizer steps" in captured.err
    assert "ecif-ray train: warning: the model is near chance" in captured.err
    assert main([*argv, "--min-steps", "0", "--segments-per-step", "2", "--out", str(tmp_path / "b")]) == 0
    captured = capsys.readouterr()
    assert "4 Adam steps (2 segments/step)" in captured.out and "optimizer steps" not in captured.err


# -- ecif-ray score ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chance_run(ray_cluster, score_config, chance_ckpt, tmp_path_factory):
    from ecif_ray.pipeline import run_score

    return run_score(score_config(tmp_path_factory.mktemp("runs") / "chance", ckpt=str(chance_ckpt[0])))


def test_score_flags_a_near_chance_model_in_manifest_summary_and_report(chance_run, score_config, tmp_path):
    check = chance_run.manifest.model_check
    assert check["query"] == "val" and check["val_pairs"] == 64 and check["segment_size"] == 16
    assert check["chance_loss"] == pytest.approx(2 * math.log(16))
    assert check["near_chance"] and check["loss_ratio"] >= NEAR_CHANCE
    assert check["training"]["near_chance"] and len(check["training"]["warnings"]) == 2
    on_disk = json.loads((Path(chance_run.out) / "manifest.json").read_text())
    assert on_disk["model_check"] == check

    summary = format_summary(chance_run)
    assert summary.splitlines()[1].startswith("  WARNING   the model is near chance: validation loss")
    assert "NEAR CHANCE" in summary

    index = build_report(chance_run.out, tmp_path / "report", top=4)
    page = index.read_text(encoding="utf-8")
    assert 'id="near-chance"' in page and "Warning: the model is near chance." in page
    assert json.loads((index.parent / "summary.json").read_text())["model_check"]["near_chance"] is True

    # A rerun with nothing left to score keeps the check.
    from ecif_ray.pipeline import run_score

    again = run_score(score_config(chance_run.out, ckpt=chance_run.manifest.checkpoint["path"]))
    assert again.manifest.model_check == check


def test_score_of_a_trained_model_is_above_chance(scored_run):
    check = scored_run.manifest.model_check
    assert check["near_chance"] is False and check["loss_ratio"] < NEAR_CHANCE
    summary = format_summary(scored_run)
    assert "WARNING" not in summary and ": above chance" in summary
