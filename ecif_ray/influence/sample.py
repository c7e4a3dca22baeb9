"""The curvature sample: which segments estimate G, chosen from the data alone (never from scheduling).

G is estimated on a sample of ``K`` segments (docs/method.md §5). By default K is "every segment,
up to a cap": the cap is the number of segments whose trunk features fit the workers' memory
budget (``max_segments``), so small and medium corpora use all their data and a web-scale one a
seeded sample of fixed size. One planner serves the notebook engine (``plan_in_memory``) and the
Ray pipeline (workers read the shards they are asked for), so both draw the same sample. The
sample is drawn in deterministic *rounds*:

1. the shards are put in a seeded random order;
2. a round asks the next ``min(curvature_shards, R, shards left)`` shards for the R segments
   still missing, spread as evenly as possible (the first ``R mod k`` shards get one more);
3. each shard contributes ``min(quota, its segments)`` segments, chosen by a generator seeded
   with (seed, shard id), so a shard's choice never depends on which worker reads it;
4. short or unreadable shards leave a shortfall for the next round, until K segments are found
   or the shards run out.

Each shard's contribution is a *group*; a worker returns one partial GGN product per group and
the driver sums them in group order. That fixed summation order is what makes the directions,
and hence every score, bit-identical whatever the number of workers.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from ecif_ray.data.shards import Shard

T = TypeVar("T")
DEFAULT_MEMORY_MB = 2048  # trunk features of the curvature sample per worker


def max_segments(bytes_per_pair: int, segment_size: int, workers: int = 1, memory_mb: int = DEFAULT_MEMORY_MB) -> int:
    """The cap: segments whose trunk features fit ``memory_mb`` on each of ``workers`` workers."""
    return max(1, (memory_mb * 2**20 * workers) // max(1, bytes_per_pair * segment_size))


@dataclass(frozen=True)
class CurvatureRequest:
    """Ask a worker for ``quota`` segments of ``shard``; ``group`` is its place in the summation order."""

    group: int
    shard: Shard
    quota: int
    seed: int


@dataclass(frozen=True)
class CurvatureGroup:
    """What a worker took for one request."""

    group: int
    shard: str
    segments: tuple[int, ...]  # segment indices within the shard, ascending
    pairs: int
    shard_segments: int  # segments the shard has in all


def shard_order(shards: Sequence[Shard], seed: int) -> list[Shard]:
    """The shards in a seeded random order (numpy's PCG64: the same on every platform)."""
    order = np.random.default_rng(seed).permutation(len(shards))
    return [shards[i] for i in order]


def choose_segments(shard: str, n_segments: int, quota: int, seed: int) -> list[int]:
    """``min(quota, n_segments)`` segment indices of one shard, ascending, seeded by (seed, shard id)."""
    take = min(quota, n_segments)
    if take <= 0:
        return []
    name_seed = int.from_bytes(hashlib.sha256(shard.encode()).digest()[:8], "little")
    rng = np.random.default_rng([seed, name_seed])
    return sorted(int(i) for i in rng.choice(n_segments, size=take, replace=False))


class CurvaturePlanner:
    """Produces the requests of each round from the outcome of the previous ones."""

    def __init__(self, shards: Sequence[Shard], segments: int, shards_per_round: int, seed: int):
        if segments < 1 or shards_per_round < 1:
            raise ValueError("curvature_segments and curvature_shards must be >= 1")
        self.order = shard_order(shards, seed)
        self.seed = seed
        self.shards_per_round = shards_per_round
        self.missing = segments
        self._next = 0

    def next_round(self) -> list[CurvatureRequest]:
        """The next requests; empty when the sample is complete or no shard is left."""
        left = len(self.order) - self._next
        k = min(self.shards_per_round, self.missing, left)
        if k <= 0:
            return []
        base, extra = divmod(self.missing, k)
        requests = [CurvatureRequest(group=self._next + i, shard=self.order[self._next + i],
                                     quota=base + (1 if i < extra else 0), seed=self.seed) for i in range(k)]
        self._next += k
        return requests

    def record(self, groups: Sequence[CurvatureGroup]) -> None:
        """Account for what a round's requests returned."""
        self.missing -= sum(len(g.segments) for g in groups)


def plan_in_memory(segments_by_shard: dict[str, list[T]], shards: Sequence[Shard], segments: int,
                   shards_per_round: int, seed: int) -> list[list[T]]:
    """The planner run against segments already in memory (the notebook engine): the groups, in
    summation order, exactly as Ray workers would take them from the same shards."""
    planner = CurvaturePlanner(shards, segments, shards_per_round, seed)
    groups: list[list[T]] = []
    while requests := planner.next_round():
        taken = []
        for request in requests:
            have = segments_by_shard.get(request.shard.name, [])
            chosen = choose_segments(request.shard.name, len(have), request.quota, request.seed)
            taken.append(CurvatureGroup(request.group, request.shard.name, tuple(chosen), 0, len(have)))
            if chosen:
                groups.append([have[i] for i in chosen])
        planner.record(taken)
    return groups
