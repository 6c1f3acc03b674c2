"""The demo picture: colours, unseen outlines, ignore pixels left uncoloured."""

import numpy as np

from ocz_d2.utils.visualize import class_palette, colorize, mark_unseen, prediction_panel


def test_colorize_and_unseen_outline():
    palette = class_palette(3)
    assert len({tuple(c) for c in palette}) == 3
    label = np.full((6, 6), 255, dtype=np.uint8)
    label[1:5, 1:5] = 2
    rgb = colorize(label, palette)
    assert (rgb[0, 0] == 0).all() and (rgb[2, 2] == palette[2]).all()
    marked = mark_unseen(rgb, label, unseen=[2])
    assert (marked[1, 1] == 255).all()  # boundary of the unseen region is white
    assert (marked[2, 2] == palette[2]).all()  # its interior keeps the class colour
    assert (mark_unseen(rgb, label, unseen=[0]) == rgb).all()


def test_panel_shows_prediction_only_on_labelled_pixels():
    image = np.full((8, 8, 3), 200, dtype=np.uint8)
    gt = np.full((8, 8), 255, dtype=np.uint8)
    gt[:4] = 0
    pred = np.ones((8, 8), dtype=np.int64)
    panel = np.asarray(prediction_panel([(image, gt, pred)], ["a", "b"], unseen=[1], scale=1))
    header, border, width = 16, 2, 12  # tile = 8 px + 2 px border on each side
    cell = panel[header + border : header + border + 8, 2 * width + border : 2 * width + border + 8]
    palette = class_palette(2)
    assert (cell[5, 3] == 70).all()  # ignore pixel: darkened input (200 * 0.35)
    assert (cell[2, 3] == palette[1]).all()  # labelled pixel: predicted class colour
