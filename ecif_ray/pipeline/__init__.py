"""Distributed scoring on Ray: actors over shards, the iHVP solved once on the driver, Parquet tables.

``run_score(ScoreConfig(...))`` runs or resumes one scoring job (``pipeline.run``). The modules,
one concept each: ``plan`` (the curvature sample), ``worker`` (what an actor does), ``pool``
(actors and their replacement), ``curvature`` (the distributed GGN matvec and CG), ``shard``
(scoring and committing one shard), ``scheduler`` (shards over the pool, retries), ``passes``
(the cluster part of a run), ``events``/``progress`` (what the driver reports).
Ray is imported only by the modules that need it, and only once there is work to do.
"""

from ecif_ray.pipeline.run import (
    EXIT_BAD_CONFIG,
    EXIT_INCOMPLETE,
    EXIT_INPUT_ERRORS,
    EXIT_OK,
    RunMismatch,
    ScoreResult,
    run_score,
)

__all__ = ["EXIT_BAD_CONFIG", "EXIT_INCOMPLETE", "EXIT_INPUT_ERRORS", "EXIT_OK", "RunMismatch", "ScoreResult",
           "run_score"]
