"""The installed Detectron2 and our trainer really work here: train, checkpoint, resume, evaluate.

A 1x1-conv per-pixel classifier registered as a meta-architecture under a test-only name is
trained by the ``Trainer`` of ``tools/train_net.py`` (ocz_d2's mapper, optimizer, evaluator on
:class:`ocz_d2.engine.ZeroShotTrainerBase`) on a few random images, checkpointed by the trainer's
``PeriodicCheckpointer``, resumed by a second trainer, and evaluated by
``ZeroShotSemSegEvaluator`` through ``inference_on_dataset``. No mocks.
"""

import copy
import math
import uuid

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import configurable, get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog, build_detection_test_loader
from detectron2.evaluation import inference_on_dataset
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.structures import ImageList
from detectron2.utils.env import seed_all_rng
from PIL import Image
from torch import nn

from ocz_d2.config import add_ocz_config
from ocz_d2.data import ZeroShotSemSegDatasetMapper, ignore_label_of
from ocz_d2.engine import ZeroShotTrainerBase
from ocz_d2.evaluation import METRICS_FILE_NAME, ZeroShotSemSegEvaluator
from ocz_d2.utils.errors import CheckpointError
from tools import train_net

Trainer = train_net.Trainer

ARCH_NAME = "OczTestPixelClassifier"
CLASSES = ["red", "green", "blue"]
SEEN, UNSEEN = [0, 1], [2]
IGNORE = 254  # not the default: the mapper and the model must read it from the metadata


class OczTestPixelClassifier(nn.Module):
    """Per-pixel linear classifier (one 1x1 convolution); test-only meta-architecture."""

    @configurable
    def __init__(self, *, num_classes: int, pixel_mean, pixel_std):
        super().__init__()
        self.classifier = nn.Conv2d(3, num_classes, kernel_size=1)
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)

    @classmethod
    def from_config(cls, cfg):
        return {
            "num_classes": cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
        }

    @property
    def device(self):
        return self.pixel_mean.device

    def forward(self, batched_inputs):
        """Training: ``{"loss_sem_seg": loss}``; inference: ``[{"sem_seg": [K, H, W]}]`` at the
        original size."""
        images = [
            (x["image"].to(self.device) - self.pixel_mean) / self.pixel_std for x in batched_inputs
        ]
        images = ImageList.from_tensors(images, 0)
        logits = self.classifier(images.tensor)
        if self.training:
            ignore = ignore_label_of(batched_inputs[0]["dataset_name"])
            targets = [x["sem_seg"].to(self.device) for x in batched_inputs]
            targets = ImageList.from_tensors(targets, 0, pad_value=ignore).tensor
            loss = F.cross_entropy(logits, targets, ignore_index=ignore)
            return {"loss_sem_seg": loss}
        results = []
        for logit, x, (h, w) in zip(logits, batched_inputs, images.image_sizes):
            size = (x.get("height", h), x.get("width", w))
            out = F.interpolate(logit[None, :, :h, :w], size=size, mode="bilinear")
            results.append({"sem_seg": out[0]})
        return results


if ARCH_NAME not in META_ARCH_REGISTRY:
    META_ARCH_REGISTRY.register(OczTestPixelClassifier)


@pytest.fixture
def dataset(tmp_path):
    """Six random images; the label of a pixel is its brightest channel (learnable by a 1x1
    convolution), with some ignore pixels."""
    name = f"ocz_test_stack_{uuid.uuid4().hex[:8]}"
    image_root, sem_seg_root = tmp_path / "images", tmp_path / "labels"
    image_root.mkdir()
    sem_seg_root.mkdir()
    rng = np.random.default_rng(0)
    records = []
    for i, (h, w) in enumerate([(24, 32), (20, 28)] * 3):
        image = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        label = image.argmax(axis=2).astype(np.uint8)
        label[rng.random((h, w)) < 0.1] = IGNORE
        Image.fromarray(image).save(image_root / f"{i}.png")
        Image.fromarray(label).save(sem_seg_root / f"{i}.png")
        records.append(
            {
                "file_name": str(image_root / f"{i}.png"),
                "sem_seg_file_name": str(sem_seg_root / f"{i}.png"),
                "height": h,
                "width": w,
                "image_id": i,
                "dataset_name": name,
            }
        )
    DatasetCatalog.register(name, lambda: copy.deepcopy(records))
    MetadataCatalog.get(name).set(
        stuff_classes=CLASSES,
        seen_classes=SEEN,
        unseen_classes=UNSEEN,
        ignore_label=IGNORE,
        evaluator_type="ocz_zero_shot_sem_seg",
        image_root=str(image_root),
        sem_seg_root=str(sem_seg_root),
        class_embeddings=None,
        split_file=None,
    )
    yield name
    DatasetCatalog.remove(name)
    MetadataCatalog.remove(name)


def _cfg(dataset_name, output_dir, max_iter):
    cfg = get_cfg()
    add_ocz_config(cfg)
    cfg.MODEL.META_ARCHITECTURE = ARCH_NAME
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.PIXEL_MEAN = [127.5, 127.5, 127.5]
    cfg.MODEL.PIXEL_STD = [64.0, 64.0, 64.0]
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = len(CLASSES)
    cfg.INPUT.FORMAT = "RGB"
    # No random augmentation: sizes kept (the larger image fits the target), no crop, no flip.
    cfg.INPUT.RESIZE_SCALE = (1.0, 1.0)
    cfg.INPUT.RESIZE_TARGET = (24, 32)
    cfg.INPUT.CROP.ENABLED = False
    cfg.INPUT.FLIP_PROB = 0.0
    cfg.INPUT.COLOR_AUG = False
    cfg.INPUT.MIN_SIZE_TEST = 0
    cfg.DATASETS.TRAIN = (dataset_name,)
    cfg.DATASETS.TEST = (dataset_name,)
    cfg.DATALOADER.NUM_WORKERS = 0
    cfg.SOLVER.IMS_PER_BATCH = 2
    cfg.SOLVER.OPTIMIZER = "SGD"
    cfg.SOLVER.BASE_LR = 0.5
    cfg.SOLVER.HEAD_MULTIPLIER = 1.0
    cfg.SOLVER.WEIGHT_DECAY = 0.0
    cfg.SOLVER.STEPS = ()
    cfg.SOLVER.WARMUP_ITERS = 0
    cfg.SOLVER.MAX_ITER = max_iter
    cfg.SOLVER.CHECKPOINT_PERIOD = 2
    cfg.TEST.EVAL_PERIOD = 0  # evaluate once, after the last iteration
    cfg.OUTPUT_DIR = str(output_dir)
    cfg.SEED = 0
    return cfg


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _params(trainer):
    """The optimizer's parameters, in their order."""
    return [p for group in trainer.optimizer.param_groups for p in group["params"]]


def _assert_same_state(a, b):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def test_train_checkpoint_resume_evaluate(dataset, tmp_path):
    out = tmp_path / "out"
    seed_all_rng(0)

    # --- first run: iterations 0, 1, 2; PeriodicCheckpointer saves after 1 and at the end.
    trainer = Trainer(_cfg(dataset, out, max_iter=3))
    assert isinstance(trainer, ZeroShotTrainerBase)
    assert type(trainer.model).__name__ == ARCH_NAME
    trainer.resume_or_load(resume=False)
    assert trainer.start_iter == 0
    trainer.train()
    assert trainer.iter == 3  # TrainerBase sets iter = max_iter after a completed run
    losses = [v for v, _ in trainer.storage.history("total_loss").values()]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    trained = _state(trainer.model)
    momentum = [trainer.optimizer.state[p]["momentum_buffer"].clone() for p in _params(trainer)]
    assert len(momentum) == 2  # conv weight and bias
    assert sorted(p.name for p in out.glob("*.pth")) == ["model_0000001.pth", "model_final.pth"]
    assert (out / "last_checkpoint").read_text().strip() == "model_final.pth"
    saved = torch.load(out / "model_final.pth", map_location="cpu", weights_only=True)
    assert saved["iteration"] == 2
    _assert_same_state(saved["model"], trained)

    # The periodic checkpoint holds the earlier weights and iteration.
    model = OczTestPixelClassifier(_cfg(dataset, out, max_iter=3))
    extra = DetectionCheckpointer(model).load(str(out / "model_0000001.pth"))
    assert extra["iteration"] == 1
    assert not torch.equal(model.classifier.weight, trained["classifier.weight"])

    # --- second run: resumes after iteration 2 with the saved weights, trains 3, 4, 5.
    seed_all_rng(1)
    cfg2 = _cfg(dataset, out, max_iter=6)
    trainer2 = Trainer(cfg2)
    fresh = _state(trainer2.model)
    assert not torch.equal(fresh["classifier.weight"], trained["classifier.weight"])
    trainer2.resume_or_load(resume=True)
    assert trainer2.start_iter == 3
    _assert_same_state(_state(trainer2.model), trained)
    # SGD momentum buffers restored too (ZeroShotTrainerBase.state_dict's "_trainer").
    for param, saved_buffer in zip(_params(trainer2), momentum, strict=True):
        torch.testing.assert_close(trainer2.optimizer.state[param]["momentum_buffer"], saved_buffer)
    trainer2.train()
    assert trainer2.iter == 6
    resumed_iters = [it for _, it in trainer2.storage.history("total_loss").values()]
    assert resumed_iters == [3, 4, 5]
    all_losses = losses + [v for v, _ in trainer2.storage.history("total_loss").values()]
    # The problem is linearly separable per pixel: six SGD steps must lower the loss.
    assert all_losses[-1] < all_losses[0]

    # EvalHook ran ZeroShotSemSegEvaluator after the last iteration (trainer.build_evaluator).
    latest = trainer2.storage.latest()
    hook_miou = latest["sem_seg/mIoU"][0]
    assert (out / "inference" / dataset / METRICS_FILE_NAME).is_file()

    # --- explicit evaluation through detectron2's inference_on_dataset.
    mapper = ZeroShotSemSegDatasetMapper(cfg2, False)
    loader = build_detection_test_loader(cfg2, dataset, mapper=mapper)
    results = inference_on_dataset(trainer2.model, loader, ZeroShotSemSegEvaluator(dataset))
    res = results["sem_seg"]
    for key in ("mIoU", "mIoU-seen", "mIoU-unseen", "hIoU", "pAcc", "mACC", "fwIoU"):
        assert math.isfinite(res[key]) and 0.0 <= res[key] <= 100.0, key
    assert res["mIoU"] == hook_miou
    assert trainer2.model.training  # inference_on_dataset restores the training mode


def test_resume_with_an_optimizer_state_of_other_groups_is_a_clear_error(dataset, tmp_path):
    """A checkpoint whose optimizer had other parameter groups (an older ocz_d2 kept one group
    per tensor) cannot be resumed: a CheckpointError that says what to do, not torch's bare
    ValueError."""
    out = tmp_path / "out"
    trainer = Trainer(_cfg(dataset, out, max_iter=2))
    trainer.resume_or_load(resume=False)
    trainer.train()
    assert len(trainer.optimizer.param_groups) == 1  # weight and bias: one LR, no decay
    final = out / "model_final.pth"
    saved = torch.load(final, map_location="cpu", weights_only=False)
    optimizer_state = saved["trainer"]["_trainer"]["optimizer"]
    group = optimizer_state["param_groups"][0]
    # The older layout: one group per parameter tensor.
    optimizer_state["param_groups"] = [{**group, "params": [i]} for i in group["params"]]
    torch.save(saved, final)
    with pytest.raises(CheckpointError, match="Cannot resume.*MODEL.WEIGHTS"):
        Trainer(_cfg(dataset, out, max_iter=4)).resume_or_load(resume=True)
