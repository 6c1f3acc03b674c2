"""Caption datasets (split files of kind captions, the mapper) and concepts (bank, matcher,
token spans), with hand-written answers."""

from __future__ import annotations

import csv
import json

import numpy as np
import open_clip
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from PIL import Image

from ocz_d2.config import load_config
from ocz_d2.data import CaptionDatasetMapper, is_caption_split, register_split_file
from ocz_d2.data.caption_csv import read_caption_csv
from ocz_d2.data.concepts import (
    ConceptBank,
    ConceptMatcher,
    build_concept_extractor,
    concept_token_spans,
    singular,
)
from ocz_d2.data.prepare import PrepareError, prepare_coco_captions
from ocz_d2.data.register_zero_shot import check_datasets
from ocz_d2.utils.errors import DataError, MissingFileError

BANK = ["dining table|diningtable", "table", "red car", "bus", "glass", "box", "city"]


def _found(matcher, caption):
    return [(caption[m.start : m.end], m.concept) for m in matcher(caption)]


def test_singular_rules():
    assert [singular(w) for w in ["cars", "buses", "boxes", "cities", "glass", "bus", "is"]] == [
        "car", "bus", "box", "city", "glass", "bus", "is",
    ]  # fmt: skip


def test_matcher_plural_order_and_longest_phrase():
    m = ConceptMatcher(ConceptBank(BANK))
    assert _found(m, "Two red cars near a dining table.") == [("red cars", 2), ("dining table", 0)]
    # word order, and "and" between the words; a plural of an -es noun
    assert _found(m, "a car that is red, buses and boxes") == [
        ("buses", 3), ("boxes", 5),
    ]  # fmt: skip
    assert _found(m, "the car red and a table") == [("car red", 2), ("table", 1)]
    assert _found(m, "a red and shiny car") == []  # another word between: no match
    assert _found(m, "cities with glasses") == [("cities", 6), ("glasses", 4)]
    assert _found(m, "a diningtable") == [("diningtable", 0)]


def test_bank_filter_drops_unknown_phrases_and_no_concept_caption():
    m = ConceptMatcher(ConceptBank(BANK))
    assert m("a blue car and a green truck") == []  # "car" alone is not a concept here
    assert m("") == []


def test_bank_file_errors(tmp_path):
    with pytest.raises(DataError, match="merge them"):
        ConceptBank(["red car", "car red"])
    with pytest.raises(DataError, match="empty phrasing"):
        ConceptBank(["car|"])
    with pytest.raises(DataError, match="no concept"):
        ConceptBank([])
    with pytest.raises(MissingFileError, match="does not exist"):
        ConceptBank.from_file(tmp_path / "absent.txt")
    path = tmp_path / "bank.txt"
    path.write_text("# comment\n\nsofa|couch\ncat\n")
    bank = ConceptBank.from_file(path)
    assert bank.names == ("sofa", "cat") and bank.phrasings[0] == ("sofa", "couch")
    with pytest.raises(DataError, match="EXTRACTOR"):
        build_concept_extractor(bank, "nltk")
    assert isinstance(build_concept_extractor(bank, "matcher"), ConceptMatcher)


def test_token_spans_hold_the_concept_tokens():
    tokenizer = open_clip.get_tokenizer("ViT-B-16")
    caption = "A photo of two red cars, and a dining-table!"
    bank = ConceptBank(["red car", "dining table"])
    matches = ConceptMatcher(bank)(caption)
    tokens = tokenizer([caption])[0]
    spans = concept_token_spans(caption, matches, tokenizer.encode, tokens.shape[-1])
    assert [s[0] for s in spans] == [0, 1]
    for (_, first, stop), words in zip(spans, ["red cars", "dining-table"]):
        assert tokens[first:stop].tolist() == tokenizer.encode(words)
    # a concept beyond the context is dropped
    assert concept_token_spans(caption, matches, tokenizer.encode, 6) == []


def _caption_data(tmp_path, rows):
    (tmp_path / "img").mkdir()
    for i in range(len(rows)):
        rgb = np.full((20, 30, 3), 40 * i, np.uint8)
        Image.fromarray(rgb).save(tmp_path / "img" / f"{i}.png")
    with open(tmp_path / "pairs.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["filepath", "caption"])
        writer.writerows([(f"img/{i}.png", c) for i, c in enumerate(rows)])
    (tmp_path / "bank.txt").write_text("red car\nbus\n")
    split = tmp_path / "captions.yaml"
    split.write_text(
        "kind: captions\ndataset: test_caps\nconcept_bank: bank.txt\n"
        f"splits:\n  train:\n    csv: {tmp_path / 'pairs.csv'}\n"
    )
    return split


def test_caption_split_file_and_mapper(tmp_path):
    split = _caption_data(tmp_path, ["two red cars", "a bus and a red car", "a tree"])
    assert register_split_file(split) == ["ocz_test_caps_train"]
    name = "ocz_test_caps_train"
    assert is_caption_split(name)
    check_datasets([name])
    records = DatasetCatalog.get(name)
    assert [r["caption"] for r in records] == ["two red cars", "a bus and a red car", "a tree"]
    assert MetadataCatalog.get(name).concept_bank == str(tmp_path / "bank.txt")
    cfg = load_config(None, ["INPUT.CROP.SIZE", "(16, 16)", "DATASETS.TRAIN", f"('{name}',)"])
    cfg.MODEL.SIMZSS.CONCEPTS.EXTRACTOR = "matcher"
    mapper = CaptionDatasetMapper(cfg, True)
    out = [mapper(r) for r in records]
    assert out[0]["image"].shape == (3, 16, 16) and out[0]["image"].dtype == torch.uint8
    assert out[0]["concepts"].tolist() == [[0, 4, 12]]
    assert out[1]["concepts"].tolist() == [[1, 2, 5], [0, 12, 19]]
    assert out[2]["concepts"].shape == (0, 3)  # no concept: the global loss only
    assert int(out[1]["image"].float().mean()) == 40  # the image's own pixels


def test_caption_split_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: captions\ndataset: x\nsplits:\n  train: {label_root: a}\n")
    with pytest.raises(DataError, match="unknown key"):
        register_split_file(bad)
    bad.write_text("kind: pictures\ndataset: x\nsplits: {}\n")
    with pytest.raises(DataError, match="'kind' must be one of"):
        register_split_file(bad)
    gone = tmp_path / "gone.yaml"
    gone.write_text(
        f"kind: captions\ndataset: test_gone\nsplits:\n  a: {{csv: {tmp_path}/x.csv}}\n"
    )
    register_split_file(gone)
    with pytest.raises(MissingFileError, match="caption CSV"):
        check_datasets(["ocz_test_gone_a"])


def test_read_caption_csv_checks(tmp_path):
    path = tmp_path / "c.csv"
    path.write_text("filepath,caption\nx.png, \n")
    with pytest.raises(ValueError, match="empty captions on line"):
        read_caption_csv(path, check_images=False)
    path.write_text("file,text\nx.png,a\n")
    with pytest.raises(ValueError, match="no column"):
        read_caption_csv(path)


def test_prepare_coco_captions_writes_open_clip_csvs(tmp_path):
    coco = tmp_path / "coco"
    (coco / "annotations").mkdir(parents=True)
    (coco / "train2017").mkdir()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(coco / "train2017" / "1.jpg")
    annotations = {
        "images": [{"id": 7, "file_name": "1.jpg"}],
        "annotations": [
            {"id": 1, "image_id": 7, "caption": "Two  red cars,\nparked."},
            {"id": 2, "image_id": 7, "caption": "A street"},
        ],
    }
    (coco / "annotations" / "captions_train2017.json").write_text(json.dumps(annotations))
    out = tmp_path / "out"
    assert prepare_coco_captions(coco, out, splits=("train2017",)) == {"train2017": 2}
    files, captions = read_caption_csv(out / "train2017.csv")
    assert captions == ["Two red cars, parked.", "A street"]
    assert files == [(coco / "train2017" / "1.jpg").resolve()] * 2
    with pytest.raises(PrepareError, match="val2017"):
        prepare_coco_captions(coco, out, splits=("val2017",))


def test_caption_split_with_an_image_root(tmp_path):
    """A CSV whose image paths start elsewhere than its folder (the synthetic benchmark's
    captions/train.csv lists images/train/...): image_root says where."""
    (tmp_path / "images").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "images" / "a.png")
    (tmp_path / "captions").mkdir()
    (tmp_path / "captions" / "c.csv").write_text("filepath,caption\nimages/a.png,a red car\n")
    split = tmp_path / "s.yaml"
    split.write_text(
        f"kind: captions\ndataset: test_rooted\nsplits:\n  train:\n"
        f"    csv: {tmp_path / 'captions' / 'c.csv'}\n    image_root: {tmp_path}\n"
    )
    (name,) = register_split_file(split)
    assert DatasetCatalog.get(name)[0]["file_name"] == str(tmp_path / "images" / "a.png")
    with pytest.raises(FileNotFoundError, match="relative to the CSV's folder"):
        read_caption_csv(tmp_path / "captions" / "c.csv")
