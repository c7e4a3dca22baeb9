"""The worker: one model, loaded once, serving the three kinds of work of a scoring run.

``InfluenceWorker`` is a plain class; ``pipeline.pool`` turns it into a Ray actor (one per GPU, or
one per CPU slot with a single torch thread). Keeping Ray out of it means the same object can be
exercised in-process, and that everything crossing the Ray boundary is plain data: numpy arrays
for vectors, dataclasses for requests and results.

1. ``query_gradients``: the query gradients g' (validation loss, zero-shot task loss).
2. ``load_curvature`` / ``ggn``: hold curvature-sample groups, answer G·V for them.
3. ``score_shard``: stream one shard's scoring (see ``pipeline.shard``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import resource
import socket
import sys
import tempfile
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ecif_ray.data.exclusions import ExclusionSet
from ecif_ray.data.samples import DEFAULT_LIMITS, ErrorRecord, ReadLimits
from ecif_ray.data.segments import PairBatch, Segment, load_segments
from ecif_ray.data.shards import Shard
from ecif_ray.influence.curvature import curvature_stacks, ggn_sum
from ecif_ray.influence.engine import feature_bytes_per_pair
from ecif_ray.influence.queries import ExampleQuery, ValidationQuery, ZeroShotQuery, stack_queries
from ecif_ray.influence.sample import CurvatureGroup, CurvatureRequest, choose_segments
from ecif_ray.influence.task import InfluenceTask, SegmentStack
from ecif_ray.influence.traceback import CurvatureBasis, mispredicted
from ecif_ray.models.checkpoint import load_checkpoint
from ecif_ray.models.reference import ReferenceModel
from ecif_ray.models.zeroshot import find_classes
from ecif_ray.pipeline.shard import SegmentDone, ShardInputs, ShardJob, score_shard
from ecif_ray.tables.feature_store import FeatureStore
from ecif_ray.tables.store import RunStore, ShardRecord

TEST_SEGMENT_SIZE = 256  # zero-shot loss is per image: batching only bounds memory


@dataclass(frozen=True)
class WorkerSettings:
    """The run-wide settings every worker is built with."""

    out: str
    dtype: str
    threads: int
    use_gpu: bool
    n_train: int
    delta: float
    negative_term: str
    segment_size: int
    ggn_chunk: int
    exclude: ExclusionSet | None = None
    storage_options: dict[str, Any] | None = None
    limits: ReadLimits = DEFAULT_LIMITS
    trusted_arch: str | None = None  # the one model source outside the builtin configs the checkpoint may name
    reference: str | None = None  # models.reference spec: ARCH:TAG, or a checkpoint shipped as reference_files
    reference_files: Any = None  # ObjectRef of a reference checkpoint's files (put once, shared by the actors)
    features: str | None = None  # feature store the train shards' trunk features are read from (driver-checked)


@dataclass(frozen=True)
class QuerySpec:
    """Which query gradients to compute, from which shards."""

    names: tuple[str, ...]
    val: tuple[Shard, ...] = ()
    test: tuple[Shard, ...] = ()
    test_spec: str | list[str] | None = None  # for finding classes.json next to the test shards
    classes: str | None = None
    trace_examples: int = 0  # mispredicted test examples to add as one query each ("<shard>/<key>")


@dataclass(frozen=True)
class QueryResult:
    names: list[str]  # the named queries, then one per traced test example
    gradients: np.ndarray  # [Q, D]
    losses: np.ndarray  # [Q]
    pairs: dict[str, int]  # examples each named query was computed on
    errors: list[ErrorRecord]  # bad samples among the query inputs (reported, not scored)
    traced: list[str]  # the names of the trace-back examples (a suffix of names)


class InfluenceWorker:
    """Holds the model (once), the curvature groups it was given, and nothing else between calls."""

    def __init__(self, checkpoint_files: dict[str, bytes], settings: WorkerSettings):
        warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)  # open_clip's
        self.settings = settings
        self.device = "cuda" if settings.use_gpu and torch.cuda.is_available() else "cpu"
        # The reserved CPUs do the actor's CPU work: torch's math on a CPU actor; on a GPU actor
        # (where one thread decoding JPEGs is the bottleneck, BENCHMARKS.md §5) image decoding and
        # preprocessing, with torch itself on one thread (its setting is process-wide, and T
        # decode threads each starting T-thread ops would oversubscribe the CPUs).
        decode_threads = settings.threads if self.device == "cuda" else 1
        torch.set_num_threads(1 if self.device == "cuda" else settings.threads)
        self.task = _load_task(checkpoint_files, settings, self.device)
        bundle = self.task.bundle
        pool = ThreadPoolExecutor(decode_threads, thread_name_prefix="decode") if decode_threads > 1 else None
        self.inputs = ShardInputs(segment_size=settings.segment_size, preprocess=bundle.preprocess,
                                  tokenizer=bundle.tokenizer, exclude=settings.exclude,
                                  storage_options=settings.storage_options, pool=pool, limits=settings.limits,
                                  reference=_load_reference(settings, self.device),
                                  features=None if settings.features is None
                                  else FeatureStore(settings.features, settings.storage_options))
        self.store = RunStore(settings.out, settings.storage_options)
        self.curvature: dict[int, list[SegmentStack]] = {}
        self.ready_rss = peak_rss_bytes()  # the floor: interpreter, libraries and the model, before any work

    def info(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "host": socket.gethostname(), "device": self.device, "dim": self.task.dim,
                "dtype": str(self.task.dtype).removeprefix("torch."), "trunk": self.task.split.describe()}

    def memory(self) -> dict[str, Any]:
        """This actor's process, its peak resident set size so far and that peak when the model was loaded
        (bytes); the difference is what the work itself took."""
        return {"pid": os.getpid(), "host": socket.gethostname(), "peak_rss_bytes": peak_rss_bytes(),
                "ready_peak_rss_bytes": self.ready_rss}

    # -- queries -------------------------------------------------------------------------------

    def query_gradients(self, spec: QuerySpec) -> QueryResult:
        """g' for each named query, then for each mispredicted test example when tracing back."""
        parts, pairs, errors, traced = [], {}, [], []
        test: list[PairBatch] = []
        if spec.test:
            test, bad = self._load(spec.test, TEST_SEGMENT_SIZE, "test")
            errors += bad
        classes = find_classes(spec.test_spec, spec.classes, self.settings.storage_options, test) if test else None
        for name in spec.names:
            if name == "val":
                batches, bad = self._load(spec.val, self.settings.segment_size, "val")
                errors += bad
                query = ValidationQuery(batches, name="val")
            else:
                batches, query = test, ZeroShotQuery(test, classes, name="task")
            parts.append(query.gradients(self.task))
            pairs[name] = sum(len(b) for b in batches)
        if spec.trace_examples and test:
            wrong = mispredicted(self.task, test, classes, spec.trace_examples)
            if wrong:
                examples = ExampleQuery(wrong, classes).gradients(self.task)
                parts.append(examples)
                traced = list(examples.names)
        stacked = stack_queries(parts)
        return QueryResult(stacked.names, _numpy(stacked.gradients), _numpy(stacked.losses), pairs, errors, traced)

    def _load(self, shards: tuple[Shard, ...], size: int, what: str) -> tuple[list[PairBatch], list[ErrorRecord]]:
        bundle = self.task.bundle
        batches, bad = load_segments(list(shards), segment_size=size, preprocess=bundle.preprocess,
                                     tokenizer=bundle.tokenizer, storage_options=self.settings.storage_options,
                                     limits=self.settings.limits)
        if not batches:
            raise ValueError(f"{what}: no usable samples in {[s.url for s in shards][:3]} ({len(bad)} bad)")
        return batches, bad

    # -- curvature -----------------------------------------------------------------------------

    def load_curvature(self, request: CurvatureRequest) -> CurvatureGroup:
        """Stream the shard and hold the trunk features of the segments the plan chooses (never its
        images). Choosing needs the shard's segment count, so while the quota can still take every
        segment they are featurized as they stream (one pass: the default, every segment up to the
        cap); past it a second pass featurizes the chosen ones."""
        kept: list[PairBatch] = []
        count = 0
        for segment in self._segments(request.shard):
            count += 1
            if count <= request.quota:
                kept.append(self._featurized(segment))
            elif kept:
                kept = []  # too many segments: choose among all of them, below
        chosen = choose_segments(request.shard.name, count, request.quota, request.seed)
        if count > request.quota:
            wanted = set(chosen)
            kept = [self._featurized(seg) for i, seg in enumerate(self._segments(request.shard)) if i in wanted]
        self.curvature[request.group] = curvature_stacks(self.task, kept)
        return CurvatureGroup(group=request.group, shard=request.shard.name, segments=tuple(b.segment for b in kept),
                              pairs=sum(len(b) for b in kept), shard_segments=count)

    def _segments(self, shard: Shard) -> Iterator[Segment | PairBatch]:
        return self.inputs.segments(self.task, shard, [])  # bad samples are reported by the scoring pass

    def _featurized(self, segment: Segment | PairBatch) -> PairBatch:
        """The segment collated, its trunk features attached and its images dropped."""
        batch = self.task.featurize(self.inputs.collate(segment))
        return dataclasses.replace(batch, images=batch.images[:0])

    def feature_bytes_per_pair(self, shard: Shard) -> int:
        """Bytes of trunk features per pair (the curvature cap's unit), from the shard's first segment."""
        first = next(self._segments(shard), None)
        if first is None:
            raise ValueError(f"train: {shard.name}: no readable pairs to size the curvature sample with")
        return feature_bytes_per_pair(self.task, self.inputs.collate(first))

    def ggn(self, groups: list[int], vectors: np.ndarray) -> list[np.ndarray]:
        """Σ_{m ∈ group} J_mᵀ Λ_m J_m V for each requested group (unnormalised, in request order)."""
        V = torch.tensor(vectors, device=self.task.device, dtype=self.task.dtype)  # a copy: Ray's arrays are read-only
        return [_numpy(ggn_sum(self.task, self.curvature[g], V, self.settings.ggn_chunk)) for g in groups]

    def drop_curvature(self) -> None:
        self.curvature.clear()

    # -- scoring -------------------------------------------------------------------------------

    def score_shard(self, job: ShardJob, directions: np.ndarray,
                    basis: tuple[np.ndarray, np.ndarray, float] | None = None) -> Iterator[SegmentDone | ShardRecord]:
        """Stream one shard (``pipeline.shard``); ``basis`` = G's eigenpairs (U, λ) and the analysis δ
        when tracing back."""
        vectors = torch.tensor(directions, device=self.task.device, dtype=self.task.dtype)
        curvature = None
        if basis is not None:
            U, eigenvalues = (torch.tensor(a, device=self.task.device, dtype=self.task.dtype) for a in basis[:2])
            curvature = CurvatureBasis(U=U, eigenvalues=eigenvalues, delta=float(basis[2]))
        yield from score_shard(self.task, self.inputs, job, vectors, self.store, curvature)


def peak_rss_bytes() -> int:
    """The calling process's peak resident set size in bytes.

    On Linux ``VmHWM`` of /proc/self/status: ``ru_maxrss`` (KiB) there also counts the parent's RSS at
    the fork that preceded this process's exec, so a small driver started by a large process would
    report the parent's size. Elsewhere ``ru_maxrss`` (bytes on macOS, KiB otherwise)."""
    with contextlib.suppress(OSError, StopIteration, ValueError):
        with open("/proc/self/status") as status:
            line = next(line for line in status if line.startswith("VmHWM:"))
        return int(line.split()[1]) * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


@contextlib.contextmanager
def _shipped(files: dict[str, bytes]) -> Iterator[str]:
    """A temporary checkpoint directory holding the files the driver shipped (no shared filesystem)."""
    with tempfile.TemporaryDirectory(prefix="ecif-ckpt-") as tmp:
        for name, data in files.items():
            (Path(tmp) / name).write_bytes(data)
        yield tmp


def _load_task(files: dict[str, bytes], settings: WorkerSettings, device: str) -> InfluenceTask:
    """Load the checkpoint the driver shipped, once."""
    with _shipped(files) as path:
        ckpt = load_checkpoint(path, device=device, trusted_arch=settings.trusted_arch)
    ckpt.model.to(getattr(torch, settings.dtype))
    return InfluenceTask.from_checkpoint(ckpt, n_train=settings.n_train, negative_term=settings.negative_term,
                                         delta=settings.delta)


def _load_reference(settings: WorkerSettings, device: str) -> ReferenceModel | None:
    """The reference model: from the files the driver shipped, or by its open_clip name."""
    if settings.reference is None:
        return None
    if settings.reference_files is None:
        return ReferenceModel.load(settings.reference, device)
    import ray

    with _shipped(ray.get(settings.reference_files)) as path:
        return ReferenceModel.load(path, device, trusted_arch=settings.trusted_arch)


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().cpu().numpy()
