"""Zero-shot classification with a CLIP model: class sets, prompt embeddings, labels.

A class set is a list of class names and the caption templates that turn each into prompts
(``data.prompts``); the zero-shot classifier of a model is, per class, the normalised mean of its
prompts' normalised text embeddings. The task query, trace-back and ``ecif-ray eval`` share these.
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass

import fsspec
import torch
import torch.nn.functional as F

from ecif_ray.data.prompts import CAPTION_TEMPLATES, class_prompts
from ecif_ray.data.segments import PairBatch
from ecif_ray.models.factory import ClipBundle, encode


@dataclass(frozen=True)
class ClassSet:
    names: tuple[str, ...]
    templates: tuple[str, ...]


def find_classes(test: str | list[str], classes_path: str | None = None, storage_options: dict | None = None,
                 batches: list[PairBatch] | None = None) -> ClassSet:
    """Class names and prompt templates: an explicit classes.json, the corpus's own
    (``<test>/../classes.json``), or else the labels recorded in the test samples."""
    candidates = [classes_path] if classes_path else []
    if isinstance(test, str):
        candidates.append(posixpath.join(posixpath.dirname(test.rstrip("/")), "classes.json"))
    for path in candidates:
        fs, fs_path = fsspec.core.url_to_fs(path, **(storage_options or {}))
        if fs.exists(fs_path):
            with fs.open(fs_path, "r") as f:
                spec = json.load(f)
            return ClassSet(tuple(spec["classes"]), tuple(spec.get("templates") or CAPTION_TEMPLATES))
        if path == classes_path:
            raise FileNotFoundError(f"--classes {classes_path}: no such file")
    labels = {int(m["label"]): m["class_name"] for b in batches or [] for m in b.meta if "class_name" in m}
    if not labels:
        raise ValueError(f"no classes.json next to {test} and no class_name/label in its samples' json")
    return ClassSet(tuple(labels[i] for i in sorted(labels)), CAPTION_TEMPLATES)


def prompt_tokens(bundle: ClipBundle, classes: ClassSet) -> torch.Tensor:
    """Token ids of every class prompt, class after class (templates within a class)."""
    prompts = class_prompts(classes.names, classes.templates)
    return bundle.tokenizer([p for per_class in prompts for p in per_class])


def prompt_classifier(text: torch.Tensor, classes: ClassSet) -> torch.Tensor:
    """[C, D] zero-shot classifier from the prompts' normalised embeddings: per class, the
    normalised mean of its prompts."""
    return F.normalize(text.view(len(classes.names), len(classes.templates), -1).mean(dim=1), dim=-1)


def class_embeddings(bundle: ClipBundle, classes: ClassSet) -> torch.Tensor:
    """[C, D] zero-shot classifier of the model as it is."""
    tokens = prompt_tokens(bundle, classes).to(next(bundle.model.parameters()).device)
    return prompt_classifier(encode(bundle.model, tokens=tokens)[1], classes)


def labels_of(batch: PairBatch) -> torch.Tensor:
    try:
        return torch.tensor([int(m["label"]) for m in batch.meta])
    except KeyError as e:
        i = next(i for i, m in enumerate(batch.meta) if "label" not in m)
        raise ValueError(f"{batch.shard}/{batch.keys[i]}: test sample has no 'label' in its json") from e
