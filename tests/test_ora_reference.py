"""ORA against a hand computation: the recurrence written out step by step in the test (LayerNorm,
multi-head attention with a softmax, the GRU equations, granular attention's convolutions), with
the module's own weights. Shape and gradient checks cannot tell a swapped role or a stale input
from the right recurrence; a reference value can."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ocz_d2.modeling.pixel_decoder.ora import ObjectRefinementAttention


def _ln(x, norm):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias


def _linear(x, layer):
    return x @ layer.weight.T + layer.bias


def _granular(x, proj, grid, valid):
    """GranularExtractor by hand on tokens [B, N, C]: depth-wise dilated 3x3 convolutions, the
    mean over image patches only, a 1x1 mix."""
    g = proj.granular
    b, n, c = x.shape
    fmap = x.transpose(1, 2).reshape(b, c, *grid)
    branches = [
        F.conv2d(fmap, conv.weight, conv.bias, padding=r, dilation=r, groups=c)
        for conv, r in zip(g.branches, g.rates)
    ]
    w = valid.reshape(b, 1, n).float()
    mean = (x.transpose(1, 2) * w).sum(-1) / w.sum(-1)  # [B, C], image patches only
    pooled = (mean @ g.pool.weight[:, :, 0, 0].T + g.pool.bias)[:, :, None, None]
    stacked = torch.cat(branches + [pooled.expand(-1, -1, *grid)], 1)
    mixed = torch.einsum("oi,bihw->bohw", g.mix.weight[:, :, 0, 0], stacked)
    mixed = mixed + g.mix.bias[None, :, None, None]
    return mixed.flatten(2).transpose(1, 2)


def _attention(q, k, v, heads, key_valid=None):
    b, nq, c = q.shape
    d = c // heads
    out = torch.zeros_like(q)
    for h in range(heads):
        sl = slice(h * d, (h + 1) * d)
        logits = q[..., sl] @ k[..., sl].transpose(1, 2) / math.sqrt(d)
        if key_valid is not None:
            logits = logits.masked_fill(~key_valid[:, None, :], float("-inf"))
        out[..., sl] = logits.softmax(-1) @ v[..., sl]
    return out


def _gru(x, h, gru):
    cell = gru.cell
    wr, wz, wn = cell.weight_ih.chunk(3)
    ur, uz, un = cell.weight_hh.chunk(3)
    br, bz, bn = cell.bias_ih.chunk(3)
    cr, cz, cn = cell.bias_hh.chunk(3)
    r = torch.sigmoid(x @ wr.T + br + h @ ur.T + cr)
    z = torch.sigmoid(x @ wz.T + bz + h @ uz.T + cz)
    n = torch.tanh(x @ wn.T + bn + r * (h @ un.T + cn))
    return (1 - z) * n + z * h


def _reference(ora, patches, objects, valid, *, stale_objects=False):
    """ORA's forward written out; ``stale_objects`` feeds the patch stage the objects from before
    the object stage (a wrong variant the test must tell apart)."""
    b, c, hh, ww = patches.shape
    grid = (hh, ww)
    tokens = patches.flatten(2).transpose(1, 2)
    pf0 = _ln(_linear(tokens, ora.patch_in), ora.patch_state_norm)
    of = _ln(_linear(objects, ora.object_in), ora.object_state_norm)
    key_valid = valid.reshape(b, -1)
    pf = pf0
    for _ in range(ora.num_rounds):
        pn, on = _ln(pf, ora.patch_norm), _ln(of, ora.obj_norm)
        q = _linear(on, ora.obj_q)
        k = _granular(pn, ora.obj_k, grid, valid)
        v = _granular(pn, ora.obj_v, grid, valid)
        msg = _attention(q, k, v, ora.num_heads, key_valid)
        new_of = _gru(_linear(msg, ora.obj_out), of, ora.obj_gru)
        on = _ln(of if stale_objects else new_of, ora.obj_norm)
        of = new_of
        q = _granular(pn, ora.patch_q, grid, valid)
        msg = _attention(q, _linear(on, ora.patch_k), _linear(on, ora.patch_v), ora.num_heads)
        pf = _gru(_linear(msg, ora.patch_out), pf, ora.patch_gru)
    out = tokens + _linear(pf - pf0, ora.patch_exit)
    return out.transpose(1, 2).reshape(b, c, hh, ww)


def _ora_and_inputs():
    torch.manual_seed(0)
    ora = ObjectRefinementAttention(
        12, dim=8, num_rounds=3, num_heads=2, granular_rates=(1, 2)
    ).double()
    # A non-zero exit (it starts at zero so that a new ORA is the identity).
    torch.nn.init.normal_(ora.patch_exit.weight)
    torch.nn.init.normal_(ora.patch_exit.bias)
    # Residual-stream-sized inputs: the GRU states start layer-normalised whatever their scale.
    patches = 20 * torch.randn(2, 12, 4, 5, dtype=torch.float64)
    objects = torch.randn(2, 3, 12, dtype=torch.float64)
    valid = torch.ones(2, 4, 5, dtype=torch.bool)
    valid[1, 3:, :] = False  # image 1: its last row of patches is padding
    valid[1, :, 4:] = False
    return ora, patches, objects, valid


def test_ora_matches_the_recurrence_written_out():
    ora, patches, objects, valid = _ora_and_inputs()
    with torch.no_grad():
        out = ora(patches, objects, valid)
        want = _reference(ora, patches, objects, valid)
        torch.testing.assert_close(out, want, rtol=1e-9, atol=1e-9)
        # The reference tells the right recurrence from a patch stage fed stale objects.
        stale = _reference(ora, patches, objects, valid, stale_objects=True)
        assert (stale - want).abs().max() > 1e-3


def test_ora_ignores_padding_patches():
    """Padding patches are no key of the object stage: with linear projections, what they hold
    does not change any image patch's refinement, over all rounds. (With granular attention
    they still reach their neighbours through the dilated convolutions, as zero padding does at
    an image border; its global pool leaves them out, see the reference test above.)"""
    torch.manual_seed(0)
    ora = ObjectRefinementAttention(12, dim=8, num_rounds=3, num_heads=2, granular_rates=None)
    torch.nn.init.normal_(ora.patch_exit.weight)
    _, patches, objects, valid = _ora_and_inputs()
    patches, objects = patches.float(), objects.float()
    changed = patches.clone()
    changed[1][~valid[1].expand(12, -1, -1)] = 1000.0
    with torch.no_grad():
        a, b = ora(patches, objects, valid), ora(changed, objects, valid)
    image = valid[1].expand(12, -1, -1)
    torch.testing.assert_close(a[1][image], b[1][image])
    torch.testing.assert_close(a[0], b[0])
    # Without the mask the padding leaks into every patch through the objects.
    with torch.no_grad():
        a, b = ora(patches, objects), ora(changed, objects)
    assert (a[1][image] - b[1][image]).abs().max() > 1e-3


def test_ora_state_scale_does_not_depend_on_the_input_scale():
    """The GRU states start layer-normalised: scaling PF (the residual stream's size) leaves the
    recurrence's change unchanged, so refined - PF is the same."""
    ora, patches, objects, valid = _ora_and_inputs()
    # Without the entry projection's bias the normalised state is scale-free.
    torch.nn.init.zeros_(ora.patch_in.bias)
    with torch.no_grad():
        small = ora(patches, objects, valid) - patches
        large = ora(50 * patches, objects, valid) - 50 * patches
    torch.testing.assert_close(small, large, rtol=1e-6, atol=1e-6)
