"""The run directory's lease: a second driver is refused naming the owner, a dead owner's lease is
taken over, the lease is gone after a run, racing takeovers have one winner (local and S3), and a
resumed run removes the temp files of killed writers without changing its tables."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import uuid
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from ecif_ray.cli import main
from ecif_ray.pipeline.events import RunStarted
from ecif_ray.pipeline.run import RunLocked, run_score
from ecif_ray.tables import RunStore, connect
from ecif_ray.tables.lease import (
    LEASE,
    LeaseConflict,
    LeaseHeld,
    LocalSlot,
    Owner,
    RunLease,
    S3Slot,
    Slot,
    slot_for,
)
from ecif_ray.tables.store import temp_name


def plant(store: RunStore, *, host: str = "other-host", pid: int = 4242, age_s: float = 0.0,
          pid_ns: str | None = "pid:[1]") -> Owner:
    """Write a lease as another driver would have (heartbeat ``age_s`` seconds old)."""
    stamp = (datetime.now(UTC) - timedelta(seconds=age_s)).isoformat(timespec="milliseconds")
    owner = Owner(host=host, pid=pid, pid_ns=pid_ns, run_id="their-run", token=uuid.uuid4().hex,
                  acquired_at=stamp, heartbeat_at=stamp)
    store.put(LEASE, owner.to_bytes())
    return owner


def write(store: RunStore, relative: str, data: bytes) -> None:
    """A plain, non-atomic write (what a writer killed mid-way leaves)."""
    path = store.path(relative)
    store.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    store.fs.pipe_file(path, data)


def holder(store: RunStore) -> Owner | None:
    data = store.get(LEASE)
    return None if data is None else Owner.parse(data)


def this_machine(store: RunStore, pid: int, age_s: float = 0.0) -> Owner:
    return plant(store, host=socket.gethostname(), pid=pid, age_s=age_s, pid_ns=Owner.this_process("x").pid_ns)


@pytest.fixture
def s3_store(s3_bucket) -> RunStore:
    return RunStore(f"{s3_bucket.url}/runs/r1", s3_bucket.storage_options)


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path) -> RunStore:
    return request.getfixturevalue("s3_store") if request.param == "s3" else RunStore(str(tmp_path / "run"))


# ---------------------------------------------------------------------------------------------
# the lease on its own


def test_each_filesystem_gets_its_atomic_slot(tmp_path, s3_store):
    assert type(slot_for(RunStore(str(tmp_path)))) is LocalSlot
    assert type(slot_for(s3_store)) is S3Slot
    assert type(slot_for(RunStore("memory://lease-test"))) is Slot  # best effort elsewhere


def test_second_driver_is_refused_naming_the_owner_until_the_first_releases(store):
    first = RunLease.acquire(store, "run-1")
    try:
        on_file = holder(store)
        assert on_file == first.owner and on_file.pid == os.getpid() and on_file.run_id == "run-1"
        with pytest.raises(LeaseHeld) as refused:
            RunLease.acquire(store, "run-2")
        message = str(refused.value)
        assert "\n" not in message and store.url in message and "in use by another driver" in message
        assert f"pid {os.getpid()} on host {socket.gethostname()} (run run-1)" in message
        assert re.search(r"heartbeat [0-9] s ago", message)
        assert holder(store) == first.owner  # the refused driver changed nothing
    finally:
        first.release()
    assert not store.exists(LEASE)
    with RunLease.acquire(store, "run-2") as second:
        assert holder(store).token == second.owner.token
    assert not store.exists(LEASE)


def test_a_fresh_lease_of_another_host_is_respected(store):
    theirs = plant(store, age_s=30)
    with pytest.raises(LeaseHeld, match=r"pid 4242 on host other-host \(run their-run\), heartbeat 3[01] s ago"):
        RunLease.acquire(store, "mine")
    assert holder(store) == theirs


def test_a_stale_lease_is_taken_over_with_a_warning(store, caplog):
    theirs = plant(store, age_s=120)
    with caplog.at_level(logging.WARNING, logger="ecif_ray.tables.lease"):
        lease = RunLease.acquire(store, "mine")
    try:
        now_on_file = holder(store)
        assert now_on_file.token == lease.owner.token != theirs.token and now_on_file.pid == os.getpid()
        assert "took over the lease of pid 4242 on host other-host" in caplog.text
        assert re.search(r"heartbeat is 12[01] s old", caplog.text)
    finally:
        lease.release()
    assert not store.exists(LEASE)


def test_a_dead_driver_of_this_machine_is_taken_over_at_once(tmp_path, caplog):
    store = RunStore(str(tmp_path / "run"))
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    this_machine(store, gone.pid)  # a fresh heartbeat, but its process no longer exists
    with caplog.at_level(logging.WARNING, logger="ecif_ray.tables.lease"), RunLease.acquire(store, "mine") as lease:
        assert holder(store).token == lease.owner.token
    assert "that process is gone" in caplog.text
    this_machine(store, os.getpid())  # alive (this very process): refused although on this machine
    with pytest.raises(LeaseHeld):
        RunLease.acquire(store, "mine")


def test_heartbeat_renews_and_a_lost_lease_is_left_to_its_new_owner(store):
    lease = RunLease.acquire(store, "mine", heartbeat_s=3600)  # beats by hand below
    first = holder(store).heartbeat_at
    lease.renew()
    assert holder(store).heartbeat_at >= first and holder(store).token == lease.owner.token
    usurper = plant(store)  # another driver took over (as if this one had stalled past the stale timeout)
    with pytest.raises(LeaseConflict):
        lease.renew()
    assert lease.lost
    lease.release()
    assert holder(store) == usurper  # not ours any more: left in place


def test_heartbeat_thread_keeps_a_long_run_fresh(tmp_path):
    store = RunStore(str(tmp_path / "run"))
    with RunLease.acquire(store, "mine", heartbeat_s=0.05) as lease:
        before = holder(store).heartbeat_at
        deadline = datetime.now(UTC) + timedelta(seconds=10)
        while holder(store).heartbeat_at == before and datetime.now(UTC) < deadline:
            threading.Event().wait(0.02)
        assert holder(store).heartbeat_at > before and not lease.lost
        assert holder(store).acquired_at == lease.owner.acquired_at  # the same lease, renewed
    assert not store.exists(LEASE)


def race(store: RunStore, drivers: int) -> tuple[list[RunLease], int]:
    """``drivers`` threads acquiring at once: the leases won, and how many were refused."""
    barrier, won, refused = threading.Barrier(drivers), [], []

    def one() -> None:
        barrier.wait()
        try:
            won.append(RunLease.acquire(store, "racer"))
        except LeaseHeld:
            refused.append(True)

    threads = [threading.Thread(target=one) for _ in range(drivers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return won, len(refused)


def test_racing_takeovers_of_a_stale_lease_have_one_winner(tmp_path):
    """Local only: moto's server checks S3 preconditions without a lock, so concurrent conditional
    puts race inside the test server itself (AWS S3 evaluates them atomically)."""
    store = RunStore(str(tmp_path / "run"))
    for _ in range(5):
        plant(store, age_s=300)
        won, refused = race(store, 4)
        assert len(won) == 1 and refused == 3
        assert holder(store).token == won[0].owner.token
        won[0].release()
        assert not store.exists(LEASE)
    won, refused = race(store, 4)  # and racing creations of a new one
    assert len(won) == 1 and refused == 3
    won[0].release()


def test_best_effort_slot_refuses_and_takes_over_too():
    store = RunStore(f"memory://lease-{uuid.uuid4().hex}")
    slot = Slot(store, settle_s=0.01)
    lease = RunLease.acquire(store, "first", slot=slot)
    with pytest.raises(LeaseHeld, match="in use by another driver"):
        RunLease.acquire(store, "second", slot=slot)
    lease.release()
    assert not store.exists(LEASE)
    plant(store, age_s=120)
    with RunLease.acquire(store, "third", slot=slot) as third:
        assert holder(store).token == third.owner.token


def test_an_unreadable_lease_is_taken_over(tmp_path):
    store = RunStore(str(tmp_path / "run"))
    store.put(LEASE, b"{not json")
    slot = LocalSlot(store, settle_s=0.01)
    with RunLease.acquire(store, "mine", slot=slot) as lease:
        assert holder(store) == lease.owner


def test_swap_only_replaces_the_version_read(store):
    slot = slot_for(store)
    plant(store)
    data, version = slot.read()
    newer = plant(store)  # changed after it was read
    with pytest.raises(LeaseConflict):
        slot.swap(b"{}", version)
    assert holder(store) == newer and holder(store).to_bytes() != data


# ---------------------------------------------------------------------------------------------
# temp files of killed writers


def test_only_the_stores_own_temp_names_are_removed(tmp_path, s3_store):
    for store in (RunStore(str(tmp_path / "run")), s3_store):
        store.put("pairs/run_id=r/a.parquet", b"rows")
        leftovers = [f"pairs/run_id=r/{temp_name('a.parquet')}", f"_state/shards/{temp_name('a.json')}",
                     temp_name("manifest.json")]
        for relative in leftovers:
            write(store, relative, b"torn")
        kept = ["notes.tmp", ".notes.tmp", "pairs/run_id=r/.a.parquet.123.tmp", "user/.x.0123.tmp"]
        for relative in kept:
            write(store, relative, b"theirs")
        assert store.temp_files() == sorted(leftovers)
        assert store.remove_temp_files() == sorted(leftovers)
        assert store.temp_files() == []
        assert all(store.exists(r) for r in [*kept, "pairs/run_id=r/a.parquet"])
        assert not any(store.exists(r) for r in leftovers)


def test_a_lease_alone_leaves_a_directory_empty(store):
    with RunLease.acquire(store, "mine") as lease:
        lease.renew()  # locally, also creates the hidden guard file
        assert store.is_empty()
        store.put("notes.txt", b"x")
        assert not store.is_empty()


# ---------------------------------------------------------------------------------------------
# the driver


def test_run_score_refuses_a_directory_another_driver_holds(score_config, heads_ckpt, digits_corpus, tmp_path,
                                                            capsys):
    out = tmp_path / "run"
    store = RunStore(str(out))
    theirs = this_machine(store, os.getppid())  # a live process of this machine, heartbeat fresh
    with pytest.raises(RunLocked, match=f"pid {os.getppid()} on host {socket.gethostname()}"):
        run_score(score_config(out))
    assert sorted(p.name for p in out.iterdir()) == [LEASE]  # refused before the manifest was written
    assert holder(store) == theirs
    code = main(["score", "--ckpt", str(heads_ckpt), "--train", str(digits_corpus / "train"),
                 "--val", str(digits_corpus / "val"), "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err
    assert err.startswith("ecif-ray score: error: out: ") and "in use by another driver" in err


def test_run_score_on_s3_refuses_a_held_lease(score_config, s3_bucket):
    out = f"{s3_bucket.url}/runs/held"
    store = RunStore(out, s3_bucket.storage_options)
    plant(store, age_s=5)
    with pytest.raises(RunLocked, match=r"pid 4242 on host other-host \(run their-run\), heartbeat \d+ s ago"):
        run_score(score_config(out, storage_options=s3_bucket.storage_options))
    assert [k.rsplit("/", 1)[1] for k in s3_bucket.fs.find(out)] == [LEASE]


def test_resume_removes_killed_writers_temp_files_and_releases_the_lease(scored_run, scored_config, tmp_path,
                                                                          caplog):
    assert not Path(scored_run.out, LEASE).exists()  # released after the first run
    out = tmp_path / "copy"
    shutil.copytree(scored_run.out, out)
    store = RunStore(str(out))
    partition = f"pairs/run_id={scored_run.run_id}"
    leftovers = [f"{partition}/{temp_name('train-000000.tar.parquet')}", f"_state/shards/{temp_name('x.json')}",
                 temp_name("manifest.json")]
    for relative in leftovers:
        (out / relative).write_bytes(b"PAR1 torn")
    stale = this_machine(store, os.getpid(), age_s=600)  # the killed driver's lease, long stale
    seen: list[Owner | None] = []
    with caplog.at_level(logging.WARNING, logger="ecif_ray.tables.lease"):
        result = run_score(scored_config(out),
                           [lambda e: seen.append(holder(store)) if isinstance(e, RunStarted) else None])
    assert "took over the lease" in caplog.text and re.search(r"6[0-9][0-9] s old", caplog.text)
    assert seen[0] is not None and seen[0].token != stale.token and seen[0].pid == os.getpid()  # held while running
    assert not (out / LEASE).exists()  # released at the end
    assert not [r for r in leftovers if (out / r).exists()] and store.temp_files() == []
    assert result.manifest.counts["shards_skipped"] == 2 and result.manifest.counts["shards_scored"] == 0
    for name in ("pairs", "scores", "trace"):
        order = {"scores": "query, shard, key", "trace": "query_id, rank"}.get(name, "shard, key")
        query = f"SELECT * FROM {name} ORDER BY {order}"
        assert connect(str(out)).sql(query).to_arrow_table().equals(
            connect(scored_run.out).sql(query).to_arrow_table())
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete"


def test_owner_round_trips_and_describes_itself():
    owner = Owner.this_process("r")
    assert Owner.parse(owner.to_bytes()) == owner
    assert Owner.parse(b"[]") is None and Owner.parse(b"{}") is None
    old = replace(owner, heartbeat_at=(datetime.now(UTC) - timedelta(seconds=90)).isoformat())
    assert 89 <= old.age() <= 92 and re.search(r"heartbeat 9[012] s ago", old.describe())
