"""Pixel decoder (simple feature pyramid) and zero-shot transformer decoder."""

import math

import pytest
import torch
import torch.nn.functional as F
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling import SEM_SEG_HEADS_REGISTRY

from ocz_d2 import add_ocz_config
from ocz_d2.modeling.pixel_decoder.simple_pyramid import SimplePyramidPixelDecoder
from ocz_d2.modeling.transformer_decoder.zero_shot_decoder import (
    TRANSFORMER_DECODER_REGISTRY,
    SinePositionEncoding,
    ZeroShotMaskDecoder,
    build_transformer_decoder,
)

CONV_DIM = 32
MASK_DIM = 16
TEXT_DIM = 24


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _cfg(stride_features=("res3", "patch")):
    cfg = get_cfg()
    add_ocz_config(cfg)
    cfg.MODEL.SEM_SEG_HEAD.NAME = "SimplePyramidPixelDecoder"
    cfg.MODEL.SEM_SEG_HEAD.IN_FEATURES = list(stride_features)
    cfg.MODEL.SEM_SEG_HEAD.CONVS_DIM = CONV_DIM
    cfg.MODEL.SEM_SEG_HEAD.MASK_DIM = MASK_DIM
    cfg.MODEL.SEM_SEG_HEAD.NORM = "GN"
    cfg.MODEL.OCZ.DECODER.HIDDEN_DIM = 32
    cfg.MODEL.OCZ.DECODER.NUM_QUERIES = 6
    cfg.MODEL.OCZ.DECODER.NHEADS = 4
    cfg.MODEL.OCZ.DECODER.DIM_FEEDFORWARD = 64
    cfg.MODEL.OCZ.DECODER.DEC_LAYERS = 4
    return cfg


def _shapes(patch_stride, channels=(40, 48)):
    names = ("res3", "patch")
    return {n: ShapeSpec(channels=c, stride=patch_stride) for n, c in zip(names, channels)}


def _features(shapes, batch, grid):
    return {n: torch.randn(batch, s.channels, *grid) for n, s in shapes.items()}


def _decoder(**overrides):
    kwargs = dict(
        in_channels=CONV_DIM,
        mask_dim=MASK_DIM,
        text_dim=TEXT_DIM,
        hidden_dim=32,
        num_queries=6,
        nheads=4,
        dim_feedforward=64,
        dec_layers=4,
        num_feature_levels=3,
    )
    kwargs.update(overrides)
    return ZeroShotMaskDecoder(**kwargs)


# ---------------------------------------------------------------- pixel decoder


@pytest.mark.parametrize(
    "patch_stride, grid, expected_levels, expected_mask",
    [
        # 64 x 96 image, p = 16: strides 32, 16, 8 and mask stride 4.
        (16, (4, 6), [(2, 3), (4, 6), (8, 12)], (16, 24)),
        # 64 x 96 image, p = 8.
        (8, (8, 12), [(2, 3), (4, 6), (8, 12)], (16, 24)),
        # Non-square, odd grid (80 x 112 image, p = 16): coarser levels round up.
        (16, (5, 7), [(3, 4), (5, 7), (10, 14)], (20, 28)),
    ],
)
def test_pixel_decoder_shapes(patch_stride, grid, expected_levels, expected_mask):
    cfg = _cfg()
    decoder = SEM_SEG_HEADS_REGISTRY.get("SimplePyramidPixelDecoder")(cfg, _shapes(patch_stride))
    assert isinstance(decoder, SimplePyramidPixelDecoder)
    mask_features, levels = decoder(_features(_shapes(patch_stride), 2, grid))
    assert mask_features.shape == (2, MASK_DIM, *expected_mask)
    assert [tuple(x.shape) for x in levels] == [(2, CONV_DIM, *s) for s in expected_levels]
    assert torch.isfinite(mask_features).all()


def test_pixel_decoder_custom_strides_and_no_norm():
    decoder = SimplePyramidPixelDecoder(
        _shapes(16),
        conv_dim=CONV_DIM,
        mask_dim=8,
        norm="",
        decoder_strides=(64, 16),
        mask_stride=8,
    )
    mask_features, levels = decoder(_features(_shapes(16), 1, (8, 4)))
    assert mask_features.shape == (1, 8, 16, 8)
    assert [tuple(x.shape[-2:]) for x in levels] == [(2, 1), (8, 4)]


def test_pixel_decoder_rejects_bad_config():
    with pytest.raises(ValueError, match="power-of-2"):
        SimplePyramidPixelDecoder(_shapes(16), conv_dim=32, mask_dim=8, decoder_strides=(24,))
    with pytest.raises(ValueError, match="MASK_STRIDE"):
        SimplePyramidPixelDecoder(
            _shapes(16), conv_dim=32, mask_dim=8, decoder_strides=(32, 16), mask_stride=32
        )
    mixed = {"a": ShapeSpec(channels=8, stride=16), "b": ShapeSpec(channels=8, stride=8)}
    with pytest.raises(ValueError, match="single-stride"):
        SimplePyramidPixelDecoder(mixed, conv_dim=32, mask_dim=8)
    cfg = _cfg(stride_features=("res3", "res9"))
    with pytest.raises(ValueError, match="res9"):
        SimplePyramidPixelDecoder(cfg, _shapes(16))


def test_pixel_decoder_uses_every_input():
    decoder = SimplePyramidPixelDecoder(_shapes(16), conv_dim=CONV_DIM, mask_dim=MASK_DIM)
    features = _features(_shapes(16), 1, (4, 4))
    for feat in features.values():
        feat.requires_grad_(True)
    mask_features, levels = decoder(features)
    (mask_features.square().mean() + sum(x.square().mean() for x in levels)).backward()
    for name, feat in features.items():
        assert feat.grad is not None and feat.grad.abs().sum() > 0, name


def test_image_path_carries_sub_patch_detail():
    """The image path adds detail finer than a patch: two images with the same backbone
    features but different pixels give different mask features with it, identical ones
    without it; its stride-s maps land on the pyramid levels of stride s."""
    shapes, grid = _shapes(16), (4, 6)
    features = _features(shapes, 2, grid)
    image = torch.randn(2, 3, 64, 96)
    other = image.clone()
    other[:, :, 4:8, 4:8] += 3.0  # a 4 x 4 detail inside one 16 x 16 patch
    torch.manual_seed(0)
    plain = SimplePyramidPixelDecoder(shapes, conv_dim=CONV_DIM, mask_dim=MASK_DIM)
    same = [plain({**features, "image": x})[0] for x in (image, other)]
    assert torch.equal(same[0], same[1])
    torch.manual_seed(0)
    with_path = SimplePyramidPixelDecoder(
        shapes, conv_dim=CONV_DIM, mask_dim=MASK_DIM, image_path_widths=(32, 32, 32)
    )
    assert with_path.image_path.out_strides == [4, 8]  # stage strides 2, 4, 8; levels 32..4
    assert len(with_path.image_path.stages) == 3
    (m1, levels1), (m2, levels2) = (with_path({**features, "image": x}) for x in (image, other))
    assert (m1 - m2).abs().amax() > 1e-3
    # Stride 32 and 16 levels have no image-path input: they do not see the detail.
    assert torch.allclose(levels1[0], levels2[0]) and torch.allclose(levels1[1], levels2[1])
    assert (levels1[2] - levels2[2]).abs().amax() > 1e-3  # stride 8 does
    # The path adds to the same layers: with its projections zeroed it is the plain decoder.
    torch.manual_seed(0)
    twin = SimplePyramidPixelDecoder(
        shapes, conv_dim=CONV_DIM, mask_dim=MASK_DIM, image_path_widths=(32, 32, 32)
    )
    for proj in twin.image_path.out_proj.values():
        torch.nn.init.zeros_(proj.weight)
        torch.nn.init.zeros_(proj.bias)
    plain_out = plain(features)[0]
    assert torch.allclose(twin({**features, "image": image})[0], plain_out, atol=1e-6)
    with pytest.raises(KeyError, match="needs features\\['image'\\]"):
        with_path(features)
    with pytest.raises(ValueError, match="stride-4 map is"):
        with_path({**features, "image": torch.randn(2, 3, 60, 96)})
    with pytest.raises(ValueError, match="multiple of 32"):
        SimplePyramidPixelDecoder(shapes, conv_dim=32, mask_dim=8, image_path_widths=(24, 24))
    with pytest.raises(ValueError, match="none of which is a pyramid level"):
        SimplePyramidPixelDecoder(shapes, conv_dim=32, mask_dim=8, image_path_widths=(32,))


def test_image_path_depths_set_each_stages_convs():
    """DEPTHS: the stride-1 convs after each stage's stride-2 conv (default one each); the output
    strides and shapes do not change with them."""
    shapes, grid = _shapes(16), (4, 6)
    features = {**_features(shapes, 2, grid), "image": torch.randn(2, 3, 64, 96)}
    default = SimplePyramidPixelDecoder(
        shapes, conv_dim=32, mask_dim=8, image_path_widths=(32,) * 3
    )
    assert [len(stage) for stage in default.image_path.stages] == [2, 2, 2]
    lean = SimplePyramidPixelDecoder(
        shapes, conv_dim=32, mask_dim=8, image_path_widths=(32,) * 3, image_path_depths=(0, 2, 1)
    )
    assert [len(stage) for stage in lean.image_path.stages] == [1, 3, 2]
    assert [stage[0].stride for stage in lean.image_path.stages] == [(2, 2)] * 3
    assert all(conv.stride == (1, 1) for stage in lean.image_path.stages for conv in stage[1:])
    out, ref = lean(features), default(features)
    assert out[0].shape == ref[0].shape and [x.shape for x in out[1]] == [x.shape for x in ref[1]]
    for bad in ((1, 1), (1, -1, 1)):
        with pytest.raises(ValueError, match="depths"):
            SimplePyramidPixelDecoder(
                shapes, conv_dim=32, mask_dim=8, image_path_widths=(32,) * 3, image_path_depths=bad
            )


# ---------------------------------------------------------------- transformer decoder


def test_sine_position_encoding_values():
    pe = SinePositionEncoding(num_feats=4)(torch.zeros(2, 3, 2, 5))
    assert pe.shape == (2, 8, 2, 5)
    # Channels: y-sin(f0, f1), y-cos(f0, f1), x-sin(f0, f1), x-cos(f0, f1); f0 = 1, f1 = 1e-2.
    row, col = 1, 3
    y = (row + 0.5) / 2 * 2 * math.pi
    x = (col + 0.5) / 5 * 2 * math.pi
    expected = [
        math.sin(y),
        math.sin(y / 100),
        math.cos(y),
        math.cos(y / 100),
        math.sin(x),
        math.sin(x / 100),
        math.cos(x),
        math.cos(x / 100),
    ]
    torch.testing.assert_close(pe[1, :, row, col], torch.tensor(expected))


def _decoder_inputs(batch=2, num_classes=5):
    levels = [torch.randn(batch, CONV_DIM, h, w) for h, w in [(2, 3), (4, 6), (8, 12)]]
    mask_features = torch.randn(batch, MASK_DIM, 16, 24)
    text = F.normalize(torch.randn(num_classes, TEXT_DIM), dim=-1)
    return levels, mask_features, text


def test_mask_pooling_adds_the_projected_mask_average_to_the_class_embedding():
    """By hand: embedding = normalize(class_embed(q) + W_pool . mean of the mask features
    weighted by the sigmoid of the query's mask)."""
    torch.manual_seed(0)
    decoder = _decoder(mask_pooling=True, dec_layers=0).eval()
    levels, mask_features, text = _decoder_inputs()
    with torch.no_grad():
        out = decoder(levels, mask_features, text)
        q = decoder.decoder_norm(decoder.query_feat.weight)  # the initial queries
        masks = torch.einsum("qc,bchw->bqhw", decoder.mask_embed(q), mask_features)
        w = masks.sigmoid()
        b, i = 1, 4  # one query of one image, summed explicitly
        pooled = (w[b, i, None] * mask_features[b]).sum((-2, -1)) / w[b, i].sum().clamp(min=1)
        expected = F.normalize(decoder.class_embed(q[i]) + decoder.mask_pool_proj(pooled), dim=-1)
    torch.testing.assert_close(out["pred_embeds"][b, i], expected, rtol=1e-4, atol=1e-5)


def test_decoder_output_shapes_and_logits():
    decoder = _decoder()
    levels, mask_features, text = _decoder_inputs(num_classes=5)
    out = decoder(levels, mask_features, text)
    assert decoder.num_queries == 6
    assert out["pred_logits"].shape == (2, 6, 6)
    assert out["pred_masks"].shape == (2, 6, 16, 24)
    assert out["pred_embeds"].shape == (2, 6, TEXT_DIM)
    assert len(out["aux_outputs"]) == 4
    for aux in out["aux_outputs"]:
        assert set(aux) == {"pred_logits", "pred_masks", "pred_embeds"}
        assert aux["pred_logits"].shape == (2, 6, 6)
    torch.testing.assert_close(out["pred_embeds"].norm(dim=-1), torch.ones(2, 6))
    # Class logits are the scaled cosines with the text embeddings, no-object last.
    scale = 50.0
    no_object = F.normalize(decoder.no_object_embed.weight, dim=-1)
    expected = scale * out["pred_embeds"] @ torch.cat([text, no_object]).t()
    torch.testing.assert_close(out["pred_logits"], expected, rtol=1e-4, atol=1e-4)
    # Unnormalised text embeddings are normalised by the decoder.
    out2 = decoder(levels, mask_features, 3.0 * text)
    torch.testing.assert_close(out2["pred_logits"], out["pred_logits"])


def test_decoder_vocabulary_changes_between_calls():
    decoder = _decoder()
    levels, mask_features, text = _decoder_inputs(num_classes=7)
    out7 = decoder(levels, mask_features, text)
    out3 = decoder(levels, mask_features, text[[4, 0, 2]])
    assert out7["pred_logits"].shape[-1] == 8 and out3["pred_logits"].shape[-1] == 4
    # The same classes get the same logits whatever the rest of the vocabulary.
    torch.testing.assert_close(out3["pred_logits"][..., :3], out7["pred_logits"][..., [4, 0, 2]])
    torch.testing.assert_close(out3["pred_logits"][..., -1], out7["pred_logits"][..., -1])
    torch.testing.assert_close(out3["pred_masks"], out7["pred_masks"])


def test_attention_mask_blocks_background_and_opens_empty_queries():
    decoder = _decoder(nheads=2)
    logits = torch.full((2, 3, 4, 4), -5.0)
    logits[0, 0, :2] = 5.0  # image 0, query 0: top half foreground
    logits[0, 2] = 5.0  # image 0, query 2: everything foreground; query 1: nothing
    logits[1, :, :, :1] = 5.0  # image 1: first column for every query
    mask = decoder.attention_mask(logits, (4, 4))
    assert mask.shape == (4, 3, 16) and mask.dtype == torch.bool
    # Rows are image-major (b * nheads + head), as nn.MultiheadAttention expects.
    assert torch.equal(mask[0], mask[1]) and torch.equal(mask[2], mask[3])
    assert not mask[0, 0, :8].any() and mask[0, 0, 8:].all()
    assert not mask[0, 1].any(), "an all-blocked query must be opened"
    assert not mask[0, 2].any()
    first_column = torch.arange(16) % 4 == 0
    assert torch.equal(mask[2], ~first_column.expand(3, 16))
    # Resized to the attended level (2 x 2): top-half foreground stays the top half.
    small = decoder.attention_mask(logits, (2, 2))
    assert small[0, 0].tolist() == [False, False, True, True]


def test_masked_attention_all_blocked_has_no_nan():
    decoder = _decoder()
    # Every mask logit negative: every query would be blocked everywhere.
    last = decoder.mask_embed[-1]
    torch.nn.init.zeros_(last.weight)
    torch.nn.init.constant_(last.bias, -1.0)
    levels, mask_features, text = _decoder_inputs()
    mask_features = mask_features.abs() + 0.1
    out = decoder(levels, mask_features, text)
    assert (out["pred_masks"] < 0).all()
    for pred in [out] + out["aux_outputs"]:
        assert torch.isfinite(pred["pred_logits"]).all()
        assert torch.isfinite(pred["pred_embeds"]).all()


def test_masked_attention_changes_the_output():
    levels, mask_features, text = _decoder_inputs()
    torch.manual_seed(1)
    masked = _decoder(masked_attention=True)
    unmasked = _decoder(masked_attention=False)
    unmasked.load_state_dict(masked.state_dict())
    out_m = masked(levels, mask_features, text)
    out_u = unmasked(levels, mask_features, text)
    # Same weights: the initial prediction agrees, later ones differ through the masks.
    torch.testing.assert_close(
        out_m["aux_outputs"][0]["pred_masks"], out_u["aux_outputs"][0]["pred_masks"]
    )
    assert not torch.allclose(out_m["pred_masks"], out_u["pred_masks"])


@pytest.mark.parametrize("pre_norm", [False, True])
def test_gradients_flow_through_both_heads(pre_norm):
    cfg = _cfg()
    cfg.MODEL.OCZ.DECODER.PRE_NORM = pre_norm
    shapes = _shapes(16)
    pixel_decoder = SimplePyramidPixelDecoder(cfg, shapes)
    decoder = build_transformer_decoder(cfg, CONV_DIM, MASK_DIM, TEXT_DIM)
    assert isinstance(decoder, ZeroShotMaskDecoder)
    assert decoder.num_queries == 6 and len(decoder.layers) == 4
    mask_features, levels = pixel_decoder(_features(shapes, 2, (4, 6)))
    out = decoder(levels, mask_features, F.normalize(torch.randn(3, TEXT_DIM), dim=-1))
    loss = sum(
        p["pred_logits"].logsumexp(-1).mean() + p["pred_masks"].sigmoid().mean()
        for p in [out] + out["aux_outputs"]
    )
    loss.backward()
    for module in (pixel_decoder, decoder):
        for name, param in module.named_parameters():
            assert param.grad is not None, f"no gradient for {name}"
            assert torch.isfinite(param.grad).all(), name
    assert decoder.logit_scale.grad.abs() > 0
    assert decoder.query_feat.weight.grad.abs().sum() > 0


def test_decoder_registry_and_input_checks():
    assert TRANSFORMER_DECODER_REGISTRY.get("ZeroShotMaskDecoder") is ZeroShotMaskDecoder
    decoder = _decoder()
    levels, mask_features, text = _decoder_inputs()
    with pytest.raises(ValueError, match="feature levels"):
        decoder(levels[:2], mask_features, text)
    with pytest.raises(ValueError, match="text_embeds"):
        decoder(levels, mask_features, torch.randn(3, TEXT_DIM + 1))
    with pytest.raises(ValueError, match="logit_scale_init"):
        _decoder(logit_scale_init=0.0)
