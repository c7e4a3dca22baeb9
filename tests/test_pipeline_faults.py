"""Faults on a real local Ray cluster: a worker killed mid-shard, the driver SIGKILLed mid-run, and
every kind of corrupt input. Each run must end with exactly the good samples, each once."""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.compute as pc
import pytest
import ray

from ecif_ray.data.samples import read_shard
from ecif_ray.data.shards import Shard, list_shards
from ecif_ray.pipeline import EXIT_INCOMPLETE, EXIT_INPUT_ERRORS, EXIT_OK, run_score
from ecif_ray.pipeline.events import (
    CurvatureLoaded,
    DirectionsReady,
    ShardCommitted,
    ShardProgress,
    ShardRetried,
    ShardSubmitted,
    WorkersReady,
)
from ecif_ray.pipeline.pool import RetryPolicy
from ecif_ray.pipeline.scheduler import ShardScheduler
from ecif_ray.pipeline.shard import SegmentDone, ShardJob
from ecif_ray.tables import RunStore, ShardRecord, connect

TARGET = "train-000002.tar"


def tables(run_dir: str | Path) -> dict[str, pa.Table]:
    con = connect(str(run_dir))
    return {name: con.sql(f"SELECT * FROM {name} ORDER BY shard, key").to_arrow_table() for name in ("pairs", "errors")}


@pytest.fixture(scope="module")
def four_shards(digits_corpus, tmp_path_factory) -> Path:
    """Four shards of 64 pairs (the two train shards, each twice under another shard id)."""
    out = tmp_path_factory.mktemp("four")
    for i in range(4):
        shutil.copy(digits_corpus / "train" / f"train-00000{i % 2}.tar", out / f"train-00000{i}.tar")
    return out


@pytest.fixture(scope="module")
def fault_config(score_config, four_shards):
    """Segments of 4 pairs: 16 per shard, so a shard is long enough to be interrupted in its middle."""
    return lambda out, **kw: score_config(out, **{"train": str(four_shards), "segment_size": 4, **kw})


@pytest.fixture(scope="module")
def reference(ray_cluster, fault_config, tmp_path_factory):
    result = run_score(fault_config(tmp_path_factory.mktemp("faults") / "reference"))
    assert result.exit_code == EXIT_OK
    return result


def test_worker_killed_mid_shard_loses_and_duplicates_nothing(reference, fault_config, tmp_path):
    events = []
    actor_of = {}

    def kill_during_target(event) -> None:
        events.append(event)
        if isinstance(event, ShardSubmitted):
            actor_of[event.shard, event.attempt] = event.actor
        first_segment = isinstance(event, ShardProgress) and event.segments_done == 1
        if first_segment and event.shard == TARGET and event.attempt == 1:
            ray.kill(actor_of[TARGET, 1])

    result = run_score(fault_config(tmp_path / "run"), [kill_during_target])

    assert result.exit_code == EXIT_OK and result.worker_failures == 1
    retried = [e for e in events if isinstance(e, ShardRetried)]
    assert [(e.shard, e.attempt, e.worker_died) for e in retried] == [(TARGET, 1, True)]
    committed = {e.record.shard: e.record.attempt for e in events if isinstance(e, ShardCommitted)}
    assert committed[TARGET] == 2  # the interrupted attempt never committed
    first = [e for e in events if isinstance(e, ShardProgress) and e.shard == TARGET and e.attempt == 1]
    assert max(e.segments_done for e in first) < 64 // 4  # killed mid-shard (16 segments of 4 pairs)
    second = next(e.actor for e in events if isinstance(e, ShardSubmitted) and e.shard == TARGET and e.attempt == 2)
    assert second != actor_of[TARGET, 1]
    got = tables(tmp_path / "run")
    assert got["pairs"].num_rows == 4 * 64
    assert len(set(zip(got["pairs"]["shard"].to_pylist(), got["pairs"]["key"].to_pylist()))) == 4 * 64
    assert got["pairs"].drop_columns(["run_id"]).equals(tables(reference.out)["pairs"].drop_columns(["run_id"]))


def test_worker_killed_during_the_curvature_pass_changes_nothing(reference, fault_config, tmp_path):
    """The replacement reloads the dead worker's curvature groups: the same directions, bit for bit."""
    actors = []

    def kill_holder_of_the_sample(event) -> None:
        if isinstance(event, WorkersReady):
            actors.extend(event.actors)
        if isinstance(event, CurvatureLoaded):  # the sample is spread over both workers; no product yet
            ray.kill(actors[1])

    result = run_score(fault_config(tmp_path / "run"), [kill_holder_of_the_sample])
    assert result.exit_code == EXIT_OK and result.worker_failures == 1
    directions = "directions/directions.safetensors"
    assert (tmp_path / "run" / directions).read_bytes() == (Path(reference.out) / directions).read_bytes()
    assert tables(tmp_path / "run")["pairs"].drop_columns(["run_id"]).equals(
        tables(reference.out)["pairs"].drop_columns(["run_id"]))


DRIVER = """
import sys, time
import torch
torch.set_num_threads(1)
from ecif_ray.config import ScoreConfig
from ecif_ray.pipeline import run_score
from ecif_ray.pipeline.events import ShardCommitted

def hold_after_first_commit(event):
    if isinstance(event, ShardCommitted):
        print("COMMITTED", event.record.shard, flush=True)
        time.sleep(600)  # the test SIGKILLs this process now, with other shards in flight or pending

run_score(ScoreConfig.model_validate_json(open(sys.argv[1]).read()), [hold_after_first_commit])
"""


def test_driver_sigkilled_mid_run_resumes_to_the_same_tables(reference, fault_config, ray_cluster, tmp_path):
    out = tmp_path / "run"
    config = fault_config(out, address=ray_cluster)
    (tmp_path / "config.json").write_text(config.model_dump_json())
    (tmp_path / "driver.py").write_text(DRIVER)
    driver = subprocess.Popen([sys.executable, str(tmp_path / "driver.py"), str(tmp_path / "config.json")],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = _read_line(driver, timeout=120)
        assert line.startswith("COMMITTED"), line
        os.kill(driver.pid, signal.SIGKILL)
        assert driver.wait(timeout=30) == -signal.SIGKILL
    finally:
        if driver.poll() is None:
            os.kill(driver.pid, signal.SIGKILL)
            driver.wait()

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "running"  # the killed driver never finished it
    committed_before = len(list((out / "_state" / "shards").glob("*.json")))
    assert 1 <= committed_before < 4

    resumed = run_score(fault_config(out))
    assert resumed.exit_code == EXIT_OK and resumed.directions_reused
    assert resumed.manifest.counts["shards_skipped"] == committed_before
    assert resumed.manifest.counts["shards_scored"] == 4 - committed_before
    got, want = tables(out), tables(reference.out)
    for name in ("pairs", "errors"):
        assert got[name].equals(want[name])


def _read_line(process: subprocess.Popen, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([process.stdout], [], [], 1.0)
        if ready:
            return process.stdout.readline().strip()
        if process.poll() is not None:
            raise AssertionError(f"driver exited with {process.returncode} before committing a shard")
    raise AssertionError("driver committed no shard in time")


# ---------------------------------------------------------------------------------------------
# a shard whose scoring keeps failing


@ray.remote(num_cpus=0)
class FlakyWorker:
    """Stands in for InfluenceWorker: scores every shard but one, which always raises."""

    def score_shard(self, job: ShardJob, directions, basis=None):
        if job.shard.name == "poison.tar":
            raise RuntimeError("cannot score this shard")
        yield SegmentDone(job.shard.name, 1, 3)
        yield ShardRecord(shard=job.shard.name, run_id=job.run_id, fingerprint=job.fingerprint, files=[], pairs=3,
                          errors=0, attempt=job.attempt)


def test_a_shard_that_keeps_failing_is_retried_elsewhere_then_reported(ray_cluster):
    pool = SimpleNamespace(actors=[FlakyWorker.remote(), FlakyWorker.remote()], failures=0)
    events, failures = [], []
    shards = [Shard(f"/nowhere/{name}", name) for name in ("a.tar", "poison.tar", "b.tar")]
    scheduler = ShardScheduler(pool, lambda shard, attempt: ShardJob(shard, "r", "f", attempt, ("val",), {}),
                               (ray.put(0), None), RetryPolicy(attempts=3, backoff_s=0.3), emit=events.append,
                               on_failure=lambda shard, reason: failures.append((shard.name, reason)))
    started = time.monotonic()
    outcome = scheduler.run(shards)
    assert time.monotonic() - started >= 0.3 + 0.6  # each retry waited out its backoff
    assert set(outcome.records) == {"a.tar", "b.tar"} and outcome.retries == 2
    assert failures == [("poison.tar", "RuntimeError: cannot score this shard")]
    assert list(outcome.failed) == ["poison.tar"]
    tries = [e.actor for e in events if isinstance(e, ShardSubmitted) and e.shard == "poison.tar"]
    assert len(tries) == 3 and tries[0] != tries[1] and tries[1] != tries[2]  # each retry on the other actor
    retried = [e for e in events if isinstance(e, ShardRetried)]
    assert [e.attempt for e in retried] == [1, 2]
    assert [e.reason.rsplit("(", 1)[1] for e in retried] == ["retry in 0.3 s)", "retry in 0.6 s)"]


# ---------------------------------------------------------------------------------------------
# corrupt inputs

def _corrupt_shards(wds, digits_corpus: Path, root: Path) -> list[str]:
    """One good shard, one with a bad sample of every kind, a truncated tar, garbage (a missing shard is
    not bad input but failed storage: see the tests below)."""
    shutil.copy(digits_corpus / "train" / "train-000000.tar", root / "good-000000.tar")
    png = wds.image_bytes("PNG", (10, 200, 10))
    good = [m for i in range(6) for m in wds.sample_members(f"ok{i}", f"a photo of a {i}.", png)]
    bad = [
        ("noimage.txt", b"a caption without an image"),
        ("garbled.png", b"this is not a png"), ("garbled.txt", b"a photo of noise."),
        ("nocaption.png", png),
        ("empty.png", png), ("empty.txt", b"   "),
        ("latin1.png", png), ("latin1.txt", "caf\xe9".encode("latin-1")),
        ("badjson.png", png), ("badjson.json", b"{not json"),
        *wds.sample_members("ok0", "a repeated key.", png),
    ]
    wds.write_tar(root / "mixed-000001.tar", good[:6] + bad[:6] + good[6:] + bad[6:])
    data = (digits_corpus / "train" / "train-000001.tar").read_bytes()
    (root / "truncated-000002.tar").write_bytes(data[: len(data) // 2 + 100])
    (root / "garbage-000004.tar").write_bytes(bytes(range(256)) * 12)
    names = ["good-000000.tar", "mixed-000001.tar", "truncated-000002.tar", "garbage-000004.tar"]
    return [str(root / n) for n in names]


def test_corrupt_inputs_become_error_rows_and_the_rest_is_scored(ray_cluster, score_config, wds, digits_corpus,
                                                                 tmp_path):
    shards = _corrupt_shards(wds, digits_corpus, tmp_path)
    result = run_score(score_config(tmp_path / "run", train=shards, workers=1))

    assert result.exit_code == EXIT_INPUT_ERRORS
    got = tables(tmp_path / "run")
    errors = {(s, k, st) for s, k, st in zip(*(got["errors"][c].to_pylist() for c in ("shard", "key", "stage")))}
    expected = {
        ("mixed-000001.tar", "noimage", "image"), ("mixed-000001.tar", "garbled", "image"),
        ("mixed-000001.tar", "nocaption", "caption"), ("mixed-000001.tar", "empty", "caption"),
        ("mixed-000001.tar", "latin1", "caption"), ("mixed-000001.tar", "badjson", "caption"),
        ("mixed-000001.tar", "ok0", "duplicate"), ("garbage-000004.tar", "", "read"),
    }
    assert expected <= errors
    truncated = [e for e in errors if e[0] == "truncated-000002.tar"]
    assert [e[2] for e in truncated] == ["read"]
    assert len(errors) == len(expected) + 1 == got["errors"].num_rows
    assert all(m for m in got["errors"]["message"].to_pylist())

    good = {(s.shard, s.key) for shard in list_shards(shards) for s in read_shard(shard)[0]}
    assert 64 + 6 < len(good) < 64 + 6 + 64  # the truncated shard kept the samples before the cut
    pairs = got["pairs"]
    identities = list(zip(pairs["shard"].to_pylist(), pairs["key"].to_pylist()))
    assert len(identities) == len(set(identities)) and set(identities) == good
    assert pairs.filter(pc.equal(pairs["key"], "ok0"))["caption"].to_pylist() == ["a photo of a 0."]
    counts = result.manifest.counts
    assert counts["pairs"] == len(good) and counts["errors"] == len(errors)
    assert counts["errors_by_stage"] == {"image": 2, "caption": 4, "duplicate": 1, "read": 2}


# ---------------------------------------------------------------------------------------------
# failed storage: retried with backoff, never committed, scored by the rerun

def _sql_counts(run_dir: str | Path) -> tuple[int, int]:
    con = connect(str(run_dir))
    return tuple(con.sql(f"SELECT count(*) FROM {name}").fetchall()[0][0] for name in ("pairs", "errors"))


def test_a_shard_missing_for_a_while_is_retried_reported_and_scored_by_the_rerun(reference, fault_config,
                                                                                  four_shards, tmp_path):
    """A shard that vanishes after the curvature pass (an S3 object briefly missing): every try is retried
    after its backoff, the shard is never committed, the run says so (exit 4, one ``score`` row), and the
    rerun, once the shard is back, scores it; the tables then equal an undisturbed run's."""
    shards = tmp_path / "shards"
    shutil.copytree(four_shards, shards)
    away = tmp_path / "away.tar"
    config = fault_config(tmp_path / "run", train=f"{shards}/train-{{000000..000003}}.tar", retry_backoff_s=0.1)
    events = []

    def hide_target_after_the_solve(event) -> None:
        events.append(event)
        if isinstance(event, DirectionsReady):
            (shards / TARGET).rename(away)

    first = run_score(config, [hide_target_after_the_solve])
    assert first.exit_code == EXIT_INCOMPLETE and list(first.failed) == [TARGET]
    retried = [e for e in events if isinstance(e, ShardRetried) and e.shard == TARGET]
    assert [e.attempt for e in retried] == [1, 2] and all("ShardUnavailable" in e.reason for e in retried)
    assert RunStore(str(tmp_path / "run")).shard_record(TARGET) is None  # never committed
    assert first.manifest.status == "incomplete"
    errors = tables(tmp_path / "run")["errors"].to_pylist()
    assert [(e["shard"], e["key"], e["stage"]) for e in errors] == [(TARGET, "", "score")]
    assert "cannot open" in errors[0]["message"] and TARGET in errors[0]["message"]
    counts = first.manifest.counts
    assert _sql_counts(tmp_path / "run") == (counts["pairs"], counts["errors"]) == (3 * 64, 1)

    away.rename(shards / TARGET)
    second = run_score(config)
    assert second.exit_code == EXIT_OK
    assert (second.manifest.counts["shards_skipped"], second.manifest.counts["shards_scored"]) == (3, 1)
    got, want = tables(tmp_path / "run"), tables(reference.out)
    for name in ("pairs", "errors"):
        assert got[name].drop_columns(["run_id"]).equals(want[name].drop_columns(["run_id"]))
    assert _sql_counts(tmp_path / "run") == (second.manifest.counts["pairs"], second.manifest.counts["errors"])


@pytest.fixture
def restartable_s3(s3_bucket, four_shards):
    """A second moto endpoint on a fixed port over the same (in-process) buckets, which a test may stop
    and start again; the four shards are uploaded under ``shards/``."""
    from moto.server import ThreadedMotoServer

    for shard in sorted(four_shards.iterdir()):
        s3_bucket.put(shard, f"shards/{shard.name}")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    state = SimpleNamespace(server=None, url=f"{s3_bucket.url}/shards",
                            options={**s3_bucket.storage_options,
                                     "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{port}",
                                                       "region_name": "us-east-1"}})

    def start() -> None:
        state.server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        state.server.start()

    state.start = start
    start()
    yield state
    state.server.stop()


def test_s3_endpoint_down_mid_run_then_back_gives_the_uninterrupted_tables(reference, fault_config, restartable_s3,
                                                                           tmp_path):
    s3 = restartable_s3
    config = fault_config(tmp_path / "run", train=s3.url, storage_options=s3.options, retry_backoff_s=0.1)

    def stop_after_first_commit(event) -> None:
        if isinstance(event, ShardCommitted) and s3.server is not None:
            s3.server.stop()
            s3.server = None

    first = run_score(config, [stop_after_first_commit])
    assert first.exit_code == EXIT_INCOMPLETE and first.failed and first.manifest.status == "incomplete"
    assert all("ShardUnavailable" in reason for reason in first.failed.values())
    committed = set(first.records)
    assert committed and not committed & set(first.failed)
    counts = first.manifest.counts
    assert _sql_counts(tmp_path / "run") == (counts["pairs"], counts["errors"]) == (64 * len(committed),
                                                                                 len(first.failed))
    s3.start()
    second = run_score(config)
    assert second.exit_code == EXIT_OK
    assert (second.manifest.counts["shards_skipped"], second.manifest.counts["shards_scored"]) == (
        len(committed), len(first.failed))
    got, want = tables(tmp_path / "run"), tables(reference.out)
    for name in ("pairs", "errors"):
        assert got[name].drop_columns(["run_id"]).equals(want[name].drop_columns(["run_id"]))
