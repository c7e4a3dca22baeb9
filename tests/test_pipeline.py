"""The scoring pipeline on a real local Ray cluster: equality with the single-process engine,
independence of the worker count, lineage, resume and refusal, S3 in and out, the CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from ecif_ray.cli import main
from ecif_ray.config import ScoreConfig
from ecif_ray.influence.curvature import DEFAULT_SOLVER, SolverSettings
from ecif_ray.influence.engine import ECIF
from ecif_ray.influence.queries import MISALIGNMENT_QUERY, ExampleQuery, ValidationQuery, ZeroShotQuery
from ecif_ray.influence.traceback import mispredicted
from ecif_ray.models.checkpoint import checkpoint_fingerprint
from ecif_ray.models.zeroshot import find_classes
from ecif_ray.pipeline import EXIT_OK, RunMismatch, run_score
from ecif_ray.tables import RunStore, connect, read_manifest

SCORE_COLUMNS = ("clip_score", "loss", "pos_is", "neg_is", "ecif_is")


def table(run_dir: str | Path, name: str, storage_options: dict | None = None) -> pa.Table:
    """All rows of one table, sorted by identity (what a reader sees, run_id included)."""
    order = {"scores": "query, shard, key", "trace": "query_id, rank"}.get(name, "shard, key")
    return connect(str(run_dir), storage_options).sql(f"SELECT * FROM {name} ORDER BY {order}").to_arrow_table()


@pytest.fixture(scope="module")
def one_worker_run(scored_run, scored_config, tmp_path_factory):
    """The same run with one worker, and with every distributed G·V fetched one group at a time (the
    partials' memory bound set to 1 byte); ``chunks`` records the groups asked for per fetch."""
    from ecif_ray.pipeline import solve

    chunks: list[int] = []
    fetch = solve.DistributedCurvature._partials

    def recorded(self, groups, vectors):
        chunks.append(len(groups))
        return fetch(self, groups, vectors)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(solve, "PARTIALS_BYTES", 1)
        patch.setattr(solve.DistributedCurvature, "_partials", recorded)
        result = run_score(scored_config(tmp_path_factory.mktemp("runs") / "one-worker", workers=1))
    result.chunks = chunks
    return result


def test_run_scores_every_pair_once(scored_run):
    assert scored_run.exit_code == EXIT_OK
    pairs = table(scored_run.out, "pairs")
    assert pairs.num_rows == 128
    identities = set(zip(pairs["shard"].to_pylist(), pairs["key"].to_pylist()))
    assert len(identities) == 128
    assert set(pairs["run_id"].to_pylist()) == {scored_run.run_id}
    assert set(pairs["query"].to_pylist()) == {"val"}
    scores = table(scored_run.out, "scores")
    assert scores.num_rows == 128 and set(scores["query"].to_pylist()) == {"task"}
    assert table(scored_run.out, "errors").num_rows == 0
    ecif = pairs["ecif_is"].to_numpy()
    assert (ecif == pairs["pos_is"].to_numpy() + pairs["neg_is"].to_numpy()).all()
    assert len(scored_run.top) == 10 and scored_run.top[0]["ecif_is"] == ecif.max()


def test_scores_are_identical_for_one_and_two_workers(scored_run, one_worker_run):
    """Partials are summed in group order, so neither the worker count nor fetching them a chunk at a
    time changes a bit."""
    assert set(one_worker_run.chunks) == {1} and len(one_worker_run.chunks) > 1
    for name in ("pairs", "scores", "trace"):
        assert table(scored_run.out, name).equals(table(one_worker_run.out, name))
    two, one = (Path(r.out) / "directions/directions.safetensors" for r in (scored_run, one_worker_run))
    assert two.read_bytes() == one.read_bytes()


def test_scores_equal_the_single_process_engine(scored_run, heads_ckpt, digits_corpus):
    """The notebook engine on the same inputs: ``ECIF.from_checkpoint`` draws the same curvature
    sample with the same planner, and its directions, scores and trace-back equal the run's."""
    engine = ECIF.from_checkpoint(str(heads_ckpt), str(digits_corpus / "train"), curvature_segments=4,
                                  solver=SolverSettings(preconditioner="nystrom", nystrom_rank=128))
    meta = json.loads((Path(scored_run.out) / "directions/directions.json").read_text())
    assert [{"shard": g[0].shard, "segments": [b.segment for b in g]} for g in engine.curvature] == [
        {"shard": g["shard"], "segments": g["segments"]} for g in meta["curvature"]["sample"]]
    assert engine.curvature_pairs == 64
    test = engine.load(str(digits_corpus / "test"), segment_size=256)
    classes = find_classes(str(digits_corpus / "test"))
    wrong = ExampleQuery(mispredicted(engine.task, test, classes, limit=4), classes)
    directions = engine.solve(ValidationQuery(engine.load(str(digits_corpus / "val"))),
                              ZeroShotQuery(test, classes, name="task"), wrong, misalignment="auto")
    assert directions.converged and directions.names[2:-1] == meta["traced"] and len(meta["traced"]) == 4
    assert directions.names[-1] == MISALIGNMENT_QUERY == meta["names"][2]  # the run's: after the named queries
    want = engine.score(engine.train_batches, directions).to_pandas()
    pairs = pq.read_table(Path(scored_run.out) / "pairs").to_pandas()  # file order = shard, segment order
    scores = pq.read_table(Path(scored_run.out) / "scores").to_pandas()
    val, task = (want[want["query"] == name] for name in directions.names[:2])
    assert pairs["key"].tolist() == val["key"].tolist() == task["key"].tolist()
    for name in (*SCORE_COLUMNS, "misalignment_pos_is"):
        close(pairs[name].to_numpy(), torch.tensor(val[name].to_numpy()))
    close(scores["ecif_is"].to_numpy(), torch.tensor(task["ecif_is"].to_numpy()))
    assert set(scores["query"]) == {"task"}  # the misalignment direction is a column, not a query
    ranked = connect(scored_run.out).sql("SELECT key, misalignment FROM pairs ORDER BY shard, shard_index").df()
    np.testing.assert_allclose(ranked["misalignment"].to_numpy(), val["misalignment"].to_numpy(), atol=1e-12)

    trace = table(scored_run.out, "trace").to_pylist()
    expected = engine.trace(test, classes, top_k=3, max_examples=4, rank=64).to_pylist()

    def ids(rows: list[dict]) -> list[tuple]:
        return [(r["query_id"], r["rank"], r["shard"], r["key"]) for r in rows]

    assert ids(trace) == ids(expected) and len(trace) == 4 * 3
    for column in ("relative_is", "ecif_is"):
        close([r[column] for r in trace], torch.tensor([r[column] for r in expected]))


def close(got, want: torch.Tensor) -> None:
    """Equal within 1e-5 relative (to the largest magnitude, for entries near zero)."""
    torch.testing.assert_close(torch.tensor(np.asarray(got), dtype=want.dtype), want, rtol=1e-5,
                               atol=1e-5 * float(want.abs().max()))


def test_lineage_in_manifest_and_parquet_metadata(scored_run, heads_ckpt):
    store = RunStore(scored_run.out)
    manifest = read_manifest(store)
    assert manifest.status == "complete" and manifest.run_id == scored_run.run_id
    assert manifest.checkpoint["sha256"] == checkpoint_fingerprint(heads_ckpt)
    assert manifest.checkpoint["param_subset"] == "heads" and manifest.checkpoint["delta"] == 1e-2
    assert manifest.queries == ["val", "task"] and manifest.primary_query == "val"
    tol = DEFAULT_SOLVER.tolerance(torch.float64)  # the float64 default, recorded as resolved
    assert manifest.solver["converged"] and manifest.solver["tol"] == tol
    assert max(manifest.solver["relative_residual"].values()) <= tol
    assert manifest.solver["delta"] == 1e-2  # damping "exact": the checkpoint's training δ
    damping = manifest.solver["damping"]
    assert {k: damping[k] for k in ("rule", "training_delta", "delta", "misalignment_rule")} == {
        "rule": "exact", "training_delta": 1e-2, "delta": 1e-2, "misalignment_rule": "auto"}
    assert damping["misalignment_delta"] >= 1e-2  # 0.1 × λ₁(G), never below the analysis δ
    assert manifest.curvature["segments"] == 4 and manifest.curvature["pairs"] == 64
    assert manifest.counts["pairs"] == 128 and manifest.counts["errors"] == 0
    assert {"startup_s", "curvature_s", "scoring_s", "total_s"} <= set(manifest.timings)
    workers = manifest.memory["workers"]
    assert len(workers) == 2 and all(0 < w["ready_peak_rss_bytes"] <= w["peak_rss_bytes"] and w["pid"]
                                     for w in workers)
    assert manifest.memory["driver_peak_rss_bytes"] > 0
    assert manifest.code_version and "storage_options" in manifest.config

    files = sorted(Path(scored_run.out, "pairs", f"run_id={scored_run.run_id}").glob("*.parquet"))
    assert [f.name for f in files] == ["train-000000.tar.parquet", "train-000001.tar.parquet"]
    lineage = store.lineage(f"pairs/run_id={scored_run.run_id}/{files[0].name}")
    assert lineage["checkpoint_sha256"] == manifest.checkpoint["sha256"]
    assert lineage["negative_term"] == "exact" and lineage["delta"] == 1e-2
    assert lineage["solver"]["converged"] and lineage["curvature_segments"] == 4
    assert lineage["run_id"] == scored_run.run_id and lineage["shard"] == "train-000000.tar"
    assert "run_id" not in pq.read_schema(files[0]).names  # a Hive partition column only


def test_rerun_of_a_complete_run_does_nothing(scored_run, scored_config):
    files = sorted(Path(scored_run.out).rglob("*.parquet"))
    before = [(f, f.stat().st_mtime_ns) for f in files]
    again = run_score(scored_config(scored_run.out, workers=1))  # execution settings may change between runs
    assert again.exit_code == EXIT_OK and again.run_id == scored_run.run_id
    assert again.manifest.counts["shards_skipped"] == 2 and again.manifest.counts["shards_scored"] == 0
    assert [(f, f.stat().st_mtime_ns) for f in files] == before


def test_resume_rescores_only_a_damaged_shard_and_reuses_directions(scored_run, scored_config, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(scored_run.out, out)
    damaged = out / "pairs" / f"run_id={scored_run.run_id}" / "train-000001.tar.parquet"
    damaged.write_bytes(damaged.read_bytes()[:-100])  # a torn write: no valid footer
    result = run_score(scored_config(out))
    assert result.directions_reused
    assert set(result.manifest.counts) >= {"shards_scored"} and result.manifest.counts["shards_scored"] == 1
    assert result.manifest.counts["shards_skipped"] == 1
    for name in ("pairs", "scores", "trace"):
        assert table(out, name).equals(table(scored_run.out, name))


def test_changed_config_or_checkpoint_is_refused(scored_run, scored_config, micro_pretrained):
    with pytest.raises(RunMismatch, match="negative_term: 'exact' -> 'taylor'"):
        run_score(scored_config(scored_run.out, negative_term="taylor"))
    with pytest.raises(RunMismatch, match="checkpoint_sha256"):
        run_score(scored_config(scored_run.out, ckpt=str(micro_pretrained), n_train=128, damping=1e-2))
    with pytest.raises(RunMismatch, match="run_id"):
        run_score(scored_config(scored_run.out, run_id="other"))
    with pytest.raises(RunMismatch, match="trace"):
        run_score(scored_config(scored_run.out, trace=None))


def test_config_errors_name_the_field(tmp_path, capsys):
    with pytest.raises(ValueError, match="val"):
        ScoreConfig(ckpt="c", train="t", out="o")
    with pytest.raises(ValueError, match="curvature_segments"):
        ScoreConfig(ckpt="c", train="t", val="v", out="o", curvature_segments=0)
    (tmp_path / "job.yaml").write_text("ckpt: c\ntrain: t\nval: v\nout: o\nsolver: {tol: 2}\n")
    assert main(["score", "--config", str(tmp_path / "job.yaml")]) == 2
    assert "--tol" in capsys.readouterr().err
    (tmp_path / "typo.yaml").write_text("ckpt: c\ntrain: t\nval: v\nout: o\nworkerz: 2\n")
    assert main(["score", "--config", str(tmp_path / "typo.yaml")]) == 2
    assert "workerz" in capsys.readouterr().err
    assert main(["score", "--ckpt", str(tmp_path / "none"), "--train", "t", "--val", "v", "--out", "o"]) == 2
    assert "ckpt" in capsys.readouterr().err


def test_yaml_and_flags_merge(tmp_path):
    (tmp_path / "job.yaml").write_text("ckpt: c\ntrain: [a, b]\nval: v\nout: o\nworkers: 4\nsolver: {tol: 1.0e-4}\n")
    cfg = ScoreConfig.load(str(tmp_path / "job.yaml"), {"workers": 2, "solver": {"max_iter": 7}, "out": None})
    assert cfg.workers == 2 and cfg.out == "o" and cfg.train == ["a", "b"]
    assert cfg.solver.tol == 1e-4 and cfg.solver.max_iter == 7


def test_s3_in_and_out_through_the_cli(scored_run, s3_bucket, heads_ckpt, digits_corpus, capsys):
    for split in ("train", "val"):
        for shard in sorted((digits_corpus / split).glob("*.tar")):
            s3_bucket.put(shard, f"corpus/{split}/{shard.name}")
    out = f"{s3_bucket.url}/runs/r1"
    code = main(["score", "--ckpt", str(heads_ckpt), "--train", f"{s3_bucket.url}/corpus/train",
                 "--val", f"{s3_bucket.url}/corpus/val", "--out", out, "--workers", "2",
                 "--curvature-segments", "4", "--preconditioner", "nystrom", "--nystrom-rank", "128",
                 "--no-progress", "--storage-options", json.dumps(s3_bucket.storage_options)])
    summary = capsys.readouterr().out
    assert code == EXIT_OK, summary
    assert "128 scored" in summary and "top 10 flagged pairs" in summary
    keys = s3_bucket.fs.find(f"{s3_bucket.url}/runs/r1")
    assert not [k for k in keys if k.endswith(".tmp")]
    assert sum(k.endswith(".tar.json") for k in keys) == 2  # one commit record per shard
    # same shard ids, checkpoint and settings as the local run: the same scores
    pairs = table(out, "pairs", s3_bucket.storage_options).drop_columns(["run_id"])
    local = table(scored_run.out, "pairs").drop_columns(["run_id"])
    assert pairs.num_rows == 128
    for name in ("key", "clip_score", "loss"):
        assert pairs[name].equals(local[name])
    # the val direction was solved alone here (with the task query there): equal up to batching round-off
    torch.testing.assert_close(torch.tensor(pairs["ecif_is"].to_numpy()), torch.tensor(local["ecif_is"].to_numpy()),
                               rtol=1e-6, atol=1e-12)


def test_a_reference_model_fills_reference_clip_score(ray_cluster, score_config, micro_pretrained, digits_corpus,
                                                      tmp_path, scored_run):
    """``--reference``: each pair's CLIP score under a second model (here the clean pretrained checkpoint)
    equals that model's own s · û · v̂ computed in-process; without a reference the column is null."""
    from ecif_ray.data.samples import read_shard
    from ecif_ray.data.shards import list_shards
    from ecif_ray.models.reference import ReferenceModel

    result = run_score(score_config(tmp_path / "run", reference=str(micro_pretrained), workers=1))
    assert result.exit_code == EXIT_OK and result.manifest.score_inputs["reference"]
    got = connect(str(tmp_path / "run")).sql(
        "SELECT shard, key, reference_clip_score, clip_score FROM pairs ORDER BY shard, key").fetchall()
    reference = ReferenceModel.load(str(micro_pretrained))
    samples = sorted((s for shard in list_shards(str(digits_corpus / "train")) for s in read_shard(shard)[0]),
                     key=lambda s: (s.shard, s.key))
    want = reference.clip_scores([s.image for s in samples], [s.caption for s in samples])
    assert [(s, k) for s, k, _, _ in got] == [(s.shard, s.key) for s in samples]
    close([r for _, _, r, _ in got], want)
    assert not np.allclose([r for _, _, r, _ in got], [c for _, _, _, c in got])  # a different model's score
    nulls = connect(str(scored_run.out)).sql("SELECT count(*) FROM pairs WHERE reference_clip_score IS NULL")
    assert nulls.fetchall()[0][0] == 128
    from ecif_ray.pipeline.prepare import prepare

    with pytest.raises(ValueError, match="reference: 'no-such-model:tag' is neither"):
        prepare(score_config(tmp_path / "r2", reference="no-such-model:tag"))
