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
def zero_shot_accuracy(bundle: ClipBundle, batches: list[PairBatch], classes: ClassSet) -> float:
    classifier = class_embeddings(bundle, classes)
    correct = total = 0
    for b in batches:
        predicted = (encode(bundle.model, images=b.images.to(classifier.device))[0] @ classifier.T).argmax(dim=1)
        correct += int((predicted.cpu() == labels_of(b)).sum())
        total += len(b)
    return correct / max(total, 1)


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
    result = {
        "zero_shot_accuracy": zero_shot_accuracy(bundle, test_batches, classes),
        "test_examples": sum(len(b) for b in test_batches),
        "test_errors": len(test_errors),
        "classes": list(classes.names),
    }
    if val is not None:
        val_batches, val_errors = load_segments(val, segment_size=ckpt.meta.segment_size,
                                                preprocess=bundle.preprocess, tokenizer=bundle.tokenizer,
                                                storage_options=storage_options)
        result.update(val_loss=validation_loss(bundle, val_batches, ckpt.meta.logit_scale),
                      val_pairs=sum(len(b) for b in val_batches), val_errors=len(val_errors))
    return result
