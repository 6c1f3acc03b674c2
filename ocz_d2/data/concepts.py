"""Concepts of a caption: the noun phrases that a concept bank knows (SimZSS's concept loss).

A **concept bank** is a text file, one concept per line; a line may give alternative phrasings
separated by ``|`` (``tv monitor|television``), all of which name the same concept; blank lines
and lines starting with ``#`` are skipped. Concept k is the k-th line: its id is k.

Two extractors find the bank's concepts in a caption:

- ``"matcher"`` (no model, always available; :class:`ConceptMatcher`). The caption is split into
  words (lowercased runs of letters and digits); each word is reduced to a singular form by a
  few suffix rules (``-ies`` -> ``-y``, ``-ches``/``-shes``/``-xes``/``-ses``/``-zes`` -> drop
  ``es``, otherwise a final ``s`` is dropped unless the word ends in ``ss``, ``us`` or ``is``), and
  so is every bank phrase. A phrase matches a run of consecutive caption words that holds exactly
  the phrase's words, **in any order**, where the filler word ``and`` may stand between two of
  them ("green and checkered" matches the phrase "checkered green"). Matches do not overlap: a
  longer phrase wins over a shorter one inside it ("dining table" over "table"), then the
  earlier one. Not handled: phrases split by other words ("a green shape with checks"),
  irregular plurals ("mice"), synonyms not listed in the bank.
- ``"spacy"`` (the optional extra ``pip install spacy`` and an English pipeline, e.g.
  ``python -m spacy download en_core_web_sm``): spaCy's noun chunks of the caption, each
  filtered by the bank with the matcher above applied inside the chunk, so a concept never
  straddles two noun phrases. ``"auto"`` uses spaCy when it and the pipeline load, else the
  matcher.

Every concept found is reported with its character span in the caption; :func:`concept_token_spans`
turns those spans into positions in the caption's CLIP tokens, where SimZSS reads the concept's
text embedding.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

from ..utils.errors import DataError, MissingFileError

__all__ = [
    "CONCEPT_EXTRACTORS",
    "ConceptBank",
    "ConceptMatch",
    "ConceptMatcher",
    "SpacyConceptExtractor",
    "build_concept_extractor",
    "concept_token_spans",
    "singular",
]

logger = logging.getLogger(__name__)

#: Values of ``MODEL.SIMZSS.CONCEPTS.EXTRACTOR``.
CONCEPT_EXTRACTORS = ("auto", "matcher", "spacy")

_WORD_RE = re.compile(r"[a-z0-9]+")
_FILLERS = frozenset({"and"})
_ES_ENDINGS = ("ches", "shes", "xes", "ses", "zes")
_KEEP_S = ("ss", "us", "is")


def singular(word: str) -> str:
    """The matcher's singular form of a lowercase word (suffix rules; see the module doc)."""
    if len(word) > 4 and word.endswith("ies"):
        return word[:-3] + "y"
    if len(word) > 4 and word.endswith(_ES_ENDINGS):
        return word[:-2]
    if len(word) > 3 and word.endswith("s") and not word.endswith(_KEEP_S):
        return word[:-1]
    return word


def _words(text: str) -> list[tuple[str, int, int]]:
    """(singular word, start, end) of each word of ``text`` (spans in ``text``)."""
    return [(singular(m.group()), m.start(), m.end()) for m in _WORD_RE.finditer(text.lower())]


@dataclass(frozen=True)
class ConceptMatch:
    """A concept found in a caption: bank id and character span ``caption[start:end]``."""

    concept: int
    start: int
    end: int


class ConceptBank:
    """The concepts SimZSS learns from captions (module docstring: the file format).

    Attributes:
        names: the display name (first phrasing) of each concept.
        phrasings: per concept, its phrasings.
    """

    def __init__(self, entries: Sequence[str | Sequence[str]], source: str = "concept bank"):
        """
        Args:
            entries: one per concept: ``"phrase"``, ``"phrase|other phrase"`` or a list of
                phrasings.
            source: where they come from, for error messages.
        """
        phrasings: list[tuple[str, ...]] = []
        owner: dict[tuple[str, ...], int] = {}
        for k, entry in enumerate(entries):
            parts = entry.split("|") if isinstance(entry, str) else list(entry)
            parts = tuple(" ".join(str(p).split()) for p in parts)
            if not parts or any(not p for p in parts):
                raise DataError(f"{source}: concept {k + 1} has an empty phrasing: {entry!r}")
            for phrase in parts:
                key = tuple(sorted(w for w, _, _ in _words(phrase)))
                if not key:
                    raise DataError(
                        f"{source}: concept {k + 1} phrasing {phrase!r} has no word (letters or "
                        "digits)"
                    )
                if key in owner and owner[key] != k:
                    raise DataError(
                        f"{source}: the phrasing {phrase!r} of concept {k + 1} has the words of "
                        f"concept {owner[key] + 1} ({phrasings[owner[key]][0]!r}); the matcher "
                        "ignores word order and plurals, so merge them into one line with '|'"
                    )
                owner[key] = k
            phrasings.append(parts)
        if not phrasings:
            raise DataError(f"{source} holds no concept")
        self.phrasings = tuple(phrasings)
        self.names = tuple(p[0] for p in phrasings)
        self.source = source
        self._owner = owner

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> ConceptBank:
        """Read a concept bank file (one concept per line; ``|`` separates phrasings)."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise MissingFileError(
                f"concept bank {path!r} does not exist: give a text file with one concept per "
                "line (MODEL.SIMZSS.CONCEPTS.BANK or the caption split file's concept_bank)"
            )
        with open(path, encoding="utf-8") as f:
            lines = [line.strip() for line in f]
        return cls([x for x in lines if x and not x.startswith("#")], source=f"concept bank {path}")

    def __len__(self) -> int:
        return len(self.phrasings)

    def lookup(self, words: Sequence[str]) -> int | None:
        """The concept whose phrasing has exactly these (singular) words, any order; or None."""
        return self._owner.get(tuple(sorted(words)))

    @property
    def max_words(self) -> int:
        """Words of the longest phrasing."""
        return max(len(key) for key in self._owner)


class ConceptMatcher:
    """The model-free extractor: bank phrases in a caption, any word order, plurals reduced,
    ``and`` allowed between the words (module docstring)."""

    def __init__(self, bank: ConceptBank):
        self.bank = bank

    def __call__(self, caption: str) -> list[ConceptMatch]:
        return self.find(caption)

    def find(self, caption: str, start: int = 0, end: int | None = None) -> list[ConceptMatch]:
        """Concepts in ``caption[start:end]``, non-overlapping, in caption order."""
        end = len(caption) if end is None else end
        words = [(w, s + start, e + start) for w, s, e in _words(caption[start:end])]
        candidates = []
        longest = self.bank.max_words
        for i in range(len(words)):
            content: list[str] = []
            for j in range(i, len(words)):
                word = words[j][0]
                if word in _FILLERS:
                    if j == i:
                        break
                    continue
                content.append(word)
                if len(content) > longest:
                    break
                concept = self.bank.lookup(content)
                if concept is not None:
                    candidates.append((len(content), i, j, concept))
        # Longest first, then earliest; keep those that overlap nothing kept.
        candidates.sort(key=lambda c: (-c[0], c[1]))
        taken: set[int] = set()
        kept = []
        for _, i, j, concept in candidates:
            if taken.isdisjoint(range(i, j + 1)):
                taken.update(range(i, j + 1))
                kept.append(ConceptMatch(concept, words[i][1], words[j][2]))
        return sorted(kept, key=lambda m: m.start)


class SpacyConceptExtractor:
    """spaCy noun chunks filtered by the bank (module docstring). Needs spaCy and a pipeline."""

    def __init__(self, bank: ConceptBank, pipeline: str = "en_core_web_sm"):
        self.matcher = ConceptMatcher(bank)
        self.pipeline = pipeline
        self.nlp = _load_spacy(pipeline)

    def __call__(self, caption: str) -> list[ConceptMatch]:
        found = []
        for chunk in self.nlp(caption).noun_chunks:
            found.extend(self.matcher.find(caption, chunk.start_char, chunk.end_char))
        return found


@lru_cache(maxsize=4)
def _load_spacy(pipeline: str):
    try:
        import spacy  # noqa: PLC0415  (an optional extra: imported only when asked for)
    except ImportError as e:
        raise MissingFileError(
            "MODEL.SIMZSS.CONCEPTS.EXTRACTOR 'spacy' needs spaCy: pip install spacy && python -m "
            f"spacy download {pipeline}; or use 'matcher' (no model)"
        ) from e
    try:
        return spacy.load(pipeline, disable=["ner", "lemmatizer"])
    except OSError as e:
        raise MissingFileError(
            f"spaCy pipeline {pipeline!r} is not installed: python -m spacy download {pipeline}; "
            "or use MODEL.SIMZSS.CONCEPTS.EXTRACTOR 'matcher' (no model)"
        ) from e


def build_concept_extractor(bank: ConceptBank, extractor: str = "auto", pipeline: str = ""):
    """The extractor named by ``MODEL.SIMZSS.CONCEPTS.EXTRACTOR`` (``"auto"``: spaCy when it
    loads, else the matcher), a callable ``caption -> [ConceptMatch]``."""
    if extractor not in CONCEPT_EXTRACTORS:
        raise DataError(
            f"MODEL.SIMZSS.CONCEPTS.EXTRACTOR={extractor!r}: use one of {CONCEPT_EXTRACTORS}"
        )
    pipeline = pipeline or "en_core_web_sm"
    if extractor == "matcher":
        return ConceptMatcher(bank)
    if extractor == "spacy":
        return SpacyConceptExtractor(bank, pipeline)
    try:
        return SpacyConceptExtractor(bank, pipeline)
    except MissingFileError as e:
        logger.info("Concepts by the bank matcher (spaCy unavailable: %s)", e)
        return ConceptMatcher(bank)


def concept_token_spans(
    caption: str, matches: Sequence[ConceptMatch], encode, context_length: int
) -> list[tuple[int, int, int]]:
    """Token positions of each concept in the caption's CLIP token sequence.

    The sequence is ``[start-of-text] + encode(caption) + [end-of-text]`` truncated to
    ``context_length`` (open_clip's tokenizer); a concept's tokens are those of its words:
    ``1 + len(encode(caption[:start]))`` up to ``1 + len(encode(caption[:end]))``. A concept cut
    by the truncation (it must end before the last position, which holds end-of-text) is dropped.

    Args:
        caption: the caption.
        matches: its concepts (:class:`ConceptMatch`, character spans at word boundaries).
        encode: the BPE encoder of the tokenizer (``SimpleTokenizer.encode``).
        context_length: the text tower's sequence length.

    Returns:
        ``[(concept id, first token, end token (exclusive)), ...]``.
    """
    spans = []
    for m in matches:
        first = 1 + len(encode(caption[: m.start]))
        stop = 1 + len(encode(caption[: m.end]))
        if stop <= first or stop > context_length - 1:
            continue
        spans.append((m.concept, first, stop))
    return spans
