"""The benchmark's rows: each profiled alone (:func:`profile_row`), then all timed interleaved
(:func:`run_benchmark`), every headline number divided by the first row's (:func:`add_ratios`).
"""

from __future__ import annotations

import gc
import logging
import os
import platform
from collections.abc import Sequence
from dataclasses import asdict

import numpy as np
import torch
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage
from torch import nn

from ..config import load_config
from ..data.split_file import register_split_files_from_config
from ..engine.optimizer import build_optimizer
from ..evaluation.report import ReportRow
from .inputs import synthetic_inputs, without_object_maps
from .measure import (
    TIMED_COMPONENTS,
    BenchmarkSettings,
    count_flops,
    guide_flops,
    peak_rss_mb,
    reset_peak_rss,
    time_components,
    timed,
    timing_stats,
)
from .throughput import evaluator_throughput, loader_throughput

__all__ = [
    "SUMMARY_KEYS",
    "RowSession",
    "add_ratios",
    "load_row_config",
    "profile_row",
    "run_benchmark",
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


def load_row_config(row: ReportRow, settings: BenchmarkSettings):
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
    if model.guide.source == "oracle":
        return "oracle guide: object maps only"
    return None


class RowSession:
    """A row's model (random weights drawn from the seed), optimizer and synthetic inputs, and
    the times of the runs made with them."""

    def __init__(self, row: ReportRow, settings: BenchmarkSettings):
        self.row = row
        self.device = torch.device(settings.device)
        self.cfg = load_row_config(row, settings)
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
        self.online_batch = without_object_maps(self.test_batch)
        self.runs: dict[str, list[float]] = {k: [] for k in ("inference", "online", "step")}
        self.step_components: list[dict[str, dict[str, float]]] = []

    def run_once(self, record: bool = True) -> None:
        """Time one inference with the object maps, one with the online guide (where the model
        has one) and one training step with its components; keep the times if ``record``."""
        model = self.model
        model.eval()
        with torch.no_grad():
            given = timed(lambda: model(self.test_batch), self.device)
            online = None
            if self.skip_online is None:
                online = timed(lambda: model(self.online_batch), self.device)
        model.train()
        with time_components(model, TIMED_COMPONENTS, self.device) as components:
            step = timed(self._train_step, self.device)
        if record:
            self.runs["inference"].append(given)
            if online is not None:
                self.runs["online"].append(online)
            self.runs["step"].append(step)
            self.step_components.append(components)

    def _train_step(self) -> None:
        """One step as Detectron2's ``SimpleTrainer`` makes it."""
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
    return reset_peak_rss()


def _parameters(model: nn.Module) -> dict[str, int | None]:
    """Total and trainable parameters of the model, and the (frozen) online SSL guide's, which
    is not a registered submodule (None without one)."""
    guide = getattr(model, "guide", None)
    ssl = guide is not None and guide.source == "ssl"
    return {
        "total": sum(p.numel() for p in model.parameters()),
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "ssl_guide": sum(p.numel() for p in guide.ssl_model(model.device).parameters())
        if ssl
        else None,
    }


def _flops(model: nn.Module, sample: dict, size: int) -> dict:
    """:func:`count_flops` of one image (object map given) and the online guide's FLOPs."""
    flops = count_flops(model, [sample])
    online = _online_guide_skip_reason(model) is None
    flops["guide_online"] = guide_flops(model, [sample]) if online else None
    flops["per"] = f"one {size}x{size} image, multiply-adds"
    return flops


def profile_row(row: ReportRow, settings: BenchmarkSettings) -> dict:
    """Everything of a row but its timed runs, with its model alone in memory: parameters, peak
    memory over the build and one run of each kind, FLOPs, loader and evaluator throughput."""
    device = torch.device(settings.device)
    rss_reset = _reset_peak_memory(device)
    session = RowSession(row, settings)
    result: dict = {"name": row.name, "config_file": row.config_file, "opts": list(row.opts)}
    result["dataset"] = session.cfg.DATASETS.TRAIN[0]
    result["params"] = _parameters(session.model)
    logger.info("[%s] memory and FLOPs", row.name)
    session.run_once(record=False)
    result["memory"] = {
        "peak_rss_mb": peak_rss_mb(),
        "peak_rss_scope": "row" if rss_reset else "process",
        "peak_cuda_mb": (
            torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
        ),
    }
    result["flops"] = _flops(session.model, session.test_batch[0], settings.size)
    logger.info("[%s] data loader and evaluator", row.name)
    result["data_loader"] = (
        loader_throughput(
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
    result["evaluation"] = evaluator_throughput(eval_dataset, settings)
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
    sessions = [RowSession(row, settings) for row in rows]
    for i in range(settings.warmup + settings.repeats):
        logger.info("timing round %d of %d", i + 1, settings.warmup + settings.repeats)
        for session in sessions:
            session.run_once(record=i >= settings.warmup)
    for result, session in zip(results, sessions):
        result["times"] = session.times()
        result["train_step_components"] = session.component_times()
        result["summary"] = _summary(result)
    return {"settings": asdict(settings), "environment": environment, "rows": add_ratios(results)}
