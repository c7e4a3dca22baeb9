"""The trunk-feature store: what a checkpoint's frozen trunk outputs for every pair of a corpus,
computed once (``ecif-ray features``, ``pipeline.features``) and kept as Parquet next to the corpus.

The trunk (``influence.trunk``) depends neither on the query nor on how pairs are batched, so its
outputs are a property of (trunk, pair): every later analysis with the same trunk reads them
instead of decoding images and running the frozen towers again. Layout of a store (``--out``, a
local path or fsspec URL)::

    store.json                      identity: fingerprint, what it hashes, feature columns, lineage
    lease.json                      the writing driver's lease (tables.lease), gone after the pass
    features/<shard>.parquet        one file per input shard: its good samples, in tar order
    errors/<shard>.parquet          the shard's bad samples, same schema as a run's ``errors`` table
                                    (tables.schema.ERRORS); only when it has some
    _state/shards/<shard>.json      commit record of each completed shard (tables.store.ShardRecord)
    embeddings/checkpoint=<id>/<shard>.parquet
                                    a checkpoint's final embeddings of the shard's pairs (``ecif-ray
                                    embeddings``, ``pipeline.embeddings``); ``<id>``: the first 16 hex
                                    digits of the checkpoint's sha256, so checkpoints sharing the trunk
                                    share the store and keep their embeddings apart

``<shard>`` is the shard id escaped like a run's table files (``tables.store.shard_file_stem``).

Columns of a ``features`` file: ``shard``, ``key``, ``shard_index`` (ordinal in the tar, bad samples
counted), ``caption`` (as tokenized), ``meta`` (the sample's ``.json`` member as JSON text, ``{}``
when absent), then one column per tensor of ``TrunkFeatures`` (:data:`FEATURE_COLUMNS`):
``image_features``, ``text_features`` and, when the text tail pools by token position (a block
cut), ``tokens``. Each is a ``fixed_size_list<dtype>[n]`` holding one pair's tensor flattened in C
order; its per-pair shape and dtype are in ``store.json`` (``columns``) and in every file's
key-value metadata (``ecif_ray.lineage``), so any Parquet reader gets the numbers and this module
gives them back as ``[rows, *shape]`` arrays. Features are stored in the dtype the trunk ran in
(float64 for heads, float32 for lora/last-k with ``--dtype auto``, as ``ecif-ray score``), so the
analysis that reads them computes exactly what it would compute from the images.

**Identity.** ``fingerprint`` is the sha256 of ``identity`` (``pipeline.features.trunk_identity``):
architecture, where the towers are cut, the dtype, a digest of every frozen tensor (all weights but
the trainable subset θ and the logit scale/bias), the preprocessing and tokenizer, and the input
limits. So features are reused exactly when the trunk is the same: two checkpoints that fine-tuned
different heads (or LoRA adapters) on one frozen base share a store; anything that changes the
trunk's outputs gets another fingerprint, and a store refuses a writer or reader with another
fingerprint (:class:`FeatureStoreMismatch`, naming the store, both fingerprints and what differs).
The checkpoint's sha256, torch/open_clip versions, device and batch size are recorded (lineage),
not hashed: they change rounding, not meaning.

**Commit and resume** work as in a run directory (``tables.store``): each file is written to a
hidden temp name and moved into place, the commit record comes last and lists every file with its
row count, and a shard counts as done only when its record has the store's fingerprint and every
file it lists is intact. A rerun skips those shards. Shard ids are basenames, so one store holds
one corpus (or corpora whose shard names differ); a committed shard is never recomputed.

**Embeddings** (``embeddings/``) are what a DataComp-style pipeline filters and deduplicates on: per pair
``shard``, ``key``, ``shard_index``, ``caption``, ``image_embedding`` and ``text_embedding`` (the
checkpoint's L2-normalised embeddings, ``fixed_size_list<float32>[d]``) and ``clip_score`` (s·û·v̂ in the
analysis dtype, the value of a run's ``pairs.clip_score``). They depend on the checkpoint's trainable
part, not only on the trunk, hence one Hive partition per checkpoint. A file is complete when it exists
(written to a temp name, then moved) and its row count equals the shard's commit record; anything else is
rewritten.

Free of torch and Ray; ``pipeline.features`` turns rows into ``TrunkFeatures``.
"""

from __future__ import annotations

import contextlib
import json
import posixpath
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ecif_ray.tables.manifest import now
from ecif_ray.tables.schema import conform
from ecif_ray.tables.store import (
    LINEAGE_KEY,
    STATE_DIR,
    FileRecord,
    RunStore,
    ShardRecord,
    shard_file_stem,
    temp_name,
)

STORE_FORMAT = "ecif-ray-features/1"
STORE_INFO = "store.json"
FEATURES_DIR = "features"
ERRORS_DIR = "errors"
EMBEDDINGS_DIR = "embeddings"
EMBEDDINGS_PARTITION = "checkpoint"  # Hive partition column of the embeddings table
# TrunkFeatures field -> store column
FEATURE_COLUMNS = {"image": "image_features", "text": "text_features", "tokens": "tokens"}
ROW_GROUP_BYTES = 32 * 2**20  # rows are buffered up to this size before a Parquet row group is written

ID_FIELDS = (
    pa.field("shard", pa.string(), nullable=False),
    pa.field("key", pa.string(), nullable=False),
    pa.field("shard_index", pa.int64(), nullable=False),
    pa.field("caption", pa.string(), nullable=False),
    pa.field("meta", pa.string(), nullable=False),  # the sample's .json member as JSON text, "{}" when absent
)


def embedding_schema(dim: int) -> pa.Schema:
    """The schema of an ``embeddings`` file (see the module docstring)."""
    vector = pa.list_(pa.float32(), dim)
    return pa.schema([*ID_FIELDS[:4], pa.field("image_embedding", vector, nullable=False),
                      pa.field("text_embedding", vector, nullable=False),
                      pa.field("clip_score", pa.float64(), nullable=False)])


class NotAFeatureStore(ValueError):
    """The location is not a feature store (no ``store.json``) and cannot become one."""


class FeatureStoreMismatch(ValueError):
    """The store holds the features of another trunk."""


@dataclass(frozen=True)
class FeatureColumn:
    """One tensor of ``TrunkFeatures`` as a store column: its per-pair shape and numpy dtype name."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def arrow_type(self) -> pa.DataType:
        return pa.list_(pa.from_numpy_dtype(np.dtype(self.dtype)), self.size)

    @property
    def bytes_per_pair(self) -> int:
        return self.size * np.dtype(self.dtype).itemsize

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> FeatureColumn:
        return cls(name=data["name"], shape=tuple(int(n) for n in data["shape"]), dtype=str(data["dtype"]))


def feature_schema(columns: Sequence[FeatureColumn]) -> pa.Schema:
    """The schema of a ``features`` file: the pair's identity, then one fixed-size list per tensor."""
    return pa.schema([*ID_FIELDS, *(pa.field(c.name, c.arrow_type, nullable=False) for c in columns)])


@dataclass
class StoreInfo:
    """``store.json``: the store's identity (``fingerprint`` = sha256 of ``identity``), its feature
    columns, and the lineage of the passes that wrote it."""

    fingerprint: str
    identity: dict[str, Any]
    columns: list[FeatureColumn]
    created_at: str = field(default_factory=now)
    created_by: dict[str, Any] = field(default_factory=dict)  # lineage of the first pass (checkpoint sha256, ...)
    passes: list[dict[str, Any]] = field(default_factory=list)  # one entry per pass: what it wrote, how long
    format: str = STORE_FORMAT

    @property
    def store_id(self) -> str:
        """Short id (first 12 hex digits of the fingerprint): the ``run_id`` of the commit records."""
        return self.fingerprint[:12]

    @property
    def bytes_per_pair(self) -> int:
        """Bytes of feature values one pair takes, uncompressed."""
        return sum(c.bytes_per_pair for c in self.columns)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["columns"] = [c.to_json() for c in self.columns]
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> StoreInfo:
        data = dict(data)
        data["columns"] = [FeatureColumn.from_json(c) for c in data.get("columns", [])]
        return cls(**data)


@dataclass
class FeatureRows:
    """Consecutive rows of one shard: identities and feature arrays (``[rows, *shape]`` per column)."""

    shard: str
    keys: list[str]
    shard_index: np.ndarray  # int64 [rows], increasing
    captions: list[str]
    meta: list[str]  # JSON text per row
    arrays: dict[str, np.ndarray]  # column name -> [rows, *shape]

    def __len__(self) -> int:
        return len(self.keys)

    def meta_dicts(self) -> list[dict[str, Any]]:
        return [json.loads(m) for m in self.meta]


class ShardWriter:
    """Streams one shard's rows into its ``features`` file: Parquet row groups written to a hidden temp
    file as rows come (memory stays at about :data:`ROW_GROUP_BYTES`), moved into place by :meth:`close`.
    Used as a context manager, an exception removes the temp file."""

    def __init__(self, files: RunStore, shard: str, columns: Sequence[FeatureColumn], lineage: Mapping[str, Any],
                 row_group_bytes: int = ROW_GROUP_BYTES):
        self.files, self.shard, self.columns = files, shard, list(columns)
        self.relative = FeatureStore.features_file(shard)
        parent, name = posixpath.split(files.path(self.relative))
        self.temp = posixpath.join(parent, temp_name(name))
        metadata = {LINEAGE_KEY: json.dumps({**lineage, "table": FEATURES_DIR, "shard": shard}, sort_keys=True,
                                            default=str).encode()}
        self.schema = feature_schema(self.columns).with_metadata(metadata)
        self.row_group_bytes = row_group_bytes
        self.rows = 0
        self._last_index = -1
        self._pending: list[pa.RecordBatch] = []
        self._pending_bytes = 0
        files.fs.makedirs(parent, exist_ok=True)
        self._sink = files.fs.open(self.temp, "wb")
        # Dictionaries and statistics are useless on float vectors; zstd still pays on the id columns.
        self._writer = pq.ParquetWriter(self._sink, self.schema, compression="zstd",
                                        use_dictionary=["shard"], write_statistics=["shard", "key", "shard_index"])

    def write(self, rows: FeatureRows) -> None:
        if rows.shard != self.shard:
            raise ValueError(f"rows of shard {rows.shard!r} given to the writer of {self.shard!r}")
        if not len(rows):
            return
        index = np.asarray(rows.shard_index, dtype=np.int64)
        if index[0] <= self._last_index or (len(index) > 1 and bool((np.diff(index) <= 0).any())):
            raise ValueError(f"shard {self.shard}: rows must come in increasing shard_index order")
        self._last_index = int(index[-1])
        arrays = [pa.array([rows.shard] * len(rows), pa.string()), pa.array(rows.keys, pa.string()),
                  pa.array(index, pa.int64()), pa.array(rows.captions, pa.string()), pa.array(rows.meta, pa.string())]
        arrays += [_fixed_size_list(column, rows.arrays.get(column.name), len(rows), self.shard)
                   for column in self.columns]
        batch = pa.RecordBatch.from_arrays(arrays, schema=self.schema)
        self._pending.append(batch)
        self._pending_bytes += batch.nbytes
        self.rows += len(rows)
        if self._pending_bytes >= self.row_group_bytes:
            self._flush()

    def close(self) -> FileRecord:
        """Finish the file and move it into place; returns its entry for the commit record."""
        self._flush()
        self._writer.close()
        self._sink.close()
        try:
            self.files.fs.mv(self.temp, self.files.path(self.relative))
        except BaseException:
            self._remove_temp()
            raise
        return FileRecord(table=FEATURES_DIR, path=self.relative, rows=self.rows)

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self._writer.close()
        with contextlib.suppress(Exception):
            self._sink.close()
        self._remove_temp()

    def _flush(self) -> None:
        if self._pending:
            self._writer.write_table(pa.Table.from_batches(self._pending, schema=self.schema),
                                     row_group_size=sum(b.num_rows for b in self._pending))
        self._pending, self._pending_bytes = [], 0

    def _remove_temp(self) -> None:
        with contextlib.suppress(OSError):
            self.files.fs.rm(self.temp)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        if exc_type is not None:
            self.abort()


def _fixed_size_list(column: FeatureColumn, values: np.ndarray | None, rows: int, shard: str) -> pa.Array:
    if values is None:
        raise ValueError(f"shard {shard}: no values for feature column {column.name!r}")
    values = np.asarray(values)
    if values.shape != (rows, *column.shape) or values.dtype != np.dtype(column.dtype):
        raise ValueError(f"shard {shard}: column {column.name!r} got {values.dtype}{list(values.shape)}, the store "
                         f"holds {column.dtype}{[rows, *column.shape]}")
    return pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(values).reshape(-1)), column.size)


class FeatureStore:
    """Reads and writes one feature store (local path or fsspec URL); see the module docstring."""

    def __init__(self, url: str, storage_options: Mapping[str, Any] | None = None):
        self.files = RunStore(url, storage_options)  # atomic puts, commit records, temp-file cleanup
        self.url = self.files.url

    # -- layout --------------------------------------------------------------------------------

    @staticmethod
    def features_file(shard: str) -> str:
        return f"{FEATURES_DIR}/{shard_file_stem(shard)}.parquet"

    @staticmethod
    def errors_file(shard: str) -> str:
        return f"{ERRORS_DIR}/{shard_file_stem(shard)}.parquet"

    @staticmethod
    def embeddings_file(checkpoint_id: str, shard: str) -> str:
        return f"{EMBEDDINGS_DIR}/{EMBEDDINGS_PARTITION}={checkpoint_id}/{shard_file_stem(shard)}.parquet"

    # -- identity ------------------------------------------------------------------------------

    def info(self) -> StoreInfo | None:
        """``store.json``, or None when there is none."""
        data = self.files.get_json(STORE_INFO)
        if data is None:
            return None
        info = StoreInfo.from_json(data)
        if info.format != STORE_FORMAT:
            raise NotAFeatureStore(f"{self.url}: {STORE_INFO} has format {info.format!r}, expected {STORE_FORMAT}")
        return info

    def open(self, info: StoreInfo) -> StoreInfo:
        """For a writer: create the store with ``info``, or return the existing one when it has the same
        fingerprint. A store of another trunk is refused (:class:`FeatureStoreMismatch`), a non-empty
        directory that is no store too (:class:`NotAFeatureStore`)."""
        existing = self.info()
        if existing is None:
            if not self.files.is_empty():  # nothing but this driver's lease
                raise NotAFeatureStore(f"out: {self.url} is not empty and holds no {STORE_INFO}; give a new or "
                                       "empty directory, or an existing feature store")
            self.save_info(info)
            return info
        if existing.fingerprint != info.fingerprint:
            raise FeatureStoreMismatch(_mismatch(self.url, existing, info.fingerprint, info.identity, "out"))
        if existing.columns != info.columns:  # same fingerprint, other shapes: a bug, never silently mixed
            raise FeatureStoreMismatch(f"out: {self.url}: columns {existing.columns} differ from {info.columns}")
        return existing

    def check(self, fingerprint: str, identity: Mapping[str, Any] | None = None) -> StoreInfo:
        """For a reader: the store's info when it holds features of the trunk with ``fingerprint``; else
        :class:`FeatureStoreMismatch` naming the store, both fingerprints (and with ``identity``, what
        differs), or :class:`NotAFeatureStore`."""
        info = self.info()
        if info is None:
            raise NotAFeatureStore(f"features: {self.url} is not a feature store (no {STORE_INFO}); write one with "
                                   "`ecif-ray features`")
        if info.fingerprint != fingerprint:
            raise FeatureStoreMismatch(_mismatch(self.url, info, fingerprint, identity, "features"))
        return info

    def save_info(self, info: StoreInfo) -> None:
        self.files.put_json(STORE_INFO, info.to_json())

    # -- listing -------------------------------------------------------------------------------

    def record(self, shard: str) -> ShardRecord | None:
        return self.files.shard_record(shard)

    def completed(self, shards: Iterable[str], fingerprint: str | None = None) -> dict[str, ShardRecord]:
        """The subset of ``shards`` committed with the store's fingerprint and intact (files present, row
        counts as recorded)."""
        fingerprint = fingerprint or self._fingerprint()
        return self.files.completed_shards(shards, fingerprint)

    def shards(self) -> list[str]:
        """Every committed shard of the store (records with its fingerprint), sorted; the files are checked
        when a shard is read."""
        fingerprint = self._fingerprint()
        directory = self.files.path(STATE_DIR)
        self.files.fs.invalidate_cache(directory)
        try:
            found = self.files.fs.ls(directory, detail=False)
        except FileNotFoundError:
            found = []
        names = sorted(posixpath.basename(n)[: -len(".json")] for n in found if n.endswith(".json"))
        with ThreadPoolExecutor(max_workers=16) as pool:  # object stores are I/O bound
            records = list(pool.map(self.files.shard_record, names))
        return [name for name, record in zip(names, records)
                if record is not None and record.fingerprint == fingerprint]

    def _fingerprint(self) -> str:
        info = self.info()
        if info is None:
            raise NotAFeatureStore(f"features: {self.url} is not a feature store (no {STORE_INFO})")
        return info.fingerprint

    # -- writing -------------------------------------------------------------------------------

    def shard_writer(self, shard: str, columns: Sequence[FeatureColumn], lineage: Mapping[str, Any],
                     row_group_bytes: int = ROW_GROUP_BYTES) -> ShardWriter:
        return ShardWriter(self.files, shard, columns, lineage, row_group_bytes)

    def write_errors(self, shard: str, rows: Mapping[str, list], lineage: Mapping[str, Any]) -> FileRecord | None:
        """The shard's ``errors`` rows (the run's errors schema); with no rows, the file an earlier attempt
        left is removed, so the file holds exactly what the commit record lists."""
        relative = self.errors_file(shard)
        if not rows["shard"]:
            self.files.remove(relative)
            return None
        return self._put_table(ERRORS_DIR, relative, conform("errors", dict(rows)), shard, lineage)

    def write_embeddings(self, checkpoint_id: str, shard: str, columns: Mapping[str, Any],
                         lineage: Mapping[str, Any]) -> FileRecord:
        """One shard's embeddings file (``columns``: the :func:`embedding_schema` fields; the vectors as
        ``[rows, d]`` float32 arrays), written atomically."""
        image, text = (np.ascontiguousarray(columns[name], np.float32) for name in ("image_embedding",
                                                                                       "text_embedding"))
        dim = image.shape[1]
        schema = embedding_schema(dim)
        data = pa.table([pa.array(columns["shard"], pa.string()), pa.array(columns["key"], pa.string()),
                         pa.array(columns["shard_index"], pa.int64()), pa.array(columns["caption"], pa.string()),
                         pa.FixedSizeListArray.from_arrays(pa.array(image.reshape(-1)), dim),
                         pa.FixedSizeListArray.from_arrays(pa.array(text.reshape(-1)), dim),
                         pa.array(columns["clip_score"], pa.float64())], schema=schema)
        return self._put_table(EMBEDDINGS_DIR, self.embeddings_file(checkpoint_id, shard), data, shard, lineage,
                               use_dictionary=["shard"])

    def _put_table(self, table: str, relative: str, data: pa.Table, shard: str, lineage: Mapping[str, Any],
                   **options: Any) -> FileRecord:
        """``data`` as one zstd Parquet file with the lineage in its metadata, written atomically."""
        metadata = {LINEAGE_KEY: json.dumps({**lineage, "table": table, "shard": shard}, sort_keys=True,
                                            default=str).encode()}
        buffer = pa.BufferOutputStream()
        pq.write_table(data.replace_schema_metadata(metadata), buffer, compression="zstd", **options)
        self.files.put(relative, buffer.getvalue().to_pybytes())
        return FileRecord(table=table, path=relative, rows=data.num_rows)

    def embeddings_complete(self, checkpoint_id: str, shard: str) -> bool:
        """Whether the shard's embeddings file of that checkpoint exists with the shard's committed row count."""
        path = self.files.path(self.embeddings_file(checkpoint_id, shard))
        try:
            with self.files.fs.open(path, "rb") as f:
                rows = pq.ParquetFile(f).metadata.num_rows
        except (FileNotFoundError, OSError, pa.ArrowInvalid):
            return False
        return rows == self._committed(shard).pairs

    def commit(self, record: ShardRecord) -> None:
        """Mark a shard done; only after every file it lists has been written."""
        self.files.commit_shard(record)

    def file_bytes(self, relative: str) -> int:
        return int(self.files.fs.size(self.files.path(relative)))

    # -- reading -------------------------------------------------------------------------------

    def read_shard(self, shard: str, columns: Sequence[str] | None = None) -> pa.Table:
        """A committed shard's ``features`` file as one table (rows in ``shard_index`` order)."""
        record = self._committed(shard)
        with self.files.fs.open(self.files.path(self.features_file(shard)), "rb") as f:
            table = pq.read_table(f, columns=list(columns) if columns is not None else None)
        if table.num_rows != record.pairs:
            raise ValueError(f"features: {self.url}: shard {shard} has {table.num_rows} rows, its commit record "
                             f"{record.pairs}")
        return table

    def iter_shard(self, shard: str, batch_rows: int | None = None) -> Iterator[FeatureRows]:
        """A committed shard's rows in ``shard_index`` (tar) order, ``batch_rows`` at a time (the last batch
        may be short; None: the whole shard at once; nothing for a shard without good samples), read row
        group by row group."""
        if batch_rows is not None and batch_rows < 1:
            raise ValueError(f"batch_rows must be >= 1, got {batch_rows}")
        info = self.info()
        assert info is not None
        record = self._committed(shard)
        shapes = {c.name: c.shape for c in info.columns}
        seen, last = 0, -1
        with self.files.fs.open(self.files.path(self.features_file(shard)), "rb") as f:
            parquet = pq.ParquetFile(f)
            for table in _rebatch(parquet.iter_batches(batch_size=batch_rows or 65536), batch_rows):
                rows = _rows(shard, table, shapes)
                if len(rows) and (rows.shard_index[0] <= last or bool((np.diff(rows.shard_index) <= 0).any())):
                    raise ValueError(f"features: {self.url}: shard {shard}: rows are not in shard_index order")
                last = int(rows.shard_index[-1]) if len(rows) else last
                seen += len(rows)
                yield rows
        if seen != record.pairs:
            raise ValueError(f"features: {self.url}: shard {shard} has {seen} rows, its commit record {record.pairs}")

    def shard_errors(self, shard: str) -> pa.Table:
        """A committed shard's ``errors`` rows (empty when it had none)."""
        record = self._committed(shard)
        paths = [f.path for f in record.files if f.table == ERRORS_DIR]
        if not paths:
            return conform("errors", {name: [] for name in ("shard", "key", "stage", "error", "message")})
        return self.files.read_table(paths[0])

    def errors(self) -> pa.Table:
        """Every ``errors`` file of the store (committed shards and failed ones), one table."""
        directory = self.files.path(ERRORS_DIR)
        try:
            names = sorted(p for p in self.files.fs.find(directory) if p.endswith(".parquet")
                           and not posixpath.basename(p).startswith("."))
        except FileNotFoundError:
            names = []
        tables = [self.files.read_table(posixpath.relpath(p, self.files.root)) for p in names]
        empty = conform("errors", {name: [] for name in ("shard", "key", "stage", "error", "message")})
        return pa.concat_tables([empty, *[t.replace_schema_metadata(None) for t in tables]])

    def _committed(self, shard: str) -> ShardRecord:
        record = self.files.shard_record(shard)
        if record is None or record.fingerprint != self._fingerprint():
            raise KeyError(f"features: {self.url} has no committed features for shard {shard!r}")
        return record


def open_store(url: str, storage_options: Mapping[str, Any] | None = None, fingerprint: str | None = None,
               identity: Mapping[str, Any] | None = None) -> FeatureStore:
    """A store to read; with ``fingerprint``, checked to hold that trunk's features (:meth:`FeatureStore.check`)."""
    store = FeatureStore(url, storage_options)
    if fingerprint is not None:
        store.check(fingerprint, identity)
    elif store.info() is None:
        raise NotAFeatureStore(f"features: {store.url} is not a feature store (no {STORE_INFO})")
    return store


def _rebatch(batches: Iterable[pa.RecordBatch], rows: int | None) -> Iterator[pa.Table]:
    """Record batches regrouped into tables of exactly ``rows`` rows (the last may be short; None: one
    table); nothing for no rows."""
    pending: list[pa.RecordBatch] = []
    count = 0
    for batch in batches:
        while batch.num_rows:
            take = batch.num_rows if rows is None else min(rows - count, batch.num_rows)
            pending.append(batch.slice(0, take))
            count += take
            batch = batch.slice(take)
            if rows is not None and count == rows:
                yield pa.Table.from_batches(pending)
                pending, count = [], 0
    if pending:
        yield pa.Table.from_batches(pending)


def _rows(shard: str, table: pa.Table, shapes: Mapping[str, tuple[int, ...]]) -> FeatureRows:
    n = table.num_rows
    if not n:
        return FeatureRows(shard, [], np.zeros(0, np.int64), [], [], {})
    arrays = {}
    for name, shape in shapes.items():
        values = table.column(name).combine_chunks().flatten().to_numpy(zero_copy_only=False)
        arrays[name] = values.reshape(n, *shape)
    return FeatureRows(shard=shard, keys=table.column("key").to_pylist(),
                       shard_index=table.column("shard_index").to_numpy(), captions=table.column("caption").to_pylist(),
                       meta=table.column("meta").to_pylist(), arrays=arrays)


def _mismatch(url: str, info: StoreInfo, fingerprint: str, identity: Mapping[str, Any] | None, what: str) -> str:
    changed = ""
    if identity is not None:
        keys = sorted(k for k in {*info.identity, *identity} if info.identity.get(k) != identity.get(k))
        changed = "; differs in " + ", ".join(f"{k}: {_short(info.identity.get(k))} -> {_short(identity.get(k))}"
                                              for k in keys)
    checkpoint = info.created_by.get("checkpoint_sha256")
    made = f" (made from checkpoint sha256 {checkpoint[:12]})" if checkpoint else ""
    return (f"{what}: {url} holds the trunk features of another trunk: the store's fingerprint is {info.fingerprint}"
            f"{made}, this checkpoint's trunk is {fingerprint}{changed}; use another store, or a checkpoint "
            "with the same frozen trunk")


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
