"""PC2Seg pixel contrastive loss against a plain per-anchor loop with the same negatives."""

import contextlib
import math

import pytest
import torch
import torch.nn.functional as F

from larvess import numerics
from larvess.pc2seg import (
    PC2SEG_NEGATIVES,
    pixel_contrastive_loss,
    pseudo_labels,
    sample_negatives,
)


def views(B=2, d=6, h=3, w=4, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x1 = F.normalize(torch.randn(B, d, h, w, generator=g, dtype=dtype), dim=1)
    x2 = F.normalize(x1 + 0.5 * torch.randn(B, d, h, w, generator=g, dtype=dtype), dim=1)
    return x1, x2


def naive(x1, x2, idx, ok, tau, valid=None):
    """-log(e^{a.p/t} / (e^{a.p/t} + sum_n e^{a.q_n/t})) per valid anchor, looped."""
    d = x1.shape[1]
    a = x1.permute(0, 2, 3, 1).reshape(-1, d)
    p = x2.permute(0, 2, 3, 1).reshape(-1, d)
    if valid is not None:
        a, p = a[valid.reshape(-1)], p[valid.reshape(-1)]
    losses = []
    for i in range(len(a)):
        if not ok[i]:
            continue
        pos = torch.exp(a[i] @ p[i] / tau)
        neg = sum(torch.exp(a[i] @ p[j] / tau) for j in idx[i].tolist())
        losses.append(-torch.log(pos / (pos + neg)))
    return torch.stack(losses).mean()


def test_loss_equals_naive_loop_with_the_same_negatives():
    x1, x2 = views()
    M = x1.shape[0] * x1.shape[2] * x1.shape[3]
    got = pixel_contrastive_loss(x1, x2, 7, 0.5, generator=torch.Generator().manual_seed(3))
    idx, ok = sample_negatives(M, 7, torch.Generator().manual_seed(3))
    assert torch.allclose(got, naive(x1, x2, idx, ok, 0.5), atol=1e-12)
    # passing the draw explicitly is the same
    same = pixel_contrastive_loss(x1, x2, 7, 0.5, negatives=(idx, ok))
    assert torch.allclose(got, same, atol=1e-14)


def test_gradients_match_naive_and_gradcheck():
    x1r, x2r = (t.clone().requires_grad_(True) for t in views(B=1, d=4, h=2, w=3, seed=1))
    idx, ok = sample_negatives(6, 5, torch.Generator().manual_seed(4))

    def ours(a, b):
        return pixel_contrastive_loss(
            F.normalize(a, dim=1), F.normalize(b, dim=1), 5, 0.3, negatives=(idx, ok)
        )

    def ref(a, b):
        return naive(F.normalize(a, dim=1), F.normalize(b, dim=1), idx, ok, 0.3)

    ga = torch.autograd.grad(ours(x1r, x2r), [x1r, x2r])
    gb = torch.autograd.grad(ref(x1r, x2r), [x1r, x2r])
    for a, b in zip(ga, gb):
        assert torch.allclose(a, b, atol=1e-12)
    assert torch.autograd.gradcheck(ours, (x1r, x2r))


def test_uniform_sampling_never_draws_the_anchor_and_covers_the_others():
    M, K = 9, 4000
    idx, ok = sample_negatives(M, K, torch.Generator().manual_seed(5))
    assert idx.shape == (M, K) and ok.all()
    for i in range(M):
        drawn = set(idx[i].tolist())
        assert i not in drawn and drawn == set(range(M)) - {i}
    # roughly uniform: each of the 8 others about K/8 times
    counts = torch.stack([torch.bincount(idx[i], minlength=M) for i in range(M)]).float()
    off = counts[~torch.eye(M, dtype=torch.bool)]
    assert off.min() > K / 8 * 0.8 and off.max() < K / 8 * 1.2  # binomial sd ~4%
    # reproducible from the generator
    again, _ = sample_negatives(M, K, torch.Generator().manual_seed(5))
    assert torch.equal(idx, again)


def test_pseudo_labels_exclude_same_label_negatives():
    pseudo = torch.tensor([2, 0, 2, 1, 2, 0, 5, 2])
    idx, ok = sample_negatives(8, 300, torch.Generator().manual_seed(6), pseudo=pseudo)
    for i in range(8):
        drawn = set(idx[i].tolist())
        same = {j for j in range(8) if pseudo[j] == pseudo[i]}
        assert drawn == set(range(8)) - same  # every other-label pixel, no same-label one
    # a label covering every pixel leaves no negative: those anchors are skipped
    idx, ok = sample_negatives(4, 3, torch.Generator().manual_seed(7), pseudo=torch.zeros(4).long())
    assert not ok.any() and torch.all(idx == 0)


def test_valid_mask_and_pseudo_in_the_loss():
    x1, x2 = views(B=2, h=3, w=3, seed=2)
    valid = torch.ones(2, 3, 3, dtype=torch.bool)
    valid[0, 0] = False
    valid[1, :, 2] = False
    pseudo = torch.randint(0, 3, (2, 3, 3), generator=torch.Generator().manual_seed(8))
    got = pixel_contrastive_loss(
        x1, x2, 6, 0.2, generator=torch.Generator().manual_seed(9), valid=valid, pseudo=pseudo
    )
    M = int(valid.sum())
    idx, ok = sample_negatives(
        M, 6, torch.Generator().manual_seed(9), pseudo=pseudo.reshape(-1)[valid.reshape(-1)]
    )
    assert torch.allclose(got, naive(x1, x2, idx, ok, 0.2, valid), atol=1e-12)
    # nothing valid: a zero connected to the graph
    x1g = x1.clone().requires_grad_(True)
    zero = pixel_contrastive_loss(x1g, x2, 6, 0.2, valid=torch.zeros_like(valid))
    zero.backward()
    assert zero.item() == 0.0 and x1g.grad is not None


def test_identical_views_and_orthogonal_negatives_give_the_closed_form():
    # x1 = x2 and all pixels mutually orthogonal: l = log(1 + K e^{-1/tau}) for every anchor
    x = torch.eye(6, dtype=torch.float64).T.reshape(1, 6, 2, 3)
    got = pixel_contrastive_loss(x, x, 4, 0.5, generator=torch.Generator().manual_seed(10))
    assert abs(got.item() - math.log(1 + 4 * math.exp(-1 / 0.5))) < 1e-12
    assert PC2SEG_NEGATIVES == 200


def test_under_bf16_autocast_equals_fp32(monkeypatch):
    x1, x2 = (t.float() for t in views(B=2, d=32, h=6, w=6, seed=11))

    def run(autocast):
        a, b = x1.clone().requires_grad_(True), x2.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = pixel_contrastive_loss(a, b, 50, 0.1, generator=torch.Generator().manual_seed(12))
        return out.detach(), torch.autograd.grad(out, [a, b])

    ref, ref_g = run(False)
    got, got_g = run(True)
    assert got.dtype == torch.float32 and torch.allclose(got, ref, rtol=1e-6, atol=1e-6)
    for a, b in zip(got_g, ref_g):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)
    monkeypatch.setattr(numerics, "fp32_math", lambda *a: contextlib.nullcontext())
    monkeypatch.setattr(numerics, "_fp32", lambda t: t)
    unguarded, _ = run(True)
    assert (unguarded - ref).abs() > 1e-4  # guarded: < 1e-6


def test_pseudo_labels_are_the_nearest_row():
    x1, _ = views(B=2, d=5, h=2, w=2, seed=13)
    table = F.normalize(torch.randn(7, 5, generator=torch.Generator().manual_seed(14)), dim=1)
    got = pseudo_labels(x1, table.double())
    ref = torch.einsum("bdhw,cd->bchw", x1, table.double()).argmax(dim=1)
    assert torch.equal(got, ref)


def test_shape_errors():
    x1, x2 = views()
    with pytest.raises(ValueError, match="same"):
        pixel_contrastive_loss(x1, x2[:, :, :2])
    with pytest.raises(ValueError, match="valid"):
        pixel_contrastive_loss(x1, x2, valid=torch.ones(2, 3, dtype=torch.bool))
