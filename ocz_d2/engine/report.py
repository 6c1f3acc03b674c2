"""Multi-seed reports: train every (row, seed), tune on val, test, and tabulate mean ± std.

Transfer to unseen classes varies a lot between runs, so one run proves nothing. A report row is
a config file plus config overrides; each row runs once per seed:

1. ``tools/train_net.py --resume`` in ``<output>/<row>/seed<k>/`` (an interrupted run resumes
   from its last checkpoint);
2. :func:`~ocz_d2.engine.protocol.tuned_test`: calibration chosen on ``DATASETS.VAL``, metrics on
   ``DATASETS.TEST``;
3. ``result.json``, written last: a (row, seed) with a result that matches its command is reused.

The table (seen / unseen / hIoU on test as mean ± std, the minimum over seeds, seconds per
training iteration) is printed and written as ``report.json`` and ``report.md``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = [
    "ReportRow",
    "format_markdown",
    "pin_clip_weights",
    "run_report",
    "run_seed",
    "summarize",
]

logger = logging.getLogger(__name__)

_RESULT = "result.json"
_METRICS = ("mIoU-seen", "mIoU-unseen", "hIoU")


@dataclass(frozen=True)
class ReportRow:
    """One row of a report: a name, a config file and ``KEY VALUE`` overrides."""

    name: str
    config_file: str
    opts: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self):
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise ValueError(f"Row name {self.name!r} must be a plain folder name.")
        if len(self.opts) % 2:
            raise ValueError(f"Row {self.name!r}: overrides must be KEY VALUE pairs: {self.opts}.")
        if not os.path.isfile(self.config_file):
            raise FileNotFoundError(f"Row {self.name!r}: config file {self.config_file} not found.")


def pin_clip_weights(row: ReportRow, weights: str | os.PathLike) -> ReportRow:
    """``row`` with ``MODEL.OCZ.CLIP.WEIGHTS weights`` when its config loads CLIP weights from a
    file and its overrides do not name one.

    Given the content-keyed cache path of the tiny CLIP, a run's command then changes whenever
    the CLIP does, so a finished result is reused only with the same CLIP. Rows on a random CLIP
    (``WEIGHTS`` empty) are returned unchanged.
    """
    from ..config import load_config

    if "MODEL.OCZ.CLIP.WEIGHTS" in row.opts[::2]:
        return row
    if not load_config(row.config_file, row.opts).MODEL.OCZ.CLIP.WEIGHTS:
        return row
    return ReportRow(row.name, row.config_file, ("MODEL.OCZ.CLIP.WEIGHTS", str(weights), *row.opts))


def _train_net() -> Path:
    return Path(__file__).resolve().parents[2] / "tools" / "train_net.py"


def _seconds_per_iter(metrics_json: Path) -> float:
    """Median of Detectron2's per-iteration ``time`` over a run's ``metrics.json``."""
    times = []
    if metrics_json.is_file():
        for line in metrics_json.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if "time" in record:
                times.append(record["time"])
    return float(np.median(times)) if times else float("nan")


def run_seed(
    row: ReportRow, seed: int, out_dir: Path, *, num_gpus: int = 1, console: bool = False
) -> dict:
    """Train, tune and test one (row, seed) in ``out_dir``, or reuse its ``result.json``.

    Args:
        row, seed: what to run.
        out_dir: the run's folder.
        num_gpus: processes of the training run (CPU: gloo).
        console: show the training log on the console instead of ``train_stdout.log``.

    Returns:
        ``{"row", "seed", "command", "calibration", "test": metrics, "sec_per_iter"}``.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    # Training runs without evaluation; the tuned protocol below evaluates.
    opts = [*row.opts, "SEED", str(seed), "OUTPUT_DIR", str(out_dir), "DATASETS.TEST", "()"]
    command = [sys.executable, str(_train_net()), "--config-file", row.config_file, "--resume"]
    command += ["--num-gpus", str(num_gpus), *opts]
    result_path = out_dir / _RESULT
    if result_path.is_file():
        previous = json.loads(result_path.read_text())
        if previous.get("command") == command[1:]:
            logger.info("Reusing %s", result_path)
            return previous
    _claim(out_dir, command[1:])
    logger.info("Training: %s", " ".join(command))
    log = out_dir / "train_stdout.log"
    if console:
        done = subprocess.run(command)
    else:
        with log.open("w") as f:
            done = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        where = "the output above" if console else str(log)
        raise RuntimeError(f"Training failed (exit {done.returncode}); see {where}.")
    from .protocol import tuned_test  # heavy imports only when a run is needed

    cfg = _config(row, seed, out_dir)
    tuned = tuned_test(cfg, str(out_dir / "model_final.pth"), out_dir)
    (test_name,) = list(tuned["test"])[:1]
    result = {
        "row": row.name,
        "seed": seed,
        "command": command[1:],
        "calibration": tuned["calibration"],
        "test_dataset": test_name,
        "test": {k: tuned["test"][test_name][k] for k in _METRICS},
        "sec_per_iter": _seconds_per_iter(out_dir / "metrics.json"),
    }
    tmp = result_path.with_name(_RESULT + ".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, result_path)
    return result


def _claim(out_dir: Path, command: list[str]) -> None:
    """Record the command that owns ``out_dir``; refuse a folder that holds another run, whose
    checkpoints ``--resume`` would otherwise continue from."""
    record = out_dir / "command.json"
    if record.is_file():
        if json.loads(record.read_text()) != command:
            raise RuntimeError(
                f"{out_dir} holds a run of another command (see {record}): delete the folder or "
                "choose another output folder."
            )
        return
    if (out_dir / "last_checkpoint").is_file():
        raise RuntimeError(
            f"{out_dir} holds checkpoints of an unknown run: delete them or choose another folder."
        )
    record.write_text(json.dumps(command) + "\n")


def _config(row: ReportRow, seed: int, out_dir: Path):
    from ..config import load_config
    from ..data import register_split_files_from_config

    cfg = load_config(row.config_file, [*row.opts, "SEED", str(seed), "OUTPUT_DIR", str(out_dir)])
    cfg.MODEL.DEVICE = "cpu" if not _cuda() else cfg.MODEL.DEVICE
    cfg.freeze()
    register_split_files_from_config(cfg)
    return cfg


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def summarize(results: Sequence[dict]) -> list[dict]:
    """Per row: mean, sample standard deviation (0 with one seed) and minimum over seeds of each
    test metric, the gammas chosen on val, and the median seconds per training iteration."""
    rows: dict[str, list[dict]] = {}
    for r in results:
        rows.setdefault(r["row"], []).append(r)
    table = []
    for name, runs in rows.items():
        entry = {"row": name, "seeds": [r["seed"] for r in runs]}
        for key in _METRICS:
            values = np.array([r["test"][key] for r in runs], dtype=float)
            entry[key] = {
                "mean": float(values.mean()),
                "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
                "min": float(values.min()),
                "values": values.tolist(),
            }
        entry["calibration"] = [r["calibration"] for r in runs]
        times = [r["sec_per_iter"] for r in runs if not math.isnan(r["sec_per_iter"])]
        entry["sec_per_iter"] = float(np.median(times)) if times else float("nan")
        table.append(entry)
    return table


def format_markdown(table: Sequence[dict], chance: dict | None = None) -> str:
    """A Markdown table: test seen / unseen / hIoU as mean ± std (min), gamma, s/iter."""

    def cell(m: dict) -> str:
        return f"{m['mean']:.1f} ± {m['std']:.1f} ({m['min']:.1f})"

    lines = [
        "| row | seeds | seen | unseen | hIoU | gamma (val) | s/iter |",
        "|---|---|---|---|---|---|---|",
    ]
    for e in table:
        gammas = "/".join(f"{g:g}" for g in e["calibration"])
        spi = "–" if math.isnan(e["sec_per_iter"]) else f"{e['sec_per_iter']:.3f}"
        lines.append(
            f"| {e['row']} | {len(e['seeds'])} | {cell(e['mIoU-seen'])} | "
            f"{cell(e['mIoU-unseen'])} | {cell(e['hIoU'])} | {gammas} | {spi} |"
        )
    if chance is not None:
        lines.append(
            f"| chance | – | {chance['mIoU-seen']:.1f} | {chance['mIoU-unseen']:.1f} | "
            f"{chance['hIoU']:.1f} | – | – |"
        )
    lines.append("")
    lines.append("mIoU % on the test split, mean ± sample std over seeds (minimum in brackets).")
    return "\n".join(lines) + "\n"


def run_report(
    rows: Sequence[ReportRow],
    seeds: Sequence[int],
    output: str | os.PathLike,
    *,
    num_gpus: int = 1,
    chance: dict | None = None,
) -> list[dict]:
    """Run every (row, seed) (finished ones are reused) and write ``report.json``/``report.md``.

    Returns:
        The summary table (:func:`summarize`).
    """
    names = [r.name for r in rows]
    if len(set(names)) != len(names):
        raise ValueError(f"Row names must be unique: {names}.")
    output = Path(output)
    results = []
    for row in rows:
        for seed in seeds:
            results.append(
                run_seed(row, seed, output / row.name / f"seed{seed}", num_gpus=num_gpus)
            )
            table = summarize(results)
            _write(output, table, results, chance)
    return summarize(results)


def _write(output: Path, table: list[dict], results: list[dict], chance: dict | None) -> None:
    output.mkdir(parents=True, exist_ok=True)
    payload = {"table": table, "runs": results, "chance": chance}
    (output / "report.json").write_text(json.dumps(payload, indent=2) + "\n")
    (output / "report.md").write_text(format_markdown(table, chance))
