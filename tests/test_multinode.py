"""Multi-node semantics of `ecif-ray features` and `ecif-ray score --features` on a real two-node Ray cluster.

The cluster is two `ray start --block` processes on this machine, each with its own temp dir: a head
node with 0 CPUs and a worker node with 2 CPUs, token authentication on (``ray_auth_token``). Every
actor needs a CPU, so Ray can place the featurizers and the scoring workers on the worker node only;
the tests check it as well: Ray writes each worker process's log as ``worker-<id>-<job>-<pid>.out``
under the logs of the node that runs it, so the pids the run manifest records (``workers.info``) and
the feature pass's actors are found in the worker node's temp dir and not in the head's.

No worker reads the driver's local disk: the checkpoint, the train and val shards, the feature store
and the run directory are all s3:// URLs on the moto server (the checkpoint is given only as s3://;
the driver downloads it to ship it through the object store), and the drivers run in an empty
working directory. The drivers are the real command line (``ecif-ray``) in subprocesses joining the
cluster with ``--address``; this test process never calls ``ray.init``.

Resume: deleting one shard's commit record (``_state/shards/<shard>.json``) in the run directory and
rerunning the same command rescores that shard only, and the tables stay the same; likewise the
feature store rewrites only that shard, with the same rows.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pyarrow as pa
import pytest

from ecif_ray.pipeline.prepare import CHECKPOINT_FILES
from ecif_ray.tables import connect

BIN = Path(sys.executable).parent  # the venv's bin: ray, ecif-ray
HEAD_CPUS, WORKER_CPUS = 0, 2
WORKER_LOG = re.compile(r"^worker-[0-9a-f]+-[0-9a-f]+-(\d+)\.out$")
FEATURIZER = "ShardFeaturizer"  # the Ray Data actor class of the feature pass (its name is in its worker's log)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, n: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


@dataclass
class RayNode:
    """One `ray start --block` process (it owns the node's raylet, and the head's GCS) and its temp dir."""

    proc: subprocess.Popen
    temp_dir: Path

    @property
    def output(self) -> Path:
        return self.temp_dir / "ray-start.out"

    def worker_logs(self) -> dict[int, Path]:
        """pid -> log (``.out``) of every worker process this node started (in its session's logs)."""
        logs = self.temp_dir / "session_latest" / "logs"
        return {int(m.group(1)): path for path in logs.iterdir() if (m := WORKER_LOG.match(path.name))}

    def actor_pids(self, class_name: str) -> set[int]:
        """Pids of this node's workers that hosted an actor whose name mentions ``class_name``."""
        return {pid for pid, path in self.worker_logs().items()
                if any(line.startswith(":actor_name:") and class_name in line for line in _lines(path))}

    def processes(self) -> list[psutil.Process]:
        """The `ray start` process and everything under it (raylet, GCS, agents, workers)."""
        try:
            root = psutil.Process(self.proc.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []


def _stop(nodes: list[RayNode]) -> None:
    """SIGKILL every process of the nodes (actor workers get their own process group, so a group kill alone
    would miss them), then reap the `ray start` processes."""
    procs = [p for node in nodes for p in node.processes()]
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(procs, timeout=10)
    for node in nodes:
        with contextlib.suppress(subprocess.TimeoutExpired):
            node.proc.wait(timeout=10)


def _lines(path: Path) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()
    except OSError:
        return []


@dataclass
class TwoNodes:
    address: str  # the head's GCS address, as the head wrote it
    joined: str  # the cluster the worker node joined, as it wrote it
    env: dict[str, str]
    head: RayNode
    worker: RayNode

    def diagnostics(self) -> str:
        return (f"--- head `ray start` output:\n{_tail(self.head.output)}\n"
                f"--- worker `ray start` output:\n{_tail(self.worker.output)}")


def _ray_start(args: list[str], temp_dir: Path, env: dict[str, str]) -> RayNode:
    ports = ["--metrics-export-port", str(_free_port()), "--dashboard-agent-listen-port", str(_free_port())]
    out = (temp_dir / "ray-start.out").open("w")
    proc = subprocess.Popen([str(BIN / "ray"), "start", "--block", "--temp-dir", str(temp_dir), "--disable-usage-stats",
                             *ports, *args], env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    out.close()
    return RayNode(proc, temp_dir)


def _wait_for(path: Path, node: RayNode, timeout_s: float = 90.0) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists() and (text := path.read_text().strip()):
            return text
        if node.proc.poll() is not None:
            break
        time.sleep(0.2)
    raise RuntimeError(f"`ray start` did not come up (exit {node.proc.poll()}):\n{_tail(node.output)}")


@pytest.fixture(scope="module")
def two_nodes(ray_auth_token: Path, s3_server) -> Iterator[TwoNodes]:
    """A head (0 CPUs) and a worker node (2 CPUs) on this machine, each with its own short temp dir (Ray's
    socket paths must stay under ~107 characters); both are killed at the end whatever happened."""
    # Processes joining a token cluster need RAY_AUTH_MODE=token (only `ray start --head` and a
    # private ray.init turn it on by themselves); the token file comes from ray_auth_token, and the
    # S3 credentials from s3_server's environment, which the workers inherit from their raylet.
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(ray_auth_token),
           "OMP_NUM_THREADS": "1"}
    env.pop("RAY_ADDRESS", None)
    dirs = [Path(tempfile.mkdtemp(prefix="rn", dir="/tmp")) for _ in range(2)]
    nodes: list[RayNode] = []
    try:
        port = _free_port()
        head = _ray_start(["--head", "--port", str(port), "--num-cpus", str(HEAD_CPUS), "--include-dashboard=false",
                           "--dashboard-port", str(_free_port()), "--ray-client-server-port", str(_free_port())],
                          dirs[0], env)
        nodes.append(head)
        address = _wait_for(dirs[0] / "ray_current_cluster", head)
        worker = _ray_start(["--address", address, "--num-cpus", str(WORKER_CPUS)], dirs[1], env)
        nodes.append(worker)
        # `ray start` writes this file once its node is registered with the GCS (it waits for that), so
        # from here on the drivers see both nodes and the worker node's CPUs.
        joined = _wait_for(dirs[1] / "ray_current_cluster", worker)
        yield TwoNodes(address, joined, env, head, worker)
    finally:
        _stop(nodes)
        for d in dirs:
            shutil.rmtree(d, ignore_errors=True)


@dataclass
class S3Layout:
    """Everything on S3: the checkpoint, the corpus, the feature store and the run directory."""

    fs: Any  # the test's own s3fs client: no instance or listings cache, so it never feeds what ecif_ray reads
    storage_options: dict[str, Any]
    ckpt: str
    train: str
    val: str
    store: str
    run: str
    shards: list[str]  # the train shards' names
    workdir: Path  # the drivers' (empty) working directory

    def records(self, root: str) -> set[str]:
        """The commit records under a store or run directory, listed afresh."""
        return {Path(k).name for k in self.fs.find(f"{root}/_state/shards")}

    def modified(self, root: str) -> dict[str, Any]:
        """Relative path -> last-modified time of every object under ``root``."""
        return {k.removeprefix(root.removeprefix("s3://") + "/"): v["LastModified"]
                for k, v in self.fs.find(root, detail=True).items()}

    def committed(self) -> set[str]:
        return {f"{shard}.json" for shard in self.shards}

    def drop_cached_listings(self) -> None:
        """Empty the listings cache of the filesystem ecif_ray's readers share in this process (fsspec caches
        one instance per set of storage options)."""
        from ecif_ray.tables.store import RunStore

        RunStore(self.run, self.storage_options).fs.invalidate_cache()


@pytest.fixture(scope="module")
def s3(s3_server, heads_ckpt: Path, digits_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> S3Layout:
    import boto3
    import s3fs

    bucket = f"multinode-{os.getpid()}-{int(time.time())}"
    boto3.client("s3", endpoint_url=s3_server.endpoint_url, region_name="us-east-1").create_bucket(Bucket=bucket)
    fs = s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False, **s3_server.storage_options)
    url = f"s3://{bucket}"
    for name in CHECKPOINT_FILES:
        fs.put_file(str(heads_ckpt / name), f"{url}/ckpt/{name}")
    shards = []
    for split in ("train", "val"):
        for shard in sorted((digits_corpus / split).glob("*.tar")):
            fs.put_file(str(shard), f"{url}/corpus/{split}/{shard.name}")
            if split == "train":
                shards.append(shard.name)
    assert len(shards) == 2
    return S3Layout(fs=fs, storage_options=s3_server.storage_options, ckpt=f"{url}/ckpt", train=f"{url}/corpus/train",
                    val=f"{url}/corpus/val", store=f"{url}/features", run=f"{url}/runs/r1", shards=shards,
                    workdir=tmp_path_factory.mktemp("driver-cwd"))


def _cli(cluster: TwoNodes, s3: S3Layout, *args: str) -> subprocess.CompletedProcess:
    """Run `ecif-ray ARGS --address HEAD` as a driver process joining the cluster; exit 0 asserted."""
    proc = subprocess.run([str(BIN / "ecif-ray"), *args, "--address", cluster.address], cwd=s3.workdir,
                          env=cluster.env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr[-4000:]}\n{cluster.diagnostics()}"
    return proc


def _features(cluster: TwoNodes, s3: S3Layout) -> dict[str, Any]:
    """`ecif-ray features` with one featurizer actor (two concurrent actor starts cost ~15 s more on two
    shared cores, for two 64-pair shards); its result (--json)."""
    proc = _cli(cluster, s3, "features", "--ckpt", s3.ckpt, "--train", s3.train, "--out", s3.store, "--workers", "1",
                "--no-progress", "--storage-options", json.dumps(s3.storage_options), "--json")
    return json.loads(proc.stdout)


def _score(cluster: TwoNodes, s3: S3Layout) -> dict[str, Any]:
    """`ecif-ray score --features` with its settings and the storage options in a YAML --config; the manifest."""
    config = s3.workdir / "score.yaml"
    config.write_text(json.dumps({  # JSON is YAML
        "ckpt": s3.ckpt, "train": s3.train, "val": s3.val, "features": s3.store, "out": s3.run, "workers": 2,
        "curvature_segments": 4, "solver": {"preconditioner": "nystrom", "nystrom_rank": 128}, "progress": False,
        "start_timeout_s": 120, "storage_options": s3.storage_options}))
    _cli(cluster, s3, "score", "--config", str(config))
    return json.loads(s3.fs.cat_file(f"{s3.run}/manifest.json"))


def _tables(s3: S3Layout) -> dict[str, pa.Table]:
    """The run's pairs, scores and errors tables as ecif_ray.tables.connect reads them, in identity order."""
    con = connect(s3.run, s3.storage_options)
    order = {"scores": "query, shard, key"}
    return {name: con.sql(f"SELECT * FROM {name} ORDER BY {order.get(name, 'shard, key')}").to_arrow_table()
            for name in ("pairs", "scores", "errors")}


def _on_worker_node(cluster: TwoNodes, pids: set[int]) -> None:
    """Each pid ran on the worker node: its log is under the worker's temp dir, none under the head's."""
    assert pids
    worker, head = set(cluster.worker.worker_logs()), set(cluster.head.worker_logs())
    assert pids <= worker, f"pids {sorted(pids - worker)} have no worker log on the worker node"
    assert not pids & head


def _attempt(read: Callable[[], Any]) -> Any:
    """``read()``, or the exception it raised (asserted on later, after the checks that do not depend on it)."""
    try:
        return read()
    except Exception as exc:
        return exc


# -- the tests (in file order: each builds on the state the one before left on S3) -------------------------------


def test_two_nodes_of_one_cluster(two_nodes: TwoNodes):
    assert two_nodes.joined == two_nodes.address
    for node in (two_nodes.head, two_nodes.worker):
        assert node.proc.poll() is None, node.output.read_text()
        assert (node.temp_dir / "session_latest" / "sockets" / "raylet").is_socket()  # a raylet each


@pytest.fixture(scope="module")
def feature_pass(two_nodes: TwoNodes, s3: S3Layout) -> dict[str, Any]:
    return _features(two_nodes, s3)


def test_features_writes_every_shard_from_the_worker_node(two_nodes: TwoNodes, s3: S3Layout, feature_pass):
    from ecif_ray.tables.feature_store import open_store

    assert feature_pass["exit_code"] == 0
    assert (feature_pass["shards"], feature_pass["shards_written"], feature_pass["shards_skipped"]) == (2, 2, 0)
    assert feature_pass["pairs"] == 128
    assert s3.records(s3.store) == s3.committed()
    store = open_store(s3.store, s3.storage_options)
    assert store.shards() == sorted(s3.shards)
    assert sum(store.read_shard(shard).num_rows for shard in s3.shards) == 128
    # the featurizer actor ran on the worker node (the head has no CPU for it, and the logs say so)
    _on_worker_node(two_nodes, two_nodes.worker.actor_pids(FEATURIZER))
    assert not two_nodes.head.actor_pids(FEATURIZER)


@pytest.fixture(scope="module")
def scored(two_nodes: TwoNodes, s3: S3Layout, feature_pass) -> dict[str, Any]:
    return _score(two_nodes, s3)


def test_score_from_the_store_scores_every_pair_on_the_worker_node(two_nodes: TwoNodes, s3: S3Layout, scored):
    assert scored["status"] == "complete"
    assert scored["config"]["features"] == s3.store and scored["checkpoint"]["path"] == s3.ckpt
    counts = scored["counts"]
    assert (counts["shards"], counts["shards_scored"], counts["shards_skipped"]) == (2, 2, 0)
    pairs = _tables(s3)["pairs"]
    assert pairs.num_rows == 128
    assert len(set(zip(pairs["shard"].to_pylist(), pairs["key"].to_pylist()))) == 128
    assert set(pairs["shard"].to_pylist()) == set(s3.shards)
    assert s3.records(s3.run) == s3.committed()
    info = scored["workers"]["info"]
    assert len(info) == 2 and all(w["host"] == socket.gethostname() for w in info)
    _on_worker_node(two_nodes, {w["pid"] for w in info})


def test_a_rerun_rescores_only_the_shard_whose_commit_record_is_gone(two_nodes: TwoNodes, s3: S3Layout, scored):
    before = _tables(s3)
    gone = s3.shards[1]
    written = s3.modified(s3.run)
    s3.fs.rm_file(f"{s3.run}/_state/shards/{gone}.json")
    assert s3.records(s3.run) == {f"{s3.shards[0]}.json"}
    manifest = _score(two_nodes, s3)
    rewritten = {k for k, t in s3.modified(s3.run).items() if k.endswith(".parquet") and written.get(k) != t}
    assert rewritten and {Path(k).name.removesuffix(".parquet") for k in rewritten} == {gone}  # the shard's files only
    counts = manifest["counts"]
    assert (counts["shards_scored"], counts["shards_skipped"], counts["shards_committed"]) == (1, 1, 2)
    assert [i["shards_scored"] for i in manifest["invocations"]] == [2, 1]
    assert s3.records(s3.run) == s3.committed()
    info = manifest["workers"]["info"]
    assert len(info) == 1  # one pending shard, one worker
    _on_worker_node(two_nodes, {w["pid"] for w in info})
    # This process read the tables before the rerun rewrote the shard's files; reading them again here
    # must give the new files. Asserted last: the resume itself is checked first, from fresh listings.
    same_reader = _attempt(lambda: _tables(s3))
    s3.drop_cached_listings()
    after = _tables(s3)
    for name, table in before.items():
        assert after[name].equals(table), name
    assert not isinstance(same_reader, Exception), (
        "ecif_ray.tables.connect() in a process that read the run before a rerun rewrote a shard's files: "
        f"{type(same_reader).__name__}: {str(same_reader).splitlines()[0][:500]}")
    for name, table in before.items():
        assert same_reader[name].equals(table), name


def test_a_rerun_of_features_rewrites_only_the_shard_whose_commit_record_is_gone(two_nodes: TwoNodes, s3: S3Layout,
                                                                                 feature_pass):
    from ecif_ray.tables.feature_store import open_store

    store = open_store(s3.store, s3.storage_options)
    gone, kept = s3.shards[0], s3.shards[1]
    rows = {shard: store.read_shard(shard) for shard in s3.shards}
    written = s3.modified(s3.store)
    s3.fs.rm_file(f"{s3.store}/_state/shards/{gone}.json")
    assert store.shards() == [kept]
    result = _features(two_nodes, s3)
    rewritten = {k for k, t in s3.modified(s3.store).items() if written.get(k) != t}
    assert {store.features_file(gone), f"_state/shards/{gone}.json"} <= rewritten  # the shard's file and record
    assert not {k for k in rewritten if kept in k}  # nothing of the other shard
    assert (result["exit_code"], result["shards_written"], result["shards_skipped"], result["pairs"]) == (0, 1, 1, 128)
    assert result["pairs_written"] == rows[gone].num_rows
    assert s3.records(s3.store) == s3.committed()
    # As above: this process listed the store before the rerun committed the shard again; a store
    # opened here now must read it. Asserted last, after the checks from fresh listings.
    same_reader = _attempt(lambda: open_store(s3.store, s3.storage_options).read_shard(gone))
    s3.drop_cached_listings()
    store = open_store(s3.store, s3.storage_options)
    assert store.shards() == sorted(s3.shards)
    for shard, table in rows.items():
        assert store.read_shard(shard).equals(table), shard
    assert not isinstance(same_reader, Exception), (
        "a feature store opened in a process that listed it before a rerun committed a shard cannot read that "
        f"shard: {type(same_reader).__name__}: {str(same_reader).splitlines()[0][:500]}")
    assert same_reader.equals(rows[gone])


def test_embeddings_of_the_store_on_s3_are_the_runs_clip_scores(s3: S3Layout, scored, capsys):
    """`ecif-ray embeddings` (driver only, no cluster) over the store on S3, then `ecif-ray sql` over the store:
    every pair's clip_score is the one the run from the same checkpoint wrote into pairs."""
    from ecif_ray.cli import main

    options = json.dumps(s3.storage_options)
    assert main(["embeddings", "--ckpt", s3.ckpt, "--features", s3.store, "--storage-options", options,
                 "--no-progress", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["shards_written"], result["pairs_written"]) == (2, 128)
    assert main(["sql", s3.store, "SELECT shard, key, clip_score, len(image_embedding) AS d FROM embeddings",
                 "--storage-options", options, "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["d"] for r in rows} == {result["dim"]}
    pairs = _tables(s3)["pairs"]
    want = dict(zip(zip(pairs["shard"].to_pylist(), pairs["key"].to_pylist()), pairs["clip_score"].to_pylist()))
    assert {(r["shard"], r["key"]): r["clip_score"] for r in rows} == pytest.approx(want, rel=1e-12)
