"""What a run produces: the cluster part's :class:`PassResult`, the run's :class:`ScoreResult`, and
the exit status that tells callers whether every input was scored."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ecif_ray.tables.directions import DirectionsMeta
from ecif_ray.tables.manifest import Manifest
from ecif_ray.tables.store import ShardRecord

EXIT_OK = 0
EXIT_BAD_CONFIG = 2  # refused up front (also what the CLI uses for bad arguments)
EXIT_INPUT_ERRORS = 3  # complete, but some inputs became `errors` rows
EXIT_INCOMPLETE = 4  # some shards could not be scored (see errors stage 'score'); rerun to retry


@dataclass
class PassResult:
    """What the cluster part of a run produced (empty when nothing was pending)."""

    records: dict[str, ShardRecord] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    directions: DirectionsMeta | None = None
    reused: bool = False
    retries: int = 0
    worker_failures: int = 0
    workers: dict[str, Any] = field(default_factory=dict)
    worker_memory: list[dict[str, Any]] = field(default_factory=list)  # pid, host, peak_rss_bytes per live actor
    timings: dict[str, float] = field(default_factory=dict)
    pairs_scored: int = 0


@dataclass
class ScoreResult:
    run_id: str
    out: str
    manifest: Manifest
    exit_code: int
    exit_reason: str
    records: dict[str, ShardRecord]
    failed: dict[str, str] = field(default_factory=dict)
    top: list[dict[str, Any]] = field(default_factory=list)
    directions_reused: bool = False
    retries: int = 0
    worker_failures: int = 0


def exit_status(failed: dict[str, str], incomplete: bool, errors: int) -> tuple[int, str]:
    if failed or incomplete:
        return EXIT_INCOMPLETE, f"{len(failed)} shards could not be scored; rerun to retry them"
    if errors:
        return EXIT_INPUT_ERRORS, f"{errors} inputs could not be scored (see the errors table)"
    return EXIT_OK, "every input scored"
