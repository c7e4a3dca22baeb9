"""Exclusion lists: training pairs to leave out, e.g. the top harmful pairs of an earlier run.

Text format, one entry per line::

    # comment                      (blank lines and '#' lines are ignored)
    shard,key                      (optional CSV header, first entry line only; 'key' alone too)
    train-000003.tar,000123        (a pair in one shard)
    train-000003.tar<TAB>000124    (tab-separated works too)
    000125                         (key alone: matches that key in every shard)

A Parquet file with columns ``shard, key`` (or only ``key``; a null shard means any shard) is
accepted as well, detected by its magic bytes, so exclusions can be written straight from a SQL
query over the influence tables. Malformed input is refused with a message naming the file and
line (or row), because a silently misread exclusion list would change what a run means.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import fsspec
import pyarrow.parquet as pq

_PARQUET_MAGIC = b"PAR1"
_HEADERS = (["shard", "key"], ["key"])


@dataclass(frozen=True)
class ExclusionSet:
    """Pairs identified by ``(shard, key)``, plus bare keys that match in any shard."""

    pairs: frozenset[tuple[str, str]] = field(default_factory=frozenset)
    keys: frozenset[str] = field(default_factory=frozenset)

    def contains(self, shard: str, key: str) -> bool:
        return key in self.keys or (shard, key) in self.pairs

    def __len__(self) -> int:
        return len(self.pairs) + len(self.keys)

    @classmethod
    def from_entries(cls, entries: Iterable[tuple[str | None, str]]) -> ExclusionSet:
        """Build from ``(shard, key)`` entries; ``shard=None`` means the key in any shard."""
        entries = list(entries)
        return cls(
            pairs=frozenset((shard, key) for shard, key in entries if shard is not None),
            keys=frozenset(key for shard, key in entries if shard is None),
        )


def read_exclusions(path: str, storage_options: Mapping[str, Any] | None = None) -> ExclusionSet:
    """Read an exclusion list (text or Parquet) from any fsspec path."""
    with fsspec.open(path, mode="rb", **dict(storage_options or {})) as f:
        data = f.read()
    if data.startswith(_PARQUET_MAGIC):
        return ExclusionSet.from_entries(_parquet_entries(path, data))
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(f"exclusion file {path}: not UTF-8 text or Parquet: {exc}") from exc
    return ExclusionSet.from_entries(_text_entries(path, text))


def _text_entries(path: str, text: str) -> Iterable[tuple[str | None, str]]:
    seen_entry = False
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip(" ")  # not tabs: a stray tab is a malformed TSV line, not padding
        if not line or line.startswith("#"):
            continue
        fields = _split(line)
        if not seen_entry and [f.strip().lower() for f in fields] in _HEADERS:
            seen_entry = True
            continue
        seen_entry = True
        yield _entry(path, lineno, raw, fields)


def _split(line: str) -> list[str]:
    if "\t" in line:
        return line.split("\t")
    if "," in line:
        return next(csv.reader([line]))  # honours quotes, e.g. a key that contains a comma
    return [line]


def _entry(path: str, lineno: int, raw: str, fields: list[str]) -> tuple[str | None, str]:
    fields = [f.strip() for f in fields]
    if len(fields) > 2 or not all(fields):
        raise ValueError(
            f"exclusion file {path}, line {lineno}: malformed entry {raw.strip()!r}; expected "
            "'shard,key', 'shard<TAB>key' or 'key'"
        )
    return (fields[0], fields[1]) if len(fields) == 2 else (None, fields[0])


def _parquet_entries(path: str, data: bytes) -> Iterable[tuple[str | None, str]]:
    table = pq.read_table(io.BytesIO(data))
    if "key" not in table.column_names:
        raise ValueError(f"exclusion file {path}: Parquet has no 'key' column (columns: {table.column_names})")
    keys = table.column("key").to_pylist()
    shards = table.column("shard").to_pylist() if "shard" in table.column_names else [None] * len(keys)
    for row, (shard, key) in enumerate(zip(shards, keys)):
        if key is None or str(key).strip() == "":
            raise ValueError(f"exclusion file {path}, row {row}: empty key")
        yield (None if shard is None or str(shard) == "" else str(shard)), str(key)
