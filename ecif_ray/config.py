"""The scoring job's configuration: typed, validated up front, loadable from YAML.

A scoring run is defined by one :class:`ScoreConfig`. It comes from a YAML file
(``ecif-ray score --config job.yaml``, ``jobs/score.py --config ...``), from command-line flags, or
both: flags override YAML keys. Validation happens before any cluster or data is touched, and
an error names the offending field, so a typo never costs a cluster start.

Fields fall in two groups, which matters for resume (see :meth:`ScoreConfig.score_inputs`):

* what the scores *mean*: checkpoint, shards, queries, segment size, negative term, curvature
  sample, solver, n_train, δ, exclusions, dtype. Changing any of these on an existing run
  directory is refused;
* how the run is *executed*: workers, address, GPUs/threads per worker, storage options,
  progress display, retry limits. These may change between a run and its resumption.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

import fsspec
import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from ecif_ray.data.limits import DEFAULT_LIMITS, ReadLimits
from ecif_ray.influence.sample import DEFAULT_MEMORY_MB
from ecif_ray.influence.settings import DEFAULT_SOLVER, AnalysisDType, SolverSettings

QueryName = Literal["val", "task"]
DType = AnalysisDType


class SolverConfig(BaseModel):
    """CG settings of the iHVP solve; defaults are the engine's (``influence.settings.DEFAULT_SOLVER``)."""

    model_config = ConfigDict(extra="forbid")

    tol: float | None = Field(DEFAULT_SOLVER.tol, gt=0, lt=1, description="relative residual ‖b − (G+δI)x‖/‖b‖ to "
                              "reach (default: 1e-8 in float64, 1e-5 in float32)")
    max_iter: int = Field(DEFAULT_SOLVER.max_iter, ge=1, description="CG iterations at most")
    preconditioner: Literal["none", "nystrom", "dense"] = Field(
        DEFAULT_SOLVER.preconditioner, description="nystrom (randomized sketch), dense (G formed exactly: small θ, "
        "CG converges in one step, exact trace-back norms) or none")
    nystrom_rank: int = Field(DEFAULT_SOLVER.nystrom_rank, ge=1, description="rank of the Nyström preconditioner")
    seed: int = Field(DEFAULT_SOLVER.seed, ge=0, description="seed of the Nyström sketch")
    chunk: int = Field(DEFAULT_SOLVER.chunk, ge=1, description="vectors per vmapped JVP/VJP (bounds worker memory)")


class LimitsConfig(BaseModel):
    """Caps on untrusted input (``data.samples.ReadLimits``); the defaults are beyond any real corpus."""

    model_config = ConfigDict(extra="forbid")

    max_member_bytes: int = Field(DEFAULT_LIMITS.max_member_bytes, ge=1, description="a tar member larger than "
                                  "this (as its header declares) is an errors row, never read")
    max_image_pixels: int = Field(DEFAULT_LIMITS.max_image_pixels, ge=1, description="an image with more pixels is "
                                  "an errors row, never decoded")
    max_caption_chars: int = Field(DEFAULT_LIMITS.max_caption_chars, ge=1, description="captions are cut to this "
                                   "many characters before they are scored and stored")

    def read_limits(self) -> ReadLimits:
        return ReadLimits(**self.model_dump())


class TraceConfig(BaseModel):
    """Misprediction trace-back: the training pairs behind the model's mistakes on ``test`` (relative-IS)."""

    model_config = ConfigDict(extra="forbid")

    examples: int = Field(20, ge=1, description="mispredicted test examples to trace back, at most (in shard order)")
    top_k: int = Field(10, ge=1, description="training pairs kept per example")
    rank: int = Field(128, ge=1, description="rank of G's eigenbasis used for ‖Δθ₋ₙ‖")


@dataclass(frozen=True)
class ResolvedPaths:
    """The config's paths as every process of the run must read them, resolved once when the config
    is validated: local relative paths made absolute (workers may run elsewhere), URLs as given."""

    ckpt: str
    train: str | list[str]
    val: str | list[str] | None
    test: str | list[str] | None
    classes: str | None
    exclude: str | None
    out: str
    features: str | None


PATH_FIELDS = tuple(f.name for f in fields(ResolvedPaths))


class ScoreConfig(BaseModel):
    """Arguments of ``ecif-ray score`` and ``jobs/score.py``.

    The fields keep the paths as given (they are what the manifest records and the fingerprint
    hashes); :attr:`paths` holds them resolved."""

    model_config = ConfigDict(extra="forbid")

    # -- inputs ------------------------------------------------------------------------------
    ckpt: str = Field(description="ecif-ray checkpoint directory (local path or fsspec URL)")
    reference: str | None = Field(None, description="a reference CLIP (checkpoint directory, or ARCH:TAG of an "
                                  "open_clip model) whose CLIP score of each pair fills pairs.reference_clip_score")
    trusted_arch: str | None = Field(None, description="a model source outside open_clip's builtin configs that "
                                     "the checkpoint may name (e.g. hf-hub:org/model); any other is refused")
    train: str | list[str] = Field(description="shards to score: dir, brace pattern, glob, s3://..., or a list")
    val: str | list[str] | None = Field(None, description="trusted validation pairs (the 'val' query)")
    test: str | list[str] | None = Field(None, description="labelled test images (the 'task' query)")
    classes: str | None = Field(None, description="classes.json for the task query (default: next to test)")
    exclude: str | None = Field(None, description="pairs to leave out: 'shard,key' lines or Parquet")
    storage_options: dict[str, Any] | None = Field(None, description="fsspec options (e.g. S3 endpoint, keys)")
    features: str | None = Field(None, description="a feature store of this checkpoint's trunk (`ecif-ray features`): "
                                 "curvature and scoring read the train shards' trunk features from it, not the "
                                 "images (same scores); it must hold every train shard")

    # -- output ------------------------------------------------------------------------------
    out: str = Field(description="run directory (local path or s3://...)")
    run_id: str | None = Field(None, description="Hive partition value run_id=<id> (default: derived)")

    # -- what the scores mean ----------------------------------------------------------------
    queries: list[QueryName] = Field(default_factory=lambda: ["val"],
                                     description="query losses; the first is primary (pairs table)")
    negative_term: Literal["exact", "taylor"] = Field(
        "exact", description="a pair's negative role: exact, or taylor (its first-order expansion; docs/method.md §2)")
    segment_size: int | None = Field(None, ge=2, description="pairs per segment (default: the checkpoint's)")
    n_train: int | None = Field(None, ge=1, description="N of R(θ) (default: the checkpoint's training pairs)")
    damping: Literal["exact", "auto"] | float = Field(
        "exact", description="δ of the analysis: exact (the checkpoint's training δ), auto (0.1 × G's mean "
        "eigenvalue, at least the training δ) or a number (docs/concepts.md)")
    misalignment_damping: Literal["auto"] | float = Field(
        "auto", description="δ of the misalignment direction (pairs.misalignment_pos_is): auto (a fixed fraction "
        "of G's largest eigenvalue, at least the analysis δ) or a number (docs/concepts.md)")
    curvature_segments: int | None = Field(None, ge=1, description="segments in the curvature sample (default: "
                                           "every segment up to the memory cap)")
    curvature_memory_mb: int = Field(DEFAULT_MEMORY_MB, ge=1, description="trunk features of the curvature sample "
                                     "per worker, in MiB (caps the sample)")
    curvature_shards: int = Field(8, ge=1, description="shards the curvature sample is spread over")
    curvature_seed: int = Field(0, ge=0, description="seed of the curvature sample")
    solver: SolverConfig = Field(default_factory=SolverConfig)
    trace: TraceConfig | None = Field(None, description="also fill the trace table (needs test)")
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    dtype: DType = Field("auto", description="float64, float32, or auto: float64 for the heads subset (cheap "
                         "there), float32 for lora/last-k/all (float64 costs 3.4× there)")

    # -- how the run is executed -------------------------------------------------------------
    address: str | None = Field(None, description="Ray address ('auto', ray://...); default: RAY_ADDRESS "
                                                  "or a new local cluster")
    workers: int | None = Field(None, ge=1, description="actors (default: one per GPU, else one per CPU)")
    num_gpus_per_worker: float | None = Field(None, ge=0, description="default: 1 when the cluster has GPUs")
    threads_per_worker: int = Field(1, ge=1, description="CPUs reserved per actor: torch threads on a CPU actor, "
                                   "image-decoding threads on a GPU actor")
    max_attempts: int = Field(3, ge=1, description="tries per shard before it is reported as failed")
    retry_backoff_s: float = Field(5.0, ge=0, description="seconds before retrying a shard whose task raised "
                                   "(e.g. storage down), doubling per attempt")
    start_timeout_s: float = Field(600.0, gt=0, description="seconds to wait for the workers to start before giving "
                                   "up (a busy cluster cannot place them)")
    max_worker_failures: int | None = Field(None, ge=0,
                                            description="actor deaths tolerated (default 2 × workers + 2)")
    top_k: int = Field(10, ge=0, description="flagged pairs shown in the summary (and kept per shard)")
    progress: bool = Field(True, description="progress bars")

    _paths: ResolvedPaths = PrivateAttr()

    @field_validator("train", "val", "test")
    @classmethod
    def _non_empty_spec(cls, value: str | list[str] | None) -> str | list[str] | None:
        if value is None:
            return value
        specs = [value] if isinstance(value, str) else value
        if not specs or any(not str(s).strip() for s in specs):
            raise ValueError("must name at least one shard path or pattern, without empty entries")
        return value

    @field_validator("queries")
    @classmethod
    def _unique_queries(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("name at least one query: val and/or task")
        if len(set(value)) != len(value):
            raise ValueError(f"duplicate query names in {value}")
        return value

    @field_validator("run_id")
    @classmethod
    def _partition_safe(cls, value: str | None) -> str | None:
        if value is not None and (not value or any(c in value for c in "/\\=*?{}[] ")):
            raise ValueError(f"{value!r} is not usable as a Hive partition value (no / \\ = * ? {{}} [] or spaces)")
        return value

    @model_validator(mode="after")
    def _query_inputs(self) -> ScoreConfig:
        if "val" in self.queries and self.val is None:
            raise ValueError("the 'val' query needs val: validation shards (or set queries: [task])")
        if "task" in self.queries and self.test is None:
            raise ValueError("the 'task' query needs test: labelled test shards")
        if self.trace is not None and self.test is None:
            raise ValueError("trace needs test: labelled test shards whose mistakes are traced back")
        if self.features is not None and self.reference is not None:
            raise ValueError("reference: its CLIP score needs the images, which a feature store does not keep; "
                             "score without features to add reference_clip_score")
        return self

    @model_validator(mode="after")
    def _resolve_paths(self) -> ScoreConfig:
        self._paths = ResolvedPaths(**{name: absolute_local(getattr(self, name))
                                       for name in PATH_FIELDS})
        return self

    @property
    def paths(self) -> ResolvedPaths:
        """The paths resolved at validation (``absolute_local``)."""
        return self._paths

    # -- loading -----------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | None = None, overrides: Mapping[str, Any] | None = None) -> ScoreConfig:
        """YAML file (optional) plus overrides (flags); overrides win, ``None`` means 'not given'."""
        data: dict[str, Any] = read_yaml(path) if path else {}
        for key, value in (overrides or {}).items():
            if value is None:
                continue
            if key in ("solver", "trace") and isinstance(value, dict):
                data[key] = {**(data.get(key) or {}), **value}
            else:
                data[key] = value
        return cls.model_validate(data)

    # -- identity ----------------------------------------------------------------------------

    def solver_settings(self) -> SolverSettings:
        """The engine's ``SolverSettings`` for this config."""
        return SolverSettings(**self.solver.model_dump())

    def score_inputs(self) -> dict[str, Any]:
        """The fields that change what the scores mean (the rest only changes how they are computed)."""
        keep = ("train", "val", "test", "classes", "queries", "negative_term", "segment_size", "n_train", "damping",
                "misalignment_damping", "curvature_segments", "curvature_shards", "curvature_seed",
                "curvature_memory_mb", "dtype")
        inputs = {name: getattr(self, name) for name in keep}
        inputs["solver"] = self.solver.model_dump()
        inputs["trace"] = None if self.trace is None else self.trace.model_dump()
        if self.limits != LimitsConfig():  # only when set: runs made before the limits existed still resume
            inputs["limits"] = self.limits.model_dump()
        return inputs

    def public_dump(self) -> dict[str, Any]:
        """The config as recorded in the manifest: storage options are left out (they may hold keys)."""
        dump = self.model_dump(mode="json")
        if dump.get("storage_options") is not None:
            dump["storage_options"] = "<redacted>"
        return dump


def read_yaml(path: str) -> dict[str, Any]:
    """A YAML mapping from any fsspec path; a clear error for a missing file or a non-mapping."""
    try:
        with fsspec.open(path, "r") as f:
            data = yaml.safe_load(f)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"--config {path}: no such file") from exc
    except yaml.YAMLError as exc:
        raise ValueError(f"--config {path}: invalid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"--config {path}: expected a mapping of config fields, got {type(data).__name__}")
    return data


def digest(value: Any) -> str:
    """sha256 of a JSON-serialisable value in canonical form (sorted keys, no whitespace)."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def absolute_local(spec: str | list[str] | None) -> str | list[str] | None:
    """Make local relative paths absolute (workers may run elsewhere); URLs are left as they are."""
    if spec is None:
        return None
    if isinstance(spec, list):
        return [absolute_local(s) for s in spec]  # type: ignore[misc]
    if "://" in spec or "::" in spec:
        return spec
    return str(Path(spec).expanduser().absolute())
