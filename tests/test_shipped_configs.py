"""Every shipped config under configs/ loads and builds a model (with a tiny CLIP and a random tiny
SSL ViT instead of ViT-B/16 and DINO, SimZSS's towers likewise: nothing downloads), and the
protocol configs say what docs/PROTOCOLS.md says."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import yaml
from detectron2.modeling import build_model

import ocz_d2.data  # noqa: F401  (registers the builtin splits)
from ocz_d2.config import load_config

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted(
    p.relative_to(REPO / "configs").as_posix() for p in (REPO / "configs").rglob("*.yaml")
)
TINY = [
    "MODEL.DEVICE", "cpu",
    "MODEL.OCZ.CLIP.MODEL_NAME", "OCZ-Tiny-ViT",
    "MODEL.OCZ.CLIP.PRETRAINED", "",
    "MODEL.OCZ.CLIP.WEIGHTS", "",
    "MODEL.OCZ.CLIP.OUT_LAYERS", "[1, 3]",
    "MODEL.SEM_SEG_HEAD.IN_FEATURES", "['res1', 'res3']",
    "MODEL.OCZ.GUIDE.SSL_MODEL", "vit_tiny_patch16_224",
    "MODEL.OCZ.GUIDE.PRETRAINED", "False",
    "MODEL.OCZ.GUIDE.WEIGHTS", "",
    "MODEL.OCZ.DECODER.DEC_LAYERS", "1",
    # SimZSS: a random tiny timm ViT and the tiny CLIP's text tower
    "MODEL.SIMZSS.VISION.MODEL_NAME", "vit_tiny_patch16_224",
    "MODEL.SIMZSS.VISION.PRETRAINED", "False",
    "MODEL.SIMZSS.VISION.WEIGHTS", "",
    "MODEL.SIMZSS.TEXT.MODEL_NAME", "OCZ-Tiny-ViT",
    "MODEL.SIMZSS.TEXT.WEIGHTS", "",
]  # fmt: skip
# The same for a config whose backbone is a CNN (ZegFormer's): its ResNet random, its CLIP tiny.
TINY_CNN = [
    "MODEL.DEVICE", "cpu",
    "MODEL.OCZ.CLIP.MODEL_NAME", "OCZ-Tiny-ViT",
    "MODEL.OCZ.CLIP.PRETRAINED", "",
    "MODEL.OCZ.CLIP.WEIGHTS", "",
    "MODEL.OCZ.RESNET.WEIGHTS", "",
    "MODEL.RESNETS.DEPTH", "50",
    "MODEL.OCZ.DECODER.DEC_LAYERS", "1",
]  # fmt: skip
# A name that encodes the model, the total batch and the schedule: <model>_vitb16_bs<B>_<N>k...
# (the protocol configs and the ablation rows), <model>_r101_bs<B>_<N>k (ZegFormer's).
SCHEDULE = re.compile(r"_(?:vitb16|r101)_bs(\d+)_(\d+)k")
ZEGFORMER = [c for c in CONFIGS if re.match(r"^[\w-]+/zegformer_r101_bs\d+_\d+k\.yaml$", c)]
# Protocol configs: <dataset>/oczss_vitb16_bs<B>_<N>k[...].yaml; ablation rows are in ablation/.
PROTOCOL = re.compile(r"^[\w-]+/oczss_vitb16_bs(\d+)_(\d+)k[\w-]*\.yaml$")
ABLATION = [c for c in CONFIGS if "/ablation/" in c]


# A config path in prose or code: ``configs/<path>.yaml``, or ``<subfolder>/<path>.yaml`` for a
# subfolder of configs/ (the protocol tables name them so); paths may go deeper (voc/ablation/).
_SUBFOLDERS = sorted(p.name for p in (REPO / "configs").iterdir() if p.is_dir())
_NAMED = re.compile(
    r"(?<![\w./-])(?:configs/((?:[\w.-]+/)*[\w.-]+\.yaml)|((?:"
    + "|".join(map(re.escape, _SUBFOLDERS))
    + r")/(?:[\w.-]+/)*[\w.-]+\.yaml))"
)


def test_configs_named_in_docs_and_code_exist():
    """Every config that a document, a tool, a module or the Makefile names is a shipped config,
    i.e. one that test_shipped_config_builds_a_model builds; the protocol configs are among them."""
    sources = [*REPO.glob("*.md"), *(REPO / "docs").rglob("*.md"), REPO / "Makefile"]
    sources += [*(REPO / "tools").glob("*.py"), *(REPO / "ocz_d2").rglob("*.py")]
    named = {}
    for source in sources:
        for m in _NAMED.finditer(source.read_text(encoding="utf-8")):
            named.setdefault(m.group(1) or m.group(2), source.relative_to(REPO).as_posix())
    missing = {config: source for config, source in named.items() if config not in CONFIGS}
    assert not missing, f"named but not under configs/ (config: first file naming it): {missing}"
    # The scan finds what GETTING_STARTED.md's protocol table names (the pattern works).
    assert {"voc/oczss_vitb16_bs16_20k.yaml", "coco_stuff/oczss_vitb16_bs16_80k.yaml"} <= set(named)


@pytest.mark.parametrize("config", CONFIGS)
def test_shipped_config_builds_a_model(config, request):
    from detectron2.data import MetadataCatalog

    shipped = load_config(REPO / "configs" / config)
    cnn = shipped.MODEL.META_ARCHITECTURE != "SimZSS" and shipped.MODEL.BACKBONE.NAME != (
        "CLIPPromptBackbone"
    )
    tiny = TINY_CNN if cnn else TINY
    cfg = load_config(REPO / "configs" / config, tiny)
    if any(MetadataCatalog.get(d).get("class_embeddings", None) for d in cfg.DATASETS.TRAIN):
        # A split with a class-embedding file (the synthetic attribute route): the test data's.
        data = request.getfixturevalue("synthetic_benchmark")
        cfg = load_config(
            REPO / "configs" / config,
            [*tiny, "MODEL.OCZ.TEXT.EMBEDDINGS_FILE", str(data.class_embeddings)],
        )
    torch.manual_seed(0)
    model = build_model(cfg)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) > 0
    m = SCHEDULE.search(config)
    if m:  # the name encodes the model, the total batch and the schedule
        assert cfg.SOLVER.IMS_PER_BATCH == int(m.group(1))
        assert cfg.SOLVER.MAX_ITER == int(m.group(2)) * 1000
        text = (REPO / "configs" / config).read_text()
        assert "Total batch" in text and "BASE_LR" in text


def test_protocol_and_ablation_configs_are_where_they_should_be():
    protocol = [c for c in CONFIGS if PROTOCOL.match(c)]
    assert len(protocol) == 11 and not set(protocol) & set(ABLATION)
    assert all(SCHEDULE.search(c) for c in ABLATION)
    assert ZEGFORMER == [
        "coco_stuff/zegformer_r101_bs32_60k.yaml",
        "voc/zegformer_r101_bs32_10k.yaml",
    ]
    assert {Path(c).name for c in ABLATION} == {
        "baseline_vitb16_bs16_20k.yaml",
        "ora_vitb16_bs16_20k.yaml",
        "objects_vitb16_bs16_20k.yaml",
        "oczss_split_vitb16_bs16_20k.yaml",
        "oczss_split_vitb16_bs16_20k_transductive.yaml",
    }


@pytest.mark.parametrize("config", [c for c in CONFIGS if PROTOCOL.match(c)])
def test_protocol_configs_follow_the_recipe(config):
    cfg = load_config(REPO / "configs" / config)
    assert cfg.MODEL.OCZ.CLIP.MODEL_NAME == "ViT-B-16" and cfg.MODEL.OCZ.CLIP.PRETRAINED == "openai"
    assert cfg.MODEL.OCZ.GUIDE.SSL_MODEL == "vit_base_patch16_224.dino"
    assert tuple(cfg.INPUT.CROP.SIZE) == (512, 512)
    assert cfg.MODEL.OCZ.TEST.MODE == "slide"
    assert tuple(cfg.MODEL.OCZ.TEST.WINDOW_SIZE) == (512, 512)
    assert tuple(cfg.MODEL.OCZ.TEST.WINDOW_STRIDE) == (426, 426)
    assert cfg.SOLVER.BASE_LR == 2.5e-5 and cfg.SOLVER.WARMUP_ITERS == 1500
    assert cfg.SOLVER.POLY_LR_POWER == 0.9 and cfg.SOLVER.WEIGHT_DECAY == 0.01
    assert cfg.SOLVER.REFERENCE_WORLD_SIZE == 0  # the total batch does not follow the GPU count
    transductive = "transductive" in config
    assert cfg.INPUT.ZERO_SHOT_SETTING == ("transductive" if transductive else "inductive")
    cross = config.startswith("cross_domain/")
    assert cfg.MODEL.OCZ.TEST.CALIBRATION == (0.0 if transductive or cross else 0.1)
    train = cfg.DATASETS.TRAIN[0]
    inductive_iters = {"ocz_voc_train": 20000, "ocz_context59": 40000, "ocz_coco_stuff": 80000}
    base_iters = next(v for k, v in inductive_iters.items() if train.startswith(k))
    extra = {20000: 10000, 40000: 20000, 80000: 40000}[base_iters] if transductive else 0
    assert cfg.SOLVER.MAX_ITER == base_iters + extra
    if transductive:  # self-training for the added iterations
        assert cfg.MODEL.OCZ.SELF_TRAINING.START_ITER == base_iters
    if cross:
        assert train == "ocz_coco_stuff_train"
        assert cfg.DATASETS.TEST[0] in (
            "ocz_voc_all_val",
            "ocz_context59_all_val",
            "ocz_ade150_val",
        )
    else:
        assert cfg.DATASETS.TEST[0] == train.replace("_train", "_val")
    assert cfg.MODEL.OCZ.TEXT.TEMPLATES == ("imagenet" if "coco_stuff" in train else "single")
    # OC-ZSS's settings: n_o = 8 objects and S = 5 ORA rounds on Context-59, 6 and 4 elsewhere;
    # prompts and heads at x10 the base LR (OTSeg's lr_mult for "backbone" and "head").
    context = train.startswith("ocz_context59")
    assert cfg.MODEL.OCZ.OBJECTS.NUM == (8 if context else 6)
    assert cfg.MODEL.OCZ.ORA.NUM_ROUNDS == (5 if context else 4)
    assert cfg.SOLVER.BACKBONE_MULTIPLIER == 10.0 and cfg.SOLVER.HEAD_MULTIPLIER == 10.0


@pytest.mark.parametrize("config", ZEGFORMER)
def test_zegformer_configs_follow_zegformer(config):
    """ZegFormer's configs, as its public configs set them: R-101 + frozen CLIP ViT-B/16, the
    FPN and DETR decoders with 100 queries, its head and losses, its recipe and test."""
    cfg = load_config(REPO / "configs" / config)
    coco = config.startswith("coco_stuff/")
    assert cfg.MODEL.BACKBONE.NAME == "build_resnet_backbone" and cfg.MODEL.RESNETS.DEPTH == 101
    assert cfg.MODEL.BACKBONE.FREEZE_AT == 0 and cfg.MODEL.OCZ.RESNET.WEIGHTS == "R-101.pkl"
    assert cfg.MODEL.OCZ.CLIP.MODEL_NAME == "ViT-B-16" and cfg.MODEL.OCZ.CLIP.PRETRAINED == "openai"
    assert cfg.MODEL.SEM_SEG_HEAD.NAME == "MaskFormerPixelDecoder"
    dec, loss = cfg.MODEL.OCZ.DECODER, cfg.MODEL.OCZ.LOSS
    assert dec.NAME == "ZegFormerDecoder" and dec.NUM_QUERIES == 100 and dec.DEC_LAYERS == 6
    assert dec.LOGIT_SCALE == 100.0 and dec.DROPOUT == 0.1
    assert (loss.CLASS_WEIGHT, loss.MASK_WEIGHT, loss.DICE_WEIGHT) == (1.0, 20.0, 1.0)
    assert loss.MASK_LOSS == "focal" and loss.NO_OBJECT_WEIGHT == 0.1
    assert cfg.SOLVER.BASE_LR == 1e-4 and cfg.SOLVER.WEIGHT_DECAY == 1e-4
    assert cfg.SOLVER.BACKBONE_MULTIPLIER == 0.1 and cfg.SOLVER.HEAD_MULTIPLIER == 1.0
    assert cfg.SOLVER.WARMUP_ITERS == 0 and cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE == 0.01
    assert cfg.SOLVER.MAX_ITER == (60000 if coco else 10000)
    assert tuple(cfg.INPUT.CROP.SIZE) == ((640, 640) if coco else (512, 512))
    assert cfg.INPUT.MIN_SIZE_TEST == (640 if coco else 512)
    assert cfg.MODEL.OCZ.TEXT.TEMPLATES == ("imagenet_select" if coco else "zegformer_single")
    assert cfg.MODEL.OCZ.TEST.MODE == "whole" and cfg.MODEL.OCZ.TEST.CALIBRATION == 0.1
    assert cfg.INPUT.ZERO_SHOT_SETTING == "inductive"
    seg = cfg.MODEL.OCZ.SEGMENT_CLIP
    assert not seg.ENABLED and seg.ROUTE == "crop" and seg.STYLE == "cropmask" and seg.SEEN_MEAN
    train = cfg.DATASETS.TRAIN[0]
    assert train == ("ocz_coco_stuff_train" if coco else "ocz_voc_train")
    assert cfg.DATASETS.TEST[0] == train.replace("_train", "_val")


@pytest.mark.parametrize("config", [c for c in CONFIGS if not c.startswith("synthetic/")])
def test_paper_scale_configs_keep_the_miniature_options_off(config):
    """The miniature's dense-path options (image path, mask pooling, pixel-text loss) are in no
    reproduced method: no paper-scale config turns them on."""
    cfg = load_config(REPO / "configs" / config)
    assert list(cfg.MODEL.OCZ.PIXEL_DECODER.IMAGE_PATH.WIDTHS) == []
    assert cfg.MODEL.OCZ.DECODER.MASK_POOLING is False
    assert cfg.MODEL.OCZ.LOSS.PIXEL_WEIGHT == 0.0


def test_miniature_configs_use_the_segment_ensemble_chosen_on_val():
    """The demo and the ladders built on it classify segments with the frozen tiny CLIP too (the
    variant chosen on val, RESULTS.md); the supervised bound measures the segmenter alone, the
    attribute config has no trained CLIP, and the transductive configs did better without it on
    val: they leave it off."""
    for config in ("ocz_tiny.yaml", "ocz_tiny_oczss.yaml", "ocz_tiny_split_mfe.yaml"):
        seg = load_config(REPO / "configs" / "synthetic" / config).MODEL.OCZ.SEGMENT_CLIP
        assert seg.ENABLED and (seg.ROUTE, seg.STYLE) == ("crop", "mask"), config
        assert seg.SKIP_NO_OBJECT == 0.5 and seg.SEEN_MEAN, config
    # Not the transductive configs: after self-training the decoder knows the unseen classes,
    # and val hIoU was higher without the ensemble (RESULTS.md).
    off = ("ocz_tiny_supervised.yaml", "ocz_tiny_attr.yaml", "zegformer_tiny.yaml",
           "ocz_tiny_transductive.yaml", "ocz_tiny_split_mfe_transductive.yaml",
           "ocz_tiny_oczss_split_mfe_transductive.yaml")  # fmt: skip
    for config in off:
        seg = load_config(REPO / "configs" / "synthetic" / config).MODEL.OCZ.SEGMENT_CLIP
        assert not seg.ENABLED, config


# What an ablation row may change in its protocol config: the parts it switches, the setting.
ABLATED = ("MODEL.OCZ.OBJECTS.", "MODEL.OCZ.GUIDE.", "MODEL.OCZ.ORA.", "MODEL.OCZ.SPLIT.",
           "MODEL.OCZ.MFE.", "MODEL.OCZ.SELF_TRAINING.", "MODEL.OCZ.TEST.CALIBRATION",
           "INPUT.ZERO_SHOT_SETTING", "OUTPUT_DIR")  # fmt: skip


def _flat(node, prefix=""):
    out = {}
    for k, v in node.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


@pytest.mark.parametrize("config", ABLATION)
def test_ablation_rows_are_their_protocol_config_with_parts_switched(config):
    """An ablation row <dataset>/ablation/<model>_vitb16_bs16_<N>k[_setting].yaml is the protocol
    config <dataset>/oczss_vitb16_bs16_<N>k.yaml (the top rung: the full OC-ZSS model) with model
    parts switched off or added, and possibly the setting: same data, recipe and schedule."""
    m = SCHEDULE.search(config)
    protocol = f"{config.split('/')[0]}/oczss{config[m.start() : m.end()]}.yaml"
    assert protocol in CONFIGS
    row = _flat(yaml.safe_load(load_config(REPO / "configs" / config).dump()))
    top = _flat(yaml.safe_load(load_config(REPO / "configs" / protocol).dump()))
    changed = sorted(k for k in row.keys() | top.keys() if row.get(k) != top.get(k))
    assert changed and all(k.startswith(ABLATED) for k in changed), changed


def test_no_base_config_is_a_row():
    """A Base-*.yaml is a base that configs inherit, never a row that is run. The rule: a model or
    recipe base (Base-OCZ.yaml, Base-OCZSS.yaml) has no DATASETS.TRAIN, so there is nothing to
    train; a dataset base (voc/Base-VOC.yaml, ...) has, so nothing lists it as a row: no command
    in a document, tool, module or the Makefile runs it (``--config-file``, ``--config``,
    ``--row NAME``; no command runs a model base either), no Markdown table lists it, and no
    test but this file's names it."""
    bases = [c for c in CONFIGS if Path(c).name.startswith("Base-")]
    with_data = {c for c in bases if load_config(REPO / "configs" / c).DATASETS.TRAIN}
    assert {"Base-OCZ.yaml", "Base-OCZSS.yaml", "Base-ZegFormer.yaml"} <= set(bases) - with_data
    assert "voc/Base-VOC.yaml" in with_data
    command = re.compile(r"(?:--config-file|--config|--row\s+\S+)\s+(?:configs/)?(\S+\.yaml)")
    sources = [*REPO.glob("*.md"), *(REPO / "docs").rglob("*.md"), REPO / "Makefile"]
    sources += [*(REPO / "tools").glob("*.py"), *(REPO / "ocz_d2").rglob("*.py")]
    rows = []
    for source in sources:
        text = source.read_text(encoding="utf-8")
        rows += [(m.group(1), source.name) for m in command.finditer(text)]
        if source.suffix == ".md":
            table = [line for line in text.splitlines() if line.lstrip().startswith("|")]
            rows += [(c, source.name) for c in with_data for line in table if Path(c).name in line]
    for test in (REPO / "tests").glob("*.py"):
        if test.name != Path(__file__).name:
            text = test.read_text(encoding="utf-8")
            rows += [(c, test.name) for c in with_data if Path(c).name in text]
    named = [(c, where) for c, where in rows if Path(c).name.startswith("Base-")]
    assert not named, f"Base configs run or listed as rows (config, where): {named}"


def test_cross_domain_targets_are_registered_with_their_full_label_set():
    from detectron2.data import MetadataCatalog

    for config in [c for c in CONFIGS if c.startswith("cross_domain/")]:
        cfg = load_config(REPO / "configs" / config)
        meta = MetadataCatalog.get(cfg.DATASETS.TEST[0])
        assert list(meta.unseen_classes) == []
        assert len(meta.stuff_classes) == int(re.search(r"(\d+)\.yaml$", config).group(1))
