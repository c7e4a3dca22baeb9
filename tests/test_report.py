"""The audit report (`ecif-ray report`): built from a real scoring run of the digits corpus with
ground truth and trace-back, checked for its files, sections and embedded thumbnails, then rendered
by headless Chromium and checked to be a real page (not blank)."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageStat

from ecif_ray.cli import main
from ecif_ray.report import at_k_curves, build_report, rerank_trace, shard_rates
from ecif_ray.tables import RunStore, connect

CHROMIUM = Path("/usr/bin/chromium")
SECTIONS = ("how-to-read", "distribution", "detection", "flagged", "shards", "errors", "trace", "lineage")
FIGURES = ("ecif_is_distribution.png", "pos_vs_neg.png", "precision_recall_at_k.png", "shard_rates.png")
TOP = 12


@pytest.fixture(scope="module")
def report(scored_run, digits_corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report")
    return build_report(scored_run.out, out, truth=digits_corpus / "truth.parquet", top=TOP)


def _data_uris(page: str, css_class: str) -> list[bytes]:
    """The PNGs of the <img class="css_class"> elements, decoded from their data: URIs."""
    found = re.findall(rf'<img class="{css_class}" src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    return [base64.b64decode(b) for b in found]


def test_report_is_self_contained_with_thumbnails_and_every_section(report, scored_run):
    out = report.parent
    assert report.name == "index.html" and report.is_file()
    for name in FIGURES:
        with Image.open(out / name) as image:
            assert image.format == "PNG" and image.width > 300
    assert len(list((out / "thumbnails").glob("top-*.png"))) == TOP

    page = report.read_text(encoding="utf-8")
    for section in SECTIONS:
        assert f'<section id="{section}">' in page, section
    assert "Positive ecif_is = harmful" in page and scored_run.run_id in page
    assert 'id="near-chance"' not in page and "above chance" in page  # a trained model: no warning banner
    assert scored_run.manifest.checkpoint["sha256"] in page  # lineage
    # Self-contained: every image is inline, nothing points at a file or the network.
    sources = re.findall(r'<img [^>]*src="([^"]{0,40})', page)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources)
    assert "image unavailable" not in page

    figures = re.findall(r'<figure><img src="data:image/png;base64,', page)
    assert len(figures) == len(FIGURES)
    thumbs = _data_uris(page, "thumb")
    trace = rerank_trace(connect(scored_run.out).sql("SELECT * FROM trace").df())
    examples = trace["query_id"].nunique()
    assert examples == 4
    assert len(thumbs) == TOP + examples + len(trace)  # top pairs, mispredicted test images, their training pairs
    with Image.open(io.BytesIO(thumbs[0])) as thumb:  # an 8×8 digit, enlarged without blur
        assert thumb.size == (128, 128) and ImageStat.Stat(thumb.convert("L")).stddev[0] > 10
    assert page.count("MISALIGNED: image is a") + page.count("clean: ") >= TOP  # truth on every card

    summary = json.loads((out / "summary.json").read_text())
    assert summary["pairs"] == 128 and summary["truth_missing"] == 0 and summary["trace_examples"] == 4
    assert summary["model_check"]["near_chance"] is False
    # no --reference in this run: no reference row
    assert [d["method"].split()[0] for d in summary["detection"]] == ["misalignment", "ecif_is", "CLIP", "per-pair"]
    assert [row["rank"] for row in summary["top"]] == list(range(1, TOP + 1))
    ranked = [row["misalignment"] for row in summary["top"]]  # "flagged" ranks by misalignment
    assert ranked == sorted(ranked, reverse=True) and "misalignment <b>" in page


@pytest.mark.skipif(not CHROMIUM.exists(), reason="headless screenshot check needs /usr/bin/chromium "
                                                  "(apt-get install chromium; .ci/run installs it)")
def test_report_renders_in_headless_chromium(report, tmp_path):
    shot = tmp_path / "report.png"
    profile = tmp_path / "chromium-profile"
    command = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={profile}", f"--screenshot={shot}", "--window-size=1280,2000",
               report.resolve().as_uri()]
    done = subprocess.run(command, capture_output=True, text=True, timeout=90)
    assert shot.is_file(), f"no screenshot (exit {done.returncode}): {done.stderr[-2000:]}"
    with Image.open(shot) as image:
        assert image.size == (1280, 2000)
        gray = np.asarray(image.convert("L"), dtype=float)
    # A rendered page: text, figures and thumbnails give contrast everywhere, not one flat colour.
    assert gray.std() > 20, f"screenshot looks blank (pixel std {gray.std():.1f})"
    bands = gray.reshape(10, 200, 1280).std(axis=(1, 2))
    assert (bands > 5).sum() >= 8, f"mostly empty screenshot (per-band std {np.round(bands, 1)})"
    assert (gray < 60).mean() > 0.01  # dark pixels: text, plot axes, the black digit thumbnails


def test_cli_report_other_query_errors_and_bad_arguments(scored_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(scored_run.out, run)
    store = RunStore(str(run))
    store.write_table("errors", scored_run.run_id, "train-000000.tar", {
        "shard": ["train-000000.tar"] * 2, "key": ["bad-1", "bad-2"], "stage": ["caption", "image"],
        "error": ["EmptyCaption", "UnidentifiedImageError"],
        "message": ["shard train-000000.tar, key 'bad-1': .txt is empty", "shard train-000000.tar, key 'bad-2': ..."]},
        lineage={})

    assert main(["report", str(run), "--query", "task", "--top", "4"]) == 0
    page = (run / "report" / "index.html").read_text(encoding="utf-8")
    assert "query <b>task</b>" in page and "zero-shot classification loss" in page
    assert "EmptyCaption" in page and "2 inputs could not be scored" in page
    assert "--truth truth.parquet" in page  # no truth: the detection section says how to get it
    assert len(_data_uris(page, "thumb")) >= 4
    capsys.readouterr()

    for argv, flag in ((["report", str(run), "--query", "nope"], "--query"),
                       (["report", str(tmp_path / "missing")], "RUN_DIR"),
                       (["report", str(run), "--truth", str(tmp_path / "none.parquet")], "--truth"),
                       (["report", str(run), "--truth", str(run / "manifest.json")], "--truth"),
                       (["report", str(run), "--top", "-1"], "--top")):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith(f"ecif-ray report: error: {flag}:"), err


def test_curves_rates_and_trace_ranking_on_small_frames():
    pairs = pd.DataFrame({"shard": ["a", "a", "b", "b"], "key": ["1", "2", "3", "4"],
                          "ecif_is": [0.4, -0.1, 0.3, 0.0], "clip_score": [1.0, 2.0, 3.0, 4.0],
                          "loss": [0.1, 0.2, 0.3, 0.4], "misaligned": [True, False, True, False]})
    curves = at_k_curves(pairs)
    assert not curves["method"].str.startswith(("misalignment", "reference")).any()  # columns the run lacks
    ecif = curves[curves["method"].str.startswith("ecif_is")]
    assert ecif["precision"].tolist() == [1.0, 1.0, 2 / 3, 0.5] and ecif["recall"].tolist() == [0.5, 1, 1, 1]
    clip = curves[curves["method"].str.startswith("CLIP")]  # lowest CLIP score first: a, a(2), b(3), b(4)
    assert clip["precision"].tolist()[0] == 1.0

    errors = pd.DataFrame({"shard": ["b", "c"], "key": ["x", ""], "stage": ["image", "open"],
                           "error": ["E", "E"], "message": ["m", "m"]})
    rates = shard_rates(pairs, errors, fraction=0.5).set_index("shard")  # no misalignment column: by ecif_is
    assert rates.loc["a", "flagged_rate"] == 0.5 and rates.loc["b", "flagged_rate"] == 0.5
    by_misalignment = shard_rates(pairs.assign(misalignment=[0.1, 0.2, 0.9, 0.8]), errors, fraction=0.5)
    assert by_misalignment.set_index("shard").loc["b", "flagged_rate"] == 1.0
    assert rates.loc["a", "misaligned_rate"] == 0.5 and rates.loc["c", "pairs"] == 0
    assert rates["errors"].tolist() == [0, 1, 1]

    trace = pd.DataFrame({"query_id": ["t/1"] * 4, "rank": [1, 2, 1, 2], "shard": ["a", "a", "b", "b"],
                          "key": ["1", "2", "3", "4"], "relative_is": [0.5, 0.1, 0.4, 0.3], "ecif_is": [0.0] * 4})
    ranked = rerank_trace(trace)
    assert ranked["key"].tolist() == ["1", "3"] and ranked["rank"].tolist() == [1, 2]


def test_thumbnails_of_a_shard_that_has_gone_are_a_note_not_a_crash(tmp_path, wds):
    from ecif_ray.report.thumbnails import fetch_images

    wds.write_shard(tmp_path / "a-000000.tar", 2)
    gone = tmp_path / "a-000001.tar"
    wds.write_shard(gone, 2)
    spec = f"{tmp_path}/a-{{000000,000001}}.tar"  # named, not searched: listing does not see it vanish
    gone.unlink()
    images, notes = fetch_images(spec, [("a-000000.tar", "000001"), ("a-000001.tar", "000000")])
    assert list(images) == [("a-000000.tar", "000001")]
    assert any("a-000001.tar: cannot open" in n for n in notes)
