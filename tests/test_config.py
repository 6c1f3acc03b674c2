"""Config hygiene: every ocz_d2 key is documented and read somewhere, every key the shipped
configs set is read by something that runs; the configs load; bad keys give clear errors."""

import ast
import functools
import importlib.util
import re
from pathlib import Path

import detectron2
import pytest
import yaml
from detectron2.config import get_cfg

from ocz_d2 import add_ocz_config
from ocz_d2.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]
D2 = Path(detectron2.__file__).resolve().parent
# Detectron2 modules that an ocz_d2 run goes through (trainer, hooks, data loading, solver,
# checkpoints, model and backbone builders): keys they read are read. Not the modules of
# Detectron2's own models (e.g. resnet.py reads MODEL.BACKBONE.FREEZE_AT, semantic_seg.py's
# SemSegFPNHead MODEL.SEM_SEG_HEAD.IGNORE_VALUE): those never run here.
D2_MODULES = [
    "engine/defaults.py",
    "engine/hooks.py",
    "engine/launch.py",
    "data/build.py",
    "data/detection_utils.py",
    "solver/build.py",
    "checkpoint/detection_checkpoint.py",
    "evaluation/testing.py",
    "modeling/meta_arch/build.py",
    "modeling/backbone/build.py",
]
# Read there, but not as attributes: build_sem_seg_head lives in semantic_seg.py beside a head we
# do not use; default_setup reads these through _try_get_key(cfg, "SEED", ...).
D2_EXTRA_READS = {"MODEL.SEM_SEG_HEAD.NAME", "SEED", "OUTPUT_DIR", "CUDNN_BENCHMARK"}


def _added_keys():
    base = get_cfg()
    cfg = get_cfg()
    add_ocz_config(cfg)

    def flatten(node, prefix=""):
        for k, v in node.items():
            full = f"{prefix}{k}"
            if hasattr(v, "items"):
                yield from flatten(v, full + ".")
            else:
                yield full

    base_keys = set(flatten(base))
    return sorted(set(flatten(cfg)) - base_keys)


def _our_files():
    files = list((REPO / "ocz_d2").rglob("*.py")) + list((REPO / "tools").glob("*.py"))
    return [p for p in files if p.name != "config.py"]


@functools.cache
def _reads(path: Path) -> tuple[set, set, set]:
    """Attribute reads of a source file, from its syntax tree (strings and comments are not
    reads): ``(parent, leaf)`` pairs of chains (``ocz.LOSS.CLASS_WEIGHT``), leaves read on a
    plain name (``dec.NUM_QUERIES``, an alias of a node) and every attribute name."""
    pairs, on_names, names = set(), set(), set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute):
            names.add(node.attr)
            if isinstance(node.value, ast.Attribute):
                pairs.add((node.value.attr, node.attr))
            elif isinstance(node.value, ast.Name):
                on_names.add(node.attr)
    return pairs, on_names, names


def _is_read(key: str, files: list[Path]) -> bool:
    parts = key.split(".")
    parent, leaf = parts[-2:] if len(parts) > 1 else (None, parts[0])
    for path in files:
        pairs, on_names, names = _reads(path)
        # a chain, or an alias of the node (dec = cfg.MODEL.OCZ.DECODER) in a file naming it
        if (parent, leaf) in pairs or (leaf in on_names and (parent is None or parent in names)):
            return True
    return False


def test_every_added_key_is_read():
    files = _our_files()
    unread = [key for key in _added_keys() if not _is_read(key, files)]
    assert not unread, f"config keys that nothing reads: {unread}"


def _yaml_keys(node: dict, prefix: str = ""):
    for k, v in node.items():
        if isinstance(v, dict):
            yield from _yaml_keys(v, f"{prefix}{k}.")
        elif k not in ("_BASE_", "VERSION"):
            yield prefix + k


@pytest.mark.parametrize("path", sorted(str(p) for p in (REPO / "configs").rglob("*.yaml")))
def test_every_yaml_key_is_read(path):
    files = _our_files() + [D2 / m for m in D2_MODULES]
    keys = list(_yaml_keys(yaml.safe_load(Path(path).read_text())))
    unread = [k for k in keys if k not in D2_EXTRA_READS and not _is_read(k, files)]
    assert not unread, f"{path} sets keys that nothing in an ocz_d2 run reads: {unread}"


def test_key_named_only_in_a_string_is_not_read(tmp_path):
    src = tmp_path / "mod.py"
    src.write_text('raise ValueError("set MODEL.OCZ.TEXT.CHUNK_SIZE")  # TEXT.CHUNK_SIZE\n')
    assert not _is_read("MODEL.OCZ.TEXT.CHUNK_SIZE", [src])
    read = tmp_path / "read.py"  # _reads caches by path
    read.write_text("size = cfg.MODEL.OCZ.TEXT.CHUNK_SIZE\n")
    assert _is_read("MODEL.OCZ.TEXT.CHUNK_SIZE", [read])


def test_every_added_key_has_a_comment():
    text = (REPO / "ocz_d2" / "config.py").read_text().splitlines()
    for key in _added_keys():
        tail = re.escape(".".join(key.split(".")[-2:]))
        idx = next(i for i, line in enumerate(text) if re.search(rf"\b{tail} = ", line))
        above = text[idx - 1].strip()
        assert above.startswith("#"), f"{key} has no comment line above it in config.py"


@pytest.mark.parametrize("path", sorted(str(p) for p in (REPO / "configs").rglob("*.yaml")))
def test_shipped_configs_load(path):
    cfg = get_cfg()
    add_ocz_config(cfg)
    cfg.merge_from_file(path)
    assert cfg.VERSION == 2


def test_unknown_key_is_rejected(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("MODEL:\n  OCZ:\n    DECODR:\n      NUM_QUERIES: 3\n")
    cfg = get_cfg()
    add_ocz_config(cfg)
    with pytest.raises(KeyError, match="DECODR"):
        cfg.merge_from_file(str(bad))


def test_load_config_names_a_misspelt_key():
    config = REPO / "configs" / "synthetic" / "ocz_tiny.yaml"
    with pytest.raises(ConfigError, match="Did you mean MODEL.OCZ.CLIP.NUM_PROMPTS"):
        load_config(config, ["MODEL.OCZ.CLIP.NUM_PROMPT", "3"])
    with pytest.raises(ConfigError, match="KEY VALUE pairs"):
        load_config(config, ["MODEL.OCZ.CLIP.NUM_PROMPTS"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(REPO / "configs" / "nope.yaml")
    assert load_config(config, ["MODEL.OCZ.CLIP.NUM_PROMPTS", "3"]).MODEL.OCZ.CLIP.NUM_PROMPTS == 3


def test_train_net_exits_cleanly_on_a_misspelt_key(capsys):
    spec = importlib.util.spec_from_file_location("ocz_train_net", REPO / "tools" / "train_net.py")
    train_net = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_net)
    config = str(REPO / "configs" / "synthetic" / "ocz_tiny.yaml")
    status = train_net.main(["--config-file", config, "MODEL.OCZ.CLIP.NUM_PROMPT", "3"])
    err = capsys.readouterr().err
    assert status == 2
    assert err.startswith("error: unknown config key 'MODEL.OCZ.CLIP.NUM_PROMPT'"), err
    assert "Traceback" not in err
