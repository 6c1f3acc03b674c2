"""Config hygiene: every ocz_d2 key is documented and read somewhere; the shipped configs load."""

import re
from pathlib import Path

import pytest
from detectron2.config import get_cfg

from ocz_d2 import add_ocz_config

REPO = Path(__file__).resolve().parents[1]


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


def _sources():
    files = list((REPO / "ocz_d2").rglob("*.py")) + list((REPO / "tools").glob("*.py"))
    return {p: p.read_text() for p in files if p.name != "config.py"}


def test_every_added_key_is_read():
    sources = list(_sources().values())
    unread = []
    for key in _added_keys():
        parent, leaf = key.split(".")[-2:]
        # read as an attribute chain (ocz.LOSS.CLASS_WEIGHT), or through an alias of its node
        # (dec = cfg.MODEL.OCZ.DECODER; dec.NUM_QUERIES) in a file that names the node
        direct = re.compile(rf"\b{parent}\.{leaf}\b")
        aliased = re.compile(rf"\.{leaf}\b")
        if not any(
            direct.search(src) or (parent in src and aliased.search(src)) for src in sources
        ):
            unread.append(key)
    assert not unread, f"config keys that nothing reads: {unread}"


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
