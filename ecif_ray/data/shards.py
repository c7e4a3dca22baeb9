"""Shard listing on any fsspec filesystem.

A *shard* is one webdataset tar file. Its basename (``train-000003.tar``) is the shard id used in
every output table and error record, so listing refuses duplicate basenames up front: two shards
with the same id would make ``(shard, key)`` row identity ambiguous.

Two kinds of spec are distinguished on purpose:

* names spelled out by the user (a single ``.tar`` path, a brace pattern such as
  ``s3://b/train-{000000..000127}.tar``) are taken as given, without touching storage. Checking
  100k objects on S3 up front would be slow, and a missing shard is found when it is read: it is
  retried, never committed, reported as a failed shard (the run goes on, exits 4, and a rerun
  tries it again);
* patterns that *search* (a directory, a glob) must match at least one shard, otherwise the spec
  is almost certainly wrong and is refused with :class:`ShardListingError`.
"""

from __future__ import annotations

import os
import posixpath
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import fsspec
from braceexpand import braceexpand
from fsspec.core import OpenFile, url_to_fs
from fsspec.implementations.local import LocalFileSystem, make_path_posix

SHARD_SUFFIX = ".tar"
_GLOB_CHARS = ("*", "?", "[")

ShardSpec = str | os.PathLike[str] | Sequence[str | os.PathLike[str]]


@dataclass(frozen=True)
class Shard:
    """One shard: where to read it and the id it is known by in tables and error records."""

    url: str  # fsspec URL (s3://bucket/x.tar) or absolute local path
    name: str  # basename, e.g. "train-000003.tar"


class ShardListingError(ValueError):
    """The shard spec matched nothing, or matched shards whose ids collide."""


def list_shards(spec: ShardSpec, storage_options: Mapping[str, Any] | None = None) -> list[Shard]:
    """List the shards named by ``spec``, in a deterministic order.

    ``spec`` is a directory (its ``*.tar`` files, sorted by name), a brace pattern (expansion
    order, existence not checked), a glob (sorted by path), a single shard path, or a list of
    any of these (concatenated in list order). Local relative paths become absolute so that
    workers with another working directory read the same files. Directories and globs list
    symbolic links to files as well, each shard named after its link.
    """
    specs = [os.fspath(spec)] if isinstance(spec, str | os.PathLike) else [os.fspath(s) for s in spec]
    if not specs:
        raise ShardListingError("empty shard spec: name a directory, pattern or .tar path")
    options = dict(storage_options or {})
    shards = [shard for one in specs for shard in _list_one(one, options)]
    _check_unique_names(shards, spec)
    return shards


def open_shard(shard: Shard, storage_options: Mapping[str, Any] | None = None) -> OpenFile:
    """Return a context manager that yields the shard as a binary, seekable file object."""
    return fsspec.open(shard.url, mode="rb", **dict(storage_options or {}))


def _list_one(spec: str, options: dict[str, Any]) -> list[Shard]:
    expanded = list(braceexpand(spec))
    if len(expanded) > 1 or expanded[0] != spec:
        return [_literal_shard(url) for url in expanded]
    fs, path = url_to_fs(spec, **options)
    if any(char in path for char in _GLOB_CHARS):
        return _glob(fs, spec, path)
    if spec.endswith(SHARD_SUFFIX):
        return [_literal_shard(spec)]
    fs.invalidate_cache()  # listings may be cached from earlier in this process
    if fs.isdir(path):
        return _list_directory(fs, spec, path)
    if fs.isfile(path):
        return [_shard_from_fs(fs, path)]
    raise ShardListingError(f"shard spec {spec!r} matched nothing: not a directory, .tar file or pattern")


def _literal_shard(url: str) -> Shard:
    """A shard named by the user: normalise local paths, never check existence."""
    if "://" not in url and "::" not in url:
        url = make_path_posix(os.path.expanduser(url))
    return Shard(url=url, name=posixpath.basename(url.rstrip("/")))


def _list_directory(fs: fsspec.AbstractFileSystem, spec: str, path: str) -> list[Shard]:
    entries = fs.ls(path, detail=True)
    names = [e["name"] for e in entries if e["name"].endswith(SHARD_SUFFIX) and _is_shard_file(fs, e)]
    if not names:
        raise ShardListingError(f"shard spec {spec!r} matched nothing: no *{SHARD_SUFFIX} files in directory")
    return [_shard_from_fs(fs, name) for name in sorted(names, key=posixpath.basename)]


def _glob(fs: fsspec.AbstractFileSystem, spec: str, path: str) -> list[Shard]:
    fs.invalidate_cache()
    matches = fs.glob(path, detail=True)
    names = sorted(name for name, info in matches.items() if _is_shard_file(fs, {**info, "name": name}))
    if not names:
        raise ShardListingError(f"shard spec {spec!r} matched nothing: glob found no files")
    return [_shard_from_fs(fs, name) for name in names]


def _is_shard_file(fs: fsspec.AbstractFileSystem, info: Mapping[str, Any]) -> bool:
    """A file, or a symbolic link that does not point to a directory.

    fsspec reports a local symlink as type "other" whatever it points to. A link to a file is a
    shard, named after the link; a dangling link is listed too, so that reading it fails the shard
    (reported, never committed) instead of the shard vanishing silently.
    """
    if info["type"] == "file":
        return True
    return bool(info.get("islink")) and not fs.isdir(info["name"])


def _shard_from_fs(fs: fsspec.AbstractFileSystem, path: str) -> Shard:
    """A shard found by listing: give it back the protocol the filesystem stripped."""
    url = path if isinstance(fs, LocalFileSystem) else fs.unstrip_protocol(path)
    return Shard(url=url, name=posixpath.basename(path))


def _check_unique_names(shards: list[Shard], spec: ShardSpec) -> None:
    counts = Counter(shard.name for shard in shards)
    duplicates = sorted(name for name, count in counts.items() if count > 1)
    if duplicates:
        urls = [s.url for s in shards if s.name == duplicates[0]]
        raise ShardListingError(
            f"shard spec {spec!r} lists duplicate shard ids {duplicates[:5]} (shard ids are basenames and "
            f"must be unique; e.g. {duplicates[0]!r} is {urls})"
        )
