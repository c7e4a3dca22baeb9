"""A small, notebook-friendly front end to the single-process engine.

    engine = ECIF.from_checkpoint("ft", train="corpus/train")
    directions = engine.solve(ValidationQuery(engine.load("corpus/val")), misalignment="auto")
    scores = engine.score(engine.train_batches, directions)       # pyarrow.Table, one row per pair×query
    duckdb.sql("SELECT key, misalignment, ecif_is FROM scores ORDER BY misalignment DESC LIMIT 10")

The distributed pipeline (ecif_ray.pipeline) runs the same pieces (task, sample planner, trunk
features, curvature, scoring) on Ray actors; with the same inputs and settings both draw the same
curvature sample and sum its products in the same order, so a notebook reproduces a cluster run.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass, field

import pyarrow as pa
import torch

from ecif_ray.data.exclusions import ExclusionSet
from ecif_ray.data.feature_source import open_task_store, stored_segments
from ecif_ray.data.segments import PairBatch, load_segments
from ecif_ray.data.shards import Shard, list_shards
from ecif_ray.influence.contrastive import NegativeTerm
from ecif_ray.influence.curvature import (
    DEFAULT_SOLVER,
    Damping,
    Directions,
    MisalignmentDamping,
    SolverSettings,
    build_preconditioner,
    curvature_stacks,
    ggn_sum,
    mean_eigenvalue,
    resolve_damping,
    solve_directions,
    solve_misalignment,
)
from ecif_ray.influence.edit import Edit, edit
from ecif_ray.influence.queries import MISALIGNMENT_QUERY, ExampleQuery, QueryGradients, stack_queries
from ecif_ray.influence.rows import scores_to_arrow
from ecif_ray.influence.sample import DEFAULT_MEMORY_MB, max_segments, plan_in_memory
from ecif_ray.influence.scoring import score_segment
from ecif_ray.influence.settings import AnalysisDType, resolve_dtype
from ecif_ray.influence.solvers import Matvec, NystromPreconditioner
from ecif_ray.influence.task import InfluenceTask, SegmentStack
from ecif_ray.influence.traceback import CurvatureBasis, TopK, curvature_basis, mispredicted, trace_segment
from ecif_ray.models.checkpoint import load_checkpoint
from ecif_ray.models.zeroshot import ClassSet
from ecif_ray.tables.misalignment import with_misalignment
from ecif_ray.tables.schema import TRACE, conform

DEFAULT_CURVATURE_SHARDS = 8  # shards per planner round (ScoreConfig.curvature_shards)


def feature_bytes_per_pair(task: InfluenceTask, batch: PairBatch) -> int:
    """Bytes of trunk features one pair of this model takes (what the curvature cap is counted in)."""
    features = task.features(batch)
    return max(1, features.nbytes // max(1, len(features)))


@dataclass
class ECIF:
    task: InfluenceTask
    curvature: list[list[PairBatch]]  # the sample's groups, in summation order (influence.sample)
    solver: SolverSettings = DEFAULT_SOLVER
    train_batches: list[PairBatch] = field(default_factory=list)
    segment_size: int = 32
    training_delta: float | None = None  # δ of R(θ) (default: the task's δ at construction)
    _stacks: list[SegmentStack] | None = field(default=None, init=False, repr=False)
    _preconditioner: NystromPreconditioner | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.training_delta is None:
            self.training_delta = self.task.delta

    @classmethod
    def from_checkpoint(cls, ckpt: str, train: str | list[str], *, curvature_segments: int | None = None,
                        curvature_shards: int = DEFAULT_CURVATURE_SHARDS, curvature_seed: int = 0,
                        curvature_memory_mb: int = DEFAULT_MEMORY_MB, negative_term: NegativeTerm = "exact",
                        solver: SolverSettings = DEFAULT_SOLVER, damping: Damping = "exact",
                        dtype: AnalysisDType = "auto", device: str = "cpu", trusted_arch: str | None = None,
                        storage_options: dict | None = None, features: str | None = None) -> ECIF:
        """Load θ̂ and the training segments (in memory: for corpora that fit; use the pipeline beyond).

        The curvature sample and its defaults are the pipeline's (``ecif-ray score``): every segment up
        to the memory cap, else ``curvature_segments`` drawn by the same planner. ``damping``: δ of the
        analysis — ``exact`` (the checkpoint's), ``auto`` or a number (docs/concepts.md). ``features``: a
        feature store of this checkpoint's trunk (``ecif-ray features``; ``score --features``): the train
        segments come from it, features attached, instead of from the images."""
        checkpoint = load_checkpoint(ckpt, device, trusted_arch=trusted_arch)
        checkpoint.model.to(getattr(torch, resolve_dtype(dtype, checkpoint.meta.param_subset.kind)))
        shards = list_shards(train, storage_options)
        recorded = int(checkpoint.meta.training.get("n_pairs") or 0)
        task = InfluenceTask.from_checkpoint(checkpoint, max(recorded, 1), negative_term)
        size = checkpoint.meta.segment_size
        if features is None:
            batches, _ = load_segments(shards, segment_size=size, preprocess=checkpoint.bundle.preprocess,
                                       tokenizer=checkpoint.bundle.tokenizer, storage_options=storage_options)
        else:
            store = open_task_store(features, task, checkpoint.meta.arch, storage_options)
            batches = [b for s in shards for b in stored_segments(store, s.name, size, task)]
        task.n_train = recorded or sum(len(b) for b in batches)
        return cls.from_task(task, batches, shards, curvature_segments=curvature_segments,
                             curvature_shards=curvature_shards, curvature_seed=curvature_seed,
                             curvature_memory_mb=curvature_memory_mb, solver=solver, damping=damping)

    @classmethod
    def from_task(cls, task: InfluenceTask, batches: list[PairBatch], shards: list[Shard] | None = None, *,
                  curvature_segments: int | None = None, curvature_shards: int = DEFAULT_CURVATURE_SHARDS,
                  curvature_seed: int = 0, curvature_memory_mb: int = DEFAULT_MEMORY_MB,
                  solver: SolverSettings = DEFAULT_SOLVER, damping: Damping = "exact") -> ECIF:
        """The engine on segments already in memory (``shards``: their listing order, default: as
        they appear in ``batches``); the task's δ is the training δ, ``damping`` picks the analysis δ."""
        if not batches:
            raise ValueError("no training segments")
        shards = shards or [Shard(url=name, name=name) for name in dict.fromkeys(b.shard for b in batches)]
        by_shard: dict[str, list[PairBatch]] = {}
        for b in batches:
            by_shard.setdefault(b.shard, []).append(b)
        size = max(len(b) for b in batches)
        cap = max_segments(feature_bytes_per_pair(task, batches[0]), size, 1, curvature_memory_mb)
        segments = cap if curvature_segments is None else min(curvature_segments, cap)
        groups = plan_in_memory(by_shard, shards, segments, curvature_shards, curvature_seed)
        engine = cls(task, groups, solver, batches, size)
        engine.set_damping(damping)
        return engine

    # -- curvature ------------------------------------------------------------------------------

    @property
    def curvature_pairs(self) -> int:
        return sum(len(b) for group in self.curvature for b in group)

    def stacks(self) -> list[SegmentStack]:
        """The sample's trunk features, computed on first use and kept (they do not depend on θ).
        The batches keep views of them, so scoring the same batches reuses them."""
        if self._stacks is None:
            self._stacks = curvature_stacks(self.task, [b for group in self.curvature for b in group])
        return self._stacks

    def matvec(self) -> Matvec:
        """G·V on the curvature sample at the current θ̂ (all groups in one pass: the pipeline sums
        per-group partials instead, which agrees to rounding)."""
        stacks, pairs = self.stacks(), self.curvature_pairs

        def matvec(V: torch.Tensor) -> torch.Tensor:
            return ggn_sum(self.task, stacks, V, self.solver.chunk) / pairs

        return matvec

    def set_damping(self, damping: Damping) -> float:
        """Set δ of the analysis (``exact`` | ``auto`` | a number); returns it. A sweep reuses the
        preconditioner's sketch (or exact eigenpairs), re-targeted at the new δ."""
        assert self.training_delta is not None
        delta = resolve_damping(damping, self.training_delta, self.mean_eigenvalue)
        self.task.delta = delta
        if self._preconditioner is not None:
            self._preconditioner = dataclasses.replace(self._preconditioner, damping=delta)
        return delta

    def mean_eigenvalue(self) -> float:
        """tr(G)/D on the curvature sample (exact when the dense preconditioner is built)."""
        return mean_eigenvalue(self.matvec(), self.task.dim, dtype=self.task.dtype, device=self.task.device,
                               seed=self.solver.seed, preconditioner=self._preconditioner)

    def preconditioner(self) -> NystromPreconditioner | None:
        """Built on first use and shared by every later solve (queries, trace, edits, δ sweeps);
        apply_edit drops it (θ̂ moves)."""
        if self._preconditioner is None:
            self._preconditioner = build_preconditioner(self.task, self.matvec(), self.solver)
        return self._preconditioner

    # -- the analyses ---------------------------------------------------------------------------

    def load(self, spec: str | list[str], segment_size: int | None = None) -> list[PairBatch]:
        """Segments of another pair set (validation, test) with this model's preprocessing."""
        bundle = self.task.bundle
        batches, _ = load_segments(spec, segment_size=segment_size or self.segment_size,
                                   preprocess=bundle.preprocess, tokenizer=bundle.tokenizer)
        return batches

    def solve(self, *queries, misalignment: MisalignmentDamping | None = None) -> Directions:
        """One iHVP per query direction, solved together; with ``misalignment`` (``"auto"`` or a δ) the
        first query is also solved at the misalignment damping (the pipeline's ``misalignment_damping``),
        appended as the direction ``MISALIGNMENT_QUERY``."""
        grads: QueryGradients = stack_queries([q.gradients(self.task) for q in queries])
        pre = self.preconditioner()
        directions = solve_directions(self.task, grads, self.matvec(), self.solver, preconditioner=pre)
        if misalignment is None:
            return directions
        return directions.inserted(len(directions.names), solve_misalignment(
            self.task, grads, self.matvec(), misalignment, self.solver, pre))

    def score(self, batches: list[PairBatch], directions: Directions) -> pa.Table:
        """The ``pairs`` columns, one row per (pair, query); when ``directions`` hold the misalignment
        direction, also ``misalignment`` (ranked within each query, as the run's views rank a run)."""
        table = scores_to_arrow([score_segment(self.task, b, directions.vectors) for b in batches], directions.names)
        return with_misalignment(table, "query") if MISALIGNMENT_QUERY in directions.names else table

    def trace(self, test_batches: list[PairBatch], classes: ClassSet, *, top_k: int = 10,
              max_examples: int | None = 20, rank: int = 128,
              train_batches: Iterable[PairBatch] | None = None) -> pa.Table:
        """Top-k training pairs by relative-IS for each mispredicted test example; the training
        segments may be streamed (default: the ones held in memory)."""
        wrong = mispredicted(self.task, test_batches, classes, max_examples)
        if not wrong:
            return TRACE.empty_table()
        directions = self.solve(ExampleQuery(wrong, classes))
        basis = self.basis(rank)
        top = TopK(directions.names, top_k)
        for batch in self.train_batches if train_batches is None else train_batches:
            top.add(batch, trace_segment(self.task, batch, directions.vectors, basis))
        return conform("trace", pa.Table.from_pylist(top.rows()))

    def basis(self, rank: int) -> CurvatureBasis:
        """G's top eigenpairs for relative-IS norms: all of them (exact norms) when the dense
        preconditioner is built, else a rank-``rank`` Nyström sketch."""
        pre = self._preconditioner
        if pre is not None and pre.U.shape[1] == self.task.dim:
            return CurvatureBasis(U=pre.U, eigenvalues=pre.eigenvalues, delta=self.task.delta)
        return curvature_basis(self.task, self.matvec(), rank, self.solver.seed)

    def edit(self, removed: ExclusionSet) -> Edit:
        return edit(self.task, self.train_batches, removed, self.matvec(), self.solver, self.preconditioner())

    def apply_edit(self, change: Edit) -> None:
        """Write θ̃ = θ̂ + Δθ into the model (save it with models.checkpoint.save_checkpoint)."""
        with torch.no_grad():
            for name, p in self.task.subset.trainable(self.task.bundle.model).items():
                p.add_(change.delta_theta[name].to(p))  # task.params share storage: θ̂ becomes θ̃
        self._preconditioner = None  # G is evaluated at θ̂, which just moved (trunk features did not)
