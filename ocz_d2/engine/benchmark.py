"""Benchmark harness: the cost of every component of one or more configs, side by side.

For each row (a config file plus ``KEY VALUE`` overrides, as in :mod:`ocz_d2.evaluation.report`) the
model is built (random weights unless the config names a local file) and measured on synthetic
inputs built like the dataset mapper's outputs (:func:`synthetic_inputs`):

- parameters, total and trainable (and the online SSL guide's, which is not a submodule);
- FLOPs of one image's inference forward, in total and per component (:data:`FLOP_COMPONENTS`),
  and of the online guide that finds the object prompts' regions when no object map is given.
  Counted by ``torch.utils.flop_counter`` (fvcore cannot trace this model: its shape checks are
  data-dependent Python) and reported in fvcore's convention, one multiply-add = one FLOP;
- inference latency (one forward of the batch, no gradient) with object maps given and with the
  online guide, and training step time (forward, losses, backward, optimizer step with the
  trainer's optimizer, :func:`~ocz_d2.engine.optimizer.build_optimizer`): median and quartiles
  over ``repeats`` runs after ``warmup`` runs;
- time per component inside the training step (:data:`TIMED_COMPONENTS`: matchers, pseudo-mask
  clustering, criterion), by timing wrappers on the found modules' entry methods;
- peak memory with the row's model alone in the process: CPU RSS (reset per row where Linux
  allows it) and the CUDA allocator's peak, over the build and one run of each kind;
- the train data loader's images/s and images/s per loader worker (when the dataset's files
  exist, or on stand-in files in its formats, :mod:`ocz_d2.data.stand_in`) and the evaluator's
  ``process`` throughput in pixels/s on random predictions;
- every headline number divided by the first row's (:func:`add_ratios`).

Times are taken interleaved: all rows' models are alive and each round runs every row once, so
that a change in the machine's load (other jobs) falls on all rows alike and the ratios hold.

Components are found by module path or class name, so a config without one (or a model from
before it existed) reports it as absent (``None``), never as an error.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import os
import platform
import resource
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..evaluation.report import ReportRow

__all__ = [
    "FLOP_COMPONENTS",
    "TIMED_COMPONENTS",
    "BenchmarkSettings",
    "Component",
    "add_ratios",
    "count_flops",
    "format_markdown",
    "profile_row",
    "run_benchmark",
    "synthetic_inputs",
    "time_components",
    "timing_stats",
]

logger = logging.getLogger(__name__)

#: Headline numbers of a row (its ``"summary"``), divided by the first row's in ``"ratio"``.
SUMMARY_KEYS = (
    "params_total",
    "params_trainable",
    "gflops",
    "inference_ms",
    "inference_online_ms",
    "train_step_ms",
    "peak_rss_mb",
    "peak_cuda_mb",
    "loader_images_per_s",
    "eval_mpixels_per_s",
)


@dataclass(frozen=True)
class Component:
    """A part of the model, found by module path (``named_modules`` name) or class name.

    Its cost is the sum over the matching modules that are not inside another matching module
    (a module called several times, like ORA's rounds, counts every call).
    """

    name: str
    path: str | None = None
    class_name: str | None = None
    #: Only modules under this path count (e.g. granular attention inside ORA, not MFE's).
    within: str | None = None
    #: Entry points timed by :func:`time_components` (those the module has); nested calls of
    #: one component (``forward`` calling ``match_sets``) count once.
    methods: tuple[str, ...] = ("forward",)

    def modules(self, model: nn.Module) -> list[str]:
        """Paths of the outermost matching modules of ``model`` (empty when absent)."""
        found: list[str] = []
        for path, module in model.named_modules():
            if self.within and not path.startswith(self.within + "."):
                continue
            if path and (path == self.path or type(module).__name__ == self.class_name):
                if not any(path.startswith(outer + ".") for outer in found):
                    found.append(path)
        return found


#: FLOP components. ``pixel_decoder`` includes ORA and MFE, ``backbone`` the object prompts and
#: ``ora`` its granular attention; the object prompts' own module only builds their tokens and
#: attention mask: the cost of the extra tokens falls in CLIP's blocks, i.e. in ``backbone``.
FLOP_COMPONENTS = (
    Component("backbone", path="backbone"),
    Component("object_prompts", path="backbone.object_prompts"),
    Component("ora", path="pixel_decoder.refiner"),
    Component("granular_attention", class_name="GranularExtractor", within="pixel_decoder.refiner"),
    Component("pixel_decoder", path="pixel_decoder"),
    Component("mfe", path="pixel_decoder.mfe"),
    Component("transformer_decoder", path="transformer_decoder"),
    # Test-time CLIP classification of the segments (MODEL.OCZ.SEGMENT_CLIP), both routes.
    Component("segment_clip", path="segment_classifier"),
)

#: Components timed inside the training step (the criterion includes its matcher calls).
TIMED_COMPONENTS = (
    # The criterion may call the matcher through ``match_sets`` (several sets in one call).
    Component("matcher", class_name="HungarianMatcher", methods=("forward", "match_sets")),
    Component("pseudo_masks", path="pseudo_masker"),
    Component("criterion", path="criterion"),
)


@dataclass(frozen=True)
class BenchmarkSettings:
    """What every row is measured with.

    Attributes:
        size: side of the square synthetic images, in pixels.
        batch: images per inference call and per training step.
        device: "cpu" or "cuda" (sets ``MODEL.DEVICE``).
        repeats: timed runs of each measurement (rounds over the rows).
        warmup: untimed rounds before them (>= 1).
        loader_batches: batches timed from the train data loader (0 skips it).
        loader_stand_in: when the train dataset's files are missing, time the loader on this
            many stand-in image/label pairs written in the dataset's formats
            (:mod:`ocz_d2.data.stand_in`); 0: report the loader as not available.
        loader_stand_in_size: (width, height) of the stand-in images (PASCAL VOC's 500x375).
        seed: seed of the random weights, the synthetic inputs and the stand-in files.
    """

    size: int = 128
    batch: int = 8
    device: str = "cpu"
    repeats: int = 10
    warmup: int = 3
    loader_batches: int = 20
    loader_stand_in: int = 0
    loader_stand_in_size: tuple[int, int] = (500, 375)
    seed: int = 0

    def __post_init__(self):
        if min(self.size, self.batch, self.repeats, self.warmup) < 1:
            # One warm-up run at least: it builds the lazy parts (the SSL guide, text caches).
            raise ValueError(f"size, batch, repeats and warmup must be >= 1: {self}")
        if self.loader_batches < 0:
            raise ValueError(f"loader_batches must be >= 0, got {self.loader_batches}")
        if self.loader_stand_in < 0:
            raise ValueError(f"loader_stand_in must be >= 0, got {self.loader_stand_in}")
        if len(self.loader_stand_in_size) != 2 or min(self.loader_stand_in_size) < 1:
            raise ValueError(
                f"loader_stand_in_size must be (width, height) >= 1, got "
                f"{self.loader_stand_in_size}"
            )
        object.__setattr__(self, "loader_stand_in_size", tuple(self.loader_stand_in_size))


# ---------------------------------------------------------------------- synthetic inputs
def _blocky(
    num_images: int, size: int, values: torch.Tensor, cells: int, generator: torch.Generator
) -> torch.Tensor:
    """int64 [N, size, size] maps of ``cells x cells`` blocks, each a random entry of ``values``."""
    idx = torch.randint(0, len(values), (num_images, 1, cells, cells), generator=generator)
    grid = values[idx].float()
    return F.interpolate(grid, size=(size, size), mode="nearest")[:, 0].long()


def synthetic_inputs(
    dataset_name: str,
    num_images: int,
    size: int,
    *,
    training: bool,
    num_objects: int = 0,
    seed: int = 0,
) -> list[dict]:
    """Random model inputs shaped like :class:`~ocz_d2.data.ZeroShotSemSegDatasetMapper`'s.

    Each dict has "image" (uint8 [3, size, size]), "height", "width", "dataset_name" and, when
    ``num_objects > 0``, an object map (int64 [size, size], regions ``0 .. n_o - 1`` in blocks);
    in training also "sem_seg" (int64 [size, size]: seen classes and the ignore label in blocks)
    and "instances" (one mask per class present, as the mapper builds them).

    Args:
        dataset_name: a registered zero-shot dataset (its metadata gives the classes, the seen
            ones and the ignore label; its files need not exist).
        num_images: N.
        size: image side.
        training: add the training targets.
        num_objects: n_o of the model's object prompts (0: no object map).
        seed: the inputs are a function of it.
    """
    from detectron2.data import MetadataCatalog

    from ..data import ZeroShotSemSegDatasetMapper
    from ..data.object_maps import OBJECT_MAP_KEY
    from ..data.register_zero_shot import ignore_label_of

    meta = MetadataCatalog.get(dataset_name)
    classes = meta.get("stuff_classes", None)
    if not classes:
        raise ValueError(
            f"dataset {dataset_name!r} has no classes in its metadata: register it (a split file "
            "in DATASETS.SPLIT_FILES) or name a registered one in DATASETS.TRAIN"
        )
    ignore = ignore_label_of(dataset_name)
    seen = list(meta.get("seen_classes", range(len(classes))))
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (num_images, 3, size, size), generator=g, dtype=torch.uint8)
    labels = _blocky(num_images, size, torch.tensor([*seen, ignore]), 4, g)
    maps = None
    if num_objects:
        maps = _blocky(num_images, size, torch.arange(num_objects), 3, g)
    samples = []
    for i in range(num_images):
        sample = {"image": images[i], "height": size, "width": size, "dataset_name": dataset_name}
        if maps is not None:
            sample[OBJECT_MAP_KEY] = maps[i]
        if training:
            sample["sem_seg"] = labels[i]
            # The mapper's own construction of the targets.
            sample["instances"] = ZeroShotSemSegDatasetMapper._instances(labels[i], ignore)
        samples.append(sample)
    return samples


def _without_object_maps(samples: list[dict]) -> list[dict]:
    from ..data.object_maps import OBJECT_MAP_KEY

    return [{k: v for k, v in s.items() if k != OBJECT_MAP_KEY} for s in samples]


# ---------------------------------------------------------------------- timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timing_stats(seconds: Sequence[float]) -> dict[str, float]:
    """Median, quartiles, min and max of run times, in milliseconds."""
    ms = np.asarray(seconds, dtype=float) * 1e3
    q1, median, q3 = np.percentile(ms, [25, 50, 75])
    return {
        "median_ms": float(median),
        "q1_ms": float(q1),
        "q3_ms": float(q3),
        "min_ms": float(ms.min()),
        "max_ms": float(ms.max()),
        "runs": len(ms),
    }


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds of one call of ``fn`` (the device synchronised before and after)."""
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def _time_runs(
    fn: Callable[[], object], settings: BenchmarkSettings, device: torch.device
) -> list[float]:
    """Seconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones, back to back."""
    for _ in range(settings.warmup):
        fn()
    return [_timed(fn, device) for _ in range(settings.repeats)]


@contextlib.contextmanager
def time_components(
    model: nn.Module, components: Sequence[Component], device: torch.device
) -> Iterator[dict[str, dict[str, float]]]:
    """Time spent in each component's modules inside the block.

    The components' entry methods (:attr:`Component.methods`) are wrapped on the module
    instances for the duration of the block. Yields ``{name: {"seconds", "calls"}}``, filled as
    the block runs (calls of a component add up); a component the model lacks, or that does not
    run, gets no entry.
    """
    timings: dict[str, dict[str, float]] = {}
    modules = dict(model.named_modules())
    restores = []
    for component in components:
        depth = [0]  # shared by the component's modules and methods
        for path in component.modules(model):
            for method in component.methods:
                if callable(getattr(modules[path], method, None)):
                    restores.append(
                        _wrap_timed(modules[path], method, component.name, timings, depth, device)
                    )
    try:
        yield timings
    finally:
        for restore in reversed(restores):
            restore()


def _wrap_timed(
    module: nn.Module,
    method: str,
    name: str,
    timings: dict[str, dict[str, float]],
    depth: list[int],
    device: torch.device,
) -> Callable[[], None]:
    """Shadow ``module.<method>`` by a timed wrapper (outermost calls only); returns the undo."""
    original = getattr(module, method)

    def timed(*args, **kwargs):
        outermost = depth[0] == 0
        if outermost:
            _sync(device)
            start = time.perf_counter()
        depth[0] += 1
        try:
            return original(*args, **kwargs)
        finally:
            depth[0] -= 1
            if outermost:
                _sync(device)
                entry = timings.setdefault(name, {"seconds": 0.0, "calls": 0})
                entry["seconds"] += time.perf_counter() - start
                entry["calls"] += 1

    module.__dict__[method] = timed  # an instance attribute shadows the class's method

    def restore() -> None:
        del module.__dict__[method]

    return restore


# ---------------------------------------------------------------------- FLOPs
@contextlib.contextmanager
def _flop_counter() -> Iterator:
    from torch.utils.flop_counter import FlopCounterMode

    # nn.MultiheadAttention's fused inference path (taken by frozen CLIP blocks: eval mode, no
    # tensor that needs a gradient) is one op the counter has no formula for, so its
    # projections and attention would count 0 (a ViT-B/16 at 224 would count 11.3 GFLOPs of
    # 17.6). The slow path computes the same.
    mha = getattr(torch.backends, "mha", None)
    fastpath = mha.get_fastpath_enabled() if mha is not None else None
    if mha is not None:
        mha.set_fastpath_enabled(False)
    try:
        # Module tracking needs autograd on (under no_grad it fails on parameters used as inputs).
        with torch.enable_grad(), FlopCounterMode(display=False) as counter:
            yield counter
    finally:
        if mha is not None:
            mha.set_fastpath_enabled(fastpath)


def _module_flops(counter, root: str) -> dict[str, int]:
    """Multiply-adds per module path (the counter names modules ``<root class>.<path>``)."""
    flops = {}
    for name, ops in counter.get_flop_counts().items():
        if name == root or name.startswith(root + "."):
            flops[name[len(root) + 1 :]] = sum(ops.values()) // 2  # torch counts 2 per MAC
    return flops


def count_flops(model: nn.Module, samples: list[dict]) -> dict:
    """FLOPs (multiply-adds) of ``model``'s inference forward on ``samples``, per component.

    Returns:
        {"total": int, "components": {name: int or None (absent)}} over :data:`FLOP_COMPONENTS`.
    """
    was_training = model.training
    model.eval()
    try:
        with _flop_counter() as counter:
            model(samples)
    finally:
        model.train(was_training)
    per_module = _module_flops(counter, type(model).__name__)
    components = {}
    for component in FLOP_COMPONENTS:
        paths = component.modules(model)
        components[component.name] = sum(per_module.get(p, 0) for p in paths) if paths else None
    return {"total": counter.get_total_flops() // 2, "components": components}


def _guide_flops(model: nn.Module, samples: list[dict]) -> int:
    """Multiply-adds of the online guide (features and clustering) for ``samples``."""
    with _flop_counter() as counter:
        model.online_regions([s["image"] for s in samples])
    return counter.get_total_flops() // 2


# ---------------------------------------------------------------------- memory
def _reset_peak_rss() -> bool:
    """Reset the process's peak RSS (Linux ``clear_refs``); False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def _peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB (``VmHWM``, else ``ru_maxrss``)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# ---------------------------------------------------------------------- data and evaluation
def _loader_throughput(
    cfg,
    batches: int,
    *,
    stand_in: int = 0,
    stand_in_size: tuple[int, int] = (500, 375),
    seed: int = 0,
) -> dict:
    """Images/s of the config's train loader (as the trainer builds it) over ``batches``
    batches after the first, and per loader worker (``images_per_s / max(1, NUM_WORKERS)``).

    When the first train dataset's files are missing: {"available": False, "reason"}, or, with
    ``stand_in`` > 0, the loader timed on ``stand_in`` stand-in pairs of ``stand_in_size``
    (width, height) in the dataset's formats (:func:`_stand_in_loader`, ``"stand_in": True``).
    """
    from detectron2.data import DatasetCatalog

    name = cfg.DATASETS.TRAIN[0]
    try:
        DatasetCatalog.get(name)
    except FileNotFoundError as e:
        if stand_in <= 0:
            return {"available": False, "reason": str(e)}
        return _stand_in_loader(cfg, batches, stand_in, stand_in_size, seed, missing=str(e))
    return {"available": True, "stand_in": False, **_time_loader(cfg, batches)}


def _time_loader(cfg, batches: int) -> dict:
    """Time the train loader of ``cfg`` as the trainer builds it (:func:`_loader_throughput`)."""
    from detectron2.data import build_detection_train_loader

    from ..data import ZeroShotSemSegDatasetMapper

    loader = build_detection_train_loader(cfg, mapper=ZeroShotSemSegDatasetMapper(cfg, True))
    batches_iter = iter(loader)
    start = time.perf_counter()
    next(batches_iter)  # worker start-up
    first = time.perf_counter() - start
    images = 0
    start = time.perf_counter()
    for _ in range(batches):
        images += len(next(batches_iter))
    seconds = time.perf_counter() - start
    del batches_iter, loader  # stops the workers
    workers = int(cfg.DATALOADER.NUM_WORKERS)
    return {
        "dataset": cfg.DATASETS.TRAIN[0],
        "num_workers": workers,
        "batch": cfg.SOLVER.IMS_PER_BATCH,
        "first_batch_s": first,
        "images_per_s": images / seconds,
        "images_per_s_per_worker": images / seconds / max(1, workers),
    }


def _uses_object_maps(cfg, dataset_name: str) -> int:
    """n_o of the object maps a stand-in of ``dataset_name`` carries (0: none): the dataset's
    own maps, or, for a model with object prompts, the precomputed maps that train without the
    online guide (``tools/precompute_object_maps.py``)."""
    from detectron2.data import MetadataCatalog

    from ..data.object_maps import OBJECT_MAP_KEY

    objects = cfg.MODEL.OCZ.OBJECTS
    num = int(objects.NUM) if objects.PROMPTS else 0
    roots = MetadataCatalog.get(dataset_name).get("extra_label_roots", None) or {}
    if OBJECT_MAP_KEY in roots:
        return max(num, 1)
    return num


def _stand_in_loader(
    cfg, batches: int, num_images: int, size: tuple[int, int], seed: int, *, missing: str
) -> dict:
    """:func:`_time_loader` on stand-in files of the first train dataset, written to a
    temporary folder, registered with its metadata as ``<name>_stand_in`` and removed after."""
    import shutil
    import tempfile

    from detectron2.data import MetadataCatalog

    from ..data import unregister_zero_shot_split
    from ..data.object_maps import guide_record
    from ..data.stand_in import register_stand_in_split, stand_in_format, write_stand_in_split

    real = cfg.DATASETS.TRAIN[0]
    num_objects = _uses_object_maps(cfg, real)
    record = None
    if num_objects:
        try:
            record = guide_record(cfg)  # the record the model checks maps against
        except (OSError, ValueError) as e:
            logger.warning("stand-in object maps: no guide record (%s)", e)
    image_ext, label_ext = stand_in_format(real)
    root = tempfile.mkdtemp(prefix="ocz_loader_stand_in_")
    name = None
    try:
        files = write_stand_in_split(
            os.path.join(root, real),
            num_images,
            num_classes=len(MetadataCatalog.get(real).stuff_classes),
            size=size,
            image_ext=image_ext,
            label_ext=label_ext,
            num_objects=num_objects,
            object_map_record=record,
            seed=seed,
        )
        logger.info(
            "%s is missing: %d stand-in images of %dx%d (%.0f KB each%s) written in %.1f s",
            real,
            num_images,
            *files.size,
            files.mean_image_kb,
            f", object maps of {num_objects} regions" if num_objects else "",
            files.seconds,
        )
        name = register_stand_in_split(f"{real}_stand_in", real, files)
        stand_in_cfg = cfg.clone()
        stand_in_cfg.defrost()
        stand_in_cfg.DATASETS.TRAIN = (name,)
        stand_in_cfg.freeze()
        timing = _time_loader(stand_in_cfg, batches)
    finally:
        if name is not None:
            unregister_zero_shot_split(name)
        shutil.rmtree(root, ignore_errors=True)
    return {
        "available": True,
        "stand_in": True,
        **timing,
        "stands_in_for": real,
        "missing": missing,
        "stand_in_images": num_images,
        "stand_in_size": list(files.size),
        "stand_in_image_format": files.image_ext,
        "stand_in_mean_image_kb": files.mean_image_kb,
        "stand_in_object_maps": num_objects,
        "stand_in_root": root,
    }


def _evaluator_throughput(dataset_name: str, settings: BenchmarkSettings) -> dict:
    """Pixels/s of :class:`ZeroShotSemSegEvaluator`'s ``process`` on random [K, H, W] scores
    (label checks, per-pixel argmax, confusion counting), of the argmax alone
    (:func:`class_map`), and of the counting alone (:func:`accumulate_confusion` on the argmax),
    each the median over ``repeats`` batches."""
    from detectron2.data import MetadataCatalog

    from ..data.register_zero_shot import ignore_label_of
    from ..evaluation import ZeroShotSemSegEvaluator, accumulate_confusion, class_map

    num_classes = len(MetadataCatalog.get(dataset_name).stuff_classes)
    ignore = ignore_label_of(dataset_name)
    g = torch.Generator().manual_seed(settings.seed)
    shape = (settings.batch, settings.size, settings.size)
    labels = torch.randint(0, num_classes, shape, generator=g)
    labels[:, ::7] = ignore
    scores = [torch.rand((num_classes, *shape[1:]), generator=g) for _ in range(len(labels))]
    evaluator = ZeroShotSemSegEvaluator(dataset_name, distributed=False)
    evaluator.reset()
    inputs = [{"sem_seg": label} for label in labels]
    outputs = [{"sem_seg": s} for s in scores]
    cpu = torch.device("cpu")
    process = _time_runs(lambda: evaluator.process(inputs, outputs), settings, cpu)
    argmax = _time_runs(lambda: [class_map(s) for s in scores], settings, cpu)
    pairs = [(class_map(s).numpy(), label.numpy()) for s, label in zip(scores, labels)]
    conf = np.zeros((num_classes + 1, num_classes + 1), dtype=np.int64)

    def accumulate():
        for pred, gt in pairs:
            accumulate_confusion(pred, gt, num_classes=num_classes, ignore_label=ignore, out=conf)

    counting = _time_runs(accumulate, settings, cpu)
    pixels = math.prod(shape)

    def rate(seconds: Sequence[float]) -> float:
        return pixels / float(np.median(seconds)) / 1e6

    return {
        "dataset": dataset_name,
        "num_classes": num_classes,
        "mpixels_per_s": rate(process),
        "argmax_mpixels_per_s": rate(argmax),
        "accumulate_mpixels_per_s": rate(counting),
    }


# ---------------------------------------------------------------------- one row
def _load_row_config(row: ReportRow, settings: BenchmarkSettings):
    from ..config import load_config
    from ..data import register_split_files_from_config

    cfg = load_config(row.config_file, row.opts)
    cfg.MODEL.DEVICE = settings.device
    cfg.SOLVER.IMS_PER_BATCH = settings.batch
    cfg.freeze()
    register_split_files_from_config(cfg)
    if not cfg.DATASETS.TRAIN:
        raise ValueError(f"row {row.name!r}: DATASETS.TRAIN is empty; name a registered dataset")
    return cfg


def _online_guide_skip_reason(model: nn.Module) -> str | None:
    """Why the model cannot run inference without object maps, or None if it can."""
    if not getattr(model, "num_objects", 0):
        return "no object prompts"
    if model.guide["source"] == "oracle":
        return "oracle guide: object maps only"
    return None


class _RowSession:
    """A row's model (random weights drawn from the seed), optimizer and synthetic inputs, and
    the times of the runs made with them."""

    def __init__(self, row: ReportRow, settings: BenchmarkSettings):
        from detectron2.modeling import build_model

        from .optimizer import build_optimizer

        self.row = row
        self.device = torch.device(settings.device)
        self.cfg = _load_row_config(row, settings)
        torch.manual_seed(settings.seed)
        self.model = build_model(self.cfg)
        # The trainer's optimizer (parameter groups, LR multipliers, gradient clipping).
        self.optimizer = build_optimizer(self.cfg, self.model)
        self.skip_online = _online_guide_skip_reason(self.model)
        num_objects = int(getattr(self.model, "num_objects", 0))
        dataset, size, batch = self.cfg.DATASETS.TRAIN[0], settings.size, settings.batch
        self.train_batch = synthetic_inputs(
            dataset, batch, size, training=True, num_objects=num_objects, seed=settings.seed
        )
        self.test_batch = synthetic_inputs(
            dataset, batch, size, training=False, num_objects=num_objects, seed=settings.seed + 1
        )
        self.online_batch = _without_object_maps(self.test_batch)
        self.runs: dict[str, list[float]] = {k: [] for k in ("inference", "online", "step")}
        self.step_components: list[dict[str, dict[str, float]]] = []

    def run_once(self, record: bool = True) -> None:
        """Time one inference with the object maps, one with the online guide (where the model
        has one) and one training step with its components; keep the times if ``record``."""
        model = self.model
        model.eval()
        with torch.no_grad():
            given = _timed(lambda: model(self.test_batch), self.device)
            online = None
            if self.skip_online is None:
                online = _timed(lambda: model(self.online_batch), self.device)
        model.train()
        with time_components(model, TIMED_COMPONENTS, self.device) as components:
            step = _timed(self._train_step, self.device)
        if record:
            self.runs["inference"].append(given)
            if online is not None:
                self.runs["online"].append(online)
            self.runs["step"].append(step)
            self.step_components.append(components)

    def _train_step(self) -> None:
        """One step as Detectron2's ``SimpleTrainer`` makes it."""
        from detectron2.utils.events import EventStorage

        with EventStorage():
            losses = self.model(self.train_batch)
        loss = sum(losses.values())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    def times(self) -> dict:
        """:func:`timing_stats` of the recorded inference, online-guide inference (or why it
        was skipped) and training-step runs."""
        return {
            "inference": timing_stats(self.runs["inference"]),
            "inference_online_guide": (
                {"skipped": self.skip_online}
                if self.skip_online
                else timing_stats(self.runs["online"])
            ),
            "train_step": timing_stats(self.runs["step"]),
        }

    def component_times(self) -> dict[str, dict | None]:
        """Per timed component: median ms per step, median share of the step and the modules
        timed; None where the model lacks it."""
        steps = np.asarray(self.runs["step"])
        result: dict[str, dict | None] = {}
        for component in TIMED_COMPONENTS:
            paths = component.modules(self.model)
            if not paths:
                result[component.name] = None
                continue
            runs = [
                c.get(component.name, {"seconds": 0.0, "calls": 0}) for c in self.step_components
            ]
            seconds = np.array([r["seconds"] for r in runs])
            result[component.name] = {
                "median_ms": float(np.median(seconds) * 1e3),
                "share_of_step": float(np.median(seconds / steps)),
                "calls_per_step": float(np.median([r["calls"] for r in runs])),
                "modules": paths,
            }
        return result


def _reset_peak_memory(device: torch.device) -> bool:
    """Reset the peak RSS and the CUDA allocator's peak; False where the RSS peak cannot be."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    return _reset_peak_rss()


def _parameters(model: nn.Module) -> dict[str, int | None]:
    """Total and trainable parameters of the model, and the (frozen) online SSL guide's, which
    is not a registered submodule (None without one)."""
    guide = getattr(model, "guide", None)
    ssl = guide is not None and guide["source"] == "ssl"
    return {
        "total": sum(p.numel() for p in model.parameters()),
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "ssl_guide": sum(p.numel() for p in model.ssl_guide().parameters()) if ssl else None,
    }


def _flops(model: nn.Module, sample: dict, size: int) -> dict:
    """:func:`count_flops` of one image (object map given) and the online guide's FLOPs."""
    flops = count_flops(model, [sample])
    online = _online_guide_skip_reason(model) is None
    flops["guide_online"] = _guide_flops(model, [sample]) if online else None
    flops["per"] = f"one {size}x{size} image, multiply-adds"
    return flops


def profile_row(row: ReportRow, settings: BenchmarkSettings) -> dict:
    """Everything of a row but its timed runs, with its model alone in memory: parameters, peak
    memory over the build and one run of each kind, FLOPs, loader and evaluator throughput."""
    device = torch.device(settings.device)
    rss_reset = _reset_peak_memory(device)
    session = _RowSession(row, settings)
    result: dict = {"name": row.name, "config_file": row.config_file, "opts": list(row.opts)}
    result["dataset"] = session.cfg.DATASETS.TRAIN[0]
    result["params"] = _parameters(session.model)
    logger.info("[%s] memory and FLOPs", row.name)
    session.run_once(record=False)
    result["memory"] = {
        "peak_rss_mb": _peak_rss_mb(),
        "peak_rss_scope": "row" if rss_reset else "process",
        "peak_cuda_mb": (
            torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
        ),
    }
    result["flops"] = _flops(session.model, session.test_batch[0], settings.size)
    logger.info("[%s] data loader and evaluator", row.name)
    result["data_loader"] = (
        _loader_throughput(
            session.cfg,
            settings.loader_batches,
            stand_in=settings.loader_stand_in,
            stand_in_size=settings.loader_stand_in_size,
            seed=settings.seed,
        )
        if settings.loader_batches
        else {"available": False, "reason": "not measured (loader_batches 0)"}
    )
    eval_dataset = (list(session.cfg.DATASETS.TEST) or [result["dataset"]])[0]
    result["evaluation"] = _evaluator_throughput(eval_dataset, settings)
    return result


def _summary(result: dict) -> dict[str, float | None]:
    times = result["times"]
    online = times["inference_online_guide"]
    return {
        "params_total": result["params"]["total"],
        "params_trainable": result["params"]["trainable"],
        "gflops": result["flops"]["total"] / 1e9,
        "inference_ms": times["inference"]["median_ms"],
        "inference_online_ms": online.get("median_ms"),
        "train_step_ms": times["train_step"]["median_ms"],
        "peak_rss_mb": result["memory"]["peak_rss_mb"],
        "peak_cuda_mb": result["memory"]["peak_cuda_mb"],
        "loader_images_per_s": result["data_loader"].get("images_per_s"),
        "eval_mpixels_per_s": result["evaluation"]["mpixels_per_s"],
    }


# ---------------------------------------------------------------------- all rows
def add_ratios(rows: list[dict]) -> list[dict]:
    """Set each row's ``"ratio"``: its summary divided by the first row's (None where either
    is missing or the first is 0). Returns ``rows``."""
    first = rows[0]["summary"] if rows else {}
    for row in rows:
        row["ratio"] = {
            key: (
                value / first[key]
                if value is not None and first.get(key) not in (None, 0)
                else None
            )
            for key, value in row["summary"].items()
        }
    return rows


def _cpu_name() -> str:
    """The CPU's model name (Linux ``/proc/cpuinfo``), else ``platform.processor()``."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _environment(settings: BenchmarkSettings) -> dict:
    device = torch.device(settings.device)
    return {
        "torch": torch.__version__,
        "device": (torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "nice": os.nice(0),
        "load_average_1min": os.getloadavg()[0],
    }


def run_benchmark(rows: Sequence[ReportRow], settings: BenchmarkSettings) -> dict:
    """Measure every row with the same settings.

    Each row is first profiled alone (:func:`profile_row`); then all rows' models are built
    again and timed interleaved, one run of each row in turn, ``warmup`` rounds untimed then
    ``repeats`` timed, so that a change of the machine's load falls on every row alike.

    Returns:
        {"settings", "environment", "rows": [per-row results with "summary" and "ratio"]}.
    """
    names = [r.name for r in rows]
    if not rows or len(set(names)) != len(names):
        raise ValueError(f"give at least one row, with unique names: {names}")
    if settings.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda, but torch sees no CUDA device")
    environment = _environment(settings)
    results = [profile_row(row, settings) for row in rows]
    gc.collect()
    sessions = [_RowSession(row, settings) for row in rows]
    for i in range(settings.warmup + settings.repeats):
        logger.info("timing round %d of %d", i + 1, settings.warmup + settings.repeats)
        for session in sessions:
            session.run_once(record=i >= settings.warmup)
    for result, session in zip(results, sessions):
        result["times"] = session.times()
        result["train_step_components"] = session.component_times()
        result["summary"] = _summary(result)
    return {"settings": asdict(settings), "environment": environment, "rows": add_ratios(results)}


# ---------------------------------------------------------------------- tables
def _fmt(value: float | None, digits: int = 1) -> str:
    return "absent" if value is None else f"{value:,.{digits}f}"


def _spread(stats: dict) -> str:
    if "median_ms" not in stats:
        return stats.get("skipped", "–")
    return f"{stats['median_ms']:.1f} [{stats['q1_ms']:.1f}–{stats['q3_ms']:.1f}]"


def format_markdown(report: dict) -> str:
    """Markdown tables of :func:`run_benchmark`'s output: absolute numbers, ratios to the first
    row, FLOPs per component and time per component in the training step."""
    rows = report["rows"]
    s = report["settings"]
    out = [
        f"Input {s['size']}x{s['size']}, batch {s['batch']}, device {s['device']}, "
        f"{s['repeats']} runs after {s['warmup']} warm-up (median [quartiles]).",
        "",
        "| row | params M (trainable) | GFLOPs | inference ms | inference, online guide ms | "
        "train step ms | peak RSS MB | loader img/s | eval Mpx/s: process (argmax, counting) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        t, p = r["times"], r["params"]
        loader, evaluation = r["data_loader"], r["evaluation"]
        out.append(
            f"| {r['name']} | {p['total'] / 1e6:.2f} ({p['trainable'] / 1e6:.2f}) | "
            f"{r['summary']['gflops']:.2f} | {_spread(t['inference'])} | "
            f"{_spread(t['inference_online_guide'])} | {_spread(t['train_step'])} | "
            f"{r['memory']['peak_rss_mb']:.0f} | "
            f"{_loader_cell(loader)} | "
            f"{evaluation['mpixels_per_s']:.1f} ({evaluation['argmax_mpixels_per_s']:.1f}, "
            f"{evaluation['accumulate_mpixels_per_s']:.0f}) |"
        )
    out += ["", f"Ratio to {rows[0]['name']}:", ""]
    out += ["| row | " + " | ".join(SUMMARY_KEYS) + " |", "|---" * (len(SUMMARY_KEYS) + 1) + "|"]
    for r in rows:
        cells = ["–" if r["ratio"][k] is None else f"{r['ratio'][k]:.2f}" for k in SUMMARY_KEYS]
        out.append(f"| {r['name']} | " + " | ".join(cells) + " |")
    names = [c.name for c in FLOP_COMPONENTS]
    out += ["", "GFLOPs per component (% of the model's; the online guide is extra):", ""]
    out += ["| row | " + " | ".join([*names, "guide_online"]) + " |"]
    out += ["|---" * (len(names) + 2) + "|"]
    for r in rows:
        flops = r["flops"]
        cells = [_share(flops["components"][n], flops["total"], 1e9) for n in names] + [
            _share(flops["guide_online"], flops["total"], 1e9)
        ]
        out.append(f"| {r['name']} | " + " | ".join(cells) + " |")
    timed = [c.name for c in TIMED_COMPONENTS]
    out += ["", "Training step: ms per step in each component (% of the step):", ""]
    out += ["| row | " + " | ".join(timed) + " |", "|---" * (len(timed) + 1) + "|"]
    for r in rows:
        comps = r["train_step_components"]
        cells = [
            "absent"
            if comps[n] is None
            else f"{comps[n]['median_ms']:.1f} ({100 * comps[n]['share_of_step']:.1f}%)"
            for n in timed
        ]
        out.append(f"| {r['name']} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def _loader_cell(loader: dict) -> str:
    """The loader's images/s with its rate per worker, and "stand-in WxH, N images" when it was
    timed on stand-in files."""
    if not loader["available"]:
        return "not available"
    cell = f"{_fmt(loader['images_per_s'])} ({_fmt(loader['images_per_s_per_worker'])}/worker"
    if loader.get("stand_in"):
        width, height = loader["stand_in_size"]
        cell += f"; stand-in {width}x{height}, {loader['stand_in_images']} images"
    return cell + ")"


def _share(value: int | None, total: int, unit: float) -> str:
    if value is None:
        return "absent"
    return f"{value / unit:.2f} ({100 * value / max(total, 1):.1f}%)"
