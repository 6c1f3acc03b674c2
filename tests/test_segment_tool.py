"""tools/segment.py: open-vocabulary inference on any image with any class names.

The tool's ``main(argv)`` runs in this process (a subprocess per call would spend seconds on
imports); its exit code and output are checked as a user would see them.
"""

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
TOOL = REPO / "tools" / "segment.py"
CONFIG = REPO / "configs" / "synthetic" / "ocz_tiny_attr.yaml"


def _load_tool():
    spec = importlib.util.spec_from_file_location("segment_tool", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(capsys, *args):
    try:
        code = _load_tool().main(["--config-file", str(CONFIG), *args])
        message = ""
    except SystemExit as e:  # the tool's error exits, as a shell would see them
        code, message = (e.code, "") if isinstance(e.code, int) else (1, str(e.code))
    out = capsys.readouterr()
    return SimpleNamespace(returncode=code, stdout=out.out, stderr=out.err + message)


def test_segment_any_names(tmp_path, capsys):
    rng = np.random.default_rng(0)
    image = tmp_path / "street.png"
    Image.fromarray(rng.integers(0, 255, (70, 100, 3), dtype=np.uint8)).save(image)
    out = tmp_path / "out"
    proc = _run(
        capsys,
        "--input", str(image), "--classes", "car, road, sky", "--output", str(out),
        "DATASETS.TRAIN", "()", "DATASETS.TEST", "()", "INPUT.MIN_SIZE_TEST", "64",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    seg = np.asarray(Image.open(out / "street_seg.png"))
    assert seg.shape == (70, 100)
    assert set(np.unique(seg)) <= {0, 1, 2}
    vis = Image.open(out / "street_vis.png")
    assert vis.size[0] == 100 and vis.size[1] > 70  # the legend is below the image


def test_segment_errors_are_clear(tmp_path, capsys):
    proc = _run(capsys, "--input", str(tmp_path / "missing.png"), "--classes", " , ")
    assert proc.returncode != 0 and "--classes is empty" in proc.stderr
    proc = _run(
        capsys,
        "--input", str(tmp_path / "missing.png"), "--classes", "a, b",
        "DATASETS.TRAIN", "()", "DATASETS.TEST", "()",
    )  # fmt: skip
    assert proc.returncode != 0 and "cannot read image" in proc.stderr
