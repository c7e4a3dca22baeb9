"""The feature pass: a checkpoint's frozen trunk over a corpus, written once into a feature store
(``tables.feature_store``) by a Ray Data batch-inference pass. ``ecif-ray features`` calls
:func:`run_features`.

1. **Prepare** (driver, no cluster): the checkpoint is loaded once on CPU (a broken one is refused),
   the towers' cut is found as the analysis finds it (``TrunkSplit.for_model`` over the trainable
   subset), the trunk's identity and fingerprint are computed (:func:`trunk_identity`), one dummy
   pair gives the feature columns' shapes, the shards are listed and ``--out`` is checked writable.
2. **Open** the store under its lease (``tables.lease``, one driver at a time): a new store gets
   ``store.json``; an existing one must have the same fingerprint, else it is refused naming both;
   temp files of killed writers are removed; committed shards are skipped.
3. **Ray Data pass** over the pending shards: ``ray.data.from_items`` (one row per shard: id and
   URL) → ``map_batches(ShardFeaturizer, batch_size=1, compute=ActorPoolStrategy(size=N), num_cpus,
   num_gpus)``. Each actor loads the checkpoint once (shipped through the object store), and for
   each shard streams its samples through the project's reader, runs the trunk under ``no_grad``
   ``batch_size`` pairs at a time, streams the features into the shard's Parquet file (temp file,
   then rename), writes its ``errors`` rows and commits it; it returns one small summary row per
   shard, which the driver collects with ``iter_rows``.
4. **Finish**: ``store.json`` records the pass; a :class:`FeatureResult` (exit code as ``score``:
   0, 3 some inputs were bad, 4 some shards failed) is returned.

**Which reader.** Ray Data's ``read_webdataset`` is not used: it yields neither ``shard_index`` (the
sample's ordinal in its tar, bad samples counted, part of every row's identity) nor the project's
error semantics (one ``errors`` row per bad sample with its stage and message, the first of a
repeated key kept, member and pixel limits checked before reading, a truncated tar told from a
storage failure, which is retried and never committed). So the dataset is one row per shard and the
UDF streams the shard with ``data.segments.stream_segments`` / ``collate_segment``, the very code
``ecif-ray score`` reads shards with: the same stages and messages, and the same batches.

**Why decode inside the trunk actor, and write from it.** A store has one file per input shard and a
commit per shard, so all of a shard's rows must meet in one process. Ray Data has no streaming
group-by: ``groupby("shard").map_groups`` is an all-to-all barrier (nothing could commit before the
whole corpus is done, defeating resume), and gathering rows on the driver (``iter_batches``) would
funnel every feature byte through it (ViT-B-32 LoRA: ~300 KB per pair). ``write_parquet`` writes
one file per block with its own names, neither one per shard nor with our metadata or commit
records. So the actor that runs the trunk on a shard also decodes it and writes it (the project's
store helpers, atomic per file, commit record last), with bounded memory: one batch of decoded
images plus the decoder's read-ahead, and at most ``ROW_GROUP_BYTES`` of features. Decoding scales
as in the scoring pass: on a GPU actor ``threads_per_worker`` threads decode and preprocess (torch
itself on one thread), and several actors may share a GPU (``num_gpus_per_worker`` < 1).

**Batching and equality.** ``--batch-size`` defaults to the checkpoint's segment size, so the trunk
sees exactly the batches ``ecif-ray score`` featurizes (consecutive good samples of a shard, in tar
order) and the stored features equal the scorer's own bit for bit; another batch size gives the
same features up to the BLAS kernels' rounding. Features are stored in the dtype the trunk ran in
(``--dtype auto``: float64 for heads, float32 for lora/last-k, as ``score``). Half precision is not
offered: the tail would then see features rounded to ~3 significant digits, a change of the model
the analysis differentiates, not a storage detail; it would need its own fingerprint and a
measured effect on the scores first.

**Failures.** A shard the storage does not deliver (``ShardUnavailable``) is retried in the actor
(``max_attempts``, backoff doubling); after the last attempt it gets one ``errors`` row (stage
``features``), stays uncommitted, and the command exits 4; a rerun retries it. An actor that dies is
restarted by Ray Data and its shard redone (files are named after the shard, so nothing doubles);
Ray Data's default puts no limit on restarts, unlike the scoring pool's ``max_worker_failures``.
Any other exception stops the pass (:class:`FeaturePassFailed`); committed shards stay.

Reading back (``data.feature_source``): ``FeatureStore.iter_shard`` gives numpy rows;
``store_batches`` turns them into featurized ``PairBatch`` es, checked against a task's trunk with
``task_identity`` / ``trunk_fingerprint``; ``ecif-ray score --features`` and ``ECIF.from_checkpoint(...,
features=)`` read them there.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from ecif_ray import __version__
from ecif_ray.config import absolute_local
from ecif_ray.data.feature_source import trunk_fingerprint, trunk_identity
from ecif_ray.data.features import TrunkFeatures
from ecif_ray.data.limits import DEFAULT_LIMITS, ReadLimits
from ecif_ray.data.samples import ErrorRecord, ShardUnavailable
from ecif_ray.data.segments import PairBatch, collate_segment, stream_segments
from ecif_ray.data.shards import Shard, list_shards
from ecif_ray.influence.settings import AnalysisDType, resolve_dtype
from ecif_ray.influence.trunk import TrunkSplit, run_trunk
from ecif_ray.models.checkpoint import Checkpoint, checkpoint_fingerprint, load_checkpoint
from ecif_ray.pipeline.pool import RunInterrupted
from ecif_ray.pipeline.prepare import check_writable, checkpoint_files, fetch_checkpoint
from ecif_ray.pipeline.results import EXIT_INCOMPLETE, EXIT_INPUT_ERRORS, EXIT_OK
from ecif_ray.pipeline.worker import peak_rss_bytes
from ecif_ray.tables.feature_store import (
    FEATURE_COLUMNS,
    FeatureColumn,
    FeatureRows,
    FeatureStore,
    StoreInfo,
)
from ecif_ray.tables.lease import RunLease
from ecif_ray.tables.manifest import now
from ecif_ray.tables.rows import error_rows
from ecif_ray.tables.store import ShardRecord

if TYPE_CHECKING:
    pass

FAILED_STAGE = "features"  # errors-row stage of a shard the storage did not deliver in any attempt
OUTCOME_FIELDS = ("shard", "status", "record", "message", "bytes", "worker", "peak_rss_bytes")
INT_FIELDS = ("bytes", "peak_rss_bytes")


class FeaturePassFailed(RunInterrupted):
    """The Ray Data pass stopped on an unexpected error; what it committed stays, a rerun resumes."""


# -- what a pass is asked to do --------------------------------------------------------------------

@dataclass(frozen=True)
class FeatureJob:
    """Arguments of ``ecif-ray features`` (flags of the same name; see ``cli.features``)."""

    ckpt: str
    train: str | list[str]
    out: str
    batch_size: int | None = None  # pairs per trunk call; default: the checkpoint's segment size
    dtype: AnalysisDType = "auto"
    workers: int | None = None  # actors; default: one per GPU, else one per CPU
    num_gpus_per_worker: float | None = None  # default: 1 when the cluster has GPUs
    threads_per_worker: int = 1
    max_attempts: int = 3
    retry_backoff_s: float = 5.0
    limits: ReadLimits = DEFAULT_LIMITS
    storage_options: dict[str, Any] | None = None
    address: str | None = None
    trusted_arch: str | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        least = {"batch_size": 1, "workers": 1, "threads_per_worker": 1, "max_attempts": 1,
                 "num_gpus_per_worker": 0, "retry_backoff_s": 0}
        for name, bound in least.items():
            value = getattr(self, name)
            if value is not None and value < bound:
                raise ValueError(f"--{name.replace('_', '-')}: must be >= {bound}, got {value}")
        if self.dtype not in ("auto", "float32", "float64"):
            raise ValueError(f"--dtype: auto, float32 or float64, not {self.dtype!r}")


@dataclass(frozen=True)
class FeaturizerSettings:
    """What every actor is built with (plain data: it crosses the Ray boundary)."""

    out: str
    fingerprint: str
    store_id: str
    columns: tuple[FeatureColumn, ...]
    dtype: str
    batch_size: int
    threads: int
    use_gpu: bool
    lineage: dict[str, Any]
    limits: ReadLimits = DEFAULT_LIMITS
    storage_options: dict[str, Any] | None = None
    trusted_arch: str | None = None
    max_attempts: int = 3
    retry_backoff_s: float = 5.0


@dataclass
class FeaturePrep:
    """A validated pass, before any cluster."""

    job: FeatureJob
    store: FeatureStore
    shards: list[Shard]
    checkpoint_dir: Path
    info: StoreInfo  # the store this checkpoint's trunk makes (identity, columns, lineage)
    batch_size: int
    dtype: str


@dataclass
class FeatureResult:
    """What a pass did; ``exit_code`` as ``ecif-ray score``'s."""

    store: str
    fingerprint: str
    trunk: str
    dtype: str
    columns: list[FeatureColumn]
    shards: int
    written: dict[str, ShardRecord]  # committed by this pass
    skipped: dict[str, ShardRecord]  # committed earlier (same fingerprint)
    failed: dict[str, str]  # shard -> why (storage), uncommitted
    bytes_written: int = 0  # size of the features files this pass wrote
    worker_peak_rss: dict[str, int] = field(default_factory=dict)  # actor (node:pid) -> its peak RSS, bytes
    seconds: float = 0.0  # whole pass
    feature_s: float = 0.0  # the Ray Data part
    exit_code: int = EXIT_OK

    @property
    def pairs_written(self) -> int:
        return sum(r.pairs for r in self.written.values())

    @property
    def pairs(self) -> int:
        return self.pairs_written + sum(r.pairs for r in self.skipped.values())

    @property
    def errors_by_stage(self) -> dict[str, int]:
        by_stage: dict[str, int] = {}
        for record in [*self.written.values(), *self.skipped.values()]:
            for stage, n in record.errors_by_stage.items():
                by_stage[stage] = by_stage.get(stage, 0) + n
        if self.failed:
            by_stage[FAILED_STAGE] = by_stage.get(FAILED_STAGE, 0) + len(self.failed)
        return by_stage

    @property
    def pairs_per_s(self) -> float:
        return self.pairs_written / self.feature_s if self.feature_s else 0.0

    @property
    def bytes_per_pair(self) -> float:
        """Bytes per pair on disk (Parquet, compressed) of what this pass wrote."""
        return self.bytes_written / self.pairs_written if self.pairs_written else 0.0

    def to_json(self) -> dict[str, Any]:
        return {"store": self.store, "fingerprint": self.fingerprint, "trunk": self.trunk, "dtype": self.dtype,
                "columns": [c.to_json() for c in self.columns], "shards": self.shards,
                "shards_written": len(self.written), "shards_skipped": len(self.skipped),
                "shards_failed": len(self.failed), "failed": self.failed, "pairs": self.pairs,
                "pairs_written": self.pairs_written, "errors_by_stage": self.errors_by_stage,
                "feature_bytes_per_pair": sum(c.bytes_per_pair for c in self.columns),
                "disk_bytes_per_pair": round(self.bytes_per_pair, 1), "pairs_per_s": round(self.pairs_per_s, 2),
                "feature_s": round(self.feature_s, 3), "seconds": round(self.seconds, 3),
                "worker_peak_rss_bytes": dict(sorted(self.worker_peak_rss.items())), "exit_code": self.exit_code}


# -- the trunk and its identity --------------------------------------------------------------------

@dataclass
class FrozenTrunk:
    """A checkpoint's model in the pass's dtype, with its cut and input pipeline: what computes features."""

    model: nn.Module
    split: TrunkSplit
    trainable: list[str]
    arch: str
    preprocess: Callable
    tokenizer: Callable
    dtype: str
    device: str = "cpu"

    @classmethod
    def from_checkpoint(cls, ckpt: Checkpoint, dtype: str, device: str = "cpu") -> FrozenTrunk:
        """The model cast to ``dtype`` and cut where the analysis of its subset cuts it (as ``InfluenceTask``)."""
        model = ckpt.model.to(device=device, dtype=getattr(torch, dtype)).eval()
        trainable = list(ckpt.meta.param_subset.trainable(model))
        return cls(model=model, split=TrunkSplit.for_model(model, trainable), trainable=trainable,
                   arch=ckpt.meta.arch, preprocess=ckpt.bundle.preprocess, tokenizer=ckpt.bundle.tokenizer,
                   dtype=dtype, device=device)

    def features(self, batch: PairBatch) -> TrunkFeatures:
        """The trunk's outputs for a collated batch: ``InfluenceTask.trunk``'s computation."""
        return run_trunk(self.model, self.split, batch.images.to(self.device, getattr(torch, self.dtype)),
                         batch.tokens.to(self.device))

    def identity(self, limits: ReadLimits = DEFAULT_LIMITS) -> dict[str, Any]:
        return trunk_identity(self.model, self.split, self.trainable, self.arch, self.dtype, self.preprocess,
                              self.tokenizer, limits)

    def columns(self) -> list[FeatureColumn]:
        """The store columns of this trunk's features, from one dummy pair."""
        image = torch.stack([self.preprocess(Image.new("RGB", (32, 32)))])
        tokens = torch.as_tensor(self.tokenizer(["a"])).long()
        batch = PairBatch(shard="", segment=0, keys=[""], shard_indices=[0], captions=["a"], meta=[{}],
                          images=image.float() if not image.is_floating_point() else image, tokens=tokens)
        return feature_columns(self.features(batch))


# -- features <-> rows -------------------------------------------------------------------------------

def feature_columns(features: TrunkFeatures) -> list[FeatureColumn]:
    return [FeatureColumn(column, tuple(int(n) for n in tensor.shape[1:]), str(tensor.dtype).removeprefix("torch."))
            for name, column in FEATURE_COLUMNS.items()
            if (tensor := getattr(features, name)) is not None]


def feature_rows(batch: PairBatch, features: TrunkFeatures) -> FeatureRows:
    """One collated batch and its trunk features as store rows."""
    arrays = {column: getattr(features, name).detach().cpu().numpy() for name, column in FEATURE_COLUMNS.items()
              if getattr(features, name) is not None}
    return FeatureRows(shard=batch.shard, keys=list(batch.keys), shard_index=np.asarray(batch.shard_indices, np.int64),
                       captions=list(batch.captions), meta=[json.dumps(m) for m in batch.meta], arrays=arrays)


# -- one shard (what an actor does) ------------------------------------------------------------------

def write_shard_features(trunk: FrozenTrunk, store: FeatureStore, shard: Shard, settings: FeaturizerSettings,
                         attempt: int = 1, pool: Executor | None = None) -> tuple[ShardRecord, int]:
    """Stream one shard through the reader and the trunk into its features file, write its errors rows,
    commit it; returns the record and the features file's size in bytes. Raises ``ShardUnavailable``
    (nothing committed, the temp file removed) when the storage fails."""
    start = time.perf_counter()
    errors: list[ErrorRecord] = []
    lineage = {**settings.lineage, "attempt": attempt, "device": trunk.device, "batch_size": settings.batch_size}
    segments = stream_segments(shard, segment_size=settings.batch_size, storage_options=settings.storage_options,
                               pool=pool, limits=settings.limits, errors=errors)
    with store.shard_writer(shard.name, settings.columns, lineage) as writer:
        for segment in segments:
            batch = collate_segment(segment, trunk.preprocess, trunk.tokenizer, pool)
            writer.write(feature_rows(batch, trunk.features(batch)))
        features = writer.close()
    errors_file = store.write_errors(shard.name, error_rows(errors), lineage)
    by_stage: dict[str, int] = {}
    for e in errors:
        by_stage[e.stage] = by_stage.get(e.stage, 0) + 1
    record = ShardRecord(shard=shard.name, run_id=settings.store_id, fingerprint=settings.fingerprint,
                         files=[features, *([errors_file] if errors_file else [])], pairs=features.rows,
                         errors=len(errors), errors_by_stage=by_stage, seconds=round(time.perf_counter() - start, 3),
                         attempt=attempt)
    store.commit(record)
    return record, store.file_bytes(features.path)


class ShardFeaturizer:
    """The Ray Data UDF (an actor class): loads the checkpoint once, then featurizes whole shards.

    A plain class: Ray Data makes the actors; in-process it can be called directly. Each call gets a
    batch of shard rows (``shard``, ``url``) and returns one outcome row per shard (:data:`OUTCOME_FIELDS`)."""

    def __init__(self, checkpoint: Any, settings: FeaturizerSettings):
        warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)  # open_clip's
        if not isinstance(checkpoint, dict):  # an ObjectRef of the checkpoint's files
            import ray

            checkpoint = ray.get(checkpoint)
        self.settings = settings
        device = "cuda" if settings.use_gpu and torch.cuda.is_available() else "cpu"
        # As the scoring workers: on a CPU actor the reserved CPUs run torch; on a GPU actor they decode
        # and preprocess images, torch itself on one thread.
        decode_threads = settings.threads if device == "cuda" else 1
        torch.set_num_threads(1 if device == "cuda" else settings.threads)
        with tempfile.TemporaryDirectory(prefix="ecif-ckpt-") as tmp:
            for name, data in checkpoint.items():
                (Path(tmp) / name).write_bytes(data)
            ckpt = load_checkpoint(tmp, trusted_arch=settings.trusted_arch)
        self.trunk = FrozenTrunk.from_checkpoint(ckpt, settings.dtype, device)
        self.pool = ThreadPoolExecutor(decode_threads, thread_name_prefix="decode") if decode_threads > 1 else None
        self.store = FeatureStore(settings.out, settings.storage_options)

    def __call__(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        outcomes = [self.featurize(Shard(url=str(url), name=str(name))) for name, url in zip(batch["shard"],
                                                                                              batch["url"])]
        worker = {"worker": f"{socket.gethostname()}:{os.getpid()}", "peak_rss_bytes": peak_rss_bytes()}
        return {name: np.array([{**o, **worker}[name] for o in outcomes],
                               dtype=np.int64 if name in INT_FIELDS else object) for name in OUTCOME_FIELDS}

    def featurize(self, shard: Shard) -> dict[str, Any]:
        """One shard, retried with backoff while the storage fails; the last failure is an errors row."""
        settings = self.settings
        attempt = 1
        while True:
            try:
                record, size = write_shard_features(self.trunk, self.store, shard, settings, attempt, self.pool)
                return {"shard": shard.name, "status": "ok", "record": json.dumps(record.to_json()), "message": "",
                        "bytes": size}
            except ShardUnavailable as exc:
                if attempt >= settings.max_attempts:
                    message = f"shard {shard.name}: feature pass failed {attempt} times: {exc}"
                    rows = {"shard": [shard.name], "key": [""], "stage": [FAILED_STAGE],
                            "error": [type(exc).__name__], "message": [message]}
                    self.store.write_errors(shard.name, rows, {**settings.lineage, "attempt": attempt})
                    return {"shard": shard.name, "status": "failed", "record": "", "message": str(exc), "bytes": 0}
                time.sleep(settings.retry_backoff_s * 2 ** (attempt - 1))
                attempt += 1


# -- the pass ----------------------------------------------------------------------------------------

def prepare_features(job: FeatureJob) -> FeaturePrep:
    """Everything that needs no cluster (see the module docstring); raises ValueError naming the flag."""
    so = job.storage_options
    checkpoint_dir = fetch_checkpoint(str(absolute_local(job.ckpt)), so)
    ckpt = load_checkpoint(checkpoint_dir, trusted_arch=job.trusted_arch)
    dtype = resolve_dtype(job.dtype, ckpt.meta.param_subset.kind)
    trunk = FrozenTrunk.from_checkpoint(ckpt, dtype)
    identity = trunk.identity(job.limits)
    shards = list_shards(absolute_local(job.train), so)  # type: ignore[arg-type]
    store = FeatureStore(str(absolute_local(job.out)), so)
    check_writable(store.files)
    batch_size = job.batch_size or ckpt.meta.segment_size
    created_by = {"checkpoint": job.ckpt, "checkpoint_sha256": checkpoint_fingerprint(checkpoint_dir),
                  "param_subset": ckpt.meta.param_subset.describe(), "code_version": __version__,
                  "torch": torch.__version__, "open_clip": _open_clip_version()}
    info = StoreInfo(fingerprint=trunk_fingerprint(identity), identity=identity, columns=trunk.columns(),
                     created_by=created_by)
    return FeaturePrep(job=job, store=store, shards=shards, checkpoint_dir=checkpoint_dir, info=info,
                       batch_size=batch_size, dtype=dtype)


def run_features(job: FeatureJob) -> FeatureResult:
    """Write (or complete) the feature store ``job.out`` for ``job.train`` with ``job.ckpt``'s trunk."""
    started = time.perf_counter()
    prep = prepare_features(job)
    store = prep.store
    with RunLease.acquire(store.files, prep.info.store_id):
        info = store.open(prep.info)
        store.files.remove_temp_files()  # no live writer owns one: we hold the lease, no actor has started
        done = store.completed([s.name for s in prep.shards], info.fingerprint)
        pending = [s for s in prep.shards if s.name not in done]
        result = FeatureResult(store=store.url, fingerprint=info.fingerprint, trunk=info.identity["trunk"],
                               dtype=prep.dtype, columns=info.columns, shards=len(prep.shards), written={},
                               skipped=done, failed={})
        if pending:
            t0 = time.perf_counter()
            try:
                _execute(prep, info, pending, result)
            finally:
                result.feature_s = time.perf_counter() - t0
                _record_pass(store, prep, result)
        result.seconds = time.perf_counter() - started
        result.exit_code = (EXIT_INCOMPLETE if result.failed or len(result.written) + len(done) < len(prep.shards)
                            else EXIT_INPUT_ERRORS if result.errors_by_stage else EXIT_OK)
    return result


def _execute(prep: FeaturePrep, info: StoreInfo, pending: Sequence[Shard], result: FeatureResult) -> None:
    """The Ray Data part: one row per pending shard through the actor pool; outcomes into ``result``."""
    import ray
    import ray.data

    from ecif_ray.pipeline.pool import plan_pool, ray_session

    job = prep.job
    with ray_session(job.address):
        size = plan_pool(job.workers, job.num_gpus_per_worker, job.threads_per_worker, None)
        settings = featurizer_settings(prep, info, use_gpu=size.num_gpus > 0)
        checkpoint = ray.put(checkpoint_files(prep.checkpoint_dir))  # shipped once, no shared disk needed
        with _data_context(job.progress):
            items = [{"shard": s.name, "url": s.url} for s in pending]
            dataset = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
                ShardFeaturizer, batch_size=1, compute=ray.data.ActorPoolStrategy(size=min(size.workers, len(items))),
                fn_constructor_kwargs={"checkpoint": checkpoint, "settings": settings}, num_cpus=size.num_cpus,
                num_gpus=size.num_gpus or None)
            try:
                for row in dataset.iter_rows():
                    _collect(row, result)
            except Exception as exc:
                raise FeaturePassFailed(f"the feature pass stopped: {_first_line(exc)}; the {len(result.written)} "
                                        "shards it committed stay, rerun to resume") from exc


def featurizer_settings(prep: FeaturePrep, info: StoreInfo, use_gpu: bool = False) -> FeaturizerSettings:
    """The actors' settings for writing into the opened store ``info`` (also for a ``ShardFeaturizer``
    run in-process)."""
    job = prep.job
    lineage = {"store_fingerprint": info.fingerprint, "identity": info.identity, **prep.info.created_by,
               "columns": [c.to_json() for c in info.columns]}
    return FeaturizerSettings(out=prep.store.url, fingerprint=info.fingerprint, store_id=info.store_id,
                              columns=tuple(info.columns), dtype=prep.dtype, batch_size=prep.batch_size,
                              threads=job.threads_per_worker, use_gpu=use_gpu, lineage=lineage, limits=job.limits,
                              storage_options=job.storage_options, trusted_arch=job.trusted_arch,
                              max_attempts=job.max_attempts, retry_backoff_s=job.retry_backoff_s)


def _collect(row: Mapping[str, Any], result: FeatureResult) -> None:
    worker = str(row["worker"])
    result.worker_peak_rss[worker] = max(result.worker_peak_rss.get(worker, 0), int(row["peak_rss_bytes"]))
    if row["status"] == "ok":
        record = ShardRecord.from_json(json.loads(row["record"]))
        result.written[record.shard] = record
        result.bytes_written += int(row["bytes"])
    else:
        result.failed[str(row["shard"])] = str(row["message"])


@contextlib.contextmanager
def _data_context(progress: bool) -> Iterator[None]:
    """Ray Data's progress bars and start-of-execution log on or off for this pass, restored after."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    saved = ctx.enable_progress_bars, ctx.print_on_execution_start
    ctx.enable_progress_bars = ctx.print_on_execution_start = progress
    try:
        yield
    finally:
        ctx.enable_progress_bars, ctx.print_on_execution_start = saved


def _record_pass(store: FeatureStore, prep: FeaturePrep, result: FeatureResult) -> None:
    """Append this pass to ``store.json`` (under the lease)."""
    info = store.info()
    if info is None:
        return
    info.passes.append({"finished_at": now(), **{k: prep.info.created_by[k] for k in ("checkpoint",
                        "checkpoint_sha256", "code_version")}, "shards_written": len(result.written),
                        "shards_failed": len(result.failed), "pairs_written": result.pairs_written,
                        "batch_size": prep.batch_size, "workers": prep.job.workers,
                        "feature_s": round(result.feature_s, 3),
                        "worker_peak_rss_bytes": dict(sorted(result.worker_peak_rss.items()))})
    store.save_info(info)


def _first_line(exc: BaseException) -> str:
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else type(exc).__name__


def _open_clip_version() -> str:
    import open_clip

    return str(getattr(open_clip, "__version__", "unknown"))

