"""DINO self-distillation of the miniature's tiny ViT on its images (never its masks or captions).

A random ViT is not DINO, and a frozen CLIP tower is not self-supervised: this module gives the
miniature the self-supervised tower that SimZSS (and OC-ZSS's guide) assume. Written from the DINO
paper (Caron et al., 2021):

- a student and a teacher with the same architecture (``vit_ocz_tiny_patch16`` by default), each
  with a projection head (3-layer MLP to a bottleneck, L2-normalised, then cosine against
  ``out_dim`` normalised prototypes); the teacher is an EMA of the student (momentum from
  ``momentum`` to 1 on a cosine schedule) and gets no gradient;
- multi-crop: per image two global crops (``global_scale`` of the area, resized to
  ``global_size``) that the teacher sees, and ``num_local`` local crops (``local_scale``,
  ``local_size``) that only the student sees; random horizontal and vertical flips. No colour
  augmentation: hue is half of a class here;
- the loss: cross-entropy between the teacher's centred and sharpened distribution
  softmax((t - c) / teacher_temp) and the student's softmax(s / student_temp), over every pair of
  different views; the centre c is an EMA (``center_momentum``) of the teacher's batch means;
- AdamW with a linear warmup and a cosine decay.

Deterministic given the seed (batch ``s``'s images and crops come from a generator seeded by
``(seed, s)``) and resumable (the whole state is written atomically every ``checkpoint_period``
steps). The output is the teacher's backbone as a timm state dict, which
``MODEL.SIMZSS.VISION.WEIGHTS`` and ``MODEL.OCZ.GUIDE.WEIGHTS`` load.
:func:`knn_accuracy` is the quality check on the labelled close-ups.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import roi_align
from tqdm import tqdm

from ..data.caption_csv import read_caption_csv
from ..modeling.backbone.tiny_vit import TINY_SSL_VIT
from ..modeling.backbone.vision_tower import ClipVisionTower, TimmVisionTower
from ..utils.io import atomic_write_bytes, atomic_write_json, file_sha256
from .clip_pretrain import (
    SYNTHETIC_CLIP_FILE,
    _read_state,
    decode_images,
    default_cache_dir,
    load_labelled_images,
    save_atomic,
)
from .synthetic import ensure_pretraining_set, generator_marker, pretraining_set_record

__all__ = [
    "SYNTHETIC_DINO_PRETRAIN",
    "SYNTHETIC_SSL_FILE",
    "DinoConfig",
    "attribute_knn",
    "DinoHead",
    "compare_towers",
    "dino_loss",
    "ensure_synthetic_ssl_vit",
    "knn_accuracy",
    "pretrain_dino",
]

logger = logging.getLogger(__name__)

DINO_VERSION = 1
_STATE_FILE = "dino_state.pt"
_MANIFEST = "manifest.json"
#: File name of the SSL tiny ViT inside the synthetic benchmark's folder.
SYNTHETIC_SSL_FILE = "tiny_ssl_vit.pt"


@dataclass(frozen=True)
class DinoConfig:
    """Settings of :func:`pretrain_dino` (all of them enter the cache key)."""

    model_name: str = TINY_SSL_VIT
    steps: int = 1000
    batch_size: int = 32
    lr: float = 5e-4
    weight_decay: float = 0.04
    warmup_steps: int = 50
    out_dim: int = 1024
    hidden_dim: int = 256
    bottleneck_dim: int = 64
    student_temp: float = 0.1
    teacher_temp: float = 0.04
    center_momentum: float = 0.9
    momentum: float = 0.996
    global_size: int = 96
    local_size: int = 48
    num_local: int = 4
    global_scale: tuple[float, float] = (0.35, 1.0)
    local_scale: tuple[float, float] = (0.1, 0.35)
    seed: int = 0
    checkpoint_period: int = 100

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 2:
            raise ValueError(
                f"need steps >= 1 and batch_size >= 2, got {self.steps}, {self.batch_size}"
            )
        for name in ("global_scale", "local_scale"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi <= 1:
                raise ValueError(f"{name} must satisfy 0 < min <= max <= 1, got {(lo, hi)}")


class DinoHead(nn.Module):
    """DINO's projection head: MLP -> L2-normalised bottleneck -> cosine with the prototypes."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int, bottleneck_dim: int):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, bottleneck_dim),
        )
        self.prototypes = nn.Parameter(torch.randn(out_dim, bottleneck_dim) * 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[N, in_dim] -> [N, out_dim] cosines with the prototypes."""
        return F.normalize(self.mlp(x), dim=-1) @ F.normalize(self.prototypes, dim=-1).t()


def dino_loss(
    student: list[torch.Tensor],
    teacher: list[torch.Tensor],
    center: torch.Tensor,
    student_temp: float,
    teacher_temp: float,
) -> torch.Tensor:
    """DINO's loss over every (teacher view, different student view) pair.

    Args:
        student: per view, [B, K] student outputs (the global views first, in the teacher's order).
        teacher: per global view, [B, K] teacher outputs (no gradient).
        center: [K] the centre subtracted from the teacher outputs.

    Returns:
        Scalar: mean over pairs of the mean over images of
        ``-sum_k softmax((t - c) / teacher_temp)_k * log_softmax(s / student_temp)_k``.
    """
    targets = [((t - center) / teacher_temp).softmax(dim=-1).detach() for t in teacher]
    logs = [(s / student_temp).log_softmax(dim=-1) for s in student]
    total, pairs = 0.0, 0
    for i, target in enumerate(targets):
        for j, log_p in enumerate(logs):
            if i == j:
                continue
            total = total + (-(target * log_p).sum(dim=-1)).mean()
            pairs += 1
    return total / pairs


def _crops(images: torch.Tensor, gen: torch.Generator, count: int, scale, size: int):
    """``count`` random resized crops of each image (square, area fraction in ``scale``, random
    flips), bilinear; float [count * N, 3, size, size] in 0..255, view-major."""
    n, _, h, w = images.shape
    k = count * n
    area = torch.empty(k).uniform_(scale[0], scale[1], generator=gen)
    side = torch.sqrt(area) * min(h, w)
    x0 = torch.rand(k, generator=gen) * (w - side)
    y0 = torch.rand(k, generator=gen) * (h - side)
    boxes = torch.stack([torch.arange(n).repeat(count).float(), x0, y0, x0 + side, y0 + side], 1)
    out = roi_align(images.float(), boxes, (size, size), spatial_scale=1.0, aligned=True)
    hflip = torch.rand(k, generator=gen) < 0.5
    vflip = torch.rand(k, generator=gen) < 0.5
    out = torch.where(hflip[:, None, None, None], out.flip(-1), out)
    return torch.where(vflip[:, None, None, None], out.flip(-2), out)


class _Normalize(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        cfg = model.pretrained_cfg or {}
        mean = cfg.get("mean", (0.485, 0.456, 0.406))
        std = cfg.get("std", (0.229, 0.224, 0.225))
        self.register_buffer("mean", 255.0 * torch.tensor(mean).view(1, 3, 1, 1), False)
        self.register_buffer("std", 255.0 * torch.tensor(std).view(1, 3, 1, 1), False)

    def forward(self, x):
        return (x - self.mean) / self.std


def _build(cfg: DinoConfig) -> tuple[nn.Module, DinoHead]:
    backbone = timm.create_model(
        cfg.model_name, pretrained=False, num_classes=0, dynamic_img_size=True
    )
    head = DinoHead(backbone.num_features, cfg.out_dim, cfg.hidden_dim, cfg.bottleneck_dim)
    return backbone, head


def _schedule(step: int, cfg: DinoConfig) -> tuple[float, float]:
    """(learning rate, teacher momentum) at ``step``."""
    if step < cfg.warmup_steps:
        lr = cfg.lr * (step + 1) / cfg.warmup_steps
    else:
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        lr = 0.5 * cfg.lr * (1 + math.cos(math.pi * progress))
    momentum = 1 - (1 - cfg.momentum) * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
    return lr, momentum


def pretrain_dino(
    images: torch.Tensor,
    cfg: DinoConfig,
    work_dir: str | os.PathLike,
    *,
    resume: bool = True,
    progress: bool = True,
) -> nn.Module:
    """DINO self-distillation of ``cfg.model_name`` on ``images`` (module docstring).

    Args:
        images: uint8 [N, 3, S, S].
        cfg: the settings.
        work_dir: folder of the resumable state (``dino_state.pt``).
        resume: continue from the state in ``work_dir`` when there is one.
        progress: show a progress bar.

    Returns:
        The teacher's backbone (timm model, eval mode, CPU).
    """
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    state_path = work_dir / _STATE_FILE
    state = _read_state(state_path) if resume else None
    if state is not None and state.get("config") != json.loads(json.dumps(asdict(cfg))):
        raise ValueError(
            f"{state_path} was written with other settings ({state.get('config')}); delete it or "
            "resume with the same settings."
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        backbone, head = _build(cfg)
    student = nn.ModuleDict({"backbone": backbone, "head": head})
    teacher = copy.deepcopy(student)
    for p in teacher.parameters():
        p.requires_grad_(False)
    normalize = _Normalize(backbone)
    decay = [p for n, p in student.named_parameters() if p.ndim >= 2 and "embed" not in n]
    rest = [p for n, p in student.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": rest, "weight_decay": 0.0},
        ],
        lr=cfg.lr,
    )
    center = torch.zeros(cfg.out_dim)
    start = 0
    if state is not None:
        student.load_state_dict(state["student"])
        teacher.load_state_dict(state["teacher"])
        optimizer.load_state_dict(state["optimizer"])
        center = state["center"]
        start = int(state["step"])
        logger.info("Resuming DINO pretraining from step %d (%s).", start, state_path)
    student.train()
    teacher.eval()
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, disable=not progress)
    bar.set_description("DINO pretraining")
    for step in bar:
        lr, momentum = _schedule(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        batch = images[torch.randint(len(images), (cfg.batch_size,), generator=gen)]
        glob = normalize(_crops(batch, gen, 2, cfg.global_scale, cfg.global_size))
        local = normalize(_crops(batch, gen, cfg.num_local, cfg.local_scale, cfg.local_size))
        torch.manual_seed(cfg.seed * 1_000_003 + step)  # any dropout: the same after a resume
        with torch.no_grad():
            t_out = teacher["head"](teacher["backbone"](glob)).chunk(2)
        s_out = list(student["head"](student["backbone"](glob)).chunk(2))
        if cfg.num_local:
            s_out += list(student["head"](student["backbone"](local)).chunk(cfg.num_local))
        loss = dino_loss(s_out, list(t_out), center, cfg.student_temp, cfg.teacher_temp)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            for ps, pt in zip(student.parameters(), teacher.parameters()):
                pt.mul_(momentum).add_(ps.detach(), alpha=1 - momentum)
            batch_center = torch.cat(t_out).mean(dim=0)
            center = center * cfg.center_momentum + batch_center * (1 - cfg.center_momentum)
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        done = step + 1
        if done % cfg.checkpoint_period == 0 or done == cfg.steps:
            save_atomic(
                {
                    "student": student.state_dict(),
                    "teacher": teacher.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "center": center,
                    "step": done,
                    "config": json.loads(json.dumps(asdict(cfg))),
                },
                state_path,
            )
    return teacher["backbone"].eval()


@torch.no_grad()
def knn_accuracy(features: torch.Tensor, labels: Sequence[str], k: int = 10) -> float:
    """Leave-one-out k-NN accuracy (%) of L2-normalised features, votes weighted by
    exp(cos / 0.07) (DINO's k-NN evaluation)."""
    feats = F.normalize(features.float(), dim=-1)
    names = sorted(set(labels))
    y = torch.tensor([names.index(label) for label in labels])
    sims = feats @ feats.t()
    sims.fill_diagonal_(-math.inf)
    top, idx = sims.topk(min(k, len(y) - 1), dim=1)
    votes = torch.zeros(len(y), len(names)).scatter_add_(1, y[idx], (top / 0.07).exp())
    return float(100 * (votes.argmax(1) == y).float().mean())


def attribute_knn(features: torch.Tensor, labels: Sequence[str], k: int = 10) -> dict:
    """:func:`knn_accuracy` (%) for the class and, when every class name has two words (the
    miniature's "<hue> <texture>"), for each attribute alone: ``{"class", "hue", "texture"}``.
    Chance is 1 / (number of values): 25% for each of the miniature's attributes."""
    out = {"class": knn_accuracy(features, labels, k)}
    words = [label.split() for label in labels]
    if all(len(w) == 2 for w in words):
        out["hue"] = knn_accuracy(features, [w[0] for w in words], k)
        out["texture"] = knn_accuracy(features, [w[1] for w in words], k)
    return out


def _cache_key(cfg: DinoConfig, data: dict) -> str:
    """Hash of the settings, what determines the images (``data``: the synthetic generator's
    record) and the versions of this module, torch and timm."""
    payload = {
        "config": json.loads(json.dumps(asdict(cfg))),
        "data": data,
        "version": DINO_VERSION,
        "torch": torch.__version__.split("+")[0],
        "timm": timm.__version__,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


#: DINO settings of the synthetic benchmark's SSL tiny ViT.
SYNTHETIC_DINO_PRETRAIN = DinoConfig()


def ensure_synthetic_ssl_vit(
    benchmark,
    cfg: DinoConfig = SYNTHETIC_DINO_PRETRAIN,
    cache_dir: str | os.PathLike | None = None,
    *,
    progress: bool = True,
) -> tuple[Path, dict]:
    """The synthetic benchmark's SSL tiny ViT: cached DINO pretraining on its images (the
    pretraining close-ups and the segmentation train split's scenes), copied to
    ``<benchmark root>/tiny_ssl_vit.pt``.

    Returns:
        (the cached weights file, its manifest with the k-NN accuracy of the random ViT, the
        tiny CLIP's image tower and this ViT on the labelled close-ups).
    """
    root = Path(benchmark.root)
    cache_root = Path(cache_dir) if cache_dir is not None else default_cache_dir() / "tiny_ssl_vit"
    # The images are a function of the pretraining set's record: keyed by it, the set is
    # rendered only when the weights are not cached.
    key = _cache_key(cfg, {"pretraining_set": pretraining_set_record(root)})
    folder = cache_root / key
    weights = folder / "weights.pt"
    try:
        record = json.loads((folder / _MANIFEST).read_text(encoding="utf-8"))
        valid = record["key"] == key and record["sha256"] == file_sha256(weights)
    except (OSError, ValueError, KeyError):
        valid = False
    if not valid:
        csvs = [ensure_pretraining_set(root), Path(benchmark.captions("train"))]
        # The segmentation split's caption CSV lists paths from the benchmark's folder.
        files = read_caption_csv(csvs[0])[0] + read_caption_csv(csvs[1], image_root=root)[0]
        size = images_size(root)
        images = decode_images(files, size, "images")
        model = pretrain_dino(images, cfg, folder, progress=progress)
        save_atomic(model.state_dict(), weights)
        record = {
            "key": key,
            "config": json.loads(json.dumps(asdict(cfg))),
            "sha256": file_sha256(weights),
        }
        atomic_write_json(folder / _MANIFEST, record, indent=2)
    target = root / SYNTHETIC_SSL_FILE
    if not target.is_file() or file_sha256(target) != record["sha256"]:
        atomic_write_bytes(target, weights.read_bytes())
    return weights, record


@torch.no_grad()
def compare_towers(benchmark, ssl_weights: str | os.PathLike, seed: int = 0) -> dict:
    """k-NN accuracy (%) on the benchmark's labelled close-ups of three frozen towers: a random
    ``vit_ocz_tiny_patch16`` (seed ``seed``), the tiny CLIP's image tower and the SSL tiny ViT;
    for each, from the CLS token (``"cls"``) and from the mean of the normalised patch features
    (``"patch_mean"``), each as :func:`attribute_knn` (the class, the hue, the texture).
    """
    root = Path(benchmark.root)
    images, labels = load_labelled_images(benchmark.zeroshot_labels, images_size(root))
    towers = {
        "random_vit": TimmVisionTower(TINY_SSL_VIT, pretrained=False, seed=seed),
        "tiny_clip": ClipVisionTower("OCZ-Tiny-ViT", weights=str(root / SYNTHETIC_CLIP_FILE)),
        "ssl_vit": TimmVisionTower(TINY_SSL_VIT, pretrained=False, weights=str(ssl_weights)),
    }
    out = {}
    for name, tower in towers.items():
        cls, patches = [], []
        for start in range(0, len(images), 100):
            c, p = tower(images[start : start + 100].float())
            cls.append(c)
            patches.append(F.normalize(p, dim=1).mean(dim=(2, 3)))
        out[name] = {
            "cls": attribute_knn(torch.cat(cls), labels),
            "patch_mean": attribute_knn(torch.cat(patches), labels),
        }
    return out


def images_size(root: Path) -> int:
    """The benchmark's image side (its generation record)."""
    return int(generator_marker(root).get("image_size", 128))
