"""The curvature sample: which segments estimate G, chosen from the data alone (never from scheduling).

G is estimated on a fixed sample of ``K = curvature_segments`` segments whose size does not grow
with the corpus (ECIF.md §5). The sample is drawn in deterministic *rounds*:

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

import numpy as np

from ecif_ray.data.shards import Shard


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
