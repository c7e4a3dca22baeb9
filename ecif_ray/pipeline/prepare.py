"""Step 1 of a run, before any cluster: check everything that can be checked, fix the run's identity.

``prepare(config)`` fetches and loads the checkpoint once (CPU) to refuse a broken one, lists the
shards, reads the exclusions, and computes the fingerprint of what the scores mean
(``ScoreConfig.score_inputs`` plus shard ids, checkpoint sha256 and the resolved segment size, N
and δ). A bad run is refused here with a message naming the field.
"""

from __future__ import annotations

import dataclasses
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

from ecif_ray.config import ScoreConfig, digest
from ecif_ray.data.exclusions import ExclusionSet, read_exclusions
from ecif_ray.data.feature_source import task_identity, trunk_fingerprint
from ecif_ray.data.shards import Shard, list_shards
from ecif_ray.influence.settings import resolve_dtype
from ecif_ray.influence.task import InfluenceTask
from ecif_ray.models.checkpoint import (
    ANCHOR_FILE,
    META_FILE,
    WEIGHTS_FILE,
    CheckpointError,
    checkpoint_fingerprint,
    load_checkpoint,
)
from ecif_ray.models.reference import ReferenceModel
from ecif_ray.tables.feature_store import FeatureStore, FeatureStoreMismatch, NotAFeatureStore, StoreInfo
from ecif_ray.tables.store import RunStore

CHECKPOINT_FILES = (META_FILE, WEIGHTS_FILE, ANCHOR_FILE)


@dataclass(frozen=True)
class CheckpointInfo:
    """What a run needs to know of its checkpoint; recorded as the manifest's ``checkpoint``."""

    path: str  # as given in the config
    sha256: str
    arch: str
    param_subset: str
    logit_scale: float
    delta: float  # the training δ (the analysis δ follows from config.damping, after the curvature pass)
    segment_size: int
    n_train: int
    dim: int
    trunk: str
    dtype: str

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class Prepared:
    """A validated run, before any cluster is involved."""

    config: ScoreConfig
    store: RunStore
    shards: list[Shard]
    val: list[Shard]
    test: list[Shard]
    exclude: ExclusionSet | None
    checkpoint_dir: Path
    checkpoint: CheckpointInfo
    score_inputs: dict[str, Any]
    fingerprint: str
    run_id: str
    reference_dir: Path | None = None  # a reference given as a checkpoint directory (shipped to the workers)
    features: StoreInfo | None = None  # the feature store the train shards are read from (checked, complete)


def prepare(config: ScoreConfig) -> Prepared:
    """Resolve and check everything that needs no cluster; raise ValueError naming the field."""
    so, paths = config.storage_options, config.paths
    checkpoint_dir = fetch_checkpoint(paths.ckpt, so)
    checkpoint, task = describe_checkpoint(checkpoint_dir, config)
    shards = list_shards(paths.train, so)
    features = check_features(paths.features, so, task, checkpoint.arch, config, shards) if paths.features else None
    val = list_shards(paths.val, so) if "val" in config.queries else []
    test = list_shards(paths.test, so) if "task" in config.queries or config.trace else []
    exclude = read_exclusions(paths.exclude, so) if paths.exclude else None
    reference_dir, reference = describe_reference(config)
    inputs = config.score_inputs()
    if reference is not None:  # only when set: runs made without one keep their fingerprint
        inputs["reference"] = reference
    inputs.update(train=[s.name for s in shards], val=[s.name for s in val] or None,
                  test=[s.name for s in test] or None, checkpoint_sha256=checkpoint.sha256,
                  segment_size=checkpoint.segment_size, n_train=checkpoint.n_train, delta=checkpoint.delta,
                  exclude=_exclusion_digest(exclude))
    fingerprint = digest(inputs)
    store = RunStore(paths.out, so)
    check_writable(store)
    return Prepared(config=config, store=store, shards=shards, val=val, test=test,
                    exclude=exclude, checkpoint_dir=checkpoint_dir, checkpoint=checkpoint, score_inputs=inputs,
                    fingerprint=fingerprint, run_id=config.run_id or fingerprint[:12], reference_dir=reference_dir,
                    features=features)


def check_features(url: str, so: dict[str, Any] | None, task: InfluenceTask, arch: str, config: ScoreConfig,
                   shards: list[Shard]) -> StoreInfo:
    """The feature store the run reads: it must hold this checkpoint's trunk (fingerprint) and every train
    shard, committed; otherwise a ValueError naming the store and what is missing. Not part of the run's
    fingerprint: the scores are the same as from the images, so a run may switch between the two on resume."""
    identity = task_identity(task, arch, config.limits.read_limits())
    store = FeatureStore(url, so)
    try:
        info = store.check(trunk_fingerprint(identity), identity)
    except (NotAFeatureStore, FeatureStoreMismatch) as exc:
        raise ValueError(str(exc)) from None
    names = [s.name for s in shards]
    committed = store.completed(names, info.fingerprint)  # once: it reads every shard's record
    missing = [n for n in names if n not in committed]
    if missing:
        raise ValueError(f"features: {store.url} lacks {len(missing)} of the {len(names)} train shards (e.g. "
                         f"{', '.join(missing[:3])}); complete it with `ecif-ray features --ckpt {config.ckpt} "
                         f"--train <the same shards> --out {url}`, or score without --features")
    return info


def check_writable(store: RunStore) -> None:
    """Refuse an ``out`` that is a file or cannot be written (permissions, a read-only bucket) before any
    cluster starts, by writing and removing one probe file the way every table file is written."""
    try:
        if store.fs.isfile(store.root):
            raise ValueError(f"out: {store.url} is a file; give a directory (new, or a run to resume)")
        probe = f".write-probe-{uuid.uuid4().hex}"
        store.put(probe, b"")
        store.remove(probe)
    except OSError as exc:
        raise ValueError(f"out: {store.url}: cannot write there ({type(exc).__name__}: {exc})") from exc


def fetch_checkpoint(url: str, storage_options: dict[str, Any] | None, field: str = "ckpt") -> Path:
    """A local directory holding the checkpoint (remote checkpoints are downloaded once)."""
    fs, path = url_to_fs(url, **(storage_options or {}))
    if isinstance(fs, LocalFileSystem):
        if not Path(path).is_dir():
            raise FileNotFoundError(f"{field}: {url}: no such checkpoint directory")
        return Path(path)
    local = Path(tempfile.mkdtemp(prefix="ecif-ckpt-"))
    for name in CHECKPOINT_FILES:
        try:
            (local / name).write_bytes(fs.cat_file(f"{path.rstrip('/')}/{name}"))
        except FileNotFoundError as exc:
            raise CheckpointError(f"{field}: {url}: missing {name}") from exc
    return local


def describe_reference(config: ScoreConfig) -> tuple[Path | None, str | None]:
    """The reference model checked up front (loaded once on CPU) and its identity for the fingerprint:
    (its local checkpoint directory or None for an open_clip ARCH:TAG, sha256 or the tag)."""
    spec = config.reference
    if spec is None:
        return None, None
    if Path(spec).is_dir() or "://" in spec:
        local = fetch_checkpoint(spec, config.storage_options, field="reference")
        ReferenceModel.load(str(local), trusted_arch=config.trusted_arch)
        return local, checkpoint_fingerprint(local)
    ReferenceModel.load(spec)  # an open_clip tag: its weights are downloaded here, as on the workers
    return None, spec


def describe_checkpoint(path: Path, config: ScoreConfig) -> tuple[CheckpointInfo, InfluenceTask]:
    """Load the checkpoint once (CPU) to refuse a broken one up front; keep what the run needs (and the
    task, whose trunk a feature store is checked against)."""
    ckpt = load_checkpoint(path, trusted_arch=config.trusted_arch)
    meta = ckpt.meta
    n_train = config.n_train or meta.training.get("n_pairs")
    if not n_train:
        raise ValueError("n_train: the checkpoint records no training pair count (training.n_pairs); set n_train")
    delta = meta.delta
    if delta <= 0:
        if config.damping in ("exact", "auto"):
            raise ValueError("damping: the checkpoint was trained with δ = 0; set damping to a number > 0")
        delta = float(config.damping)
    dtype = resolve_dtype(config.dtype, meta.param_subset.kind)
    ckpt.model.to(getattr(torch, dtype))
    task = InfluenceTask.from_checkpoint(ckpt, n_train=int(n_train), negative_term=config.negative_term,
                                         delta=delta)
    info = CheckpointInfo(path=str(config.ckpt), sha256=checkpoint_fingerprint(path), arch=meta.arch,
                          param_subset=meta.param_subset.describe(), logit_scale=meta.logit_scale, delta=delta,
                          segment_size=config.segment_size or meta.segment_size, n_train=int(n_train),
                          dim=task.dim, trunk=task.split.describe(), dtype=dtype)
    return info, task


def checkpoint_files(path: Path) -> dict[str, bytes]:
    """The checkpoint's files, shipped to workers through the object store (no shared disk needed)."""
    return {name: (path / name).read_bytes() for name in CHECKPOINT_FILES}


def _exclusion_digest(exclude: ExclusionSet | None) -> str | None:
    if not exclude:
        return None
    return digest({"pairs": sorted(exclude.pairs), "keys": sorted(exclude.keys)})
