"""Decoding webdataset shards into image-caption samples, and every bad input into an error record.

A shard is a tar file whose members are named ``<key>.<ext>`` (webdataset convention, keys split
with webdataset's own ``base_plus_ext``); consecutive members with the same key form one sample
group. Corpora at web scale always contain some broken input, and a scoring run must neither
stop on it nor drop it silently, so :func:`iter_shard` turns each problem into an
:class:`ErrorRecord` (one ``errors`` table row) and carries on with the next sample:

=========  ==========================================================================
stage      cause
=========  ==========================================================================
open       the shard cannot be opened (missing, permission denied); key is ""
read       the tar is corrupt or truncated; key is the last key seen ("" if none; that
           sample is dropped, its members may be incomplete), samples before it are kept
image      no .jpg/.jpeg/.png/.webp member, or the image does not decode
caption    no caption, empty caption, caption not UTF-8, .json member not valid JSON
duplicate  a key seen before in the same shard; the first occurrence is kept
=========  ==========================================================================

Each bad sample gets exactly one record: the first problem found, checked in the order
image present, .json, caption, image decoding. Output order is tar order, so it is deterministic.

Decoding may run on a thread pool (``pool``): the tar is still read in order on the calling
thread, each group is decoded on the pool (Pillow releases the GIL while it decodes), and the
results come back in tar order, so the output is the same with or without a pool.
"""

from __future__ import annotations

import io
import json
import re
import tarfile
from collections.abc import Iterator, Mapping
from concurrent.futures import Executor
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import IO, Any

from PIL import Image
from webdataset.tariterators import base_plus_ext

from ecif_ray.data.shards import Shard, open_shard

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # preference order when a sample has several
CAPTION_JSON_FIELDS = ("caption", "text")
STAGES = ("open", "read", "image", "caption", "duplicate")
_META_MEMBER = re.compile(r"__[^/]*__($|/)")  # webdataset's skip_meta: __key__ etc. are not data


@dataclass(frozen=True)
class ErrorRecord:
    """One input that could not be used; becomes a row of the ``errors`` table."""

    shard: str  # shard id (Shard.name)
    key: str  # sample key, "" when unknown (whole shard unreadable)
    stage: str  # one of STAGES
    error: str  # short class: exception type name, or e.g. "EmptyCaption"
    message: str  # human-readable, names shard, key and member


@dataclass
class Sample:
    """One decoded image-caption pair, identified by ``(shard, key)``."""

    shard: str
    key: str
    shard_index: int  # ordinal among all sample groups of the shard in tar order, bad ones included
    image: Image.Image  # decoded, fully loaded, RGB
    caption: str  # stripped, non-empty
    meta: dict[str, Any] = field(default_factory=dict)  # parsed .json member, {} when absent


@dataclass
class _Group:
    """The members of one sample group, by lower-case extension."""

    key: str
    members: dict[str, bytes]


class _Reject(Exception):
    """Raised while decoding a group; turned into an ErrorRecord for that sample."""

    def __init__(self, stage: str, error: str, message: str):
        super().__init__(message)
        self.stage, self.error, self.message = stage, error, message


def iter_shard(shard: Shard, storage_options: Mapping[str, Any] | None = None,
               pool: Executor | None = None) -> Iterator[Sample | ErrorRecord]:
    """Stream one shard's samples and error records in tar order, never raising on bad input.
    With ``pool`` the whole shard is read before the first item comes back (decoded in parallel)."""
    with ExitStack() as stack:
        try:
            fileobj = stack.enter_context(open_shard(shard, storage_options))
        except Exception as exc:  # any filesystem's failure to open is an input problem
            message = f"shard {shard.name}: cannot open {shard.url}: {type(exc).__name__}: {exc}"
            yield ErrorRecord(shard.name, "", "open", type(exc).__name__, message)
            return
        yield from _decode_groups(shard.name, _read_groups(shard.name, fileobj), pool)


def read_shard(
    shard: Shard, storage_options: Mapping[str, Any] | None = None, pool: Executor | None = None
) -> tuple[list[Sample], list[ErrorRecord]]:
    """Read a whole shard into memory: (good samples, error records), both in tar order."""
    samples: list[Sample] = []
    errors: list[ErrorRecord] = []
    for item in iter_shard(shard, storage_options, pool):
        (samples if isinstance(item, Sample) else errors).append(item)
    return samples, errors


def _decode_groups(shard: str, items: Iterator[_Group | ErrorRecord],
                   pool: Executor | None = None) -> Iterator[Sample | ErrorRecord]:
    """Number the groups, reject repeated keys, decode the rest (on ``pool`` when given, in order)."""

    def decode(item: tuple[int, _Group] | ErrorRecord) -> Sample | ErrorRecord:
        return item if isinstance(item, ErrorRecord) else _decode(shard, *item)

    numbered = _number_groups(shard, items)
    yield from (pool.map(decode, numbered) if pool is not None else map(decode, numbered))


def _number_groups(shard: str, items: Iterator[_Group | ErrorRecord]) -> Iterator[tuple[int, _Group] | ErrorRecord]:
    """Each group with its ordinal in the shard; a repeated key becomes its ``duplicate`` record."""
    first_seen: dict[str, int] = {}
    index = 0
    for item in items:
        if isinstance(item, ErrorRecord):
            yield item
            continue
        if item.key in first_seen:
            yield _duplicate(shard, item.key, index, first_seen[item.key])
        else:
            first_seen[item.key] = index
            yield index, item
        index += 1


def _duplicate(shard: str, key: str, index: int, first: int) -> ErrorRecord:
    message = (
        f"shard {shard}, key {key!r}: key appears again as sample #{index}; the first occurrence "
        f"(sample #{first}) is kept and this one is skipped, never merged"
    )
    return ErrorRecord(shard, key, "duplicate", "DuplicateKey", message)


def _decode(shard: str, index: int, group: _Group) -> Sample | ErrorRecord:
    try:
        image_ext = _image_ext(group)
        meta = _parse_meta(group)
        caption = _caption(group, meta)
        image = _decode_image(group, image_ext)
    except _Reject as reject:
        message = f"shard {shard}, key {group.key!r}: {reject.message}"
        return ErrorRecord(shard, group.key, reject.stage, reject.error, message)
    return Sample(shard=shard, key=group.key, shard_index=index, image=image, caption=caption, meta=meta)


def _image_ext(group: _Group) -> str:
    for ext in IMAGE_EXTS:
        if ext in group.members:
            return ext
    found = ", ".join(f".{ext}" for ext in group.members) or "none"
    raise _Reject("image", "MissingImage", f"no image member (.jpg/.jpeg/.png/.webp); members: {found}")


def _parse_meta(group: _Group) -> dict[str, Any]:
    raw = group.members.get("json")
    if raw is None:
        return {}
    try:
        meta = json.loads(raw)
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        raise _Reject("caption", "InvalidJSON", f".json member is not valid JSON: {exc}") from exc
    if not isinstance(meta, dict):
        raise _Reject("caption", "InvalidJSON", f".json member is a {type(meta).__name__}, not an object")
    return meta


def _caption(group: _Group, meta: dict[str, Any]) -> str:
    """The .txt member (strict UTF-8), else the json "caption"/"text" field; stripped, non-empty."""
    if "txt" in group.members:
        source = ".txt member"
        try:
            text = group.members["txt"].decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _Reject("caption", "NonUTF8Caption", f"{source} is not valid UTF-8: {exc}") from exc
    else:
        name = next((name for name in CAPTION_JSON_FIELDS if name in meta), None)
        if name is None:
            raise _Reject("caption", "MissingCaption", "no .txt member and no 'caption'/'text' field in .json")
        source, text = f".json field {name!r}", meta[name]
        if not isinstance(text, str):
            raise _Reject("caption", "InvalidCaption", f"{source} is a {type(text).__name__}, not a string")
    caption = text.removeprefix("\ufeff").strip()
    if not caption:
        raise _Reject("caption", "EmptyCaption", f"{source} is empty")
    return caption


def _decode_image(group: _Group, ext: str) -> Image.Image:
    """Decode fully now, so a truncated image fails here and not later inside a batch."""
    try:
        with Image.open(io.BytesIO(group.members[ext])) as image:
            return image.convert("RGB")  # convert() loads every pixel
    except Exception as exc:  # decoders raise many types (OSError, SyntaxError, ValueError, ...)
        raise _Reject("image", type(exc).__name__, f".{ext} member does not decode: {exc}") from exc


def _read_groups(shard: str, fileobj: IO[bytes]) -> Iterator[_Group | ErrorRecord]:
    """Group consecutive members by key; a corrupt tar ends the shard with a ``read`` record.

    A group is emitted as soon as the next member's header shows it is complete. The group being
    assembled when corruption strikes is dropped (its members may be incomplete) and the record
    names the last key seen. A member extension repeated within a group starts a new group with
    the same key, so that it is reported as a duplicate instead of being merged.
    """
    current: _Group | None = None
    last_key = ""
    try:
        for key, ext, member in _iter_members(fileobj):
            last_key = key
            if current is not None and (key != current.key or ext in current.members):
                yield current
                current = None
            data = member.read()
            if current is None:
                current = _Group(key, {})
            current.members[ext] = data
    except Exception as exc:  # tarfile, decompressors and filesystems raise many types
        where = f", at key {last_key!r}" if last_key else ""
        message = f"shard {shard}: tar is unreadable{where}: {type(exc).__name__}: {exc}"
        yield ErrorRecord(shard, last_key, "read", type(exc).__name__, message)
        return
    if current is not None:
        yield current


def _iter_members(fileobj: IO[bytes]) -> Iterator[tuple[str, str, IO[bytes]]]:
    """Yield ``(key, ext, member file)`` for the data members of a tar, in tar order.

    Written on ``tarfile`` directly rather than webdataset's ``tar_file_iterator`` because that
    one (like ``tarfile`` itself) silently takes a corrupt or truncated header for the end of the
    archive; here the bytes after the last member are checked (see :func:`_check_clean_end`).
    A member file must be read before the next item is requested.
    """
    with tarfile.open(fileobj=fileobj, mode="r:*") as tar:
        while (info := tar.next()) is not None:
            tar.members.clear()  # the member list would grow with the shard; nothing reads it
            if not info.isreg() or _META_MEMBER.match(info.name):
                continue
            key, ext = base_plus_ext(info.name)
            if key is None:
                continue
            member = tar.extractfile(info)
            assert member is not None  # regular files always have content
            yield key, ext.lower(), member
        _check_clean_end(tar)


def _check_clean_end(tar: tarfile.TarFile) -> None:
    """Raise unless the archive ends in zero blocks (or plain EOF, which GNU tar also accepts).

    ``tarfile`` stops iterating at a bad checksum or a truncated header without raising; any
    non-zero byte where the end-of-archive marker should be means members were lost.
    """
    tar.fileobj.seek(tar.offset)
    rest = tar.fileobj.read(tarfile.BLOCKSIZE)
    if rest.strip(tarfile.NUL):
        kind = "truncated" if len(rest) < tarfile.BLOCKSIZE else "invalid"
        raise tarfile.ReadError(f"{kind} tar header at byte {tar.offset}; the members after it are lost")
