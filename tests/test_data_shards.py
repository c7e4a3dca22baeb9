"""Shard listing on local disk and on a real S3 endpoint (moto server on loopback)."""

from __future__ import annotations

import os

import pytest

from ecif_ray.data.samples import ShardUnavailable, read_shard
from ecif_ray.data.shards import Shard, ShardListingError, list_shards, open_shard


@pytest.fixture
def shard_dir(tmp_path, wds):
    """train-000000..000003.tar written out of order, plus files that are not shards."""
    root = tmp_path / "shards"
    for i in (2, 0, 3, 1):
        wds.write_shard(root / f"train-{i:06d}.tar", 2, prefix=f"s{i}-")
    (root / "README.txt").write_text("not a shard")
    (root / "nested").mkdir()
    wds.write_shard(root / "nested" / "other-000000.tar", 1)
    return root


def names(shards: list[Shard]) -> list[str]:
    return [s.name for s in shards]


def test_directory_lists_tar_files_sorted_by_name(shard_dir):
    shards = list_shards(str(shard_dir))
    assert names(shards) == [f"train-{i:06d}.tar" for i in range(4)]
    assert shards[0] == Shard(url=str(shard_dir / "train-000000.tar"), name="train-000000.tar")
    assert names(list_shards(shard_dir)) == names(shards)  # PathLike and trailing slash alike
    assert names(list_shards(f"{shard_dir}/")) == names(shards)


def test_brace_pattern_keeps_expansion_order_and_does_not_check_existence(shard_dir):
    shards = list_shards(f"{shard_dir}/train-{{000003,000001,000009}}.tar")
    assert names(shards) == ["train-000003.tar", "train-000001.tar", "train-000009.tar"]
    assert not os.path.exists(shards[2].url)  # surfaces when read: ShardUnavailable, retried, never committed
    ranged = list_shards(f"{shard_dir}/train-{{000000..000002}}.tar")
    assert names(ranged) == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]


def test_glob_lists_matching_files_sorted(shard_dir):
    assert names(list_shards(f"{shard_dir}/train-00000[13].tar")) == ["train-000001.tar", "train-000003.tar"]
    assert names(list_shards(f"{shard_dir}/*/*.tar")) == ["other-000000.tar"]


def test_single_file_and_relative_path_become_absolute(shard_dir, monkeypatch):
    monkeypatch.chdir(shard_dir)
    (shard,) = list_shards("train-000002.tar")
    assert shard == Shard(url=str(shard_dir / "train-000002.tar"), name="train-000002.tar")


def test_list_of_specs_is_concatenated_in_order(shard_dir):
    shards = list_shards([f"{shard_dir}/train-000003.tar", f"{shard_dir}/nested", f"{shard_dir}/train-00000[01].tar"])
    assert names(shards) == ["train-000003.tar", "other-000000.tar", "train-000000.tar", "train-000001.tar"]


@pytest.mark.parametrize(
    "make_spec",
    [
        lambda root: str(root / "empty"),  # directory without shards
        lambda root: str(root / "no-such-dir"),  # neither directory nor .tar
        lambda root: str(root / "*.tgz"),  # glob without matches
        lambda root: [],
    ],
    ids=["empty-dir", "missing-dir", "glob", "empty-list"],
)
def test_nothing_matched_is_refused_naming_the_spec(tmp_path, make_spec):
    (tmp_path / "empty").mkdir()
    spec = make_spec(tmp_path)
    with pytest.raises(ShardListingError, match=r"matched nothing|empty shard spec") as info:
        list_shards(spec)
    if spec:
        assert spec in str(info.value)


def test_duplicate_basenames_are_refused(shard_dir, tmp_path, wds):
    wds.write_shard(tmp_path / "copy" / "train-000001.tar", 1)
    with pytest.raises(ShardListingError, match=r"duplicate shard ids \['train-000001.tar'\]"):
        list_shards([str(shard_dir), str(tmp_path / "copy")])
    with pytest.raises(ShardListingError, match="duplicate"):
        list_shards(f"{shard_dir}/train-{{000001,000001}}.tar")


def test_open_shard_yields_the_bytes(shard_dir):
    (shard,) = list_shards(f"{shard_dir}/train-000000.tar")
    with open_shard(shard) as f:
        assert f.read() == (shard_dir / "train-000000.tar").read_bytes()


# ---------------------------------------------------------------------------------------------
# S3


@pytest.fixture
def s3_shards(s3_bucket, tmp_path, wds):
    """Three shards under s3://<bucket>/data/ plus a non-shard object."""
    for i in (1, 0, 2):
        local = wds.write_shard(tmp_path / f"train-{i:06d}.tar", 3, prefix=f"s{i}-")
        s3_bucket.put(local, f"data/train-{i:06d}.tar")
    (tmp_path / "notes.txt").write_text("x")
    s3_bucket.put(tmp_path / "notes.txt", "data/notes.txt")
    return s3_bucket


def test_s3_directory_listing_and_reading(s3_shards):
    options = s3_shards.storage_options
    for spec in (f"{s3_shards.url}/data/", f"{s3_shards.url}/data"):
        shards = list_shards(spec, storage_options=options)
        assert names(shards) == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
        assert shards[0].url == f"{s3_shards.url}/data/train-000000.tar"
    samples, errors = read_shard(shards[1], storage_options=options)
    assert errors == []
    assert [s.key for s in samples] == ["s1-000000", "s1-000001", "s1-000002"]
    assert samples[0].image.size == (8, 8)


def test_s3_brace_pattern_and_glob(s3_shards):
    options = s3_shards.storage_options
    shards = list_shards(f"{s3_shards.url}/data/train-{{000002,000000,000005}}.tar", storage_options=options)
    assert [s.url for s in shards] == [f"{s3_shards.url}/data/train-{i:06d}.tar" for i in (2, 0, 5)]
    samples, errors = read_shard(shards[0], storage_options=options)
    assert [s.key for s in samples] == ["s2-000000", "s2-000001", "s2-000002"] and errors == []
    with pytest.raises(ShardUnavailable, match=r"train-000005.tar: cannot open"):
        read_shard(shards[2], storage_options=options)
    globbed = list_shards(f"{s3_shards.url}/data/*.tar", storage_options=options)
    assert names(globbed) == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]


def test_s3_empty_prefix_is_refused(s3_bucket):
    with pytest.raises(ShardListingError, match="matched nothing"):
        list_shards(f"{s3_bucket.url}/nothing-here/", storage_options=s3_bucket.storage_options)
