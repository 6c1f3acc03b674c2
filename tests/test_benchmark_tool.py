"""tools/benchmark.py and ocz_d2.benchmark: a smoke run on two tiny configs (no timing
assertions), the helpers' hand-computed answers, and the train loader timed on stand-in files of
the missing VOC data (ocz_d2.benchmark.stand_in) with the VOC configs' input recipe."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from ocz_d2.benchmark import (
    FLOP_COMPONENTS,
    SUMMARY_KEYS,
    TIMED_COMPONENTS,
    BenchmarkSettings,
    Component,
    add_ratios,
    count_flops,
    load_row_config,
    loader_cell,
    loader_throughput,
    synthetic_inputs,
    time_components,
    timing_stats,
)
from ocz_d2.evaluation.report import ReportRow
from tools import benchmark as benchmark_tool
from tools import microbench

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "synthetic" / "ocz_tiny_attr.yaml"
VOC_SPLIT_FILE = REPO / "ocz_d2" / "data" / "splits" / "voc.yaml"
# Full OC-ZSS in miniature: object prompts guided by CLIP's own features, one ORA round with
# granular attention.
OCZSS = [
    "MODEL.OCZ.OBJECTS.NUM", "3", "MODEL.OCZ.OBJECTS.PROMPTS", "True",
    "MODEL.OCZ.GUIDE.SOURCE", "clip", "MODEL.OCZ.ORA.NUM_ROUNDS", "1",
    "MODEL.OCZ.ORA.NHEADS", "4", "MODEL.OCZ.ORA.OBJECT_INIT", "prompts",
    "MODEL.OCZ.ORA.GRANULAR", "True", "MODEL.OCZ.ORA.GRANULAR_RATES", "[1, 2]",
]  # fmt: skip


@pytest.fixture(scope="module")
def smoke_run(synthetic_benchmark, tmp_path_factory):
    """The CLI on the baseline and a tiny OC-ZSS row: (its JSON, its printed tables)."""
    out = tmp_path_factory.mktemp("benchmark") / "bench.json"
    opts = synthetic_benchmark.tiny_run_overrides()
    argv = ["--config", str(TINY), "--row", "oczss", str(TINY), *OCZSS, "--opts", *opts]
    argv += ["--size", "64", "--batch", "2", "--repeats", "2", "--warmup", "1"]
    argv += ["--loader-batches", "2", "--output", str(out)]
    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(printed):
        # The split file's relative paths resolve against the benchmark's datasets folder.
        mp.setenv("DETECTRON2_DATASETS", str(Path(synthetic_benchmark.root).parent))
        assert benchmark_tool.main(argv) == 0
    return json.loads(out.read_text()), printed.getvalue()


def test_report_structure_and_consistency(smoke_run):
    report, printed = smoke_run
    assert report["settings"]["size"] == 64 and report["settings"]["repeats"] == 2
    base, oczss = report["rows"]
    assert (base["name"], oczss["name"]) == ("ocz_tiny_attr", "oczss")
    for row in (base, oczss):
        assert 0 < row["params"]["trainable"] <= row["params"]["total"]
        flops = row["flops"]
        assert set(flops["components"]) == {c.name for c in FLOP_COMPONENTS}
        assert flops["total"] > 0
        for value in flops["components"].values():
            assert value is None or 0 <= value <= flops["total"]
        for key in ("inference", "train_step"):
            stats = row["times"][key]
            assert stats["runs"] == 2 and stats["min_ms"] <= stats["median_ms"] <= stats["max_ms"]
        components = row["train_step_components"]
        assert set(components) == {c.name for c in TIMED_COMPONENTS}
        assert components["matcher"]["modules"] == ["criterion.matcher"]
        assert components["matcher"]["calls_per_step"] >= 1
        assert 0 <= components["matcher"]["share_of_step"] <= 1
        assert components["criterion"]["modules"] == ["criterion"]
        assert row["memory"]["peak_rss_mb"] > 0 and row["memory"]["peak_cuda_mb"] is None
        assert row["data_loader"]["available"] and row["data_loader"]["images_per_s"] > 0
        assert row["evaluation"]["num_classes"] == 16
        assert row["evaluation"]["mpixels_per_s"] > 0
        assert set(row["summary"]) == set(row["ratio"]) == set(SUMMARY_KEYS)
    # The first row is the reference.
    assert all(v == pytest.approx(1.0) for v in base["ratio"].values() if v is not None)
    assert base["ratio"]["params_total"] == 1.0
    assert oczss["ratio"]["gflops"] == pytest.approx(
        oczss["flops"]["total"] / base["flops"]["total"]
    )
    # Absent components are reported as absent, not as errors.
    for name in ("object_prompts", "ora", "granular_attention"):
        assert base["flops"]["components"][name] is None
    assert base["flops"]["guide_online"] is None and base["params"]["ssl_guide"] is None
    assert base["times"]["inference_online_guide"] == {"skipped": "no object prompts"}
    assert base["summary"]["inference_online_ms"] is None
    # Present ones nest as the modules do.
    comps = oczss["flops"]["components"]
    assert 0 < comps["granular_attention"] <= comps["ora"] <= comps["pixel_decoder"]
    assert comps["object_prompts"] is not None and comps["backbone"] > 0
    assert oczss["flops"]["guide_online"] > 0
    assert oczss["times"]["inference_online_guide"]["runs"] == 2
    assert "| oczss |" in printed and "absent" in printed


def test_flops_of_frozen_attention_are_counted():
    """A frozen nn.MultiheadAttention in eval mode takes PyTorch's fused path, which the FLOP
    counter cannot see; count_flops counts it all (multiply-adds by hand: projections
    4 x 8 x (24 + 8), scores and weighted sum 2 x (2 heads x 4 x 4 x 4))."""

    class Attend(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

        def forward(self, samples):
            x = samples[0]["x"]
            return self.attn(x, x, x, need_weights=False)[0]

    model = Attend().eval().requires_grad_(False)
    fastpath = torch.backends.mha.get_fastpath_enabled()
    flops = count_flops(model, [{"x": torch.randn(1, 4, 8)}])
    assert flops["total"] == 4 * 8 * (24 + 8) + 2 * (2 * 4 * 4 * 4)
    assert torch.backends.mha.get_fastpath_enabled() == fastpath  # restored


def test_synthetic_inputs_look_like_the_mapper_output(synthetic_benchmark):
    from detectron2.data import MetadataCatalog

    name = synthetic_benchmark.train_name
    train = synthetic_inputs(name, 2, 32, training=True, num_objects=3, seed=5)
    again = synthetic_inputs(name, 2, 32, training=True, num_objects=3, seed=5)
    assert all(torch.equal(a["sem_seg"], b["sem_seg"]) for a, b in zip(train, again))
    seen = set(MetadataCatalog.get(name).seen_classes)
    for sample in train:
        assert sample["image"].dtype == torch.uint8 and sample["image"].shape == (3, 32, 32)
        labels = set(sample["sem_seg"].unique().tolist())
        assert labels <= seen | {255}
        inst = sample["instances"]
        assert set(inst.gt_classes.tolist()) == labels - {255}
        assert inst.gt_masks.shape == (len(inst), 32, 32)
        assert set(sample["object_map"].unique().tolist()) <= {0, 1, 2}
    test = synthetic_inputs(name, 1, 32, training=False)
    assert set(test[0]) == {"image", "height", "width", "dataset_name"}


def test_helpers_hand_computed():
    stats = timing_stats([0.001, 0.002, 0.003, 0.004, 0.010])
    assert stats["median_ms"] == pytest.approx(3.0) and stats["max_ms"] == pytest.approx(10.0)
    assert (stats["q1_ms"], stats["q3_ms"]) == pytest.approx((2.0, 4.0))
    rows = add_ratios(
        [{"summary": {"a": 2.0, "b": None, "c": 0.0}}, {"summary": {"a": 3.0, "b": 1.0, "c": 1.0}}]
    )
    assert rows[0]["ratio"] == {"a": 1.0, "b": None, "c": None}
    assert rows[1]["ratio"] == {"a": 1.5, "b": None, "c": None}

    class Inner(nn.Module):
        def __init__(self, inner: nn.Module):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x)

    # An Inner inside an Inner: only the outer one is the component's module.
    model = nn.Sequential(Inner(Inner(nn.Linear(1, 1))), nn.Linear(1, 1))
    inner = Component("x", class_name="Inner")
    assert inner.modules(model) == ["0"]
    assert Component("y", path="1").modules(model) == ["1"]
    missing = Component("z", path="missing")
    assert missing.modules(model) == []
    with time_components(model, [inner, missing], torch.device("cpu")) as timings:
        model(torch.ones(1, 1))
        model(torch.ones(1, 1))
    assert set(timings) == {"x"} and timings["x"]["calls"] == 2  # the nested Inner is not counted
    assert "forward" not in vars(model[0])  # the wrapper is gone after the block

    class Matcher(nn.Module):
        def forward(self, x):
            return self.match_sets([x])[0]

        def match_sets(self, xs):
            return [x + 1 for x in xs]

    matcher = Matcher()
    component = Component("m", class_name="Matcher", methods=("forward", "match_sets", "absent"))
    with time_components(nn.Sequential(matcher), [component], torch.device("cpu")) as timings:
        matcher(torch.ones(1))  # forward -> match_sets: one call
        matcher.match_sets([torch.ones(1)])  # called directly, as a criterion may
    assert timings["m"]["calls"] == 2 and timings["m"]["seconds"] > 0
    assert "match_sets" not in vars(matcher)


# ---------------------------------------------------------------------- loader on stand-in files
def test_stand_in_files_are_in_the_dataset_formats(tmp_path):
    from PIL import Image

    from ocz_d2.benchmark.stand_in import write_stand_in_split
    from ocz_d2.data.object_maps import read_record

    kwargs = dict(num_classes=20, num_objects=6, object_map_record={"source": "ssl"}, seed=3)
    files = write_stand_in_split(tmp_path / "a", 3, **kwargs)
    assert files.size == (500, 375) and files.mean_image_kb > 10
    assert read_record(files.object_map_root) == {"source": "ssl", "stand_in": True}
    assert files.object_map_root == tmp_path / "a" / "object_maps" / "stand_in" / "train"
    object_pixels = 0
    for i in range(3):
        with Image.open(files.image_root / f"{i:06d}.jpg") as image:
            assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (500, 375))
            assert np.asarray(image).std() > 10  # not a flat image
        with Image.open(files.label_root / f"{i:06d}.png") as label:
            assert (label.format, label.mode, label.size) == ("PNG", "L", (500, 375))
            values = np.asarray(label)
        assert set(np.unique(values).tolist()) <= set(range(20)) | {255}
        assert (values == 255).any()  # background and boundaries
        object_pixels += int((values < 20).sum())
        with Image.open(files.object_map_root / f"{i:06d}.png") as regions:
            assert (regions.mode, regions.size) == ("L", (500, 375))
            assert set(np.unique(np.asarray(regions)).tolist()) <= set(range(6))
    assert object_pixels > 0
    # Seeded: the same arguments give the same files.
    again = write_stand_in_split(tmp_path / "b", 3, **kwargs)
    for sub in ("images/train/000002.jpg", "labels/train/000002.png"):
        assert (files.root / sub).read_bytes() == (again.root / sub).read_bytes()


@pytest.mark.parametrize(
    "config, num_objects",
    [
        ("configs/voc/ablation/baseline_vitb16_bs16_20k.yaml", 0),
        ("configs/voc/oczss_vitb16_bs16_20k.yaml", 6),
    ],
)
def test_loader_stand_in_on_a_voc_config(config, num_objects, tmp_path, monkeypatch):
    """The VOC split registered over an empty folder: its files are missing, so the loader runs
    on stand-in files, with the config's recipe (512 crops) and the VOC labels and object maps."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    from ocz_d2.benchmark import throughput
    from ocz_d2.data import register_split_file, unregister_zero_shot_split

    names = register_split_file(
        VOC_SPLIT_FILE, root=tmp_path / "no_datasets", dataset="test_voc_missing", lazy=True
    )
    batches = []
    build = throughput.build_detection_train_loader

    def recording_loader(*args, **kwargs):
        loader = build(*args, **kwargs)

        def batches_of():
            for batch in loader:
                batches.append(batch)
                yield batch

        return batches_of()

    monkeypatch.setattr(throughput, "build_detection_train_loader", recording_loader)
    try:
        opts = ("DATASETS.TRAIN", f"('{names[0]}',)", "DATALOADER.NUM_WORKERS", "0")
        settings = BenchmarkSettings(batch=2)
        cfg = load_row_config(ReportRow("voc", str(REPO / config), opts), settings)
        assert loader_throughput(cfg, 2)["available"] is False  # stand-in off: as before
        result = loader_throughput(cfg, 2, stand_in=4, stand_in_size=(500, 375))
        seen = set(MetadataCatalog.get(names[0]).seen_classes)
    finally:
        for name in names:
            unregister_zero_shot_split(name)
    assert result["available"] and result["stand_in"] and result["stands_in_for"] == names[0]
    assert (result["stand_in_images"], result["stand_in_size"]) == (4, [500, 375])
    assert result["stand_in_image_format"] == ".jpg"
    assert result["stand_in_object_maps"] == num_objects
    assert result["num_workers"] == 0 and result["batch"] == 2
    assert result["images_per_s_per_worker"] == result["images_per_s"] > 0
    assert "stand-in 500x375, 4 images" in loader_cell(result)
    # The temporary split is gone: catalog entry and files.
    assert result["dataset"] not in DatasetCatalog.list()
    assert not Path(result["stand_in_root"]).exists()
    # The batches the loader made: the first (worker start-up) and the 2 timed ones.
    assert len(batches) == 3 and all(len(b) == 2 for b in batches)
    labelled = 0
    for sample in (s for b in batches for s in b):
        assert sample["image"].dtype == torch.uint8
        assert sample["image"].shape == (3, 512, 512)  # INPUT.CROP.SIZE, padded to it
        assert (sample["height"], sample["width"]) == (375, 500)
        labels = set(sample["sem_seg"].unique().tolist())
        assert sample["sem_seg"].shape == (512, 512) and labels <= seen | {255}
        assert set(sample["instances"].gt_classes.tolist()) == labels - {255}
        labelled += len(labels - {255})
        if num_objects:
            regions = sample["object_map"]
            assert regions.shape == (512, 512)
            assert set(regions.unique().tolist()) <= set(range(num_objects)) | {255}
        else:
            assert "object_map" not in sample
    assert labelled > 0


def test_stand_in_options():
    args = benchmark_tool.parse_args(["--config", str(TINY), "--loader-stand-in", "64"])
    assert (args.loader_stand_in, args.loader_stand_in_size) == (64, [500, 375])
    args = benchmark_tool.parse_args(
        ["--config", str(TINY), "--loader-stand-in-size", "640", "480"]
    )
    assert (args.loader_stand_in, args.loader_stand_in_size) == (0, [640, 480])
    assert BenchmarkSettings().loader_stand_in == 0
    assert BenchmarkSettings(loader_stand_in_size=[640, 480]).loader_stand_in_size == (640, 480)
    with pytest.raises(ValueError, match="loader_stand_in"):
        BenchmarkSettings(loader_stand_in=-1)
    with pytest.raises(ValueError, match="loader_stand_in_size"):
        BenchmarkSettings(loader_stand_in_size=(0, 375))


def test_microbench_tool_runs_and_checks_its_variants():
    """tools/microbench.py at tiny sizes: every variant is timed (its own asserts compare
    class_map with argmax and the shipped BCE cost with the two-softplus form)."""
    tiny = ["--size", "32", "--repeats", "1", "--warmup", "0"]
    with contextlib.redirect_stdout(io.StringIO()):
        argmax = microbench.main(["argmax", "--classes", "5", *tiny])
        matcher = microbench.main(
            ["matcher", "--sets", "2", "--queries", "6", "--points", "64", *tiny]
        )
    assert len(argmax) == 5 and argmax[0].startswith("| class_map |")
    assert len(matcher) == 5 and "Mpixel/s" in argmax[1] and matcher[2].startswith("| BCE cost")
    with contextlib.redirect_stdout(io.StringIO()):
        predict = microbench.main(
            ["predict", "--images", "3", "--batch-sizes", "1", "3", *tiny, "--opts",
             "MODEL.OCZ.CLIP.WEIGHTS", "", "MODEL.OCZ.DECODER.DEC_LAYERS", "1"]
        )  # fmt: skip
    assert [line.split()[:2] for line in predict] == [["batch", "1"], ["batch", "3"]]
    assert predict[0].endswith(" 1.00x") and "images/s" in predict[1]
