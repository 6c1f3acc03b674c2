"""User vocabularies for open-vocabulary inference: class names, each with optional synonyms.

A class is written ``"sofa|couch"``: its embedding is the average of its synonyms' embeddings
(see :func:`embed_vocabulary`). Its display name is the first synonym.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .embeddings import TextEmbedder

__all__ = ["SYNONYM_SEPARATOR", "Vocabulary", "embed_vocabulary", "name_key"]

#: Separates the synonyms of one class ("sofa|couch").
SYNONYM_SEPARATOR = "|"


def name_key(name: str) -> str:
    """The form two names are compared in: CLIP's tokenizer lowercases and splits on spaces, so
    "Sofa" and " sofa" give the same embedding and count as the same name."""
    return " ".join(name.lower().split())


@dataclass(frozen=True)
class Vocabulary:
    """An ordered list of classes; label value k of a prediction is ``classes[k]``.

    Build it with :meth:`parse`, :meth:`from_text` (comma-separated) or :meth:`from_file` (one
    class per line); each validates: at least one class, no empty synonym, no name (synonyms
    included, case-insensitive) given twice.

    Attributes:
        classes: per class, its synonyms (at least one; the first is the display name).
    """

    classes: tuple[tuple[str, ...], ...]

    def __post_init__(self):
        if not self.classes:
            raise ValueError("the vocabulary is empty: give at least one class name")
        seen: dict[str, int] = {}
        for k, synonyms in enumerate(self.classes):
            if not synonyms or any(not s.strip() for s in synonyms):
                raise ValueError(
                    f"class {k + 1} of the vocabulary has an empty name or synonym: "
                    f"{SYNONYM_SEPARATOR.join(synonyms)!r}"
                )
            for name in synonyms:
                key = name_key(name)
                if key in seen:
                    first = seen[key]
                    where = "twice in class" if first == k else f"in classes {first + 1} and"
                    raise ValueError(
                        f"the class name {name!r} is given {where} {k + 1}: each name (synonyms "
                        "included, case ignored) may appear once"
                    )
                seen[key] = k

    @classmethod
    def parse(cls, entries: Iterable[str | Sequence[str]]) -> Vocabulary:
        """A vocabulary from entries ``"name"``, ``"name|synonym|..."`` or lists of synonyms."""
        classes = []
        for entry in entries:
            synonyms = entry.split(SYNONYM_SEPARATOR) if isinstance(entry, str) else list(entry)
            classes.append(tuple(" ".join(str(s).split()) for s in synonyms))
        return cls(tuple(classes))

    @classmethod
    def from_text(cls, text: str) -> Vocabulary:
        """``"cat, dog, sofa|couch"``: comma-separated classes; blank entries are skipped."""
        return cls.parse(e for e in text.split(",") if e.strip())

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> Vocabulary:
        """One class per line (``name`` or ``name|synonym|...``); blank lines and lines starting
        with ``#`` are skipped. Names may contain commas here."""
        with open(path, encoding="utf-8") as f:
            lines = [line.strip() for line in f]
        entries = [line for line in lines if line and not line.startswith("#")]
        if not entries:
            raise ValueError(f"the vocabulary file {os.fspath(path)} holds no class name")
        return cls.parse(entries)

    @property
    def names(self) -> tuple[str, ...]:
        """The display name (first synonym) of each class."""
        return tuple(s[0] for s in self.classes)

    def __len__(self) -> int:
        return len(self.classes)

    def __str__(self) -> str:
        return ", ".join(SYNONYM_SEPARATOR.join(s) for s in self.classes)


def embed_vocabulary(
    embedder: TextEmbedder, vocabulary: Vocabulary, *, cache: bool = False
) -> torch.Tensor:
    """Class embeddings [K, D] of a vocabulary, rows L2-normalised.

    Each synonym is embedded as a class name would be (prompt templates averaged, see
    :class:`TextEmbedder`); a class's embedding is the mean of its synonyms' embeddings,
    normalised again. All synonyms go through the text encoder in one call (in chunks).

    Args:
        embedder: the model's text embedder (text tower or global embedding file).
        vocabulary: the K classes.
        cache: let the embedder keep the flat list of synonyms in its own cache (False: an
            open-vocabulary caller bounds its own cache, see ``ZeroShotPredictor``).
    """
    flat = [name for synonyms in vocabulary.classes for name in synonyms]
    per_name = embedder.get(flat, cache=cache)
    owner = torch.repeat_interleave(
        torch.arange(len(vocabulary), device=per_name.device),
        torch.tensor([len(s) for s in vocabulary.classes], device=per_name.device),
    )
    summed = per_name.new_zeros((len(vocabulary), per_name.shape[1])).index_add_(0, owner, per_name)
    return F.normalize(summed, dim=-1)
