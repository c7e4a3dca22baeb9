"""Model quality: zero-shot classification accuracy and the validation contrastive loss.

The validation loss is L'(θ) = (1/N') Σ_m L_seg,m over the validation pairs, segmented exactly as
the engine segments its validation query (shard order, the checkpoint's segment size), so the
number `ecif-ray eval` prints is the quantity whose change the influence scores predict.
"""

from __future__ import annotations

import torch

from ecif_ray.data.segments import PairBatch, load_segments
from ecif_ray.influence.contrastive import mean_segment_loss
from ecif_ray.models.checkpoint import Checkpoint
from ecif_ray.models.factory import ClipBundle, encode, similarity_matrix
from ecif_ray.models.zeroshot import ClassSet, class_embeddings, find_classes, labels_of


@torch.no_grad()
def zero_shot_predictions(bundle: ClipBundle, batches: list[PairBatch], classes: ClassSet
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """(true labels, predicted labels) of every test image against the class prompts."""
    classifier = class_embeddings(bundle, classes)
    labels, predicted = [], []
    for b in batches:
        predicted.append((encode(bundle.model, images=b.images.to(classifier.device))[0] @ classifier.T)
                         .argmax(dim=1).cpu())
        labels.append(labels_of(b))
    return (torch.cat(labels), torch.cat(predicted)) if labels else (torch.zeros(0), torch.zeros(0))


@torch.no_grad()
def validation_loss(bundle: ClipBundle, batches: list[PairBatch], logit_scale: float) -> float:
    """L'(θ) = (1/N') Σ_m L_seg,m with the fixed validation segments."""
    return float(mean_segment_loss(similarity_matrix(bundle.model, b.images, b.tokens, logit_scale)
                                   for b in batches))


def evaluate(ckpt: Checkpoint, test: str | list[str], val: str | list[str] | None = None,
             classes_path: str | None = None, storage_options: dict | None = None) -> dict:
    """What `ecif-ray eval --json` prints."""
    bundle = ckpt.bundle
    test_batches, test_errors = load_segments(test, segment_size=256, preprocess=bundle.preprocess,
                                              tokenizer=bundle.tokenizer, storage_options=storage_options)
    classes = find_classes(test, classes_path, storage_options, test_batches)
    labels, predicted = zero_shot_predictions(bundle, test_batches, classes)
    correct = labels == predicted
    result = {
        "zero_shot_accuracy": float(correct.float().mean()) if len(labels) else 0.0,
        "test_examples": len(labels),
        "test_errors": len(test_errors),
        "classes": list(classes.names),
        "per_class_accuracy": {name: float(correct[labels == c].float().mean())
                               for c, name in enumerate(classes.names) if bool((labels == c).any())},
    }
    if val is not None:
        val_batches, val_errors = load_segments(val, segment_size=ckpt.meta.segment_size,
                                                preprocess=bundle.preprocess, tokenizer=bundle.tokenizer,
                                                storage_options=storage_options)
        result.update(val_loss=validation_loss(bundle, val_batches, ckpt.meta.logit_scale),
                      val_pairs=sum(len(b) for b in val_batches), val_errors=len(val_errors))
    return result
