"""Segment-exact fine-tuning, warm starts, exclusions, evaluation, and the train/eval CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from ecif_ray.cli import main
from ecif_ray.data.segments import load_segments
from ecif_ray.evaluation import evaluate
from ecif_ray.models.checkpoint import load_checkpoint
from ecif_ray.training import TrainConfig, objective, train


def _config(corpus: Path, init: Path, out: Path, **kw) -> TrainConfig:
    fields = {"train": str(corpus / "train"), "init": str(init), "params": {"kind": "heads"}, "segment_size": 16,
              "epochs": 8, "lr": 1e-2, "delta": 1e-3, "seed": 0, "out": str(out), "progress": False}
    return TrainConfig(**{**fields, **kw})


def test_fine_tuning_decreases_the_objective_and_records_lineage(digits_corpus, micro_pretrained, tmp_path):
    path = train(_config(digits_corpus, micro_pretrained, tmp_path / "ft"))
    ckpt = load_checkpoint(path)
    history = ckpt.meta.training["objective_per_epoch"]
    assert history[-1] < history[0]
    assert ckpt.meta.param_subset.kind == "heads" and ckpt.meta.delta == 1e-3 and ckpt.meta.segment_size == 16
    assert ckpt.meta.training["n_pairs"] == 128 and ckpt.meta.training["n_segments"] == 128 // 16
    assert ckpt.meta.data_fingerprint and ckpt.meta.training["parent_fingerprint"]
    # θ_0 is the pretrained heads (not the fine-tuned ones): fine-tuning moved away from it.
    pre = load_checkpoint(micro_pretrained)
    for name, value in ckpt.anchor.items():
        torch.testing.assert_close(value, dict(pre.model.named_parameters())[name].detach())
    assert any(not torch.equal(ckpt.anchor[n], p.detach()) for n, p in ckpt.model.named_parameters()
               if n in ckpt.anchor)


def test_lbfgs_reaches_a_stationary_point_and_warm_start_keeps_the_anchor(digits_corpus, micro_pretrained,
                                                                          tmp_path):
    # A strong δ makes R well conditioned, so L-BFGS reaches θ̂ in a few rounds.
    settings = {"optimizer": "lbfgs", "lr": 1.0, "delta": 1.0}
    first = train(_config(digits_corpus, micro_pretrained, tmp_path / "a", epochs=5, **settings))
    again = train(_config(digits_corpus, first, tmp_path / "b", epochs=2, **settings))
    a, b = load_checkpoint(first), load_checkpoint(again)
    for name in a.anchor:
        torch.testing.assert_close(a.anchor[name], b.anchor[name], rtol=0, atol=0)
    # ∇R(θ̂) ≈ 0 at the L-BFGS optimum, with the same segments the engine will use.
    batches, _ = load_segments(str(digits_corpus / "train"), segment_size=16, preprocess=b.bundle.preprocess,
                               tokenizer=b.bundle.tokenizer)
    params = b.meta.param_subset.trainable(b.model)

    def grad_norm(values: dict[str, torch.Tensor]) -> float:
        r = objective(b.bundle, values, b.anchor, batches, b.meta.delta, b.meta.logit_scale)
        grads = torch.autograd.grad(r, list(values.values()))
        return float(torch.sqrt(sum((g**2).sum() for g in grads)))

    at_start = grad_norm({n: a.clone().requires_grad_(True) for n, a in b.anchor.items()})
    at_optimum = grad_norm(params)
    assert at_optimum < 1e-3 * at_start, (at_optimum, at_start)


def test_exclusion_leaves_other_segments_intact(digits_corpus, micro_pretrained, tmp_path):
    truth_keys = ["train0000003", "train0000040"]
    exclude = tmp_path / "exclude.txt"
    exclude.write_text("# pairs flagged by an audit\n" + "\n".join(truth_keys) + "\n")
    path = train(_config(digits_corpus, micro_pretrained, tmp_path / "ex", exclude=str(exclude), epochs=1))
    meta = load_checkpoint(path).meta
    assert meta.training["n_pairs"] == 126 and meta.training["excluded_pairs"] == 2
    assert meta.training["n_segments"] == 8  # pairs left their segments; no segment was re-formed


def test_eval_reports_accuracy_and_validation_loss(digits_corpus, micro_pretrained):
    result = evaluate(load_checkpoint(micro_pretrained), str(digits_corpus / "test"), str(digits_corpus / "val"))
    assert result["test_examples"] == 64 and result["val_pairs"] == 64
    assert result["classes"][:2] == ["zero", "one"]
    assert 0.3 < result["zero_shot_accuracy"] <= 1.0  # far above chance (0.1) after pretraining
    assert result["val_loss"] > 0
    truth = pq.read_table(digits_corpus / "truth.parquet").to_pandas().query("split == 'test'")
    counts = truth["true_class"].value_counts()
    per_class = result["per_class_accuracy"]
    assert set(per_class) == set(counts.index)  # every class with test images, and only those
    overall = sum(per_class[c] * counts[c] for c in per_class) / counts.sum()
    assert overall == pytest.approx(result["zero_shot_accuracy"])


def test_cli_train_and_eval_json(digits_corpus, micro_pretrained, tmp_path, capsys):
    out = tmp_path / "cli_ft"
    assert main(["train", "--train", str(digits_corpus / "train"), "--init", str(micro_pretrained), "--params",
                 "heads", "--segment-size", "16", "--epochs", "1", "--delta", "1e-3", "--seed", "0", "--out",
                 str(out)]) == 0
    capsys.readouterr()
    assert main(["eval", "--ckpt", str(out), "--test", str(digits_corpus / "test"), "--val",
                 str(digits_corpus / "val"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert {"zero_shot_accuracy", "val_loss"} <= set(result)


@pytest.mark.parametrize("argv,field", [
    (["train", "--train", "x", "--arch", "ecif-micro", "--out", "o", "--segment-size", "1"], "--segment-size"),
    (["train", "--train", "x", "--arch", "ecif-micro", "--out", "o", "--lora-rank", "0"], "--lora-rank"),
    (["train", "--train", "x", "--arch", "ecif-micro", "--out", "o", "--params", "bogus"], "--params"),
    (["train", "--train", "x", "--arch", "ecif-micro", "--out", "o", "--min-steps", "-1"], "--min-steps"),
    (["train", "--train", "x", "--arch", "ecif-micro", "--out", "o", "--segments-per-step", "0"],
     "--segments-per-step"),
    (["train", "--train", "x", "--out", "o"], "--arch"),
    (["eval", "--ckpt", "/nonexistent", "--test", "x"], "/nonexistent"),
])
def test_cli_bad_arguments_give_one_line_errors(argv, field, capsys):
    with pytest.raises(SystemExit) as exc:
        raise SystemExit(main(argv))
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and field in err, err
