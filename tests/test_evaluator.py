"""ZeroShotSemSegEvaluator: hand-computed metrics, ignore handling, errors, two-process gloo run."""

import json
import math
import os
import re
import socket
import uuid
from datetime import timedelta

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.engine import launch
from detectron2.utils import comm
from PIL import Image

from ocz_d2.evaluation import (
    ZeroShotSemSegEvaluator,
    class_map,
    compute_zero_shot_metrics,
    harmonic_mean,
)
from ocz_d2.evaluation.zero_shot_evaluation import CONFUSION_FILE_NAME, METRICS_FILE_NAME

IGNORE = 255

# --- the hand-computed example -------------------------------------------------------------
# K = 4 classes; sky, road are seen; cow, boat are unseen. "boat" has no ground-truth pixel but
# is predicted once: it must be left out of every mean (Detectron2 v0.6 would count it as 0).
CLASSES = ["sky", "road", "cow", "boat"]
SEEN = [0, 1]
UNSEEN = [2, 3]

GT_1 = [
    [0, 0, 0, 1],
    [0, 0, 1, 1],
    [2, 2, IGNORE, 1],
]
PRED_1 = [
    [0, 0, 1, 1],
    [0, 0, 1, 1],
    [2, 0, 3, 3],
]
GT_2 = [
    [2, 2, 2],
    [0, IGNORE, 1],
]
PRED_2 = [
    [2, 2, 0],
    [0, 2, 1],
]
# conf[pred, gt], counted by hand from the four maps above; last row / column = ignore.
#                 gt: sky road cow boat ignore
EXPECTED_CONF = np.array(
    [
        [5, 0, 2, 0, 0],  # pred sky:  4 + 1 correct; cow pixels (2,1) of image 1, (0,2) of image 2
        [1, 4, 0, 0, 0],  # pred road: sky pixel (0,2) of image 1; 3 + 1 correct
        [0, 0, 3, 0, 1],  # pred cow:  1 + 2 correct; one ignore pixel of image 2
        [0, 1, 0, 0, 1],  # pred boat: road pixel (2,3) of image 1; one ignore pixel of image 1
        [0, 0, 0, 0, 0],  # never predicted
    ],
    dtype=np.int64,
)
# GT pixels: sky 6, road 5, cow 5, boat 0 (16 labelled); predicted on them: 7, 5, 3, 1.
# IoU = tp / (gt + pred - tp): sky 5/8, road 4/6, cow 3/5, boat undefined (no GT).
IOU = {"sky": 5 / 8, "road": 4 / 6, "cow": 3 / 5}
# Accuracy = tp / gt: sky 5/6, road 4/5, cow 3/5.
ACC = {"sky": 5 / 6, "road": 4 / 5, "cow": 3 / 5}
EXPECTED = {
    "mIoU": 100 * 227 / 360,  # (5/8 + 2/3 + 3/5) / 3 = (75 + 80 + 72) / 360  = 63.0556
    "mIoU-seen": 100 * 31 / 48,  # (5/8 + 2/3) / 2 = 31/48                        = 64.5833
    "mIoU-unseen": 60.0,  # cow only (boat has no GT)                                 = 60.0
    "hIoU": 100 * 186 / 299,  # 2 (31/48)(3/5) / (31/48 + 3/5) = 186/299           = 62.2074
    "seen-to-unseen": 100 / 11,  # of 11 sky + road pixels, one road pixel taken for boat
    "unseen-to-seen": 40.0,  # of 5 cow pixels, 2 taken for sky
    "pAcc": 75.0,  # (5 + 4 + 3) / 16
    "mACC": 100 * 67 / 90,  # (5/6 + 4/5 + 3/5) / 3 = (25 + 24 + 18) / 90              = 74.4444
    "fwIoU": 100 * 121 / 192,  # 6/16 * 5/8 + 5/16 * 2/3 + 5/16 * 3/5 = (45+40+36)/192 = 63.0208
}


def _write_png(path, array):
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path)


def _make_dataset(root, labels, class_names, seen=None, unseen=None, name=None):
    """Write images + label PNGs under ``root`` and register a zero-shot dataset; return its name.

    Args:
        labels: list of [H, W] label arrays (class indices, 255 ignore).
        seen, unseen: index lists put in the metadata; both None: a plain dataset.
    """
    name = name or f"ocz_test_eval_{uuid.uuid4().hex[:8]}"
    image_root = os.path.join(root, "images")
    sem_seg_root = os.path.join(root, "labels")
    os.makedirs(image_root, exist_ok=True)
    os.makedirs(sem_seg_root, exist_ok=True)
    rng = np.random.default_rng(0)
    for i, label in enumerate(labels):
        label = np.asarray(label)
        image = rng.integers(0, 256, size=(*label.shape, 3), dtype=np.uint8)
        Image.fromarray(image).save(os.path.join(image_root, f"{i:03d}.png"))
        _write_png(os.path.join(sem_seg_root, f"{i:03d}.png"), label)
    _register(name, root, class_names, seen, unseen)
    return name


def _register(name, root, class_names, seen, unseen):
    """Register (idempotently) the dataset written by :func:`_make_dataset`."""
    if name in DatasetCatalog.list():
        return
    image_root = os.path.join(root, "images")
    sem_seg_root = os.path.join(root, "labels")

    def load():
        dicts = []
        for i, fname in enumerate(sorted(os.listdir(sem_seg_root))):
            with Image.open(os.path.join(sem_seg_root, fname)) as im:
                width, height = im.size
            dicts.append(
                {
                    "file_name": os.path.join(image_root, fname),
                    "sem_seg_file_name": os.path.join(sem_seg_root, fname),
                    "height": height,
                    "width": width,
                    "image_id": i,
                    "dataset_name": name,
                }
            )
        return dicts

    DatasetCatalog.register(name, load)
    meta = {
        "stuff_classes": list(class_names),
        "ignore_label": IGNORE,
        "evaluator_type": "ocz_zero_shot_sem_seg",
        "image_root": image_root,
        "sem_seg_root": sem_seg_root,
        "class_embeddings": None,
        "split_file": None,
    }
    if seen is not None:
        meta.update(seen_classes=list(seen), unseen_classes=list(unseen))
    MetadataCatalog.get(name).set(**meta)


@pytest.fixture
def registered():
    """Collect dataset names registered by a test and remove them afterwards."""
    names = []
    yield names
    for name in names:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def _scores_from_pred(pred, num_classes, seed=0):
    """Random scores [K, H, W] whose per-pixel argmax is ``pred``."""
    pred = torch.as_tensor(np.asarray(pred), dtype=torch.int64)
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand((num_classes, *pred.shape), generator=gen)
    return scores.scatter(0, pred[None], 2.0)


def _assert_metrics_equal(actual, expected):
    assert list(actual) == list(expected)
    for key, value in expected.items():
        if math.isnan(value):
            assert math.isnan(actual[key]), key
        else:
            assert actual[key] == value, key


def test_metrics_equal_hand_computed_confusion_matrix(tmp_path, registered):
    name = _make_dataset(tmp_path, [GT_1, GT_2], CLASSES, SEEN, UNSEEN)
    registered.append(name)
    evaluator = ZeroShotSemSegEvaluator(name, output_dir=str(tmp_path / "eval"))
    evaluator.reset()
    dicts = DatasetCatalog.get(name)
    # One image per batch, as inference_on_dataset feeds a batch-1 test loader.
    evaluator.process([dicts[0]], [{"sem_seg": _scores_from_pred(PRED_1, 4, seed=1)}])
    evaluator.process([dicts[1]], [{"sem_seg": _scores_from_pred(PRED_2, 4, seed=2)}])
    results = evaluator.evaluate()

    np.testing.assert_array_equal(evaluator.confusion_matrix, EXPECTED_CONF)
    assert list(results) == ["sem_seg"]
    res = results["sem_seg"]
    for key, value in EXPECTED.items():
        assert res[key] == pytest.approx(value, abs=1e-9), key
    for cls in ("sky", "road", "cow"):
        assert res[f"IoU-{cls}"] == pytest.approx(100 * IOU[cls], abs=1e-9)
        assert res[f"ACC-{cls}"] == pytest.approx(100 * ACC[cls], abs=1e-9)
    assert math.isnan(res["IoU-boat"]) and math.isnan(res["ACC-boat"])
    assert all(isinstance(v, float) for v in res.values())  # EvalHook needs floats

    # The pure function gives the same numbers from the hand-written matrix, with or without
    # the ignore slot.
    pure = compute_zero_shot_metrics(
        EXPECTED_CONF, CLASSES, seen_classes=SEEN, unseen_classes=UNSEEN
    )
    _assert_metrics_equal(pure, res)
    pure_kk = compute_zero_shot_metrics(
        EXPECTED_CONF[:4, :4], CLASSES, seen_classes=SEEN, unseen_classes=UNSEEN
    )
    _assert_metrics_equal(pure_kk, res)

    # JSON written with NaN as null; the confusion matrix beside it.
    with open(tmp_path / "eval" / METRICS_FILE_NAME) as f:
        written = json.load(f)
    assert written["IoU-boat"] is None
    assert written["hIoU"] == pytest.approx(EXPECTED["hIoU"])
    np.testing.assert_array_equal(np.load(tmp_path / "eval" / CONFUSION_FILE_NAME), EXPECTED_CONF)

    # reset() starts a new round.
    evaluator.reset()
    assert evaluator.confusion_matrix.sum() == 0


def test_group_edge_cases_and_plain_dataset(tmp_path, registered):
    # Every prediction wrong: S = U = 0 -> hIoU is 0 (not NaN, not a division error).
    conf = np.array([[0, 3, 0], [2, 0, 0], [0, 0, 0]])
    res = compute_zero_shot_metrics(conf, ["a", "b"], seen_classes=[0], unseen_classes=[1])
    assert res["mIoU-seen"] == 0.0 and res["mIoU-unseen"] == 0.0 and res["hIoU"] == 0.0
    assert math.isnan(harmonic_mean(50.0, float("nan")))
    assert harmonic_mean(50.0, 100.0) == pytest.approx(200 / 3)

    # Plain dataset (no seen/unseen in the metadata): overall metrics only.
    name = _make_dataset(tmp_path, [GT_1, GT_2], CLASSES)
    registered.append(name)
    evaluator = ZeroShotSemSegEvaluator(name)
    dicts = DatasetCatalog.get(name)
    evaluator.process(dicts, [{"sem_seg": _scores_from_pred(p, 4)} for p in (PRED_1, PRED_2)])
    res = evaluator.evaluate()["sem_seg"]
    assert "mIoU-seen" not in res and "hIoU" not in res
    assert res["mIoU"] == pytest.approx(EXPECTED["mIoU"])

    # A split given as an argument; the unseen group is the complement of the seen one.
    evaluator = ZeroShotSemSegEvaluator(name, seen_classes=[0, 1])
    assert evaluator.unseen_classes == [2, 3]
    evaluator.process(dicts, [{"sem_seg": _scores_from_pred(p, 4)} for p in (PRED_1, PRED_2)])
    assert evaluator.evaluate()["sem_seg"]["hIoU"] == pytest.approx(EXPECTED["hIoU"])

    with pytest.raises(ValueError, match="both seen and unseen"):
        ZeroShotSemSegEvaluator(name, seen_classes=[0, 1], unseen_classes=[1, 2])
    with pytest.raises(ValueError, match="outside"):
        ZeroShotSemSegEvaluator(name, seen_classes=[0, 4])
    with pytest.raises(ValueError, match="num_classes=5"):
        ZeroShotSemSegEvaluator(name, num_classes=5)


def test_ignore_pixels_are_not_counted(tmp_path, registered):
    all_ignore = np.full((3, 4), IGNORE)
    name = _make_dataset(tmp_path, [GT_1, GT_2, all_ignore], CLASSES, SEEN, UNSEEN)
    registered.append(name)
    dicts = DatasetCatalog.get(name)

    def run(pred_1, pred_2, pred_3):
        evaluator = ZeroShotSemSegEvaluator(name)
        for record, pred in zip(dicts, (pred_1, pred_2, pred_3)):
            evaluator.process([record], [{"sem_seg": _scores_from_pred(pred, 4)}])
        return evaluator.evaluate()["sem_seg"], evaluator.confusion_matrix

    res, conf = run(PRED_1, PRED_2, np.zeros((3, 4)))
    # Change the predictions only where the label is ignore (and everywhere on the all-ignore
    # image): no metric may move.
    pred_1 = np.array(PRED_1)
    pred_1[2, 2] = 0
    pred_2 = np.array(PRED_2)
    pred_2[1, 1] = 1
    res_changed, conf_changed = run(pred_1, pred_2, np.full((3, 4), 3))
    _assert_metrics_equal(res_changed, res)
    for key, value in EXPECTED.items():
        assert res[key] == pytest.approx(value, abs=1e-9), key
    # Only the 16 labelled pixels enter the class block; the 1 + 1 + 12 ignored ones sit in the
    # ignore column.
    assert conf[:4, :4].sum() == 16 and conf_changed[:4, :4].sum() == 16
    assert conf[:, 4].sum() == 14

    # An evaluation with only ignore pixels gives NaN, not a crash.
    evaluator = ZeroShotSemSegEvaluator(name)
    evaluator.process([dicts[2]], [{"sem_seg": _scores_from_pred(np.zeros((3, 4)), 4)}])
    assert math.isnan(evaluator.evaluate()["sem_seg"]["mIoU"])


def test_label_from_tensor_when_no_file_name(tmp_path, registered):
    name = _make_dataset(tmp_path, [GT_1], CLASSES, SEEN, UNSEEN)
    registered.append(name)
    evaluator = ZeroShotSemSegEvaluator(name)
    inputs = [
        {"file_name": "x.png", "sem_seg": torch.as_tensor(GT_1)},
        {"file_name": "y.png", "sem_seg": torch.as_tensor(GT_2)},
    ]
    outputs = [{"sem_seg": _scores_from_pred(p, 4)} for p in (PRED_1, PRED_2)]
    evaluator.process(inputs, outputs)
    evaluator.evaluate()
    np.testing.assert_array_equal(evaluator.confusion_matrix, EXPECTED_CONF)


def test_bad_inputs_raise_clear_errors(tmp_path, registered):
    bad_label = np.array([[0, 4, 17], [255, 1, 2]])
    name = _make_dataset(tmp_path, [bad_label, GT_1], CLASSES, SEEN, UNSEEN)
    registered.append(name)
    dicts = DatasetCatalog.get(name)
    evaluator = ZeroShotSemSegEvaluator(name)

    # Out-of-range labels: the error names the file and the bad values, nothing is counted.
    bad_file = dicts[0]["sem_seg_file_name"]
    with pytest.raises(ValueError, match=re.escape(bad_file)) as info:
        evaluator.process([dicts[0]], [{"sem_seg": torch.zeros(4, 2, 3)}])
    assert "[4, 17]" in str(info.value)
    assert evaluator.confusion_matrix.sum() == 0

    # The same from a tensor label with a negative and a large value (the sorting path).
    label = torch.tensor([[0, -3, 1], [255, 70000, 2]])
    with pytest.raises(ValueError, match=r"values \[-3, 70000\]"):
        evaluator.process([{"sem_seg": label}], [{"sem_seg": torch.zeros(4, 2, 3)}])
    assert evaluator.confusion_matrix.sum() == 0

    # Prediction at the wrong size.
    with pytest.raises(ValueError, match=r"size \(4, 4\).*size \(3, 4\)"):
        evaluator.process([dicts[1]], [{"sem_seg": torch.zeros(4, 4, 4)}])
    # Scores over the wrong number of classes.
    with pytest.raises(ValueError, match="K=4"):
        evaluator.process([dicts[1]], [{"sem_seg": torch.zeros(5, 3, 4)}])
    # Not a dict output.
    with pytest.raises(TypeError, match="'sem_seg'"):
        evaluator.process([dicts[1]], [torch.zeros(4, 3, 4)])
    # No ground truth at all.
    with pytest.raises(KeyError, match="sem_seg_file_name"):
        evaluator.process([{"file_name": "a.png"}], [{"sem_seg": torch.zeros(4, 3, 4)}])


def test_class_map_is_the_argmax_with_ties_to_the_lowest_class():
    gen = torch.Generator().manual_seed(0)
    scores = torch.rand((7, 13, 11), generator=gen)
    # Exact ties between classes 2 and 5 (2 wins) and a row where the last class wins.
    scores[2, 0] = scores[5, 0] = 3.0
    scores[6, 1] = 4.0
    labels = class_map(scores)
    assert labels.dtype == torch.int64 and labels.shape == (13, 11)
    assert torch.equal(labels, scores.argmax(0))
    assert (labels[0] == 2).all() and (labels[1] == 6).all()
    # Quantised scores tie often: still the lowest index everywhere.
    coarse = (scores * 2).floor()
    assert torch.equal(class_map(coarse), coarse.argmax(0))
    with pytest.raises(ValueError, match=r"\[K, H, W\]"):
        class_map(scores[0])
    # More classes than uint8 ranks hold (ADE-847-sized vocabularies).
    many = torch.rand((300, 5, 4), generator=gen)
    many[299, 0, 0] = many[7, 0, 0] = 2.0
    assert torch.equal(class_map(many), many.argmax(0))
    assert class_map(many)[0, 0] == 7
    # NaN scores have no maximum: a clear error instead of a silent label.
    broken = scores.clone()
    broken[3, 2, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN at 1 pixels"):
        class_map(broken)


# --- two processes -------------------------------------------------------------------------
DIST_CLASSES = ["c0", "c1", "c2", "c3", "c4"]
DIST_SEEN = [0, 1, 2]
DIST_UNSEEN = [3, 4]


def _dist_scores(record):
    """Deterministic random scores [5, H, W] for a dataset record (same in every process)."""
    gen = torch.Generator().manual_seed(1000 + record["image_id"])
    return torch.rand((len(DIST_CLASSES), record["height"], record["width"]), generator=gen)


def _evaluate_records(name, records):
    evaluator = ZeroShotSemSegEvaluator(name)
    evaluator.reset()
    for record in records:
        evaluator.process([record], [{"sem_seg": _dist_scores(record)}])
    return evaluator.evaluate()


def _dist_worker(name, root, result_prefix):
    """Runs in each spawned process: evaluate this rank's half of the samples."""
    _register(name, root, DIST_CLASSES, DIST_SEEN, DIST_UNSEEN)
    rank, world = comm.get_rank(), comm.get_world_size()
    assert world == 2
    dicts = DatasetCatalog.get(name)
    half = (len(dicts) + 1) // 2
    mine = dicts[:half] if rank == 0 else dicts[half:]
    results = _evaluate_records(name, mine)
    with open(f"{result_prefix}.rank{rank}.json", "w") as f:
        json.dump(results, f)
    # Leave together and close the group: a rank exiting while gloo's threads still run aborts
    # ("terminate called without an active exception").
    comm.synchronize()
    torch.distributed.destroy_process_group()
    # The abort was still seen about once in 20 runs, at interpreter exit after this point (C++
    # destructors of the process group's threads). The results are written: leave without them.
    os._exit(0)


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_process_gloo_equals_single_process(tmp_path, registered, monkeypatch):
    rng = np.random.default_rng(7)
    labels = []
    for h, w in [(6, 8), (7, 5), (9, 9), (4, 10), (8, 6)]:
        label = rng.integers(0, 4, size=(h, w))  # class 4 never in the ground truth
        label[rng.random((h, w)) < 0.2] = IGNORE
        labels.append(label)
    name = f"ocz_test_eval_dist_{uuid.uuid4().hex[:8]}"
    _make_dataset(tmp_path, labels, DIST_CLASSES, DIST_SEEN, DIST_UNSEEN, name=name)
    registered.append(name)

    single = _evaluate_records(name, DatasetCatalog.get(name))["sem_seg"]
    assert math.isnan(single["IoU-c4"]) and not math.isnan(single["hIoU"])

    # Force the gloo backend in the children even on a machine with GPUs.
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    prefix = str(tmp_path / "result")
    launch(
        _dist_worker,
        num_gpus_per_machine=2,
        dist_url=f"tcp://127.0.0.1:{_free_port()}",
        args=(name, str(tmp_path), prefix),
        timeout=timedelta(seconds=120),
    )
    with open(f"{prefix}.rank0.json") as f:
        rank0 = json.load(f)
    with open(f"{prefix}.rank1.json") as f:
        rank1 = json.load(f)
    assert rank1 == {}
    assert list(rank0) == ["sem_seg"]
    _assert_metrics_equal(rank0["sem_seg"], single)

    # Each half alone gives different numbers: the gather really summed both ranks.
    dicts = DatasetCatalog.get(name)
    first_half = _evaluate_records(name, dicts[:3])["sem_seg"]
    assert first_half["mIoU"] != single["mIoU"]
