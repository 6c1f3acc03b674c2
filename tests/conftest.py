"""Shared pytest fixtures of the ocz_d2 tests.

Data fixtures (session-scoped: generated once per test session, in a temporary folder; the
process-wide ``DETECTRON2_DATASETS`` is not changed):

``synthetic_benchmark``
    A tiny synthetic benchmark (:func:`ocz_d2.miniature.generate_synthetic_benchmark`: 8 train,
    4 val and 4 test images of 64x64 px, 16 image-caption pairs, seed 0, 16 classes, 4 unseen)
    registered with its class-embedding file (split file ``split_embeddings.yaml``) as
    ``ocz_test_synthetic_attr_{train,val,test}``. Returns a :class:`SyntheticData` with ``root``,
    ``split_file``, ``class_embeddings`` (paths), ``classes``, ``unseen`` (names), ``seen_ids`` /
    ``unseen_ids`` (class indices), ``train_name``, ``val_name``, ``test_name``, ``image_size``,
    ``num_train``, ``num_val``, ``num_test``. Use it read-only: other tests share it.

``spread_checkpoint``
    ``(config file, overrides, weights file)`` of a tiny random model for inference tests
    (:func:`ocz_d2.engine.ZeroShotPredictor`, ``tools/segment.py``) on ``synthetic_benchmark``:
    ``configs/synthetic/ocz_tiny_attr.yaml`` with :meth:`SyntheticData.predictor_overrides`
    (names embedded by the benchmark's attribute file). A random model's masks are nearly flat,
    so one class wins every pixel; this one's mask and class heads are scaled up (seed 0) so that
    several classes win somewhere.

``synthetic_benchmark_factory``
    ``factory(name, **generate_kwargs) -> SyntheticData``: generates and registers another
    benchmark as ``ocz_test_<name>_attr_{train,val,test}`` (cached per ``name``; asking again for
    a name with other arguments is an error). Example:
    ``factory("big", num_train=64, image_size=96)``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import tools
from ocz_d2.data import register_split_file
from ocz_d2.miniature import generate_synthetic_benchmark

# Under pytest-xdist (`make test` runs one test process per core), each process gets its share
# of the cores: several processes each with one OpenMP thread per core would oversubscribe them.
# The subprocesses that tests start (tools run as users run them) inherit the setting.
if os.environ.get("PYTEST_XDIST_WORKER"):
    _threads = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ["OMP_NUM_THREADS"] = str(_threads)
    torch.set_num_threads(_threads)

# The tests import the tools from this checkout's tools/, not Detectron2's package of that name.
assert Path(tools.__file__).resolve().parent == Path(__file__).resolve().parents[1] / "tools", (
    f"'tools' is {tools.__file__}: run pytest from the repository root"
)


@dataclass(frozen=True)
class SyntheticData:
    """A generated and registered synthetic benchmark (see the module docstring)."""

    root: Path
    split_file: Path
    class_embeddings: Path
    classes: tuple[str, ...]
    unseen: tuple[str, ...]
    seen_ids: tuple[int, ...]
    unseen_ids: tuple[int, ...]
    train_name: str
    val_name: str
    test_name: str
    image_size: int
    num_train: int
    num_val: int
    num_test: int

    def tiny_run_overrides(self, **extra) -> list[str]:
        """``KEY VALUE`` overrides that train and evaluate a tiny model on this benchmark in
        seconds (train on ``train_name``, evaluate ``val_name``); ``extra`` adds or replaces."""
        size = self.image_size
        opts = {
            "DATASETS.SPLIT_FILES": f"['{self.split_file}']",
            "DATASETS.TRAIN": f"('{self.train_name}',)",
            "DATASETS.TEST": f"('{self.val_name}',)",
            "INPUT.RESIZE_TARGET": f"({size},{size})",
            "INPUT.CROP.SIZE": f"({size},{size})",
            "INPUT.MIN_SIZE_TEST": size,
            "MODEL.OCZ.CLIP.MODEL_NAME": "OCZ-Tiny-ViT",
            "MODEL.OCZ.DECODER.DEC_LAYERS": 1,
            "MODEL.OCZ.LOSS.TRAIN_NUM_POINTS": 128,
            "SOLVER.IMS_PER_BATCH": 2,
            "SOLVER.WARMUP_ITERS": 1,
            "DATALOADER.NUM_WORKERS": 0,
            **extra,
        }
        return [str(x) for kv in opts.items() for x in kv]

    def predictor_overrides(self, **extra) -> list[str]:
        """``KEY VALUE`` overrides of ``ocz_tiny_attr.yaml`` for fast inference tests: no
        dataset, test size ``image_size``, one decoder layer, class names embedded by this
        benchmark's attribute file (``extra`` adds or replaces)."""
        opts = {
            "DATASETS.TRAIN": "()",
            "DATASETS.TEST": "()",
            "DATASETS.VAL": "()",
            "INPUT.MIN_SIZE_TEST": self.image_size,
            "MODEL.OCZ.DECODER.DEC_LAYERS": 1,
            "MODEL.OCZ.TEXT.EMBEDDINGS_FILE": str(self.class_embeddings),
            **extra,
        }
        return [str(x) for kv in opts.items() for x in kv]


_DEFAULTS = {
    "num_train": 8,
    "num_val": 4,
    "num_test": 4,
    "num_pretrain": 16,
    "num_zeroshot_per_class": 1,
    "image_size": 64,
    "seed": 0,
}


@pytest.fixture(scope="session")
def synthetic_benchmark_factory(tmp_path_factory):
    """``factory(name, **generate_kwargs)``: generate and register a synthetic benchmark."""
    base = tmp_path_factory.mktemp("ocz_datasets")
    made: dict[str, tuple[dict, SyntheticData]] = {}

    def factory(name: str, **kwargs) -> SyntheticData:
        kwargs = {**_DEFAULTS, **kwargs}
        if name in made:
            if made[name][0] != kwargs:
                raise ValueError(f"synthetic benchmark {name!r} already made with {made[name][0]}")
            return made[name][1]
        info = generate_synthetic_benchmark(
            base / f"ocz_test_{name}", dataset_name=f"test_{name}", **kwargs
        )
        # The variant with the attribute-composed embedding file (ocz_test_<name>_attr_*): tests
        # need no pretrained CLIP.
        train_name, val_name, test_name = register_split_file(info.split_file_embeddings, root=base)
        unseen_ids = tuple(info.classes.index(c) for c in info.unseen)
        data = SyntheticData(
            root=info.root,
            split_file=info.split_file_embeddings,
            class_embeddings=info.class_embeddings,
            classes=info.classes,
            unseen=info.unseen,
            seen_ids=tuple(i for i in range(len(info.classes)) if i not in unseen_ids),
            unseen_ids=unseen_ids,
            train_name=train_name,
            val_name=val_name,
            test_name=test_name,
            image_size=info.image_size,
            num_train=info.num_train,
            num_val=info.num_val,
            num_test=info.num_test,
        )
        made[name] = (kwargs, data)
        return data

    return factory


@pytest.fixture(scope="session")
def synthetic_benchmark(synthetic_benchmark_factory) -> SyntheticData:
    """The default tiny benchmark: ``ocz_test_synthetic_attr_{train,val,test}`` (8/4/4 images)."""
    return synthetic_benchmark_factory("synthetic")


@pytest.fixture(scope="session")
def spread_checkpoint(synthetic_benchmark, tmp_path_factory) -> tuple[Path, list[str], str]:
    """A tiny random model with several classes in its segmentations (module docstring)."""
    import torch
    from detectron2.modeling import build_model

    from ocz_d2.config import load_config
    from ocz_d2.engine import AtomicCheckpointer

    config = Path(__file__).resolve().parents[1] / "configs" / "synthetic" / "ocz_tiny_attr.yaml"
    opts = synthetic_benchmark.predictor_overrides()
    torch.manual_seed(0)
    model = build_model(load_config(config, opts))
    decoder = model.transformer_decoder
    with torch.no_grad():
        for p in decoder.mask_embed.parameters():
            p.mul_(4)
        decoder.class_embed.weight.mul_(10)
    folder = tmp_path_factory.mktemp("spread_model")
    AtomicCheckpointer(model, save_dir=str(folder)).save("model_final")
    return config, opts, str(folder / "model_final.pth")
