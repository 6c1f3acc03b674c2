"""Zero-shot semantic segmentation evaluator: seen, unseen and harmonic mIoU from one matrix.

The generalized zero-shot protocol (docs/PROTOCOLS.md, "Metrics"): the model predicts over the full
label set (seen + unseen classes) and one confusion matrix is accumulated over the whole
evaluation set. Per-class IoUs come from that matrix; mIoU(S) and mIoU(U) average them over the
seen and the unseen class indices; hIoU = 2 S U / (S + U).

A class without any ground-truth pixel in the evaluation set is left out of every mean and its IoU
is reported as NaN (the formula of current Detectron2; v0.6 and the older zero-shot evaluators
still count a class that is only predicted, with IoU 0, so their numbers can be lower).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections import OrderedDict
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from detectron2.data import MetadataCatalog
from detectron2.evaluation import DatasetEvaluator
from detectron2.utils.comm import all_gather, is_main_process, synchronize
from detectron2.utils.file_io import PathManager
from PIL import Image
from tabulate import tabulate

from ..constants import EVALUATOR_TYPE, IGNORE_LABEL

__all__ = [
    "CONFUSION_FILE_NAME",
    "METRICS_FILE_NAME",
    "ZeroShotSemSegEvaluator",
    "accumulate_confusion",
    "build_zero_shot_evaluator",
    "class_map",
    "compute_zero_shot_metrics",
    "format_zero_shot_tables",
    "harmonic_mean",
]

logger = logging.getLogger(__name__)

#: File written into ``output_dir`` by :meth:`ZeroShotSemSegEvaluator.evaluate`.
METRICS_FILE_NAME = "zero_shot_sem_seg_metrics.json"
#: Summed confusion matrix written beside it (``np.load``-able, int64 ``[K+1, K+1]``).
CONFUSION_FILE_NAME = "zero_shot_sem_seg_confusion.npy"


def class_map(scores: torch.Tensor) -> torch.Tensor:
    """Per-pixel argmax of ``[K, H, W]`` scores: ``[H, W]`` int64 class indices.

    The same result as ``scores.argmax(0)`` (ties go to the lowest index), computed with
    reductions over the leading dimension, which PyTorch runs fast, instead of ``argmax(0)``,
    which on CPU walks K strided values per pixel: the per-pixel maximum, then the first class
    that reaches it (the largest of ``K - k`` over the classes k equal to the maximum). 6-8x
    faster than ``argmax(0)`` on CPU at 512x512, K = 20 (BENCHMARKS.md, section 4).

    Raises:
        ValueError: for scores that are not [K, H, W], or NaN scores (no class is the maximum).
    """
    if scores.dim() != 3:
        raise ValueError(f"class_map expects [K, H, W] scores, got {tuple(scores.shape)}")
    k = scores.shape[0]
    best = scores.amax(dim=0, keepdim=True)
    small = k < 256
    rank = torch.arange(k, 0, -1, device=scores.device, dtype=torch.uint8 if small else torch.int32)
    is_best = torch.eq(scores, best)
    weighted = (is_best.view(torch.uint8) if small else is_best.to(rank.dtype)).mul_(
        rank[:, None, None]
    )
    top = weighted.amax(dim=0)  # K - (first best class); 0 where no class equals the maximum
    if int(top.min()) == 0:
        raise ValueError(
            f"class scores contain NaN at {int((top == 0).sum())} pixels: the model's "
            "output is broken (check the loss and the weights for NaN)"
        )
    return k - top.to(torch.int64)


def _label_values(gt: np.ndarray) -> np.ndarray:
    """The distinct values of an integer label map: a counting pass when they lie in
    [0, 65536) (every label PNG), a sort otherwise."""
    flat = gt.reshape(-1)
    if flat.size and flat.min() >= 0 and flat.max() < 1 << 16:
        return np.flatnonzero(np.bincount(flat))
    return np.unique(flat)


def accumulate_confusion(
    pred: np.ndarray,
    gt: np.ndarray,
    *,
    num_classes: int,
    ignore_label: int,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Count the pixels of one prediction into a confusion matrix ``conf[pred, gt]``.

    Args:
        pred: [H, W] (any shape) integer class indices in ``[0, K)``.
        gt: the label map, same shape: class indices in ``[0, K)`` or ``ignore_label``.
        num_classes: K.
        ignore_label: label value of pixels that enter no metric; they are counted in the last
            column (index K), which :func:`compute_zero_shot_metrics` leaves out.
        out: int64 ``[K+1, K+1]`` matrix to add the counts to (in place), or None for a new one.

    Returns:
        ``out`` (or a new int64 ``[K+1, K+1]`` matrix) with this image's counts added.

    Raises:
        ValueError: if the shapes differ or a value is outside ``[0, K)`` (and not ignore in
            ``gt``).
    """
    pred = np.asarray(pred, dtype=np.int64).reshape(-1)
    gt = np.asarray(gt, dtype=np.int64).reshape(-1)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction has {pred.size} pixels, the label map {gt.size}.")
    gt = np.where(gt == ignore_label, num_classes, gt)
    if pred.size and (pred.min() < 0 or pred.max() >= num_classes):
        raise ValueError(f"predicted classes must lie in [0, {num_classes}).")
    if gt.size and (gt.min() < 0 or gt.max() > num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}) or be {ignore_label} (ignore).")
    size = num_classes + 1
    counts = np.bincount(size * pred + gt, minlength=size * size).reshape(size, size)
    if out is None:
        return counts
    out += counts
    return out


def harmonic_mean(seen: float, unseen: float) -> float:
    """Harmonic mean ``2 S U / (S + U)`` of two scores; 0 when both are 0, NaN if either is NaN."""
    if math.isnan(seen) or math.isnan(unseen):
        return float("nan")
    if seen + unseen == 0:
        return 0.0
    return 2.0 * seen * unseen / (seen + unseen)


def _check_groups(
    num_classes: int,
    seen_classes: Sequence[int] | None,
    unseen_classes: Sequence[int] | None,
) -> tuple[list[int], list[int]] | None:
    """Validate the seen / unseen index lists; derive a missing one as the complement.

    Returns:
        ``(seen, unseen)`` sorted index lists, or None when neither list is given or one group is
        empty (then there is no seen/unseen split to report).
    """
    if seen_classes is None and unseen_classes is None:
        return None
    groups = {}
    for group, indices in (("seen_classes", seen_classes), ("unseen_classes", unseen_classes)):
        if indices is None:
            continue
        indices = [int(i) for i in indices]
        bad = [i for i in indices if not 0 <= i < num_classes]
        if bad:
            raise ValueError(
                f"{group} holds indices {bad} outside [0, {num_classes}); they must index the "
                f"{num_classes} classes of the dataset (stuff_classes)."
            )
        if len(set(indices)) != len(indices):
            raise ValueError(f"{group} lists a class index more than once: {indices}.")
        groups[group] = sorted(indices)
    all_classes = set(range(num_classes))
    seen = groups.get("seen_classes")
    unseen = groups.get("unseen_classes")
    if seen is None:
        seen = sorted(all_classes - set(unseen))
    if unseen is None:
        unseen = sorted(all_classes - set(seen))
    both = sorted(set(seen) & set(unseen))
    if both:
        raise ValueError(f"Classes {both} are listed as both seen and unseen.")
    if not seen or not unseen:
        return None
    return seen, unseen


def compute_zero_shot_metrics(
    conf_matrix: np.ndarray,
    class_names: Sequence[str],
    *,
    seen_classes: Sequence[int] | None = None,
    unseen_classes: Sequence[int] | None = None,
) -> OrderedDict[str, float]:
    """Semantic-segmentation metrics, in percent, from a confusion matrix.

    Args:
        conf_matrix: int array ``[K+1, K+1]`` as accumulated by :class:`ZeroShotSemSegEvaluator`
            (``conf_matrix[pred, gt]``; the last row and column hold ignored pixels and are not
            counted), or ``[K, K]`` without an ignore slot.
        class_names: the K class names (keys ``IoU-<name>`` and ``ACC-<name>``).
        seen_classes, unseen_classes: class indices of the two groups. When both are None, or one
            group would be empty, the group metrics (``mIoU-seen``, ``mIoU-unseen``, ``hIoU``)
            are left out. A missing list is the complement of the other.

    Returns:
        Ordered dict of floats: ``mIoU``, ``mIoU-seen``, ``mIoU-unseen``, ``hIoU``,
        ``seen-to-unseen``, ``unseen-to-seen`` (group keys only with a split), ``pAcc``,
        ``mACC``, ``fwIoU``, then ``IoU-<name>`` and ``ACC-<name>`` per class. Classes with no
        ground-truth pixel are excluded from every mean and have NaN IoU and accuracy; a mean
        over no class is NaN. ``seen-to-unseen`` is the percentage of the seen classes'
        ground-truth pixels predicted as some unseen class, ``unseen-to-seen`` the reverse: the
        errors across the two groups, which the calibration trades against each other.
    """
    num_classes = len(class_names)
    conf = np.asarray(conf_matrix)
    if conf.shape not in ((num_classes + 1, num_classes + 1), (num_classes, num_classes)):
        raise ValueError(
            f"Confusion matrix of shape {conf.shape} does not fit {num_classes} classes: expected "
            f"({num_classes + 1}, {num_classes + 1}) (with the ignore slot) or "
            f"({num_classes}, {num_classes})."
        )
    conf = conf[:num_classes, :num_classes].astype(np.float64)
    groups = _check_groups(num_classes, seen_classes, unseen_classes)

    tp = np.diagonal(conf)
    pos_gt = conf.sum(axis=0)
    pos_pred = conf.sum(axis=1)
    has_gt = pos_gt > 0
    iou = np.full(num_classes, np.nan)
    acc = np.full(num_classes, np.nan)
    # union >= pos_gt > 0 wherever has_gt, so no division by zero.
    iou[has_gt] = tp[has_gt] / (pos_gt + pos_pred - tp)[has_gt]
    acc[has_gt] = tp[has_gt] / pos_gt[has_gt]
    total = pos_gt.sum()

    def mean_over(values: np.ndarray, mask: np.ndarray) -> float:
        return float(values[mask].mean()) * 100.0 if mask.any() else float("nan")

    res: OrderedDict[str, float] = OrderedDict()
    res["mIoU"] = mean_over(iou, has_gt)
    if groups is not None:
        seen_mask = np.zeros(num_classes, dtype=bool)
        seen_mask[groups[0]] = True
        unseen_mask = np.zeros(num_classes, dtype=bool)
        unseen_mask[groups[1]] = True
        res["mIoU-seen"] = mean_over(iou, has_gt & seen_mask)
        res["mIoU-unseen"] = mean_over(iou, has_gt & unseen_mask)
        res["hIoU"] = harmonic_mean(res["mIoU-seen"], res["mIoU-unseen"])
        for name, truth, predicted in (
            ("seen-to-unseen", seen_mask, unseen_mask),
            ("unseen-to-seen", unseen_mask, seen_mask),
        ):
            pixels = pos_gt[truth].sum()
            crossed = conf[np.ix_(predicted, truth)].sum()
            res[name] = float(crossed / pixels) * 100.0 if pixels > 0 else float("nan")
    res["pAcc"] = float(tp.sum() / total) * 100.0 if total > 0 else float("nan")
    res["mACC"] = mean_over(acc, has_gt)
    if total > 0:
        res["fwIoU"] = float(np.sum(iou[has_gt] * pos_gt[has_gt]) / total) * 100.0
    else:
        res["fwIoU"] = float("nan")
    for i, name in enumerate(class_names):
        res[f"IoU-{name}"] = float(iou[i]) * 100.0
    for i, name in enumerate(class_names):
        res[f"ACC-{name}"] = float(acc[i]) * 100.0
    return res


def format_zero_shot_tables(
    metrics: Mapping[str, float],
    class_names: Sequence[str],
    *,
    seen_classes: Sequence[int] | None = None,
    unseen_classes: Sequence[int] | None = None,
    gt_pixels: Sequence[int] | None = None,
) -> str:
    """Readable summary and per-class tables of :func:`compute_zero_shot_metrics`' output.

    Args:
        metrics: the dict returned by :func:`compute_zero_shot_metrics`.
        class_names: the K class names.
        seen_classes, unseen_classes: group indices (for the per-class "group" column).
        gt_pixels: optional ground-truth pixel count per class (a column of the per-class table).

    Returns:
        Three tables (tabulate "pipe" format) separated by blank lines: mIoU per split with the
        number of classes that have ground truth, the overall metrics, and the per-class table
        (classes without ground truth show "n/a").
    """
    group_of = ["-"] * len(class_names)
    for indices, label in ((seen_classes, "seen"), (unseen_classes, "unseen")):
        for i in indices or []:
            group_of[int(i)] = label

    def fmt(value: float) -> str:
        return "n/a" if math.isnan(value) else f"{value:.2f}"

    # A class has ground truth exactly when its IoU is not NaN.
    has_gt = [not math.isnan(metrics[f"IoU-{name}"]) for name in class_names]
    splits = [("all", "mIoU", range(len(class_names)))]
    if "mIoU-seen" in metrics:
        splits += [("seen", "mIoU-seen", seen_classes), ("unseen", "mIoU-unseen", unseen_classes)]
    rows = [
        [split, len(indices), sum(has_gt[int(i)] for i in indices), fmt(metrics[key])]
        for split, key, indices in splits
    ]
    summary = tabulate(
        rows,
        headers=["split", "classes", "with GT", "mIoU"],
        tablefmt="pipe",
        colalign=("left", "right", "right", "right"),
        disable_numparse=True,
    )
    overall_keys = ("hIoU", "seen-to-unseen", "unseen-to-seen", "pAcc", "mACC", "fwIoU")
    overall_keys = [k for k in overall_keys if k in metrics]
    overall = tabulate(
        [[fmt(metrics[k]) for k in overall_keys]],
        headers=overall_keys,
        tablefmt="pipe",
        stralign="right",
        disable_numparse=True,
    )

    headers = ["index", "class", "group", "IoU", "ACC"]
    if gt_pixels is not None:
        headers.append("GT pixels")
    rows = []
    for i, name in enumerate(class_names):
        row = [str(i), name, group_of[i], fmt(metrics[f"IoU-{name}"]), fmt(metrics[f"ACC-{name}"])]
        if gt_pixels is not None:
            row.append(str(int(gt_pixels[i])))
        rows.append(row)
    align = ("right", "left", "left") + ("right",) * (len(headers) - 3)
    per_class = tabulate(
        rows, headers=headers, tablefmt="pipe", disable_numparse=True, colalign=align
    )
    return summary + "\n\n" + overall + "\n\n" + per_class


class ZeroShotSemSegEvaluator(DatasetEvaluator):
    """Generalized zero-shot semantic segmentation evaluator (mIoU, seen/unseen mIoU, hIoU).

    Accumulates one ``[K+1, K+1]`` int64 confusion matrix ``conf[pred, gt]`` over the evaluation
    set (the last column counts pixels whose label is the ignore label; they enter no metric),
    sums it over all ranks and computes :func:`compute_zero_shot_metrics` on the main process.

    The ground truth is the full label map (seen and unseen classes) read from
    ``input["sem_seg_file_name"]``, or, when an input has no file name, its ``"sem_seg"`` tensor
    (which must then be at the prediction's size).
    """

    def __init__(
        self,
        dataset_name: str,
        distributed: bool = True,
        output_dir: str | None = None,
        *,
        num_classes: int | None = None,
        ignore_label: int | None = None,
        seen_classes: Sequence[int] | None = None,
        unseen_classes: Sequence[int] | None = None,
        class_names: Sequence[str] | None = None,
    ):
        """
        Args:
            dataset_name: registered dataset; its metadata supplies the defaults of
                ``class_names`` (``stuff_classes``), ``seen_classes``, ``unseen_classes`` and
                ``ignore_label`` (255 when the metadata has none).
            distributed: gather the confusion matrices of all ranks in :meth:`evaluate`.
            output_dir: where to write the metrics JSON and the confusion matrix; None: nothing.
            num_classes: K; checked against the class names when both are known, used alone
                (names "0".."K-1") when no names are known.
            ignore_label: label value of pixels to ignore.
            seen_classes, unseen_classes: class indices of the seen and unseen groups. Without
                either (here or in the metadata) only the overall metrics are reported.
            class_names: the K class names, in label order.
        """
        self._dataset_name = dataset_name
        self._distributed = distributed
        self._output_dir = output_dir
        self._cpu_device = torch.device("cpu")

        meta = MetadataCatalog.get(dataset_name)
        if class_names is None:
            class_names = getattr(meta, "stuff_classes", None)
        if class_names is None:
            if num_classes is None:
                raise ValueError(
                    f"Dataset '{dataset_name}' has no 'stuff_classes' in its metadata: pass "
                    "class_names= or num_classes= to ZeroShotSemSegEvaluator, or register the "
                    "dataset with its class list."
                )
            class_names = [str(i) for i in range(num_classes)]
        class_names = [str(n) for n in class_names]
        if num_classes is not None and num_classes != len(class_names):
            raise ValueError(
                f"num_classes={num_classes} but dataset '{dataset_name}' has "
                f"{len(class_names)} class names."
            )
        duplicates = sorted({n for n in class_names if class_names.count(n) > 1})
        if duplicates:
            raise ValueError(
                f"Class names {duplicates} appear more than once in '{dataset_name}'; per-class "
                "metrics are keyed by name, so names must be unique."
            )
        self._class_names = class_names
        self._num_classes = len(class_names)

        if ignore_label is None:
            ignore_label = getattr(meta, "ignore_label", IGNORE_LABEL)
        self._ignore_label = int(ignore_label)
        if 0 <= self._ignore_label < self._num_classes:
            raise ValueError(
                f"ignore_label={self._ignore_label} is a class index of '{dataset_name}' "
                f"(K={self._num_classes}); use a value outside [0, K), e.g. 255."
            )

        if seen_classes is None:
            seen_classes = getattr(meta, "seen_classes", None)
        if unseen_classes is None:
            unseen_classes = getattr(meta, "unseen_classes", None)
        groups = _check_groups(self._num_classes, seen_classes, unseen_classes)
        if groups is None:
            self._seen_classes = self._unseen_classes = None
            logger.info(
                "Dataset '%s' has no seen/unseen split: reporting overall metrics only.",
                dataset_name,
            )
        else:
            self._seen_classes, self._unseen_classes = groups
        self.reset()

    @property
    def class_names(self) -> list[str]:
        """The K class names, in label order."""
        return list(self._class_names)

    @property
    def seen_classes(self) -> list[int] | None:
        """Sorted seen class indices, or None without a seen/unseen split."""
        return None if self._seen_classes is None else list(self._seen_classes)

    @property
    def unseen_classes(self) -> list[int] | None:
        """Sorted unseen class indices, or None without a seen/unseen split."""
        return None if self._unseen_classes is None else list(self._unseen_classes)

    @property
    def confusion_matrix(self) -> np.ndarray:
        """Copy of the int64 ``[K+1, K+1]`` matrix ``conf[pred, gt]`` (summed over ranks on the
        main process after :meth:`evaluate`)."""
        return self._conf_matrix.copy()

    def reset(self) -> None:
        size = self._num_classes + 1
        self._conf_matrix = np.zeros((size, size), dtype=np.int64)

    def process(self, inputs: list[dict], outputs: list[dict]) -> None:
        """Add a batch to the confusion matrix.

        Args:
            inputs: dataset dicts or mapper outputs; each needs ``"sem_seg_file_name"`` (a label
                PNG with class indices and the ignore label) or a ``"sem_seg"`` tensor ``[H, W]``.
            outputs: model outputs, each ``{"sem_seg": Tensor [K, H, W]}`` of class scores at the
                size of the label map.
        """
        if len(inputs) != len(outputs):
            raise ValueError(f"Got {len(inputs)} inputs but {len(outputs)} outputs.")
        for inp, out in zip(inputs, outputs):
            gt, source = self._load_gt(inp)
            pred = self._prediction(out, source)
            if pred.shape != gt.shape:
                raise ValueError(
                    f"Prediction of size {tuple(pred.shape)} does not match the label map "
                    f"{source} of size {tuple(gt.shape)}: the model must return scores at the "
                    "original image size (input 'height' and 'width')."
                )
            self._accumulate(pred, gt)

    def _load_gt(self, inp: dict) -> tuple[np.ndarray, str]:
        """Label map ``[H, W]`` (integers, checked), and a name for error messages."""
        file_name = inp.get("sem_seg_file_name")
        if file_name is not None:
            with PathManager.open(file_name, "rb") as f:
                gt = np.asarray(Image.open(f))
            source = f"'{file_name}'"
        elif "sem_seg" in inp:
            gt = torch.as_tensor(inp["sem_seg"]).to(self._cpu_device).numpy()
            source = f"input 'sem_seg' of '{inp.get('file_name', '<unknown image>')}'"
        else:
            raise KeyError(
                "An input has neither 'sem_seg_file_name' nor 'sem_seg'; the evaluator needs the "
                "ground-truth label map. Keys present: " + ", ".join(sorted(inp))
            )
        if gt.ndim != 2:
            raise ValueError(
                f"Label map {source} has shape {gt.shape}; expected a single-channel [H, W] map "
                "of class indices (not an RGB or colour-coded image)."
            )
        if not np.issubdtype(gt.dtype, np.integer):
            raise ValueError(f"Label map {source} has dtype {gt.dtype}; expected integers.")
        values = _label_values(gt)
        outside = (values < 0) | (values >= self._num_classes)
        bad = values[outside & (values != self._ignore_label)]
        if bad.size:
            values = bad.tolist()
            raise ValueError(
                f"Label map {source} has values {values[:20]} outside the class range "
                f"[0, {self._num_classes}) of '{self._dataset_name}' that are not the ignore "
                f"label {self._ignore_label}. Check that the labels were converted for this "
                f"dataset (class indices 0..K-1, ignore {self._ignore_label})."
            )
        return gt, source

    def _prediction(self, out: dict, source: str) -> np.ndarray:
        """Per-pixel argmax ``[H, W]`` (int64) of the model's ``[K, H, W]`` scores."""
        if not isinstance(out, Mapping) or "sem_seg" not in out:
            raise TypeError(
                "Each model output must be a dict with key 'sem_seg' (class scores [K, H, W]); "
                f"got {type(out).__name__}."
            )
        scores = out["sem_seg"]
        if scores.dim() != 3 or scores.shape[0] != self._num_classes:
            raise ValueError(
                f"Output 'sem_seg' for {source} has shape {tuple(scores.shape)}; expected "
                f"[K={self._num_classes}, H, W] scores over the classes of '{self._dataset_name}'."
            )
        # Argmax before the copy to CPU: moves K times less data off the GPU.
        return class_map(scores).to(self._cpu_device).numpy()

    def _accumulate(self, pred: np.ndarray, gt: np.ndarray) -> None:
        accumulate_confusion(
            pred,
            gt,
            num_classes=self._num_classes,
            ignore_label=self._ignore_label,
            out=self._conf_matrix,
        )

    def evaluate(self) -> OrderedDict[str, dict[str, float]] | dict:
        """Gather the confusion matrices and compute the metrics.

        Returns:
            ``OrderedDict({"sem_seg": metrics})`` on the main process (see
            :func:`compute_zero_shot_metrics`), ``{}`` on the other ranks.
        """
        if self._distributed:
            synchronize()
            matrices = all_gather(self._conf_matrix)
            if not is_main_process():
                return {}
            self._conf_matrix = np.sum(matrices, axis=0, dtype=np.int64)

        gt_pixels = self._conf_matrix[: self._num_classes, : self._num_classes].sum(axis=0)
        if gt_pixels.sum() == 0:
            logger.warning(
                "No labelled pixel was evaluated on '%s' (no input, or every label is ignore): "
                "all metrics are NaN.",
                self._dataset_name,
            )
        metrics = compute_zero_shot_metrics(
            self._conf_matrix,
            self._class_names,
            seen_classes=self._seen_classes,
            unseen_classes=self._unseen_classes,
        )
        table = format_zero_shot_tables(
            metrics,
            self._class_names,
            seen_classes=self._seen_classes,
            unseen_classes=self._unseen_classes,
            gt_pixels=gt_pixels,
        )
        logger.info("Zero-shot semantic segmentation results on %s:\n%s", self._dataset_name, table)

        if self._output_dir:
            self._write(metrics)
        return OrderedDict({"sem_seg": metrics})

    def _write(self, metrics: Mapping[str, float]) -> None:
        PathManager.mkdirs(self._output_dir)
        # JSON has no NaN: a class without ground truth (or an empty group) becomes null.
        clean = {k: (None if math.isnan(v) else v) for k, v in metrics.items()}
        path = os.path.join(self._output_dir, METRICS_FILE_NAME)
        with PathManager.open(path, "w") as f:
            json.dump(clean, f, indent=2, allow_nan=False)
        with PathManager.open(os.path.join(self._output_dir, CONFUSION_FILE_NAME), "wb") as f:
            np.save(f, self._conf_matrix)
        logger.info("Wrote zero-shot metrics to %s", path)


def build_zero_shot_evaluator(
    dataset_name: str, output_dir: str | None = None
) -> ZeroShotSemSegEvaluator:
    """The evaluator of a registered zero-shot split (what ``Trainer.build_evaluator`` returns).

    Args:
        dataset_name: a dataset registered by :func:`~ocz_d2.data.register_zero_shot_split` or a
            split file, i.e. with ``evaluator_type`` ``"ocz_zero_shot_sem_seg"`` in its metadata.
        output_dir: where the evaluator writes its metrics file; None: nowhere.

    Returns:
        A :class:`ZeroShotSemSegEvaluator` of that dataset.

    Raises:
        ValueError: if the dataset is not a zero-shot split.
    """
    evaluator_type = MetadataCatalog.get(dataset_name).get("evaluator_type", None)
    if evaluator_type != EVALUATOR_TYPE:
        raise ValueError(
            f"dataset {dataset_name!r} has evaluator_type {evaluator_type!r}, not "
            f"{EVALUATOR_TYPE!r}: register it with ocz_d2.data.register_zero_shot_split or list "
            "its split file in DATASETS.SPLIT_FILES, and name it in DATASETS.TEST"
        )
    return ZeroShotSemSegEvaluator(dataset_name, output_dir=output_dir)
