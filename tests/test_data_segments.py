"""Segments (the fixed ECIF partition), exclusions, and collation into tensor batches."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from ecif_ray.data.exclusions import ExclusionSet, read_exclusions
from ecif_ray.data.samples import Sample, ShardUnavailable, read_shard
from ecif_ray.data.segments import (
    PairBatch,
    Segment,
    collate_segment,
    exclude_from_segments,
    load_segments,
    segment_samples,
    stream_segments,
)
from ecif_ray.data.shards import list_shards

TOKENS = 6


def preprocess(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)


def tokenizer(captions: list[str]) -> torch.Tensor:
    return torch.tensor([[ord(c) for c in caption[:TOKENS].ljust(TOKENS)] for caption in captions])


def fake_samples(shard: str, n: int) -> list[Sample]:
    image = Image.new("RGB", (2, 2))
    return [Sample(shard, f"k{i}", i, image, f"caption {i}") for i in range(n)]


def membership(segments) -> list[tuple[str, int, list[str]]]:
    return [(seg.shard, seg.index, [s.key for s in seg.samples]) for seg in segments]


@pytest.fixture
def corpus(tmp_path, wds):
    """Two shards of 5 good samples; shard 1 also has a bad sample in the middle."""
    wds.write_shard(tmp_path / "c" / "s-000000.tar", 5)
    members = []
    for i in range(6):
        caption = "" if i == 2 else f"caption {i}"  # key 000002: empty caption
        members += wds.sample_members(f"{i:06d}", caption)
    wds.write_tar(tmp_path / "c" / "s-000001.tar", members)
    return tmp_path / "c"


def test_segments_are_consecutive_with_a_short_last_one():
    segments = list(segment_samples(fake_samples("a.tar", 10), 4))
    assert membership(segments) == [
        ("a.tar", 0, ["k0", "k1", "k2", "k3"]),
        ("a.tar", 1, ["k4", "k5", "k6", "k7"]),
        ("a.tar", 2, ["k8", "k9"]),
    ]
    assert [len(s) for s in segments] == [4, 4, 2]
    assert list(segment_samples([], 3)) == []


def test_segments_depend_only_on_content_and_size(corpus):
    (shard,) = list_shards(f"{corpus}/s-000001.tar")
    first = membership(list(stream_segments(shard, segment_size=2)))
    again = membership(segment_samples(read_shard(shard)[0], 2))
    assert (
        first
        == again
        == [
            ("s-000001.tar", 0, ["000000", "000001"]),
            ("s-000001.tar", 1, ["000003", "000004"]),  # the bad sample is not a pair: no hole
            ("s-000001.tar", 2, ["000005"]),
        ]
    )


def test_bad_segment_arguments_are_refused():
    with pytest.raises(ValueError, match="segment size"):
        segment_samples(fake_samples("a.tar", 2), 0)
    with pytest.raises(ValueError, match="two shards"):
        list(segment_samples(fake_samples("a.tar", 2) + fake_samples("b.tar", 2), 3))


def test_exclusion_removes_pairs_and_keeps_every_other_membership():
    segments = list(segment_samples(fake_samples("a.tar", 7), 3))
    exclude = ExclusionSet(pairs=frozenset({("a.tar", "k1"), ("b.tar", "k4")}), keys=frozenset({"k6"}))
    assert membership(exclude_from_segments(segments, exclude)) == [
        ("a.tar", 0, ["k0", "k2"]),  # k1 left its segment; nothing moved in
        ("a.tar", 1, ["k3", "k4", "k5"]),  # ("b.tar", "k4") is another shard's pair
        # segment 2 (only k6) became empty and is dropped
    ]
    assert membership(exclude_from_segments(segments, ExclusionSet())) == membership(segments)
    assert membership(segments)[0] == ("a.tar", 0, ["k0", "k1", "k2"])  # input segments untouched


def test_collate_segment_builds_tensors_and_identities():
    segment = Segment("a.tar", 3, fake_samples("a.tar", 3))
    batch = collate_segment(segment, preprocess, tokenizer)
    assert isinstance(batch, PairBatch) and len(batch) == 3
    assert (batch.shard, batch.segment, batch.keys, batch.shard_indices) == ("a.tar", 3, ["k0", "k1", "k2"], [0, 1, 2])
    assert batch.captions == ["caption 0", "caption 1", "caption 2"] and batch.meta == [{}, {}, {}]
    assert batch.images.shape == (3, 3, 2, 2) and batch.images.dtype == torch.float32
    assert batch.tokens.shape == (3, TOKENS) and batch.tokens.dtype == torch.long
    assert batch.to("cpu").keys == batch.keys
    with ThreadPoolExecutor(2) as pool:  # preprocessing on threads keeps the order
        threaded = collate_segment(segment, preprocess, tokenizer, pool)
    assert threaded.keys == batch.keys and torch.equal(threaded.images, batch.images)


def test_load_segments_orders_batches_excludes_after_segmenting_and_returns_errors(corpus, tmp_path):
    exclusions = tmp_path / "exclude.csv"
    exclusions.write_text("shard,key\ns-000001.tar,000001\n000004\n")
    kwargs = dict(segment_size=2, preprocess=preprocess, tokenizer=tokenizer)
    batches, errors = load_segments(str(corpus), exclude=read_exclusions(str(exclusions)), **kwargs)
    assert [(b.shard, b.segment, b.keys) for b in batches] == [
        ("s-000000.tar", 0, ["000000", "000001"]),
        ("s-000000.tar", 1, ["000002", "000003"]),  # 000004 (key-only line) excluded everywhere
        ("s-000001.tar", 0, ["000000"]),
        ("s-000001.tar", 1, ["000003"]),
        ("s-000001.tar", 2, ["000005"]),
    ]
    assert [b.shard_indices for b in batches][2:] == [[0], [3], [5]]
    assert [(e.shard, e.key, e.stage, e.error) for e in errors] == [
        ("s-000001.tar", "000002", "caption", "EmptyCaption")
    ]
    assert batches[0].images.shape == (2, 3, 8, 8)
    listed = list_shards(str(corpus))
    again, _ = load_segments(listed, **kwargs)  # an already-listed shard list works too
    assert [b.keys for b in again][:3] == [["000000", "000001"], ["000002", "000003"], ["000004"]]


def test_load_segments_refuses_a_missing_shard_by_name(corpus):
    with pytest.raises(ShardUnavailable, match=r"s-000009.tar"):
        load_segments(f"{corpus}/s-{{000000,000009}}.tar", segment_size=4, preprocess=preprocess,
                      tokenizer=tokenizer)


# ---------------------------------------------------------------------------------------------
# exclusion files


def test_text_exclusions_in_every_format(tmp_path):
    path = tmp_path / "exclude.txt"
    path.write_text(
        "# top harmful pairs\n"
        "\n"
        "shard,key\n"
        "train-000001.tar,000010\n"
        "train-000002.tar\t000020\n"
        "  train-000003.tar , 000030  \n"
        '"train-000004.tar","key,with,commas"\n'
        "000040\n"
    )
    exclude = read_exclusions(str(path))
    assert exclude.pairs == {
        ("train-000001.tar", "000010"),
        ("train-000002.tar", "000020"),
        ("train-000003.tar", "000030"),
        ("train-000004.tar", "key,with,commas"),
    }
    assert exclude.keys == {"000040"} and len(exclude) == 5
    assert exclude.contains("train-000001.tar", "000010") and not exclude.contains("train-000009.tar", "000010")
    assert exclude.contains("any.tar", "000040")


def test_tab_separated_and_key_only_files_with_headers(tmp_path):
    tsv, keys = tmp_path / "x.tsv", tmp_path / "keys.txt"
    tsv.write_text("shard\tkey\na.tar\tk1\n")
    keys.write_text("key\nk1\nk2\n")
    assert read_exclusions(str(tsv)) == ExclusionSet(pairs=frozenset({("a.tar", "k1")}))
    assert read_exclusions(str(keys)) == ExclusionSet(keys=frozenset({"k1", "k2"}))


@pytest.mark.parametrize("line", ["a.tar,k1,extra", ",k1", "a.tar,", "a.tar\t\tk1", "a.tar\t "])
def test_malformed_line_names_file_and_line(tmp_path, line):
    path = tmp_path / "bad.csv"
    path.write_text(f"# comment\na.tar,k0\n{line}\n")
    with pytest.raises(ValueError, match=rf"{path}, line 3: malformed entry"):
        read_exclusions(str(path))


def test_header_is_only_a_header_on_the_first_entry_line(tmp_path):
    path = tmp_path / "x.csv"
    path.write_text("a.tar,k0\nshard,key\n")
    assert read_exclusions(str(path)).pairs == {("a.tar", "k0"), ("shard", "key")}


def test_non_utf8_text_is_refused(tmp_path):
    path = tmp_path / "x.csv"
    path.write_bytes(b"a.tar,caf\xe9\n")
    with pytest.raises(ValueError, match="not UTF-8"):
        read_exclusions(str(path))


def test_parquet_exclusions(tmp_path):
    pairs, keys_only, no_key = tmp_path / "pairs.parquet", tmp_path / "keys.parquet", tmp_path / "bad.parquet"
    pq.write_table(pa.table({"shard": ["a.tar", None], "key": ["k1", "k2"], "score": [0.5, 0.1]}), pairs)
    pq.write_table(pa.table({"key": ["k3"]}), keys_only)
    pq.write_table(pa.table({"shard": ["a.tar"]}), no_key)
    assert read_exclusions(str(pairs)) == ExclusionSet(pairs=frozenset({("a.tar", "k1")}), keys=frozenset({"k2"}))
    assert read_exclusions(str(keys_only)) == ExclusionSet(keys=frozenset({"k3"}))
    with pytest.raises(ValueError, match="no 'key' column"):
        read_exclusions(str(no_key))


def test_exclusions_from_s3(s3_bucket, tmp_path):
    local = tmp_path / "exclude.csv"
    local.write_text("a.tar,k1\n")
    url = s3_bucket.put(local, "lists/exclude.csv")
    assert read_exclusions(url, storage_options=s3_bucket.storage_options).pairs == {("a.tar", "k1")}


def test_exclusion_set_from_entries():
    exclude = ExclusionSet.from_entries([("a.tar", "k1"), (None, "k2")])
    assert exclude == ExclusionSet(pairs=frozenset({("a.tar", "k1")}), keys=frozenset({"k2"}))
    assert exclude.contains("a.tar", "k1") and exclude.contains("b.tar", "k2") and not exclude.contains("b.tar", "k1")
