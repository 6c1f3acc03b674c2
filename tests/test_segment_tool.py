"""tools/segment.py: segment images (files, folders, globs) with any class names.

The tool's ``main(argv)`` runs in this process (a subprocess per call would spend seconds on
imports); its exit code and output are checked as a user would see them. The model is conftest's
``spread_checkpoint`` (tiny, random, several classes per segmentation; class names embedded by
the benchmark's attribute file).
"""

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from ocz_d2.utils.visualize import class_palette
from tools import segment

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "synthetic" / "ocz_tiny_attr.yaml"


def _run(capsys, *args, config=CONFIG):
    try:
        code = segment.main(["--config-file", str(config), *args])
        message = ""
    except SystemExit as e:  # argparse's exits, as a shell would see them
        code, message = (e.code, "") if isinstance(e.code, int) else (1, str(e.code))
    out = capsys.readouterr()
    return SimpleNamespace(returncode=code, stdout=out.out, stderr=out.err + message)


@pytest.fixture(scope="module")
def tool_setup(synthetic_benchmark, spread_checkpoint, tmp_path_factory):
    """Inputs (two benchmark images in a folder, one more elsewhere), the checkpoint and the
    config overrides that load it."""
    data = synthetic_benchmark
    base = tmp_path_factory.mktemp("segment_tool")
    weights = spread_checkpoint[2]
    files = sorted((Path(data.root) / "images" / "test").glob("*.png"))
    folder = base / "photos"
    folder.mkdir()
    shutil.copy(files[0], folder / "a.png")
    shutil.copy(files[1], folder / "b.png")
    (folder / "notes.txt").write_text("not an image, and not taken from a folder")
    other = base / "more"
    other.mkdir()
    # same stem as photos/a.png, another size (cropped)
    Image.open(files[2]).crop((0, 0, 48, 40)).save(other / "a.png")
    opts = data.predictor_overrides(**{"MODEL.WEIGHTS": weights})
    return SimpleNamespace(data=data, folder=folder, other=other, opts=opts, weights=weights)


def solid_colors(picture: np.ndarray, palette: np.ndarray, side: int = 5) -> set[int]:
    """Classes whose exact colour fills a ``side`` x ``side`` block somewhere: the legend's
    opaque swatches (the overlay blends colours with the image; text edges are thin)."""
    found = set()
    for k, color in enumerate(palette):
        mask = (picture == color).all(-1).astype(np.int64)
        sums = np.pad(mask, ((1, 0), (1, 0))).cumsum(0).cumsum(1)
        blocks = (
            sums[side:, side:] - sums[:-side, side:] - sums[side:, :-side] + sums[:-side, :-side]
        )
        if (blocks == side * side).any():
            found.add(k)
    return found


def test_outputs_exist_and_agree(tool_setup, tmp_path, capsys):
    s = tool_setup
    classes = list(s.data.classes)
    vocab_file = tmp_path / "vocab.txt"
    # the last class with a synonym (both names are in the attribute file)
    vocab_file.write_text(
        "# the benchmark's classes\n" + "\n".join(classes[:-2]) + f"\n{classes[-2]}|{classes[-1]}\n"
    )
    out = tmp_path / "out"
    proc = _run(
        capsys,
        "--input", str(s.folder), str(s.other / "*.png"), "--vocab-file", str(vocab_file),
        "--output", str(out), "--batch-size", "2", *s.opts,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "3/3" in proc.stderr  # the progress bar reached the end
    names = ["a", "b", "a-2"]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        f"{n}{suffix}" for n in names for suffix in ("_labels.png", "_overlay.png", ".json")
    )
    palette = class_palette(len(classes) - 1)
    all_present = set()
    for name, source in zip(names, [s.folder / "a.png", s.folder / "b.png", s.other / "a.png"]):
        summary = json.loads((out / f"{name}.json").read_text())
        labels = np.asarray(Image.open(out / f"{name}_labels.png"))
        image = Image.open(source)
        assert summary["input"] == str(source.resolve())
        assert labels.dtype == np.uint8 and labels.shape == (image.height, image.width)
        assert (summary["height"], summary["width"]) == labels.shape
        assert [c["name"] for c in summary["classes"]] == classes[:-1]
        assert summary["classes"][-1]["synonyms"] == classes[-2:]
        pixels = np.bincount(labels.ravel(), minlength=len(classes) - 1)
        assert [c["pixels"] for c in summary["classes"]] == pixels.tolist()
        assert sum(c["fraction"] for c in summary["classes"]) == pytest.approx(1.0)
        present = [int(k) for k in np.unique(labels)]
        assert summary["legend"] == [classes[k] for k in present]
        overlay = np.asarray(Image.open(out / f"{name}_overlay.png").convert("RGB"))
        assert overlay.shape[1] > 512 and overlay.shape[0] > 400  # enlarged, legend at the right
        assert solid_colors(overlay, palette) == set(present)
        assert all(c["mean_score"] is None for c in summary["classes"] if not c["pixels"])
        assert summary["calibration"] is None and summary["weights"] == s.weights
        all_present |= set(present)
    assert len(all_present) >= 3, "the spread model should use several classes"


def test_unreadable_images_are_skipped(tool_setup, tmp_path, capsys):
    s = tool_setup
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG but not really")
    out = tmp_path / "out"
    proc = _run(
        capsys,
        "--input", str(bad), str(s.folder / "a.png"), str(tmp_path / "absent.jpg"),
        "--classes", ", ".join(s.data.classes[:4]), "--output", str(out), *s.opts,
    )  # fmt: skip
    assert proc.returncode == 1
    assert f"cannot read image {bad}" in proc.stderr
    assert f"cannot read image {tmp_path / 'absent.jpg'}" in proc.stderr
    assert "2 input(s) failed" in proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["a.json", "a_labels.png", "a_overlay.png"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--classes", " , "], "--classes is empty"),
        (["--classes", "cat, dog, Cat"], "'Cat' is given in classes 1 and 3"),
        (["--classes", "sofa|couch, couch"], "'couch' is given in classes 1 and 2"),
        (["--vocab-file", "EMPTY"], "holds no class name"),
        (["--vocab-file", "ABSENT"], "does not exist"),
        (["--classes", "cat", "MODEL.WEIGHTS", ""], "MODEL.WEIGHTS is empty"),
        (["--classes", "cat", "MODEL.WEIGHTS", "ABSENT"], "does not exist"),
        (["--classes", "cat", "--calibration", "ocz_no_such_split"], "not a registered"),
    ],
)
def test_argument_errors(tool_setup, tmp_path, capsys, args, message):
    empty = tmp_path / "empty.txt"
    empty.write_text("# no class\n\n")
    args = [{"EMPTY": str(empty), "ABSENT": str(tmp_path / "absent")}.get(a, a) for a in args]
    out = tmp_path / "out"
    opts = tool_setup.opts
    if "MODEL.WEIGHTS" in args:
        opts = opts[:-2]  # the case's own MODEL.WEIGHTS
    proc = _run(capsys, "--input", str(tool_setup.folder), "--output", str(out), *args, *opts)
    assert proc.returncode == 2
    assert message in proc.stderr, proc.stderr[-2000:]
    assert not out.exists()  # stopped before any image


def test_calibration_is_recorded(tool_setup, tmp_path, capsys):
    s = tool_setup
    seen, unseen = s.data.classes[s.data.seen_ids[0]], s.data.classes[s.data.unseen_ids[0]]
    out = tmp_path / "out"
    proc = _run(
        capsys,
        "--input", str(s.folder / "b.png"), "--classes", f"{unseen}, {seen}",
        "--calibration", s.data.val_name, "--output", str(out), *s.opts,
        "MODEL.OCZ.TEST.CALIBRATION", "0.25",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((out / "b.json").read_text())
    assert summary["calibration"] == {"dataset": s.data.val_name, "gamma": 0.25}
    assert [c["calibrated"] for c in summary["classes"]] == [False, True]


def test_untrained_smoke_run_with_the_text_tower(synthetic_benchmark, tmp_path, capsys):
    """--allow-untrained: random heads, names through the random tiny text tower."""
    rng = np.random.default_rng(0)
    image = tmp_path / "street.png"
    Image.fromarray(rng.integers(0, 255, (70, 100, 3), dtype=np.uint8)).save(image)
    out = tmp_path / "out"
    opts = synthetic_benchmark.predictor_overrides(**{"MODEL.OCZ.TEXT.EMBEDDINGS_FILE": ""})
    proc = _run(
        capsys,
        "--input", str(image), "--classes", "car, road|street, sky", "--output", str(out),
        "--allow-untrained", *opts,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "untrained" in proc.stderr
    labels = np.asarray(Image.open(out / "street_labels.png"))
    assert labels.shape == (70, 100) and set(np.unique(labels)) <= {0, 1, 2}
    summary = json.loads((out / "street.json").read_text())
    assert summary["classes"][1]["synonyms"] == ["road", "street"]
