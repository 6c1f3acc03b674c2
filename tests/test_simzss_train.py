"""SimZSS end to end: a few iterations of tools/train_net.py on a generated caption set, its
evaluation by the zero-shot evaluator, --eval-only, and segmenting with the predictor."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from detectron2.modeling import build_model
from PIL import Image

from ocz_d2.config import load_config
from ocz_d2.data import register_split_file
from ocz_d2.engine import AtomicCheckpointer, ZeroShotPredictor
from ocz_d2.evaluation.protocol import tuned_test
from ocz_d2.miniature.synthetic import ensure_pretraining_set
from ocz_d2.utils.errors import ArgumentError
from tools import segment

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "synthetic" / "simzss_tiny.yaml"
BANK = REPO / "ocz_d2" / "data" / "splits" / "synthetic_concepts.txt"


@pytest.fixture(scope="module")
def simzss_run(synthetic_benchmark, tmp_path_factory):
    """(overrides, output folder, env) of a 3-iteration SimZSS run on the tiny benchmark's
    16 image-caption pairs, evaluated on its val split over all 16 classes."""
    data = synthetic_benchmark
    folder = tmp_path_factory.mktemp("simzss")
    captions = folder / "captions.yaml"
    # Rendered on first use (here, unless a test before rendered it in this process).
    pairs = ensure_pretraining_set(data.root, workers=1)
    captions.write_text(
        f"kind: captions\ndataset: test_simzss_caps\nconcept_bank: {BANK}\n"
        f"splits:\n  pretrain:\n    csv: {pairs}\n"
    )
    segmentation = data.root / "split.yaml"  # class names through the text tower
    register_split_file(segmentation, root=data.root.parent)
    register_split_file(captions)
    out = folder / "run"
    opts = {
        "DATASETS.SPLIT_FILES": f"['{captions}', '{segmentation}']",
        "DATASETS.TRAIN": "('ocz_test_simzss_caps_pretrain',)",
        "DATASETS.TEST": "('ocz_test_synthetic_val',)",
        "DATASETS.VAL": "('ocz_test_synthetic_val',)",
        "INPUT.CROP.SIZE": "(64, 64)",
        "INPUT.MIN_SIZE_TEST": 64,
        "MODEL.OCZ.CLIP.WEIGHTS": "",  # a random tiny CLIP image tower: no download
        "SOLVER.IMS_PER_BATCH": 4,
        "SOLVER.MAX_ITER": 3,
        "SOLVER.WARMUP_ITERS": 1,
        "SOLVER.CHECKPOINT_PERIOD": 2,
        "OUTPUT_DIR": str(out),
    }
    opts = [str(x) for kv in opts.items() for x in kv]
    env = dict(os.environ, DETECTRON2_DATASETS=str(data.root.parent), OMP_NUM_THREADS="1")
    env["CUDA_VISIBLE_DEVICES"] = ""
    cmd = [sys.executable, str(REPO / "tools" / "train_net.py"), "--config-file", str(CONFIG)]
    proc = subprocess.run(cmd + opts, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return opts, out, env, cmd


def test_train_net_trains_and_evaluates(simzss_run):
    opts, out, env, cmd = simzss_run
    assert (out / "model_final.pth").is_file()
    metrics_file = out / "inference" / "ocz_test_synthetic_val" / "zero_shot_sem_seg_metrics.json"
    metrics = json.loads(metrics_file.read_text())
    assert {"mIoU", "mIoU-seen", "mIoU-unseen", "hIoU"} <= set(metrics)
    log = (out / "log.txt").read_text()
    assert "loss_global" in log and "loss_concept" in log
    # --eval-only of the written model gives the same numbers
    eval_out = out.parent / "eval"
    again = opts[:-1] + [str(eval_out), "MODEL.WEIGHTS", str(out / "model_final.pth")]
    proc = subprocess.run(cmd + ["--eval-only"] + again, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    evaluated = json.loads(
        (eval_out / "inference" / "ocz_test_synthetic_val" / metrics_file.name).read_text()
    )
    assert evaluated["mIoU"] == pytest.approx(metrics["mIoU"])


def test_predictor_segments_with_the_trained_model(simzss_run, synthetic_benchmark):
    opts, out, _, _ = simzss_run
    cfg = load_config(CONFIG, opts + ["MODEL.WEIGHTS", str(out / "model_final.pth")])
    predictor = ZeroShotPredictor(cfg)
    image = np.random.default_rng(0).integers(0, 256, (48, 80, 3), dtype=np.uint8)
    result = predictor(image, ["orange plain", "blue dotted", "sky|air"])
    assert result.labels.shape == (48, 80) and result.scores.shape == (3, 48, 80)
    assert set(np.unique(result.labels)) <= {0, 1, 2}
    assert result.calibrated.size == 0  # SimZSS has no seen-class calibration
    # ZegFormer's ensemble classifies segments: a patch-text model has none, and says so.
    predictor.segment_clip = True
    with pytest.raises(ArgumentError, match="no segments to classify"):
        predictor(image, ["orange plain", "blue dotted"])


def test_segment_tool_runs_the_simzss_model(simzss_run, synthetic_benchmark, tmp_path, capsys):
    opts, out, _, _ = simzss_run
    image = sorted((Path(synthetic_benchmark.root) / "images" / "test").glob("*.png"))[0]
    argv = ["--config-file", str(CONFIG), "--input", str(image), "--classes", "orange plain, sky"]
    argv += ["--output", str(tmp_path), *opts, "MODEL.WEIGHTS", str(out / "model_final.pth")]
    assert segment.main(argv) == 0, capsys.readouterr().err
    labels = np.asarray(Image.open(tmp_path / f"{image.stem}_labels.png"))
    assert labels.shape == Image.open(image).size[::-1] and set(np.unique(labels)) <= {0, 1}
    record = json.loads((tmp_path / f"{image.stem}.json").read_text())
    assert [c["name"] for c in record["classes"]] == ["orange plain", "sky"]


def test_tuned_protocol_evaluates_simzss_without_calibration(simzss_run, tmp_path):
    opts, out, _, _ = simzss_run
    cfg = load_config(CONFIG, opts + ["DATALOADER.NUM_WORKERS", "0"])
    cfg.freeze()
    model = build_model(cfg)
    AtomicCheckpointer(model).load(str(out / "model_final.pth"))
    result = tuned_test(cfg, model, tmp_path)
    assert result["calibration"] == 0.0 and list(result["val"]["ocz_test_synthetic_val"]) == ["0.0"]
    assert "background_threshold" not in result  # no background class: nothing to tune
    assert set(result["test"]) == {"ocz_test_synthetic_val"}
