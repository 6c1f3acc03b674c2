"""Markdown tables of :func:`~ocz_d2.benchmark.harness.run_benchmark`'s output."""

from __future__ import annotations

from .harness import SUMMARY_KEYS
from .measure import FLOP_COMPONENTS, TIMED_COMPONENTS

__all__ = ["format_markdown", "loader_cell"]


def _fmt(value: float | None, digits: int = 1) -> str:
    return "absent" if value is None else f"{value:,.{digits}f}"


def _spread(stats: dict) -> str:
    if "median_ms" not in stats:
        return stats.get("skipped", "–")
    return f"{stats['median_ms']:.1f} [{stats['q1_ms']:.1f}–{stats['q3_ms']:.1f}]"


def format_markdown(report: dict) -> str:
    """Markdown tables of :func:`run_benchmark`'s output: absolute numbers, ratios to the first
    row, FLOPs per component and time per component in the training step."""
    rows = report["rows"]
    s = report["settings"]
    out = [
        f"Input {s['size']}x{s['size']}, batch {s['batch']}, device {s['device']}, "
        f"{s['repeats']} runs after {s['warmup']} warm-up (median [quartiles]).",
        "",
        "| row | params M (trainable) | GFLOPs | inference ms | inference, online guide ms | "
        "train step ms | peak RSS MB | loader img/s | eval Mpx/s: process (argmax, counting) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        t, p = r["times"], r["params"]
        loader, evaluation = r["data_loader"], r["evaluation"]
        out.append(
            f"| {r['name']} | {p['total'] / 1e6:.2f} ({p['trainable'] / 1e6:.2f}) | "
            f"{r['summary']['gflops']:.2f} | {_spread(t['inference'])} | "
            f"{_spread(t['inference_online_guide'])} | {_spread(t['train_step'])} | "
            f"{r['memory']['peak_rss_mb']:.0f} | "
            f"{loader_cell(loader)} | "
            f"{evaluation['mpixels_per_s']:.1f} ({evaluation['argmax_mpixels_per_s']:.1f}, "
            f"{evaluation['accumulate_mpixels_per_s']:.0f}) |"
        )
    out += ["", f"Ratio to {rows[0]['name']}:", ""]
    out += ["| row | " + " | ".join(SUMMARY_KEYS) + " |", "|---" * (len(SUMMARY_KEYS) + 1) + "|"]
    for r in rows:
        cells = ["–" if r["ratio"][k] is None else f"{r['ratio'][k]:.2f}" for k in SUMMARY_KEYS]
        out.append(f"| {r['name']} | " + " | ".join(cells) + " |")
    names = [c.name for c in FLOP_COMPONENTS]
    out += ["", "GFLOPs per component (% of the model's; the online guide is extra):", ""]
    out += ["| row | " + " | ".join([*names, "guide_online"]) + " |"]
    out += ["|---" * (len(names) + 2) + "|"]
    for r in rows:
        flops = r["flops"]
        cells = [_share(flops["components"][n], flops["total"], 1e9) for n in names] + [
            _share(flops["guide_online"], flops["total"], 1e9)
        ]
        out.append(f"| {r['name']} | " + " | ".join(cells) + " |")
    timed = [c.name for c in TIMED_COMPONENTS]
    out += ["", "Training step: ms per step in each component (% of the step):", ""]
    out += ["| row | " + " | ".join(timed) + " |", "|---" * (len(timed) + 1) + "|"]
    for r in rows:
        comps = r["train_step_components"]
        cells = [
            "absent"
            if comps[n] is None
            else f"{comps[n]['median_ms']:.1f} ({100 * comps[n]['share_of_step']:.1f}%)"
            for n in timed
        ]
        out.append(f"| {r['name']} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def loader_cell(loader: dict) -> str:
    """The loader's images/s with its rate per worker, and "stand-in WxH, N images" when it was
    timed on stand-in files."""
    if not loader["available"]:
        return "not available"
    cell = f"{_fmt(loader['images_per_s'])} ({_fmt(loader['images_per_s_per_worker'])}/worker"
    if loader.get("stand_in"):
        width, height = loader["stand_in_size"]
        cell += f"; stand-in {width}x{height}, {loader['stand_in_images']} images"
    return cell + ")"


def _share(value: int | None, total: int, unit: float) -> str:
    if value is None:
        return "absent"
    return f"{value / unit:.2f} ({100 * value / max(total, 1):.1f}%)"
