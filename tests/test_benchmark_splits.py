"""Every registered real-benchmark split against docs/PROTOCOLS.md: class counts, unseen names
and indices (the expectations are written here from docs/PROTOCOLS.md, independently of the split
files)."""

from __future__ import annotations

import pytest
from detectron2.data import MetadataCatalog

import ocz_d2.data  # noqa: F401  (registers the builtin splits)
from ocz_d2.data.builtin import BENCHMARK_SPLIT_FILES, register_all_benchmarks

VOC = (
    "aeroplane bicycle bird boat bottle bus car cat chair cow diningtable dog horse motorbike "
    "person pottedplant sheep sofa train tvmonitor"
).split()

# name -> (number of classes, unseen indices, unseen names in the order of the indices)
PROTOCOLS = {
    "ocz_voc": (20, [15, 16, 17, 18, 19], ["pottedplant", "sheep", "sofa", "train", "tvmonitor"]),
    "ocz_coco_stuff": (
        171,
        [19, 23, 28, 29, 36, 51, 76, 88, 94, 112, 133, 136, 137, 157, 160],
        "cow giraffe suitcase frisbee skateboard carrot scissors cardboard clouds grass "
        "playingfield river road tree wall-concrete".split(),
    ),
    "ocz_context59_zs3": (
        59,
        [19, 33, 48, 14, 7, 24, 6, 54, 31, 0],
        "cow motorbike sofa cat boat fence bird tvmonitor keyboard aeroplane".split(),
    ),
    # From Cascade-CLIP's public config (novel_class of
    # configs/context_59/vpt_seg_zero_vit-b_512x512_40k_12_10.py), as docs/PROTOCOLS.md lists it.
    "ocz_context59_cascade": (
        59,
        [0, 2, 3, 7, 9, 13, 17, 19, 31, 37],
        "aeroplane bed bedclothes boat bottle car cloth cow keyboard plate".split(),
    ),
    "ocz_ade150": (150, [], []),
}
# Cross-domain targets: the full label set, nothing unseen.
FULL = {
    "ocz_voc_all_val": ("ocz_voc_val", 20),
    "ocz_context59_all_val": ("ocz_context59_zs3_val", 59),
}


def _registered():
    return set(register_all_benchmarks())


def test_every_benchmark_split_is_registered_and_checked_here():
    names = _registered()
    expected = {f"{base}_{s}" for base in PROTOCOLS for s in ("train", "val")} | set(FULL)
    assert names == expected
    assert len(BENCHMARK_SPLIT_FILES) == len(PROTOCOLS)


@pytest.mark.parametrize("base", sorted(PROTOCOLS))
@pytest.mark.parametrize("split", ["train", "val"])
def test_split_metadata_matches_protocols(base, split):
    num, unseen, unseen_names = PROTOCOLS[base]
    meta = MetadataCatalog.get(f"{base}_{split}")
    classes = list(meta.stuff_classes)
    assert len(classes) == num and len(set(classes)) == num
    assert [classes[i] for i in unseen] == unseen_names
    assert list(meta.unseen_classes) == sorted(unseen)
    assert list(meta.seen_classes) == [i for i in range(num) if i not in unseen]
    assert len(meta.seen_classes) == num - len(unseen)
    assert meta.ignore_label == 255
    assert meta.evaluator_type == "ocz_zero_shot_sem_seg"


def test_native_class_orders():
    assert list(MetadataCatalog.get("ocz_voc_train").stuff_classes) == VOC
    coco = MetadataCatalog.get("ocz_coco_stuff_val").stuff_classes
    # things first (80, COCO order), then the 91 stuff classes alphabetically
    assert coco[:3] == ["person", "bicycle", "car"] and coco[79] == "toothbrush"
    assert coco[80] == "banner" and coco[170] == "wood"
    assert list(coco[80:]) == sorted(coco[80:])
    context = MetadataCatalog.get("ocz_context59_zs3_val").stuff_classes
    assert list(context) == sorted(context)  # the mmseg order is alphabetical
    cascade = MetadataCatalog.get("ocz_context59_cascade_val")
    assert (
        cascade.stuff_classes == context
        and cascade.sem_seg_root == MetadataCatalog.get("ocz_context59_zs3_val").sem_seg_root
    )
    ade = MetadataCatalog.get("ocz_ade150_val").stuff_classes
    assert ade[:4] == ["wall", "building", "sky", "floor"] and ade[149] == "flag"


@pytest.mark.parametrize("name", sorted(FULL))
def test_cross_domain_targets_cover_the_full_label_set(name):
    parent, num = FULL[name]
    _registered()
    meta, parent_meta = MetadataCatalog.get(name), MetadataCatalog.get(parent)
    assert list(meta.stuff_classes) == list(parent_meta.stuff_classes) and num == len(
        meta.stuff_classes
    )
    assert list(meta.unseen_classes) == [] and list(meta.seen_classes) == list(range(num))
    assert meta.sem_seg_root == parent_meta.sem_seg_root
