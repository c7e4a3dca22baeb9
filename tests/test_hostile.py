"""Hostile and broken input (issue 11): symlinked shards, tars cut at a member boundary, text that
is not UTF-8, oversized members and images, tampered checkpoints, SQL that tries to read or write
outside the run, and shard ids that Hive-style readers would hide."""

from __future__ import annotations

import gzip
import io
import json
import re
import struct
import tarfile
import zlib
from pathlib import Path

import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file, save_file

from ecif_ray.cli import main
from ecif_ray.data.samples import ErrorRecord, ReadLimits, Sample, ShardUnavailable, read_shard
from ecif_ray.data.shards import Shard, list_shards
from ecif_ray.models.checkpoint import CheckpointError, CheckpointMeta, load_checkpoint, save_checkpoint
from ecif_ray.models.factory import create_model
from ecif_ray.models.subsets import ParamSubset
from ecif_ray.tables import Manifest, RunStore, ShardRecord, connect, write_manifest
from ecif_ray.tables.store import shard_file_stem

RUN = "r1"


def shard_at(path: Path) -> Shard:
    return Shard(url=str(path), name=path.name)


def triples(errors: list[ErrorRecord]) -> list[tuple[str, str, str]]:
    return [(e.key, e.stage, e.error) for e in errors]


def raw_tar(path: Path, members: list[tuple[str, bytes]], mode: str = "w") -> Path:
    """A tar whose member names may hold undecodable bytes (as surrogate escapes); ``mode`` "w:gz"
    for a compressed one."""
    with tarfile.open(path, mode, format=tarfile.USTAR_FORMAT, encoding="utf-8", errors="surrogateescape") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 0
            tar.addfile(info, io.BytesIO(data))
    return path


def end_of(path: Path, name: str) -> int:
    """Byte offset just past a member's data blocks."""
    with tarfile.open(path) as tar:
        info = tar.getmember(name)
    return info.offset_data + -(-info.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


# ---------------------------------------------------------------------------------------------
# 2a: symlinked shards


def test_directory_and_glob_list_symlinked_shards(tmp_path, wds):
    elsewhere = tmp_path / "store"
    wds.write_shard(elsewhere / "real-000001.tar", 2)
    (elsewhere / "dir.tar").mkdir()
    root = tmp_path / "shards"
    wds.write_shard(root / "train-000000.tar", 2)
    (root / "train-000001.tar").symlink_to(elsewhere / "real-000001.tar")
    (root / "train-000002.tar").symlink_to(elsewhere / "gone.tar")  # dangling: listed, fails when read
    (root / "train-000003.tar").symlink_to(elsewhere / "dir.tar")  # a directory: not a shard

    expected = ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert [s.name for s in list_shards(str(root))] == expected
    assert [s.name for s in list_shards(str(root / "train-*.tar"))] == expected
    linked = list_shards(str(root))[1]
    assert linked.url == str(root / "train-000001.tar")  # read through the link, named after it
    assert [s.key for s in read_shard(linked)[0]] == ["000000", "000001"]
    with pytest.raises(ShardUnavailable, match=r"train-000002.tar: cannot open"):
        read_shard(list_shards(str(root))[2])


# ---------------------------------------------------------------------------------------------
# 2b: a tar cut exactly at a member boundary


@pytest.mark.parametrize(("cut", "kept", "error_key"), [
    ("after-last-member", ["000000", "000001"], "000002"),  # the last sample may miss members: dropped, named
    ("between-samples", ["000000"], "000001"),
    ("inside-end-marker", ["000000", "000001"], "000002"),  # one of the two zero blocks left
])
def test_tar_cut_at_a_member_boundary_is_a_read_error(tmp_path, wds, cut, kept, error_key):
    path = wds.write_shard(tmp_path / "cut-000000.tar", 3)
    end = {"after-last-member": end_of(path, "000002.txt"), "between-samples": end_of(path, "000001.txt"),
           "inside-end-marker": end_of(path, "000002.txt") + tarfile.BLOCKSIZE}[cut]
    path.write_bytes(path.read_bytes()[:end])
    samples, errors = read_shard(shard_at(path))
    assert [s.key for s in samples] == kept
    assert triples(errors) == [(error_key, "read", "ReadError")]
    assert "cut-000000.tar" in errors[0].message and "end-of-archive marker" in errors[0].message


def test_whole_tar_and_tar_gz_still_read_cleanly_and_cut_ones_do_not(tmp_path, wds):
    whole = wds.write_shard(tmp_path / "whole.tar", 3)
    assert len(read_shard(shard_at(whole))[0]) == 3 and read_shard(shard_at(whole))[1] == []
    cut = whole.read_bytes()[: end_of(whole, "000002.txt")]
    gz = tmp_path / "cut.tar.gz"
    gz.write_bytes(gzip.compress(cut))  # a complete gzip stream around a tar cut short
    samples, errors = read_shard(shard_at(gz))
    assert [s.key for s in samples] == ["000000", "000001"] and triples(errors) == [("000002", "read", "ReadError")]


def test_tar_cut_at_a_member_boundary_on_s3_is_a_read_error(tmp_path, wds, s3_bucket):
    path = wds.write_shard(tmp_path / "s3cut-000000.tar", 3)
    path.write_bytes(path.read_bytes()[: end_of(path, "000002.txt")])
    url = s3_bucket.put(path, "shards/s3cut-000000.tar")
    samples, errors = read_shard(Shard(url=url, name=path.name), s3_bucket.storage_options)
    assert [s.key for s in samples] == ["000000", "000001"]
    assert triples(errors) == [("000002", "read", "ReadError")] and "s3cut-000000.tar" in errors[0].message


# ---------------------------------------------------------------------------------------------
# 3: text that no UTF-8 writer can store


def test_lone_surrogate_caption_and_non_utf8_key_are_one_error_row_each(tmp_path, wds):
    png = wds.image_bytes()
    members = [
        *wds.sample_members("good0"),
        ("surrogate.png", png), ("surrogate.json", b'{"caption": "a cat \\ud800 here"}'),
        ("bad\udcff.png", png), ("bad\udcff.txt", b"fine caption"),  # name bytes b"bad\xff"
        *wds.sample_members("good1"),
        ("bad\udcff.png", png), ("bad\udcff.txt", b"again"),  # a repeat of the bad key
    ]
    path = raw_tar(tmp_path / "text-000000.tar", members)
    samples, errors = read_shard(shard_at(path))
    assert [(s.key, s.shard_index) for s in samples] == [("good0", 0), ("good1", 3)]
    assert triples(errors) == [("surrogate", "caption", "NonUTF8Caption"), ("bad\\xff", "key", "NonUTF8Key"),
                               ("bad\\xff", "duplicate", "DuplicateKey")]
    assert all("text-000000.tar" in e.message for e in errors)

    store = RunStore(str(tmp_path / "run"))  # the rows a worker writes: nothing fails, nothing is lost
    error_rows = {f: [getattr(e, f) for e in errors] for f in ("shard", "key", "stage", "error", "message")}
    record = store.write_table("errors", RUN, path.name, error_rows, {})
    store.write_table("pairs", RUN, path.name, pair_rows(path.name, samples), {})
    assert pq.read_table(tmp_path / "run" / record.path).column("key").to_pylist() == [
        "surrogate", "bad\\xff", "bad\\xff"]


def pair_rows(shard: str, samples: list[Sample]) -> dict[str, list]:
    n = len(samples)
    return {"shard": [shard] * n, "key": [s.key for s in samples], "shard_index": [s.shard_index for s in samples],
            "segment": [0] * n, "caption": [s.caption for s in samples], "clip_score": [0.0] * n, "loss": [0.0] * n,
            "query": ["val"] * n, "pos_is": [0.0] * n, "neg_is": [0.0] * n, "ecif_is": [0.0] * n}


# ---------------------------------------------------------------------------------------------
# 5: caps on members, pixels and captions


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` pixels (no real pixel data): what a bomb looks like."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def test_default_limits_are_documented_values():
    assert ReadLimits() == ReadLimits(max_member_bytes=64 * 2**20, max_image_pixels=2**27, max_caption_chars=4096)
    with pytest.raises(ValueError, match="max_member_bytes"):
        ReadLimits(max_member_bytes=0)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_oversized_members_and_images_are_limit_errors_and_captions_are_cut(tmp_path, wds):
    members = [
        *wds.sample_members("good0", caption="x" * 3_000),
        *wds.sample_members("long", caption="y" * 50_000),
        *wds.sample_members("bigimage", image=wds.image_bytes(size=64)),
        *wds.sample_members("declared", image=png_header(12_000, 12_000)),  # over 2**27, under Pillow's cap
        *wds.sample_members("bomb", image=png_header(20_000, 20_000)),  # over Pillow's own cap too
        *wds.sample_members("good1"),
    ]
    path = wds.write_tar(tmp_path / "big-000000.tar", members)
    limits = ReadLimits(max_member_bytes=4096, max_image_pixels=1000, max_caption_chars=100)
    samples, errors = read_shard(shard_at(path), limits=limits)
    assert [(s.key, len(s.caption)) for s in samples] == [("good0", 100), ("good1", 17)]
    assert triples(errors) == [("long", "limit", "MemberTooLarge"), ("bigimage", "limit", "ImageTooLarge"),
                               ("declared", "limit", "ImageTooLarge"), ("bomb", "limit", "ImageTooLarge")]
    assert "4096" in errors[0].message and ".txt" in errors[0].message and "'long'" in errors[0].message
    assert "64x64" in errors[1].message and "1000" in errors[1].message

    samples, errors = read_shard(shard_at(path))  # the defaults: only the two bombs are refused
    assert [(s.key, len(s.caption)) for s in samples] == [("good0", 3000), ("long", 4096), ("bigimage", 17),
                                                          ("good1", 17)]
    assert triples(errors) == [("declared", "limit", "ImageTooLarge"), ("bomb", "limit", "ImageTooLarge")]
    assert str(2**27) in errors[0].message


def test_tar_gz_member_inflating_past_the_cap_is_an_error_row(tmp_path, wds):
    members = [*wds.sample_members("a"), ("huge.png", b"\0" * (8 * 2**20)), ("huge.txt", b"zeros"),
               *wds.sample_members("b")]
    path = raw_tar(tmp_path / "bomb-000000.tar.gz", members, mode="w:gz")
    assert path.stat().st_size < 64 * 1024  # 8 MiB of zeros inflate from a few KiB
    samples, errors = read_shard(shard_at(path), limits=ReadLimits(max_member_bytes=2**20))
    assert [s.key for s in samples] == ["a", "b"]
    assert triples(errors) == [("huge", "limit", "MemberTooLarge")] and str(8 * 2**20) in errors[0].message


# ---------------------------------------------------------------------------------------------
# 7: checkpoints cannot reach outside themselves


@pytest.fixture
def ckpt(tmp_path) -> Path:
    bundle = create_model("ecif-micro")
    subset = ParamSubset(kind="heads")
    subset.apply(bundle.model)
    meta = CheckpointMeta(arch="ecif-micro", param_subset=subset, logit_scale=10.0, delta=1e-3, segment_size=8)
    return save_checkpoint(tmp_path / "ckpt", bundle, meta, subset.initial_anchor(bundle.model))


def edit_meta(path: Path, **fields) -> None:
    meta = json.loads((path / "ecif.json").read_text())
    (path / "ecif.json").write_text(json.dumps({**meta, **fields}))


def test_tampered_arch_cannot_point_outside_the_checkpoint(ckpt, tmp_path):
    outside = tmp_path / "outside"  # a config open_clip would happily build from
    outside.mkdir()
    config = json.loads((Path(__file__).parents[1] / "ecif_ray/models/model_configs/ecif-micro.json").read_text())
    (outside / "open_clip_config.json").write_text(json.dumps({"model_cfg": config, "preprocess_cfg": {}}))
    for arch in (f"local-dir:{outside}", "hf-hub:someone/model"):
        edit_meta(ckpt, arch=arch)
        with pytest.raises(CheckpointError, match=r"ecif\.json: field 'arch'.*trusted_arch"):
            load_checkpoint(ckpt)
    edit_meta(ckpt, arch=f"local-dir:{outside}")
    assert load_checkpoint(ckpt, trusted_arch=f"local-dir:{outside}").meta.arch == f"local-dir:{outside}"


def test_score_loads_a_named_model_source_only_when_the_user_trusts_it(ckpt, digits_corpus, tmp_path, capsys):
    from ecif_ray.config import ScoreConfig
    from ecif_ray.pipeline.prepare import prepare

    outside = tmp_path / "outside"
    outside.mkdir()
    config = json.loads((Path(__file__).parents[1] / "ecif_ray/models/model_configs/ecif-micro.json").read_text())
    (outside / "open_clip_config.json").write_text(json.dumps({"model_cfg": config, "preprocess_cfg": {}}))
    edit_meta(ckpt, arch=f"local-dir:{outside}", training={"n_pairs": 128})
    argv = ["score", "--ckpt", str(ckpt), "--train", str(digits_corpus / "train"), "--out", str(tmp_path / "run"),
            "--queries", "task", "--test", str(digits_corpus / "test")]
    assert main(argv) == 2 and "trusted_arch" in capsys.readouterr().err
    fields = {"ckpt": str(ckpt), "train": str(digits_corpus / "train"), "out": str(tmp_path / "run"),
              "queries": ["task"], "test": str(digits_corpus / "test")}
    assert prepare(ScoreConfig(**fields, trusted_arch=f"local-dir:{outside}")).checkpoint.arch == f"local-dir:{outside}"


def test_pickled_weights_are_refused_naming_the_file(ckpt):
    weights = ckpt / "model.safetensors"
    state = {k: v.clone() for k, v in load_file(weights).items()}  # not views of the file we overwrite
    torch.save(state, weights)  # a torch.save zip archive under the safetensors name
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(weights))}: is a pickle / torch.save file"):
        load_checkpoint(ckpt)
    weights.rename(ckpt / "model.pt")
    with pytest.raises(CheckpointError, match=r"missing model\.safetensors; found model\.pt: pickled weights"):
        load_checkpoint(ckpt)


def test_corrupt_mismatched_and_non_finite_weights_are_refused(ckpt):
    weights = ckpt / "model.safetensors"
    where = re.escape(str(weights))
    state = {k: v.clone() for k, v in load_file(weights).items()}  # not views of the file we overwrite
    good = weights.read_bytes()
    weights.write_bytes(good[:-100])
    with pytest.raises(CheckpointError, match=rf"{where}: not a valid safetensors file"):
        load_checkpoint(ckpt)
    save_file({**state, "text_projection": torch.zeros(3, 3)}, weights)
    with pytest.raises(CheckpointError, match=rf"{where}: weights do not fit arch 'ecif-micro'.*text_projection"):
        load_checkpoint(ckpt)
    save_file({**state, "text_projection": torch.full_like(state["text_projection"], float("nan"))}, weights)
    with pytest.raises(CheckpointError, match=rf"{where}: tensor 'text_projection' holds NaN"):
        load_checkpoint(ckpt)
    weights.write_bytes(good)
    (ckpt / "ecif.json").write_text((ckpt / "ecif.json").read_text().replace('"logit_scale": 10.0',
                                                                            '"logit_scale": Infinity'))
    with pytest.raises(CheckpointError, match="field 'logit_scale'"):
        load_checkpoint(ckpt)


# ---------------------------------------------------------------------------------------------
# 9: `ecif-ray sql` is read-only and confined to the run


def manifest() -> Manifest:
    return Manifest(run_id=RUN, fingerprint="f" * 64, score_inputs={}, config={},
                    checkpoint={"sha256": "c" * 64, "arch": "ecif-micro"}, queries=["val"], primary_query="val",
                    solver={}, counts={"shards": 1, "pairs": 2, "errors": 0})


def small_run(store: RunStore, shards: tuple[str, ...] = ("a.tar",)) -> None:
    write_manifest(store, manifest())
    for shard in shards:
        rows = {"shard": [shard] * 2, "key": ["k0", "k1"], "shard_index": [0, 1], "segment": [0, 0],
                "caption": ["c0", "c1"], "clip_score": [0.0, 1.0], "loss": [1.0, 1.0], "query": ["val"] * 2,
                "pos_is": [0.1, 0.2], "neg_is": [0.0, 0.0], "ecif_is": [0.1, 0.2]}
        store.write_table("pairs", RUN, shard, rows, {})


@pytest.fixture
def run_dir(tmp_path) -> Path:
    small_run(RunStore(str(tmp_path / "run")))
    return tmp_path / "run"


def test_sql_cannot_read_outside_the_run_or_write_anywhere(run_dir, tmp_path, capsys):
    secret = tmp_path / "home" / ".ray" / "auth_token"
    secret.parent.mkdir(parents=True)
    secret.write_text("s3cr3t")
    refused = [
        f"SELECT content FROM read_text('{secret}')",
        f"SELECT content FROM read_text('{run_dir}/../home/.ray/auth_token')",
        f"COPY (SELECT * FROM pairs) TO '{tmp_path / 'out.csv'}'",
        f"COPY (SELECT * FROM pairs) TO '{run_dir / 'pairs' / f'run_id={RUN}' / 'extra.parquet'}' (FORMAT parquet)",
        f"SELECT 1; COPY (SELECT 1) TO '{tmp_path / 'out.csv'}'",
        f"EXPLAIN ANALYZE COPY (SELECT 1) TO '{run_dir / 'out.csv'}'",  # EXPLAIN ANALYZE runs the COPY
        "SET enable_external_access = true",
        f"ATTACH '{tmp_path / 'x.duckdb'}'",
        "INSTALL httpfs",
    ]
    for query in refused:
        assert main(["sql", str(run_dir), query]) == 2, query
        err = capsys.readouterr().err
        assert "s3cr3t" not in err and ("--allow-writes" in err or "--allow-read" in err), (query, err)
    assert not (tmp_path / "out.csv").exists() and not (tmp_path / "x.duckdb").exists()
    assert not (run_dir / "pairs" / f"run_id={RUN}" / "extra.parquet").exists() and not (run_dir / "out.csv").exists()

    assert main(["sql", str(run_dir), "SELECT count(*) AS n FROM pairs", "--format", "csv"]) == 0
    assert capsys.readouterr().out == "n\n2\n"
    for query, shown in (("DESCRIBE pairs", "ecif_is"), ("EXPLAIN ANALYZE SELECT max(ecif_is) FROM pairs", "plan")):
        assert main(["sql", str(run_dir), query, "--format", "csv"]) == 0
        assert shown in capsys.readouterr().out
    query = f"SELECT content FROM read_text('{secret}')"
    assert main(["sql", str(run_dir), query, "--format", "csv", "--allow-read", str(secret)]) == 0
    assert capsys.readouterr().out == "content\ns3cr3t\n"
    out = tmp_path / "out.csv"
    assert main(["sql", str(run_dir), f"COPY (SELECT key FROM pairs ORDER BY key) TO '{out}'", "--allow-writes"]) == 0
    assert out.read_text() == "key\nk0\nk1\n"


def test_sql_on_s3_without_storage_options_says_what_is_missing(s3_bucket, monkeypatch, capsys):
    url = f"{s3_bucket.url}/runs/r1"
    small_run(RunStore(url, s3_bucket.storage_options))
    options = json.dumps(s3_bucket.storage_options)
    assert main(["sql", url, "SELECT count(*) AS n FROM pairs", "--format", "csv", "--storage-options", options]) == 0
    assert capsys.readouterr().out == "n\n2\n"
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)  # as on a laptop without AWS credentials
    assert main(["sql", url, "SELECT count(*) FROM pairs"]) == 2
    err = capsys.readouterr().err
    assert url in err and "no --storage-options given" in err and "endpoint_url" in err


# ---------------------------------------------------------------------------------------------
# 2c: shard ids that Hive-style readers would hide


def test_shard_ids_starting_with_dot_or_underscore_are_seen_by_every_reader(tmp_path, s3_bucket):
    shards = ("_x.tar", ".y.tar", "~z.tar", "z.tar")
    local = RunStore(str(tmp_path / "run"))
    small_run(local, shards)
    names = sorted(p.name for p in (tmp_path / "run" / "pairs" / f"run_id={RUN}").iterdir())
    assert names == ["z.tar.parquet", "~.y.tar.parquet", "~_x.tar.parquet", "~~z.tar.parquet"]
    dataset = ds.dataset(str(tmp_path / "run" / "pairs"), format="parquet", partitioning="hive")  # Spark's rules
    assert sorted(set(dataset.to_table().column("shard").to_pylist())) == sorted(shards)
    query = "SELECT shard, count(*) FROM pairs GROUP BY shard ORDER BY shard"
    assert connect(str(tmp_path / "run")).sql(query).fetchall() == [(s, 2) for s in sorted(shards)]

    for shard in shards:  # commit records map each shard to its file; resume finds them all complete
        record = local.write_table("errors", RUN, shard, {"shard": [shard], "key": ["k9"], "stage": ["caption"],
                                                          "error": ["EmptyCaption"], "message": ["m"]}, {})
        local.commit_shard(ShardRecord(shard=shard, run_id=RUN, fingerprint="f" * 64, files=[record], pairs=0,
                                       errors=1))
    assert set(local.completed_shards(shards, "f" * 64)) == set(shards)

    url = f"{s3_bucket.url}/runs/r1"
    small_run(RunStore(url, s3_bucket.storage_options), shards)
    assert connect(url, s3_bucket.storage_options).sql(query).fetchall() == [(s, 2) for s in sorted(shards)]


def test_file_name_escape_is_one_to_one():
    ids = ["a.tar", "_a.tar", ".a.tar", "~a.tar", "~_a.tar", "~~a.tar"]
    stems = [shard_file_stem(i) for i in ids]
    assert len(set(stems)) == len(ids) and not any(s.startswith((".", "_")) for s in stems)
    assert shard_file_stem("train-000003.tar") == "train-000003.tar"  # ordinary ids keep their names


# ---------------------------------------------------------------------------------------------
# 4: requests the cluster cannot place; 6: an --out that cannot be written; bad query samples


def score_argv(ckpt: Path, corpus: Path, out: Path | str, *flags: str) -> list[str]:
    return ["score", "--ckpt", str(ckpt), "--train", str(corpus / "train"), "--val", str(corpus / "val"),
            "--out", str(out), "--curvature-segments", "4", "--no-progress", *flags]


@pytest.mark.parametrize("flags", [("--workers", "9"), ("--threads-per-worker", "8")])
def test_a_request_the_cluster_cannot_place_is_refused_naming_the_flag(ray_cluster, heads_ckpt, digits_corpus,
                                                                       tmp_path, capsys, flags):
    """The session cluster has 4 CPUs: 9 workers, or one worker of 8 threads, would wait forever."""
    code = main(score_argv(heads_ckpt, digits_corpus, tmp_path / "run", *flags))
    err = capsys.readouterr().err
    assert code == 2 and " ".join(flags) in err and "4 CPUs" in err


def test_actor_capacity_counts_whole_actors_per_node():
    from ecif_ray.pipeline.pool import actor_capacity

    nodes = [{"CPU": 4.0}, {"CPU": 3.0, "GPU": 1.0}]
    assert actor_capacity(nodes, cpus=2, gpus=0) == 2 + 1
    assert actor_capacity(nodes, cpus=1, gpus=0.5) == 2  # only the GPU node, two half-GPU actors
    assert actor_capacity(nodes, cpus=5, gpus=0) == 0


def test_an_out_that_is_a_file_or_cannot_be_written_is_refused_before_the_cluster(heads_ckpt, digits_corpus,
                                                                                   tmp_path, capsys):
    from ecif_ray.config import ScoreConfig
    from ecif_ray.pipeline.prepare import prepare

    taken = tmp_path / "taken.txt"
    taken.write_text("not a run")
    for out, says in ((taken, "is a file"), (taken / "run", "cannot write there")):
        config = ScoreConfig(ckpt=str(heads_ckpt), train=str(digits_corpus / "train"),
                             val=str(digits_corpus / "val"), out=str(out))
        with pytest.raises(ValueError, match=re.escape(f"out: {out}") + ".*" + says):
            prepare(config)  # what run_score does first, before any cluster
        assert main(score_argv(heads_ckpt, digits_corpus, out)) == 2
        err = capsys.readouterr().err
        assert str(out) in err and says in err and len(err.strip().splitlines()) == 1
    assert taken.read_text() == "not a run"


def test_a_bad_sample_of_the_validation_set_is_an_errors_row_and_in_the_summary(ray_cluster, score_config, wds,
                                                                               digits_corpus, tmp_path, capsys):
    from ecif_ray.pipeline import EXIT_INPUT_ERRORS, run_score
    from ecif_ray.pipeline.progress import format_summary

    val = tmp_path / "val"
    val.mkdir()
    for shard in (digits_corpus / "val").iterdir():
        (val / shard.name).write_bytes(shard.read_bytes())
    png = wds.image_bytes()
    wds.write_tar(val / "val-bad.tar", [*wds.sample_members("fine", "a photo of a 3.", png),
                                        ("blank.png", png), ("blank.txt", b"  ")])
    result = run_score(score_config(tmp_path / "run", val=str(val), workers=1))
    assert result.exit_code == EXIT_INPUT_ERRORS
    rows = connect(str(tmp_path / "run")).sql("SELECT shard, key, stage, message FROM errors").fetchall()
    assert [(s, k, st) for s, k, st, _ in rows] == [("val-bad.tar", "blank", "query")]
    assert "caption" in rows[0][3] and "left out of the query" in rows[0][3]
    assert result.manifest.counts["errors_by_stage"] == {"query": 1} and result.manifest.counts["errors"] == 1
    assert "query 1" in format_summary(result)


# ---------------------------------------------------------------------------------------------
# 5: limits reach the workers; a shard is streamed, not held


def test_limits_set_in_the_config_reach_the_workers(ray_cluster, score_config, tmp_path):
    from ecif_ray.pipeline import run_score

    result = run_score(score_config(tmp_path / "run", workers=1, limits={"max_caption_chars": 9}))
    captions = [c for (c,) in connect(str(tmp_path / "run")).sql("SELECT caption FROM pairs").fetchall()]
    assert len(captions) == result.manifest.counts["pairs"] > 0
    assert max(len(c) for c in captions) == 9 and result.manifest.score_inputs["limits"]["max_caption_chars"] == 9
    assert main(["score", "--max-caption-chars", "0", "--ckpt", "x", "--train", "y", "--out", "z"]) == 2


def test_a_decoding_pool_runs_a_bounded_way_ahead_of_the_reader():
    from concurrent.futures import ThreadPoolExecutor

    from ecif_ray.data.samples import _ordered_map

    taken = []

    def items():
        for i in range(100):
            taken.append(i)
            yield i

    with ThreadPoolExecutor(4) as pool:
        stream = _ordered_map(pool, lambda x: x * x, items(), ahead=8)
        assert [next(stream) for _ in range(3)] == [0, 1, 4]
        assert len(taken) <= 8 + 3  # not the whole shard
        assert list(stream) == [i * i for i in range(3, 100)]


def test_score_refuses_a_broken_checkpoint_in_one_line_naming_the_file(ckpt, digits_corpus, tmp_path, capsys):
    weights = ckpt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    assert main(score_argv(ckpt, digits_corpus, tmp_path / "run")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(weights) in err[0] and "not a valid safetensors file" in err[0]
    assert not (tmp_path / "run").exists()  # refused before anything was written
