"""The corpus builder: shards agree with truth.parquet, noise is exact, builds are reproducible.

Shards are read back with the standard ``tarfile`` module, not with our own readers, so these
tests check the on-disk format that any webdataset consumer sees.
"""

from __future__ import annotations

import io
import json
import re
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ecif_ray.data.corpus import (
    RANDOM_NOISE_KINDS,
    SPLITS,
    CorpusSpec,
    _mixed_class_matching,
    build_corpus,
)
from ecif_ray.data.datasets import DIGIT_CLASSES, FASHION_MNIST_DEFAULT_DIR, load_dataset
from ecif_ray.data.prompts import CAPTION_TEMPLATES, caption_for, class_prompts

SMALL = {"pretrain_size": 150, "train_size": 201, "val_size": 60, "test_size": 80}
SHARD_SIZE = 64


def small_spec(out: Path, **kw) -> CorpusSpec:
    args = {"dataset": "digits", "out": out, "shard_size": SHARD_SIZE, "seed": 7, **SMALL, **kw}
    return CorpusSpec(**args)


def read_split(out: Path, split: str) -> dict[str, dict]:
    """key -> {"shard": basename, "png"/"txt"/"json": member bytes}, in shard order."""
    samples: dict[str, dict] = {}
    for path in sorted((out / split).glob("*.tar")):
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                sample = samples.setdefault(key, {"shard": path.name})
                assert sample["shard"] == path.name, f"{key} spans two shards"
                sample[ext] = tar.extractfile(member).read()
    return samples


def read_truth(out: Path):
    return pq.read_table(out / "truth.parquet").to_pandas()


@pytest.fixture(scope="module", params=RANDOM_NOISE_KINDS)
def noisy(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param)
    summary = build_corpus(small_spec(out, noise=0.3, noise_kind=request.param), progress=False)
    return summary


# --- truth agrees with the shards ---------------------------------------------------------------


def test_truth_matches_shards(noisy):
    out = noisy.out
    truth = read_truth(out)
    digits = load_dataset("digits")
    assert list(truth.columns[:6]) == ["shard", "key", "split", "misaligned", "true_class", "caption_class"]
    assert truth["key"].is_unique
    for split in SPLITS:
        samples = read_split(out, split)
        rows = truth[truth["split"] == split].set_index("key")
        assert len(samples) == len(rows) == noisy.counts[split] == SMALL[f"{split}_size"]
        assert list(samples) == list(rows.index), "truth rows follow shard order"
        for key, sample in samples.items():
            assert re.fullmatch(rf"{split}\d{{7}}", key)
            assert set(sample) == {"shard", "png", "txt", "json"}
            meta = json.loads(sample["json"])
            row = rows.loc[key]
            caption = sample["txt"].decode("utf-8")
            assert sample["shard"] == row["shard"]
            assert meta["class_name"] == row["true_class"] == DIGIT_CLASSES[meta["label"]]
            assert meta["caption_class"] == row["caption_class"]
            assert caption == caption_for(meta["caption_class"], meta["template"]) == row["caption"]
            assert meta["misaligned"] == row["misaligned"] == (row["caption_class"] != row["true_class"])
            image = Image.open(io.BytesIO(sample["png"]))
            assert image.mode == "L"
            np.testing.assert_array_equal(np.asarray(image), digits.images[meta["source_index"]])
            assert meta["label"] == digits.labels[meta["source_index"]]


def test_shard_layout(noisy):
    for split in SPLITS:
        names = [p.name for p in noisy.shards[split]]
        n = noisy.counts[split]
        assert names == [f"{split}-{i:06d}.tar" for i in range(-(-n // SHARD_SIZE))]
        sizes = Counter(s["shard"] for s in read_split(noisy.out, split).values())
        assert [sizes[name] for name in names[:-1]] == [SHARD_SIZE] * (len(names) - 1)
    assert noisy.shard_counts == {s: len(noisy.shards[s]) for s in SPLITS}


def test_classes_and_manifest(noisy):
    classes = json.loads((noisy.out / "classes.json").read_text())
    assert classes == {"dataset": "digits", "classes": list(DIGIT_CLASSES), "templates": list(CAPTION_TEMPLATES)}
    manifest = json.loads((noisy.out / "corpus.json").read_text())
    assert manifest["counts"] == noisy.counts
    assert manifest["misaligned"] == noisy.misaligned
    assert manifest["spec"]["noise"] == 0.3
    assert "misaligned" in noisy.describe()


def test_splits_are_disjoint(noisy):
    truth = read_truth(noisy.out)
    assert truth["source_index"].is_unique
    assert set(truth["source_index"]) <= set(range(len(load_dataset("digits"))))


# --- noise ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", RANDOM_NOISE_KINDS)
@pytest.mark.parametrize("noise", [0.0, 0.115, 0.3, 0.9])  # 0, 23 (odd), 60, 181 (odd) of 201
def test_misaligned_count_is_exact(tmp_path, kind, noise):
    summary = build_corpus(small_spec(tmp_path, noise=noise, noise_kind=kind), progress=False)
    truth = read_truth(tmp_path)
    expected = round(noise * SMALL["train_size"])
    assert summary.misaligned == expected
    assert truth.groupby("split")["misaligned"].sum().to_dict() == {
        "pretrain": 0,
        "train": expected,
        "val": 0,
        "test": 0,
    }
    assert (truth["misaligned"] == (truth["caption_class"] != truth["true_class"])).all()


def test_swap_pair_exchanges_captions(tmp_path):
    """With an even count, the wrong captions are exactly the misaligned pairs' own captions, exchanged."""
    build_corpus(small_spec(tmp_path, noise=0.3, noise_kind="swap-pair"), progress=False)  # 60 of 201
    bad = read_truth(tmp_path).query("split == 'train' and misaligned")
    assert len(bad) == 60
    assert Counter(bad["caption_class"]) == Counter(bad["true_class"])


def test_swap_class_spreads_over_other_classes(tmp_path):
    build_corpus(small_spec(tmp_path, noise=0.9, noise_kind="swap-class"), progress=False)
    bad = read_truth(tmp_path).query("split == 'train' and misaligned")
    assert bad["caption_class"].nunique() == len(DIGIT_CLASSES)
    assert bad["template"].nunique() == len(CAPTION_TEMPLATES)


def test_substitution_captions_a_fraction_of_each_source_class_as_its_target(tmp_path):
    """Systematic noise: per source class, round(noise · its train pairs) are captioned as the target
    class and nothing else changes; truth.parquet names both classes."""
    subs = (("3", "8"), ("7", "1"))
    names = dict(zip(map(str, range(10)), DIGIT_CLASSES, strict=True))
    spec = small_spec(tmp_path, noise=0.4, noise_kind="substitute",
                      substitutions=tuple((names[s], names[d]) for s, d in subs))
    summary = build_corpus(spec, progress=False)
    truth = read_truth(tmp_path)
    train = truth.query("split == 'train'")
    bad = train.query("misaligned")
    expected = 0
    for source, target in spec.substitutions:
        members = train[train["true_class"] == source]
        hit = bad[bad["true_class"] == source]
        assert len(hit) == round(0.4 * len(members)) > 0
        assert set(hit["caption_class"]) == {target}
        expected += len(hit)
    assert summary.misaligned == len(bad) == expected
    assert set(bad["true_class"]) == {s for s, _ in spec.substitutions}
    assert truth.query("split != 'train'")["misaligned"].sum() == 0
    assert (bad["caption"] == [caption_for(c, t) for c, t in zip(bad["caption_class"], bad["template"])]).all()
    assert json.loads((tmp_path / "corpus.json").read_text())["spec"]["substitutions"] == [list(p)
                                                                                          for p in spec.substitutions]


@pytest.mark.parametrize(("fields", "says"), [
    ({"noise_kind": "substitute"}, "substitutions"),
    ({"substitutions": (("zero", "one"),)}, "substitutions"),
    ({"noise_kind": "substitute", "substitutions": (("zero", "zero"),)}, "by itself"),
])
def test_bad_substitutions_are_refused(tmp_path, fields, says):
    with pytest.raises(ValueError, match=says):
        small_spec(tmp_path, noise=0.2, **fields)


def test_unknown_substitution_class_lists_the_classes(tmp_path):
    with pytest.raises(ValueError, match=r"unknown class 'shirt'.*zero"):
        build_corpus(small_spec(tmp_path, noise=0.2, noise_kind="substitute", substitutions=(("shirt", "zero"),)),
                     progress=False)


def test_corpus_cli_takes_substitutions(tmp_path, capsys):
    from ecif_ray.cli import main

    out = tmp_path / "c"
    argv = ["corpus", "build", "--dataset", "digits", "--out", str(out), "--noise", "0.5", "--noise-kind",
            "substitute", "--substitutions", f"{DIGIT_CLASSES[2]}={DIGIT_CLASSES[5]}", "--train-size", "100",
            "--pretrain-size", "50", "--val-size", "20", "--test-size", "20"]
    assert main(argv) == 0
    bad = read_truth(out).query("misaligned")
    assert set(zip(bad["true_class"], bad["caption_class"])) == {(DIGIT_CLASSES[2], DIGIT_CLASSES[5])}
    with pytest.raises(SystemExit) as refused:
        main([*argv[:-8], "--substitutions", "two", "--overwrite"])
    assert refused.value.code == 2 and "'two' is not SRC=DST" in capsys.readouterr().err


def test_mixed_class_matching_with_a_dominant_class():
    """Half the chosen samples share one class: a mixed matching still exists and is found."""
    rng = np.random.default_rng(0)
    labels = np.array([0] * 50 + list(range(1, 6)) * 10)
    chosen = np.arange(labels.size)
    first, second = _mixed_class_matching(labels, chosen, rng)
    assert sorted(np.concatenate([first, second])) == list(chosen)
    assert np.all(labels[first] != labels[second])


# --- reproducibility -----------------------------------------------------------------------------


def test_same_seed_same_bytes(tmp_path):
    a, b, c = (tmp_path / name for name in "abc")
    for out, seed in ((a, 3), (b, 3), (c, 4)):
        build_corpus(small_spec(out, seed=seed, noise=0.2, noise_kind="swap-pair"), progress=False)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file() and p.name != "corpus.json")
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file() and p.name != "corpus.json")
    for rel in files:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    assert (a / "truth.parquet").read_bytes() != (c / "truth.parquet").read_bytes()
    assert read_split(a, "train") != read_split(c, "train")


# --- refusals ------------------------------------------------------------------------------------


def test_sizes_that_do_not_fit_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"1797") as err:
        build_corpus(small_spec(tmp_path, pretrain_size=1000, train_size=1000), progress=False)
    assert "pretrain" in str(err.value)
    assert not (tmp_path / "truth.parquet").exists()


@pytest.mark.parametrize(
    ("field", "value"),
    [("noise", 1.0), ("noise", -0.1), ("noise_kind", "shuffle"), ("shard_size", 0), ("train_size", -1)],
)
def test_bad_spec_names_the_field(tmp_path, field, value):
    with pytest.raises(ValueError, match=field):
        small_spec(tmp_path, **{field: value})


def test_unknown_dataset(tmp_path):
    with pytest.raises(ValueError, match="fashion-mnist"):
        CorpusSpec(dataset="cifar10", out=tmp_path)


def test_existing_corpus_needs_overwrite(tmp_path):
    build_corpus(small_spec(tmp_path, shard_size=10), progress=False)
    with pytest.raises(FileExistsError, match="overwrite"):
        build_corpus(small_spec(tmp_path), progress=False)
    summary = build_corpus(small_spec(tmp_path, shard_size=100, overwrite=True), progress=False)
    assert sorted((tmp_path / "train").glob("*.tar")) == summary.shards["train"]  # no stale shards
    assert len(read_split(tmp_path, "train")) == SMALL["train_size"]


def test_missing_fashion_mnist_names_the_package(tmp_path, monkeypatch):
    monkeypatch.setenv("ECIF_FASHION_MNIST_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist") as err:
        load_dataset("fashion-mnist")
    assert "apt-get install dataset-fashion-mnist" in str(err.value)
    assert str(tmp_path) in str(err.value)


# --- datasets ------------------------------------------------------------------------------------


def test_offline_datasets_load():
    digits = load_dataset("digits")
    assert digits.images.shape == (1797, 8, 8) and digits.images.dtype == np.uint8
    assert digits.images.max() == 255 and not digits.has_test_split
    mnist = load_dataset("mnist")
    assert mnist.images.shape == (5000, 28, 28) and mnist.images.dtype == np.uint8
    assert np.bincount(mnist.labels).tolist() == [500] * 10
    assert mnist.class_names == DIGIT_CLASSES
    with pytest.raises(ValueError, match="digits"):
        load_dataset("cifar10")


def test_prompts():
    assert len(CAPTION_TEMPLATES) >= 5
    assert caption_for("coat", 0) == "a photo of a coat."
    prompts = class_prompts(["coat", "bag"])
    assert len(prompts) == 2 and len(prompts[0]) == len(CAPTION_TEMPLATES)
    with pytest.raises(IndexError):
        caption_for("coat", len(CAPTION_TEMPLATES))


@pytest.mark.skipif(
    not Path(FASHION_MNIST_DEFAULT_DIR).is_dir(),
    reason=f"{FASHION_MNIST_DEFAULT_DIR} absent (Debian package dataset-fashion-mnist not installed)",
)
def test_fashion_mnist_corpus(tmp_path, monkeypatch):
    monkeypatch.delenv("ECIF_FASHION_MNIST_DIR", raising=False)
    fashion = load_dataset("fashion-mnist")
    assert fashion.images.shape == (70000, 28, 28)
    assert Counter(fashion.source_split.tolist()) == {"train": 60000, "test": 10000}
    spec = CorpusSpec(
        "fashion-mnist", tmp_path, noise=0.2, noise_kind="swap-pair", shard_size=50, seed=1,
        pretrain_size=100, train_size=100, val_size=30, test_size=40,
    )  # fmt: skip
    summary = build_corpus(spec, progress=False)
    truth = read_truth(tmp_path)
    assert summary.misaligned == 20 == truth["misaligned"].sum()
    source_split = truth["source_index"].map(lambda i: fashion.source_split[i])
    assert (source_split[truth["split"] == "test"] == "test").all()
    assert (source_split[truth["split"] != "test"] == "train").all()
    assert truth["source_index"].is_unique
    sample = next(iter(read_split(tmp_path, "test").values()))
    meta = json.loads(sample["json"])
    assert np.asarray(Image.open(io.BytesIO(sample["png"]))).shape == (28, 28)
    assert sample["txt"].decode() == caption_for(meta["class_name"], meta["template"])
    classes = json.loads((tmp_path / "classes.json").read_text())["classes"]
    assert classes[0] == "t-shirt/top" and classes[9] == "ankle boot"
