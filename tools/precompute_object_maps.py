#!/usr/bin/env python
"""Precompute object maps: each image's guide regions, stored once as a label PNG.

    python tools/precompute_object_maps.py --config-file configs/... \
        --split-file ocz_synthetic/split.yaml --name clip [--splits train val test] [KEY VALUE ...]

The config's guide (MODEL.OCZ.GUIDE: a timm SSL ViT, or CLIP's own features) clusters every image
of the split file's splits into MODEL.OCZ.OBJECTS.NUM regions, at the image's own size (no
augmentation: the dataset mapper augments the maps with the images in training). Maps go to
``<dataset folder>/object_maps/<name>/<split>/`` (the dataset folder is the common parent of the
split's image and label roots), each folder with a record ``object_maps.json`` of the guide, n_o
and input size. A split file ``<stem>_objects_<name>.yaml`` beside the given one registers the
same data with the maps (datasets ``ocz_<dataset>_objects_<name>_<split>``; for
``split.yaml`` the new file is ``split_objects_<name>.yaml``): put it in
DATASETS.SPLIT_FILES and train on those names. Models check the record against their config.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

# torch, Detectron2 and ocz_d2 are imported after the arguments are parsed: --help is instant.

NO_REGION_VALUE = 255


def regions_to_pixels(regions, patch_size: int, height: int, width: int):
    """Patch-grid regions [gh, gw] -> uint8 pixel map [height, width] (255 = no region)."""
    import numpy as np

    pixels = regions.repeat_interleave(patch_size, 0).repeat_interleave(patch_size, 1)
    pixels = pixels[:height, :width].cpu().numpy()
    return np.where(pixels < 0, NO_REGION_VALUE, pixels).astype(np.uint8)


def output_folder(dicts: list[dict], name: str, split: str) -> Path:
    image_root = os.path.dirname(dicts[0]["file_name"])
    label_root = os.path.dirname(dicts[0]["sem_seg_file_name"])
    return Path(os.path.commonpath([image_root, label_root])) / "object_maps" / name / split


def precompute_split(model, dicts: list[dict], folder: Path, batch_size: int) -> float:
    """Write the object map of every image of ``dicts`` into ``folder``; returns images/s."""
    import numpy as np
    import torch
    from detectron2.data.detection_utils import read_image
    from PIL import Image
    from tqdm import tqdm

    from ocz_d2.utils.errors import DataError, unreadable_file_message

    folder.mkdir(parents=True, exist_ok=True)
    patch = model.backbone.patch_size
    start = time.perf_counter()
    # Same-size images are batched; the order follows the dataset.
    with tqdm(total=len(dicts), desc=f"object maps -> {folder}", unit="img") as bar:
        for i in range(0, len(dicts), batch_size):
            chunk = dicts[i : i + batch_size]
            images = []
            for d in chunk:
                try:
                    array = read_image(d["file_name"], format="RGB")
                except OSError as e:
                    path = d["file_name"]
                    raise DataError(
                        unreadable_file_message(f"cannot read the image {path}", path, e)
                    ) from e
                images.append(torch.as_tensor(np.ascontiguousarray(array.transpose(2, 0, 1))))
            by_size: dict[tuple, list[int]] = {}
            for j, img in enumerate(images):
                by_size.setdefault(tuple(img.shape[-2:]), []).append(j)
            for (h, w), members in by_size.items():
                regions = model.online_regions([images[j] for j in members])
                for j, reg in zip(members, regions):
                    stem = os.path.splitext(os.path.basename(chunk[j]["sem_seg_file_name"]))[0]
                    out = regions_to_pixels(reg, patch, h, w)
                    Image.fromarray(out).save(folder / f"{stem}.png", compress_level=1)
            bar.update(len(chunk))
    return len(dicts) / max(time.perf_counter() - start, 1e-9)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--config-file", required=True, help="the model config whose guide makes the regions"
    )
    parser.add_argument("--split-file", required=True, help="the dataset's YAML split file")
    parser.add_argument("--name", required=True, help="name of this set of maps, e.g. dino")
    parser.add_argument("--splits", nargs="*", help="splits to do (default: all of the file's)")
    parser.add_argument(
        "--batch-size", type=int, default=16, help="images per guide call (default: 16)"
    )
    parser.add_argument(
        "--debug", action="store_true", help="show tracebacks of config and data errors"
    )
    parser.add_argument(
        "opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE, after every flag"
    )
    args = parser.parse_args(argv)
    import ocz_d2  # first: it keeps fvcore's and Detectron2's import-time warnings quiet
    from ocz_d2.engine.cli import run_tool
    from ocz_d2.utils.checkout import check_same_checkout

    check_same_checkout(__file__, ocz_d2.__file__)
    return run_tool(run, args, debug=args.debug)


def run(args) -> int:
    import torch
    from detectron2.data import DatasetCatalog
    from detectron2.modeling import build_model

    from ocz_d2.config import load_config
    from ocz_d2.data.object_maps import guide_record, write_object_map_split_file, write_record
    from ocz_d2.data.split_file import load_split_file, register_split_file, resolve_split_file
    from ocz_d2.engine.cli import check_overrides

    check_overrides(args.opts, "precompute_object_maps.py")
    cfg = load_config(args.config_file, args.opts)
    if cfg.MODEL.OCZ.OBJECTS.NUM <= 0 or not cfg.MODEL.OCZ.OBJECTS.PROMPTS:
        print(
            "config error: object maps need object prompts: set MODEL.OCZ.OBJECTS.NUM > 0 and "
            "MODEL.OCZ.OBJECTS.PROMPTS True",
            file=sys.stderr,
        )
        return 2
    if cfg.MODEL.OCZ.GUIDE.SOURCE == "oracle":
        print("config error: the oracle guide has no online regions to store", file=sys.stderr)
        return 2
    split_file = resolve_split_file(args.split_file)
    data = load_split_file(split_file)
    splits = args.splits or list(data["splits"])
    unknown = [s for s in splits if s not in data["splits"]]
    if unknown:
        print(f"--splits {unknown} are not in {split_file} ({list(data['splits'])})")
        return 2
    # A private name: the file may already be registered (e.g. a builtin split of the same data).
    names = register_split_file(split_file, dataset=f"{data['dataset']}_{args.name}_maps_source")
    # Datasets are built from the config (DATASETS.*) but only the guide is used here.
    cfg.DATASETS.TRAIN = ()
    cfg.DATASETS.TEST = ()
    cfg.DATASETS.VAL = ()
    cfg.MODEL.DEVICE = cfg.MODEL.DEVICE if torch.cuda.is_available() else "cpu"
    model = build_model(cfg).eval()
    record = guide_record(cfg)
    folders = {}
    for split, dataset_name in zip(data["splits"], names):
        if split not in splits:
            continue
        dicts = DatasetCatalog.get(dataset_name)
        folder = output_folder(dicts, args.name, split)
        rate = precompute_split(model, dicts, folder, args.batch_size)
        write_record(folder, record)
        folders[split] = str(folder)
        print(f"{dataset_name}: {len(dicts)} object maps in {folder} ({rate:.1f} images/s)")
    out = Path(split_file).with_name(f"{Path(split_file).stem}_objects_{args.name}.yaml")
    write_object_map_split_file(split_file, out, f"{data['dataset']}_objects_{args.name}", folders)
    print(f"split file: {out} (put it in DATASETS.SPLIT_FILES)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
