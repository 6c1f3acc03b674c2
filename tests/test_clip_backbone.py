"""CLIPPromptBackbone on ocz_d2's tiny random CLIP configs (CPU, no download)."""

import open_clip
import pytest
import torch
import torch.nn.functional as F
from detectron2.config import get_cfg
from detectron2.modeling import build_backbone

from ocz_d2.config import add_ocz_config
from ocz_d2.modeling.backbone import (
    TINY_CLIP_MODELS,
    CLIPPromptBackbone,
    available_clip_models,
    register_tiny_clip_configs,
)

TINY = "OCZ-Tiny-ViT"
WIDTH, EMBED_DIM, LAYERS = 128, 64, 4


def make_backbone(seed=0, **kwargs):
    torch.manual_seed(seed)
    kwargs.setdefault("model_name", TINY)
    kwargs.setdefault("num_prompts", 3)
    kwargs.setdefault("out_layers", (0, 2, 3))
    return CLIPPromptBackbone(**kwargs)


def images(batch, height, width, seed=1):
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


def test_tiny_configs_registered_idempotently():
    register_tiny_clip_configs()
    register_tiny_clip_configs()
    names = open_clip.list_models()
    for name in TINY_CLIP_MODELS:
        assert names.count(name) == 1
    model = open_clip.create_model("OCZ-Tiny-ViT-P8", pretrained=None)
    assert model.visual.patch_size == (8, 8) and model.visual.transformer.width == WIDTH
    assert model.transformer.width == 128 and len(model.transformer.resblocks) == 2
    assert model.visual.output_dim == EMBED_DIM


@pytest.mark.parametrize("size", [(128, 128), (96, 160)])
def test_output_keys_shapes_and_strides(size):
    backbone = make_backbone().eval()
    h, w = size
    with torch.no_grad():
        out = backbone(images(2, h, w))
    gh, gw = h // 16, w // 16
    assert set(out) == {"res0", "res2", "res3", "patch", "dense", "cls", "last_input"}
    for name in ("res0", "res2", "res3", "patch"):
        assert out[name].shape == (2, WIDTH, gh, gw)
    assert out["last_input"].shape == (2, 1 + gh * gw + backbone.num_prompts, WIDTH)
    assert out["dense"].shape == (2, EMBED_DIM, gh, gw)
    assert out["cls"].shape == (2, EMBED_DIM)
    torch.testing.assert_close(out["dense"].norm(dim=1), torch.ones(2, gh, gw))
    torch.testing.assert_close(out["cls"].norm(dim=1), torch.ones(2))

    shapes = backbone.output_shape()
    assert set(shapes) == {"res0", "res2", "res3", "patch"}
    assert all(s.channels == WIDTH and s.stride == 16 for s in shapes.values())
    assert backbone.size_divisibility == 16
    assert (backbone.embed_dim, backbone.width, backbone.patch_size) == (EMBED_DIM, WIDTH, 16)
    mean = [255 * v for v in open_clip.OPENAI_DATASET_MEAN]
    std = [255 * v for v in open_clip.OPENAI_DATASET_STD]
    assert backbone.pixel_mean == pytest.approx(mean) and backbone.pixel_std == pytest.approx(std)


def test_patch8_config_grid():
    backbone = make_backbone(model_name="OCZ-Tiny-ViT-P8", num_prompts=0, out_layers=(1,))
    with torch.no_grad():
        out = backbone(images(1, 64, 96))
    assert out["res1"].shape == (1, WIDTH, 8, 12) and out["dense"].shape == (1, EMBED_DIM, 8, 12)
    assert backbone.output_shape()["patch"].stride == 8


def test_without_prompts_matches_open_clip():
    """M = 0 at the trained resolution must reproduce open_clip's own image tower exactly."""
    backbone = make_backbone(num_prompts=0).eval()
    visual = backbone.clip_model.visual
    x = images(2, 128, 128)
    with torch.no_grad():
        out = backbone(x)
        ref = visual.forward_intermediates(x, indices=[0, 2, 3], normalize_intermediates=False)
        ref_cls = F.normalize(backbone.clip_model.encode_image(x), dim=-1)
        # Final tokens of open_clip, for "patch" and "dense".
        tokens = visual.ln_post(visual.transformer(visual._embeds(x)))
    for i, name in enumerate(("res0", "res2", "res3")):
        torch.testing.assert_close(out[name], ref["image_intermediates"][i])
    torch.testing.assert_close(out["cls"], ref_cls)
    patch_ref = tokens[:, 1:].transpose(1, 2).reshape(2, WIDTH, 8, 8)
    torch.testing.assert_close(out["patch"], patch_ref)
    dense_ref = F.normalize(tokens[:, 1:] @ visual.proj, dim=-1).transpose(1, 2)
    torch.testing.assert_close(out["dense"], dense_ref.reshape(2, EMBED_DIM, 8, 8))


def test_position_embedding_interpolation():
    backbone = make_backbone()
    pos = backbone.clip_model.visual.positional_embedding
    assert backbone.pretrained_grid == (8, 8)
    same = backbone.position_embedding((8, 8))
    assert torch.equal(same, pos)

    resized = backbone.position_embedding((6, 10))
    assert resized.shape == (1 + 60, WIDTH)
    assert torch.equal(resized[0], pos[0])  # CLS position is not interpolated
    assert backbone.position_embedding((6, 10)) is resized  # cached per grid

    # Bicubic resizing keeps a spatially constant embedding constant, and the cache notices a
    # weight reload.
    state = {k: v.clone() for k, v in backbone.state_dict().items()}
    constant = torch.randn(WIDTH)
    state["clip_model.visual.positional_embedding"][1:] = constant
    backbone.load_state_dict(state)
    reloaded = backbone.position_embedding((6, 10))
    assert reloaded is not resized
    torch.testing.assert_close(reloaded[1:], constant.expand(60, -1))


def test_input_not_multiple_of_patch_raises():
    backbone = make_backbone()
    with pytest.raises(ValueError, match="multiple of the patch size 16"):
        backbone(images(1, 100, 128))


def test_prompts_change_output_and_receive_gradients():
    backbone = make_backbone(num_prompts=2)
    backbone.train()
    x = images(2, 96, 128)
    out = backbone(x)
    loss = out["patch"].square().mean() + out["cls"].sum() + out["res0"].mean()
    loss.backward()
    assert backbone.visual_prompts.shape == (LAYERS, 2, WIDTH)
    assert backbone.visual_prompts.grad is not None
    # Every layer's prompts influence the last layer's outputs.
    assert (backbone.visual_prompts.grad.abs().sum(dim=(1, 2)) > 0).all()
    for name, p in backbone.clip_model.named_parameters():
        assert not p.requires_grad and p.grad is None, name
    assert [n for n, p in backbone.named_parameters() if p.requires_grad] == ["visual_prompts"]

    with torch.no_grad():
        # Random, not a constant shift: LayerNorm would cancel a constant added to every channel.
        backbone.visual_prompts.add_(torch.randn(backbone.visual_prompts.shape))
        changed = backbone(x)
    assert not torch.allclose(changed["patch"], out["patch"].detach(), atol=1e-4)
    assert not torch.allclose(changed["cls"], out["cls"].detach(), atol=1e-4)


def test_prompt_init_scale():
    backbone = make_backbone(num_prompts=5)
    bound = (6.0 / (3 * 16 * 16 + WIDTH)) ** 0.5
    assert backbone.visual_prompts.abs().max() <= bound
    assert backbone.visual_prompts.std() > bound / 4  # uniform, not zeros


def test_zero_prompts():
    backbone = make_backbone(num_prompts=0)
    assert backbone.visual_prompts is None
    assert not [p for p in backbone.parameters() if p.requires_grad]
    out = backbone(images(1, 64, 64))
    assert out["patch"].shape == (1, WIDTH, 4, 4)


def test_train_keeps_frozen_clip_in_eval():
    backbone = make_backbone()
    backbone.train()
    assert backbone.training
    assert not any(m.training for m in backbone.clip_model.modules())
    backbone.eval()
    backbone.train(True)
    assert not backbone.clip_model.training

    trainable = make_backbone(frozen=False)
    trainable.train()
    assert trainable.clip_model.training
    assert all(p.requires_grad for p in trainable.clip_model.parameters())


def test_extra_tokens_and_attention_mask():
    """Extension point: extra tokens enter every layer; a mask can hide them from CLIP's tokens."""
    backbone = make_backbone(num_prompts=2).eval()
    x = images(2, 64, 96)
    grid = backbone.grid_size(64, 96)
    n = 3
    extra = torch.randn(2, n, WIDTH)
    layout = backbone.token_layout(grid, num_extra=n)
    length = layout["extra"].stop
    assert length == 1 + 24 + 2 + n

    with torch.no_grad():
        plain = backbone(x)
        mixed = backbone(x, extra_tokens=extra)
        closed = torch.zeros(length, length, dtype=torch.bool)
        closed[: layout["extra"].start, layout["extra"]] = True  # CLIP tokens do not see extras
        hidden = backbone(x, extra_tokens=extra, attn_mask=closed)
        # Same mask per image, as an additive float mask [B, T, T].
        additive = torch.zeros(2, length, length).masked_fill(closed, float("-inf"))
        hidden_b = backbone(x, extra_tokens=extra, attn_mask=additive)

    assert mixed["extra"].shape == (2, n, WIDTH)
    assert not torch.allclose(mixed["patch"], plain["patch"], atol=1e-4)
    for key in ("res0", "patch", "dense", "cls"):
        torch.testing.assert_close(hidden[key], plain[key])
        torch.testing.assert_close(hidden_b[key], plain[key])
    torch.testing.assert_close(hidden_b["extra"], hidden["extra"])

    # Callable form: called before each layer with the previous outputs (None first).
    seen = []

    def carry(layer, previous):
        seen.append((layer, previous is None))
        return extra if previous is None else previous

    with torch.no_grad():
        called = backbone(x, extra_tokens=carry)
    assert seen == [(0, True), (1, False), (2, False), (3, False)]
    torch.testing.assert_close(called["extra"], mixed["extra"])

    with pytest.raises(ValueError, match="attn_mask"):
        backbone(x, extra_tokens=extra, attn_mask=torch.zeros(5, 5))
    all_closed = torch.zeros(length, length, dtype=torch.bool)
    all_closed[0] = True
    with pytest.raises(ValueError, match="closes every key"):
        backbone(x, extra_tokens=extra, attn_mask=all_closed)


def test_local_weights_round_trip(tmp_path):
    torch.manual_seed(123)
    saved = open_clip.create_model(TINY, pretrained=None)
    path = tmp_path / "tiny_clip.pth"
    torch.save(saved.state_dict(), path)

    backbone = make_backbone(seed=7, weights=str(path))
    loaded = backbone.clip_model.state_dict()
    reference = saved.state_dict()
    assert loaded.keys() == reference.keys()
    for key, value in reference.items():
        assert torch.equal(loaded[key], value), key
    # A backbone built with the same seed but no file really differs (the test is not vacuous).
    fresh = make_backbone(seed=7).clip_model.state_dict()
    assert not torch.equal(fresh["visual.conv1.weight"], reference["visual.conv1.weight"])


def test_missing_weights_file_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="MODEL.OCZ.CLIP.WEIGHTS"):
        make_backbone(weights=str(tmp_path / "nope.pth"))


def test_unknown_model_name_error():
    with pytest.raises(ValueError, match="Unknown CLIP model") as info:
        make_backbone(model_name="ViT-Nonexistent")
    assert "OCZ-Tiny-ViT" in str(info.value) and "ViT-B-16" in str(info.value)
    assert "ViT-B-16" in available_clip_models()


def test_unknown_pretrained_tag_error():
    with pytest.raises(ValueError, match="not an open_clip tag"):
        make_backbone(pretrained="openai")  # no tags exist for the tiny config


def test_out_layers_checked():
    with pytest.raises(ValueError, match="OUT_LAYERS"):
        make_backbone(out_layers=(1, LAYERS))


def test_build_from_cfg_and_text_tower():
    cfg = get_cfg()
    add_ocz_config(cfg)
    cfg.MODEL.BACKBONE.NAME = "CLIPPromptBackbone"
    cfg.MODEL.OCZ.CLIP.MODEL_NAME = TINY
    cfg.MODEL.OCZ.CLIP.OUT_LAYERS = [1, 3]
    cfg.MODEL.OCZ.CLIP.NUM_PROMPTS = 2
    backbone = build_backbone(cfg)
    assert isinstance(backbone, CLIPPromptBackbone)
    assert backbone.out_layers == [1, 3] and backbone.num_prompts == 2
    assert backbone.text_encoder() is backbone.clip_model
    keys = list(backbone.state_dict())
    assert len(keys) == len(set(keys))
    assert all(k.startswith("clip_model.") or k == "visual_prompts" for k in keys)
    assert "clip_model.token_embedding.weight" in keys

    # With a global embeddings file the text tower is dropped.
    cfg.MODEL.OCZ.TEXT.EMBEDDINGS_FILE = "classes.npz"
    lean = build_backbone(cfg)
    assert not any(k.startswith("clip_model.transformer.") for k in lean.state_dict())
    with pytest.raises(RuntimeError, match="EMBEDDINGS_FILE"):
        lean.text_encoder()
    with torch.no_grad():
        assert lean(images(1, 32, 32))["cls"].shape == (1, EMBED_DIM)
