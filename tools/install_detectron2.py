#!/usr/bin/env python
"""Install Detectron2 v0.6 from the PyPI sdist ``pb1-detectron2==0.6``, patched for current stacks.

The sdist holds Detectron2 v0.6's Python sources without its C++ sources, and v0.6 predates
numpy 2, Pillow 10, torch 2 and Python 3.11. This script downloads it (or takes a local copy),
checks its sha256, applies the source fixes listed below (all of which upstream made later), and
installs it with ``pip install --no-build-isolation`` into the running interpreter's environment.

Nothing happens when ``import detectron2`` already works, unless ``--force`` is given: an
existing Detectron2 (for example one built from source with its C++ ops) is kept.

Run with the interpreter of the target environment, after torch is installed:
    python tools/install_detectron2.py [--sdist path/to/pb1-detectron2-0.6.tar.gz] [--force]
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
from pathlib import Path

SDIST_NAME = "pb1-detectron2-0.6.tar.gz"
SDIST_URL = (
    "https://files.pythonhosted.org/packages/60/26/"
    "48f5bbb7ee492696a21da23303daeecdfe3942c498a70d34108acf63b2bd/" + SDIST_NAME
)
SDIST_SHA256 = "5d2e9e51e523ec72f6a31cca04b0a515492e9514b773a3d134cedc0677170b29"


class PatchError(RuntimeError):
    pass


def _replace(path: Path, old: str, new: str, count: int = 1) -> None:
    """Replace ``old`` by ``new`` exactly ``count`` times; fail loudly when the source differs."""
    text = path.read_text()
    found = text.count(old)
    if found != count:
        raise PatchError(f"{path}: expected {count} occurrence(s) of {old!r}, found {found}")
    path.write_text(text.replace(old, new))


def _optional_c_import(path: Path) -> None:
    # The compiled ops are only needed when called; importing the module must not need them.
    _replace(
        path,
        "from detectron2 import _C\n",
        "try:\n    from detectron2 import _C\nexcept ImportError:  # built without C++ ops\n"
        "    _C = None\n",
    )


_NP_ALIAS = re.compile(r"\bnp\.(int|float|bool|str)\b(?!_|\d)")
NP_ALIAS_FILES = [
    "evaluation/sem_seg_evaluation.py",
    "data/build.py",
    "structures/masks.py",
    "utils/visualizer.py",
    "utils/video_visualizer.py",
    "evaluation/pascal_voc_evaluation.py",
    "data/datasets/pascal_voc.py",
]


def patch_tree(src: Path) -> None:
    """Apply the fixes below (INSTALL.md, "Known issues") to an extracted sdist at ``src``."""
    d2 = src / "detectron2"
    # 1. setup.py: no C++ extension when its sources are absent; drop the formatter pin
    #    (black 21.4b2 is a development tool and breaks with current click).
    _replace(
        src / "setup.py",
        "    return ext_modules\n",
        "    if not path.isdir(extensions_dir):\n        return []\n    return ext_modules\n",
    )
    _replace(src / "setup.py", '        "black==21.4b2",\n', "")
    # 2. optional compiled module
    for rel in ["layers/deform_conv.py", "layers/rotated_boxes.py", "layers/roi_align_rotated.py"]:
        _optional_c_import(d2 / rel)
    # 3. fast COCO evaluator falls back to pycocotools
    _replace(
        d2 / "evaluation/coco_evaluation.py",
        "from detectron2.evaluation.fast_eval_api import COCOeval_opt\n",
        "try:\n    from detectron2.evaluation.fast_eval_api import COCOeval_opt\n"
        "except ImportError:  # built without C++ ops\n    COCOeval_opt = COCOeval\n",
    )
    # 4. Pillow 10 removed Image.LINEAR
    _replace(d2 / "data/transforms/transform.py", "interp=Image.LINEAR", "interp=Image.BILINEAR")
    # 5. numpy 2 removed the builtin aliases
    for rel in NP_ALIAS_FILES:
        path = d2 / rel
        text, n = _NP_ALIAS.subn(lambda m: m.group(1), path.read_text())
        if n == 0:
            raise PatchError(f"{path}: no numpy alias found; the sdist is not the expected one")
        path.write_text(text)
    # 6. random.sample on a set fails on Python >= 3.11
    _replace(
        d2 / "data/common.py",
        "self._rng.sample(self._fallback_candidates, k=1)",
        "self._rng.sample(sorted(self._fallback_candidates), k=1)",
    )
    # 7. pkg_resources is gone from recent setuptools
    model_zoo = d2 / "model_zoo/model_zoo.py"
    _replace(model_zoo, "import pkg_resources\n", "")
    _replace(
        model_zoo,
        'pkg_resources.resource_filename(\n        "detectron2.model_zoo", '
        'os.path.join("configs", config_path)\n    )',
        'os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", config_path)',
    )
    # 8. caffe2 is no longer part of torch wheels
    _replace(
        d2 / "export/__init__.py",
        "from .api import *\n",
        "try:\n    from .api import *\nexcept ImportError:  # caffe2 is not in current torch\n"
        "    pass\n",
    )
    # 9. launch: allow several CPU processes with gloo
    launch = d2 / "engine/launch.py"
    _replace(
        launch,
        '    assert torch.cuda.is_available(), "cuda is not available. Please check your '
        'installation."\n',
        "    has_gpu = torch.cuda.is_available()\n",
    )
    _replace(launch, 'backend="NCCL",', 'backend="NCCL" if has_gpu else "GLOO",')
    _replace(
        launch,
        "    assert num_gpus_per_machine <= torch.cuda.device_count()\n"
        "    torch.cuda.set_device(local_rank)\n",
        "    if has_gpu:\n        assert num_gpus_per_machine <= torch.cuda.device_count()\n"
        "        torch.cuda.set_device(local_rank)\n",
    )


def _file_sha256(path: Path) -> str:
    """:func:`ocz_d2.utils.io.file_sha256`, its file loaded by path: importing the ``ocz_d2``
    package needs Detectron2, which this script installs."""
    source = Path(__file__).resolve().parents[1] / "ocz_d2" / "utils" / "io.py"
    spec = importlib.util.spec_from_file_location("ocz_d2_utils_io", source)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.file_sha256(path)


def fetch_sdist(dest: Path, local: str | None) -> Path:
    if local:
        path = Path(local)
        if not path.is_file():
            sys.exit(f"--sdist {local}: no such file. Give the path of {SDIST_NAME}.")
    else:
        path = dest / SDIST_NAME
        print(f"downloading {SDIST_NAME} from PyPI ...", flush=True)
        urllib.request.urlretrieve(SDIST_URL, path)
    digest = _file_sha256(path)
    if digest != SDIST_SHA256:
        sys.exit(f"{path}: sha256 {digest} is not the expected {SDIST_SHA256}")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sdist", help=f"local copy of {SDIST_NAME} (default: download)")
    parser.add_argument("--force", action="store_true", help="install even if one imports")
    args = parser.parse_args()

    if importlib.util.find_spec("torch") is None:
        sys.exit("torch is not installed in this environment: install torch first.")
    if not args.force:
        probe = subprocess.run([sys.executable, "-c", "import detectron2"], capture_output=True)
        if probe.returncode == 0:
            print("detectron2 already imports; keeping it (use --force to replace it).")
            return
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sdist = fetch_sdist(tmp, args.sdist)
        with tarfile.open(sdist) as tar:
            tar.extractall(tmp, filter="data")
        src = tmp / "pb1-detectron2-0.6"
        patch_tree(src)
        subprocess.check_call(
            [sys.executable, "-m", "pip", "install", "-q", "--no-build-isolation", str(src)]
        )
    print("detectron2 v0.6 (patched, no C++ ops) installed.")


if __name__ == "__main__":
    main()
