"""Decoding webdataset shards into image-caption samples, and every bad input into an error record.

A shard is a tar file whose members are named ``<key>.<ext>`` (webdataset convention, keys split
with webdataset's own ``base_plus_ext``); consecutive members with the same key form one sample
group. Corpora at web scale always contain some broken input, and a scoring run must neither
stop on it nor drop it silently, so :func:`iter_shard` turns each problem into an
:class:`ErrorRecord` (one ``errors`` table row) and carries on with the next sample:

=========  ==========================================================================
stage      cause
=========  ==========================================================================
read       the tar is corrupt or truncated, including a tar cut short exactly at a member
           boundary (its end-of-archive marker, two zero blocks, is missing); key is the
           last key seen ("" if none; that sample is dropped, its members may be
           incomplete), samples before it are kept
key        the member name is not valid UTF-8; key is a printable escape of the raw
           name (``\\xff`` for a byte that does not decode)
limit      a member larger than ``ReadLimits.max_member_bytes`` (never read into memory),
           or an image with more than ``ReadLimits.max_image_pixels`` pixels (never decoded)
image      no .jpg/.jpeg/.png/.webp member, or the image does not decode
caption    no caption, empty caption, caption not UTF-8 (or a JSON string holding a lone
           surrogate such as ``"\\ud800"``, which no UTF-8 writer can store), .json member
           not valid JSON
duplicate  a key seen before in the same shard; the first occurrence is kept
=========  ==========================================================================

A shard the *storage* fails to deliver is different: it cannot be opened (missing, permission
denied, endpoint down), or a read fails in the filesystem or network layer (a connection reset,
a timeout) rather than in the tar's bytes. Nothing is known to be wrong with the input, so no
record is made: :class:`ShardUnavailable` is raised, the pipeline retries the shard and never
commits it unread, and a rerun tries it again.

Each bad sample gets exactly one record: the first problem found, checked in the order
key, member size, image present, .json, caption, image size, image decoding. Output order is
tar order, so it is deterministic. Every text an :class:`ErrorRecord` carries is valid UTF-8, so
an error row can always be written. Captions longer than ``ReadLimits.max_caption_chars``
characters are cut to that length (after stripping): far more than any tokenizer reads, and it
keeps a runaway caption out of the tables.

Decoding may run on a thread pool (``pool``): the tar is still read in order on the calling
thread, each group is decoded on the pool (Pillow releases the GIL while it decodes), and the
results come back in tar order, so the output is the same with or without a pool. The pool runs
at most ``DECODE_AHEAD`` groups ahead of the consumer, so streaming a shard holds a bounded number
of decoded images whatever the shard's size.
"""

from __future__ import annotations

import io
import json
import re
import tarfile
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Executor, Future
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import IO, Any

from PIL import Image
from webdataset.tariterators import base_plus_ext

from ecif_ray.data.limits import DEFAULT_LIMITS, ReadLimits
from ecif_ray.data.shards import Shard, open_shard

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # preference order when a sample has several
CAPTION_JSON_FIELDS = ("caption", "text")
STAGES = ("read", "key", "limit", "image", "caption", "duplicate")
DECODE_AHEAD = 32  # groups a decoding pool may run ahead of the consumer (bounds memory)
_META_MEMBER = re.compile(r"__[^/]*__($|/)")  # webdataset's skip_meta: __key__ etc. are not data
_MEMBER_NAME_ENCODING = "utf-8"  # tar member names are decoded as UTF-8, bad bytes as surrogate escapes




# Failures of the storage, not of the bytes it delivered: retried, never recorded as bad input.
_STORAGE_ERRORS = (ConnectionError, TimeoutError, FileNotFoundError, PermissionError, InterruptedError)
_STORAGE_MODULES = ("botocore", "aiobotocore", "aiohttp", "urllib3", "requests", "s3fs", "gcsfs", "adlfs")


class ShardUnavailable(Exception):
    """The storage did not deliver a shard (it cannot be opened, or a read failed below the tar
    format); the message names the shard and the cause. Transient as far as anyone can tell:
    retry it, never commit it."""


def is_storage_failure(exc: BaseException) -> bool:
    """Whether ``exc`` (or anything in its cause chain) is a filesystem or network failure rather than
    bad bytes: tarfile and gzip wrap the stream's own errors (``ReadError("not a gzip file")`` from a
    connection reset), so the chain is followed. An OSError with an errno is the operating system's."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, _STORAGE_ERRORS) or type(current).__module__.split(".")[0] in _STORAGE_MODULES:
            return True
        if isinstance(current, OSError) and current.errno is not None:
            return True
        current = current.__cause__ or current.__context__
    return False


def safe_text(text: str) -> str:
    """``text`` made valid UTF-8: undecodable bytes (surrogate escapes) become ``\\xNN``, lone
    surrogates ``\\uDNNN``. Text that is already valid comes back unchanged."""
    if _is_utf8(text):
        return text
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate outside the escape range (from JSON "\ud800")
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return raw.decode("utf-8", "backslashreplace")


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@dataclass(frozen=True)
class ErrorRecord:
    """One input that could not be used; becomes a row of the ``errors`` table.

    Its text fields are made valid UTF-8 on creation (:func:`safe_text`), whatever the input held.
    """

    shard: str  # shard id (Shard.name)
    key: str  # sample key, "" when unknown (whole shard unreadable); escaped if not UTF-8
    stage: str  # one of STAGES
    error: str  # short class: exception type name, or e.g. "EmptyCaption"
    message: str  # human-readable, names shard, key and member

    def __post_init__(self) -> None:
        for name in ("shard", "key", "error", "message"):
            object.__setattr__(self, name, safe_text(getattr(self, name)))


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
    """The members of one sample group, by lower-case extension; ``oversize``: members left unread
    because they exceed the member cap, with their declared sizes."""

    key: str
    members: dict[str, bytes]
    oversize: dict[str, int] = field(default_factory=dict)

    def has(self, ext: str) -> bool:
        return ext in self.members or ext in self.oversize


class _Reject(Exception):
    """Raised while decoding a group; turned into an ErrorRecord for that sample."""

    def __init__(self, stage: str, error: str, message: str):
        super().__init__(message)
        self.stage, self.error, self.message = stage, error, message


def iter_shard(shard: Shard, storage_options: Mapping[str, Any] | None = None,
               pool: Executor | None = None, *, limits: ReadLimits = DEFAULT_LIMITS) -> Iterator[Sample | ErrorRecord]:
    """Stream one shard's samples and error records in tar order, never raising on bad input; raises
    :class:`ShardUnavailable` when the storage fails. With ``pool``, up to ``DECODE_AHEAD`` groups are
    decoded in parallel ahead of the consumer."""
    with ExitStack() as stack:
        try:
            fileobj = stack.enter_context(open_shard(shard, storage_options))
        except Exception as exc:  # whatever the filesystem, a shard that cannot be opened was not read
            raise ShardUnavailable(f"shard {shard.name}: cannot open {shard.url}: {type(exc).__name__}: {exc}") from exc
        groups = _read_groups(shard.name, fileobj, limits.max_member_bytes)
        yield from _decode_groups(shard.name, groups, pool, limits)


def read_shard(
    shard: Shard, storage_options: Mapping[str, Any] | None = None, pool: Executor | None = None, *,
    limits: ReadLimits = DEFAULT_LIMITS,
) -> tuple[list[Sample], list[ErrorRecord]]:
    """Read a whole shard into memory: (good samples, error records), both in tar order."""
    samples: list[Sample] = []
    errors: list[ErrorRecord] = []
    for item in iter_shard(shard, storage_options, pool, limits=limits):
        (samples if isinstance(item, Sample) else errors).append(item)
    return samples, errors


def _decode_groups(shard: str, items: Iterator[_Group | ErrorRecord], pool: Executor | None = None,
                   limits: ReadLimits = DEFAULT_LIMITS) -> Iterator[Sample | ErrorRecord]:
    """Number the groups, reject repeated keys, decode the rest (on ``pool`` when given, in order)."""

    def decode(item: tuple[int, _Group] | ErrorRecord) -> Sample | ErrorRecord:
        return item if isinstance(item, ErrorRecord) else _decode(shard, *item, limits)

    numbered = _number_groups(shard, items)
    yield from (_ordered_map(pool, decode, numbered, DECODE_AHEAD) if pool is not None else map(decode, numbered))


def _ordered_map(pool: Executor, fn: Callable[[Any], Any], items: Iterable[Any], ahead: int) -> Iterator[Any]:
    """``pool.map(fn, items)`` that submits at most ``ahead`` items before their results are taken
    (``Executor.map`` submits the whole iterable at once: a whole shard of decoded images)."""
    pending: deque[Future] = deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= ahead:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


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


def _decode(shard: str, index: int, group: _Group, limits: ReadLimits = DEFAULT_LIMITS) -> Sample | ErrorRecord:
    try:
        _check_key(group)
        _check_member_sizes(group, limits)
        image_ext = _image_ext(group)
        meta = _parse_meta(group)
        caption = _caption(group, meta, limits)
        image = _decode_image(group, image_ext, limits)
    except _Reject as reject:
        message = f"shard {shard}, key {group.key!r}: {reject.message}"
        return ErrorRecord(shard, group.key, reject.stage, reject.error, message)
    return Sample(shard=shard, key=group.key, shard_index=index, image=image, caption=caption, meta=meta)


def _check_key(group: _Group) -> None:
    if not _is_utf8(group.key):
        raise _Reject("key", "NonUTF8Key", f"member name is not valid UTF-8 (shown escaped: {safe_text(group.key)!r})")


def _check_member_sizes(group: _Group, limits: ReadLimits) -> None:
    if group.oversize:
        ext, size = next(iter(group.oversize.items()))
        raise _Reject("limit", "MemberTooLarge", f".{ext} member is {size} bytes, over the limit of "
                                                 f"{limits.max_member_bytes} bytes (max_member_bytes); not read")


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


def _caption(group: _Group, meta: dict[str, Any], limits: ReadLimits = DEFAULT_LIMITS) -> str:
    """The .txt member (strict UTF-8), else the json "caption"/"text" field; stripped, non-empty,
    encodable as UTF-8, cut to ``limits.max_caption_chars`` characters."""
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
        if not _is_utf8(text):
            raise _Reject("caption", "NonUTF8Caption", f"{source} holds a lone surrogate (e.g. \"\\ud800\"), "
                                                       f"not valid Unicode text: {safe_text(text)[:200]!r}")
    caption = text.removeprefix("\ufeff").strip()
    if not caption:
        raise _Reject("caption", "EmptyCaption", f"{source} is empty")
    return caption[: limits.max_caption_chars].rstrip()


def _decode_image(group: _Group, ext: str, limits: ReadLimits = DEFAULT_LIMITS) -> Image.Image:
    """Decode fully now, so a truncated image fails here and not later inside a batch; an image
    over the pixel cap is refused from its header, before any pixel is decoded."""
    try:
        with Image.open(io.BytesIO(group.members[ext])) as image:
            _check_pixels(image, ext, limits)
            return image.convert("RGB")  # convert() loads every pixel
    except _Reject:
        raise
    except Image.DecompressionBombError as exc:  # Pillow's own cap, at 2 x Image.MAX_IMAGE_PIXELS
        message = f".{ext} member is refused by Pillow's decompression-bomb check: {exc}"
        raise _Reject("limit", "ImageTooLarge", message) from exc
    except Exception as exc:  # decoders raise many types (OSError, SyntaxError, ValueError, ...)
        # Pillow names the in-memory file it could not identify with its address: drop it, so that the
        # same bad sample gives the same message in every pass (scoring, feature store, rerun).
        reason = re.sub(r" at 0x[0-9a-fA-F]+", "", str(exc))
        raise _Reject("image", type(exc).__name__, f".{ext} member does not decode: {reason}") from exc


def _check_pixels(image: Image.Image, ext: str, limits: ReadLimits) -> None:
    width, height = image.size
    if width * height > limits.max_image_pixels:
        message = (f".{ext} member is {width}x{height} = {width * height} pixels, over the limit of "
                   f"{limits.max_image_pixels} (max_image_pixels); not decoded")
        raise _Reject("limit", "ImageTooLarge", message)


def _read_groups(shard: str, fileobj: IO[bytes],
                 max_member_bytes: int = DEFAULT_LIMITS.max_member_bytes) -> Iterator[_Group | ErrorRecord]:
    """Group consecutive members by key; a corrupt or truncated tar ends the shard with a ``read`` record.

    A group is emitted as soon as the next member's header shows it is complete. The group being
    assembled when corruption strikes is dropped (its members may be incomplete) and the record
    names the last key seen. A member extension repeated within a group starts a new group with
    the same key, so that it is reported as a duplicate instead of being merged. A member over
    ``max_member_bytes`` is not read; its group is rejected when decoded (stage ``limit``).
    """
    current: _Group | None = None
    last_key = ""
    try:
        for key, ext, size, member in _iter_members(fileobj):
            last_key = key
            if current is not None and (key != current.key or current.has(ext)):
                yield current
                current = None
            if current is None:
                current = _Group(key, {})
            if size > max_member_bytes:
                current.oversize[ext] = size
            else:
                current.members[ext] = member.read()
    except Exception as exc:  # tarfile, decompressors and filesystems raise many types
        where = f", at key {last_key!r}" if last_key else ""
        if is_storage_failure(exc):
            raise ShardUnavailable(f"shard {shard}: reading failed{where}: {type(exc).__name__}: {exc}") from exc
        message = f"shard {shard}: tar is unreadable{where}: {type(exc).__name__}: {exc}"
        yield ErrorRecord(shard, last_key, "read", type(exc).__name__, message)
        return
    if current is not None:
        yield current


def _iter_members(fileobj: IO[bytes]) -> Iterator[tuple[str, str, int, IO[bytes]]]:
    """Yield ``(key, ext, size, member file)`` for the data members of a tar, in tar order.

    Written on ``tarfile`` directly rather than webdataset's ``tar_file_iterator`` because that
    one (like ``tarfile`` itself) silently takes a corrupt or truncated header, or a tar cut short
    at a member boundary, for the end of the archive; here the end-of-archive marker is checked
    (see :func:`_check_clean_end`). ``size`` is the member's size as its header declares it; the
    member file may be read (before the next item is requested) or left unread, which skips it.
    """
    with tarfile.open(fileobj=fileobj, mode="r:*", encoding=_MEMBER_NAME_ENCODING) as tar:
        while (info := tar.next()) is not None:
            tar.members.clear()  # the member list would grow with the shard; nothing reads it
            if not info.isreg() or _META_MEMBER.match(info.name):
                continue
            key, ext = base_plus_ext(info.name)
            if key is None:
                continue
            member = tar.extractfile(info)
            assert member is not None  # regular files always have content
            yield key, ext.lower(), info.size, member
        _check_clean_end(tar)


def _check_clean_end(tar: tarfile.TarFile) -> None:
    """Raise unless the members are followed by the end-of-archive marker: two zero blocks.

    ``tarfile`` stops iterating at a bad checksum, a truncated header or the plain end of the
    file without raising. Any non-zero byte where the marker should be means members were lost;
    a file that ends before the marker was cut short, perhaps exactly between two members, so
    members after the cut may be lost even though every member read is whole.
    """
    tar.fileobj.seek(tar.offset)
    marker = tar.fileobj.read(2 * tarfile.BLOCKSIZE)
    if marker.strip(tarfile.NUL):
        kind = "truncated" if len(marker) < tarfile.BLOCKSIZE else "invalid"
        raise tarfile.ReadError(f"{kind} tar header at byte {tar.offset}; the members after it are lost")
    if len(marker) < 2 * tarfile.BLOCKSIZE:
        raise tarfile.ReadError(
            f"the tar ends at byte {tar.offset + len(marker)} without its end-of-archive marker (two zero "
            f"blocks): the shard was cut short and members after the cut may be lost")
