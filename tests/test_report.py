"""The tuned protocol and the multi-seed report: calibration chosen on val, byte-identical reruns,
finished runs reused, per-class IoU recorded, mean ± std tables, paired differences by seed."""

from __future__ import annotations

import json
import math
import os
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
from detectron2.data import build_detection_test_loader
from detectron2.evaluation import inference_on_dataset
from detectron2.modeling import build_model

from ocz_d2.config import load_config
from ocz_d2.data import ZeroShotSemSegDatasetMapper
from ocz_d2.data.split_file import register_split_files_from_config
from ocz_d2.engine.checkpoint import AtomicCheckpointer
from ocz_d2.engine.cli import USER_ERROR_STATUS
from ocz_d2.engine.launch import run_args, run_in_new_process
from ocz_d2.evaluation import build_zero_shot_evaluator
from ocz_d2.evaluation.protocol import (
    chance_metrics,
    pick_calibration,
    read_tuned_results,
    tuned_test,
)
from ocz_d2.evaluation.report import (
    ReportRow,
    format_markdown,
    paired_interval,
    pin_clip_weights,
    run_report,
    run_seed,
    summarize,
)
from tools import report as report_tool

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "synthetic" / "ocz_tiny_attr.yaml"
METRICS = "zero_shot_sem_seg_metrics.json"
CONFUSION = "zero_shot_sem_seg_confusion.npy"


def _row(data, name="tiny", **extra) -> ReportRow:
    extra = {
        "DATASETS.VAL": f"('{data.val_name}',)",
        "MODEL.OCZ.TEST.CALIBRATION_GRID": "[0.0,0.5,5.0]",
        "SOLVER.MAX_ITER": 2,
        **extra,
    }
    return ReportRow(name, str(CONFIG), tuple(data.tiny_run_overrides(**extra)))


@pytest.fixture
def env(synthetic_benchmark, monkeypatch):
    monkeypatch.setenv("DETECTRON2_DATASETS", str(Path(synthetic_benchmark.root).parent))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    return synthetic_benchmark


@pytest.mark.slow
def test_report_runs_tunes_on_val_and_is_byte_identical(env, tmp_path, capsys):
    data = env
    # DATASETS.TEST comes from the row: the test split, with the val split for tuning.
    row = _row(data, **{"DATASETS.TEST": f"('{data.test_name}',)"})
    table = run_report([row], [0], tmp_path / "a")
    result = json.loads((tmp_path / "a" / "tiny" / "seed0" / "result.json").read_text())
    assert result["test_dataset"] == data.test_name
    tuned = json.loads((tmp_path / "a" / "tiny" / "seed0" / "tuned_results.json").read_text())
    sweep = tuned["val"][data.val_name]
    assert set(sweep) == {"0.0", "0.5", "5.0"}
    # gamma 5 pushes every pixel to an unseen class: seen mIoU 0 on val.
    assert sweep["5.0"]["mIoU-seen"] == 0.0
    assert tuned["calibration"] == pick_calibration({float(g): m for g, m in sweep.items()})
    metrics_a = tmp_path / "a" / "tiny" / "seed0" / "inference" / data.test_name / METRICS
    assert json.loads(metrics_a.read_text())["hIoU"] == pytest.approx(result["test"]["hIoU"])
    assert table[0]["hIoU"]["values"] == [result["test"]["hIoU"]]
    assert "| tiny | 1 |" in (tmp_path / "a" / "report.md").read_text()
    # Per-class test IoU, read from the evaluator's "IoU-<class>" keys (NaN: no ground truth).
    assert list(result["per_class_iou"]) == list(data.classes)
    tuned_test = tuned["test"][data.test_name]  # tuned_results.json writes NaN as null
    for name, iou in result["per_class_iou"].items():
        expected = tuned_test[f"IoU-{name}"]
        assert (expected is None and math.isnan(iou)) or iou == pytest.approx(expected)
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    assert report["reference"] == "tiny" and report["table"][0]["paired"] is None
    same = json.dumps(report["runs"][0]["per_class_iou"]) == json.dumps(result["per_class_iou"])
    assert same  # NaN != NaN: compared as JSON text

    # The same config and seed in another folder: byte-identical metric files.
    run_report([row], [0], tmp_path / "b")
    metrics_b = tmp_path / "b" / "tiny" / "seed0" / "inference" / data.test_name / METRICS
    assert metrics_a.read_bytes() == metrics_b.read_bytes()

    # A finished run is reused: nothing is trained or evaluated again (here through the command
    # line tool, run in this process).
    # A result.json written before per-class IoU was recorded is reused as well.
    stamp = metrics_a.stat().st_mtime_ns
    result_a = tmp_path / "a" / "tiny" / "seed0" / "result.json"
    old = {k: v for k, v in result.items() if k != "per_class_iou"}
    result_a.write_text(json.dumps(old, indent=2) + "\n")
    argv = ["--no-prepare", "--seeds", "0", "--output", str(tmp_path / "a")]
    row_args = ["--row", row.name, row.config_file, *row.opts]
    assert report_tool.main([*argv, "--reference", "tiny", *row_args]) == 0
    assert metrics_a.stat().st_mtime_ns == stamp
    out = capsys.readouterr()
    assert "| tiny | 1 |" in out.out and "Difference to" not in out.out  # nothing to pair
    assert (
        "per_class_iou" not in json.loads((tmp_path / "a" / "report.json").read_text())["runs"][0]
    )
    # Another command (other overrides) in the same folder is neither reused nor resumed from.
    other = _row(data, **{"DATASETS.TEST": f"('{data.test_name}',)", "SOLVER.MAX_ITER": 1})
    with pytest.raises(RuntimeError, match="run of another command"):
        run_report([other], [0], tmp_path / "a")
    assert metrics_a.stat().st_mtime_ns == stamp


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="gloo multi-process test runs on Linux")
def test_a_two_process_run_is_launched_from_this_process(env, tmp_path):
    """run_in_new_process starts the two processes of a run itself (no process in between):
    both write to the log, and their exit status comes back (2 after a config error)."""
    data = env
    with socket.socket() as sock:  # a free port, not the launcher's fixed per-user default
        sock.bind(("127.0.0.1", 0))
        url = f"tcp://127.0.0.1:{sock.getsockname()[1]}"
    opts = data.tiny_run_overrides(
        OUTPUT_DIR=tmp_path / "run", **{"SOLVER.MAX_ITER": 1, "SOLVER.IMS_PER_BATCH": 2}
    )
    args = run_args(str(CONFIG), opts, num_gpus=2)
    args.dist_url = url
    log = tmp_path / "run.log"
    log.write_text("an older run's output\n")
    assert run_in_new_process(args, log) == 0
    text = log.read_text()
    assert "older run" not in text and "World size: 2" in text
    assert "CPU threads of this process: 1 (process " in text
    assert f"started by {os.getpid()})" in text  # no process in between
    assert (tmp_path / "run" / "model_final.pth").is_file()
    args.opts = [*args.opts, "SOLVER.NO_SUCH_KEY", "1"]
    assert run_in_new_process(args, log) == USER_ERROR_STATUS
    assert "NO_SUCH_KEY" in log.read_text()


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="gloo multi-process test runs on Linux")
def test_two_processes_train_then_tune_and_test_as_one_process_does(env, tmp_path):
    """train_net --tuned-test in two processes: each evaluates its share of the images after
    training, the main process gathers them; the result is one process's on the same weights."""
    data = env
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        url = f"tcp://127.0.0.1:{sock.getsockname()[1]}"
    # One test image per model call: the same computation per image in either run (a random
    # tiny model's near-tied scores would otherwise flip with a batch's float rounding).
    extra = {"SOLVER.IMS_PER_BATCH": 2, "TEST.IMS_PER_BATCH": 1}
    row = _row(data, **{"DATASETS.TEST": f"('{data.test_name}',)", **extra})
    two = tmp_path / "two"
    args = run_args(row.config_file, [*row.opts, "OUTPUT_DIR", str(two)], tuned_test=True,
                    num_gpus=2)  # fmt: skip
    args.dist_url = url
    assert run_in_new_process(args, tmp_path / "two.log") == 0
    assert "World size: 2" in (tmp_path / "two.log").read_text()
    by_two = read_tuned_results(two)
    # No evaluation of the training's own: only the tuned protocol's folders.
    assert {p.name for p in (two / "inference").iterdir()} == {data.test_name}

    cfg = load_config(row.config_file, [*row.opts, "OUTPUT_DIR", str(tmp_path / "one")])
    register_split_files_from_config(cfg)
    model = build_model(cfg)
    AtomicCheckpointer(model).load(str(two / "model_final.pth"))
    by_one = tuned_test(cfg, model, tmp_path / "one")
    assert by_two["calibration"] == by_one["calibration"]
    for gamma, metrics in by_one["val"][data.val_name].items():
        for key, value in metrics.items():
            assert by_two["val"][data.val_name][str(gamma)][key] == pytest.approx(
                value, nan_ok=True
            )
    # Every test pixel counted once, with the same prediction.
    matrices = [
        np.load(d / "inference" / data.test_name / CONFUSION) for d in (two, tmp_path / "one")
    ]
    assert matrices[0].sum() > 0 and np.array_equal(*matrices)


@pytest.mark.slow
def test_test_time_row_evaluates_the_base_rows_checkpoint_without_training(env, tmp_path):
    data = env
    # A data-loader worker: the training process (a new interpreter) starts it as a shell's
    # train_net would, so it knows the datasets registered from the split files.
    overrides = {"DATASETS.TEST": f"('{data.test_name}',)", "DATALOADER.NUM_WORKERS": 1}
    base = _row(data, name="base", **overrides)
    # A test-time module (the segment route) and a one-value grid, only at test time.
    test_opts = ("MODEL.OCZ.SEGMENT_CLIP.ENABLED", "True")
    test_opts += ("MODEL.OCZ.TEST.CALIBRATION_GRID", "[2.0]")
    region = base.at_test_time("region", test_opts)
    # Its base runs first even when listed after it; the table keeps the rows' order.
    table = run_report([region, base], [0], tmp_path, reference="base")
    assert [e["row"] for e in table] == ["region", "base"]
    base_dir, own = tmp_path / "base" / "seed0", tmp_path / "region" / "seed0"
    assert not list(own.glob("*.pth")) and not (own / "train_stdout.log").exists()
    assert "Calibration gamma 2.00 chosen" in (own / "test_stdout.log").read_text()
    assert {p.name for p in base_dir.glob("model_final.pth")} == {"model_final.pth"}
    result = json.loads((own / "result.json").read_text())
    base_result = json.loads((base_dir / "result.json").read_text())
    # The training command is the base row's; the test-time overrides follow it.
    assert result["command"] == [*base_result["command"], "--test-opts", *test_opts]
    assert result["seconds"]["training"] == 0.0
    # The base row's training speed (NaN here: 2 iterations log no time).
    assert result["sec_per_iter"] == pytest.approx(base_result["sec_per_iter"], nan_ok=True)
    # The test-time grid applied to the test-time row only.
    assert result["calibration"] == 2.0 and base_result["calibration"] in (0.0, 0.5, 5.0)
    assert set(json.loads((own / "tuned_results.json").read_text())["val"][data.val_name]) == {
        "2.0"
    }
    # The same evaluation by hand: the base checkpoint, the overrides, the test split.
    cfg = load_config(base.config_file, [*base.opts, *test_opts, "OUTPUT_DIR", str(tmp_path)])
    register_split_files_from_config(cfg)
    model = build_model(cfg)
    AtomicCheckpointer(model).load(str(base_dir / "model_final.pth"))
    assert model.segment_classifier is not None
    model.calibration = 2.0
    evaluator = build_zero_shot_evaluator(data.test_name, None)
    mapper = ZeroShotSemSegDatasetMapper(cfg, False)
    loader = build_detection_test_loader(cfg, data.test_name, mapper=mapper)
    hand = inference_on_dataset(model, loader, evaluator)["sem_seg"]
    assert result["test"]["hIoU"] == pytest.approx(hand["hIoU"])
    paired = {e["row"]: e for e in table}["region"]["paired"]
    assert paired["reference"] == "base" and paired["seeds"] == [0]
    # Reused: evaluating again changes nothing.
    stamp = (own / "result.json").stat().st_mtime_ns
    run_report([base, region], [0], tmp_path, reference="base")
    assert (own / "result.json").stat().st_mtime_ns == stamp


def test_test_time_rows_are_checked(tmp_path, capsys):
    base = ReportRow("base", str(CONFIG))
    with pytest.raises(ValueError, match="need a base row"):
        ReportRow("x", str(CONFIG), (), ("MODEL.OCZ.TEST.CALIBRATION", "0"))
    with pytest.raises(ValueError, match="is itself a test-time row"):
        base.at_test_time("a", ()).at_test_time("b", ())
    with pytest.raises(ValueError, match="which is not a row"):
        run_report([base.at_test_time("a", ())], [0], tmp_path)
    with pytest.raises(ValueError, match="needs a train_dir"):
        run_seed(base.at_test_time("a", ()), 0, tmp_path / "a")
    argv = ["--no-prepare", "--seeds", "0", "--output", str(tmp_path), "--row", "t", str(CONFIG)]
    assert report_tool.main([*argv, "--test-row", "u", "nope"]) == 2
    assert "--test-row base nope is not a --row name" in capsys.readouterr().err
    assert report_tool.main([*argv, "--test-row", "u"]) == 2
    assert "needs a NAME and a BASE_ROW" in capsys.readouterr().err
    assert report_tool.main([*argv, "--test-row", "u", "t", "ODD"]) == 2
    assert "KEY VALUE pairs" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing ran


def test_report_tool_names_bad_rows_before_running(tmp_path, capsys):
    argv = ["--no-prepare", "--seeds", "0", "--output", str(tmp_path)]
    assert report_tool.main([*argv, "--row", "bad", "nowhere.yaml"]) == 2
    assert "nowhere.yaml not found" in capsys.readouterr().err
    assert report_tool.main([*argv, "--reference", "nope", "--row", "tiny", str(CONFIG)]) == 2
    assert "--reference nope is not a row name" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing ran


def test_summary_is_mean_std_min():
    values = [(0, 10, 20, 13.3, 0.2), (1, 20, 40, 26.7, 0.4), (2, 30, 30, 30, 0.3)]
    runs = [
        {"row": "a", "seed": s, "calibration": 0.1, "sec_per_iter": t,
         "test": {"mIoU-seen": seen, "mIoU-unseen": un, "hIoU": h}}
        for s, seen, un, h, t in values
    ]  # fmt: skip
    (row,) = summarize(runs)
    assert row["mIoU-seen"]["mean"] == pytest.approx(20.0)
    assert row["mIoU-seen"]["std"] == pytest.approx(10.0)  # sample std of 10, 20, 30
    assert row["mIoU-unseen"]["min"] == 20.0 and row["sec_per_iter"] == pytest.approx(0.3)
    md = format_markdown([row], {"mIoU-seen": 3.2, "mIoU-unseen": 3.3, "hIoU": 3.3})
    assert "| a | 3 | 20.0 ± 10.0 (10.0) | 30.0 ± 10.0 (20.0) |" in md
    assert "| chance | – | 3.2 | 3.3 | 3.3 |" in md
    assert row["paired"] is None and "Difference to" not in md  # a single row: nothing to pair


def _runs(row: str, hiou: dict[int, float]) -> list[dict]:
    """Hand-made results of ``row``: hIoU per seed, seen = hIoU + 50, unseen = hIoU / 2."""
    return [
        {"row": row, "seed": s, "calibration": 0.0, "sec_per_iter": 0.1,
         "test": {"mIoU-seen": h + 50.0, "mIoU-unseen": h / 2, "hIoU": h}}
        for s, h in hiou.items()
    ]  # fmt: skip


def _paired_table(**kwargs) -> dict[str, dict]:
    results = [
        *_runs("ref", {0: 20.0, 1: 25.0, 2: 30.0}),
        *_runs("row", {0: 22.0, 1: 26.0, 2: 35.0}),
        *_runs("short", {2: 31.0, 0: 21.0}),  # seed 1 missing
        *_runs("single", {1: 27.0, 5: 40.0}),  # seed 5 unknown to ref
        *_runs("late", {7: 10.0}),  # no seed in common
    ]
    return {e["row"]: e for e in summarize(results, **kwargs)}


def test_paired_differences_mean_and_t_interval_on_common_seeds():
    table = _paired_table()
    assert table["ref"]["paired"] is None  # the first row is the default reference
    paired = table["row"]["paired"]
    assert paired["reference"] == "ref" and paired["seeds"] == [0, 1, 2]
    # By hand: differences 2, 1, 5; sample std; t quantile 0.975 with 2 degrees of freedom.
    diffs = [2.0, 1.0, 5.0]
    mean = sum(diffs) / 3
    std = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 2)
    half = 4.302653 * std / math.sqrt(3)
    for key, scale in (("hIoU", 1.0), ("mIoU-seen", 1.0), ("mIoU-unseen", 0.5)):
        m = paired[key]
        assert m["differences"] == pytest.approx([d * scale for d in diffs])
        assert m["mean"] == pytest.approx(2.666667 * scale, abs=1e-5)
        assert m["ci_low"] == pytest.approx((mean - half) * scale, abs=1e-5)
        assert m["ci_high"] == pytest.approx((mean + half) * scale, abs=1e-5)
    # Only the seeds both rows finished are paired, in the row's order.
    short = table["short"]["paired"]
    assert short["seeds"] == [2, 0] and short["hIoU"]["differences"] == [1.0, 1.0]
    assert (short["hIoU"]["ci_low"], short["hIoU"]["ci_high"]) == (1.0, 1.0)  # std 0
    # One common seed: a difference, no interval; none: nothing.
    single = table["single"]["paired"]["hIoU"]
    assert table["single"]["paired"]["seeds"] == [1] and single["mean"] == 2.0
    assert math.isnan(single["ci_low"]) and math.isnan(single["ci_high"])
    late = table["late"]["paired"]
    assert late["seeds"] == [] and math.isnan(late["hIoU"]["mean"])
    # Another reference: the signs flip.
    flipped = _paired_table(reference="row")
    assert flipped["row"]["paired"] is None
    assert flipped["ref"]["paired"]["hIoU"]["differences"] == [-2.0, -1.0, -5.0]
    assert paired_interval([]) == pytest.approx((math.nan,) * 3, nan_ok=True)


def test_markdown_shows_paired_differences():
    md = format_markdown(list(_paired_table().values()))
    assert "| ref | 3 | 75.0 ± 5.0 (70.0) | 12.5 ± 2.5 (10.0) | 25.0 ± 5.0 (20.0) |" in md
    assert "Difference to ref (paired, same seeds): Δ mean [95% CI]" in md
    assert "| row | paired seeds | Δ seen | Δ unseen | Δ hIoU |" in md
    # 2.667 ± 5.171 for hIoU and seen, half of it for unseen.
    assert "| row | 0 1 2 | +2.7 [-2.5, +7.8] | +1.3 [-1.3, +3.9] | +2.7 [-2.5, +7.8] |" in md
    assert "| short | 2 0 | +1.0 [+1.0, +1.0] | +0.5 [+0.5, +0.5] | +1.0 [+1.0, +1.0] |" in md
    assert "| single | 1 | +2.0 [–] | +1.0 [–] | +2.0 [–] |" in md
    assert "| late | – | – | – | – |" in md
    assert "| ref | 0 1 2 |" not in md  # the reference is not compared with itself


def test_pick_calibration_prefers_hiou_then_smaller_gamma():
    nan = float("nan")
    sweep = {0.0: {"hIoU": 10.0}, 0.2: {"hIoU": 30.0}, 0.4: {"hIoU": 30.0}, 0.6: {"hIoU": nan}}
    assert pick_calibration(sweep) == 0.2


def test_chance_metrics_are_near_one_over_k(env):
    chance = chance_metrics(env.val_name)
    # 16 classes: a uniform random label is right 1/16 of the time; IoU is about 1/(2K-1) ~ 3%.
    assert 1.0 < chance["mIoU-unseen"] < 6.0 and 1.0 < chance["mIoU-seen"] < 6.0
    again = chance_metrics(env.val_name)  # seeded: the same numbers (NaN for absent classes)
    assert json.dumps(chance, sort_keys=True) == json.dumps(again, sort_keys=True)


def test_rows_are_checked():
    with pytest.raises(ValueError, match="KEY VALUE pairs"):
        ReportRow("x", str(CONFIG), ("SOLVER.MAX_ITER",))
    with pytest.raises(FileNotFoundError, match="not found"):
        ReportRow("x", "nowhere.yaml")
    with pytest.raises(ValueError, match="plain folder name"):
        ReportRow("a/b", str(CONFIG))


def test_pin_clip_weights_only_where_the_config_loads_a_file():
    text = ReportRow("text", str(REPO / "configs" / "synthetic" / "ocz_tiny.yaml"))
    pinned = pin_clip_weights(text, "/cache/abc/weights.pt")
    assert pinned.opts == ("MODEL.OCZ.CLIP.WEIGHTS", "/cache/abc/weights.pt")
    assert pin_clip_weights(ReportRow("attr", str(CONFIG)), "/cache/w.pt").opts == ()
    own = ReportRow("own", text.config_file, ("MODEL.OCZ.CLIP.WEIGHTS", "/mine.pt"))
    assert pin_clip_weights(own, "/cache/w.pt") == own


def test_results_recorded_with_the_tool_path_are_reused(tmp_path):
    """A result written while the report started tools/train_net.py by its absolute path, or
    while it tuned and tested in its own process (training with DATASETS.TEST (), no
    --tuned-test), names the same run as the report's command now: it is reused, nothing is
    trained or evaluated."""
    row = ReportRow("tiny", str(CONFIG), ("SOLVER.MAX_ITER", "2"))
    out = tmp_path / "tiny" / "seed3"
    out.mkdir(parents=True)
    argv = ["--config-file", row.config_file, "--resume", "--num-gpus", "1", *row.opts]
    argv += ["SEED", "3", "OUTPUT_DIR", str(out), "DATASETS.TEST", "()"]
    old = {"row": "tiny", "seed": 3, "command": ["/old/checkout/tools/train_net.py", *argv]}
    (out / "result.json").write_text(json.dumps(old))
    assert run_seed(row, 3, out) == old
    # A test-time row's record of that time: the base's training command, then its overrides.
    test_row = row.at_test_time("route", ("MODEL.OCZ.TEST.CALIBRATION_GRID", "[1.0]"))
    own = tmp_path / "route" / "seed3"
    own.mkdir(parents=True)
    recorded = {**old, "command": [*old["command"], "--test-opts", *test_row.test_opts]}
    (own / "result.json").write_text(json.dumps(recorded))
    assert run_seed(test_row, 3, own, train_dir=out) == recorded
    # Today's record of the same run.
    now = ["tools/train_net.py", *argv[:3], "--tuned-test", *argv[3:-2]]
    (out / "result.json").write_text(json.dumps({**old, "command": now}))
    assert run_seed(row, 3, out)["command"] == now
    old["command"] = ["/old/checkout/tools/other.py", *argv]  # another program: another run
    (out / "result.json").write_text(json.dumps(old))
    (out / "command.json").write_text(json.dumps(old["command"]))
    with pytest.raises(RuntimeError, match="run of another command"):
        run_seed(row, 3, out)
