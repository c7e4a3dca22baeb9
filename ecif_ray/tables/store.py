"""A run directory on any fsspec filesystem: atomic writes, per-shard commit records, resume checks.

Layout of a run directory (``--out``)::

    manifest.json                                   lineage of the run (tables.manifest)
    lease.json                                      the running driver's lease, gone after the run
                                                    (tables.lease; .lease.json.lock guards changes)
    directions/directions.safetensors, .json        the solved iHVP directions, reused on rerun
                                                    (tables.directions)
    pairs/run_id=<id>/<shard>.parquet               one file per shard and table (tables.schema;
                                                    <shard> escaped by shard_file_stem)
    scores/run_id=<id>/<shard>.parquet
    errors/run_id=<id>/<shard>.parquet
    _state/shards/<shard>.json                      commit record of each completed shard

Why a commit record: a worker writes a shard's tables one file at a time, and may die between
two of them. Each file is written atomically (a hidden temp file, then a rename; on S3 a temp
key copied into place, the copy being atomic), and the shard counts as done only once its
commit record exists *and* every file it lists is there with the recorded row count (read from
the Parquet footer, which also proves the file is complete). A rerun skips exactly those shards.
Readers never see temp files: their names start with '.' and end in '.tmp', which Hive readers
and the ``*.parquet`` globs ignore; a writer killed between the two steps leaves one behind, which
the next driver removes (:meth:`RunStore.remove_temp_files`, while it holds the lease). Files are
named after the shard, so a retried shard overwrites its earlier attempt instead of duplicating
rows. Because Hive-style readers (Spark, Trino, pyarrow datasets) skip names starting with '.' or
'_', a shard id starting with '.', '_' or the escape character '~' gets a '~' in front of its file
name (:func:`shard_file_stem`, a one-to-one mapping); the rows themselves carry the shard id
unchanged in their ``shard`` column.
"""

from __future__ import annotations

import contextlib
import io
import json
import posixpath
import re
import uuid
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem, make_path_posix

from ecif_ray.tables.schema import PARTITION, conform

LINEAGE_KEY = b"ecif_ray.lineage"
MANIFEST = "manifest.json"
LEASE = "lease.json"
LEASE_GUARD = ".lease.json.lock"  # locked while a lease is changed (tables.lease); stays, empty
STATE_DIR = "_state/shards"
DIRECTIONS_DIR = "directions"
HIDDEN_PREFIXES = (".", "_")  # names Hive-style readers skip
FILE_ESCAPE = "~"
TEMP_NAME = re.compile(r"\..+\.[0-9a-f]{32}\.tmp")  # what temp_name makes, and nothing a table or record is named


def temp_name(name: str) -> str:
    """A hidden, unique sibling name for writing ``name`` before it is moved into place."""
    return f".{name}.{uuid.uuid4().hex}.tmp"


def shard_file_stem(shard: str) -> str:
    """The stem of a shard's table files: the shard id, with ``~`` in front when it starts with
    '.', '_' or '~' (so no engine hides it, and no two shards share a file)."""
    return FILE_ESCAPE + shard if shard.startswith((*HIDDEN_PREFIXES, FILE_ESCAPE)) else shard


@dataclass(frozen=True)
class FileRecord:
    """One table file of a shard, as listed in its commit record."""

    table: str
    path: str  # relative to the run root
    rows: int


@dataclass
class ShardRecord:
    """What a committed shard produced; stored as ``_state/shards/<shard>.json``."""

    shard: str
    run_id: str
    fingerprint: str
    files: list[FileRecord]
    pairs: int
    errors: int
    errors_by_stage: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    attempt: int = 1
    top: list[dict[str, Any]] = field(default_factory=list)  # the shard's most harmful pairs (summary)
    trace: list[dict[str, Any]] = field(default_factory=list)  # the shard's top pairs per traced example

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ShardRecord:
        data = dict(data)
        data["files"] = [FileRecord(**f) for f in data.get("files", [])]
        return cls(**data)


class RunStore:
    """Reads and writes one run directory (local path or fsspec URL)."""

    def __init__(self, url: str, storage_options: Mapping[str, Any] | None = None):
        self.storage_options = dict(storage_options or {})
        self.fs, path = url_to_fs(url, **self.storage_options)
        self.local = isinstance(self.fs, LocalFileSystem)
        if self.local:
            path = make_path_posix(path)
        self.root = path.rstrip("/")
        self.url = self.root if self.local else self.fs.unstrip_protocol(self.root)

    # -- paths ---------------------------------------------------------------------------------

    def path(self, relative: str) -> str:
        """Filesystem path of a file under the run root."""
        return posixpath.join(self.root, relative)

    def full_url(self, relative: str) -> str:
        return posixpath.join(self.url, relative)

    @staticmethod
    def table_file(table: str, run_id: str, shard: str) -> str:
        return f"{table}/{PARTITION}={run_id}/{shard_file_stem(shard)}.parquet"

    @staticmethod
    def record_file(shard: str) -> str:
        return f"{STATE_DIR}/{shard}.json"

    # -- raw objects ---------------------------------------------------------------------------

    def exists(self, relative: str = "") -> bool:
        return bool(self.fs.exists(self.path(relative) if relative else self.root))

    def is_empty(self) -> bool:
        """True if the root is missing or holds nothing but the lease (taken before the manifest is written)."""
        if not self.fs.exists(self.root):
            return True
        names = {posixpath.basename(n.rstrip("/")) for n in self.fs.ls(self.root, detail=False)}
        return names <= {LEASE, LEASE_GUARD}

    def put(self, relative: str, data: bytes) -> None:
        """Write atomically: readers see the old object or the new one, never a partial one."""
        final = self.path(relative)
        parent, name = posixpath.split(final)
        temp = posixpath.join(parent, temp_name(name))
        self.fs.makedirs(parent, exist_ok=True)
        self.fs.pipe_file(temp, data)
        try:
            self.fs.mv(temp, final)  # local: os.rename; object stores: server-side copy, then delete
        except BaseException:
            with contextlib.suppress(OSError):  # keep the original error
                self.fs.rm(temp)
            raise

    def temp_files(self) -> list[str]:
        """Temp files under the run root (relative paths): left by writers killed before their move."""
        self.fs.invalidate_cache(self.root)
        try:
            found = self.fs.find(self.root)
        except FileNotFoundError:
            return []
        return sorted(posixpath.relpath(p, self.root) for p in found if TEMP_NAME.fullmatch(posixpath.basename(p)))

    def remove_temp_files(self) -> list[str]:
        """Delete :meth:`temp_files`. Only for the driver holding the lease, before any worker starts:
        then no live writer owns one."""
        leftovers = self.temp_files()
        for relative in leftovers:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(self.path(relative))
        return leftovers

    def get(self, relative: str) -> bytes | None:
        path = self.path(relative)
        if not self.local:
            # Object-store filesystems answer from the folder listings this process cached: a file another
            # process wrote (or rewrote) since would read as missing or with its old size. Drop them.
            self.fs.invalidate_cache(path)
        try:
            return self.fs.cat_file(path)
        except FileNotFoundError:
            return None

    def remove(self, relative: str) -> None:
        """Delete one file if it exists (a table file an earlier attempt wrote and this one does not)."""
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(self.path(relative))

    def put_json(self, relative: str, value: Any) -> None:
        self.put(relative, json.dumps(value, indent=2, sort_keys=True, default=str).encode())

    def get_json(self, relative: str) -> Any | None:
        data = self.get(relative)
        return None if data is None else json.loads(data)

    # -- tables --------------------------------------------------------------------------------

    def write_table(self, table: str, run_id: str, shard: str, rows: pa.Table | dict[str, list],
                    lineage: Mapping[str, Any]) -> FileRecord:
        """One shard's rows of one table, with the run's lineage in the Parquet key-value metadata."""
        data = conform(table, rows)
        metadata = {LINEAGE_KEY: json.dumps({**lineage, "table": table, "shard": shard, PARTITION: run_id},
                                            sort_keys=True, default=str).encode()}
        data = data.replace_schema_metadata({**(data.schema.metadata or {}), **metadata})
        buffer = pa.BufferOutputStream()
        pq.write_table(data, buffer, compression="zstd")
        relative = self.table_file(table, run_id, shard)
        self.put(relative, buffer.getvalue().to_pybytes())
        return FileRecord(table=table, path=relative, rows=data.num_rows)

    def parquet_rows(self, relative: str) -> int | None:
        """Row count from the Parquet footer; None if the file is missing or not valid Parquet."""
        try:
            with self.fs.open(self.path(relative), "rb") as f:
                return pq.read_metadata(f).num_rows
        except (FileNotFoundError, OSError, pa.ArrowInvalid):
            return None

    def lineage(self, relative: str) -> dict[str, Any]:
        """The ``ecif_ray.lineage`` key-value metadata of one table file."""
        with self.fs.open(self.path(relative), "rb") as f:
            metadata = pq.read_schema(f).metadata or {}
        return json.loads(metadata.get(LINEAGE_KEY, b"{}"))

    # -- shard commits -------------------------------------------------------------------------

    def commit_shard(self, record: ShardRecord) -> None:
        """Mark a shard done; call only after every file it lists has been written."""
        self.put_json(self.record_file(record.shard), record.to_json())

    def shard_record(self, shard: str) -> ShardRecord | None:
        data = self.get_json(self.record_file(shard))
        return None if data is None else ShardRecord.from_json(data)

    def is_complete(self, record: ShardRecord | None, fingerprint: str) -> bool:
        """True if the record belongs to this run's fingerprint and all its files are intact."""
        if record is None or record.fingerprint != fingerprint:
            return False
        return all(self.parquet_rows(f.path) == f.rows for f in record.files)

    def completed_shards(self, shards: Iterable[str], fingerprint: str, threads: int = 16) -> dict[str, ShardRecord]:
        """The subset of ``shards`` that is committed and intact (checked in parallel: S3 is I/O bound)."""
        shards = list(shards)
        existing = self._existing_records()
        candidates = [s for s in shards if s in existing]

        def check(shard: str) -> ShardRecord | None:
            record = self.shard_record(shard)
            return record if self.is_complete(record, fingerprint) else None

        with ThreadPoolExecutor(max_workers=threads) as pool:
            records = list(pool.map(check, candidates))
        return {s: r for s, r in zip(candidates, records) if r is not None}

    def _existing_records(self) -> set[str]:
        directory = self.path(STATE_DIR)
        self.fs.invalidate_cache(directory)
        try:
            names = self.fs.ls(directory, detail=False)
        except FileNotFoundError:
            return set()
        return {posixpath.basename(n)[: -len(".json")] for n in names if n.endswith(".json")}

    def read_table(self, relative: str) -> pa.Table:
        """One file, without the partition column (for tests and tools)."""
        with self.fs.open(self.path(relative), "rb") as f:
            return pq.read_table(io.BytesIO(f.read()))
