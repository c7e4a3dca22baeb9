"""`ecif-ray demo`: the whole product on the embedded default, end to end, in minutes.

1. build a real corpus with known misalignment (Fashion-MNIST when its Debian package is
   installed, else scikit-learn digits, which ships with pip), 20% swap-class noise;
2. pretrain the small open_clip config on the clean pretrain split, fine-tune its heads on the
   noisy corpus (the θ̂ that ECIF analyses);
3. run the distributed scoring job on a local Ray cluster (Parquet tables in the run dir);
4. query the tables with DuckDB and print detection quality against the ground truth, next to
   CLIP-score filtering and per-pair loss.

Every step is skipped when its output already exists, so a rerun picks up where it stopped.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from ecif_ray.data.corpus import CorpusSpec, build_corpus
from ecif_ray.data.datasets import load_dataset
from ecif_ray.metrics import detection_metrics


@dataclass(frozen=True)
class DemoPlan:
    dataset: str
    arch: str
    sizes: dict[str, int]
    shard_size: int
    segment_size: int
    pretrain_epochs: int
    finetune_epochs: int


FASHION = DemoPlan("fashion-mnist", "ecif-small", {"pretrain": 10000, "train": 4000, "val": 500, "test": 1000},
                   shard_size=500, segment_size=64, pretrain_epochs=5, finetune_epochs=8)
DIGITS = DemoPlan("digits", "ecif-micro", {"pretrain": 600, "train": 600, "val": 200, "test": 397},
                  shard_size=100, segment_size=32, pretrain_epochs=40, finetune_epochs=20)


def choose_plan() -> DemoPlan:
    try:
        load_dataset("fashion-mnist")
    except FileNotFoundError as e:
        print(f"[demo] {e.args[0].splitlines()[0]} -> using scikit-learn digits instead")
        return DIGITS
    return FASHION


def _step(name: str, done: bool) -> bool:
    print(f"[demo] {name}: {'done earlier, reusing' if done else 'running'}", flush=True)
    return not done


def run_demo(workdir: str | Path, workers: int = 2, noise: float = 0.2, seed: int = 0) -> dict:
    from ecif_ray.config import ScoreConfig
    from ecif_ray.pipeline.run import run_score
    from ecif_ray.tables.views import connect
    from ecif_ray.training import TrainConfig, train

    started = time.perf_counter()
    work = Path(workdir).resolve()
    plan = choose_plan()
    corpus = work / "corpus"
    timings: dict[str, float] = {}

    t = time.perf_counter()
    if _step(f"build {plan.dataset} corpus with {noise:.0%} misaligned captions", (corpus / "corpus.json").exists()):
        build_corpus(CorpusSpec(dataset=plan.dataset, out=corpus, noise=noise, noise_kind="swap-class",
                                shard_size=plan.shard_size, seed=seed, overwrite=True,
                                **{f"{k}_size": v for k, v in plan.sizes.items()}))
    timings["corpus_s"] = time.perf_counter() - t

    t = time.perf_counter()
    if _step(f"pretrain {plan.arch} on the clean pretrain split", (work / "pretrained" / "ecif.json").exists()):
        train(TrainConfig(train=str(corpus / "pretrain"), arch=plan.arch, params={"kind": "all"},
                          segment_size=plan.segment_size, epochs=plan.pretrain_epochs, lr=2e-3, delta=1e-4,
                          segments_per_step=1, seed=seed, out=str(work / "pretrained")))
    timings["pretrain_s"] = time.perf_counter() - t

    t = time.perf_counter()
    if _step("fine-tune the projection heads on the noisy corpus", (work / "finetuned" / "ecif.json").exists()):
        train(TrainConfig(train=str(corpus / "train"), init=str(work / "pretrained"), params={"kind": "heads"},
                          segment_size=plan.segment_size, epochs=plan.finetune_epochs, lr=5e-3, delta=1e-3,
                          segments_per_step=1, seed=seed, out=str(work / "finetuned")))
    timings["finetune_s"] = time.perf_counter() - t

    t = time.perf_counter()
    print(f"[demo] score every training pair on a local Ray cluster ({workers} workers)", flush=True)
    # The defaults: curvature over every training pair (cached trunk features), float64 for the heads.
    result = run_score(ScoreConfig(ckpt=str(work / "finetuned"), train=str(corpus / "train"),
                                   val=str(corpus / "val"), out=str(work / "run"), workers=workers))
    timings["score_s"] = time.perf_counter() - t

    con = connect(str(work / "run"))
    con.execute(f"CREATE VIEW truth AS SELECT * FROM read_parquet('{corpus / 'truth.parquet'}')")
    rows = con.execute("""
        SELECT p.ecif_is, p.clip_score, p.loss, t.misaligned
        FROM pairs p JOIN truth t USING (shard, key)""").fetchnumpy()
    truth = rows["misaligned"].astype(bool)
    quality = {
        "ECIF (ecif_is, high = harmful)": detection_metrics(rows["ecif_is"], truth),
        "CLIP score (low = suspicious)": detection_metrics(-rows["clip_score"], truth),
        "per-pair loss (high = suspicious)": detection_metrics(rows["loss"], truth),
    }
    print_report(con, quality)
    from ecif_ray.report import build_report

    report = build_report(str(work / "run"), str(work / "report"), truth=str(corpus / "truth.parquet"))
    print(f"[demo] report: {report}")
    summary = {"dataset": plan.dataset, "arch": plan.arch, "pairs": len(truth),
               "misaligned": int(truth.sum()), "exit_code": result.exit_code, "detection": quality,
               "timings": {k: round(v, 1) for k, v in timings.items()},
               "wall_time_s": round(time.perf_counter() - started, 1), "run_dir": str(work / "run"),
               "report": str(report)}
    (work / "demo_summary.json").write_text(json.dumps(summary, indent=2))
    print(f"[demo] finished in {summary['wall_time_s']} s; summary in {work / 'demo_summary.json'}")
    return summary


def print_report(con, quality: dict[str, dict]) -> None:
    print("\n[demo] SQL: the 10 pairs ECIF finds most harmful (ecif_is > 0: removing them lowers val loss)")
    top = con.execute("""
        SELECT p.shard, p.key, p.caption, t.true_class, round(p.ecif_is, 6) AS ecif_is, t.misaligned
        FROM pairs p JOIN truth t USING (shard, key) ORDER BY p.ecif_is DESC LIMIT 10""").fetchall()
    for shard, key, caption, true_class, score, misaligned in top:
        flag = "MISALIGNED" if misaligned else "clean"
        print(f"  {shard:18} {key:14} {score:>10}  {flag:10} caption={caption!r} image={true_class!r}")
    print("\n[demo] SQL: flagged rate per shard (top 20% by ecif_is) vs true misalignment rate")
    per_shard = con.execute("""
        WITH ranked AS (SELECT shard, key, ecif_is, percent_rank() OVER (ORDER BY ecif_is DESC) AS pr FROM pairs)
        SELECT r.shard, round(avg(CASE WHEN r.pr < 0.2 THEN 1 ELSE 0 END), 3) AS flagged,
               round(avg(t.misaligned::INT), 3) AS misaligned
        FROM ranked r JOIN truth t USING (shard, key) GROUP BY r.shard ORDER BY r.shard""").fetchall()
    for shard, flagged, misaligned in per_shard:
        print(f"  {shard:18} flagged {flagged:<6} truly misaligned {misaligned}")
    print("\n[demo] detection of the injected misaligned pairs")
    print(f"  {'method':36} {'AUROC':>7} {'AP':>7} {'P@k':>7} {'top-10':>7}")
    for method, m in quality.items():
        print(f"  {method:36} {m['auroc']:>7.3f} {m['average_precision']:>7.3f} {m['precision_at_k']:>7.3f} "
              f"{m['hits_top10']:>7d}")
    print()

