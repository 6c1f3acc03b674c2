"""Class-name embeddings: CLIP's text tower with prompt templates, or a precomputed .npz file.

The vocabulary changes per batch (each sample's dataset), so embeddings are cached per
(source, class names). The cache is plain module state: not in the state dict, moved by
``.to()``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import open_clip
import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.data import MetadataCatalog
from torch import nn

from ...data.register_zero_shot import load_class_embeddings
from .templates import clean_class_name, get_templates

__all__ = ["TextEmbedder"]

logger = logging.getLogger(__name__)

_GLOBAL_FILE_KEY = "MODEL.OCZ.TEXT.EMBEDDINGS_FILE"


def _embedding_dim_of_file(path: str) -> int:
    return int(load_class_embeddings(path)[1].shape[1])


def _text_output_dim(clip_model: nn.Module) -> int:
    proj = getattr(clip_model, "text_projection", None)
    if isinstance(proj, nn.Linear):
        return proj.out_features
    if isinstance(proj, torch.Tensor):
        return int(proj.shape[-1])
    text = getattr(clip_model, "text", None)  # CustomTextCLIP
    if text is not None and hasattr(text, "output_dim"):
        return int(text.output_dim)
    raise ValueError(f"Cannot tell the text embedding size of {type(clip_model).__name__}.")


class TextEmbedder(nn.Module):
    """Embeddings [K, D] of a vocabulary of class names, L2-normalised rows.

    Sources, first match wins:
    1. the global file ``embeddings_file`` (``MODEL.OCZ.TEXT.EMBEDDINGS_FILE``), which may hold
       more classes than a dataset uses (one file for several datasets);
    2. the file passed to :meth:`get`, or the ``class_embeddings`` of the dataset's metadata,
       which must hold exactly the dataset's classes;
    3. CLIP's text tower: every class name in every template, encoded in chunks, normalised,
       averaged over templates and normalised again.
    """

    @configurable
    def __init__(
        self,
        *,
        clip_model: nn.Module | None = None,
        model_name: str = "",
        templates: str | Sequence[str] = "single",
        embeddings_file: str = "",
        chunk_size: int = 256,
        dim: int | None = None,
        dataset_names: Sequence[str] = (),
    ):
        """
        Args:
            clip_model: open_clip model with ``encode_text`` (``CLIPPromptBackbone.text_encoder()``)
                or None when every vocabulary comes from files. Held by reference, not
                registered: its weights belong to the backbone.
            model_name: open_clip name of ``clip_model``, selects the tokenizer.
            templates: template set name ("single", "imagenet") or list of templates.
            embeddings_file: global class-embedding file, or "".
            chunk_size: prompts per text-encoder call.
            dim: embedding size D the caller expects; checked against the source when given.
            dataset_names: registered datasets whose vocabularies will be asked for; the size
                of each one's source (see :meth:`get`) is checked here, at build time.
        """
        super().__init__()
        if chunk_size < 1:
            raise ValueError(f"MODEL.OCZ.TEXT.CHUNK_SIZE must be >= 1, got {chunk_size}.")
        if clip_model is not None and not model_name:
            raise ValueError("TextEmbedder needs model_name (for the tokenizer) with a clip_model.")
        # A tuple hides the module from nn.Module registration: no duplicate parameters.
        self._clip_ref = (clip_model,) if clip_model is not None else ()
        self.model_name = model_name
        self.templates = get_templates(templates)
        self.chunk_size = int(chunk_size)
        self.embeddings_file = os.path.abspath(embeddings_file) if embeddings_file else ""
        self._tokenizer = None
        self._cache: dict[tuple[str, tuple[str, ...]], torch.Tensor] = {}
        # Tracks the module's device/dtype through .to(); empty and non-persistent.
        self.register_buffer("_device_probe", torch.zeros(0), persistent=False)
        if self.embeddings_file and not os.path.isfile(self.embeddings_file):
            raise FileNotFoundError(
                f"{_GLOBAL_FILE_KEY}={embeddings_file!r} does not exist: fix "
                f"{_GLOBAL_FILE_KEY} or set it to ''."
            )
        self._dim = self._check_dims(dim, dataset_names)

    def _check_dims(self, dim: int | None, dataset_names: Sequence[str]) -> int | None:
        """The D that every source gives (None: no source known yet); raises if they differ."""
        source_dims = {}
        if self.clip_model is not None:
            source_dims[f"CLIP {self.model_name} text tower"] = _text_output_dim(self.clip_model)
        if dim is not None:
            source_dims["the model (dim)"] = int(dim)
        for name in [None, *dataset_names]:  # None: the global file
            path = self._file_for(name, None)
            if path is not None:
                source_dims[self._describe_file(path, name)] = _embedding_dim_of_file(path)
        if len(set(source_dims.values())) > 1:
            raise ValueError(
                f"Text embedding sizes disagree: {source_dims}. Every vocabulary must come in "
                "the model's embedding size. Either set "
                f"{_GLOBAL_FILE_KEY} to a file of that size holding every class (it replaces "
                "the datasets' files), or remake the class_embeddings file of the split with "
                "the text tower of MODEL.OCZ.CLIP.MODEL_NAME, or remove class_embeddings from "
                "the split so that the text tower encodes the class names."
            )
        return next(iter(source_dims.values()), None)

    def _describe_file(self, path: str, dataset_name: str | None) -> str:
        if path == self.embeddings_file:
            return f"{_GLOBAL_FILE_KEY} {path}"
        return f"class_embeddings of {dataset_name} ({path})"

    @classmethod
    def from_config(
        cls,
        cfg,
        clip_model: nn.Module | None = None,
        dim: int | None = None,
        dataset_names: Sequence[str] = (),
    ):
        text = cfg.MODEL.OCZ.TEXT
        return {
            "clip_model": clip_model,
            "model_name": cfg.MODEL.OCZ.CLIP.MODEL_NAME,
            "templates": text.TEMPLATES,
            "embeddings_file": text.EMBEDDINGS_FILE,
            "chunk_size": text.CHUNK_SIZE,
            "dim": dim,
            "dataset_names": dataset_names,
        }

    @property
    def dim(self) -> int | None:
        """D of the returned embeddings (None only without text tower, global file and dim)."""
        return self._dim

    @property
    def clip_model(self) -> nn.Module | None:
        return self._clip_ref[0] if self._clip_ref else None

    def clear_cache(self) -> None:
        self._cache.clear()

    def _apply(self, fn, *args, **kwargs):
        # Cached embeddings follow .to()/.cuda()/.double() like a buffer would.
        self._cache = {k: fn(v) for k, v in self._cache.items()}
        return super()._apply(fn, *args, **kwargs)

    def forward(
        self,
        class_names: Sequence[str],
        dataset_name: str | None = None,
        embeddings_file: str | None = None,
    ) -> torch.Tensor:
        """Same as :meth:`get`."""
        return self.get(class_names, dataset_name, embeddings_file)

    def get(
        self,
        class_names: Sequence[str],
        dataset_name: str | None = None,
        embeddings_file: str | None = None,
        *,
        cache: bool = True,
    ) -> torch.Tensor:
        """Embeddings of ``class_names``, in that order.

        Args:
            class_names: the vocabulary, K names (e.g. ``metadata.stuff_classes``).
            dataset_name: registered dataset the names come from; its metadata's
                ``class_embeddings`` is used when ``embeddings_file`` is None; also named in errors.
            embeddings_file: a class-embedding file for this vocabulary, overriding the metadata.
            cache: keep the result for the next call with the same names. The cache has no
                bound (datasets' vocabularies are few): callers that see many vocabularies pass
                False and bound their own (see ``ZeroShotPredictor``).

        Returns:
            [K, D] float tensor on this module's device, rows L2-normalised. The same tensor
            object is returned while the cache holds it: do not modify it in place.
        """
        class_names = tuple(str(c) for c in class_names)
        if not class_names:
            raise ValueError(f"Empty vocabulary for dataset {dataset_name!r}.")
        source, strict = self._resolve_source(dataset_name, embeddings_file)
        key = (source, class_names)
        cached = self._cache.get(key)
        probe = self._device_probe
        if cached is not None and cached.device == probe.device:
            return cached
        if source.startswith("clip:"):
            embeddings = self._encode_names(class_names)
        else:
            embeddings = self._from_file(source, class_names, dataset_name, strict)
        if self._dim is not None and embeddings.shape[1] != self._dim:
            raise ValueError(
                f"Class embeddings from {source} have D={embeddings.shape[1]}, the model expects "
                f"D={self._dim}: use a file made with the same CLIP model "
                "(MODEL.OCZ.CLIP.MODEL_NAME) or fix MODEL.OCZ.TEXT.EMBEDDINGS_FILE."
            )
        dtype = probe.dtype if probe.is_floating_point() else torch.float32
        embeddings = embeddings.to(device=probe.device, dtype=dtype)
        if cache:
            self._cache[key] = embeddings
        return embeddings

    def _resolve_source(
        self, dataset_name: str | None, embeddings_file: str | None
    ) -> tuple[str, bool]:
        """(file path or "clip:<model>:<templates>", whether file classes must match exactly)."""
        path = self._file_for(dataset_name, embeddings_file)
        if path is not None:
            return path, path != self.embeddings_file
        if self.clip_model is None:
            raise RuntimeError(
                f"No class embeddings for dataset {dataset_name!r}: the CLIP text tower is not "
                f"available and neither {_GLOBAL_FILE_KEY} nor the split's class_embeddings is "
                "set. Set one of them, or keep the text tower."
            )
        return f"clip:{self.model_name}:{'|'.join(self.templates)}", False

    def _file_for(self, dataset_name: str | None, embeddings_file: str | None) -> str | None:
        """The class-embedding file of a vocabulary, first match wins: the global file, the
        given file, the dataset's ``class_embeddings``; None: the text tower."""
        if self.embeddings_file:
            return self.embeddings_file
        if not embeddings_file and dataset_name and dataset_name in MetadataCatalog.list():
            embeddings_file = MetadataCatalog.get(dataset_name).get("class_embeddings", None)
        if not embeddings_file:
            return None
        path = os.path.abspath(embeddings_file)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"Class-embedding file {embeddings_file!r} of dataset {dataset_name!r} does "
                f"not exist: fix the split's class_embeddings or set {_GLOBAL_FILE_KEY}."
            )
        return path

    def _from_file(
        self, path: str, class_names: tuple[str, ...], dataset_name: str | None, strict: bool
    ) -> torch.Tensor:
        file_classes, array = load_class_embeddings(path)
        duplicates = sorted({c for c in file_classes if file_classes.count(c) > 1})
        if duplicates:
            raise ValueError(
                f"Class-embedding file {path} lists classes twice: {duplicates}; keep one row "
                "per class."
            )
        embeddings = torch.from_numpy(array)
        index = {name: i for i, name in enumerate(file_classes)}
        missing = [c for c in class_names if c not in index]
        wanted = set(class_names)
        extra = [c for c in file_classes if c not in wanted]
        if missing or (strict and extra):
            fix = (
                _GLOBAL_FILE_KEY
                if not strict
                else f"the split's class_embeddings or {_GLOBAL_FILE_KEY}"
            )
            raise ValueError(
                f"Class-embedding file {path} does not match dataset {dataset_name!r}: classes "
                f"missing from the file: {missing}; classes in the file but not in the dataset: "
                f"{extra}. Fix {fix}."
            )
        if extra:
            logger.debug("%s: using %d of its %d classes", path, len(class_names), len(index))
        rows = torch.tensor([index[c] for c in class_names], dtype=torch.long)
        return F.normalize(embeddings[rows], dim=-1)

    def _tokenize(self, prompts: list[str]) -> torch.Tensor:
        if self._tokenizer is None:
            self._tokenizer = open_clip.get_tokenizer(self.model_name)
        return self._tokenizer(prompts)

    @torch.no_grad()
    def _encode_names(self, class_names: tuple[str, ...]) -> torch.Tensor:
        """[K, D] template-averaged CLIP text embeddings, float32."""
        model = self.clip_model
        device = next(model.parameters()).device
        names = [clean_class_name(c) for c in class_names]
        prompts = [t.format(n) for n in names for t in self.templates]  # class-major order
        chunks = []
        for start in range(0, len(prompts), self.chunk_size):
            tokens = self._tokenize(prompts[start : start + self.chunk_size]).to(device)
            chunks.append(model.encode_text(tokens, normalize=True).float())
        per_prompt = torch.cat(chunks, dim=0)
        per_class = per_prompt.view(len(names), len(self.templates), -1).mean(dim=1)
        return F.normalize(per_class, dim=-1)
