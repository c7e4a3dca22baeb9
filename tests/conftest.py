"""Shared fixtures: a real S3 endpoint on loopback (moto server mode) and webdataset shard writers.

The S3 server is started once per session (about a second) and every test gets its own fresh
bucket, so tests never see each other's objects.
"""

from __future__ import annotations

import io
import tarfile
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

# ---------------------------------------------------------------------------------------------
# S3 on loopback


@dataclass(frozen=True)
class S3Server:
    """A running moto S3 server; ``storage_options`` is what s3fs / fsspec need to reach it."""

    endpoint_url: str
    storage_options: dict[str, Any]

    def filesystem(self):
        import s3fs

        return s3fs.S3FileSystem(**self.storage_options)


@dataclass(frozen=True)
class S3Bucket:
    """A fresh, empty bucket on the test server."""

    name: str
    server: S3Server
    fs: Any = field(repr=False)  # s3fs.S3FileSystem

    @property
    def url(self) -> str:
        return f"s3://{self.name}"

    @property
    def storage_options(self) -> dict[str, Any]:
        return self.server.storage_options

    def put(self, local: str | Path, key: str) -> str:
        """Upload a local file; returns its s3:// URL."""
        url = f"{self.url}/{key}"
        self.fs.put_file(str(local), url)
        return url


_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",  # never wait on an instance-metadata endpoint
}


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """A real S3 API (moto's server mode) on 127.0.0.1, with dummy credentials in the environment."""
    from moto.server import ThreadedMotoServer

    with pytest.MonkeyPatch.context() as mp:
        for name, value in _AWS_ENV.items():
            mp.setenv(name, value)
        for name in ("AWS_PROFILE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
            mp.delenv(name, raising=False)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        try:
            host, port = server.get_host_and_port()
            endpoint = f"http://{host}:{port}"
            options = {
                "key": _AWS_ENV["AWS_ACCESS_KEY_ID"],
                "secret": _AWS_ENV["AWS_SECRET_ACCESS_KEY"],
                "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"},
            }
            yield S3Server(endpoint_url=endpoint, storage_options=options)
        finally:
            server.stop()


@pytest.fixture
def s3_bucket(s3_server: S3Server) -> S3Bucket:
    """A new bucket for this test (unique name, so listings never leak between tests)."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    client = boto3.client("s3", endpoint_url=s3_server.endpoint_url, region_name="us-east-1")
    client.create_bucket(Bucket=name)  # s3fs.mkdir would send a LocationConstraint us-east-1 rejects
    return S3Bucket(name=name, server=s3_server, fs=s3_server.filesystem())


# ---------------------------------------------------------------------------------------------
# webdataset shards


def image_bytes(fmt: str = "PNG", color: tuple[int, int, int] = (200, 30, 30), size: int = 8) -> bytes:
    """A small solid-colour image encoded as ``fmt`` (PNG, JPEG, WEBP)."""
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format=fmt)
    return buf.getvalue()


def sample_members(
    key: str, caption: str | bytes | None = "a photo of a cat.", image: bytes | None = None, ext: str = "png"
) -> list[tuple[str, bytes]]:
    """Members of one webdataset sample: ``<key>.<ext>`` image and ``<key>.txt`` caption."""
    members = [(f"{key}.{ext}", image if image is not None else image_bytes("JPEG" if ext == "jpg" else "PNG"))]
    if caption is not None:
        members.append((f"{key}.txt", caption.encode() if isinstance(caption, str) else caption))
    return members


def write_tar(path: str | Path, members: Sequence[tuple[str, bytes]]) -> Path:
    """Write ``(name, data)`` members in the given order as a plain tar (what TarWriter writes)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0  # byte-identical shards for identical content
            tar.addfile(info, io.BytesIO(data))
    return path


def write_shard(path: str | Path, n: int, *, prefix: str = "", caption: str = "a photo of sample {i}.") -> Path:
    """A clean shard of ``n`` samples keyed ``{prefix}{i:06d}``, each with a distinct colour."""
    members: list[tuple[str, bytes]] = []
    for i in range(n):
        color = ((37 * i) % 256, (91 * i) % 256, (151 * i) % 256)
        members += sample_members(f"{prefix}{i:06d}", caption.format(i=i), image_bytes(color=color))
    return write_tar(path, members)


@dataclass(frozen=True)
class Wds:
    """The shard-writing helpers, as a fixture so any test module can use them without imports."""

    image_bytes = staticmethod(image_bytes)
    sample_members = staticmethod(sample_members)
    write_tar = staticmethod(write_tar)
    write_shard = staticmethod(write_shard)


@pytest.fixture(scope="session")
def wds() -> Wds:
    return Wds()


# ---------------------------------------------------------------------------------------------
# A tiny real corpus (scikit-learn digits) and a micro model fine-tuned on it


@pytest.fixture(scope="session")
def digits_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Digits corpus with 20% swap-class noise: 480 pretrain, 128 train, 64 val, 64 test pairs."""
    from ecif_ray.data.corpus import CorpusSpec, build_corpus

    out = tmp_path_factory.mktemp("digits") / "corpus"
    build_corpus(CorpusSpec(dataset="digits", out=out, noise=0.2, shard_size=64, seed=0, pretrain_size=480,
                            train_size=128, val_size=64, test_size=64), progress=False)
    return out


@pytest.fixture(scope="session")
def micro_pretrained(digits_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ecif-micro trained (all parameters) on the clean pretrain split."""
    from ecif_ray.training import TrainConfig, train

    out = tmp_path_factory.mktemp("ckpt") / "pre"
    return train(TrainConfig(train=str(digits_corpus / "pretrain"), arch="ecif-micro", params={"kind": "all"},
                             segment_size=32, epochs=30, lr=3e-3, delta=1e-4, seed=0, out=str(out), progress=False,
                             segments_per_step=4))  # the recipe the fidelity expectations were measured on


@pytest.fixture(autouse=True, scope="session")
def _single_torch_thread() -> Iterator[None]:
    """Small models on a shared 2-core machine run far faster single-threaded (OpenMP barriers
    stall when the other core is busy); Ray actors use one thread each for the same reason."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# ---------------------------------------------------------------------------------------------
# Ray, a fine-tuned checkpoint to score with, and one scored run shared by the pipeline tests


@pytest.fixture(scope="session")
def ray_auth_token(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Token authentication stays on (Ray 2.60's default), with the token in a temp file instead of
    ~/.ray/auth_token. Every Ray process the tests start (local cluster, `ray start`, job drivers)
    inherits RAY_AUTH_TOKEN_PATH; ray.init()/`ray start` then turn token mode on by themselves."""
    import secrets

    path = tmp_path_factory.mktemp("ray-auth") / "auth_token"
    path.write_text(secrets.token_hex(32))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_AUTH_TOKEN_PATH", str(path))
        mp.delenv("RAY_AUTH_TOKEN", raising=False)
        yield path


@pytest.fixture(scope="session")
def ray_cluster(ray_auth_token: Path) -> Iterator[str]:
    """One local Ray cluster for the whole session (ray.init costs ~10 s here); yields its address.
    Four logical CPUs: two single-threaded workers, plus room for replacements and a second driver."""
    import ray

    ray.init(num_cpus=4, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def heads_ckpt(digits_corpus: Path, micro_pretrained: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """micro_pretrained with its projection heads fine-tuned on the noisy train split (δ = 1e-2)."""
    from ecif_ray.training import TrainConfig, train

    out = tmp_path_factory.mktemp("ckpt") / "heads"
    return train(TrainConfig(train=str(digits_corpus / "train"), init=str(micro_pretrained), params={"kind": "heads"},
                             segment_size=16, epochs=2, delta=1e-2, out=str(out), progress=False))


@pytest.fixture(scope="session")
def score_config(heads_ckpt: Path, digits_corpus: Path):
    """``make(out, **fields)``: a ScoreConfig with test-sized settings (4-segment curvature sample,
    Nyström-preconditioned CG, no progress bars); keyword arguments override any field."""
    from ecif_ray.config import ScoreConfig

    def make(out: str | Path, **fields: Any) -> ScoreConfig:
        defaults: dict[str, Any] = dict(ckpt=str(heads_ckpt), train=str(digits_corpus / "train"),
                                        val=str(digits_corpus / "val"), out=str(out), workers=2,
                                        curvature_segments=4, progress=False,
                                        solver={"preconditioner": "nystrom", "nystrom_rank": 128})
        return ScoreConfig(**{**defaults, **fields})

    return make


@pytest.fixture(scope="session")
def scored_config(score_config, digits_corpus: Path):
    """``make(out, **fields)``: the config of ``scored_run`` (val and task queries, trace-back of four
    mispredicted test examples), for reruns of it."""

    def make(out: str | Path, **fields: Any):
        defaults = {"queries": ["val", "task"], "test": str(digits_corpus / "test"),
                    "trace": {"examples": 4, "top_k": 3, "rank": 64}}
        return score_config(out, **{**defaults, **fields})

    return make


@pytest.fixture(scope="session")
def scored_run(ray_cluster: str, scored_config, tmp_path_factory: pytest.TempPathFactory):
    """The digits train split scored by two workers (see ``scored_config``)."""
    from ecif_ray.pipeline import run_score

    return run_score(scored_config(tmp_path_factory.mktemp("runs") / "two-workers"))
