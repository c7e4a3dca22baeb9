"""A small, notebook-friendly front end to the single-process engine.

    engine = ECIF.from_checkpoint("ft", train="corpus/train")
    directions = engine.solve(ValidationQuery(engine.load("corpus/val")))
    scores = engine.score(engine.train_batches, directions)       # pyarrow.Table, one row per pair×query
    duckdb.sql("SELECT key, ecif_is FROM scores ORDER BY ecif_is DESC LIMIT 10")

The distributed pipeline (ecif_ray.pipeline) runs the same pieces (task, queries, curvature,
scoring) on Ray actors; this class is the in-process reference and the quickest way to explore.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass, field

import pyarrow as pa
import torch

from ecif_ray.data.exclusions import ExclusionSet
from ecif_ray.data.segments import PairBatch, load_segments
from ecif_ray.evaluation import ClassSet
from ecif_ray.influence.contrastive import NegativeTerm
from ecif_ray.influence.curvature import (
    DEFAULT_SOLVER,
    Directions,
    SolverSettings,
    build_preconditioner,
    local_matvec,
    solve_directions,
)
from ecif_ray.influence.edit import Edit, edit
from ecif_ray.influence.queries import ExampleQuery, QueryGradients, stack_queries
from ecif_ray.influence.scoring import SegmentScores, score_segment
from ecif_ray.influence.solvers import Matvec, NystromPreconditioner
from ecif_ray.influence.task import InfluenceTask
from ecif_ray.influence.traceback import TopK, curvature_basis, mispredicted, trace_segment
from ecif_ray.models.checkpoint import load_checkpoint
from ecif_ray.tables.rows import pair_rows
from ecif_ray.tables.schema import TRACE, conform


def sample_segments(batches: list[PairBatch], count: int, seed: int = 0) -> list[PairBatch]:
    """A fixed, seeded curvature sample (its size independent of corpus size)."""
    if count >= len(batches):
        return list(batches)
    chosen = sorted(random.Random(seed).sample(range(len(batches)), count))
    return [batches[i] for i in chosen]


def scores_to_arrow(scores: list[SegmentScores], query_names: list[str]) -> pa.Table:
    """The ``pairs`` schema in long format: one row per (pair, query). Positive ecif_is =
    removing the pair lowers that query's loss = harmful."""
    return pa.concat_tables([conform("pairs", pair_rows(scores, query_names, q)) for q in range(len(query_names))])


@dataclass
class ECIF:
    task: InfluenceTask
    curvature: list[PairBatch]
    solver: SolverSettings = DEFAULT_SOLVER
    train_batches: list[PairBatch] = field(default_factory=list)
    segment_size: int = 32
    _preconditioner: NystromPreconditioner | None = field(default=None, init=False, repr=False)

    @classmethod
    def from_checkpoint(cls, ckpt: str, train: str | list[str], *, curvature_segments: int = 32,
                        negative_term: NegativeTerm = "exact", solver: SolverSettings = DEFAULT_SOLVER,
                        delta: float | None = None, device: str = "cpu",
                        storage_options: dict | None = None) -> ECIF:
        """Load θ̂ and the training segments (in memory: for corpora that fit; use the pipeline beyond).
        ``delta``: δ of the analysis (default: the checkpoint's; docs/concepts.md on when to raise it)."""
        checkpoint = load_checkpoint(ckpt, device)
        batches, _ = load_segments(train, segment_size=checkpoint.meta.segment_size,
                                   preprocess=checkpoint.bundle.preprocess, tokenizer=checkpoint.bundle.tokenizer,
                                   storage_options=storage_options)
        n_train = int(checkpoint.meta.training.get("n_pairs") or sum(len(b) for b in batches))
        task = InfluenceTask.from_checkpoint(checkpoint, n_train, negative_term, delta)
        return cls(task, sample_segments(batches, curvature_segments, solver.seed), solver, batches,
                   checkpoint.meta.segment_size)

    def load(self, spec: str | list[str], segment_size: int | None = None) -> list[PairBatch]:
        """Segments of another pair set (validation, test) with this model's preprocessing."""
        bundle = self.task.bundle
        batches, _ = load_segments(spec, segment_size=segment_size or self.segment_size,
                                   preprocess=bundle.preprocess, tokenizer=bundle.tokenizer)
        return batches

    def solve(self, *queries) -> Directions:
        """One iHVP per query direction, solved together."""
        grads: QueryGradients = stack_queries([q.gradients(self.task) for q in queries])
        return solve_directions(self.task, grads, self.matvec(), self.solver, preconditioner=self.preconditioner())

    def matvec(self) -> Matvec:
        """G·V on the curvature sample at the current θ̂."""
        return local_matvec(self.task, self.curvature, self.solver.chunk)

    def preconditioner(self) -> NystromPreconditioner | None:
        """Built on first use and shared by every later solve (queries, trace, edits): the sketch
        is most of a solve's cost. Rebuilt when δ changes; apply_edit drops it (θ̂ moves)."""
        cached = self._preconditioner
        if cached is None or cached.damping != self.task.delta:
            self._preconditioner = build_preconditioner(self.task, self.matvec(), self.solver)
        return self._preconditioner

    def score(self, batches: list[PairBatch], directions: Directions) -> pa.Table:
        return scores_to_arrow([score_segment(self.task, b, directions.vectors) for b in batches], directions.names)

    def trace(self, test_batches: list[PairBatch], classes: ClassSet, *, top_k: int = 10,
              max_examples: int | None = 20, rank: int = 128,
              train_batches: Iterable[PairBatch] | None = None) -> pa.Table:
        """Top-k training pairs by relative-IS for each mispredicted test example; the training
        segments may be streamed (default: the ones held in memory)."""
        wrong = mispredicted(self.task, test_batches, classes, max_examples)
        if not wrong:
            return TRACE.empty_table()
        directions = self.solve(ExampleQuery(wrong, classes))
        basis = curvature_basis(self.task, self.matvec(), rank, self.solver.seed)
        top = TopK(directions.names, top_k)
        for batch in self.train_batches if train_batches is None else train_batches:
            top.add(batch, trace_segment(self.task, batch, directions.vectors, basis))
        return conform("trace", pa.Table.from_pylist(top.rows()))

    def edit(self, removed: ExclusionSet) -> Edit:
        return edit(self.task, self.train_batches, removed, self.matvec(), self.solver, self.preconditioner())

    def apply_edit(self, change: Edit) -> None:
        """Write θ̃ = θ̂ + Δθ into the model (save it with models.checkpoint.save_checkpoint)."""
        with torch.no_grad():
            for name, p in self.task.subset.trainable(self.task.bundle.model).items():
                p.add_(change.delta_theta[name].to(p))  # task.params share storage: θ̂ becomes θ̃
        self._preconditioner = None  # G is evaluated at θ̂, which just moved

