"""Config hygiene: every ocz_d2 key is documented and read somewhere, every key the shipped
configs set is read by something that runs; the configs load; bad keys give clear errors."""

import ast
import functools
import re
from pathlib import Path

import detectron2
import pytest
import yaml
from detectron2.config import get_cfg

from ocz_d2 import add_ocz_config
from ocz_d2.config import ConfigError, load_config
from tools import train_net

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
    "modeling/backbone/resnet.py",  # build_resnet_backbone (ZegFormer's configs)
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


#: The keys add_ocz_config adds to Detectron2's config, each with the repr of its default.
DEFAULTS_SNAPSHOT = REPO / "tests" / "data" / "ocz_config_defaults.yaml"


def _added_defaults() -> dict[str, str]:
    """``{key: repr(default)}`` of every key add_ocz_config adds or changes (repr keeps the type:
    a tuple is not a list, 1 is not 1.0)."""

    def flatten(node, prefix=""):
        for k, v in node.items():
            if hasattr(v, "items"):
                yield from flatten(v, f"{prefix}{k}.")
            else:
                yield prefix + k, repr(v)

    base = dict(flatten(get_cfg()))
    cfg = get_cfg()
    add_ocz_config(cfg)
    return {k: v for k, v in flatten(cfg) if base.get(k) != v}


def _our_files():
    files = list((REPO / "ocz_d2").rglob("*.py")) + list((REPO / "tools").glob("*.py"))
    return [p for p in files if p.name != "config.py"]


@functools.cache
def _reads(path: Path) -> tuple[frozenset, frozenset]:
    """Attribute reads of a source file, from its syntax tree (strings and comments are not
    reads): ``(parent, leaf)`` pairs, and leaves read on a plain name (for top-level keys).

    A pair is a chain (``ocz.LOSS.CLASS_WEIGHT`` reads ``(LOSS, CLASS_WEIGHT)``) or a read on an
    alias of a node in the same function (``dec = cfg.MODEL.OCZ.DECODER`` then
    ``dec.NUM_QUERIES`` reads ``(DECODER, NUM_QUERIES)``); a leaf read on any other name counts
    for no key below the top level.
    """
    tree = ast.parse(path.read_text())
    pairs, on_names = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            if isinstance(node.value, ast.Attribute):
                pairs.add((node.value.attr, node.attr))
            elif isinstance(node.value, ast.Name):
                on_names.add(node.attr)
    functions = (ast.FunctionDef, ast.AsyncFunctionDef)
    for scope in [tree, *(n for n in ast.walk(tree) if isinstance(n, functions))]:
        body = _scope_nodes(scope) if scope is tree else list(ast.walk(scope))
        aliases: dict[str, set[str]] = {}
        for target, value in _assignments(body):
            if isinstance(target, ast.Name) and isinstance(value, ast.Attribute):
                aliases.setdefault(target.id, set()).add(value.attr)
        for node in body:
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
                pairs.update((parent, node.attr) for parent in aliases.get(node.value.id, ()))
    return frozenset(pairs), frozenset(on_names)


def _scope_nodes(tree: ast.Module) -> list[ast.AST]:
    """The nodes of a module outside its functions."""
    nodes, todo = [], list(ast.iter_child_nodes(tree))
    while todo:
        node = todo.pop()
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            nodes.append(node)
            todo.extend(ast.iter_child_nodes(node))
    return nodes


def _assignments(nodes):
    """``(target, value)`` of the plain assignments among ``nodes``, tuples unpacked pairwise
    (``a, b = x.A, x.B``)."""
    for node in nodes:
        if isinstance(node, ast.Assign):
            targets, value = node.targets, node.value
        elif isinstance(node, (ast.AnnAssign, ast.NamedExpr)) and node.value is not None:
            targets, value = [node.target], node.value
        else:
            continue
        for target in targets:
            if isinstance(target, ast.Tuple) and isinstance(value, ast.Tuple):
                yield from zip(target.elts, value.elts)
            else:
                yield target, value


def _is_read(key: str, files: list[Path]) -> bool:
    parts = key.split(".")
    for path in files:
        pairs, on_names = _reads(path)
        if len(parts) == 1 and parts[0] in on_names or tuple(parts[-2:]) in pairs:
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


@pytest.mark.parametrize(
    "source, read",
    [
        ("ora = cfg.MODEL.OCZ.ORA\nn = ora.DIM\n", True),  # an alias of the node
        ("def f(cfg):\n    ora, t = cfg.MODEL.OCZ.ORA, 1\n    return ora.DIM\n", True),
        ("n = cfg.MODEL.OCZ.ORA.DIM\n", True),  # a chain
        # The leaf on another object, in a file that names the node: not a read.
        ("ora = cfg.MODEL.OCZ.ORA\nn = head.DIM\n", False),
        ("n = cfg.MODEL.OCZ.ORA.ROUNDS + cfg.MODEL.OCZ.TEXT.DIM\n", False),
        # An alias in one function, the leaf read in another.
        ("def f(cfg):\n    ora = cfg.MODEL.OCZ.ORA\n\ndef g(ora):\n    return ora.DIM\n", False),
    ],
)
def test_a_read_needs_the_node_and_the_leaf_together(tmp_path, source, read):
    src = tmp_path / "mod.py"
    src.write_text(source)
    assert _is_read("MODEL.OCZ.ORA.DIM", [src]) is read


def test_added_keys_and_defaults_match_the_snapshot():
    """Every key and default of add_ocz_config as recorded in tests/data (a dropped, renamed or
    added key, or a changed default, fails here). After an intended change, regenerate it with
    ``python tests/test_config.py``."""
    expected = yaml.safe_load(DEFAULTS_SNAPSHOT.read_text())
    actual = _added_defaults()
    assert sorted(actual) == sorted(expected), (
        f"keys added: {sorted(set(actual) - set(expected))}, "
        f"dropped: {sorted(set(expected) - set(actual))}"
    )
    changed = {k: (expected[k], v) for k, v in actual.items() if expected[k] != v}
    assert not changed, f"defaults changed (snapshot, now): {changed}"


def test_every_added_key_has_a_comment():
    text = (REPO / "ocz_d2" / "config.py").read_text().splitlines()
    for key in _added_keys():
        tail = re.escape(".".join(key.split(".")[-2:]))
        idx = next(i for i, line in enumerate(text) if re.search(rf"\b{tail} = ", line))
        above = text[idx - 1].strip()
        assert above.startswith("#"), f"{key} has no comment line above it in config.py"


def test_load_config_names_a_misspelt_key_in_a_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    base = REPO / "configs" / "synthetic" / "ocz_tiny.yaml"
    bad.write_text(f"_BASE_: {base}\nMODEL:\n  OCZ:\n    DECODR:\n      NUM_QUERIES: 3\n")
    with pytest.raises(ConfigError) as info:
        load_config(bad)
    message = str(info.value)
    assert f"MODEL.OCZ.DECODR (in {bad} or its _BASE_ files)" in message
    assert "Did you mean MODEL.OCZ.DECODER." in message


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
    config = str(REPO / "configs" / "synthetic" / "ocz_tiny.yaml")
    status = train_net.main(["--config-file", config, "MODEL.OCZ.CLIP.NUM_PROMPT", "3"])
    err = capsys.readouterr().err
    assert status == 2
    assert err.startswith("error: unknown config key 'MODEL.OCZ.CLIP.NUM_PROMPT'"), err
    assert "Traceback" not in err


if __name__ == "__main__":  # regenerate the snapshot of the keys and their defaults
    header = (
        "# The keys ocz_d2's add_ocz_config adds to Detectron2's config, with the repr of their\n"
        "# defaults; tests/test_config.py compares a fresh config with it (regenerate with\n"
        "# `python tests/test_config.py` after an intended change).\n"
    )
    text = yaml.safe_dump(_added_defaults(), sort_keys=True, width=100)
    DEFAULTS_SNAPSHOT.write_text(header + text)
    print(f"written: {DEFAULTS_SNAPSHOT}")
