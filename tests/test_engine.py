"""Atomic checkpoints, LR multipliers and the warmup + poly schedule."""

import os
import subprocess
import sys

import pytest
import torch
from detectron2.config import get_cfg
from torch import nn

from ocz_d2 import add_ocz_config
from ocz_d2.engine import AtomicCheckpointer, build_lr_scheduler, build_optimizer


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Module()
        self.backbone.frozen = nn.Linear(3, 3)
        self.backbone.frozen.requires_grad_(False)
        self.backbone.prompt = nn.Parameter(torch.zeros(2, 3))
        self.head = nn.Linear(3, 2)
        self.norm = nn.LayerNorm(2)


def _cfg(**solver):
    cfg = get_cfg()
    add_ocz_config(cfg)
    cfg.SOLVER.BASE_LR = 1e-3
    cfg.SOLVER.WEIGHT_DECAY = 0.05
    cfg.SOLVER.BACKBONE_MULTIPLIER = 1.0
    cfg.SOLVER.HEAD_MULTIPLIER = 10.0
    cfg.SOLVER.LR_SCHEDULER_NAME = "WarmupPolyLR"
    for k, v in solver.items():
        setattr(cfg.SOLVER, k, v)
    return cfg


def test_param_groups_by_prefix():
    model = _Toy()
    opt = build_optimizer(_cfg(), model)
    by_param = {id(p): g for g in opt.param_groups for p in g["params"]}
    assert id(model.backbone.frozen.weight) not in by_param  # frozen: not optimised
    assert by_param[id(model.backbone.prompt)]["lr"] == pytest.approx(1e-3)
    assert by_param[id(model.backbone.prompt)]["weight_decay"] == 0.0  # prompts: no decay
    assert by_param[id(model.head.weight)]["lr"] == pytest.approx(1e-2)
    assert by_param[id(model.head.weight)]["weight_decay"] == pytest.approx(0.05)
    assert by_param[id(model.norm.weight)]["weight_decay"] == 0.0
    assert isinstance(opt, torch.optim.AdamW)


def test_unknown_optimizer_is_an_error():
    with pytest.raises(ValueError, match="SOLVER.OPTIMIZER"):
        build_optimizer(_cfg(OPTIMIZER="LAMB"), _Toy())


def test_warmup_poly_schedule():
    cfg = _cfg(MAX_ITER=100, WARMUP_ITERS=10, WARMUP_FACTOR=0.1, POLY_LR_POWER=0.9)
    model = _Toy()
    opt = build_optimizer(cfg, model)
    sched = build_lr_scheduler(cfg, opt)
    head = next(g for g in opt.param_groups if g["params"][0] is model.head.weight)
    lrs = []
    for _ in range(100):
        lrs.append(head["lr"])
        opt.step()
        sched.step()
    # linear warmup from 0.1x, then (1 - t)^0.9 of the head LR 1e-2
    assert lrs[0] == pytest.approx(1e-2 * 0.1, rel=1e-6)
    assert lrs[5] < lrs[9] < lrs[10] * 1.001
    assert lrs[50] == pytest.approx(1e-2 * (1 - 50 / 100) ** 0.9, rel=1e-6)
    assert lrs[99] == pytest.approx(1e-2 * (1 - 99 / 100) ** 0.9, rel=1e-6)


def test_checkpoint_atomic_and_tagged(tmp_path):
    model = _Toy()
    ckpt = AtomicCheckpointer(model, save_dir=str(tmp_path))
    ckpt.save("model_0000001", iteration=1)
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000001.pth"
    good = (tmp_path / "model_0000001.pth").read_bytes()

    # A save interrupted while writing (process killed / disk full) keeps the old file and tag.
    def broken_save(obj, f):
        f.write(b"partial")
        raise KeyboardInterrupt

    real_save = torch.save
    torch.save = broken_save
    try:
        with torch.no_grad():
            model.head.weight.add_(1.0)
        with pytest.raises(KeyboardInterrupt):
            ckpt.save("model_0000001", iteration=2)
    finally:
        torch.save = real_save
    assert (tmp_path / "model_0000001.pth").read_bytes() == good
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000001.pth"
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp-")]

    restored = _Toy()
    extra = AtomicCheckpointer(restored, save_dir=str(tmp_path)).resume_or_load("", resume=True)
    assert extra["iteration"] == 1
    assert not torch.equal(restored.head.weight, model.head.weight)


def test_stale_temporaries_of_a_killed_write_are_removed(tmp_path):
    """What a killed atomic write leaves (``.tmp-<8 random>-<name>``) goes; other files stay.
    (tests/test_reliability.py checks the same through a resumed train_net run.)"""
    from ocz_d2.engine.checkpoint import remove_stale_temporaries

    stale = [
        tmp_path / ".tmp-k3x_9q2a-model_0000003.pth",
        tmp_path / ".tmp-0abc12de-last_checkpoint",
    ]
    keep = [tmp_path / ".tmp-notes.txt", tmp_path / "model_0000003.pth"]
    for path in stale + keep:
        path.write_bytes(b"partial")
    assert remove_stale_temporaries(str(tmp_path)) == sorted(str(p) for p in stale)
    assert sorted(os.listdir(tmp_path)) == sorted(p.name for p in keep)
    assert remove_stale_temporaries(str(tmp_path / "absent")) == []


def test_missing_weights_file_is_a_clear_error(tmp_path):
    ckpt = AtomicCheckpointer(_Toy(), save_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="MODEL.WEIGHTS"):
        ckpt.load(str(tmp_path / "nope.pth"))


def test_exit_process_runs_the_exit_handlers_and_keeps_the_output(tmp_path):
    """exit_process skips the interpreter's teardown, not the exit handlers (log files) nor the
    buffered output; the status comes back."""
    marker = tmp_path / "handler_ran"
    code = (
        "import atexit, pathlib, sys\n"
        "from ocz_d2.utils.parallel import exit_process\n"
        f"atexit.register(pathlib.Path({str(marker)!r}).write_text, 'yes')\n"
        "sys.stdout.write('no newline, still buffered')\n"
        "exit_process(3)\n"
        "print('never')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout == "no newline, still buffered"
    assert marker.read_text() == "yes"
