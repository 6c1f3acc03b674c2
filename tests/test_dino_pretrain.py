"""DINO self-distillation of the miniature's tiny ViT: the loss by hand, determinism, exact
resume, the k-NN check, and the result loading as SimZSS's vision tower."""

from __future__ import annotations

import math

import pytest
import torch

from ocz_d2.miniature import dino_pretrain
from ocz_d2.miniature.dino_pretrain import (
    DinoConfig,
    dino_loss,
    ensure_synthetic_ssl_vit,
    knn_accuracy,
    pretrain_dino,
)
from ocz_d2.modeling.backbone import TINY_SSL_VIT
from ocz_d2.modeling.backbone.vision_tower import TimmVisionTower

TINY = {
    "steps": 4,
    "batch_size": 4,
    "warmup_steps": 1,
    "out_dim": 16,
    "hidden_dim": 16,
    "bottleneck_dim": 8,
    "global_size": 32,
    "local_size": 16,
    "num_local": 2,
    "checkpoint_period": 2,
}


def _images():
    return torch.randint(0, 256, (6, 3, 32, 32), generator=torch.Generator().manual_seed(0)).to(
        torch.uint8
    )


def test_dino_loss_by_hand():
    s = [torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]]), torch.tensor([[0.5, 0.5]])]
    t = [torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 0.0]])]
    center = torch.tensor([1.0, 0.0])

    def soft(v, temp):
        e = [math.exp(x / temp) for x in v]
        return [x / sum(e) for x in e]

    total = 0.0
    for i, tv in enumerate([[1.0, 0.0], [-1.0, 0.0]]):  # teacher minus centre
        p = soft(tv, 0.5)
        for j, sv in enumerate([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]]):
            if i != j:
                q = soft(sv, 0.1)
                total += -sum(a * math.log(b) for a, b in zip(p, q))
    got = float(dino_loss(s, t, center, 0.1, 0.5))
    assert math.isclose(got, total / 4, rel_tol=1e-5)


def test_pretraining_is_deterministic_and_resumes_exactly(tmp_path, monkeypatch):
    cfg = DinoConfig(**TINY)
    a = pretrain_dino(_images(), cfg, tmp_path / "a", progress=False).state_dict()
    b = pretrain_dino(_images(), cfg, tmp_path / "b", progress=False).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # a run killed after its step-2 checkpoint, then resumed, ends where the others did
    calls = {"n": 0}
    real = dino_pretrain.dino_loss

    def dying(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(dino_pretrain, "dino_loss", dying)
    with pytest.raises(KeyboardInterrupt):
        pretrain_dino(_images(), cfg, tmp_path / "c", progress=False)
    monkeypatch.setattr(dino_pretrain, "dino_loss", real)
    assert torch.load(tmp_path / "c" / "dino_state.pt", weights_only=True)["step"] == 2
    c = pretrain_dino(_images(), cfg, tmp_path / "c", progress=False).state_dict()
    assert all(torch.equal(a[k], c[k]) for k in a)
    # the teacher moved away from its random start, and another seed gives other weights
    other = pretrain_dino(
        _images(), DinoConfig(**{**TINY, "seed": 1}), tmp_path / "d", progress=False
    )
    assert not all(torch.equal(a[k], other.state_dict()[k]) for k in a)
    with pytest.raises(ValueError, match="other settings"):
        pretrain_dino(_images(), DinoConfig(**{**TINY, "lr": 1e-3}), tmp_path / "a", progress=False)


def test_the_weights_load_as_simzss_vision_tower(tmp_path):
    model = pretrain_dino(_images(), DinoConfig(**{**TINY, "steps": 1}), tmp_path, progress=False)
    path = tmp_path / "ssl.pt"
    torch.save(model.state_dict(), path)
    tower = TimmVisionTower(TINY_SSL_VIT, pretrained=False, weights=str(path))
    assert all(torch.equal(tower.model.state_dict()[k], v) for k, v in model.state_dict().items())
    cls, patches = tower(torch.zeros(1, 3, 128, 128))
    assert cls.shape == (1, 128) and patches.shape == (1, 128, 8, 8)


def test_knn_accuracy_by_hand():
    feats = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    assert knn_accuracy(feats, ["a", "a", "b", "b"], k=1) == 100.0
    # the two points of the second cluster now disagree: each one's neighbour votes wrong
    assert knn_accuracy(feats, ["a", "a", "b", "a"], k=1) == pytest.approx(50.0)
    # k = 3: every point sees the other three; the weights favour its own cluster
    assert knn_accuracy(feats, ["a", "a", "b", "b"], k=3) == 100.0


def test_attribute_knn_separates_the_two_attributes():
    hues, textures = ["red", "blue", "green", "grey"], ["plain", "striped", "dotted", "checkered"]
    g = torch.Generator().manual_seed(0)
    labels = [f"{hues[i % 4]} {textures[(i // 4) % 4]}" for i in range(64)]
    # Features that encode the hue only (one-hot, a little noise): the hue is found every time;
    # the texture and the class are not.
    features = torch.eye(4)[[i % 4 for i in range(64)]] + 0.01 * torch.randn(64, 4, generator=g)
    acc = dino_pretrain.attribute_knn(features, labels)
    assert acc["hue"] == 100.0
    assert acc["texture"] < 50 and acc["class"] < 50
    # Class names that are not two words: the class only.
    assert set(dino_pretrain.attribute_knn(features, [f"c{i % 4}" for i in range(64)])) == {"class"}


def test_synthetic_ssl_vit_is_cached_by_the_generator_record(tmp_path):
    # The key comes from the generator's record: a cached ViT needs no pretraining images, and
    # the set is rendered only on a miss.
    from ocz_d2.miniature.synthetic import generate_synthetic_benchmark

    info = generate_synthetic_benchmark(
        tmp_path / "ocz_synth", num_train=4, num_val=1, num_test=1, num_pretrain=6,
        num_zeroshot_per_class=1, image_size=32,
    )  # fmt: skip
    marker = info.root / "pretrain" / "generation_complete.json"
    assert not marker.exists()
    cfg = DinoConfig(**TINY)
    weights, record = ensure_synthetic_ssl_vit(info, cfg, tmp_path / "cache", progress=False)
    assert marker.is_file() and (info.root / "tiny_ssl_vit.pt").read_bytes() == weights.read_bytes()
    marker.unlink()
    again, _ = ensure_synthetic_ssl_vit(info, cfg, tmp_path / "cache", progress=False)
    assert again == weights and not marker.exists()  # cache hit: nothing rendered
    other, _ = ensure_synthetic_ssl_vit(
        info, DinoConfig(**{**TINY, "seed": 1}), tmp_path / "cache", progress=False
    )
    assert other.parent != weights.parent and marker.is_file()  # a miss renders the set again
