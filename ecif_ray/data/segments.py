"""Segments: the fixed partition of training pairs into contrastive batches (``Seg`` in docs/method.md).

ECIF's negative-role terms depend on which pairs share a softmax, so the partition must be a
pure function of the data: consecutive good samples of one shard, in tar order, ``size`` at a
time. It never depends on the number of workers or on scheduling, which is what makes scores
identical whatever the cluster size. Exclusions are applied *after* segmenting: an excluded
pair leaves its own segment and every other segment keeps its members, which is the
"remove D* from its batches" counterfactual that ECIF approximates.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from ecif_ray.data.exclusions import ExclusionSet
from ecif_ray.data.features import TrunkFeatures
from ecif_ray.data.samples import DEFAULT_LIMITS, ErrorRecord, ReadLimits, Sample, iter_shard
from ecif_ray.data.shards import Shard, ShardSpec, list_shards

Preprocess = Callable[[Image.Image], torch.Tensor]
Tokenizer = Callable[[list[str]], torch.Tensor]


@dataclass
class Segment:
    """A fixed group of pairs from one shard; ``index`` stays stable when pairs are excluded."""

    shard: str
    index: int  # segment index within the shard (0, 1, 2, ...)
    samples: list[Sample]

    def __len__(self) -> int:
        return len(self.samples)


@dataclass
class PairBatch:
    """One segment as tensors, with the identities needed to write table rows."""

    shard: str
    segment: int
    keys: list[str]
    shard_indices: list[int]
    captions: list[str]
    meta: list[dict[str, Any]]
    images: torch.Tensor  # [B, 3, H, W] float
    tokens: torch.Tensor  # [B, L] long
    features: TrunkFeatures | None = None  # the trunk's outputs, once computed (influence.trunk)

    def __len__(self) -> int:
        return len(self.keys)

    def without(self, exclude: ExclusionSet) -> PairBatch | None:
        """The same segment with excluded pairs removed (None if nothing is left); the other
        pairs keep their segment, as in ``exclude_from_segments``."""
        keep = [i for i, key in enumerate(self.keys) if not exclude.contains(self.shard, key)]
        if len(keep) == len(self.keys):
            return self
        if not keep:
            return None
        index = torch.tensor(keep)
        return dataclasses.replace(
            self, keys=[self.keys[i] for i in keep], shard_indices=[self.shard_indices[i] for i in keep],
            captions=[self.captions[i] for i in keep], meta=[self.meta[i] for i in keep],
            images=self.images.index_select(0, index), tokens=self.tokens.index_select(0, index),
            features=None if self.features is None else self.features.index_select(index))

    def to(self, device: torch.device | str) -> PairBatch:
        """Move the tensors (not the identities) to ``device``."""
        return dataclasses.replace(self, images=self.images.to(device), tokens=self.tokens.to(device),
                                   features=None if self.features is None else self.features.to(device))


def segment_samples(samples: Iterable[Sample], size: int) -> Iterator[Segment]:
    """Split one shard's good samples, in order, into segments of ``size`` (the last may be short)."""
    if size < 1:
        raise ValueError(f"segment size must be >= 1, got {size}")
    return _segments(samples, size)


def _segments(samples: Iterable[Sample], size: int) -> Iterator[Segment]:
    shard: str | None = None
    chunk: list[Sample] = []
    index = 0
    for sample in samples:
        if not isinstance(sample, Sample):
            raise TypeError(f"segment_samples takes Sample objects, got {type(sample).__name__}")
        if shard is None:
            shard = sample.shard
        elif sample.shard != shard:
            raise ValueError(f"segment_samples got samples from two shards ({shard!r}, {sample.shard!r})")
        chunk.append(sample)
        if len(chunk) == size:
            yield Segment(shard, index, chunk)
            index, chunk = index + 1, []
    if chunk:
        assert shard is not None
        yield Segment(shard, index, chunk)


def exclude_from_segments(segments: Iterable[Segment], exclude: ExclusionSet | None) -> list[Segment]:
    """Drop excluded pairs from their segments, keeping indices; drop segments left empty."""
    if not exclude:
        return list(segments)
    kept = []
    for segment in segments:
        samples = [s for s in segment.samples if not exclude.contains(s.shard, s.key)]
        if samples:
            kept.append(Segment(segment.shard, segment.index, samples))
    return kept


def stream_segments(
    shard: Shard,
    *,
    segment_size: int,
    exclude: ExclusionSet | None = None,
    storage_options: Mapping[str, Any] | None = None,
    pool: Executor | None = None,
    limits: ReadLimits = DEFAULT_LIMITS,
    errors: list[ErrorRecord] | None = None,
) -> Iterator[Segment]:
    """One shard's segments as they are read (segment first, then exclude): at most one segment and
    the decoder's read-ahead are held, whatever the shard's size. Bad inputs are appended to
    ``errors`` as they are met; a storage failure raises ``ShardUnavailable`` (the segments already
    yielded must then be discarded by the caller)."""

    def good_samples() -> Iterator[Sample]:
        for item in iter_shard(shard, storage_options, pool, limits=limits):
            if isinstance(item, Sample):
                yield item
            elif errors is not None:
                errors.append(item)

    for segment in segment_samples(good_samples(), segment_size):
        yield from exclude_from_segments([segment], exclude)


def collate_segment(segment: Segment, preprocess: Preprocess, tokenizer: Tokenizer,
                    pool: Executor | None = None) -> PairBatch:
    """Turn a segment into model inputs: preprocessed images (on ``pool`` when given) and tokenized captions."""
    samples = segment.samples
    captions = [s.caption for s in samples]
    pixels = [s.image for s in samples]
    images = torch.stack(list(pool.map(preprocess, pixels) if pool is not None else map(preprocess, pixels)))
    if not images.is_floating_point():
        images = images.float()
    tokens = torch.as_tensor(tokenizer(captions)).long()
    if images.ndim != 4 or tokens.ndim != 2 or tokens.shape[0] != len(samples):
        raise ValueError(
            f"segment {segment.shard}#{segment.index}: preprocess/tokenizer gave images {tuple(images.shape)} "
            f"and tokens {tuple(tokens.shape)}; expected [B, C, H, W] and [B, L] with B={len(samples)}"
        )
    return PairBatch(
        shard=segment.shard,
        segment=segment.index,
        keys=[s.key for s in samples],
        shard_indices=[s.shard_index for s in samples],
        captions=captions,
        meta=[s.meta for s in samples],
        images=images,
        tokens=tokens,
    )


def iter_segments(
    spec: ShardSpec | Sequence[Shard],
    *,
    segment_size: int,
    preprocess: Preprocess,
    tokenizer: Tokenizer,
    exclude: ExclusionSet | None = None,
    storage_options: Mapping[str, Any] | None = None,
    errors: list[ErrorRecord] | None = None,
    limits: ReadLimits = DEFAULT_LIMITS,
) -> Iterator[PairBatch]:
    """Stream collated segments shard by shard, segment by segment; bad inputs are appended to
    ``errors`` when given."""
    for shard in _as_shards(spec, storage_options):
        for segment in stream_segments(shard, segment_size=segment_size, exclude=exclude,
                                       storage_options=storage_options, limits=limits, errors=errors):
            yield collate_segment(segment, preprocess, tokenizer)


def load_segments(
    spec: ShardSpec | Sequence[Shard],
    *,
    segment_size: int,
    preprocess: Preprocess,
    tokenizer: Tokenizer,
    exclude: ExclusionSet | None = None,
    storage_options: Mapping[str, Any] | None = None,
    limits: ReadLimits = DEFAULT_LIMITS,
) -> tuple[list[PairBatch], list[ErrorRecord]]:
    """Read every shard into collated batches, in shard order then segment order.

    Everything is held in memory: meant for small corpora (fine-tuning the tiny models, tests,
    the curvature sample). The scoring pass streams shard by shard with :func:`stream_segments`.
    """
    if segment_size < 1:
        raise ValueError(f"segment size must be >= 1, got {segment_size}")
    errors: list[ErrorRecord] = []
    batches = list(iter_segments(spec, segment_size=segment_size, preprocess=preprocess, tokenizer=tokenizer,
                                 exclude=exclude, storage_options=storage_options, errors=errors, limits=limits))
    return batches, errors


def _as_shards(spec: ShardSpec | Sequence[Shard], storage_options: Mapping[str, Any] | None) -> list[Shard]:
    """Accept an already-listed shard list as well as a spec, so callers do not list twice."""
    if isinstance(spec, Sequence) and not isinstance(spec, str) and spec and all(isinstance(s, Shard) for s in spec):
        return list(spec)
    return list_shards(spec, storage_options)
