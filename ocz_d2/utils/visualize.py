"""Pictures of predictions: input | ground truth | prediction, unseen classes marked."""

from __future__ import annotations

import colorsys
import math

import numpy as np
from PIL import Image, ImageDraw

from ..data.register_zero_shot import IGNORE_LABEL

IGNORE_COLOR = (0, 0, 0)
# Height in pixels of one legend row.
_LEGEND_LINE = 14


def class_palette(num_classes: int, seed: int = 0) -> np.ndarray:
    """[K, 3] uint8 colours, deterministic: matplotlib's tab20 (distinct) for up to 20 classes,
    golden-ratio hue steps beyond."""
    if num_classes <= 20:
        from matplotlib import colormaps

        colors = colormaps["tab20"].colors[:num_classes]
        return (np.array(colors) * 255).round().astype(np.uint8)
    rng = np.random.default_rng(seed)
    hues = (np.arange(num_classes) * 0.618034 + rng.uniform()) % 1.0
    colors = [colorsys.hsv_to_rgb(h, 0.65 + 0.35 * (i % 2), 0.95) for i, h in enumerate(hues)]
    return (np.array(colors) * 255).astype(np.uint8)


def colorize(
    label: np.ndarray, palette: np.ndarray, ignore_label: int = IGNORE_LABEL
) -> np.ndarray:
    """[H, W] class indices -> [H, W, 3] colours; ignore pixels black."""
    out = np.zeros((*label.shape, 3), dtype=np.uint8)
    valid = (label != ignore_label) & (label < len(palette))
    out[valid] = palette[label[valid]]
    out[~valid] = IGNORE_COLOR
    return out


def _outline(mask: np.ndarray) -> np.ndarray:
    """Boundary pixels of a boolean mask (4-neighbourhood)."""
    inner = mask.copy()
    inner[1:, :] &= mask[:-1, :]
    inner[:-1, :] &= mask[1:, :]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    return mask & ~inner


def mark_unseen(rgb: np.ndarray, label: np.ndarray, unseen: list[int]) -> np.ndarray:
    """Draw a white outline around the pixels of unseen classes."""
    rgb = rgb.copy()
    rgb[_outline(np.isin(label, unseen))] = 255
    return rgb


def prediction_panel(
    rows: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
    class_names: list[str],
    unseen: list[int],
    scale: int = 2,
    ignore_label: int = IGNORE_LABEL,
) -> Image.Image:
    """A grid: one row per image (input, ground truth, prediction) and a legend.

    Args:
        rows: (image [H, W, 3] uint8 RGB, ground truth [H, W], prediction [H, W]) per row.
        class_names: K names; unseen: indices of the unseen classes (outlined, "*" in legend).
        scale: nearest-neighbour upscaling factor of every tile.
        ignore_label: label value of unlabeled pixels (not evaluated, not coloured).
    """
    palette = class_palette(len(class_names))
    tiles = []
    for image, gt, pred in rows:
        # Ignore pixels are not evaluated: show the prediction only where the label is valid,
        # and a darkened input elsewhere.
        valid = (gt != ignore_label)[..., None]
        shown = np.where(valid, colorize(pred, palette), (image * 0.35).astype(np.uint8))
        cells = [
            image,
            mark_unseen(colorize(gt, palette, ignore_label), gt, unseen),
            mark_unseen(shown, np.where(valid[..., 0], pred, ignore_label), unseen),
        ]
        tiles.append(np.concatenate([_pad(c) for c in cells], axis=1))
    width = max(t.shape[1] for t in tiles)
    grid = np.concatenate([np.pad(t, ((0, 0), (0, width - t.shape[1]), (0, 0))) for t in tiles])
    grid = Image.fromarray(grid).resize(
        (grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST
    )

    header = 16
    names = [name + (" * unseen" if k in unseen else "") for k, name in enumerate(class_names)]
    canvas = Image.new(
        "RGB", (grid.width, grid.height + header + legend_height(len(names), 2)), "white"
    )
    draw = ImageDraw.Draw(canvas)
    col_w = grid.width // 3
    for i, title in enumerate(["input", "ground truth", "prediction (labelled pixels)"]):
        draw.text((i * col_w + 4, 2), title, fill=(0, 0, 0))
    canvas.paste(grid, (0, header))
    draw_legend(draw, header + grid.height, grid.width, names, palette, columns=2)
    return canvas


def legend_height(num_classes: int, columns: int = 1) -> int:
    """Pixels that :func:`draw_legend` needs for ``num_classes`` entries in ``columns``."""
    return _LEGEND_LINE * math.ceil(num_classes / columns) + 8


def draw_legend(
    draw: ImageDraw.ImageDraw,
    top: int,
    width: int,
    class_names: list[str],
    palette: np.ndarray,
    columns: int = 1,
) -> None:
    """Draw a colour swatch and the name of each class, row by row.

    Args:
        draw: drawing context of the canvas.
        top: y of the legend's first row.
        width: width of the canvas the columns share.
        class_names: K entries; palette: [K, 3] uint8 colours.
        columns: entries per row.
    """
    for k, name in enumerate(class_names):
        x = (k % columns) * (width // columns) + 4
        y = top + 4 + (k // columns) * _LEGEND_LINE
        draw.rectangle([x, y + 2, x + 10, y + 12], fill=tuple(int(c) for c in palette[k]))
        draw.text((x + 14, y), name, fill=(0, 0, 0))


def overlay_with_legend(image: np.ndarray, labels: np.ndarray, class_names: list[str]):
    """The image blended with its label colours (40 / 60), a one-column legend below.

    Args:
        image: [H, W, 3] uint8 RGB. labels: [H, W] class indices into ``class_names``.
        class_names: the K names.

    Returns:
        A PIL image of width W and height H plus the legend.
    """
    palette = class_palette(len(class_names))
    blend = (0.4 * image + 0.6 * colorize(labels, palette)).astype(np.uint8)
    height = blend.shape[0] + legend_height(len(class_names))
    canvas = Image.new("RGB", (blend.shape[1], height), "white")
    canvas.paste(Image.fromarray(blend), (0, 0))
    draw_legend(ImageDraw.Draw(canvas), blend.shape[0], blend.shape[1], class_names, palette)
    return canvas


def _pad(cell: np.ndarray, border: int = 2) -> np.ndarray:
    return np.pad(cell, ((border, border), (border, border), (0, 0)), constant_values=255)
