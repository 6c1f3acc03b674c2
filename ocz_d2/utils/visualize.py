"""Pictures of predictions: input | ground truth | prediction panels (unseen classes marked), and
one image with its segmentation and a legend (Detectron2's Visualizer)."""

from __future__ import annotations

import colorsys
import math

import numpy as np
from PIL import Image, ImageDraw

from ..constants import IGNORE_LABEL

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


def draw_segmentation(
    image: np.ndarray,
    labels: np.ndarray,
    class_names: list[str],
    *,
    min_side: int = 512,
    alpha: float = 0.6,
) -> tuple[np.ndarray, list[int]]:
    """The image with its segmentation and a legend, drawn with Detectron2's ``Visualizer``.

    ``Visualizer.draw_sem_seg`` draws the classes (colours of :func:`class_palette`, names on
    the larger regions); the legend, on a white panel at the right, lists the classes present,
    in vocabulary order: a swatch of the class colour (opaque, so the colour is exact) and the
    name.

    Args:
        image: [H, W, 3] uint8 RGB. labels: [H, W] indices into ``class_names``.
        class_names: the K names.
        min_side: small images are enlarged so that their longer side has this many pixels
            (names stay readable); larger ones are drawn at their size.
        alpha: opacity of the class colours over the image.

    Returns:
        The picture, uint8 RGB [H * s, (W + legend width) * s, 3] (taller when the legend needs
        it), and the class indices listed in its legend.
    """
    from detectron2.data import Metadata
    from detectron2.utils.visualizer import Visualizer

    height, width = labels.shape
    num = len(class_names)
    palette = class_palette(num)
    present = [int(k) for k in np.unique(labels) if 0 <= k < num]
    scale = max(1.0, min_side / max(height, width))
    # Legend geometry in image pixels; matplotlib sizes text in points (1/72 inch) at the
    # figure's dpi (Visualizer: 100), scaled by `scale`.
    font = max(math.sqrt(height * width) / 90, 10 / scale)
    text_h = font * 100 / 72
    row = 1.8 * text_h
    swatch = 1.2 * text_h
    longest = max((len(class_names[k]) for k in present), default=0)
    panel_w = 3 * swatch + 0.65 * text_h * longest
    panel_h = 2 * swatch + row * len(present)
    canvas_h = max(height, math.ceil(panel_h))
    canvas_w = width + math.ceil(panel_w)
    canvas = np.full((canvas_h, canvas_w, 3), 255, dtype=np.uint8)
    canvas[:height, :width] = image
    padded = np.full((canvas_h, canvas_w), num, dtype=np.int64)  # num: not a class, not drawn
    padded[:height, :width] = labels

    meta = Metadata(stuff_classes=list(class_names), stuff_colors=[tuple(c) for c in palette])
    vis = Visualizer(canvas, meta, scale=scale)
    vis.draw_sem_seg(padded, alpha=alpha)
    for i, k in enumerate(present):
        x, y = width + swatch, swatch + i * row
        corners = np.array([[x, y], [x + swatch, y], [x + swatch, y + swatch], [x, y + swatch]])
        color = palette[k] / 255.0
        vis.draw_polygon(corners, color=color, edge_color=color, alpha=1.0)
        vis.draw_text(
            class_names[k],
            (x + 1.5 * swatch, y),
            font_size=font,
            color="white",
            horizontal_alignment="left",
        )
    return vis.output.get_image(), present


def draw_prediction_row(
    image: np.ndarray,
    gt: np.ndarray,
    pred: np.ndarray,
    class_names: list[str],
    unseen: list[int],
    *,
    ignore_label: int = IGNORE_LABEL,
    min_side: int = 256,
) -> np.ndarray:
    """Input | ground truth | prediction, side by side, for TensorBoard.

    The two label maps are drawn over the image by Detectron2's ``Visualizer`` (colours of
    :func:`class_palette`, names on the larger regions, unseen names with a "*"), and unseen
    classes are outlined in white, as in :func:`prediction_panel`; ignore pixels are not drawn.

    Args:
        image: [H, W, 3] uint8 RGB. gt, pred: [H, W] class indices (``ignore_label``: none).
        class_names: the K names; unseen: indices of the unseen classes.
        ignore_label: the ground truth's unlabelled value.
        min_side: small images are enlarged (nearest) so that the longer side has at least
            this many pixels.

    Returns:
        uint8 RGB [H * s, 3 * W * s + 2 gaps, 3].
    """
    from detectron2.data import Metadata
    from detectron2.utils.visualizer import Visualizer

    height, width = gt.shape
    s = max(1, math.ceil(min_side / max(height, width)))
    image, gt, pred = (np.repeat(np.repeat(a, s, 0), s, 1) for a in (image, gt, pred))
    names = [n + ("*" if k in unseen else "") for k, n in enumerate(class_names)]
    palette = class_palette(len(class_names))
    meta = Metadata(stuff_classes=names, stuff_colors=[tuple(int(v) for v in c) for c in palette])
    cells = [image]
    for label in (gt, pred):
        label = np.where(label == ignore_label, len(names), label)  # len(names): not drawn
        drawn = Visualizer(image, meta).draw_sem_seg(label, alpha=0.6).get_image()
        cells.append(mark_unseen(drawn, label, unseen))
    gap = np.full((image.shape[0], 4, 3), 255, dtype=np.uint8)
    return np.concatenate([cells[0], gap, cells[1], gap, cells[2]], axis=1)


def _pad(cell: np.ndarray, border: int = 2) -> np.ndarray:
    return np.pad(cell, ((border, border), (border, border), (0, 0)), constant_values=255)
