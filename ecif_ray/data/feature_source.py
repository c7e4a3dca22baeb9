"""Trunk features from a feature store instead of the images: which trunk a store holds, and reading it back.

A store (``tables.feature_store``, written by ``ecif-ray features``) is only ever read by the trunk that
wrote it: its fingerprint is the sha256 of :func:`trunk_identity` — architecture, cut, dtype, every
frozen weight, preprocessing, tokenizer and read limits — and a reader compares it with its own
(:func:`task_identity`) before it attaches a single feature. What differs is named in the error.

:func:`store_batches` gives a committed shard back as the scorer's segments (consecutive good samples in
tar order, ``segment_size`` at a time, the run's exclusions applied after segmenting, exactly as
``data.segments.stream_segments`` does), with the features attached under the reading task's
``trunk_source`` so that ``InfluenceTask.features`` uses them instead of running the trunk. The bad
samples the feature pass met come back as the same ``ErrorRecord`` s (:func:`stored_errors`), so a run
that reads the store has the same ``errors`` table as one that reads the images.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from ecif_ray.config import digest
from ecif_ray.data.exclusions import ExclusionSet
from ecif_ray.data.features import TrunkFeatures
from ecif_ray.data.limits import DEFAULT_LIMITS, ReadLimits
from ecif_ray.data.samples import ErrorRecord
from ecif_ray.data.segments import PairBatch
from ecif_ray.influence.trunk import TrunkSplit
from ecif_ray.tables.feature_store import FEATURE_COLUMNS, STORE_FORMAT, FeatureRows, FeatureStore

if TYPE_CHECKING:
    from ecif_ray.influence.task import InfluenceTask


# -- which trunk -------------------------------------------------------------------------------------

def trunk_identity(model: nn.Module, split: TrunkSplit, trainable: Iterable[str], arch: str, dtype: str,
                   preprocess: Callable, tokenizer: Callable, limits: ReadLimits = DEFAULT_LIMITS) -> dict[str, Any]:
    """What the trunk's outputs are a function of, as JSON: its fingerprint is ``trunk_fingerprint`` of this.

    ``frozen_weights`` digests every tensor but θ and the logit scale/bias: the trunk holds no trainable
    tensor (that is where the towers are cut), so checkpoints that differ only in θ share a store."""
    return {"format": STORE_FORMAT, "arch": arch, "trunk": split.describe(), "dtype": dtype,
            "frozen_weights": frozen_weights_digest(model, trainable), "preprocess": describe_callable(preprocess),
            "tokenizer": describe_tokenizer(tokenizer), "limits": dataclasses.asdict(limits)}


def task_identity(task: InfluenceTask, arch: str, limits: ReadLimits = DEFAULT_LIMITS) -> dict[str, Any]:
    """:func:`trunk_identity` of an analysis task's trunk (what a reader checks a store against)."""
    return trunk_identity(task.bundle.model, task.split, task.names, arch, str(task.dtype).removeprefix("torch."),
                          task.bundle.preprocess, task.bundle.tokenizer, limits)


def trunk_fingerprint(identity: Mapping[str, Any]) -> str:
    return digest(dict(identity))


def frozen_weights_digest(model: nn.Module, trainable: Iterable[str]) -> str:
    """sha256 over every state tensor but ``trainable`` and ``logit_*``, by name, each as float64 (exact
    for float32 weights, so the digest does not change when the model is cast for the analysis)."""
    skip = set(trainable)
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if name in skip or name.startswith("logit_"):
            continue
        values = tensor.detach().to("cpu", torch.float64).contiguous()
        h.update(f"{name}:{list(values.shape)}\n".encode())
        h.update(values.numpy().tobytes())
    return h.hexdigest()


def describe_callable(fn: Callable) -> str:
    """A stable description of a transform: its repr without memory addresses."""
    return re.sub(r" at 0x[0-9a-fA-F]+", "", repr(fn))


def describe_tokenizer(tokenizer: Callable) -> str:
    kind = type(tokenizer)
    parts = [f"{kind.__module__}.{kind.__qualname__}"]
    for attr in ("context_length", "vocab_size"):
        if isinstance(getattr(tokenizer, attr, None), int):
            parts.append(f"{attr}={getattr(tokenizer, attr)}")
    inner = getattr(tokenizer, "tokenizer", None)
    if isinstance(getattr(inner, "name_or_path", None), str):  # open_clip's HFTokenizer
        parts.append(f"hf={inner.name_or_path}")
    return ", ".join(parts)


def open_task_store(url: str, task: InfluenceTask, arch: str, storage_options: Mapping[str, Any] | None = None,
                    limits: ReadLimits = DEFAULT_LIMITS) -> FeatureStore:
    """The store at ``url``, checked to hold ``task``'s trunk (``FeatureStoreMismatch`` naming what differs,
    ``NotAFeatureStore`` when there is no store)."""
    identity = task_identity(task, arch, limits)
    store = FeatureStore(url, storage_options)
    store.check(trunk_fingerprint(identity), identity)
    return store


# -- reading back ------------------------------------------------------------------------------------

def to_trunk_features(rows: FeatureRows, source: str = "", device: torch.device | str | None = None) -> TrunkFeatures:
    """Store rows back as ``TrunkFeatures`` (copies, in the stored dtype); ``source`` should be the reading
    task's ``trunk_source`` once the store's fingerprint has been checked against it."""

    def tensor(column: str) -> torch.Tensor | None:
        values = rows.arrays.get(column)
        if values is None:
            return None
        out = torch.from_numpy(np.array(values, copy=True))
        return out if device is None else out.to(device)

    image, text = tensor(FEATURE_COLUMNS["image"]), tensor(FEATURE_COLUMNS["text"])
    if image is None or text is None:
        raise ValueError(f"shard {rows.shard}: rows lack the image or text feature columns")
    return TrunkFeatures(image, text, tensor(FEATURE_COLUMNS["tokens"]), source)


def store_batches(store: FeatureStore, shard: str, segment_size: int, source: str = "",
                  device: torch.device | str | None = None) -> Iterator[PairBatch]:
    """A committed shard's segments as featurized ``PairBatch`` es: consecutive rows in tar order,
    ``segment_size`` at a time (the scorer's segments), features attached with ``source``. The store
    keeps no pixels: ``images`` is an empty ``[B, 0]`` tensor, ``tokens`` the stored token ids or an empty
    ``[B, 0]`` tensor, so anything that needs images (``--reference``) must read the shard itself."""
    for index, rows in enumerate(store.iter_shard(shard, segment_size)):
        features = to_trunk_features(rows, source, device)
        n = len(rows)
        tokens = features.tokens if features.tokens is not None else torch.empty((n, 0), dtype=torch.long)
        yield PairBatch(shard=shard, segment=index, keys=rows.keys, shard_indices=[int(i) for i in rows.shard_index],
                        captions=rows.captions, meta=rows.meta_dicts(), images=torch.empty((n, 0)), tokens=tokens,
                        features=features)


def stored_errors(store: FeatureStore, shard: str) -> list[ErrorRecord]:
    """The bad samples the feature pass met in a committed shard, as the reader's own error records."""
    rows = store.shard_errors(shard).to_pylist()
    return [ErrorRecord(shard=r["shard"], key=r["key"], stage=r["stage"], error=r["error"], message=r["message"])
            for r in rows]


def stored_segments(store: FeatureStore, shard: str, segment_size: int, task: InfluenceTask,
                    exclude: ExclusionSet | None = None) -> Iterator[PairBatch]:
    """:func:`store_batches` for ``task`` (features on its device, under its ``trunk_source``) with the
    run's exclusions applied after segmenting, as the image reader applies them; empty segments dropped."""
    for batch in store_batches(store, shard, segment_size, task.trunk_source, task.device):
        kept = batch.without(exclude) if exclude else batch
        if kept is not None:
            yield kept
