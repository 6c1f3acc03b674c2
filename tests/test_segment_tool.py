"""tools/segment.py: open-vocabulary inference on any image with any class names."""

import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
TOOL = REPO / "tools" / "segment.py"
CONFIG = REPO / "configs" / "synthetic" / "ocz_tiny_attr.yaml"


def _run(*args):
    cmd = [sys.executable, str(TOOL), "--config-file", str(CONFIG), *args]
    return subprocess.run(cmd, capture_output=True, text=True)


def test_segment_any_names(tmp_path):
    rng = np.random.default_rng(0)
    image = tmp_path / "street.png"
    Image.fromarray(rng.integers(0, 255, (70, 100, 3), dtype=np.uint8)).save(image)
    out = tmp_path / "out"
    proc = _run(
        "--input", str(image), "--classes", "car, road, sky", "--output", str(out),
        "DATASETS.TRAIN", "()", "DATASETS.TEST", "()", "INPUT.MIN_SIZE_TEST", "64",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    seg = np.asarray(Image.open(out / "street_seg.png"))
    assert seg.shape == (70, 100)
    assert set(np.unique(seg)) <= {0, 1, 2}
    vis = Image.open(out / "street_vis.png")
    assert vis.size[0] == 100 and vis.size[1] > 70  # the legend is below the image


def test_segment_errors_are_clear(tmp_path):
    proc = _run("--input", str(tmp_path / "missing.png"), "--classes", " , ")
    assert proc.returncode != 0 and "--classes is empty" in proc.stderr
    proc = _run(
        "--input", str(tmp_path / "missing.png"), "--classes", "a, b",
        "DATASETS.TRAIN", "()", "DATASETS.TEST", "()",
    )  # fmt: skip
    assert proc.returncode != 0 and "cannot read image" in proc.stderr
