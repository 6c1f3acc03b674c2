#!/usr/bin/env python
"""Fetch the frozen pretrained weights once, on a machine with internet, for offline use.

    python tools/fetch_weights.py --out /data/weights

downloads CLIP ViT-B/16 (OpenAI; open_clip ``ViT-B-16`` / ``openai``) and DINO ViT-B/16 (timm
``vit_base_patch16_224.dino``), writes their state dicts (``clip_ViT-B-16_openai.pt``,
``ssl_vit_base_patch16_224.dino.pth``; atomically, skipped when present) and prints the config
keys that use them offline, e.g.::

    MODEL.OCZ.CLIP.MODEL_NAME ViT-B-16-quickgelu MODEL.OCZ.CLIP.PRETRAINED "" \\
    MODEL.OCZ.CLIP.WEIGHTS /data/weights/clip_ViT-B-16_openai.pt \\
    MODEL.OCZ.GUIDE.WEIGHTS /data/weights/ssl_vit_base_patch16_224.dino.pth

(OpenAI's weights were trained with QuickGELU: with a weights file the ``-quickgelu`` model name
keeps the activation right; with the ``openai`` tag ocz_d2 sets it itself.) Copy the folder to
the offline machine and append those keys to any train_net.py command. Checkpoints record the
frozen weights they were trained with, and loading compares tensors, so a model trained with the
tag loads with the files. ``--no-clip`` / ``--no-ssl`` skip one; ``--clip-model``, ``--clip-tag``
and ``--ssl-model`` pick others (e.g. ``vit_base_patch14_dinov2.lvd142m``).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys

# torch and ocz_d2 are imported when first needed: --help is instant.
_LAZY = {
    "available_clip_models": "ocz_d2.modeling.backbone.clip_prompt",
    "create_clip_model": "ocz_d2.modeling.backbone.clip_prompt",
    "create_ssl_model": "ocz_d2.modeling.backbone.ssl_guide",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(name)


def _get(name: str):
    """A lazily imported function, or what replaced it in this module (tests)."""
    return globals()[name] if name in globals() else __getattr__(name)


def _save(state: dict, path: str) -> None:
    import torch

    from ocz_d2.utils.io import atomic_write

    atomic_write(path, lambda f: torch.save(state, f))


def fetch(args: argparse.Namespace) -> list[str]:
    """Write the weight files; returns the config overrides (KEY VALUE ...)."""
    from ocz_d2.utils.io import file_sha256

    os.makedirs(args.out, exist_ok=True)
    keys: list[str] = []
    if args.clip:
        path = os.path.abspath(os.path.join(args.out, f"clip_{args.clip_model}_{args.clip_tag}.pt"))
        if not os.path.isfile(path):
            _save(_get("create_clip_model")(args.clip_model, args.clip_tag).state_dict(), path)
        print(f"CLIP {args.clip_model}/{args.clip_tag}: {path} (sha256 {file_sha256(path)})")
        name = args.clip_model
        # The tag's activation, which a weights file does not carry (see the module docstring).
        quick = f"{name}-quickgelu"
        if args.clip_tag == "openai" and quick in _get("available_clip_models")():
            name = quick
        keys += ["MODEL.OCZ.CLIP.MODEL_NAME", name, "MODEL.OCZ.CLIP.PRETRAINED", ""]
        keys += ["MODEL.OCZ.CLIP.WEIGHTS", path]
    if args.ssl:
        path = os.path.abspath(os.path.join(args.out, f"ssl_{args.ssl_model}.pth"))
        if not os.path.isfile(path):
            _save(_get("create_ssl_model")(args.ssl_model, pretrained=True).state_dict(), path)
        print(f"SSL {args.ssl_model}: {path} (sha256 {file_sha256(path)})")
        keys += ["MODEL.OCZ.GUIDE.SSL_MODEL", args.ssl_model, "MODEL.OCZ.GUIDE.WEIGHTS", path]
    return keys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True, help="folder for the weight files")
    parser.add_argument("--clip-model", default="ViT-B-16", help="open_clip architecture")
    parser.add_argument("--clip-tag", default="openai", help="open_clip pretrained tag")
    parser.add_argument("--ssl-model", default="vit_base_patch16_224.dino", help="timm name")
    parser.add_argument("--no-clip", dest="clip", action="store_false", help="skip CLIP")
    parser.add_argument("--no-ssl", dest="ssl", action="store_false", help="skip the SSL ViT")
    args = parser.parse_args(argv)
    try:
        keys = fetch(args)
    except RuntimeError as e:  # the create_* functions say what failed (offline, unknown tag)
        print(f"error: {e}", file=sys.stderr)
        return 1
    print("Config keys for offline use (append to train_net.py / segment.py commands):")
    print(" ".join(shlex.quote(k) for k in keys))
    return 0


if __name__ == "__main__":
    sys.exit(main())
