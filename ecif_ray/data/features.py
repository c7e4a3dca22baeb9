"""Trunk features: what the frozen part of each tower outputs for a batch of pairs.

Every parameter subset leaves the start of both towers frozen (the *trunk*); influence analysis
only differentiates the rest (the *tail*). The trunk's outputs do not depend on θ, nor on how pairs
are batched, so they are computed once per pair and kept (in memory for one analysis, on disk for
later ones). This module is the container; ``influence.trunk`` decides where the towers are cut.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class TrunkFeatures:
    """Per-pair inputs of the two tails, rows aligned with the pairs of a batch.

    ``image`` / ``text``: the trunk outputs ([B, ...]; raw pixels / token ids when a tower has no
    trunk). ``tokens``: the token ids, kept when the text tail still pools by token position
    (its cut is before the pooling), else None.
    """

    image: torch.Tensor
    text: torch.Tensor
    tokens: torch.Tensor | None = None
    source: str = ""  # which trunk computed them: features are reused only by the same trunk

    def __post_init__(self) -> None:
        # An empty tensor stands for a tower that was not asked for (e.g. class prompts: text only).
        rows = {t.shape[0] for t in (self.image, self.text, self.tokens) if t is not None and t.numel()}
        if len(rows) > 1:
            raise ValueError(f"trunk features disagree on the number of pairs: {sorted(rows)}")

    def __len__(self) -> int:
        return max(self.image.shape[0], self.text.shape[0])

    def _map(self, fn) -> TrunkFeatures:
        return TrunkFeatures(fn(self.image), fn(self.text), None if self.tokens is None else fn(self.tokens),
                             self.source)

    @property
    def numel_per_pair(self) -> int:
        return sum(t[0].numel() for t in (self.image, self.text, self.tokens) if t is not None and t.numel())

    def index_select(self, index: torch.Tensor) -> TrunkFeatures:
        return self._map(lambda t: t.index_select(0, index.to(t.device)))

    def rows(self, start: int, stop: int) -> TrunkFeatures:
        """Rows ``start:stop`` (views, no copy)."""
        return self._map(lambda t: t[start:stop] if t.numel() else t)

    def to(self, device: torch.device | str) -> TrunkFeatures:
        return self._map(lambda t: t.to(device))

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.image, self.text, self.tokens) if t is not None)

    @staticmethod
    def cat(parts: Sequence[TrunkFeatures]) -> TrunkFeatures:
        """The rows of several batches, in order."""
        if not parts:
            raise ValueError("nothing to concatenate")
        tokens = None if parts[0].tokens is None else torch.cat([p.tokens for p in parts])  # type: ignore[misc]
        sources = {p.source for p in parts}
        if len(sources) != 1:
            raise ValueError(f"cannot stack features of different trunks: {sorted(sources)}")
        return TrunkFeatures(torch.cat([p.image for p in parts]), torch.cat([p.text for p in parts]), tokens,
                             parts[0].source)
