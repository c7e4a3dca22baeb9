"""The tables package without Ray: schemas, atomic writes, commit records, manifest, DuckDB views,
on a local directory and on S3 (moto server on loopback)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from ecif_ray.tables import (
    PAIRS,
    FileRecord,
    Manifest,
    NotARunDirectory,
    RunStore,
    ShardRecord,
    connect,
    read_manifest,
    write_manifest,
)
from ecif_ray.tables.misalignment import with_misalignment
from ecif_ray.tables.schema import conform, empty
from ecif_ray.tables.store import MANIFEST

RUN = "r1"


def pair_rows(shard: str, n: int) -> dict[str, list]:
    return {"shard": [shard] * n, "key": [f"k{i:03d}" for i in range(n)], "shard_index": list(range(n)),
            "segment": [i // 4 for i in range(n)], "caption": [f"a photo of {i}." for i in range(n)],
            "clip_score": [float(i) for i in range(n)], "loss": [1.0] * n, "query": ["val"] * n,
            "pos_is": [float(i) for i in range(n)], "neg_is": [0.5] * n, "ecif_is": [i + 0.5 for i in range(n)]}


def error_rows(shard: str) -> dict[str, list]:
    return {"shard": [shard], "key": ["bad"], "stage": ["caption"], "error": ["EmptyCaption"], "message": ["empty"]}


def manifest(run_id: str = RUN) -> Manifest:
    return Manifest(run_id=run_id, fingerprint="f" * 64, score_inputs={"negative_term": "exact"}, config={},
                    checkpoint={"sha256": "c" * 64, "arch": "ecif-micro", "param_subset": "heads", "delta": 0.01,
                                "n_train": 128}, queries=["val"], primary_query="val",
                    solver={"iterations": 12, "converged": True, "relative_residual": {"val": 3e-7}},
                    counts={"shards": 2, "pairs": 10, "errors": 1})


def write_run(store: RunStore, run_id: str = RUN) -> dict[str, ShardRecord]:
    """A small committed run: two shards of pairs, one errors file."""
    write_manifest(store, manifest(run_id))
    records = {}
    for shard, n in (("a.tar", 6), ("b.tar", 4)):
        files = [store.write_table("pairs", run_id, shard, pair_rows(shard, n), {"run_id": run_id, "delta": 0.01})]
        if shard == "b.tar":
            files.append(store.write_table("errors", run_id, shard, error_rows(shard), {"run_id": run_id}))
        records[shard] = ShardRecord(shard=shard, run_id=run_id, fingerprint="f" * 64, files=files, pairs=n,
                                     errors=len(files) - 1)
        store.commit_shard(records[shard])
    return records


def test_manifest_without_memory_still_loads(tmp_path):
    """Manifests written before peak memory was recorded (no ``memory`` key) load for a resume."""
    store = RunStore(str(tmp_path))
    data = manifest().model_dump(mode="json")
    del data["memory"]
    store.put_json(MANIFEST, data)
    loaded = read_manifest(store)
    assert loaded is not None and loaded.memory == {} and loaded.memory.get("workers", []) == []


def test_conform_casts_and_refuses_wrong_columns():
    rows = pair_rows("a.tar", 3)
    rows["shard_index"] = [0.0, 1.0, 2.0]  # floats become the schema's int64
    table = conform("pairs", rows)
    assert table.schema == PAIRS
    del rows["caption"]
    with pytest.raises(ValueError, match="pairs: columns"):
        conform("pairs", rows)
    assert "run_id" in empty("errors").column_names and empty("errors").num_rows == 0


def test_put_is_atomic_and_leaves_no_temp_files(tmp_path, monkeypatch):
    store = RunStore(str(tmp_path))
    store.put("x/file.bin", b"old")
    store.put("x/file.bin", b"new")
    assert store.get("x/file.bin") == b"new"

    def broken_move(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(store.fs, "mv", broken_move)
    with pytest.raises(OSError, match="disk full"):
        store.put("x/file.bin", b"partial")
    assert store.get("x/file.bin") == b"new"
    assert [p.name for p in (tmp_path / "x").iterdir()] == ["file.bin"]


def test_write_table_records_rows_and_lineage(tmp_path):
    store = RunStore(str(tmp_path))
    record = store.write_table("pairs", RUN, "a.tar", pair_rows("a.tar", 5), {"checkpoint_sha256": "abc"})
    assert record == FileRecord("pairs", f"pairs/run_id={RUN}/a.tar.parquet", 5)
    assert store.parquet_rows(record.path) == 5
    lineage = store.lineage(record.path)
    assert lineage["checkpoint_sha256"] == "abc" and lineage["run_id"] == RUN and lineage["shard"] == "a.tar"
    assert "run_id" not in pq.read_schema(tmp_path / record.path).names


def test_completed_shards_checks_records_and_files(tmp_path):
    store = RunStore(str(tmp_path))
    records = write_run(store)
    assert set(store.completed_shards(["a.tar", "b.tar", "c.tar"], "f" * 64)) == {"a.tar", "b.tar"}
    assert store.completed_shards(["a.tar"], "other") == {}  # another fingerprint's commit does not count
    path = tmp_path / records["a.tar"].files[0].path
    path.write_bytes(path.read_bytes()[:-50])  # torn file: footer gone
    (tmp_path / records["b.tar"].files[1].path).unlink()  # a listed file is missing
    assert store.completed_shards(["a.tar", "b.tar"], "f" * 64) == {}
    assert ShardRecord.from_json(json.loads(json.dumps(records["a.tar"].to_json()))) == records["a.tar"]


def test_views_over_a_local_run(tmp_path):
    store = RunStore(str(tmp_path / "run"))
    write_run(store)
    con = connect(str(tmp_path / "run"))
    assert con.sql("SELECT count(*), count(DISTINCT (shard, key)) FROM pairs").fetchall() == [(10, 10)]
    assert con.sql("SELECT DISTINCT run_id FROM pairs").fetchall() == [(RUN,)]
    assert con.sql("SELECT shard, key, stage FROM errors").fetchall() == [("b.tar", "bad", "caption")]
    assert con.sql("SELECT count(*) FROM scores").fetchall() == [(0,)]  # no files yet: empty, typed
    assert "relative_is" in con.sql("SELECT * FROM trace").columns
    run = con.sql("SELECT run_id, status, checkpoint_sha256, solver_max_residual, pairs FROM runs").fetchall()
    assert run == [(RUN, "running", "c" * 64, 3e-7, 10)]
    assert con.sql("SELECT key FROM pairs ORDER BY ecif_is DESC LIMIT 1").fetchall() == [("k005",)]


def test_views_span_a_directory_of_runs(tmp_path):
    write_run(RunStore(str(tmp_path / "runs" / "one")), "one")
    write_run(RunStore(str(tmp_path / "runs" / "two")), "two")
    (tmp_path / "runs" / "notes").mkdir()  # not a run: ignored
    con = connect(str(tmp_path / "runs"))
    assert con.sql("SELECT run_id, count(*) FROM pairs GROUP BY run_id ORDER BY run_id").fetchall() == [
        ("one", 10), ("two", 10)]
    assert con.sql("SELECT count(*) FROM runs").fetchall() == [(2,)]
    with pytest.raises(NotARunDirectory):
        connect(str(tmp_path / "runs" / "notes"))


def test_run_on_s3(s3_bucket):
    url = f"{s3_bucket.url}/runs/r1"
    store = RunStore(url, s3_bucket.storage_options)
    assert store.is_empty()
    records = write_run(store)
    assert read_manifest(store).run_id == RUN
    keys = s3_bucket.fs.find(url)
    assert not [k for k in keys if k.endswith(".tmp")]
    assert set(store.completed_shards(["a.tar", "b.tar"], "f" * 64)) == {"a.tar", "b.tar"}
    s3_bucket.fs.pipe_file(f"{url}/{records['a.tar'].files[0].path}", b"PAR1 not parquet")
    assert set(store.completed_shards(["a.tar", "b.tar"], "f" * 64)) == {"b.tar"}

    store.write_table("pairs", RUN, "a.tar", pair_rows("a.tar", 6), {})  # repaired
    con = connect(url, s3_bucket.storage_options)
    assert con.sql("SELECT count(*), sum(ecif_is) FROM pairs").fetchall() == [(10, pytest.approx(26.0))]
    assert con.sql("SELECT DISTINCT run_id FROM pairs").fetchall() == [(RUN,)]
    assert con.sql("SELECT count(*) FROM errors").fetchall() == [(1,)]
    assert con.sql("SELECT run_dir FROM runs").fetchall() == [(url,)]


def test_misalignment_is_a_per_run_rank_mean_using_the_reference_when_present(tmp_path):
    """misalignment = ½ (percentile of misalignment_pos_is + percentile of −similarity) within each run;
    similarity = reference_clip_score when the run has one, else clip_score; NULL without the column's input."""
    n = 8
    influence = [0.3, -1.0, 2.0, 0.1, 0.0, 5.0, -0.2, 1.5]
    clip = [3.0, 1.0, 0.5, 2.0, 4.0, 0.1, 2.5, 1.2]
    reference = [0.2, 0.9, 0.1, 0.8, 0.3, 0.7, 0.4, 0.6]
    for run_id, ref in (("own", None), ("ref", reference), ("old", None)):
        store = RunStore(str(tmp_path / "runs" / run_id))
        write_manifest(store, manifest(run_id))
        rows = {**pair_rows("a.tar", n), "clip_score": clip}
        if run_id != "old":  # a run whose files predate the column: misalignment is NULL
            rows["misalignment_pos_is"] = influence
        if ref is not None:
            rows["reference_clip_score"] = ref
        store.write_table("pairs", run_id, "a.tar", rows, {"run_id": run_id})
    con = connect(str(tmp_path / "runs"))

    def percentile(values: list[float]) -> np.ndarray:
        return np.array([sum(v <= x for v in values) for x in values]) / len(values)

    for run_id, similarity in (("own", clip), ("ref", reference)):
        got = [v for (v,) in con.execute("SELECT misalignment FROM pairs WHERE run_id = ? ORDER BY key",
                                         [run_id]).fetchall()]
        want = (percentile(influence) + percentile([-s for s in similarity])) / 2
        np.testing.assert_allclose(got, want, rtol=1e-12)
        in_memory = with_misalignment(pq.read_table(tmp_path / "runs" / run_id / "pairs"))
        np.testing.assert_allclose(in_memory["misalignment"].to_numpy(), want, rtol=1e-12)
    assert con.sql("SELECT count(misalignment) FROM pairs WHERE run_id = 'old'").fetchall() == [(0,)]
