"""Cost measurement: what a row is measured with (:class:`BenchmarkSettings`), the model's
components (:class:`Component`, :data:`FLOP_COMPONENTS`, :data:`TIMED_COMPONENTS`), run times,
time per component, FLOPs and peak memory.
"""

from __future__ import annotations

import contextlib
import resource
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = [
    "FLOP_COMPONENTS",
    "TIMED_COMPONENTS",
    "BenchmarkSettings",
    "Component",
    "count_flops",
    "guide_flops",
    "peak_rss_mb",
    "reset_peak_rss",
    "time_components",
    "time_runs",
    "timed",
    "timing_stats",
]


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
            (:mod:`ocz_d2.benchmark.stand_in`); 0: report the loader as not available.
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


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds of one call of ``fn`` (the device synchronised before and after)."""
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def time_runs(
    fn: Callable[[], object], settings: BenchmarkSettings, device: torch.device
) -> list[float]:
    """Seconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones, back to back."""
    for _ in range(settings.warmup):
        fn()
    return [timed(fn, device) for _ in range(settings.repeats)]


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


@contextlib.contextmanager
def _flop_counter() -> Iterator:
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


def guide_flops(model: nn.Module, samples: list[dict]) -> int:
    """Multiply-adds of the online guide (features and clustering) for ``samples``."""
    with _flop_counter() as counter:
        model.online_regions([s["image"] for s in samples])
    return counter.get_total_flops() // 2


def reset_peak_rss() -> bool:
    """Reset the process's peak RSS (Linux ``clear_refs``); False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB (``VmHWM``, else ``ru_maxrss``)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
