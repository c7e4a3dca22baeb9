"""Job submission: cluster/start_local_head.sh starts a real Ray head (token auth on, dashboard on
127.0.0.1) in a temp dir, jobs/score.py goes in through the Jobs API, the tables come out; then the
head's process group is stopped. Plus: the example configs and cluster manifests are valid."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from ecif_ray.config import ScoreConfig

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@pytest.fixture
def local_head(ray_auth_token: Path):
    """A head started by cluster/start_local_head.sh. `ray stop` would kill every Ray process on the
    machine (this session's shared cluster too), so the head runs with --block in its own process
    group and is stopped by signalling that group only."""
    gcs, dashboard, *others = free_ports(7)
    temp_dir = tempfile.mkdtemp(prefix="ecif-head-")  # short: Ray's unix sockets live under it
    env = {**os.environ, "RAY": str(BIN / "ray"), "RAY_PORT": str(gcs), "RAY_DASHBOARD_PORT": str(dashboard),
           "RAY_TEMP_DIR": temp_dir, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    flags = ["--num-cpus", "2", "--block"]
    for flag, port in zip(("--ray-client-server-port", "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
                           "--runtime-env-agent-port", "--metrics-export-port"), others):
        flags += [flag, str(port)]
    log = open(Path(temp_dir) / "head.log", "w")  # noqa: SIM115 - closed below
    head = subprocess.Popen(["bash", str(ROOT / "cluster" / "start_local_head.sh"), *flags], env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield f"http://127.0.0.1:{dashboard}", Path(temp_dir)
    finally:
        _stop_group(head)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _stop_group(process: subprocess.Popen) -> None:
    """SIGTERM the head's process group, then SIGKILL whatever is left of it after a grace period."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:  # the group's other members (raylet, gcs, workers) exit too
        try:
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)


def _client(address: str, token: str, timeout: float = 90):
    from ray.job_submission import JobSubmissionClient

    deadline = time.monotonic() + timeout
    while True:
        try:
            return JobSubmissionClient(address, headers={"Authorization": f"Bearer {token}"})
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)


def test_score_job_submitted_through_the_jobs_api(local_head, ray_auth_token, heads_ckpt, digits_corpus, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    address, _ = local_head
    out = tmp_path / "run"
    config = {"ckpt": str(heads_ckpt), "train": str(digits_corpus / "train"), "val": str(digits_corpus / "val"),
              "out": str(out), "workers": 1, "curvature_segments": 4, "progress": False,
              "solver": {"preconditioner": "nystrom", "nystrom_rank": 128}}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(config))

    client = _client(address, ray_auth_token.read_text())
    with pytest.raises(Exception, match=r"[Aa]uthentication"):  # a wrong token is refused
        JobSubmissionClient(address, headers={"Authorization": "Bearer not-the-token"}).list_jobs()
    job = client.submit_job(entrypoint=f"python jobs/score.py --config {tmp_path / 'job.yaml'} --workers 1",
                            runtime_env={"working_dir": str(ROOT), "excludes": [".git", ".venv", "tests"]})
    deadline = time.monotonic() + 240
    while (status := client.get_job_status(job)) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        assert time.monotonic() < deadline, f"job still {status}:\n{client.get_job_logs(job)[-3000:]}"
        time.sleep(1)
    logs = client.get_job_logs(job)
    assert status == JobStatus.SUCCEEDED, logs[-3000:]
    assert "128 scored" in logs and "top 10 flagged pairs" in logs

    pairs = pq.read_table(out / "pairs")
    assert pairs.num_rows == 128 and len(set(pairs["key"].to_pylist())) == 128
    assert (out / "manifest.json").is_file()


@pytest.mark.parametrize("name", ["demo", "laion-s3-vitb32"])
def test_example_configs_are_valid(name):
    config = ScoreConfig.load(str(ROOT / "jobs" / "configs" / f"{name}.yaml"))
    assert config.queries[0] == "val"
    if name.startswith("laion"):
        assert config.train.startswith("s3://") and config.out.startswith("s3://") and config.dtype == "float32"


def test_cluster_manifests_run_the_score_job():
    launcher = yaml.safe_load((ROOT / "cluster" / "ray-cluster.yaml").read_text())
    assert launcher["available_node_types"]["gpu_worker"]["node_config"]["InstanceType"].startswith("g5")
    kinds = {}
    for path in sorted((ROOT / "cluster" / "kuberay").glob("*.yaml")):
        doc = yaml.safe_load(path.read_text())
        kinds[doc["kind"]] = doc
    assert set(kinds) == {"RayCluster", "RayJob"}
    assert "jobs/score.py" in kinds["RayJob"]["spec"]["entrypoint"]
    workers = kinds["RayCluster"]["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert workers["resources"]["limits"]["nvidia.com/gpu"] == "1"
