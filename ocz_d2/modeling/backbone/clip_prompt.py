"""CLIP ViT image tower with deep visual prompts (VPT-deep), as a Detectron2 backbone.

The CLIP model comes from open_clip; its image tower is run layer by layer here so that learnable
tokens can be inserted before every transformer block. Token order inside each block::

    [CLS | patches (gh * gw) | visual prompts (M) | extra tokens (n)]

Visual prompts are replaced at every layer (the previous layer's prompt outputs are dropped).
"Extra tokens" are a generic extension point: the caller decides, per layer, what enters (see
:meth:`CLIPPromptBackbone.forward`), and may pass an additive attention mask over the whole
sequence. :meth:`CLIPPromptBackbone.token_layout` gives the index ranges to build it. The
backbone's own object prompts (:class:`~.object_prompts.ObjectPrompts`) use that hook: given
per-image regions, they become the extra tokens, with the mask that ties each to its region.
"""

from __future__ import annotations

import logging
import math
import os
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.transformer import VisionTransformer
from torch import nn

from ...utils.io import resolve_weights_path
from .object_prompts import ObjectPrompts

__all__ = [
    "CLIPPromptBackbone",
    "TINY_CLIP_MODELS",
    "available_clip_models",
    "create_clip_model",
    "register_tiny_clip_configs",
    "resolve_weights_path",
]

logger = logging.getLogger(__name__)

_CONFIG_DIR = Path(__file__).resolve().parent / "clip_configs"
# Tiny open_clip architectures shipped with ocz_d2 (tests, CPU demos); never pretrained.
TINY_CLIP_MODELS = ("OCZ-Tiny-ViT", "OCZ-Tiny-ViT-P8")
# open_clip model-name schemas that bypass the built-in config list.
_SCHEMA_PREFIXES = ("hf-hub:", "local-dir:")
# Interpolated position embeddings kept per grid size; a few sizes are typical (train crop,
# sliding window, whole-image test sizes), so a small LRU bound keeps memory flat.
_POS_CACHE_SIZE = 16
# open_clip's text-side attributes of a standard CLIP model (CustomTextCLIP keeps them in `text`).
_TEXT_TOWER_ATTRS = (
    "transformer",
    "token_embedding",
    "positional_embedding",
    "ln_final",
    "text_projection",
    "attn_mask",
    "text",
)

ExtraTokens = torch.Tensor | Callable[[int, torch.Tensor | None], torch.Tensor]


def register_tiny_clip_configs() -> None:
    """Register ocz_d2's tiny open_clip configs (``OCZ-Tiny-ViT``, ``OCZ-Tiny-ViT-P8``).

    Idempotent: does nothing when open_clip already lists them.
    """
    if all(name in open_clip.list_models() for name in TINY_CLIP_MODELS):
        return
    missing = [n for n in TINY_CLIP_MODELS if not (_CONFIG_DIR / f"{n}.json").is_file()]
    if missing:
        raise FileNotFoundError(
            f"ocz_d2's tiny CLIP configs {missing} are missing from {_CONFIG_DIR}; the package "
            "was installed without its data files: reinstall it with `pip install -e .`."
        )
    open_clip.add_model_config(_CONFIG_DIR)


def available_clip_models() -> list[str]:
    """Names accepted as ``MODEL.OCZ.CLIP.MODEL_NAME`` (open_clip's and ocz_d2's tiny ones)."""
    register_tiny_clip_configs()
    return list(open_clip.list_models())


def create_clip_model(model_name: str, pretrained: str = "", weights: str = "") -> nn.Module:
    """Build an open_clip CLIP model, with weights from a local file, a pretrained tag, or random.

    Args:
        model_name: open_clip architecture name (``MODEL.OCZ.CLIP.MODEL_NAME``), e.g. "ViT-B-16"
            or "OCZ-Tiny-ViT"; "local-dir:" / "hf-hub:" names are passed through to open_clip.
        pretrained: open_clip pretrained tag (``MODEL.OCZ.CLIP.PRETRAINED``, e.g. "openai");
            downloads once, so only where the machine can reach the hub. "" for none.
        weights: local state-dict file (``MODEL.OCZ.CLIP.WEIGHTS``); wins over ``pretrained``.
            A relative path is looked up in the working directory, then under
            ``$DETECTRON2_DATASETS`` (see :func:`resolve_weights_path`).
            OpenAI-trained weights need the "-quickgelu" variant of the name (e.g.
            "ViT-B-16-quickgelu") because open_clip's plain configs use exact GELU.

    Returns:
        The open_clip model on CPU, in fp32.
    """
    _check_model_name(model_name)
    if weights:
        weights = resolve_weights_path(weights)
        if pretrained:
            logger.info("MODEL.OCZ.CLIP.WEIGHTS is set: ignoring PRETRAINED=%r.", pretrained)
        logger.info("Loading CLIP %s weights from %s", model_name, weights)
        return open_clip.create_model(model_name, pretrained=weights)
    if pretrained:
        return _create_from_tag(model_name, pretrained)
    logger.warning(
        "CLIP %s has random weights (MODEL.OCZ.CLIP.PRETRAINED and WEIGHTS are empty): fine for "
        "tests, meaningless for zero-shot transfer.",
        model_name,
    )
    return open_clip.create_model(model_name, pretrained=None)


def _check_model_name(model_name: str) -> None:
    if model_name.startswith(_SCHEMA_PREFIXES):
        return
    available = available_clip_models()
    if model_name not in available:
        raise ValueError(
            f"Unknown CLIP model MODEL.OCZ.CLIP.MODEL_NAME={model_name!r}. Available: "
            f"{', '.join(available)}."
        )


def _create_from_tag(model_name: str, tag: str) -> nn.Module:
    tags = open_clip.list_pretrained_tags_by_model(model_name)
    if tag not in tags:
        if os.path.isfile(tag):  # open_clip also takes a file here; keep that working
            return open_clip.create_model(model_name, pretrained=tag)
        raise ValueError(
            f"MODEL.OCZ.CLIP.PRETRAINED={tag!r} is not an open_clip tag of {model_name!r} "
            f"(known tags: {tags or 'none'}). For a local weights file use MODEL.OCZ.CLIP.WEIGHTS."
        )
    # open_clip only warns when a QuickGELU-trained tag (e.g. "openai") meets a GELU config;
    # the features would then be silently wrong, so follow the tag.
    quick_gelu = bool(open_clip.get_pretrained_cfg(model_name, tag).get("quick_gelu", False))
    try:
        return open_clip.create_model(model_name, pretrained=tag, force_quick_gelu=quick_gelu)
    except RuntimeError as e:
        raise RuntimeError(
            f"Could not get CLIP weights {model_name}/{tag} (this machine may be offline). "
            "Download them once where the hub is reachable and set MODEL.OCZ.CLIP.WEIGHTS to the "
            f"file. Cause: {e}"
        ) from e


def _check_vision_tower(visual: nn.Module, model_name: str) -> None:
    problems = []
    if not isinstance(visual, VisionTransformer):
        problems.append(f"its image tower is {type(visual).__name__}, not open_clip's ViT")
    else:
        if visual.attn_pool is not None:
            problems.append("it uses attentional pooling")
        if visual.pool_type != "tok":
            problems.append(f"it pools with {visual.pool_type!r} instead of the CLS token")
        if visual.patch_size[0] != visual.patch_size[1]:
            problems.append(f"its patches are not square ({visual.patch_size})")
    if problems:
        raise ValueError(
            f"CLIPPromptBackbone needs a CLIP ViT with a CLS token; {model_name!r} does not fit: "
            f"{'; '.join(problems)}. Choose another MODEL.OCZ.CLIP.MODEL_NAME (e.g. ViT-B-16)."
        )


def _init_prompts(num_layers: int, num_prompts: int, width: int, patch_size: int) -> torch.Tensor:
    # VPT initialises prompts with the Xavier-uniform bound of a layer that maps a 3 x p x p patch
    # to `width` channels, so prompts start at the scale of patch embeddings.
    bound = math.sqrt(6.0 / float(3 * patch_size * patch_size + width))
    return torch.empty(num_layers, num_prompts, width).uniform_(-bound, bound)


@BACKBONE_REGISTRY.register()
class CLIPPromptBackbone(Backbone):
    """Frozen open_clip ViT with learnable deep visual prompts and object prompts.

    The full CLIP model is kept as ``self.clip_model`` (one registration: its image tower is used
    by :meth:`forward`, its text tower by :class:`ocz_d2.modeling.text.TextEmbedder` through
    :meth:`text_encoder`). State-dict keys: ``clip_model.*``, ``visual_prompts`` and
    ``object_prompts.embeddings`` (version 1 checkpoints named the visual prompts ``prompts``;
    they are renamed on load).

    Attributes:
        embed_dim (int): D, CLIP's joint embedding size.
        width (int): ViT width (channels of ``res{i}`` and ``patch``).
        patch_size (int): patch size p = output stride.
        num_layers (int): L, transformer layers.
        num_prompts (int): M, visual prompts per layer.
        num_objects (int): n_o, object prompts (0: none).
        pixel_mean, pixel_std (tuple[float, float, float]): CLIP's normalisation, 0..255 scale.
        visual_prompts (nn.Parameter | None): [L, M, width], None when M = 0.
        object_prompts (ObjectPrompts | None): None when n_o = 0.
    """

    # 2: ``prompts`` renamed ``visual_prompts``; object prompts added.
    _version = 2

    @configurable
    def __init__(
        self,
        *,
        model_name: str = "ViT-B-16",
        pretrained: str = "",
        weights: str = "",
        num_prompts: int = 10,
        num_objects: int = 0,
        out_layers: Sequence[int] = (3, 5, 7, 11),
        frozen: bool = True,
        keep_text_tower: bool = True,
    ):
        """
        Args:
            model_name: open_clip architecture (``MODEL.OCZ.CLIP.MODEL_NAME``).
            pretrained: open_clip pretrained tag or "" (``MODEL.OCZ.CLIP.PRETRAINED``).
            weights: local CLIP state-dict file or "" (``MODEL.OCZ.CLIP.WEIGHTS``); wins over
                ``pretrained``.
            num_prompts: M deep visual prompts per layer; 0 disables them.
            num_objects: n_o object prompts (``MODEL.OCZ.OBJECTS.NUM`` when
                ``MODEL.OCZ.OBJECTS.PROMPTS``); 0 disables them.
            out_layers: 0-based layers whose patch tokens are returned as ``res{i}``.
            frozen: freeze every CLIP parameter and keep CLIP in eval mode.
            keep_text_tower: keep CLIP's text tower (needed to encode class names); drop it to
                save memory when every vocabulary comes from a class-embedding file.
        """
        super().__init__()
        clip_model = create_clip_model(model_name, pretrained, weights)
        _check_vision_tower(clip_model.visual, model_name)
        if not keep_text_tower:
            for attr in _TEXT_TOWER_ATTRS:
                if hasattr(clip_model, attr):
                    delattr(clip_model, attr)
        self.clip_model = clip_model
        self.model_name = model_name
        self._clip_source = {"model_name": model_name, "pretrained": pretrained, "weights": weights}
        self.has_text_tower = keep_text_tower

        visual = clip_model.visual
        self.width = visual.transformer.width
        self.patch_size = visual.patch_size[0]
        self.num_layers = len(visual.transformer.resblocks)
        self.embed_dim = visual.output_dim
        self.pretrained_grid = tuple(visual.grid_size)
        preprocess = getattr(visual, "preprocess_cfg", {})
        mean = preprocess.get("mean", OPENAI_DATASET_MEAN)
        std = preprocess.get("std", OPENAI_DATASET_STD)
        self.pixel_mean = tuple(255.0 * float(v) for v in mean)
        self.pixel_std = tuple(255.0 * float(v) for v in std)

        out_layers = sorted(set(int(i) for i in out_layers))
        bad = [i for i in out_layers if not 0 <= i < self.num_layers]
        if bad:
            raise ValueError(
                f"MODEL.OCZ.CLIP.OUT_LAYERS has {bad}, outside [0, {self.num_layers}) for "
                f"{model_name} ({self.num_layers} layers): fix MODEL.OCZ.CLIP.OUT_LAYERS."
            )
        self.out_layers = out_layers
        if num_prompts < 0:
            raise ValueError(f"MODEL.OCZ.CLIP.NUM_PROMPTS must be >= 0, got {num_prompts}.")
        self.num_prompts = int(num_prompts)
        if self.num_prompts > 0:
            self.visual_prompts = nn.Parameter(
                _init_prompts(self.num_layers, self.num_prompts, self.width, self.patch_size)
            )
        else:
            self.register_parameter("visual_prompts", None)
        if num_objects < 0:
            raise ValueError(f"MODEL.OCZ.OBJECTS.NUM must be >= 0, got {num_objects}.")
        self.num_objects = int(num_objects)
        self.object_prompts = (
            ObjectPrompts(self.num_layers, self.num_objects, self.width, self.patch_size)
            if self.num_objects > 0
            else None
        )

        self.frozen = frozen
        if frozen:
            for p in self.clip_model.parameters():
                p.requires_grad_(False)
            self.clip_model.eval()

        self._out_features = [f"res{i}" for i in out_layers] + ["patch"]
        self._out_feature_channels = {name: self.width for name in self._out_features}
        self._out_feature_strides = {name: self.patch_size for name in self._out_features}
        # Plain attribute, not a buffer: derived data must not enter checkpoints.
        self._pos_cache: OrderedDict[tuple, tuple[int, torch.Tensor]] = OrderedDict()

    @classmethod
    def from_config(cls, cfg, input_shape: ShapeSpec | None = None):
        if input_shape is not None and input_shape.channels not in (None, 3):
            raise ValueError(
                f"CLIPPromptBackbone takes RGB images (3 channels), got {input_shape.channels}: "
                "MODEL.PIXEL_MEAN / PIXEL_STD must have 3 values."
            )
        clip = cfg.MODEL.OCZ.CLIP
        return {
            "model_name": clip.MODEL_NAME,
            "pretrained": clip.PRETRAINED,
            "weights": clip.WEIGHTS,
            "num_prompts": clip.NUM_PROMPTS,
            "num_objects": cfg.MODEL.OCZ.OBJECTS.NUM if cfg.MODEL.OCZ.OBJECTS.PROMPTS else 0,
            "out_layers": tuple(clip.OUT_LAYERS),
            "frozen": clip.FROZEN,
            # A global embeddings file replaces the text encoder for every dataset.
            "keep_text_tower": not cfg.MODEL.OCZ.TEXT.EMBEDDINGS_FILE,
        }

    # ------------------------------------------------------------------ Detectron2 API
    @property
    def size_divisibility(self) -> int:
        return self.patch_size

    @property
    def padding_constraints(self) -> dict[str, int]:
        # Detectron2 >= 0.7 reads this instead of size_divisibility.
        return {"size_divisibility": self.patch_size}

    def output_shape(self) -> dict[str, ShapeSpec]:
        """ShapeSpec of ``res{i}`` and ``patch`` (channels = width, stride = patch size)."""
        return {
            name: ShapeSpec(channels=self.width, stride=self.patch_size)
            for name in self._out_features
        }

    def frozen_weights(self) -> dict | None:
        """What checkpoints may leave out: the frozen CLIP, when it can be rebuilt from its source.

        Returns:
            ``None`` when CLIP trains, or when its weights are random (no pretrained tag, no
            file: nothing could rebuild them, so checkpoints keep them); else ``{"prefix":
            "clip_model.", "source": {model_name, pretrained, weights (file name), text_tower}}``.
        """
        src = self._clip_source
        if not self.frozen or not (src["weights"] or src["pretrained"]):
            return None
        return {
            "prefix": "clip_model.",
            "source": {
                "kind": "open_clip",
                "model_name": src["model_name"],
                "pretrained": "" if src["weights"] else src["pretrained"],
                "weights": os.path.basename(src["weights"]),
                "text_tower": bool(self.has_text_tower),
            },
        }

    def train(self, mode: bool = True):
        """Set train/eval mode; a frozen CLIP always stays in eval mode."""
        super().train(mode)
        if self.frozen:
            self.clip_model.eval()
        return self

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args, **kwargs):
        version = local_metadata.get("version")
        old, new = prefix + "prompts", prefix + "visual_prompts"
        if (version is None or version < 2) and old in state_dict and new not in state_dict:
            state_dict[new] = state_dict.pop(old)
            logger.info("Renamed %s to %s (checkpoint of CLIPPromptBackbone v1).", old, new)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args, **kwargs)

    def _apply(self, fn, *args, **kwargs):
        # .to()/.cuda()/.half() replace parameter storage; drop derived copies with them.
        self._pos_cache.clear()
        return super()._apply(fn, *args, **kwargs)

    def text_encoder(self) -> nn.Module:
        """The open_clip CLIP model whose ``encode_text`` encodes class names.

        Returned by reference (not a copy, not a second registration), so it follows this
        backbone's device and weights.
        """
        if not self.has_text_tower:
            raise RuntimeError(
                "The CLIP text tower was dropped (keep_text_tower=False, set because "
                "MODEL.OCZ.TEXT.EMBEDDINGS_FILE is given): class names can only come from "
                "embedding files. Set MODEL.OCZ.TEXT.EMBEDDINGS_FILE to '' to keep the tower."
            )
        return self.clip_model

    # ------------------------------------------------------------------ geometry helpers
    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        """Patch grid (gh, gw) of an input of ``height`` x ``width`` pixels."""
        p = self.patch_size
        if height % p or width % p:
            raise ValueError(
                f"CLIPPromptBackbone input {height}x{width} is not a multiple of the patch size "
                f"{p}: pad images to a multiple of {p} (backbone.size_divisibility) or set "
                "INPUT.SIZE_DIVISIBILITY / the crop size accordingly."
            )
        return height // p, width // p

    def token_layout(self, grid_hw: tuple[int, int], num_extra: int = 0) -> dict[str, slice]:
        """Index ranges of the token groups in the sequence seen by every block.

        Args:
            grid_hw: patch grid (gh, gw).
            num_extra: n, number of extra tokens passed to :meth:`forward`.

        Returns:
            {"cls", "patch", "prompt", "extra"} -> slice; the sequence length is
            ``layout["extra"].stop`` = 1 + gh * gw + M + n.
        """
        n_patch = grid_hw[0] * grid_hw[1]
        p0 = 1 + n_patch
        e0 = p0 + self.num_prompts
        return {
            "cls": slice(0, 1),
            "patch": slice(1, p0),
            "prompt": slice(p0, e0),
            "extra": slice(e0, e0 + num_extra),
        }

    def position_embedding(self, grid_hw: tuple[int, int]) -> torch.Tensor:
        """CLIP's position embedding for a patch grid, bicubically resized from the trained grid.

        Args:
            grid_hw: target patch grid (gh, gw).

        Returns:
            [1 + gh * gw, width]; CLIP's own tensor when the grid is the trained one.
        """
        pos = self.clip_model.visual.positional_embedding
        grid_hw = (int(grid_hw[0]), int(grid_hw[1]))
        if grid_hw == self.pretrained_grid:
            return pos
        if pos.requires_grad:  # trainable: a cached copy would cut the gradient
            return self._resize_position_embedding(pos, grid_hw)
        key = (grid_hw, pos.device, pos.dtype)
        hit = self._pos_cache.get(key)
        # The version counter changes on in-place updates (load_state_dict), invalidating a hit.
        if hit is not None and hit[0] == pos._version:
            self._pos_cache.move_to_end(key)
            return hit[1]
        with torch.no_grad():
            resized = self._resize_position_embedding(pos, grid_hw)
        self._pos_cache[key] = (pos._version, resized)
        while len(self._pos_cache) > _POS_CACHE_SIZE:
            self._pos_cache.popitem(last=False)
        return resized

    def _resize_position_embedding(
        self, pos: torch.Tensor, grid_hw: tuple[int, int]
    ) -> torch.Tensor:
        gh0, gw0 = self.pretrained_grid
        cls_pos, grid_pos = pos[:1], pos[1:]
        grid_pos = grid_pos.reshape(1, gh0, gw0, -1).permute(0, 3, 1, 2).float()
        grid_pos = F.interpolate(grid_pos, size=grid_hw, mode="bicubic", align_corners=False)
        grid_pos = grid_pos.permute(0, 2, 3, 1).reshape(grid_hw[0] * grid_hw[1], -1)
        return torch.cat([cls_pos, grid_pos.to(pos.dtype)], dim=0)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        x: torch.Tensor,
        regions: torch.Tensor | None = None,
        *,
        extra_tokens: ExtraTokens | None = None,
        attn_mask: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Run the prompted ViT.

        Args:
            x: [B, 3, H, W] images normalised with CLIP's mean/std (``pixel_mean``/``pixel_std``
                on the 0..255 scale); H and W multiples of ``patch_size``.
            regions: int64 [B, gh, gw] region of each patch (in [0, n_o), or -1 for none), for
                the object prompts; required when they exist, refused otherwise. Excludes
                ``extra_tokens`` / ``attn_mask`` (the object prompts use them).
            extra_tokens: optional extra tokens appended after the visual prompts (the hook for
                object prompts). One of
                - [B, n, width]: enter before layer 0, their outputs carried to the next layer;
                - [L, B, n, width]: layer i takes ``extra_tokens[i]`` (replaced every layer);
                - callable ``f(layer: int, previous: Tensor | None) -> [B, n, width]``, called
                  before every layer with the previous layer's outputs of these tokens (None
                  before layer 0): covers carrying, replacing and adding per-layer embeddings.
                n must be the same for every layer.
            attn_mask: optional mask over the sequence of length T = 1 + gh*gw + M + n (order in
                :meth:`token_layout`), applied in every layer: [T, T] or [B, T, T]; float masks
                are added to the attention logits (0 = open, -inf = closed), bool masks block
                where True. Every row needs at least one open key.

        Returns:
            dict with
            - "res{i}" for i in ``out_layers``: [B, width, gh, gw] patch tokens after layer i;
            - "patch": [B, width, gh, gw] final patch tokens after ``ln_post``;
            - "dense": [B, D, gh, gw] patch tokens in CLIP's joint space (``ln_post`` + ``proj``),
              L2-normalised over D;
            - "cls": [B, D] CLIP image embedding, L2-normalised;
            - "extra": [B, n, width] final extra-token states after ``ln_post`` (only when
              ``extra_tokens`` is given);
            - "objects": [B, n_o, width] object features OF, the object prompts' final states
              after ``ln_post`` (only with object prompts);
            - "last_input": [B, T, width] the token sequence entering the last block (CLS,
              patches, visual prompts, extra tokens), for :meth:`region_embeddings`.
        """
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(
                f"CLIPPromptBackbone expects [B, 3, H, W] images, got {tuple(x.shape)}"
            )
        batch = x.shape[0]
        grid_hw = self.grid_size(x.shape[2], x.shape[3])
        if self.object_prompts is not None:
            if regions is None:
                raise ValueError(
                    "CLIPPromptBackbone has object prompts (MODEL.OCZ.OBJECTS.NUM > 0): pass the "
                    "regions of each image (the meta-architecture gets them from the guide)"
                )
            if extra_tokens is not None or attn_mask is not None:
                raise ValueError("extra_tokens/attn_mask cannot be combined with object prompts")
            if tuple(regions.shape) != (batch, *grid_hw):
                raise ValueError(
                    f"regions must be [B, gh, gw] = {(batch, *grid_hw)}, got {tuple(regions.shape)}"
                )
            extra_tokens = self.object_prompts.tokens(batch)
            layout = self.token_layout(grid_hw, self.num_objects)
            attn_mask = self.object_prompts.attention_mask(regions.to(x.device), layout)
        elif regions is not None:
            raise ValueError(
                "regions were given but the backbone has no object prompts (MODEL.OCZ.OBJECTS.NUM "
                "is 0 or MODEL.OCZ.OBJECTS.PROMPTS is False)"
            )
        visual = self.clip_model.visual
        tokens = self._embed(x, grid_hw)
        n_base = tokens.shape[1]
        next_extra = self._extra_token_source(extra_tokens)
        mask = None

        outputs: dict[str, torch.Tensor] = {}
        extra_state: torch.Tensor | None = None
        last = len(visual.transformer.resblocks) - 1
        for i, block in enumerate(visual.transformer.resblocks):
            parts = [tokens]
            if self.visual_prompts is not None:
                parts.append(
                    self.visual_prompts[i].to(tokens.dtype).unsqueeze(0).expand(batch, -1, -1)
                )
            if next_extra is not None:
                parts.append(self._check_extra(next_extra(i, extra_state), batch, i, extra_state))
            seq = torch.cat(parts, dim=1) if len(parts) > 1 else tokens
            if i == last:
                outputs["last_input"] = seq
            if attn_mask is not None and mask is None:
                heads = _num_heads(block)
                mask = _prepare_attn_mask(attn_mask, batch, heads, seq.shape[1], seq.dtype)
            seq = block(seq, attn_mask=mask)
            tokens = seq[:, :n_base]
            if next_extra is not None:
                extra_state = seq[:, n_base + self.num_prompts :]
            if i in self.out_layers:
                outputs[f"res{i}"] = self._to_map(tokens[:, 1:], grid_hw)

        tokens = visual.ln_post(tokens)
        outputs["patch"] = self._to_map(tokens[:, 1:], grid_hw)
        projected = tokens @ visual.proj  # [B, 1 + gh*gw, D]
        outputs["dense"] = self._to_map(F.normalize(projected[:, 1:], dim=-1), grid_hw)
        outputs["cls"] = F.normalize(projected[:, 0], dim=-1)
        if extra_state is not None:
            key = "objects" if self.object_prompts is not None else "extra"
            outputs[key] = visual.ln_post(extra_state)
        return outputs

    def region_embeddings(
        self, last_input: torch.Tensor, masks: torch.Tensor, *, prompted: bool = True
    ) -> torch.Tensor:
        """CLIP image embeddings of image regions: the last block run for the CLS token alone,
        with its attention restricted to each region's patches.

        In the region pass the CLS token sees itself, the visual prompts and the patches of the
        region (in the full pass it sees itself, the visual prompts and every patch; never the
        extra tokens), so a region covering the whole image gives exactly the ``"cls"`` output.

        Args:
            last_input: [B, T, width], ``forward(...)["last_input"]``, or with ``prompted``
                False ``plain_forward(...)["last_input"]`` (CLS and patches only).
            masks: bool [B, R, gh, gw], the patches of each of R regions per image (an empty
                region sees only the CLS token and the prompts).
            prompted: whether ``last_input`` holds the visual prompts (and extra tokens).

        Returns:
            [B, R, D] L2-normalised embeddings in CLIP's joint space.
        """
        visual = self.clip_model.visual
        block = visual.transformer.resblocks[-1]
        if not isinstance(getattr(block, "attn", None), nn.MultiheadAttention):
            raise TypeError(
                "region_embeddings needs open_clip's ResidualAttentionBlock (nn.MultiheadAttention"
                f" in block.attn); this CLIP's last block is {type(block).__name__}"
            )
        b, r = masks.shape[:2]
        grid_hw = tuple(masks.shape[-2:])
        n_patch = grid_hw[0] * grid_hw[1]
        num_prompts = self.num_prompts if prompted else 0
        num_extra = last_input.shape[1] - 1 - n_patch - num_prompts
        if last_input.shape[0] != b or num_extra < 0 or (num_extra and not prompted):
            raise ValueError(
                f"region masks {tuple(masks.shape)} do not fit the token sequence "
                f"{tuple(last_input.shape)} (CLS + gh*gw patches + {num_prompts} prompts + "
                "extra tokens)"
            )
        layout = self.token_layout(grid_hw, num_extra)
        if not prompted:
            layout["prompt"] = slice(0, 0)
        closed = torch.ones(b, r, last_input.shape[1], dtype=torch.bool, device=masks.device)
        closed[..., layout["cls"]] = False
        closed[..., layout["prompt"]] = False
        closed[..., layout["patch"]] = ~masks.reshape(b, r, n_patch)
        heads = _num_heads(block)
        bias = torch.zeros(closed.shape, dtype=last_input.dtype, device=last_input.device)
        bias = bias.masked_fill(closed.to(last_input.device), float("-inf"))
        bias = bias.repeat_interleave(heads, dim=0)  # [B * heads, R, T]
        cls = last_input[:, :1].expand(-1, r, -1)  # one CLS query per region
        kv = block.ln_1(last_input)
        attended = block.attn(block.ln_1(cls), kv, kv, need_weights=False, attn_mask=bias)[0]
        x = cls + block.ls_1(attended)
        x = x + block.ls_2(block.mlp(block.ln_2(x)))
        return F.normalize(visual.ln_post(x) @ visual.proj, dim=-1)

    @torch.no_grad()
    def plain_forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """CLIP alone: the frozen image tower without visual or object prompts.

        Its outputs do not change during training (CLIP is frozen), so they give fixed targets:
        the "clip" guide clusters its "patch" features (OC-ZSS's ablation of the SSL model), and
        split matching may take its pseudo-masks and region embeddings from it
        (``MODEL.OCZ.SPLIT.TARGET_FEATURES`` "plain").

        Args:
            x: [B, 3, H, W] normalised images (as for :meth:`forward`).

        Returns:
            "patch" [B, width, gh, gw] (after ``ln_post``), "dense" [B, D, gh, gw] and "cls"
            [B, D] (L2-normalised, joint space) and "last_input" [B, 1 + gh*gw, width] (CLS and
            patches entering the last block; :meth:`region_embeddings` with ``prompted=False``).
        """
        grid_hw = self.grid_size(x.shape[2], x.shape[3])
        visual = self.clip_model.visual
        tokens = self._embed(x, grid_hw)
        blocks = visual.transformer.resblocks
        outputs = {}
        for i, block in enumerate(blocks):
            if i == len(blocks) - 1:
                outputs["last_input"] = tokens
            tokens = block(tokens)
        tokens = visual.ln_post(tokens)
        projected = tokens @ visual.proj
        outputs["patch"] = self._to_map(tokens[:, 1:], grid_hw)
        outputs["dense"] = self._to_map(F.normalize(projected[:, 1:], dim=-1), grid_hw)
        outputs["cls"] = F.normalize(projected[:, 0], dim=-1)
        return outputs

    def _embed(self, x: torch.Tensor, grid_hw: tuple[int, int]) -> torch.Tensor:
        """Patch embedding + CLS + position embedding + ln_pre: [B, 1 + gh*gw, width]."""
        visual = self.clip_model.visual
        # Patch dropout is skipped on purpose: it drops grid positions the dense outputs need.
        x = visual.conv1(x.to(visual.conv1.weight.dtype))
        patches = x.flatten(2).transpose(1, 2)
        cls = visual.class_embedding.to(patches.dtype).view(1, 1, -1)
        tokens = torch.cat([cls.expand(patches.shape[0], -1, -1), patches], dim=1)
        tokens = tokens + self.position_embedding(grid_hw).to(tokens.dtype)
        return visual.ln_pre(tokens)

    def _extra_token_source(
        self, extra_tokens: ExtraTokens | None
    ) -> Callable[[int, torch.Tensor | None], torch.Tensor] | None:
        if extra_tokens is None or callable(extra_tokens):
            return extra_tokens
        if extra_tokens.dim() == 3:
            return lambda layer, prev: extra_tokens if prev is None else prev
        if extra_tokens.dim() == 4 and extra_tokens.shape[0] == self.num_layers:
            return lambda layer, prev: extra_tokens[layer]
        raise ValueError(
            "extra_tokens must be [B, n, width], [L, B, n, width] with L = "
            f"{self.num_layers}, or a callable; got shape {tuple(extra_tokens.shape)}"
        )

    def _check_extra(
        self, extra: torch.Tensor, batch: int, layer: int, previous: torch.Tensor | None
    ) -> torch.Tensor:
        expected_n = previous.shape[1] if previous is not None else extra.shape[1]
        if extra.dim() != 3 or extra.shape[0] != batch or extra.shape[2] != self.width:
            raise ValueError(
                f"extra tokens of layer {layer} must be [B={batch}, n, width={self.width}], "
                f"got {tuple(extra.shape)}"
            )
        if extra.shape[1] != expected_n:
            raise ValueError(
                f"extra tokens changed count at layer {layer}: {expected_n} -> {extra.shape[1]}"
            )
        return extra

    @staticmethod
    def _to_map(tokens: torch.Tensor, grid_hw: tuple[int, int]) -> torch.Tensor:
        """[B, gh*gw, C] -> [B, C, gh, gw]."""
        b, _, c = tokens.shape
        return tokens.transpose(1, 2).reshape(b, c, grid_hw[0], grid_hw[1])


def _num_heads(block: nn.Module) -> int:
    # nn.MultiheadAttention (default block) and open_clip's Attention (custom block) both expose it.
    return int(block.attn.num_heads)


def _prepare_attn_mask(
    attn_mask: torch.Tensor, batch: int, heads: int, length: int, dtype: torch.dtype
) -> torch.Tensor:
    """Validate a mask and shape it for open_clip's blocks: [T, T] or [B * heads, T, T] additive.

    open_clip's default block casts masks to the activation dtype, which would turn a bool mask
    into a 0/1 bias, so bool masks become -inf/0 here.
    """
    if attn_mask.shape[-2:] != (length, length) or attn_mask.dim() not in (2, 3):
        raise ValueError(
            f"attn_mask must be [T, T] or [B, T, T] with T = {length} (CLS + patches + prompts + "
            f"extra tokens, see token_layout), got {tuple(attn_mask.shape)}"
        )
    if attn_mask.dim() == 3 and attn_mask.shape[0] != batch:
        raise ValueError(f"attn_mask batch {attn_mask.shape[0]} != image batch {batch}")
    if attn_mask.dtype == torch.bool:
        closed = attn_mask
        attn_mask = torch.zeros(attn_mask.shape, dtype=dtype, device=attn_mask.device)
        attn_mask.masked_fill_(closed, float("-inf"))
    else:
        attn_mask = attn_mask.to(dtype)
    # A row with every key closed makes softmax NaN, which would spread through all tokens.
    if torch.isneginf(attn_mask).all(dim=-1).any():
        raise ValueError("attn_mask closes every key for some query token; open at least one.")
    if attn_mask.dim() == 3:
        # Batch-major [B * heads, T, T], the layout nn.MultiheadAttention expects.
        attn_mask = attn_mask.repeat_interleave(heads, dim=0)
    return attn_mask
