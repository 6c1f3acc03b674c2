"""tools/fetch_weights.py writes the weight files and prints keys that build the same frozen
weights offline (the download is replaced by tiny random models: nothing downloads)."""

from __future__ import annotations

import shlex
from pathlib import Path

import torch

from tools import fetch_weights as tool


def test_fetch_weights_files_and_printed_keys(tmp_path, capsys, monkeypatch):
    from ocz_d2.modeling.backbone.clip_prompt import create_clip_model
    from ocz_d2.modeling.backbone.ssl_guide import create_ssl_model

    calls = []

    def fake_clip(name, tag):  # what the tag would download, here a seeded tiny model
        calls.append((name, tag))
        torch.manual_seed(0)
        return create_clip_model("OCZ-Tiny-ViT")

    def fake_ssl(name, pretrained):
        calls.append((name, pretrained))
        return create_ssl_model("vit_tiny_patch16_224", pretrained=False, seed=5)

    monkeypatch.setattr(tool, "create_clip_model", fake_clip)
    monkeypatch.setattr(tool, "create_ssl_model", fake_ssl)
    argv = ["--out", str(tmp_path), "--clip-model", "OCZ-Tiny-ViT", "--clip-tag", "openai"]
    argv += ["--ssl-model", "vit_tiny_patch16_224"]
    assert tool.main(argv) == 0
    assert calls == [("OCZ-Tiny-ViT", "openai"), ("vit_tiny_patch16_224", True)]
    keys = shlex.split(capsys.readouterr().out.strip().splitlines()[-1])
    opts = dict(zip(keys[::2], keys[1::2]))
    # (ViT-B-16 with "openai" becomes ViT-B-16-quickgelu; the tiny model has no such variant)
    assert opts["MODEL.OCZ.CLIP.MODEL_NAME"] == "OCZ-Tiny-ViT"
    assert opts["MODEL.OCZ.CLIP.PRETRAINED"] == ""
    clip_file = Path(opts["MODEL.OCZ.CLIP.WEIGHTS"])
    ssl_file = Path(opts["MODEL.OCZ.GUIDE.WEIGHTS"])
    assert clip_file.parent == tmp_path and ssl_file.parent == tmp_path
    # Offline, the files rebuild the same frozen weights.
    torch.manual_seed(0)
    want = create_clip_model("OCZ-Tiny-ViT").state_dict()
    got = create_clip_model("OCZ-Tiny-ViT", weights=str(clip_file)).state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    ssl = create_ssl_model("vit_tiny_patch16_224", weights=str(ssl_file)).state_dict()
    ref = create_ssl_model("vit_tiny_patch16_224", pretrained=False, seed=5).state_dict()
    assert all(torch.equal(ssl[k], ref[k]) for k in ref)
    # A second run reuses the files.
    calls.clear()
    assert tool.main(argv) == 0 and calls == []
    assert not list(tmp_path.glob(".tmp-*"))


def test_openai_tag_selects_the_quickgelu_name():
    from ocz_d2.modeling.backbone.clip_prompt import available_clip_models

    assert "ViT-B-16-quickgelu" in available_clip_models()
