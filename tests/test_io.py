"""ocz_d2.utils.io: atomic writes, file digests, the datasets root and data-path lookup."""

from __future__ import annotations

import hashlib
import json
import os

import pytest

from ocz_d2.utils.errors import MissingFileError
from ocz_d2.utils.io import (
    atomic_write,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    datasets_root,
    file_sha256,
    is_temporary_name,
    resolve_data_path,
)


def test_atomic_write_replaces_the_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "out.bin"
    path.write_bytes(b"old")
    atomic_write(path, lambda f: f.write(b"new"))
    assert path.read_bytes() == b"new"
    assert os.listdir(tmp_path) == ["out.bin"]
    # The usual permissions (0666 less the umask), not mkstemp's 0600.
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_atomic_write_failure_keeps_the_old_content(tmp_path, exc):
    path = tmp_path / "out.json"
    path.write_text("old")
    seen = []

    def write(f):
        f.write(b"half")
        seen.append(f.name)
        raise exc("killed")

    with pytest.raises(exc, match="killed"):
        atomic_write(path, write)
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["out.json"]
    # The temporary file was a recognised name in the same folder.
    (tmp,) = seen
    assert os.path.dirname(tmp) == str(tmp_path) and is_temporary_name(os.path.basename(tmp))
    assert os.path.basename(tmp).endswith("-out.json")


def test_atomic_write_of_a_new_file_that_fails_leaves_nothing(tmp_path):
    def write(f):
        raise ValueError("no data")

    with pytest.raises(ValueError, match="no data"):
        atomic_write(tmp_path / "new.txt", write)
    assert os.listdir(tmp_path) == []


def test_atomic_write_forms(tmp_path):
    atomic_write_bytes(tmp_path / "b", b"\x00\xff")
    atomic_write_text(tmp_path / "t", "caf\u00e9\n")
    atomic_write_json(tmp_path / "j.json", {"b": 1, "a": [1.5]}, indent=1, sort_keys=True)
    assert (tmp_path / "b").read_bytes() == b"\x00\xff"
    assert (tmp_path / "t").read_bytes() == "caf\u00e9\n".encode()
    text = (tmp_path / "j.json").read_text()
    assert text == '{\n "a": [\n  1.5\n ],\n "b": 1\n}\n'
    assert json.loads(text) == {"a": [1.5], "b": 1}


def test_is_temporary_name():
    assert is_temporary_name(".tmp-k3x_9q2a-model_final.pth")
    for name in (".tmp-notes.txt", "tmp-k3x_9q2a-x", ".tmp-K3X_9Q2A-x", ".tmp-k3x_9q2a-", "a.tmp"):
        assert not is_temporary_name(name), name


def test_file_sha256_matches_hashlib(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"abc")
    # FIPS 180-2 test vector for "abc".
    want = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert file_sha256(path) == want == hashlib.sha256(b"abc").hexdigest()
    data = os.urandom(3 * (1 << 20) + 5)  # several 1 MiB chunks and a partial one
    path.write_bytes(data)
    assert file_sha256(str(path)) == hashlib.sha256(data).hexdigest()


def test_datasets_root(monkeypatch):
    monkeypatch.delenv("DETECTRON2_DATASETS", raising=False)
    assert datasets_root() == "datasets"
    monkeypatch.setenv("DETECTRON2_DATASETS", "/data/sets")
    assert datasets_root() == "/data/sets"


def test_resolve_data_path_order(tmp_path, monkeypatch):
    here, root = tmp_path / "here", tmp_path / "root"
    (here / "sub").mkdir(parents=True)
    (root / "sub").mkdir(parents=True)
    monkeypatch.chdir(here)
    monkeypatch.setenv("DETECTRON2_DATASETS", str(root))
    kw = {"what": "test file", "fix": "make it."}
    (root / "sub" / "a.yaml").write_text("root")
    # Only under the datasets root: found there.
    assert resolve_data_path("sub/a.yaml", **kw) == os.path.join(str(root), "sub/a.yaml")
    # In the working directory too: the working directory wins, returned as given.
    (here / "sub" / "a.yaml").write_text("here")
    assert resolve_data_path("sub/a.yaml", **kw) == "sub/a.yaml"
    # An absolute path is never looked up under the root.
    absent = here / "sub" / "b.yaml"
    (root / absent.relative_to(absent.anchor)).parent.mkdir(parents=True)
    (root / absent.relative_to(absent.anchor)).write_text("root")
    with pytest.raises(FileNotFoundError) as info:
        resolve_data_path(absent, **kw)
    assert str(info.value) == f"test file does not exist (looked for {[str(absent)]}): make it."
    # Missing in both places: both named, in the error class asked for.
    with pytest.raises(MissingFileError, match="looked for .*here/sub/c.yaml.*root/sub/c.yaml"):
        resolve_data_path("sub/c.yaml", error=MissingFileError, **kw)
