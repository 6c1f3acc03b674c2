"""Issue 23, reliability for users: silent wrong runs, errors that name the problem, user errors
without a traceback, leftovers, exact resume, noise.

``tools/train_net.py`` runs as a user runs it where it trains (a subprocess, on the generated
64-pixel benchmark of conftest); errors that stop it before any model is built are checked in
this process through its ``main(argv)`` (no subprocess start-up).
"""

from __future__ import annotations

import importlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ocz_d2.engine.cli import check_overrides, run_tool
from ocz_d2.utils.errors import ArgumentError, DataError, UserError

REPO = Path(__file__).resolve().parents[1]
TRAIN_NET = REPO / "tools" / "train_net.py"
CONFIG = REPO / "configs" / "synthetic" / "ocz_tiny_attr.yaml"
METRICS = "zero_shot_sem_seg_metrics.json"
ANSI = "\x1b["


def _tool(name: str):
    """tools/<name>.py as a module (tools/ is a package; pytest puts the repository root first on
    sys.path)."""
    return importlib.import_module(f"tools.{name}")


def _env(data, **extra) -> dict:
    env = dict(os.environ)
    env.update(
        DETECTRON2_DATASETS=str(Path(data.root).parent),
        OMP_NUM_THREADS="1",
        CUDA_VISIBLE_DEVICES="",
    )
    env.pop("OCZ_D2_DEBUG", None)
    env.update(extra)
    return env


def _train_net(data, out: Path, *flags, env=None, check=True, opts=(), **overrides):
    """Run tools/train_net.py (a subprocess) on the tiny benchmark."""
    cmd = [sys.executable, str(TRAIN_NET), "--config-file", str(CONFIG), *flags]
    cmd += data.tiny_run_overrides(OUTPUT_DIR=out, **overrides) + list(opts)
    proc = subprocess.run(cmd, env=env or _env(data), capture_output=True, text=True)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _in_process(capsys, monkeypatch, data, *argv) -> tuple[int, str]:
    """tools/train_net.py's main in this process: (status, stderr)."""
    # Split files resolve against it: the benchmark's splits register as conftest did.
    monkeypatch.setenv("DETECTRON2_DATASETS", str(Path(data.root).parent))
    monkeypatch.delenv("OCZ_D2_DEBUG", raising=False)
    status = _tool("train_net").main([str(a) for a in argv])
    return status, capsys.readouterr().err


# ----------------------------------------------------------------------------- 1. silent runs
def test_eval_only_without_weights_stops(synthetic_benchmark, tmp_path, capsys, monkeypatch):
    opts = synthetic_benchmark.tiny_run_overrides(OUTPUT_DIR=tmp_path / "eval")
    status, err = _in_process(
        capsys, monkeypatch, synthetic_benchmark, "--config-file", CONFIG, "--eval-only", *opts
    )
    assert status == 2
    assert err.startswith("error: --eval-only needs a trained model, but MODEL.WEIGHTS is empty")
    assert "--allow-untrained" in err and "Traceback" not in err
    assert not (tmp_path / "eval").exists()  # stopped before anything was written


def test_tuned_test_without_a_val_split_stops_before_training(
    synthetic_benchmark, tmp_path, capsys, monkeypatch
):
    opts = synthetic_benchmark.tiny_run_overrides(OUTPUT_DIR=tmp_path / "run")
    argv = ("--config-file", CONFIG, "--tuned-test", *opts, "DATASETS.VAL", "()")
    status, err = _in_process(capsys, monkeypatch, synthetic_benchmark, *argv)
    assert status == 2 and "Traceback" not in err
    assert err.startswith("error: DATASETS.VAL must name exactly one split to tune the calibration")
    assert not (tmp_path / "run").exists()  # stopped before anything was written


def test_eval_only_weight_rules(synthetic_benchmark, spread_checkpoint, tmp_path, monkeypatch):
    """--allow-untrained, or --resume with a checkpoint in OUTPUT_DIR, replace MODEL.WEIGHTS;
    a MODEL.WEIGHTS that does not exist is named before any model is built."""
    from ocz_d2.config import load_config
    from ocz_d2.engine.cli import check_run_inputs
    from ocz_d2.utils.errors import MissingFileError

    monkeypatch.setenv("DETECTRON2_DATASETS", str(Path(synthetic_benchmark.root).parent))
    out = tmp_path / "run"
    cfg = load_config(CONFIG, synthetic_benchmark.tiny_run_overrides(OUTPUT_DIR=out))
    with pytest.raises(ArgumentError, match="--eval-only needs a trained model"):
        check_run_inputs(cfg, train=False, eval_only=True)
    check_run_inputs(cfg, train=False, eval_only=True, allow_untrained=True)
    with pytest.raises(ArgumentError):
        check_run_inputs(cfg, train=False, eval_only=True, resume=True)  # nothing to resume
    out.mkdir()
    (out / "last_checkpoint").write_text("model_final.pth")
    with pytest.raises(MissingFileError, match="names model_final.pth, which does not exist"):
        check_run_inputs(cfg, train=False, eval_only=True, resume=True)
    shutil.copy(spread_checkpoint[2], out / "model_final.pth")
    check_run_inputs(cfg, train=False, eval_only=True, resume=True)
    cfg.MODEL.WEIGHTS = str(tmp_path / "absent.pth")
    with pytest.raises(MissingFileError, match="absent.pth' does not exist"):
        check_run_inputs(cfg, train=True)


@pytest.fixture(scope="module")
def resumed_run(synthetic_benchmark, tmp_path_factory):
    """A run started with --resume in an empty folder holding stale partial files (keeping 2
    periodic checkpoints), then the state a kill while writing model_final leaves (the tag on
    the last periodic checkpoint, a partial temporary file), resumed."""
    data = synthetic_benchmark
    out = tmp_path_factory.mktemp("resumed") / "run"
    out.mkdir()
    stale = [out / ".tmp-k3x_9q2a-model_0000003.pth", out / ".tmp-0abc12de-last_checkpoint"]
    stale[0].write_bytes(os.urandom(3_600_000))  # a 3.6 MB partial checkpoint
    stale[1].write_bytes(b"model_00")
    keep = out / ".tmp-notes.txt"  # not one of ours
    keep.write_text("mine")
    settings = {
        "SOLVER.MAX_ITER": 6,
        "SOLVER.CHECKPOINT_PERIOD": 1,
        "SOLVER.CHECKPOINT_MAX_TO_KEEP": 2,
    }
    first = _train_net(data, out, "--resume", **settings)
    files_after_first = sorted(p.name for p in out.iterdir() if p.suffix == ".pth")
    # A kill while model_final is written: the tag names model_0000005, model_final is a
    # partial temporary file.
    (out / "model_final.pth").unlink()
    (out / "last_checkpoint").write_text("model_0000005.pth")
    partial = out / ".tmp-zz9y8x7w-model_final.pth"
    partial.write_bytes(os.urandom(1_000_000))
    (out / "inference").rename(out / "inference_first")
    second = _train_net(data, out, "--resume", **settings)
    return {
        "out": out,
        "first": first,
        "second": second,
        "stale": [*stale, partial],
        "keep": keep,
        "files_after_first": files_after_first,
    }


@pytest.mark.slow
def test_resume_without_checkpoint_warns_once(resumed_run):
    err = resumed_run["first"].stderr + resumed_run["first"].stdout
    warnings = [line for line in err.splitlines() if "WARNING" in line and "--resume" in line]
    assert len(warnings) == 1, warnings
    assert str(resumed_run["out"]) in warnings[0] and "from scratch" in warnings[0]
    assert "Starting training from iteration 0" in err


@pytest.mark.slow
def test_resumed_run_at_max_iter_writes_model_final(resumed_run):
    out = resumed_run["out"]
    log = resumed_run["second"].stderr + resumed_run["second"].stdout
    assert "Starting training from iteration 6" in log
    assert (out / "model_final.pth").is_file()
    assert (out / "last_checkpoint").read_text() == "model_final.pth"
    assert (out / "inference" / "ocz_test_synthetic_attr_val" / METRICS).is_file()
    final = torch.load(out / "model_final.pth", map_location="cpu", weights_only=True)
    assert final["iteration"] == 5


@pytest.mark.slow
def test_stale_temporaries_are_removed(resumed_run):
    assert not any(p.exists() for p in resumed_run["stale"])
    assert resumed_run["keep"].read_text() == "mine"


@pytest.mark.slow
def test_checkpoint_max_to_keep(resumed_run):
    assert resumed_run["files_after_first"] == [
        "model_0000004.pth",
        "model_0000005.pth",
        "model_final.pth",
    ]


@pytest.mark.slow
def test_no_colour_codes_nor_jit_warnings(resumed_run):
    log = (resumed_run["out"] / "log.txt").read_text()
    assert "Running with full config" in log and ANSI not in log
    first = resumed_run["first"]
    assert ANSI not in first.stdout + first.stderr  # not a terminal
    assert "torch.jit.script" not in first.stderr


# ------------------------------------------------------------------ 2. errors that name the problem
@pytest.fixture(scope="module")
def truncated(spread_checkpoint, tmp_path_factory) -> Path:
    whole = Path(spread_checkpoint[2]).read_bytes()
    path = tmp_path_factory.mktemp("bad_weights") / "model_final.pth"
    path.write_bytes(whole[: len(whole) // 2])
    return path


@pytest.mark.slow
def test_truncated_checkpoint_in_train_net(synthetic_benchmark, truncated, tmp_path):
    proc = _train_net(
        synthetic_benchmark,
        tmp_path / "eval",
        "--eval-only",
        check=False,
        **{"MODEL.WEIGHTS": truncated},
    )
    size = truncated.stat().st_size
    assert proc.returncode == 2
    assert f"error: cannot read checkpoint {truncated} ({size:,} bytes)" in proc.stderr
    assert "interrupted download or copy" in proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr


def test_truncated_checkpoint_in_segment(synthetic_benchmark, truncated, tmp_path, capsys):
    tool = _tool("segment")
    image = sorted((Path(synthetic_benchmark.root) / "images" / "test").glob("*.png"))[0]
    opts = synthetic_benchmark.predictor_overrides(**{"MODEL.WEIGHTS": truncated})
    status = tool.main(
        ["--config-file", str(CONFIG), "--input", str(image), "--classes", "a, b"]
        + ["--output", str(tmp_path / "out"), *opts]
    )
    err = capsys.readouterr().err
    assert status == 2
    assert err.startswith(f"error: cannot read checkpoint {truncated} (")


def test_segment_flag_after_overrides(synthetic_benchmark, spread_checkpoint, tmp_path, capsys):
    tool = _tool("segment")
    image = sorted((Path(synthetic_benchmark.root) / "images" / "test").glob("*.png"))[0]
    opts = synthetic_benchmark.predictor_overrides(**{"MODEL.WEIGHTS": spread_checkpoint[2]})
    args = ["--config-file", str(CONFIG), "--input", str(image), "--output", str(tmp_path / "o")]
    status = tool.main([*args, "--classes", "a, b", *opts, "--batch-size", "2"])
    err = capsys.readouterr().err
    assert status == 2
    assert err.startswith("error: --batch-size comes after the config overrides"), err
    with pytest.raises(SystemExit) as exit_info:  # argparse misses --classes: it says why
        tool.main([*args, *opts, "--classes", "a, b"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "error: --classes comes after the config overrides: flags go before them" in err


def test_unregistered_dataset_suggests_names(synthetic_benchmark, tmp_path, capsys, monkeypatch):
    opts = synthetic_benchmark.tiny_run_overrides(
        OUTPUT_DIR=tmp_path / "run", **{"DATASETS.TRAIN": "('ocz_test_synthetic_atr_train',)"}
    )
    status, err = _in_process(
        capsys, monkeypatch, synthetic_benchmark, "--config-file", CONFIG, *opts
    )
    assert status == 2
    assert err.startswith(
        "error: DATASETS.TRAIN: dataset 'ocz_test_synthetic_atr_train' is not registered. "
        "Did you mean 'ocz_test_synthetic_attr_train'"
    )
    assert "DATASETS.SPLIT_FILES" in err and "coco_2017_train" not in err


def test_flag_after_overrides(synthetic_benchmark, tmp_path, capsys, monkeypatch):
    opts = synthetic_benchmark.tiny_run_overrides(OUTPUT_DIR=tmp_path / "run")
    status, err = _in_process(
        capsys, monkeypatch, synthetic_benchmark, "--config-file", CONFIG, *opts, "--eval-only"
    )
    assert status == 2
    assert err.startswith("error: --eval-only comes after the config overrides: flags go before")
    with pytest.raises(ArgumentError, match="--resume comes after"):
        check_overrides(["SOLVER.MAX_ITER", "3", "--resume"])
    check_overrides(["SOLVER.BASE_LR", "-1"])  # a negative value is not a flag


@pytest.mark.slow
@pytest.mark.parametrize(
    "config", ["synthetic/ocz_tiny_attr.yaml", "voc/oczss_vitb16_bs16_20k.yaml"]
)
def test_missing_datasets_are_named_before_the_model(synthetic_benchmark, tmp_path, config):
    """An empty DETECTRON2_DATASETS: the missing image folder is named, before any model is
    built or CLIP weights fetched (the VOC config would download CLIP first)."""
    empty = tmp_path / "datasets"
    empty.mkdir()
    cmd = [sys.executable, str(TRAIN_NET), "--config-file", str(REPO / "configs" / config)]
    cmd += ["OUTPUT_DIR", str(tmp_path / "out")]
    env = _env(synthetic_benchmark, DETECTRON2_DATASETS=str(empty))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    line = next(x for x in proc.stderr.splitlines() if x.startswith("error:"))
    assert f"image folder {empty}" in line and "DETECTRON2_DATASETS" in line, line
    assert "class-embedding" not in line and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()  # stopped before the setup, the model, the weights


def test_zero_byte_images_and_labels_are_called_empty(synthetic_benchmark, tmp_path):
    from detectron2.data import DatasetCatalog

    from ocz_d2.data import read_label_map, register_zero_shot_split, unregister_zero_shot_split
    from ocz_d2.engine import load_image

    data = synthetic_benchmark
    images, labels = tmp_path / "images", tmp_path / "labels"
    shutil.copytree(Path(data.root) / "images" / "val", images)
    shutil.copytree(Path(data.root) / "labels" / "val", labels)
    victim = sorted(images.iterdir())[0]
    victim.write_bytes(b"")
    name = register_zero_shot_split(
        "test_empty_image",
        image_root=images,
        label_root=labels,
        classes=list(data.classes),
        unseen=list(data.unseen),
        lazy=True,
    )
    try:
        with pytest.raises(DataError, match=f"{victim}: the file is empty \\(0 bytes\\)"):
            DatasetCatalog.get(name)
    finally:
        unregister_zero_shot_split(name)
    with pytest.raises(DataError, match="the file is empty"):
        load_image(victim)
    label = sorted(labels.iterdir())[0]
    label.write_bytes(b"")
    with pytest.raises(DataError, match=f"{label}: the file is empty"):
        read_label_map(str(label))


# --------------------------------------------------------------------- 3. user errors, bugs
def test_run_tool_status_debug_and_bugs(monkeypatch, capsys):
    def user_error():
        raise DataError("label x.png has values [200]: convert it")

    monkeypatch.delenv("OCZ_D2_DEBUG", raising=False)
    assert run_tool(user_error) == 2
    assert capsys.readouterr().err == "error: label x.png has values [200]: convert it\n"
    with pytest.raises(DataError):
        run_tool(user_error, debug=True)
    monkeypatch.setenv("OCZ_D2_DEBUG", "1")
    with pytest.raises(DataError):
        run_tool(user_error)
    monkeypatch.delenv("OCZ_D2_DEBUG")
    with pytest.raises(ZeroDivisionError):  # a bug keeps its traceback
        run_tool(lambda: 1 / 0)
    # A user error raised in a DataLoader worker arrives with the worker's traceback inside.
    wrapped = DataError(
        "Caught DataError in DataLoader worker process 0.\nOriginal Traceback (most recent call "
        'last):\n  File "x.py", line 1, in f\nocz_d2.utils.errors.DataError: bad label y.png'
    )
    assert run_tool(lambda: (_ for _ in ()).throw(wrapped)) == 2
    assert capsys.readouterr().err == "error: bad label y.png\n"
    assert issubclass(DataError, UserError) and issubclass(DataError, ValueError)


@pytest.fixture(scope="module")
def bad_label_split(synthetic_benchmark, tmp_path_factory) -> Path:
    """A split file whose training labels hold a value beyond the 16 classes."""
    data = synthetic_benchmark
    root = tmp_path_factory.mktemp("bad_labels")
    for kind in ("images", "labels"):
        shutil.copytree(Path(data.root) / kind / "train", root / kind / "train")
    for path in (root / "labels" / "train").iterdir():
        label = np.asarray(Image.open(path)).copy()
        label[0, 0] = 200
        Image.fromarray(label).save(path)
    split = root / "split.yaml"
    split.write_text(
        json.dumps(
            {
                "dataset": "test_bad_labels",
                "classes": list(data.classes),
                "unseen": list(data.unseen),
                "splits": {
                    "train": {
                        "image_root": str(root / "images" / "train"),
                        "label_root": str(root / "labels" / "train"),
                    }
                },
            }
        )
    )
    return split


@pytest.mark.slow
@pytest.mark.parametrize("debug", [False, True])
def test_bad_label_in_training(synthetic_benchmark, bad_label_split, tmp_path, debug):
    data = synthetic_benchmark
    overrides = {
        "DATASETS.SPLIT_FILES": f"['{data.split_file}', '{bad_label_split}']",
        "DATASETS.TRAIN": "('ocz_test_bad_labels_train',)",
        "SOLVER.MAX_ITER": 2,
    }
    flags = ["--debug"] if debug else []
    proc = _train_net(data, tmp_path / "run", *flags, check=False, **overrides)
    text = proc.stdout + proc.stderr
    if debug:
        assert proc.returncode != 0 and "Traceback" in text
        return
    assert proc.returncode == 2
    assert "Traceback" not in text and "Exception during training" not in text
    error = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert len(error) == 1 and "has values [200] outside [0, 16)" in error[0], error


# ------------------------------------------------------------------------------- 5. exact resume
_EXACT = {
    "SOLVER.MAX_ITER": 60,
    "SOLVER.CHECKPOINT_PERIOD": 4,
    "SOLVER.BASE_LR": 0.001,
    "SEED": 7,
    "INPUT.FLIP_PROB": 0.5,
    "INPUT.RESIZE_SCALE": "(0.5, 2.0)",
    "INPUT.CROP.SIZE": "(48,48)",
}


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


@pytest.mark.slow
def test_exact_resume_after_kill(synthetic_benchmark, tmp_path):
    """Killed (SIGKILL) after a checkpoint and resumed, a run gives the losses, the final
    weights and the final metrics of a run that never stopped (CPU: bit for bit)."""
    data = synthetic_benchmark
    whole = tmp_path / "whole"
    _train_net(data, whole, **_EXACT)

    cut = tmp_path / "cut"
    cmd = [sys.executable, str(TRAIN_NET), "--config-file", str(CONFIG)]
    cmd += data.tiny_run_overrides(OUTPUT_DIR=cut, **_EXACT)
    proc = subprocess.Popen(
        cmd, env=_env(data), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.time() + 180
        # The tag, not the checkpoint file: the tag is written after the file, and a kill in
        # between resumes from the first checkpoint (a loaded machine can land there).
        tag_file = cut / "last_checkpoint"

        def second_checkpoint_tagged() -> bool:
            tag = (
                re.fullmatch(r"model_(\d+)\.pth", tag_file.read_text().strip())
                if tag_file.exists()
                else None
            )
            return tag is not None and int(tag.group(1)) >= 7

        while not second_checkpoint_tagged():
            assert proc.poll() is None, "the run ended before its second checkpoint"
            assert time.time() < deadline, "no checkpoint after 180 s"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        proc.kill()
        proc.wait()
    assert not (cut / "model_final.pth").exists(), "killed too late"
    tag = (cut / "last_checkpoint").read_text()
    resumed_from = int(tag[len("model_") : -len(".pth")]) + 1
    assert 8 <= resumed_from < 40
    resumed = _train_net(data, cut, "--resume", **_EXACT)
    assert f"Starting training from iteration {resumed_from}" in resumed.stderr + resumed.stdout

    # Losses: metrics.json holds medians over 20 iterations; those after the resume agree.
    lines = {x["iteration"]: x for x in _jsonl(whole / "metrics.json") if "total_loss" in x}
    again = {x["iteration"]: x for x in _jsonl(cut / "metrics.json") if "total_loss" in x}
    later = [i for i in lines if i - 19 >= resumed_from]
    assert later and later[-1] == 59
    for i in later:
        for key, value in lines[i].items():
            if key.startswith("loss_") or key in ("total_loss", "lr"):
                assert again[i][key] == value, (i, key)
    # Weights and metrics: equal.
    a = torch.load(whole / "model_final.pth", map_location="cpu", weights_only=True)["model"]
    b = torch.load(cut / "model_final.pth", map_location="cpu", weights_only=True)["model"]
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    name = data.val_name
    metrics = [json.loads((d / "inference" / name / METRICS).read_text()) for d in (whole, cut)]
    assert json.dumps(metrics[0], sort_keys=True) == json.dumps(metrics[1], sort_keys=True)


@pytest.mark.slow
def test_resumable_loader_restarts_at_any_iteration(synthetic_benchmark):
    """The loader started at iteration t gives batch t of a loader started at 0, for 0 and 2
    workers, with and without aspect-ratio grouping (mixed aspect ratios)."""
    from ocz_d2.data.train_loader import ResumableTrainLoader

    dicts = [{"id": i, "width": 10 + (i % 3) * 10, "height": 20} for i in range(11)]

    def mapper(d):
        # The global states that augmentations draw from.
        draw = float(np.random.rand())  # noqa: NPY002
        return {"id": d["id"], "draw": draw, "t": float(torch.rand(1))}

    for grouping in (False, True):
        batches = {}
        for workers in (0, 2):
            loader = ResumableTrainLoader(
                dicts, mapper, total_batch_size=3, aspect_ratio_grouping=grouping,
                num_workers=workers, seed=5,
            )  # fmt: skip
            stream = iter(loader)
            batches[workers] = [next(stream) for _ in range(12)]
            for start in (1, 5, 9):
                loader.set_start(start)
                stream = iter(loader)
                assert [next(stream) for _ in range(3)] == batches[workers][start : start + 3]
        assert batches[0] == batches[2]
        if grouping:
            for batch in batches[0]:
                assert len({dicts[x["id"]]["width"] > 20 for x in batch}) == 1


# ------------------------------------------------------------------------------------ 6. noise
TOOLS = ["train_net", "segment", "demo", "pretrain_clip", "microbench", "benchmark"]
TOOLS += ["precompute_object_maps", "slim_checkpoint", "fetch_weights", "prepare_synthetic"]


@pytest.mark.slow
def test_help_is_instant_and_says_what_the_tool_is():
    """--help imports neither torch nor ocz_d2 (the package imports torch): the tool runs as a
    user runs it, and Python's -X importtime lists every module it imported."""
    heavy_packages = ("torch", "ocz_d2", "detectron2")
    for tool in TOOLS:
        path = REPO / "tools" / f"{tool}.py"
        proc = subprocess.run(
            [sys.executable, "-X", "importtime", str(path), "--help"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 0, proc.stderr
        timed = [line for line in proc.stderr.splitlines() if line.startswith("import time:")]
        imported = {line.rsplit("|", 1)[-1].strip() for line in timed}
        assert "argparse" in imported, (tool, proc.stderr[-300:])  # the listing works
        heavy = sorted(m for m in imported if m.split(".")[0] in heavy_packages)
        assert not heavy, (tool, heavy[:5])
        others = [line for line in proc.stderr.splitlines() if line not in timed]
        assert "usage:" in proc.stdout and not others, tool
        if tool == "train_net":
            text = " ".join(proc.stdout.split())
            assert "zero-shot semantic segmentation" in text
            assert "on the CPU and talk through gloo" in text


def test_every_argument_has_help(monkeypatch):
    import argparse

    seen = {}

    def grab(self, args=None, namespace=None):
        seen["parser"] = self
        raise SystemExit(0)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", grab)
    for tool in TOOLS:
        module = _tool(tool)
        entry = getattr(module, "parse_args", None) or module.main
        with pytest.raises(SystemExit):
            entry([])
        missing = [
            a.dest for a in seen["parser"]._actions if not a.help and a.dest != "help"
        ]  # fmt: skip
        assert not missing, (tool, missing)


def test_pretrain_clip_help_defaults_are_the_config_defaults():
    from dataclasses import asdict

    from ocz_d2.miniature.clip_pretrain import ClipPretrainConfig

    tool = _tool("pretrain_clip")
    assert tool.DEFAULTS == asdict(ClipPretrainConfig())


def test_prepare_scripts_print_each_default_once(capsys):
    from ocz_d2.data.prepare import coco_stuff, context

    for module in (coco_stuff, context):
        with pytest.raises(SystemExit):
            module.cli(["--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert not re.search(r"\(default[^)]*\) \(default", text), text
        assert "(default: None)" not in text and "(default: False)" not in text


@pytest.mark.slow
def test_importing_the_package_prints_no_jit_warning():
    proc = subprocess.run(
        [sys.executable, "-W", "default", "-c", "import ocz_d2"],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "torch.jit.script" not in proc.stderr, proc.stderr


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, dead but not yet reaped, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl is Linux's")
def test_a_new_process_dies_with_its_parent(tmp_path):
    """The training process of report.py and demo.py (run_in_new_process) asks to die with its
    parent: killing the report leaves no training running."""
    import signal
    import subprocess
    import time

    pid_file = tmp_path / "child.pid"
    child = (
        "import os, sys, time; from ocz_d2.engine.launch import die_with_parent; "
        "assert die_with_parent(int(sys.argv[1])); "
        f"open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(60)"
    )
    parent = (
        "import os, subprocess, sys, time; "
        f"subprocess.Popen([sys.executable, '-c', {child!r}, str(os.getpid())]); time.sleep(60)"
    )
    proc = subprocess.Popen([sys.executable, "-c", parent], cwd=str(REPO))
    try:
        deadline = time.time() + 60
        while not (pid_file.is_file() and pid_file.read_text()) and time.time() < deadline:
            time.sleep(0.1)
        child_pid = int(pid_file.read_text())
        assert _alive(child_pid)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        deadline = time.time() + 10
        while _alive(child_pid) and time.time() < deadline:
            time.sleep(0.1)
        assert not _alive(child_pid), "the child outlived its killed parent"
    finally:
        proc.kill()
    # A parent already gone when the request is made: the process ends at once (SIGTERM).
    late = subprocess.run(
        [sys.executable, "-c", "from ocz_d2.engine.launch import die_with_parent; "
         "die_with_parent(-1); import time; time.sleep(60)"],
        cwd=str(REPO), timeout=60,
    )  # fmt: skip
    assert late.returncode == -signal.SIGTERM
