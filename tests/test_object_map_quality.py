"""Agreement of object maps with reference maps: purity, inverse purity, F and mBO by hand."""

import json

import numpy as np
import pytest
from PIL import Image

from ocz_d2.evaluation.object_map_quality import (
    MapAgreement,
    majority_on_grid,
    map_agreement,
    object_map_folder_agreement,
)
from ocz_d2.utils.errors import DataError
from tools import object_map_quality as tool

OBJECTS = np.array([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 2, 2], [2, 2, 2, 2]], dtype=np.uint8)
REGIONS = np.array([[5, 5, 5, 5], [5, 5, 5, 5], [7, 7, 7, 7], [7, 7, 7, 255]], dtype=np.uint8)


def test_one_image_by_hand():
    r = map_agreement(REGIONS, OBJECTS)
    # 15 pixels (one "no region"). Region 5 holds 4 + 4 of objects 0 and 1, region 7 holds 7 of
    # object 2: purity (4 + 7) / 15; every object lies in one region: inverse purity 1.
    assert r["pixels"] == 15 and r["images"] == 1
    assert r["purity"] == pytest.approx(11 / 15)
    assert r["inverse_purity"] == pytest.approx(1.0)
    assert r["f"] == pytest.approx(2 * (11 / 15) / (11 / 15 + 1))
    # mBO over objects 1 and 2 (0 is the background): IoU 4 / 8 and 7 / 7.
    assert r["objects"] == 2
    assert r["mbo"] == pytest.approx(0.75)
    # With no background value, object 0 counts too (IoU 4 / 8).
    assert map_agreement(REGIONS, OBJECTS, background=None)["mbo"] == pytest.approx(2 / 3)


def test_region_ids_are_matched_within_an_image_only():
    counts = MapAgreement()
    counts.add(REGIONS, OBJECTS)
    # The same image with regions renumbered: the same agreement, pooled over two images.
    counts.add(np.where(REGIONS == 5, 1, np.where(REGIONS == 7, 0, 255)).astype(np.uint8), OBJECTS)
    r = counts.result()
    assert r["images"] == 2 and r["pixels"] == 30 and r["objects"] == 4
    assert r["purity"] == pytest.approx(11 / 15) and r["mbo"] == pytest.approx(0.75)


def test_errors():
    with pytest.raises(ValueError, match="same image"):
        MapAgreement().add(REGIONS[:2], OBJECTS)
    empty = MapAgreement()
    empty.add(np.full((2, 2), 255, np.uint8), OBJECTS[:2, :2])
    with pytest.raises(ValueError, match="nothing was measured"):
        empty.result()


def test_majority_on_grid():
    labels = np.array([[1, 1, 2], [3, 1, 2], [4, 4, 4]], dtype=np.uint8)
    # Blocks of 2: [[1,1],[3,1]] -> 1; [[2],[2]] -> 2; [[4,4]] -> 4; [[4]] -> 4.
    expected = np.array([[1, 1, 2], [1, 1, 2], [4, 4, 4]], dtype=np.uint8)
    np.testing.assert_array_equal(majority_on_grid(labels, 2), expected)


def _write(folder, maps):
    folder.mkdir(parents=True)
    for name, array in maps.items():
        Image.fromarray(array).save(folder / name)


def test_folders_and_tool(tmp_path, capsys):
    root = tmp_path / "object_maps"
    _write(root / "oracle" / "test", {"a.png": OBJECTS, "b.png": OBJECTS})
    _write(root / "guide" / "test", {"a.png": REGIONS, "b.png": OBJECTS})
    r = object_map_folder_agreement(root / "guide" / "test", root / "oracle" / "test")
    # a: as by hand; b: perfect (16 pixels, objects 1 and 2 with IoU 1).
    assert r["pixels"] == 31 and r["purity"] == pytest.approx((11 + 16) / 31)
    assert r["mbo"] == pytest.approx((0.5 + 1 + 1 + 1) / 4)
    one = object_map_folder_agreement(
        root / "guide" / "test", root / "oracle" / "test", single_region=True
    )
    assert one["inverse_purity"] == pytest.approx(1.0)
    # One region per image: object 2 is its majority (7 of 15 pixels in a, 8 of 16 in b).
    assert one["purity"] == pytest.approx((7 + 8) / 31)

    out = tmp_path / "q.json"
    args = ["guide", "--root", str(root), "--grid", "2", "--output", str(out)]
    assert tool.main(args) == 0
    printed = capsys.readouterr().out
    assert "| guide | 87.1 | 100.0 |" in printed
    saved = json.loads(out.read_text())["guides"]
    assert set(saved) == {"guide", "one region", "reference on the 2-px grid"}
    # Every 2x2 block of OBJECTS holds one object: the grid reference is perfect.
    assert saved["reference on the 2-px grid"]["f"] == pytest.approx(1.0)


def test_folder_errors(tmp_path, capsys):
    root = tmp_path / "object_maps"
    _write(root / "oracle" / "test", {"a.png": OBJECTS})
    _write(root / "guide" / "test", {"a.png": REGIONS, "z.png": REGIONS})
    with pytest.raises(DataError, match="no reference"):
        object_map_folder_agreement(root / "guide" / "test", root / "oracle" / "test")
    with pytest.raises(DataError, match="does not exist"):
        object_map_folder_agreement(root / "nothing", root / "oracle" / "test")
    (root / "empty").mkdir()
    with pytest.raises(DataError, match="no .png"):
        object_map_folder_agreement(root / "empty", root / "oracle" / "test")
    (root / "oracle" / "test" / "z.png").write_bytes(b"")
    with pytest.raises(DataError, match="empty"):
        object_map_folder_agreement(root / "guide" / "test", root / "oracle" / "test")
    assert tool.main(["missing", "--root", str(root)]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert tool.main(["guide", "--root", str(root), "--grid", "-1"]) == 2
