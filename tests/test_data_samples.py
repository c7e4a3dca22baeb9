"""Decoding webdataset shards: good samples, and one error record for every kind of bad input."""

from __future__ import annotations

import io
import json
import tarfile
from concurrent.futures import ThreadPoolExecutor

import pytest
import webdataset as wds_lib
from PIL import Image

from ecif_ray.data.samples import ErrorRecord, Sample, ShardUnavailable, is_storage_failure, iter_shard, read_shard
from ecif_ray.data.shards import Shard


def shard_at(path) -> Shard:
    return Shard(url=str(path), name=path.name)


def triples(errors: list[ErrorRecord]) -> list[tuple[str, str, str]]:
    return [(e.key, e.stage, e.error) for e in errors]


def test_good_shard_yields_every_sample_in_tar_order(tmp_path, wds):
    path = wds.write_shard(tmp_path / "train-000000.tar", 5)
    samples, errors = read_shard(shard_at(path))
    assert errors == []
    assert [s.key for s in samples] == [f"{i:06d}" for i in range(5)]
    assert [s.shard_index for s in samples] == list(range(5))
    first = samples[0]
    assert isinstance(first, Sample) and first.shard == "train-000000.tar"
    assert first.caption == "a photo of sample 0." and first.meta == {}
    assert first.image.mode == "RGB" and first.image.size == (8, 8)
    assert samples[1].image.getpixel((0, 0)) == (37, 91, 151)  # decoded pixels, not lazily


def test_formats_json_captions_and_meta(tmp_path, wds):
    grey = Image.new("L", (4, 4), 128)
    members = [
        ("a.jpg", wds.image_bytes("JPEG")),
        ("a.txt", b"\xef\xbb\xbf  padded caption \n"),  # BOM and whitespace stripped
        ("a.json", json.dumps({"caption": "ignored, .txt wins", "url": "u"}).encode()),
        ("b.webp", wds.image_bytes("WEBP")),
        ("b.json", json.dumps({"caption": "from json"}).encode()),
        ("c.png", _encode(grey, "PNG")),
        ("c.jpeg", wds.image_bytes("JPEG")),  # jpeg preferred over png
        ("c.json", json.dumps({"text": "from text field", "n": 1}).encode()),
        ("__meta__", b"webdataset metadata is skipped"),
        ("d.PNG", wds.image_bytes("PNG")),  # extensions are case-insensitive
        ("d.txt", "ünïcode ✓".encode()),
    ]
    samples, errors = read_shard(shard_at(wds.write_tar(tmp_path / "x.tar", members)))
    assert errors == []
    assert [(s.key, s.caption) for s in samples] == [
        ("a", "padded caption"),
        ("b", "from json"),
        ("c", "from text field"),
        ("d", "ünïcode ✓"),
    ]
    assert samples[0].meta == {"caption": "ignored, .txt wins", "url": "u"}
    assert samples[2].meta == {"text": "from text field", "n": 1}
    assert samples[2].image.size == (8, 8)  # the .jpeg member, not the 4x4 .png


def test_shards_written_by_webdataset_tarwriter_are_read(tmp_path, wds):
    path = tmp_path / "wds-000000.tar"
    with wds_lib.TarWriter(str(path)) as sink:
        for i in range(3):
            sink.write({"__key__": f"k{i}", "png": wds.image_bytes(), "txt": f"caption {i}", "json": {"i": i}})
    samples, errors = read_shard(shard_at(path))
    assert errors == []
    assert [(s.key, s.caption, s.meta) for s in samples] == [(f"k{i}", f"caption {i}", {"i": i}) for i in range(3)]


def test_every_bad_sample_kind_becomes_one_error_record(tmp_path, wds):
    png = wds.image_bytes()
    jpeg = wds.image_bytes("JPEG", size=64)
    members = [
        *wds.sample_members("good0"),
        ("noimage.txt", b"caption without image"),
        *wds.sample_members("badimage", image=b"\x89PNG\r\n\x1a\n not really a png"),
        *wds.sample_members("truncimage", image=jpeg[:-10], ext="jpg"),
        *wds.sample_members("nocaption", caption=None),
        *wds.sample_members("emptycaption", caption=" \n\t "),
        *wds.sample_members("latin1", caption="caf\xe9".encode("latin-1")),
        ("badjson.png", png),
        ("badjson.json", b"{not json"),
        ("jsonlist.png", png),
        ("jsonlist.txt", b"caption ok"),
        ("jsonlist.json", b"[1, 2]"),
        ("jsonnocap.png", png),
        ("jsonnocap.json", b'{"url": "x"}'),
        ("jsonempty.png", png),
        ("jsonempty.json", b'{"caption": ""}'),
        ("jsonnumber.png", png),
        ("jsonnumber.json", b'{"caption": 3}'),
        *wds.sample_members("good1"),
        *wds.sample_members("good0", caption="same key again"),  # non-consecutive duplicate
        *wds.sample_members("good2"),
        *wds.sample_members("good2", caption="consecutive duplicate"),
        *wds.sample_members("good3"),
    ]
    path = wds.write_tar(tmp_path / "bad-000000.tar", members)
    items = list(iter_shard(shard_at(path)))
    samples = [i for i in items if isinstance(i, Sample)]
    errors = [i for i in items if isinstance(i, ErrorRecord)]
    assert [(s.key, s.shard_index) for s in samples] == [("good0", 0), ("good1", 12), ("good2", 14), ("good3", 16)]
    assert samples[0].caption == "a photo of a cat."  # the first occurrence is kept
    assert triples(errors) == [
        ("noimage", "image", "MissingImage"),
        ("badimage", "image", "UnidentifiedImageError"),
        ("truncimage", "image", "OSError"),
        ("nocaption", "caption", "MissingCaption"),
        ("emptycaption", "caption", "EmptyCaption"),
        ("latin1", "caption", "NonUTF8Caption"),
        ("badjson", "caption", "InvalidJSON"),
        ("jsonlist", "caption", "InvalidJSON"),
        ("jsonnocap", "caption", "MissingCaption"),
        ("jsonempty", "caption", "EmptyCaption"),
        ("jsonnumber", "caption", "InvalidCaption"),
        ("good0", "duplicate", "DuplicateKey"),
        ("good2", "duplicate", "DuplicateKey"),
    ]
    assert all(e.shard == "bad-000000.tar" for e in errors)
    for error in errors:
        assert "bad-000000.tar" in error.message and repr(error.key) in error.message
    assert "#13" in errors[-2].message and "#0" in errors[-2].message
    assert list(iter_shard(shard_at(path))) != [] and triples(read_shard(shard_at(path))[1]) == triples(errors)

    with ThreadPoolExecutor(4) as pool:  # decoding on threads (pipeline workers): the same items, in the same order
        threaded = list(iter_shard(shard_at(path), pool=pool))
    def identity(i: Sample | ErrorRecord) -> tuple:
        return (i.key, i.shard_index, i.caption) if isinstance(i, Sample) else (i.key, i.stage, i.error)

    assert [identity(i) for i in threaded] == [identity(i) for i in items]
    assert [i.image.tobytes() for i in threaded if isinstance(i, Sample)] == [s.image.tobytes() for s in samples]


def test_missing_shard_is_unavailable_not_an_error_row(tmp_path):
    """Failed storage is not bad input: no record (which would commit the shard), an exception to retry."""
    shard = Shard(url=str(tmp_path / "gone-000007.tar"), name="gone-000007.tar")
    with pytest.raises(ShardUnavailable, match=r"gone-000007.tar: cannot open .*FileNotFoundError"):
        list(iter_shard(shard))


class _FlakyFile(io.BytesIO):
    """A stream whose connection drops after ``limit`` bytes."""

    def __init__(self, data: bytes, limit: int):
        super().__init__(data)
        self.limit = limit

    def read(self, size: int | None = -1) -> bytes:
        if self.tell() >= self.limit:
            raise ConnectionResetError(104, "Connection reset by peer")
        return super().read(size)


def test_a_read_that_fails_in_the_storage_raises_and_a_corrupt_tar_does_not(tmp_path, monkeypatch, wds):
    path = tmp_path / "flaky-000000.tar"
    wds.write_shard(path, 6)
    data = path.read_bytes()
    shard = Shard(url=str(path), name=path.name)
    monkeypatch.setattr("ecif_ray.data.samples.open_shard", lambda s, o=None: _FlakyFile(data, len(data) // 2))
    with pytest.raises(ShardUnavailable, match=r"flaky-000000.tar: reading failed.*ConnectionResetError"):
        list(iter_shard(shard))
    monkeypatch.undo()
    path.write_bytes(data[: len(data) // 2])  # the same bytes missing because the file is cut: bad input
    samples, [error] = read_shard(shard)
    assert error.stage == "read" and 0 < len(samples) < 6


@pytest.mark.parametrize(("exc", "storage"), [
    (ConnectionResetError(104, "reset"), True),
    (TimeoutError("timed out"), True),
    (OSError(5, "Input/output error"), True),
    (tarfile.ReadError("bad checksum"), False),
    (EOFError("compressed file ended"), False),
    (OSError("Invalid data stream"), False),  # bz2: no errno, the bytes are bad
])
def test_storage_failures_are_told_from_bad_bytes(exc, storage):
    assert is_storage_failure(exc) is storage
    wrapped = tarfile.ReadError("not a gzip file")  # what tarfile makes of a failing gzip stream
    wrapped.__cause__ = exc
    assert is_storage_failure(wrapped) is storage


def test_not_a_tar_is_a_read_error(tmp_path):
    path = tmp_path / "junk.tar"
    path.write_bytes(b"this is not a tar archive at all" * 40)
    (error,) = list(iter_shard(shard_at(path)))
    assert (error.shard, error.key, error.stage) == ("junk.tar", "", "read")


def _offsets(path) -> dict[str, int]:
    with tarfile.open(path) as tar:
        return {m.name: m.offset for m in tar.getmembers()}


@pytest.mark.parametrize(
    ("damage", "expected_keys", "error_key"),
    [
        ("truncate-data", ["k000000"], "k000001"),  # cut inside k000001.png's data
        ("truncate-header", ["k000000", "k000001"], "k000002"),  # cut inside k000002.txt's header
        ("garbage-header", ["k000000"], "k000001"),  # k000001.txt header overwritten
        ("garbage-after-last", ["k000000", "k000001", "k000002"], "k000003"),  # junk where the end marker is
    ],
)
def test_corrupt_or_truncated_tar_keeps_samples_before_the_damage(tmp_path, wds, damage, expected_keys, error_key):
    """Each sample is a header and a data block for its .png and for its .txt: 2048 bytes."""
    path = wds.write_shard(tmp_path / "c-000000.tar", 4, prefix="k")
    data = bytearray(path.read_bytes())
    offsets = _offsets(path)
    end_of_members = offsets["k000003.txt"] + 1024
    if damage == "truncate-data":
        data = data[: offsets["k000001.png"] + 512 + 10]
    elif damage == "truncate-header":
        data = data[: offsets["k000002.txt"] + 100]
    elif damage == "garbage-header":
        data[offsets["k000001.txt"] : offsets["k000001.txt"] + 512] = b"\x07" * 512
    else:
        data[end_of_members : end_of_members + 512] = b"junk" * 128
    path.write_bytes(bytes(data))

    samples, errors = read_shard(shard_at(path))
    assert [s.key for s in samples] == expected_keys
    (error,) = errors
    assert (error.shard, error.key, error.stage) == ("c-000000.tar", error_key, "read")
    assert "c-000000.tar" in error.message


def test_iteration_is_deterministic(tmp_path, wds):
    path = wds.write_tar(
        tmp_path / "d.tar", [*wds.sample_members("b"), *wds.sample_members("a", caption=""), *wds.sample_members("c")]
    )
    first, second = list(iter_shard(shard_at(path))), list(iter_shard(shard_at(path)))
    assert [(type(i).__name__, i.key) for i in first] == [("Sample", "b"), ("ErrorRecord", "a"), ("Sample", "c")]
    assert [(type(i).__name__, i.key) for i in second] == [(type(i).__name__, i.key) for i in first]


def _encode(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()
