"""`ecif-ray sql` on a scored run: every cookbook query in docs/pipeline.md runs as written, and the
answers agree with the tables and the corpus truth."""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from scipy.stats import rankdata

from ecif_ray.cli import main
from ecif_ray.data.exclusions import read_exclusions

DOCS = Path(__file__).resolve().parents[1] / "docs" / "pipeline.md"


def cookbook() -> list[str]:
    return re.findall(r"```sql\n(.*?)```", DOCS.read_text(), flags=re.S)


def sql(run_dir: str, query: str, capsys, fmt: str = "json", flags: tuple[str, ...] = ()) -> list[dict] | str:
    code = main(["sql", run_dir, query, "--format", fmt, *flags])
    out = capsys.readouterr()
    assert code == 0, out.err
    return json.loads(out.out) if fmt == "json" and out.out.strip() else out.out


@pytest.fixture
def resolve(digits_corpus, tmp_path):
    """The cookbook's relative paths, pointed at the test corpus and a temp dir."""
    def apply(query: str) -> str:
        return (query.replace("'corpus/truth.parquet'", f"'{digits_corpus / 'truth.parquet'}'")
                .replace("'exclude.parquet'", f"'{tmp_path / 'exclude.parquet'}'"))
    return apply


@pytest.fixture
def flags(digits_corpus):
    """The flags docs/pipeline.md says a cookbook query needs: --allow-read for the truth file it
    joins with, --allow-writes for COPY (ecif-ray sql is read-only and confined to the run dir)."""
    def of(query: str) -> tuple[str, ...]:
        reads = ("--allow-read", str(digits_corpus / "truth.parquet")) if "corpus/truth.parquet" in query else ()
        return reads + (("--allow-writes",) if query.lstrip().startswith("COPY") else ())
    return of


def test_every_cookbook_query_runs(scored_run, resolve, flags, capsys, tmp_path):
    queries = cookbook()
    assert len(queries) >= 10
    for query in queries:
        rows = sql(scored_run.out, resolve(query), capsys, flags=flags(query))
        if query.lstrip().startswith("COPY"):
            assert pq.read_table(tmp_path / "exclude.parquet").num_rows == 100
        else:
            assert rows or "FROM errors" in query, query  # this run has no errors


def test_cookbook_answers_agree_with_the_tables(scored_run, resolve, flags, capsys, digits_corpus):
    top = sql(scored_run.out, resolve(cookbook()[0]), capsys)
    ranked = [r["misalignment"] for r in top]
    assert len(top) == 20 and ranked == sorted(ranked, reverse=True)
    by_hand = sql(scored_run.out, resolve(next(q for q in cookbook() if "misalignment2" in q)), capsys)
    assert [r["misalignment2"] for r in by_hand] == pytest.approx(ranked)  # the SQL given for other engines
    top = sql(scored_run.out, resolve(next(q for q in cookbook() if "ecif_is, pos_is, neg_is" in q)), capsys)
    assert len(top) == 20 and [r["ecif_is"] for r in top] == sorted((r["ecif_is"] for r in top), reverse=True)
    assert top[0]["ecif_is"] == scored_run.top[0]["ecif_is"] and top[0]["key"] == scored_run.top[0]["key"]

    query = next(q for q in cookbook() if "flagged_rate" in q)
    per_shard = sql(scored_run.out, resolve(query), capsys, flags=flags(query))
    truth = pq.read_table(digits_corpus / "truth.parquet").to_pandas()
    truth = truth[truth["split"] == "train"].groupby("shard")["misaligned"].mean()
    assert {r["shard"]: r["true_rate"] for r in per_shard} == {s: round(v, 3) for s, v in truth.items()}
    assert sum(r["pairs"] for r in per_shard) == 128

    query = next(q for q in cookbook() if "precision_at_20" in q)
    [precision] = sql(scored_run.out, resolve(query), capsys, flags=flags(query))
    assert precision["flagged"] == 20 and precision["precision_at_20"] == precision["truly_misaligned"] / 20

    traced = sql(scored_run.out, resolve(next(q for q in cookbook() if "FROM trace" in q)), capsys)
    assert len(traced) == 12 and {r["rank"] for r in traced} == {1, 2, 3}

    [run] = sql(scored_run.out, "SELECT run_id, status, pairs, errors FROM runs", capsys)
    assert run == {"run_id": scored_run.run_id, "status": "complete", "pairs": 128, "errors": 0}


def test_exported_keys_feed_train_exclude(scored_run, capsys, tmp_path):
    query = "SELECT shard, key FROM pairs ORDER BY ecif_is DESC LIMIT 10"
    text = sql(scored_run.out, query, capsys, fmt="csv")
    rows = list(csv.reader(io.StringIO(text)))
    assert rows[0] == ["shard", "key"] and len(rows) == 11
    (tmp_path / "exclude.csv").write_text(text)
    exclude = read_exclusions(str(tmp_path / "exclude.csv"))
    assert exclude.pairs == {(r["shard"], r["key"]) for r in scored_run.top[:10]}


def test_table_format_and_bad_input(scored_run, capsys, tmp_path):
    out = sql(scored_run.out, "SELECT shard, count(*) AS n FROM pairs GROUP BY shard ORDER BY shard", capsys,
              fmt="table")
    assert "train-000000.tar" in out and "64" in out
    assert main(["sql", scored_run.out, "SELECT * FROM no_such_table"]) == 2
    assert "no_such_table" in capsys.readouterr().err
    assert main(["sql", str(tmp_path), "SELECT 1"]) == 2
    assert "not an ecif-ray run directory" in capsys.readouterr().err


def test_misalignment_ranks_the_run(scored_run, capsys):
    """The issue's query works on a run, and the column is its documented definition: the mean of the
    run-wide percentiles of misalignment_pos_is and of −clip_score (no reference model here)."""
    top = sql(scored_run.out, "SELECT key, misalignment FROM pairs ORDER BY misalignment DESC LIMIT 10", capsys)
    assert len(top) == 10 and all(0 < r["misalignment"] <= 1 for r in top)
    pairs = pq.read_table(Path(scored_run.out) / "pairs").to_pandas()
    assert pairs["misalignment_pos_is"].notna().all() and pairs["reference_clip_score"].isna().all()
    n = len(pairs)
    want = (rankdata(pairs["misalignment_pos_is"], method="max") / n
            + rankdata(-pairs["clip_score"], method="max") / n) / 2
    rows = sql(scored_run.out, "SELECT key, misalignment FROM pairs", capsys)
    got = {r["key"]: r["misalignment"] for r in rows}
    np.testing.assert_allclose([got[k] for k in pairs["key"]], want, rtol=1e-12)
    np.testing.assert_allclose([r["misalignment"] for r in top], np.sort(want)[::-1][:10], rtol=1e-12)
