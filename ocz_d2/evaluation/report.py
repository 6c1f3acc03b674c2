"""Multi-seed reports: train every (row, seed), tune on val, test, and tabulate mean ± std and
paired differences to a reference row.

Transfer to unseen classes varies a lot between runs, so one run proves nothing. A report row is
a config file plus config overrides; each row runs once per seed:

1. training, as ``tools/train_net.py --resume --tuned-test`` does it, in new processes
   (:func:`~ocz_d2.engine.launch.run_in_new_process`) in ``<output>/<row>/seed<k>/`` (an
   interrupted run resumes from its last checkpoint);
2. in the same processes, :func:`~ocz_d2.evaluation.protocol.tuned_test`: calibration chosen on
   ``DATASETS.VAL``, metrics on ``DATASETS.TEST``;
3. ``result.json``, written last (test metrics, per-class test IoU, gamma, seconds per
   iteration): a (row, seed) with a result that matches its command is reused (a result written
   before per-class IoU was recorded lacks ``per_class_iou``).

A *test-time row* (:meth:`ReportRow.at_test_time`) trains nothing: it evaluates another row's
checkpoints with overrides that act only at test time (a test-time module switched on, another
inference mode), tuning and testing in its own folder (``train_net.py --eval-only
--tuned-test``). Paired with its base row, the difference then measures the test-time change
alone, on the very same weights.

The table (seen / unseen / hIoU on test as mean ± std, the minimum over seeds, seconds per
training iteration) is printed and written as ``report.json`` and ``report.md``.

Results vary a lot between seeds, and every row runs on the same seeds, so rows are also compared
*paired* (variation that rows share through a seed cancels in the per-seed difference): for every
row but the reference (by default the first row), on the seeds that both it and the reference
have finished, the per-seed difference (row − reference) of each metric, its mean and a 95%
paired t confidence interval (:func:`paired_comparison`; no interval with a single common seed).
``report.json`` holds them as each table entry's ``"paired"``; ``report.md`` as a second table,
``Δ mean [95% CI]``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..config import load_config
from ..engine.cli import USER_ERROR_STATUS
from ..engine.launch import run_args, run_in_new_process
from ..utils.errors import UserError
from ..utils.io import atomic_write_json
from .protocol import read_tuned_results

__all__ = [
    "ReportRow",
    "format_markdown",
    "paired_comparison",
    "paired_interval",
    "pin_clip_weights",
    "run_report",
    "run_seed",
    "summarize",
]

logger = logging.getLogger(__name__)

_RESULT = "result.json"
#: The training tool's command line names each run (in result.json and command.json).
_TRAIN_TOOL = "tools/train_net.py"
_METRICS = ("mIoU-seen", "mIoU-unseen", "hIoU")
_CONFIDENCE = 0.95
_CLASS_IOU = "IoU-"  # the evaluator's per-class IoU keys: "IoU-<class name>"
#: Separates a test-time row's training command from its test-time overrides in its record.
_TEST_OPTS = "--test-opts"


@dataclass(frozen=True)
class ReportRow:
    """One row of a report: a name, a config file and ``KEY VALUE`` overrides."""

    name: str
    config_file: str
    opts: tuple[str, ...] = field(default_factory=tuple)
    #: Overrides applied only when tuning and testing (a test-time row; see :meth:`at_test_time`).
    test_opts: tuple[str, ...] = field(default_factory=tuple)
    #: The row whose checkpoints a test-time row evaluates; None for a row that trains.
    base: str | None = None

    def __post_init__(self):
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise ValueError(f"Row name {self.name!r} must be a plain folder name.")
        for opts in (self.opts, self.test_opts):
            if len(opts) % 2:
                raise ValueError(f"Row {self.name!r}: overrides must be KEY VALUE pairs: {opts}.")
        if not os.path.isfile(self.config_file):
            raise FileNotFoundError(f"Row {self.name!r}: config file {self.config_file} not found.")
        if self.test_opts and self.base is None:
            raise ValueError(f"Row {self.name!r}: test-time overrides need a base row.")

    def at_test_time(self, name: str, test_opts: Sequence[str]) -> ReportRow:
        """A row that evaluates this row's checkpoints with ``test_opts`` added at test time.

        It trains nothing and shares this row's training command; its results record both.
        """
        if self.base is not None:
            raise ValueError(f"Row {name!r}: its base {self.name!r} is itself a test-time row.")
        return ReportRow(name, self.config_file, self.opts, tuple(test_opts), self.name)


def pin_clip_weights(row: ReportRow, weights: str | os.PathLike) -> ReportRow:
    """``row`` with ``MODEL.OCZ.CLIP.WEIGHTS weights`` when its config loads CLIP weights from a
    file and its overrides do not name one.

    Given the content-keyed cache path of the tiny CLIP, a run's command then changes whenever
    the CLIP does, so a finished result is reused only with the same CLIP. Rows on a random CLIP
    (``WEIGHTS`` empty) are returned unchanged.
    """
    if "MODEL.OCZ.CLIP.WEIGHTS" in row.opts[::2]:
        return row
    if not load_config(row.config_file, row.opts).MODEL.OCZ.CLIP.WEIGHTS:
        return row
    return ReportRow(row.name, row.config_file, ("MODEL.OCZ.CLIP.WEIGHTS", str(weights), *row.opts))


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
    row: ReportRow,
    seed: int,
    out_dir: Path,
    *,
    num_gpus: int = 1,
    console: bool = False,
    train_dir: Path | None = None,
) -> dict:
    """Train, tune and test one (row, seed) in ``out_dir``, or reuse its ``result.json``.

    Args:
        row, seed: what to run.
        out_dir: the run's folder.
        num_gpus: processes of the run (CPU: gloo); they train, tune and test.
        console: show the run's log on the console instead of ``train_stdout.log`` (a test-time
            row's: ``test_stdout.log``).
        train_dir: for a test-time row, the base row's folder of the same seed, whose finished
            training (``model_final.pth``) is evaluated; nothing is trained.

    Returns:
        ``{"row", "seed", "command", "calibration", "test_dataset", "test": metrics,
        "per_class_iou": {class name: IoU %}, "sec_per_iter", "seconds": {"training",
        "tuning_and_testing"}}`` (wall-clock seconds of this call's two stages; a reused result
        written by older code may lack ``per_class_iou`` and ``seconds``).
    """
    if (train_dir is None) != (row.base is None):
        raise ValueError(f"Row {row.name!r}: a test-time row, and only one, needs a train_dir.")
    out_dir.mkdir(parents=True, exist_ok=True)
    train_dir = out_dir if train_dir is None else train_dir
    # The training's command line names the run: a result is reused, and a folder resumed,
    # only for the same command (a test-time row's: plus its test overrides).
    train_opts = [*row.opts, "SEED", str(seed), "OUTPUT_DIR", str(train_dir)]
    command = [_TRAIN_TOOL, "--config-file", row.config_file, "--resume", "--tuned-test"]
    command += ["--num-gpus", str(num_gpus), *train_opts]
    weights = train_dir / "model_final.pth"
    if row.base is None:
        # The run trains, then tunes and tests in its own processes.
        args = run_args(
            row.config_file, train_opts, resume=True, tuned_test=True, num_gpus=num_gpus
        )
    else:
        command += [_TEST_OPTS, *row.test_opts]
        opts = [*row.opts, *row.test_opts, "SEED", str(seed), "OUTPUT_DIR", str(out_dir)]
        opts += ["MODEL.WEIGHTS", str(weights)]
        args = run_args(row.config_file, opts, eval_only=True, tuned_test=True, num_gpus=num_gpus)
    result_path = out_dir / _RESULT
    if result_path.is_file():
        previous = json.loads(result_path.read_text())
        if _same_command(previous.get("command"), command):
            logger.info("Reusing %s", result_path)
            return previous
    _claim(out_dir, command)
    if row.base is not None and not weights.is_file():
        raise FileNotFoundError(
            f"Row {row.name!r} evaluates row {row.base!r}'s training, but {weights} does not "
            "exist: run the base row first (run_report does)."
        )
    logger.info("Running: %s", " ".join(command))
    log = out_dir / ("train_stdout.log" if row.base is None else "test_stdout.log")
    start = time.perf_counter()
    status = run_in_new_process(args, None if console else log)
    seconds = time.perf_counter() - start
    if status != 0:
        where = "the output above" if console else str(log)
        if status == USER_ERROR_STATUS:  # a user error (config, data, weights), printed
            raise UserError(f"the run stopped on a config, data or weights error; see {where}.")
        raise RuntimeError(f"The run failed (exit {status}); see {where}.")
    tuned = read_tuned_results(out_dir)
    (test_name,) = list(tuned["test"])[:1]
    result = {
        "row": row.name,
        "seed": seed,
        "command": command,
        "calibration": tuned["calibration"],
        "test_dataset": test_name,
        "test": {k: tuned["test"][test_name][k] for k in _METRICS},
        "per_class_iou": _per_class_iou(tuned["test"][test_name]),
        "sec_per_iter": _seconds_per_iter(train_dir / "metrics.json"),
        "seconds": {
            "training": seconds - tuned["seconds"] if row.base is None else 0.0,
            "tuning_and_testing": tuned["seconds"],
        },
    }
    atomic_write_json(result_path, result, indent=2)
    return result


def _per_class_iou(metrics: dict) -> dict[str, float]:
    """The per-class IoU of an evaluator's metrics.

    Args:
        metrics: what :class:`~ocz_d2.evaluation.ZeroShotSemSegEvaluator` returns under
            ``"sem_seg"`` (keys ``IoU-<class name>``).

    Returns:
        ``{class name: IoU %}`` in the evaluator's class order (NaN for a class without ground
        truth in the split).
    """
    return {k[len(_CLASS_IOU) :]: float(v) for k, v in metrics.items() if k.startswith(_CLASS_IOU)}


def _same_command(recorded, command: list[str]) -> bool:
    """Whether a recorded command is ``command``. Records written while the report started
    ``tools/train_net.py`` itself name the tool by its absolute path, and records written while
    it tuned and tested in its own process (training with ``DATASETS.TEST ()``, no
    ``--tuned-test``) name the same run too."""
    if not isinstance(recorded, list) or not recorded:
        return False
    recorded = _with_tuned_test(recorded)
    if len(recorded) != len(command):
        return False
    tool = recorded[0] == command[0] or str(recorded[0]).endswith("/" + _TRAIN_TOOL)
    return tool and recorded[1:] == command[1:]


def _with_tuned_test(recorded: list) -> list:
    """A command recorded before the run tuned and tested in its own processes, in today's
    form: ``--tuned-test`` after ``--resume``, without the ``DATASETS.TEST ()`` that kept its
    training from evaluating."""
    if "--tuned-test" in recorded or "--resume" not in recorded:
        return recorded
    cut = recorded.index(_TEST_OPTS) if _TEST_OPTS in recorded else len(recorded)
    head, tail = recorded[:cut], recorded[cut:]
    if head[-2:] != ["DATASETS.TEST", "()"]:
        return recorded
    i = head.index("--resume") + 1
    return [*head[:i], "--tuned-test", *head[i:-2], *tail]


def _claim(out_dir: Path, command: list[str]) -> None:
    """Record the command that owns ``out_dir``; refuse a folder that holds another run, whose
    checkpoints ``--resume`` would otherwise continue from."""
    record = out_dir / "command.json"
    if record.is_file():
        if not _same_command(json.loads(record.read_text()), command):
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


def paired_interval(
    differences: Sequence[float], confidence: float = _CONFIDENCE
) -> tuple[float, float, float]:
    """Mean and paired t confidence interval of per-seed differences.

    Args:
        differences: one difference (row − reference) per common seed.
        confidence: the interval's coverage.

    Returns:
        ``(mean, low, high)``: ``mean ± t(n − 1) · s / √n`` with ``s`` the sample standard
        deviation; the mean is NaN without differences, the interval NaN with fewer than two.
    """
    from scipy.stats import t

    d = np.asarray(differences, dtype=float)
    if len(d) == 0:
        return float("nan"), float("nan"), float("nan")
    mean = float(d.mean())
    if len(d) < 2:
        return mean, float("nan"), float("nan")
    half = float(t.ppf(0.5 + confidence / 2, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d)))
    return mean, mean - half, mean + half


def paired_comparison(runs: Sequence[dict], reference_runs: Sequence[dict], reference: str) -> dict:
    """Per-seed differences of a row's test metrics to the reference row's, on common seeds.

    Args:
        runs: the row's results (:func:`run_seed`).
        reference_runs: the reference row's results (possibly none yet).
        reference: the reference row's name.

    Returns:
        ``{"reference": name, "seeds": common seeds (in the row's order), metric:
        {"differences": [row − reference per seed], "mean", "ci_low", "ci_high"}}`` for each of
        seen / unseen / hIoU (:func:`paired_interval`, 95%).
    """
    ref = {r["seed"]: r for r in reference_runs}
    own = {r["seed"]: r for r in runs}
    seeds = [s for s in own if s in ref]
    paired: dict = {"reference": reference, "seeds": seeds}
    for key in _METRICS:
        row_values = np.array([own[s]["test"][key] for s in seeds], dtype=float)
        ref_values = np.array([ref[s]["test"][key] for s in seeds], dtype=float)
        differences = (row_values - ref_values).tolist()
        mean, low, high = paired_interval(differences)
        paired[key] = {"differences": differences, "mean": mean, "ci_low": low, "ci_high": high}
    return paired


def summarize(results: Sequence[dict], *, reference: str | None = None) -> list[dict]:
    """Summarize results per row, in the order rows first appear.

    Args:
        results: :func:`run_seed` results of any rows and seeds.
        reference: the row the others are compared with, paired by seed (default: the first row).
            A reference without results yet pairs no seeds.

    Returns:
        One entry per row: ``row``, ``seeds``, per test metric the ``mean``, sample ``std`` (0 with
        one seed), ``min`` and ``values`` over seeds, the gammas chosen on val
        (``calibration``), the median ``sec_per_iter``, and ``paired``
        (:func:`paired_comparison`; None for the reference itself).
    """
    rows: dict[str, list[dict]] = {}
    for r in results:
        rows.setdefault(r["row"], []).append(r)
    if reference is None and rows:
        reference = next(iter(rows))
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
        entry["paired"] = (
            None
            if name == reference
            else paired_comparison(runs, rows.get(reference, []), reference)
        )
        table.append(entry)
    return table


def format_markdown(table: Sequence[dict], chance: dict | None = None) -> str:
    """The report in Markdown.

    Args:
        table: :func:`summarize`'s entries.
        chance: the chance row's metrics, or None.

    Returns:
        A table of test seen / unseen / hIoU as mean ± std (min), gamma, s/iter; then, when rows
        are paired with a reference, a table of their differences (:func:`_paired_markdown`).
    """

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
    paired = [e for e in table if e.get("paired")]  # tables written before pairing have none
    if paired:
        lines += ["", *_paired_markdown(paired)]
    return "\n".join(lines) + "\n"


def _paired_markdown(entries: Sequence[dict]) -> list[str]:
    """The Markdown lines of the paired differences.

    Args:
        entries: :func:`summarize` entries that have a ``paired`` comparison (one reference).

    Returns:
        A heading, a table (row, common seeds, Δ mean [95% CI] of seen / unseen / hIoU) and a
        note; ``[–]`` where one common seed gives no interval, ``–`` where none is common.
    """

    def num(x: float) -> str:
        return "–" if math.isnan(x) else f"{x:+.1f}"

    def cell(m: dict, n: int) -> str:
        if n == 0:
            return "–"
        if math.isnan(m["ci_low"]):
            return f"{num(m['mean'])} [–]"
        return f"{num(m['mean'])} [{num(m['ci_low'])}, {num(m['ci_high'])}]"

    reference = entries[0]["paired"]["reference"]
    level = f"{_CONFIDENCE:.0%}"
    lines = [
        f"Difference to {reference} (paired, same seeds): Δ mean [{level} CI]",
        "",
        "| row | paired seeds | Δ seen | Δ unseen | Δ hIoU |",
        "|---|---|---|---|---|",
    ]
    for e in entries:
        p = e["paired"]
        n = len(p["seeds"])
        seeds = " ".join(str(s) for s in p["seeds"]) or "–"
        cells = " | ".join(cell(p[key], n) for key in _METRICS)
        lines.append(f"| {e['row']} | {seeds} | {cells} |")
    lines += [
        "",
        f"mIoU points, row − {reference} per seed, on the seeds both have finished; {level} "
        "paired t interval (n − 1 degrees of freedom; none with one seed).",
    ]
    return lines


def run_report(
    rows: Sequence[ReportRow],
    seeds: Sequence[int],
    output: str | os.PathLike,
    *,
    num_gpus: int = 1,
    chance: dict | None = None,
    reference: str | None = None,
) -> list[dict]:
    """Run every (row, seed) (finished ones are reused) and write ``report.json``/``report.md``.

    Args:
        rows, seeds: what to run; each row once per seed. A test-time row's base must be one of
            the rows; its training runs (or is reused) first.
        output: the report's folder (``<output>/<row>/seed<k>/`` per run).
        num_gpus: processes per training run.
        chance: the chance row's metrics, or None.
        reference: the name of the row the others are compared with, paired by seed (default:
            the first row).

    Returns:
        The summary table (:func:`summarize`).
    """
    names = [r.name for r in rows]
    if len(set(names)) != len(names):
        raise ValueError(f"Row names must be unique: {names}.")
    if reference is None and names:
        reference = names[0]
    if reference is not None and reference not in names:
        raise ValueError(f"Reference row {reference!r} is not a row of the report: {names}.")
    by_name = {r.name: r for r in rows}
    for row in rows:
        if row.base is not None and row.base not in by_name:
            raise ValueError(f"Row {row.name!r} evaluates row {row.base!r}, which is not a row.")
    output = Path(output)
    results: dict[tuple[str, int], dict] = {}

    def run(row: ReportRow, seed: int) -> None:
        if (row.name, seed) in results:
            return
        train_dir = None
        if row.base is not None:
            run(by_name[row.base], seed)
            train_dir = output / row.base / f"seed{seed}"
        out_dir = output / row.name / f"seed{seed}"
        results[row.name, seed] = run_seed(
            row, seed, out_dir, num_gpus=num_gpus, train_dir=train_dir
        )
        done = list(results.values())
        _write(output, summarize(done, reference=reference), done, chance, reference)

    for row in rows:
        for seed in seeds:
            run(row, seed)
    # In row order (a base run first for a test-time row does not reorder the table).
    ordered = [results[r.name, s] for r in rows for s in seeds]
    _write(output, summarize(ordered, reference=reference), ordered, chance, reference)
    return summarize(ordered, reference=reference)


def _write(
    output: Path, table: list[dict], results: list[dict], chance: dict | None, reference: str | None
) -> None:
    output.mkdir(parents=True, exist_ok=True)
    payload = {"reference": reference, "table": table, "runs": results, "chance": chance}
    (output / "report.json").write_text(json.dumps(payload, indent=2) + "\n")
    (output / "report.md").write_text(format_markdown(table, chance))
