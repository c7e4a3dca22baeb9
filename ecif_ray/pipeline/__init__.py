"""Distributed scoring on Ray: actors over shards, the iHVP solved once on the driver, Parquet tables.

``run_score(ScoreConfig(...))`` runs or resumes one scoring job (``pipeline.run``). The modules,
one concept each: ``prepare`` (validation and the run's identity, before any cluster), ``worker``
(what an actor does), ``pool`` (the Ray session, actors and their replacement), ``solve`` (the
distributed GGN matvec and CG), ``shard`` (scoring and committing one shard), ``scheduler`` (shards
over the pool, retries), ``passes`` (the cluster part of a run), ``results`` (what a run returns,
exit codes), ``events``/``progress`` (what the driver reports), ``features`` (``ecif-ray features``:
the trunk-feature store written by a Ray Data pass, which ``score --features`` reads through
``data.feature_source``). The curvature sample is planned by ``influence.sample``, the same planner
the notebook engine uses.
Ray is imported only by the modules that need it, and only once there is work to do.
"""

from ecif_ray.pipeline.results import EXIT_BAD_CONFIG, EXIT_INCOMPLETE, EXIT_INPUT_ERRORS, EXIT_OK, ScoreResult
from ecif_ray.pipeline.run import RunLocked, RunMismatch, run_score

__all__ = ["EXIT_BAD_CONFIG", "EXIT_INCOMPLETE", "EXIT_INPUT_ERRORS", "EXIT_OK", "RunLocked", "RunMismatch",
           "ScoreResult", "run_score"]
