"""Checkpoints: safetensors weights plus a JSON sidecar; loading never unpickles code.

Layout of a checkpoint directory::

    model.safetensors    every model tensor (LoRA adapters included, under their module paths)
    anchor.safetensors   θ_0 of the δ term, keyed by θ's tensor names (0 for LoRA adapters)
    ecif.json            CheckpointMeta: architecture, parameter subset, logit scale, δ, segment size,
                         seed, data fingerprint, training summary

The anchor travels with the checkpoint so that a warm-started retraining (``--init``) minimises
the same objective R(θ) as the original fine-tuning.

A checkpoint is data, never code or a pointer elsewhere: loading reads weights with safetensors
only (a pickle or ``torch.save`` file is refused, never unpickled), accepts as ``arch`` only
open_clip's builtin architectures and the tiny configs this package ships (an ``hf-hub:`` or
``local-dir:`` arch, which would fetch a config and code from outside the checkpoint, is used
only when the caller passes it as ``trusted_arch``), and refuses truncated or corrupt files,
tensors whose shapes do not fit the architecture and non-finite weights, naming the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ecif_ray import __version__
from ecif_ray.models.factory import ClipBundle, create_model
from ecif_ray.models.subsets import ParamSubset

CHECKPOINT_FORMAT = "ecif-ray-checkpoint/1"
WEIGHTS_FILE = "model.safetensors"
ANCHOR_FILE = "anchor.safetensors"
META_FILE = "ecif.json"
_PICKLE_MAGIC = (b"PK\x03\x04", b"\x80")  # torch.save's zip archive; a raw pickle (protocol >= 2)
_PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and field."""


class CheckpointMeta(BaseModel):
    model_config = ConfigDict(extra="allow")

    format: str = CHECKPOINT_FORMAT
    arch: str
    pretrained: str | None = None
    param_subset: ParamSubset
    logit_scale: float = Field(gt=0, allow_inf_nan=False, description="s = 1/τ, fixed in R(θ) and in the analysis")
    delta: float = Field(ge=0, allow_inf_nan=False, description="δ of R(θ)")
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


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu", *,
                    trusted_arch: str | None = None) -> Checkpoint:
    """Rebuild the model from its sidecar and load weights with safetensors (no pickle).

    ``trusted_arch``: an architecture outside open_clip's builtin list and the shipped tiny configs
    (e.g. ``hf-hub:org/model``) that the caller vouches for; a checkpoint naming any other such arch
    is refused, since its ``ecif.json`` alone must not make the loader fetch a config from elsewhere.
    """
    path = Path(path)
    meta = read_meta(path)
    _check_arch(meta.arch, path / META_FILE, trusted_arch)
    for name in (WEIGHTS_FILE, ANCHOR_FILE):
        _check_present(path, name)
    state = _load_tensors(path / WEIGHTS_FILE)
    bundle = create_model(meta.arch, pretrained=None, device="cpu")
    meta.param_subset.apply(bundle.model)
    _load_state(bundle.model, state, path / WEIGHTS_FILE, meta)
    set_logit_scale(bundle.model, meta.logit_scale)
    anchor = _load_tensors(path / ANCHOR_FILE)
    names = meta.param_subset.names(bundle.model)
    _check_anchor(anchor, dict(bundle.model.named_parameters()), names, path / ANCHOR_FILE, meta)
    bundle.model.to(device)
    return Checkpoint(bundle=bundle, meta=meta, anchor={k: anchor[k].to(device) for k in names}, path=path)


def builtin_archs() -> list[str]:
    """The architectures a checkpoint may name: open_clip's builtin configs and the shipped tiny ones."""
    return [name for name in open_clip.list_models() if ":" not in name]


def _check_arch(arch: str, meta_path: Path, trusted_arch: str | None) -> None:
    if arch == trusted_arch or arch in builtin_archs():
        return
    raise CheckpointError(
        f"{meta_path}: field 'arch': {arch!r} is neither an open_clip builtin architecture nor a shipped tiny "
        f"config; a checkpoint may not point at a model config outside itself (hf-hub:, local-dir:) unless the "
        f"caller passes that arch explicitly as trusted_arch")


def _check_present(path: Path, name: str) -> None:
    if (path / name).is_file():
        return
    pickled = sorted(p.name for p in path.iterdir() if p.suffix.lower() in _PICKLE_SUFFIXES) if path.is_dir() else []
    hint = (f"; found {', '.join(pickled)}: pickled weights are refused, ecif-ray loads only safetensors "
            f"(convert with safetensors.torch.save_file)") if pickled else ""
    raise CheckpointError(f"{path}: missing {name}{hint}")


def _load_tensors(file: Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors (safetensors never unpickles); a file that is not one is named,
    a pickle as such; every floating tensor must be finite."""
    try:
        tensors = load_file(file)
    except (SafetensorError, OSError, ValueError) as e:
        with open(file, "rb") as f:
            head = f.read(4)
        if head.startswith(_PICKLE_MAGIC):
            raise CheckpointError(f"{file}: is a pickle / torch.save file, not safetensors; ecif-ray never "
                                  f"unpickles weights (convert it with safetensors.torch.save_file)") from e
        raise CheckpointError(f"{file}: not a valid safetensors file (corrupt or truncated?): {e}") from e
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"{file}: tensor {name!r} holds NaN or infinite values")
    return tensors


def _load_state(model: torch.nn.Module, state: dict[str, torch.Tensor], file: Path, meta: CheckpointMeta) -> None:
    where = f"arch {meta.arch!r} with subset {meta.param_subset.describe()}"
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # size mismatch
        detail = " ".join(line.strip() for line in str(e).splitlines()[1:3])
        raise CheckpointError(f"{file}: weights do not fit {where}: {detail}") from e
    if missing or unexpected:
        raise CheckpointError(f"{file}: weights do not match {where} "
                              f"(missing {missing[:3]}, unexpected {unexpected[:3]})")


def _check_anchor(anchor: dict[str, torch.Tensor], params: dict[str, torch.nn.Parameter], names: list[str],
                  file: Path, meta: CheckpointMeta) -> None:
    if sorted(anchor) != sorted(names):
        raise CheckpointError(f"{file}: anchor tensors do not match subset {meta.param_subset.describe()}")
    for name in names:
        if anchor[name].shape != params[name].shape:
            raise CheckpointError(f"{file}: anchor tensor {name!r} has shape {tuple(anchor[name].shape)}, "
                                  f"the model's is {tuple(params[name].shape)}")


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
