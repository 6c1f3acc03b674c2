"""Prompt templates that turn a class name into sentences for CLIP's text encoder."""

from __future__ import annotations

import re
from collections.abc import Sequence

__all__ = ["TEMPLATE_SETS", "clean_class_name", "get_templates"]

# Each template has exactly one "{}" for the class name. "imagenet" is an ensemble in the spirit
# of CLIP's ImageNet prompts (photo conditions, sizes, scene context), written for ocz_d2.
# ZegFormer's two sets, for its configs (the strings decide the embeddings, so they are ZegFormer's
# own): "zegformer_single", its single template, and "imagenet_select", its ensemble: the seven
# prompts of CLIP's ImageNet list that CoOp selected, plus its single template.
TEMPLATE_SETS: dict[str, tuple[str, ...]] = {
    "single": ("a photo of a {}.",),
    "imagenet": (
        "a photo of a {}.",
        "a photo of the {}.",
        "a photo of many {}.",
        "a close-up photo of a {}.",
        "a cropped photo of the {}.",
        "a bright photo of a {}.",
        "a dark photo of the {}.",
        "a blurry photo of a {}.",
        "a photo of a small {}.",
        "a photo of a large {}.",
        "a good photo of the {}.",
        "there is a {} in the scene.",
        "a photo of the {} in the scene.",
        "a rendering of a {}.",
    ),
    "zegformer_single": ("A photo of a {} in the scene",),
    "imagenet_select": (
        "itap of a {}.",
        "a bad photo of the {}.",
        "a origami {}.",
        "a photo of the large {}.",
        "a {} in a video game.",
        "art of the {}.",
        "a photo of the small {}.",
        "A photo of a {} in the scene",
    ),
}

_SUFFIXES = re.compile(r"(-merged|-other)+$")


def get_templates(templates: str | Sequence[str]) -> tuple[str, ...]:
    """Resolve ``MODEL.OCZ.TEXT.TEMPLATES``: a set name or an explicit list of templates.

    Args:
        templates: a set name of :data:`TEMPLATE_SETS`, or a sequence of strings each
            containing one "{}".

    Returns:
        The templates as a tuple.
    """
    if isinstance(templates, str):
        if templates not in TEMPLATE_SETS:
            raise ValueError(
                f"Unknown MODEL.OCZ.TEXT.TEMPLATES={templates!r}; choose one of "
                f"{sorted(TEMPLATE_SETS)}."
            )
        return TEMPLATE_SETS[templates]
    templates = tuple(templates)
    bad = [t for t in templates if t.count("{}") != 1]
    if not templates or bad:
        raise ValueError(f"Templates need exactly one '{{}}' each; bad: {bad or 'empty list'}")
    return templates


def clean_class_name(name: str) -> str:
    """Make a dataset class name readable for the text encoder.

    "_" becomes a space and COCO-Stuff's "-other" / "-merged" suffixes are dropped
    ("wall-other-merged" -> "wall"); other hyphens stay ("t-shirt").
    """
    name = _SUFFIXES.sub("", name.strip())
    return " ".join(name.replace("_", " ").split())
