"""`ecif-ray demo`: the whole product on the embedded default, end to end, in minutes.

1. build a real corpus with *systematic* misalignment (Fashion-MNIST when its Debian package is
   installed, else scikit-learn digits, which ships with pip): a fraction of each of three classes
   captioned as the class it is confused with (shirt → "t-shirt/top", ...), the errors a model learns;
2. pretrain the small open_clip config on the clean pretrain split, fine-tune its heads on the
   noisy corpus (the θ̂ that ECIF analyses); the pretrained model is the clean reference;
3. run the distributed scoring job on a local Ray cluster (Parquet tables in the run dir), with the
   reference model's CLIP score and trace-back of test mispredictions;
4. query the tables with DuckDB: detection quality of ``misalignment`` against the ground truth, next
   to CLIP-score filtering by the audited model and by the reference, and one traced-back mistake.

Every step is skipped when its output already exists, so a rerun picks up where it stopped.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from ecif_ray.data.corpus import CONFUSABLE_SUBSTITUTIONS, CorpusSpec, build_corpus
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


def run_demo(workdir: str | Path, workers: int = 2, noise: float = 0.4, seed: int = 0) -> dict:
    from ecif_ray.config import ScoreConfig, TraceConfig
    from ecif_ray.pipeline.run import run_score
    from ecif_ray.tables.misalignment import misalignment_select
    from ecif_ray.tables.views import connect
    from ecif_ray.training import TrainConfig, train

    started = time.perf_counter()
    work = Path(workdir).resolve()
    plan = choose_plan()
    corpus = work / "corpus"
    timings: dict[str, float] = {}

    t = time.perf_counter()
    substitutions = CONFUSABLE_SUBSTITUTIONS[plan.dataset]
    named = ", ".join(f"{src} → {dst!r}" for src, dst in substitutions)
    if _step(f"build {plan.dataset} corpus, {noise:.0%} of {named} captioned wrong", (corpus / "corpus.json").exists()):
        build_corpus(CorpusSpec(dataset=plan.dataset, out=corpus, noise=noise, noise_kind="substitute",
                                substitutions=substitutions, shard_size=plan.shard_size, seed=seed, overwrite=True,
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
    # The defaults (curvature over every training pair, float64 for the heads), plus the clean
    # pretrained model as reference and trace-back of test mispredictions.
    result = run_score(ScoreConfig(ckpt=str(work / "finetuned"), train=str(corpus / "train"),
                                   val=str(corpus / "val"), test=str(corpus / "test"), out=str(work / "run"),
                                   reference=str(work / "pretrained"), trace=TraceConfig(examples=10),
                                   workers=workers))
    timings["score_s"] = time.perf_counter() - t

    con = connect(str(work / "run"))
    con.execute(f"CREATE VIEW truth AS SELECT * FROM read_parquet('{corpus / 'truth.parquet'}')")
    no_reference = misalignment_select("(SELECT * EXCLUDE (misalignment) REPLACE (CAST(NULL AS DOUBLE) AS "
                                       "reference_clip_score) FROM pairs)")
    rows = con.execute(f"""
        SELECT p.misalignment, a.misalignment AS own, p.misalignment_pos_is, p.ecif_is, p.clip_score,
               p.reference_clip_score, p.loss, t.misaligned
        FROM pairs p JOIN ({no_reference}) a USING (shard, key) JOIN truth t USING (shard, key)""").fetchnumpy()
    truth = rows["misaligned"].astype(bool)
    quality = {
        "misalignment (with the reference)": detection_metrics(rows["misalignment"], truth),
        "misalignment without a reference": detection_metrics(rows["own"], truth),
        "reference CLIP score (low = suspicious)": detection_metrics(-rows["reference_clip_score"], truth),
        "own CLIP score (low = suspicious)": detection_metrics(-rows["clip_score"], truth),
        "per-pair loss (high = suspicious)": detection_metrics(rows["loss"], truth),
        "ecif_is (removal effect, not a detector)": detection_metrics(rows["ecif_is"], truth),
    }
    print_report(con, quality, substituted_mistakes(work / "finetuned", corpus / "test", substitutions))
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


def substituted_mistakes(ckpt_dir: Path, test_dir: Path, substitutions: tuple[tuple[str, str], ...]
                         ) -> dict[str, tuple[str, str]]:
    """Test images the model gets wrong in a substituted direction (a shirt predicted "t-shirt/top"):
    trace-back query id → (true class, predicted class)."""
    from ecif_ray.data.segments import load_segments
    from ecif_ray.evaluation import zero_shot_predictions
    from ecif_ray.models.checkpoint import load_checkpoint
    from ecif_ray.models.zeroshot import find_classes

    bundle = load_checkpoint(str(ckpt_dir)).bundle
    batches, _ = load_segments(str(test_dir), segment_size=256, preprocess=bundle.preprocess,
                               tokenizer=bundle.tokenizer)
    classes = find_classes(str(test_dir), batches=batches)
    labels, predicted = zero_shot_predictions(bundle, batches, classes)
    names = classes.names
    ids = [f"{b.shard}/{k}" for b in batches for k in b.keys]
    pairs = [(names[t], names[p]) for t, p in zip(labels.tolist(), predicted.tolist(), strict=True)]
    return {i: pair for i, pair in zip(ids, pairs, strict=True) if pair in set(substitutions)}


def print_report(con, quality: dict[str, dict], mistakes: dict[str, tuple[str, str]]) -> None:
    print("\n[demo] SQL: the 10 pairs most likely misaligned (ORDER BY misalignment DESC)")
    top = con.execute("""
        SELECT p.shard, p.key, p.caption, t.true_class, round(p.misalignment, 4), t.misaligned
        FROM pairs p JOIN truth t USING (shard, key) ORDER BY p.misalignment DESC LIMIT 10""").fetchall()
    for shard, key, caption, true_class, score, misaligned in top:
        flag = "MISALIGNED" if misaligned else "clean"
        print(f"  {shard:18} {key:14} {score:>7}  {flag:10} caption={caption!r} image={true_class!r}")
    print("\n[demo] detection of the substituted captions")
    print(f"  {'method':42} {'AUROC':>7} {'AP':>7} {'P@k':>7} {'top-10':>7}")
    for method, m in quality.items():
        print(f"  {method:42} {m['auroc']:>7.3f} {m['average_precision']:>7.3f} {m['precision_at_k']:>7.3f} "
              f"{m['hits_top10']:>7d}")
    print("  The model learned these substitutions, so its own CLIP score misses most of them. For random caption\n"
          "  noise (a caption swapped with another pair's) a CLIP-score filter is enough (BENCHMARKS.md §1).")
    print_traced_mistake(con, mistakes)
    print()


def print_traced_mistake(con, mistakes: dict[str, tuple[str, str]]) -> None:
    """One traced test mistake in a substituted direction (the first in shard order), with the training
    pairs ECIF ranks behind it; honest about how many of them are substituted pairs."""
    traced = sorted(q for (q,) in con.execute("SELECT DISTINCT query_id FROM trace").fetchall())
    chosen = [q for q in traced if q in mistakes]
    if not chosen:
        print(f"\n[demo] trace-back: none of the {len(traced)} traced mistakes is in a substituted direction")
        return
    query_id, (true_class, predicted) = chosen[0], mistakes[chosen[0]]
    print(f"\n[demo] trace-back: test image {query_id}, a {true_class!r} the model calls {predicted!r}; the "
          "training pairs behind it (relative-IS):")
    rows = con.execute("""
        SELECT r.rank, r.shard, r.key, p.caption, t.true_class, t.misaligned
        FROM trace r JOIN pairs p USING (shard, key) JOIN truth t USING (shard, key)
        WHERE r.query_id = ? ORDER BY r.rank""", [query_id]).fetchall()
    for rank, shard, key, caption, image, misaligned in rows:
        flag = "SUBSTITUTED" if misaligned else "clean"
        print(f"  {rank:>2} {shard:18} {key:14} {flag:11} caption={caption!r} image={image!r}")
    hits = sum(1 for row in rows if row[-1])
    print(f"  {hits} of {len(rows)} are substituted pairs")
