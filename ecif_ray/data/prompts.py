"""Caption templates, shared by corpus captions and zero-shot class prompts.

Using the same templates for training captions and for zero-shot prompts keeps the task loss
(zero-shot cross-entropy against class-prompt embeddings) measured in the language the model
was fine-tuned on; the corpus builder records the templates in ``classes.json`` so evaluation
code never has to guess them.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["CAPTION_TEMPLATES", "caption_for", "class_prompts"]

CAPTION_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a picture of a {}.",
    "a black and white photo of a {}.",
    "a close-up photo of a {}.",
    "an image of a {}.",
    "a low resolution photo of a {}.",
    "a grayscale picture of a {}.",
    "a small photo of a {}.",
)


def caption_for(class_name: str, template_index: int, templates: Sequence[str] = CAPTION_TEMPLATES) -> str:
    """The caption for ``class_name`` written with template number ``template_index``."""
    if not 0 <= template_index < len(templates):
        raise IndexError(f"template_index {template_index} out of range 0..{len(templates) - 1}")
    return templates[template_index].format(class_name)


def class_prompts(class_names: Sequence[str], templates: Sequence[str] = CAPTION_TEMPLATES) -> list[list[str]]:
    """Every template filled with every class name: ``prompts[class][template]``.

    Zero-shot classifiers average the text embeddings of one class's prompts.
    """
    return [[t.format(name) for t in templates] for name in class_names]
