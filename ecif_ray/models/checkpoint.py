"""Checkpoints: safetensors weights plus a JSON sidecar; loading never unpickles code.

Layout of a checkpoint directory::

    model.safetensors    every model tensor (LoRA adapters included, under their module paths)
    anchor.safetensors   θ_0 of the δ term, keyed by θ's tensor names (0 for LoRA adapters)
    ecif.json            CheckpointMeta: architecture, parameter subset, logit scale, δ, segment size,
                         seed, data fingerprint, training summary

The anchor travels with the checkpoint so that a warm-started retraining (``--init``) minimises
the same objective R(θ) as the original fine-tuning.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors.torch import load_file, save_file

from ecif_ray import __version__
from ecif_ray.models.factory import ClipBundle, create_model
from ecif_ray.models.subsets import ParamSubset

CHECKPOINT_FORMAT = "ecif-ray-checkpoint/1"
WEIGHTS_FILE = "model.safetensors"
ANCHOR_FILE = "anchor.safetensors"
META_FILE = "ecif.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and field."""


class CheckpointMeta(BaseModel):
    model_config = ConfigDict(extra="allow")

    format: str = CHECKPOINT_FORMAT
    arch: str
    pretrained: str | None = None
    param_subset: ParamSubset
    logit_scale: float = Field(gt=0, description="s = 1/τ, fixed in R(θ) and in the analysis")
    delta: float = Field(ge=0, description="δ of R(θ)")
    segment_size: int = Field(ge=1)
    seed: int = 0
    data_fingerprint: str | None = None
    training: dict[str, Any] = Field(default_factory=dict)
    code_version: str = __version__


@dataclass
class Checkpoint:
    bundle: ClipBundle
    meta: CheckpointMeta
    anchor: dict[str, torch.Tensor]
    path: Path | None = None

    @property
    def model(self) -> torch.nn.Module:
        return self.bundle.model


def save_checkpoint(path: str | Path, bundle: ClipBundle, meta: CheckpointMeta,
                    anchor: dict[str, torch.Tensor]) -> Path:
    """Write the checkpoint directory atomically (a temp dir renamed into place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    state = {k: v.detach().contiguous().cpu() for k, v in bundle.model.state_dict().items()}
    save_file(state, tmp / WEIGHTS_FILE)
    save_file({k: v.detach().contiguous().cpu() for k, v in anchor.items()}, tmp / ANCHOR_FILE)
    (tmp / META_FILE).write_text(meta.model_dump_json(indent=2))
    if path.exists():
        _replace_dir(tmp, path)
    else:
        os.replace(tmp, path)
    return path


def _replace_dir(new: Path, old: Path) -> None:
    trash = old.with_name(f".{old.name}.old")
    os.replace(old, trash)
    os.replace(new, old)
    for f in trash.iterdir():
        f.unlink()
    trash.rmdir()


def read_meta(path: str | Path) -> CheckpointMeta:
    meta_path = Path(path) / META_FILE
    if not meta_path.is_file():
        raise CheckpointError(f"{path}: not an ecif-ray checkpoint (missing {META_FILE})")
    try:
        raw = json.loads(meta_path.read_text())
        meta = CheckpointMeta.model_validate(raw)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{meta_path}: invalid JSON ({e})") from e
    except ValidationError as e:
        err = e.errors()[0]
        field = ".".join(str(x) for x in err["loc"])
        raise CheckpointError(f"{meta_path}: field '{field}': {err['msg']}") from e
    if meta.format != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{meta_path}: field 'format': unsupported {meta.format!r}, expected {CHECKPOINT_FORMAT}")
    return meta


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> Checkpoint:
    """Rebuild the model from its sidecar and load weights with safetensors (no pickle)."""
    path = Path(path)
    meta = read_meta(path)
    bundle = create_model(meta.arch, pretrained=None, device="cpu")
    meta.param_subset.apply(bundle.model)
    for name in (WEIGHTS_FILE, ANCHOR_FILE):
        if not (path / name).is_file():
            raise CheckpointError(f"{path}: missing {name}")
    state = load_file(path / WEIGHTS_FILE)
    missing, unexpected = bundle.model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path / WEIGHTS_FILE}: weights do not match arch {meta.arch!r} with subset "
                              f"{meta.param_subset.describe()} (missing {missing[:3]}, unexpected {unexpected[:3]})")
    set_logit_scale(bundle.model, meta.logit_scale)
    anchor = load_file(path / ANCHOR_FILE)
    names = meta.param_subset.names(bundle.model)
    if sorted(anchor) != sorted(names):
        raise CheckpointError(
            f"{path / ANCHOR_FILE}: anchor tensors do not match subset {meta.param_subset.describe()}")
    bundle.model.to(device)
    return Checkpoint(bundle=bundle, meta=meta, anchor={k: anchor[k].to(device) for k in names}, path=path)


def set_logit_scale(model: torch.nn.Module, scale: float) -> None:
    """open_clip stores log(s); the analysis and R(θ) use s itself."""
    with torch.no_grad():
        model.logit_scale.fill_(float(torch.log(torch.tensor(scale))))


def logit_scale_of(model: torch.nn.Module) -> float:
    return float(model.logit_scale.detach().exp())


def checkpoint_fingerprint(path: str | Path) -> str:
    """sha256 over the checkpoint's files: identifies the exact model a score came from."""
    digest = hashlib.sha256()
    for name in (META_FILE, WEIGHTS_FILE, ANCHOR_FILE):
        digest.update(name.encode())
        with open(Path(path) / name, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()
