"""The tuned protocol and the multi-seed report: calibration chosen on val, byte-identical reruns,
finished runs reused, mean ± std tables."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from ocz_d2.engine.protocol import chance_metrics, pick_calibration
from ocz_d2.engine.report import (
    ReportRow,
    format_markdown,
    pin_clip_weights,
    run_report,
    summarize,
)

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "synthetic" / "ocz_tiny_attr.yaml"
METRICS = "zero_shot_sem_seg_metrics.json"


def _row(data, name="tiny", **extra) -> ReportRow:
    extra = {
        "DATASETS.VAL": f"('{data.val_name}',)",
        "MODEL.OCZ.TEST.CALIBRATION_GRID": "[0.0,0.5,5.0]",
        "SOLVER.MAX_ITER": 2,
        **extra,
    }
    return ReportRow(name, str(CONFIG), tuple(data.tiny_run_overrides(**extra)))


def _load_tool():
    spec = importlib.util.spec_from_file_location("report_tool", REPO / "tools" / "report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def env(synthetic_benchmark, monkeypatch):
    monkeypatch.setenv("DETECTRON2_DATASETS", str(Path(synthetic_benchmark.root).parent))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    return synthetic_benchmark


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

    # The same config and seed in another folder: byte-identical metric files.
    run_report([row], [0], tmp_path / "b")
    metrics_b = tmp_path / "b" / "tiny" / "seed0" / "inference" / data.test_name / METRICS
    assert metrics_a.read_bytes() == metrics_b.read_bytes()

    # A finished run is reused: nothing is trained or evaluated again (here through the command
    # line tool, run in this process).
    stamp = metrics_a.stat().st_mtime_ns
    tool = _load_tool()
    argv = ["--no-prepare", "--seeds", "0", "--output", str(tmp_path / "a")]
    assert tool.main([*argv, "--row", row.name, row.config_file, *row.opts]) == 0
    assert metrics_a.stat().st_mtime_ns == stamp
    out = capsys.readouterr()
    assert "| tiny | 1 |" in out.out and (tmp_path / "a" / "report.json").is_file()
    assert tool.main([*argv, "--row", "bad", "nowhere.yaml"]) == 2
    assert "nowhere.yaml not found" in capsys.readouterr().err
    # Another command (other overrides) in the same folder is neither reused nor resumed from.
    other = _row(data, **{"DATASETS.TEST": f"('{data.test_name}',)", "SOLVER.MAX_ITER": 1})
    with pytest.raises(RuntimeError, match="run of another command"):
        run_report([other], [0], tmp_path / "a")
    assert metrics_a.stat().st_mtime_ns == stamp


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
