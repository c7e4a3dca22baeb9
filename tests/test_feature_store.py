"""The trunk-feature store (``ecif-ray features``): a Ray Data pass writes, per shard, exactly the trunk
features the in-process analysis computes, bad samples become ``errors`` rows, reruns skip committed
shards, another trunk is refused, and the worker count changes nothing."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from ecif_ray.cli import main
from ecif_ray.data.feature_source import store_batches, task_identity, to_trunk_features, trunk_fingerprint
from ecif_ray.data.samples import read_shard
from ecif_ray.data.segments import load_segments
from ecif_ray.data.shards import list_shards
from ecif_ray.influence.task import InfluenceTask
from ecif_ray.models.checkpoint import load_checkpoint
from ecif_ray.pipeline.features import FeatureJob, ShardFeaturizer, featurizer_settings, prepare_features, run_features
from ecif_ray.pipeline.prepare import checkpoint_files
from ecif_ray.pipeline.results import EXIT_BAD_CONFIG, EXIT_INCOMPLETE, EXIT_INPUT_ERRORS
from ecif_ray.tables.feature_store import FeatureStore, FeatureStoreMismatch, open_store
from ecif_ray.tables.lease import RunLease
from ecif_ray.tables.schema import ERRORS
from ecif_ray.tables.store import LINEAGE_KEY, RunStore

EXTRA = "extra-000000.tar"
DOCS = Path(__file__).resolve().parents[1] / "docs" / "pipeline.md"  # five samples, two of them bad


@pytest.fixture(scope="module")
def corpus(digits_corpus: Path, wds, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The digits train shards plus one shard with a sample that does not decode and one without a caption."""
    root = tmp_path_factory.mktemp("features-corpus")
    for shard in sorted((digits_corpus / "train").glob("*.tar")):
        (root / shard.name).symlink_to(shard)
    members = []
    for i in range(5):
        image = b"not an image" if i == 1 else wds.image_bytes(color=(40 * i, 90, 200 - 30 * i))
        members += wds.sample_members(f"x{i:03d}", "" if i == 3 else f"a photo of the digit {i}.", image)
    wds.write_tar(root / EXTRA, members)
    return root


@pytest.fixture(scope="module")
def lora_ckpt(digits_corpus: Path, micro_pretrained: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from ecif_ray.training import TrainConfig, train

    out = tmp_path_factory.mktemp("ckpt") / "lora"
    return train(TrainConfig(train=str(digits_corpus / "train"), init=str(micro_pretrained), params={"kind": "lora"},
                             segment_size=16, epochs=1, delta=1e-2, out=str(out), progress=False))


@pytest.fixture(scope="module")
def heads_store(ray_cluster, heads_ckpt: Path, corpus: Path, tmp_path_factory: pytest.TempPathFactory):
    """The corpus featurized by two Ray Data actors with the heads checkpoint."""
    out = tmp_path_factory.mktemp("stores") / "heads"
    result = run_features(FeatureJob(ckpt=str(heads_ckpt), train=str(corpus), out=str(out), workers=2,
                                     progress=False))
    return result, out


def _unaddressed(messages) -> list[str]:
    """Error messages without memory addresses (PIL names the BytesIO object it could not identify)."""
    return [re.sub(r" at 0x[0-9a-f]+", "", m) for m in messages]


def _task(ckpt_path: Path, dtype: torch.dtype) -> tuple[InfluenceTask, str]:
    ckpt = load_checkpoint(ckpt_path)
    ckpt.model.to(dtype)
    return InfluenceTask.from_checkpoint(ckpt, n_train=128), ckpt.meta.arch


def _assert_store_is_the_in_process_trunk(store: FeatureStore, task: InfluenceTask, corpus: Path, segment: int):
    """Every shard's stored rows equal ``task.features`` of the scorer's own segments, bit for bit."""
    bundle = task.bundle
    batches, _ = load_segments(str(corpus), segment_size=segment, preprocess=bundle.preprocess,
                               tokenizer=bundle.tokenizer)
    assert sorted(store.shards()) == sorted({b.shard for b in batches} | {EXTRA})
    for shard in store.shards():
        ours = [b for b in batches if b.shard == shard]
        expected = [task.features(b) for b in ours]
        rows = list(store.iter_shard(shard, segment))
        assert [r.keys for r in rows] == [b.keys for b in ours]
        assert [list(r.shard_index) for r in rows] == [b.shard_indices for b in ours]
        assert [r.captions for r in rows] == [b.captions for b in ours]
        for got, want in zip(rows, expected):
            features = to_trunk_features(got)
            assert torch.equal(features.image, want.image) and torch.equal(features.text, want.text)
            assert (features.tokens is None) == (want.tokens is None)
            if want.tokens is not None:
                assert torch.equal(features.tokens, want.tokens)


def test_the_store_holds_the_in_process_trunk_features_bit_for_bit(heads_store, heads_ckpt, corpus):
    result, out = heads_store
    task, arch = _task(heads_ckpt, torch.float64)  # dtype auto: float64 for heads, as `ecif-ray score`
    identity = task_identity(task, arch)
    store = open_store(str(out), fingerprint=trunk_fingerprint(identity), identity=identity)  # the scorer's check
    info = store.info()
    assert info is not None and info.fingerprint == result.fingerprint
    assert [(c.name, c.shape, c.dtype) for c in info.columns] == [("image_features", (32,), "float64"),
                                                                  ("text_features", (32,), "float64")]
    assert info.bytes_per_pair == 512
    assert result.pairs == 128 + 3 and len(result.written) == 3 and not result.failed
    _assert_store_is_the_in_process_trunk(store, task, corpus, load_checkpoint(heads_ckpt).meta.segment_size)

    # Read back as the scorer would: featurized segments whose features the task reuses as its own.
    batch = next(store_batches(store, store.shards()[0], 16, task.trunk_source))
    assert batch.images.shape == (len(batch), 0)  # no pixels: the task can only use the attached features
    assert torch.equal(task.features(batch).image, batch.features.image)
    lineage = pq.read_schema(out / "features" / f"{store.shards()[0]}.parquet").metadata[LINEAGE_KEY]
    assert info.created_by["checkpoint_sha256"].encode() in lineage and info.fingerprint.encode() in lineage


def test_bad_samples_become_errors_rows_and_the_others_are_stored(heads_store, corpus):
    result, out = heads_store
    store = FeatureStore(str(out))
    assert [list(r.shard_index) for r in store.iter_shard(EXTRA)] == [[0, 2, 4]]
    errors = store.shard_errors(EXTRA)
    assert errors.schema.remove_metadata() == ERRORS
    assert [(r["key"], r["stage"]) for r in errors.to_pylist()] == [("x001", "image"), ("x003", "caption")]
    # The same rows `ecif-ray score` writes: the project's reader, its stages and messages.
    _, expected = read_shard(list_shards(str(corpus / EXTRA))[0])
    assert _unaddressed(errors.column("message").to_pylist()) == _unaddressed(e.message for e in expected)
    assert store.errors().num_rows == 2
    assert result.errors_by_stage == {"image": 1, "caption": 1} and result.exit_code == EXIT_INPUT_ERRORS


def test_reruns_skip_committed_shards_and_another_trunk_is_refused(heads_store, heads_ckpt, lora_ckpt, corpus,
                                                                   micro_pretrained, digits_corpus, tmp_path, capsys):
    from ecif_ray.training import TrainConfig, train

    first, out = heads_store
    files = sorted((out / "features").glob("*.parquet")) + sorted((out / "_state" / "shards").glob("*.json"))
    stamps = [f.stat().st_mtime_ns for f in files]
    again = run_features(FeatureJob(ckpt=str(heads_ckpt), train=str(corpus), out=str(out), workers=2, progress=False))
    assert not again.written and sorted(again.skipped) == sorted(first.written) and again.feature_s == 0
    assert [f.stat().st_mtime_ns for f in files] == stamps

    # Another fine-tune of the heads on the same frozen base has the same trunk: the store is reused.
    other = train(TrainConfig(train=str(digits_corpus / "train"), init=str(micro_pretrained), params={"kind": "heads"},
                              segment_size=16, epochs=1, lr=2e-2, delta=1e-2, seed=7, out=str(tmp_path / "heads2"),
                              progress=False))
    reused = run_features(FeatureJob(ckpt=str(other), train=str(corpus), out=str(out), progress=False))
    assert reused.fingerprint == first.fingerprint and len(reused.skipped) == 3 and not reused.written

    # A LoRA checkpoint cuts the towers elsewhere: refused before any cluster work, naming both fingerprints.
    with pytest.raises(FeatureStoreMismatch) as refused:
        run_features(FeatureJob(ckpt=str(lora_ckpt), train=str(corpus), out=str(out), progress=False))
    message = str(refused.value)
    assert str(out) in message and first.fingerprint in message and "trunk: 'image: pooled, text: pooled'" in message
    assert main(["features", "--ckpt", str(lora_ckpt), "--train", str(corpus), "--out", str(out),
                 "--no-progress"]) == EXIT_BAD_CONFIG
    assert "holds the trunk features of another trunk" in capsys.readouterr().err
    with pytest.raises(FeatureStoreMismatch, match=first.fingerprint):
        open_store(str(out), fingerprint="0" * 64)


def test_one_worker_writes_the_same_store_as_two(heads_store, heads_ckpt, corpus, tmp_path):
    two, out = heads_store
    one = run_features(FeatureJob(ckpt=str(heads_ckpt), train=str(corpus), out=str(tmp_path / "one"), workers=1,
                                  progress=False))
    assert one.fingerprint == two.fingerprint
    a, b = FeatureStore(str(out)), FeatureStore(str(tmp_path / "one"))
    assert a.shards() == b.shards()
    for shard in a.shards():
        assert a.read_shard(shard).replace_schema_metadata(None).equals(
            b.read_shard(shard).replace_schema_metadata(None))
        errors_a, errors_b = a.shard_errors(shard).to_pylist(), b.shard_errors(shard).to_pylist()
        assert [{**r, "message": ""} for r in errors_a] == [{**r, "message": ""} for r in errors_b]
        assert _unaddressed(r["message"] for r in errors_a) == _unaddressed(r["message"] for r in errors_b)


def test_lora_block_features_and_a_shard_the_storage_does_not_deliver(ray_cluster, lora_ckpt, corpus, tmp_path):
    """LoRA's block-cut features (float32, with the token ids its text tail pools by) equal the task's; a
    shard that cannot be read is retried, then reported as one errors row, left uncommitted, exit 4."""
    missing = tmp_path / "gone" / "missing-000000.tar"
    out = tmp_path / "lora"
    result = run_features(FeatureJob(ckpt=str(lora_ckpt), train=[str(corpus / "*.tar"), str(missing)], out=str(out),
                                     workers=1, max_attempts=2, retry_backoff_s=0, progress=False))
    assert sorted(result.written) == sorted(s.name for s in list_shards(str(corpus)))
    assert list(result.failed) == [missing.name] and result.exit_code == EXIT_INCOMPLETE
    store = FeatureStore(str(out))
    info = store.info()
    assert info is not None and [(c.name, c.shape, c.dtype) for c in info.columns] == [
        ("image_features", (17, 32), "float32"), ("text_features", (16, 32), "float32"), ("tokens", (16,), "int64")]
    assert info.bytes_per_pair == 4352
    task, arch = _task(lora_ckpt, torch.float32)
    assert trunk_fingerprint(task_identity(task, arch)) == info.fingerprint
    _assert_store_is_the_in_process_trunk(store, task, corpus, load_checkpoint(lora_ckpt).meta.segment_size)

    assert store.record(missing.name) is None and missing.name not in store.shards()
    [row] = [r for r in store.errors().to_pylist() if r["stage"] == "features"]
    assert row["shard"] == missing.name and "failed 2 times" in row["message"]

    # The LoRA tail (the last block, pooling by the stored token ids) gives the embeddings: the committed
    # shards only, and the scorer's CLIP score (float32: to float32 rounding).
    from ecif_ray.pipeline.embeddings import EmbeddingJob, run_embeddings

    embedded = run_embeddings(EmbeddingJob(ckpt=str(lora_ckpt), features=str(out), progress=False))
    assert embedded.pairs_written == result.pairs and missing.name not in embedded.written
    got = {(r["shard"], r["key"]): r["clip_score"] for r in FeatureStore(str(out)).files.read_table(
        FeatureStore.embeddings_file(embedded.checkpoint_id, EXTRA)).to_pylist()}
    [batch] = load_segments(str(corpus / EXTRA), segment_size=16, preprocess=task.bundle.preprocess,
                            tokenizer=task.bundle.tokenizer)[0]
    with torch.no_grad():
        diagonal = torch.diagonal(task.similarity_fn(batch)(task.params))
    assert [got[(EXTRA, k)] for k in batch.keys] == pytest.approx(diagonal.tolist(), rel=1e-5, abs=1e-5)


def test_a_store_on_s3_written_by_the_actor_class_in_process(s3_bucket, heads_ckpt, corpus):
    """The actor class without Ray, shards and store on S3 (moto): streamed temp object moved into place,
    the store's lease and records on S3, rows read back in order."""
    first = next(path for path in sorted(corpus.glob("*.tar")) if path.name != EXTRA)  # 64 pairs
    shards = [s3_bucket.put(first, f"corpus/{first.name}")]
    so = s3_bucket.storage_options
    job = FeatureJob(ckpt=str(heads_ckpt), train=shards, out=f"{s3_bucket.url}/store", storage_options=so,
                     progress=False)
    prep = prepare_features(job)
    with RunLease.acquire(prep.store.files, prep.info.store_id):
        info = prep.store.open(prep.info)
        featurizer = ShardFeaturizer(checkpoint_files(prep.checkpoint_dir), featurizer_settings(prep, info))
        out = featurizer({"shard": np.array([s.name for s in prep.shards]),
                          "url": np.array([s.url for s in prep.shards])})
    assert list(out["status"]) == ["ok"] and out["bytes"][0] > 0
    store = open_store(f"{s3_bucket.url}/store", so, fingerprint=info.fingerprint)
    [shard] = store.shards()
    rows = list(store.iter_shard(shard, 16))
    assert [len(r) for r in rows] == [16] * 4 and all(r.arrays["image_features"].shape == (16, 32) for r in rows)
    assert not prep.store.files.temp_files() and store.completed([shard]).keys() == {shard}


# -- reading the store: `ecif-ray score --features` and the engine -----------------------------------

def _run_tables(run_dir: Path) -> dict[str, list[dict]]:
    """Every table of a run as rows sorted by identity, error messages without memory addresses."""
    from ecif_ray.tables import connect

    con = connect(str(run_dir))
    order = {"scores": "query, shard, key", "trace": "query_id, rank"}
    tables = {name: con.sql(f"SELECT * FROM {name} ORDER BY {order.get(name, 'shard, key')}").to_arrow_table()
              for name in ("pairs", "scores", "errors", "trace")}
    rows = {name: t.to_pylist() for name, t in tables.items()}
    for row in rows["errors"]:
        row["message"] = _unaddressed([row["message"]])[0]
    return rows


def _assert_same_rows(a: list[dict], b: list[dict], rel: float = 1e-9) -> None:
    assert len(a) == len(b) and a
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for name, value in x.items():
            if isinstance(value, float):
                assert y[name] == pytest.approx(value, rel=rel, abs=1e-300), name
            else:
                assert y[name] == value, name


def test_score_from_the_store_equals_score_from_the_images(heads_store, scored_config, corpus, tmp_path):
    """Curvature, scoring, queries, trace-back and exclusions over the stored features give the image
    run's tables (float64 ≤ 1e-9 relative; the same batches, so in fact bit for bit), the store's bad
    samples included; the store is not part of the run's identity, so either run resumes the other."""
    from ecif_ray.pipeline import run_score
    from ecif_ray.tables import read_manifest

    _, store = heads_store
    first = sorted(s for s in FeatureStore(str(store)).shards() if s != EXTRA)[0]
    keys = [k for rows in FeatureStore(str(store)).iter_shard(first, 16) for k in rows.keys]
    exclude = tmp_path / "exclude.csv"
    exclude.write_text("".join(f"{first},{k}\n" for k in (keys[3], keys[17], keys[40])))
    common = dict(train=str(corpus), exclude=str(exclude))
    images = run_score(scored_config(tmp_path / "images", **common))
    stored = run_score(scored_config(tmp_path / "stored", features=str(store), **common))
    assert images.exit_code == stored.exit_code == EXIT_INPUT_ERRORS  # the bad samples of EXTRA
    a, b = _run_tables(tmp_path / "images"), _run_tables(tmp_path / "stored")
    for name in ("pairs", "scores", "trace"):
        _assert_same_rows(a[name], b[name])
    assert a["errors"] == b["errors"] and {r["key"] for r in b["errors"]} == {"x001", "x003"}
    assert len(b["pairs"]) == 131 - 3 and not {(first, k) for k in (keys[3], keys[17], keys[40])} & {
        (r["shard"], r["key"]) for r in b["pairs"]}
    ma, mb = read_manifest(RunStore(str(tmp_path / "images"))), read_manifest(RunStore(str(tmp_path / "stored")))
    assert ma.fingerprint == mb.fingerprint and ma.curvature["sample"] == mb.curvature["sample"]
    assert ma.solver["iterations"] == mb.solver["iterations"] and mb.config["features"] == str(store)

    # The CLI flag, resuming the image run from the store: nothing left to do, same fingerprint.
    yaml_file = tmp_path / "images.yaml"
    yaml_file.write_text(yaml.safe_dump(scored_config(tmp_path / "images", **common).model_dump(mode="json")))
    assert main(["score", "--config", str(yaml_file), "--features", str(store)]) == EXIT_INPUT_ERRORS
    resumed = read_manifest(RunStore(str(tmp_path / "images")))
    assert resumed.counts["shards_skipped"] == 3 and resumed.counts["shards_scored"] == 0


def test_the_engine_reads_the_store_and_scores_as_from_the_images(heads_store, heads_ckpt, corpus, digits_corpus):
    from ecif_ray.influence.engine import ECIF
    from ecif_ray.influence.queries import ValidationQuery

    _, store = heads_store
    results = []
    for features in (None, str(store)):
        engine = ECIF.from_checkpoint(str(heads_ckpt), str(corpus), curvature_segments=4, features=features)
        directions = engine.solve(ValidationQuery(engine.load(str(digits_corpus / "val"))), misalignment="auto")
        results.append((engine, engine.score(engine.train_batches, directions).to_pylist()))
    (from_images, a), (from_store, b) = results
    assert all(batch.images.numel() == 0 for batch in from_store.train_batches)  # no pixels were read
    assert from_images.task.n_train == from_store.task.n_train
    _assert_same_rows(a, b)


def test_embeddings_of_a_checkpoint_from_the_store_with_sql_views(heads_store, heads_ckpt, lora_ckpt, corpus, tmp_path,
                                                                  capsys):
    """``ecif-ray embeddings`` writes the checkpoint's normalised embeddings and s·û·v̂ of every stored pair
    (what the scorer's similarity matrix has on its diagonal, from the images), resumes, refuses another
    trunk, and ``ecif-ray sql STORE`` queries the store's views."""
    import json
    import shutil

    _, original = heads_store
    store = tmp_path / "store"
    shutil.copytree(original, store)  # the module's store stays as the other tests expect it
    assert main(["embeddings", "--ckpt", str(heads_ckpt), "--features", str(store), "--no-progress", "--json",
                 "--batch-size", "7"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["shards_written"] == 3 and result["pairs_written"] == 131 and result["dim"] == 16

    task, _ = _task(heads_ckpt, torch.float64)
    bundle = task.bundle
    batches, _ = load_segments(str(corpus), segment_size=16, preprocess=bundle.preprocess, tokenizer=bundle.tokenizer)
    from ecif_ray.tables import connect

    table = connect(str(store)).sql("SELECT * FROM embeddings ORDER BY shard, shard_index").to_arrow_table()
    assert set(table.column("checkpoint").to_pylist()) == {result["checkpoint_id"]}
    stored = {(row["shard"], row["key"]): row for row in table.to_pylist()}
    assert len(stored) == 131
    for batch in batches:
        image, text = task.embeddings(task.features(batch), task.params)
        diagonal = torch.diagonal(task.similarity_fn(batch)(task.params))
        for i, key in enumerate(batch.keys):
            row = stored[(batch.shard, key)]
            assert row["clip_score"] == pytest.approx(float(diagonal[i]), rel=1e-12)
            assert np.allclose(row["image_embedding"], image[i].numpy(), rtol=1e-6, atol=1e-7)
            assert np.allclose(row["text_embedding"], text[i].numpy(), rtol=1e-6, atol=1e-7)
            assert np.linalg.norm(row["image_embedding"]) == pytest.approx(1.0, rel=1e-6)

    # A rerun has nothing to do; a lost file is rewritten; another trunk is refused, naming the store.
    lost = next((store / "embeddings" / f"checkpoint={result['checkpoint_id']}").glob("*.parquet"))
    lost.unlink()
    assert main(["embeddings", "--ckpt", str(heads_ckpt), "--features", str(store), "--no-progress", "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["shards_written"] == 1 and again["shards_skipped"] == 2 and lost.exists()
    assert main(["embeddings", "--ckpt", str(lora_ckpt), "--features", str(store), "--no-progress"]) == EXIT_BAD_CONFIG
    assert "another trunk" in capsys.readouterr().err

    # SQL over the store: CLIP-score filtering, the features and errors views, nearest neighbours (dedup).
    median = float(np.median([r["clip_score"] for r in stored.values()]))
    query = (f"SELECT (SELECT count(*) FROM embeddings WHERE clip_score < {median!r}) AS below, "
             "(SELECT count(*) FROM features) AS features, (SELECT count(*) FROM errors) AS errors")
    assert main(["sql", str(store), query, "--format", "json"]) == 0
    [counts] = json.loads(capsys.readouterr().out)
    assert counts == {"below": sum(r["clip_score"] < median for r in stored.values()), "features": 131, "errors": 2}
    nearest = ("SELECT a.shard, a.key, max(list_cosine_similarity(a.image_embedding, b.image_embedding)) AS cos "
               "FROM embeddings a JOIN embeddings b ON (a.shard, a.key) <> (b.shard, b.key) GROUP BY ALL")
    assert main(["sql", str(store), nearest, "--format", "json"]) == 0
    vectors = np.array([r["image_embedding"] for r in stored.values()], np.float64)
    cosine = vectors @ vectors.T
    np.fill_diagonal(cosine, -np.inf)
    want = dict(zip(stored, cosine.max(axis=1)))
    got = {(r["shard"], r["key"]): r["cos"] for r in json.loads(capsys.readouterr().out)}
    assert got.keys() == want.keys() and all(got[k] == pytest.approx(want[k], abs=1e-5) for k in want)
    assert main(["sql", str(store), "COPY embeddings TO 'x.csv'"]) == EXIT_BAD_CONFIG  # read-only as for runs
    documented = re.findall(r'ecif-ray sql corpus/features-ft "(.*?)"', DOCS.read_text(), flags=re.S)
    assert len(documented) == 2
    for query in documented:
        assert main(["sql", str(store), query, "--format", "json"]) == 0
        assert json.loads(capsys.readouterr().out)

    # A damaged features file: that shard is reported by name (exit 4), the others are written.
    damaged = tmp_path / "damaged"
    shutil.copytree(original, damaged)
    bad = next(p for p in (damaged / "features").glob("*.parquet") if EXTRA not in p.name)
    bad.write_bytes(bad.read_bytes()[:200])
    assert main(["embeddings", "--ckpt", str(heads_ckpt), "--features", str(damaged), "--no-progress"]) \
        == EXIT_INCOMPLETE
    err = capsys.readouterr().err
    assert bad.name.removesuffix(".parquet") in err and "ArrowInvalid" in err
    partition = damaged / "embeddings" / f"checkpoint={result['checkpoint_id']}"
    assert sorted(p.name for p in partition.glob("*.parquet")) == sorted(
        p.name for p in (damaged / "features").glob("*.parquet") if p != bad)


def test_a_store_that_does_not_fit_the_run_is_refused_before_any_cluster(heads_store, score_config, lora_ckpt,
                                                                        corpus, digits_corpus, tmp_path, capsys):
    from ecif_ray.pipeline.prepare import prepare

    _, store = heads_store
    with pytest.raises(ValueError, match="another trunk"):  # a LoRA checkpoint cuts the towers elsewhere
        prepare(score_config(tmp_path / "a", ckpt=str(lora_ckpt), train=str(corpus), features=str(store)))
    with pytest.raises(ValueError, match=r"lacks \d+ of the \d+ train shards \(e.g. val-") as lacking:
        prepare(score_config(tmp_path / "b", train=[str(corpus / "*.tar"), str(digits_corpus / "val" / "*.tar")],
                             features=str(store)))
    assert "ecif-ray features" in str(lacking.value)
    with pytest.raises(ValueError, match="not a feature store"):
        prepare(score_config(tmp_path / "c", train=str(corpus), features=str(tmp_path)))
    assert main(["score", "--ckpt", "x", "--train", str(corpus), "--queries", "task", "--test", str(corpus),
                 "--out", str(tmp_path / "d"), "--features", str(store), "--reference", "x",
                 "--no-progress"]) == EXIT_BAD_CONFIG
    assert "reference" in capsys.readouterr().err
