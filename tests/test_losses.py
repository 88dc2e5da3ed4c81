"""Losses against naive full-logit references written plainly here."""

import pytest
import torch
import torch.nn.functional as F

from larvess import knn
from larvess.losses import (
    LogitStandardizer,
    image_level_ce,
    knn_sampled_ce,
    margin_regularizer,
    pooled_ce,
)

S = 40.0


def unit(*shape, seed, dim=-1):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=dim)


def leaf(t):
    return t.clone().requires_grad_(True)


@pytest.mark.parametrize("k", [6, 50])  # C = 7: k >= C-1 means every class
def test_knn_ce_with_all_negatives_equals_cross_entropy(k):
    C, d = 7, 5
    emb_raw = leaf(torch.randn(2, d, 4, 3, dtype=torch.float64))
    w = leaf(torch.randn(C, d, dtype=torch.float64))
    target = torch.randint(0, C, (2, 4, 3), generator=torch.Generator().manual_seed(0))
    target[0, 0, :] = -1

    def ours():
        return knn_sampled_ce(F.normalize(emb_raw, dim=1), target, F.normalize(w, dim=1), k, S)

    def naive():
        x, mu = F.normalize(emb_raw, dim=1), F.normalize(w, dim=1)
        logits = S * torch.einsum("bdhw,cd->bchw", x, mu)
        return F.cross_entropy(logits, target, ignore_index=-1)

    a, b = ours(), naive()
    ga = torch.autograd.grad(a, [emb_raw, w])
    gb = torch.autograd.grad(b, [emb_raw, w])
    assert torch.allclose(a, b, atol=1e-10)
    for x, y in zip(ga, gb):
        assert torch.allclose(x, y, atol=1e-10)


def test_knn_ce_flat_input_uses_the_k_nearest_negatives():
    C, d, k = 30, 6, 4
    x, mu = unit(25, d, seed=1), unit(C, d, seed=2)
    y = torch.randint(0, C, (25,), generator=torch.Generator().manual_seed(3))
    got = knn_sampled_ce(x, y, mu, k, S)
    total = 0.0
    for i in range(25):
        sims = sorted(((float(x[i] @ mu[c]), c) for c in range(C) if c != int(y[i])), reverse=True)
        rows = [int(y[i])] + [c for _, c in sims[:k]]
        z = S * torch.stack([x[i] @ mu[c] for c in rows])
        total += float(torch.logsumexp(z, 0) - z[0])
    assert abs(float(got) - total / 25) < 1e-9


def test_knn_ce_no_label_is_zero_with_grad():
    emb = leaf(unit(1, 4, 3, 3, seed=4, dim=1))
    mu = leaf(unit(5, 4, seed=5))
    out = knn_sampled_ce(emb, torch.full((1, 3, 3), -1), mu, 2, S)
    out.backward()
    assert out.item() == 0.0 and emb.grad is not None and torch.all(emb.grad == 0)


def test_knn_ce_masks_unlabelled_pixels_instead_of_cutting_them_out():
    # the mean runs over labelled pixels only, whatever the ignored pixels hold
    x, mu = unit(6, 4, seed=6), unit(5, 4, seed=7)
    y = torch.tensor([0, -1, 3, -1, 1, 4])
    full = knn_sampled_ce(x, y, mu, 4, S)
    cut = knn_sampled_ce(x[y >= 0], y[y >= 0], mu, 4, S)
    x2 = x.clone()
    x2[y < 0] = unit(2, 4, seed=8)
    assert torch.allclose(full, cut, atol=1e-12) and torch.allclose(
        knn_sampled_ce(x2, y, mu, 4, S), cut, atol=1e-12
    )


def test_shared_negatives_equal_per_pixel_search_under_nearest_upsampling():
    B, d, h, w, C, k = 2, 6, 3, 4, 40, 5
    grid = unit(B, d, h, w, seed=8, dim=1)
    emb = F.interpolate(grid, size=(12, 16), mode="nearest")  # each cell's pixels share x
    mu = unit(C, d, seed=9)
    target = torch.randint(0, C, (B, 12, 16), generator=torch.Generator().manual_seed(10))
    # make the cell's own nearest class the target for some pixels (the "drop target" branch)
    near = knn.search(grid.permute(0, 2, 3, 1).reshape(-1, d), mu, 1)[:, 0].view(B, 1, h, w)
    near_px = F.interpolate(near.double(), size=(12, 16), mode="nearest").long()[:, 0]
    target[:, ::2] = near_px[:, ::2]
    target[0, 5, 5] = -1
    per_pixel = knn_sampled_ce(emb, target, mu, k, S)
    shared = knn_sampled_ce(emb, target, mu, k, S, grid=grid)
    assert torch.allclose(per_pixel, shared, atol=1e-12)


def test_shared_negatives_equal_per_pixel_with_non_integer_ratio():
    grid = unit(1, 4, 3, 3, seed=11, dim=1)
    emb = F.interpolate(grid, size=(10, 7), mode="nearest")
    mu = unit(12, 4, seed=12)
    target = torch.randint(0, 12, (1, 10, 7), generator=torch.Generator().manual_seed(13))
    assert torch.allclose(
        knn_sampled_ce(emb, target, mu, 3, S),
        knn_sampled_ce(emb, target, mu, 3, S, grid=grid),
        atol=1e-12,
    )


def test_margin_regularizer_matches_naive_pairwise():
    w = leaf(torch.randn(25, 3, dtype=torch.float64))  # d=3: close rows exist
    got = margin_regularizer(F.normalize(w, dim=1), margin=0.5)
    mu = F.normalize(w, dim=1)
    dists = torch.stack(
        [
            torch.stack([(mu[i] - mu[j]).norm() for j in range(25) if j != i]).min()
            for i in range(25)
        ]
    )
    ref = F.relu(0.5 - dists).mean()
    assert ref.item() > 0
    assert torch.allclose(got, ref, atol=1e-12)
    g1, g2 = torch.autograd.grad(got, w)[0], torch.autograd.grad(ref, w)[0]
    assert torch.allclose(g1, g2, atol=1e-10)


def naive_image_ce(emb, labels, mu, s):
    """Pixel logits, pooled, CE with the image's other labels masked out."""
    losses = []
    for b, L in enumerate(labels):
        z = s * torch.einsum("dhw,cd->chw", emb[b], mu).mean(dim=(1, 2))  # [C]
        for lab in L.tolist():
            keep = [c for c in range(mu.shape[0]) if c == lab or c not in L.tolist()]
            zk = z[keep]
            losses.append(torch.logsumexp(zk, 0) - z[lab])
    return torch.stack(losses).mean()


def test_image_level_ce_full_matches_naive_and_excludes_other_labels():
    C, d = 15, 6
    emb = leaf(unit(3, d, 4, 4, seed=14, dim=1))
    w = leaf(torch.randn(C, d, dtype=torch.float64))
    labels = [torch.tensor([2, 7, 11]), torch.tensor([4]), torch.tensor([0, 14])]
    got = image_level_ce(emb, labels, F.normalize(w, dim=1), S)
    ref = naive_image_ce(emb, labels, F.normalize(w, dim=1), S)
    assert torch.allclose(got, ref, atol=1e-10)
    # treating the other labels as negatives would give a different value
    wrong = naive_image_ce(emb, [L[:1] for L in labels], F.normalize(w, dim=1), S)
    assert not torch.allclose(got, wrong)
    ga = torch.autograd.grad(got, [emb, w])
    gb = torch.autograd.grad(naive_image_ce(emb, labels, F.normalize(w, dim=1), S), [emb, w])
    for a, b in zip(ga, gb):
        assert torch.allclose(a, b, atol=1e-10)


def test_image_level_ce_sampled_equals_full_when_k_covers_all():
    C, d = 12, 5
    emb = unit(2, d, 3, 3, seed=15, dim=1)
    mu = unit(C, d, seed=16)
    labels = [torch.tensor([1, 5, 9]), torch.tensor([3])]
    full = image_level_ce(emb, labels, mu, S)
    assert torch.allclose(image_level_ce(emb, labels, mu, S, k=100), full, atol=1e-12)
    assert torch.allclose(image_level_ce(emb, labels, mu, S, k=11), full, atol=1e-12)


def test_image_level_ce_sampled_uses_nearest_outside_label_set():
    C, d, k = 40, 6, 3
    emb = unit(1, d, 2, 2, seed=17, dim=1)
    mu = unit(C, d, seed=18)
    L = torch.tensor([0, 1])
    got = image_level_ce(emb, [L], mu, S, k=k)
    pooled = emb[0].mean(dim=(1, 2))
    ranked = sorted(((float(pooled @ mu[c]), c) for c in range(C) if c not in (0, 1)), reverse=True)
    negs = [c for _, c in ranked[:k]]
    ref = 0.0
    for lab in (0, 1):
        z = S * torch.stack([pooled @ mu[c] for c in [lab] + negs])
        ref += float(torch.logsumexp(z, 0) - z[0]) / 2
    assert abs(got.item() - ref) < 1e-10


def test_image_level_ce_empty_labels_zero_with_grad():
    emb = leaf(unit(2, 4, 2, 2, seed=19, dim=1))
    out = image_level_ce(emb, [torch.tensor([], dtype=torch.long)] * 2, unit(5, 4, seed=20), S)
    out.backward()
    assert out.item() == 0.0 and emb.grad is not None


def test_logit_standardizer_matches_naive_over_all_classes():
    C, d = 50, 7
    x, mu = unit(9, d, seed=21), unit(C, d, seed=22)
    norm = LogitStandardizer().double()
    with torch.no_grad():
        norm.gamma.fill_(1.7)
        norm.beta.fill_(-0.3)
    rows = torch.randint(0, C, (9, 4), generator=torch.Generator().manual_seed(23))
    z_sel = S * torch.einsum("nd,nkd->nk", x, mu[rows])
    got = norm(x, z_sel, mu, S)
    z_all = S * x @ mu.T
    mean = z_all.mean(dim=1, keepdim=True)
    var = z_all.var(dim=1, unbiased=False, keepdim=True)
    ref = 1.7 * (z_all - mean) / torch.sqrt(var + 1e-5) - 0.3
    assert torch.allclose(got, ref.gather(1, rows), atol=1e-9)
    # and it plugs into the sampled CE: with every class it equals CE on standardised logits
    y = torch.randint(0, C, (9,), generator=torch.Generator().manual_seed(24))
    ce = knn_sampled_ce(x, y, mu, C, S, logit_norm=norm)
    assert torch.allclose(ce, F.cross_entropy(ref, y), atol=1e-9)


# ---- per-source rows through an index ----------------------------------------------------------
def test_restricting_to_a_sources_rows_keeps_gradients_on_those_rows_of_the_full_table():
    C, d = 20, 5
    rows = torch.tensor([3, 7, 8, 12, 15, 19])  # the source's global rows
    w = leaf(torch.randn(C, d, dtype=torch.float64))
    emb_raw = leaf(torch.randn(2, d, 3, 3, dtype=torch.float64))
    target = torch.randint(0, len(rows), (2, 3, 3), generator=torch.Generator().manual_seed(30))
    target[1, 0, 0] = -1
    labels = [torch.tensor([0, 4]), torch.tensor([2])]  # local ids

    def terms(k):
        mu = F.normalize(w, dim=1)[rows]
        x = F.normalize(emb_raw, dim=1)
        return knn_sampled_ce(x, target, mu, k, S), image_level_ce(x, labels, mu, S, k=k)

    def naive():
        mu = F.normalize(w, dim=1)[rows]
        x = F.normalize(emb_raw, dim=1)
        seg = F.cross_entropy(S * torch.einsum("bdhw,cd->bchw", x, mu), target, ignore_index=-1)
        return seg, naive_image_ce(x, labels, mu, S)

    for ours, ref in zip(terms(len(rows)), naive()):  # k covers every other row: exact
        assert torch.allclose(ours, ref, atol=1e-10)
        g1 = torch.autograd.grad(ours, [w, emb_raw], retain_graph=True)
        g2 = torch.autograd.grad(ref, [w, emb_raw], retain_graph=True)
        for a, b in zip(g1, g2):
            assert torch.allclose(a, b, atol=1e-10)
    outside = torch.ones(C, dtype=torch.bool)
    outside[rows] = False
    for term in terms(2):  # sampled negatives: still only the source's rows move
        (gw,) = torch.autograd.grad(term, [w], retain_graph=True)
        assert torch.all(gw[outside] == 0) and gw[rows].abs().sum() > 0


# ---- fp32 under bf16 autocast ------------------------------------------------------------------
def _f32(*shape, seed, dim=-1):
    return unit(*shape, seed=seed, dim=dim).float()


def _grads(fn, *leaves, autocast=False):
    """Forward (under bf16 autocast if asked), backward outside it, as a training step does."""
    leaves = [t.clone().requires_grad_(True) for t in leaves]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = fn(*leaves)
    return out.detach(), torch.autograd.grad(out, leaves)


@pytest.mark.parametrize("name", ["knn", "knn_grid", "image", "image_k"])
def test_losses_under_bf16_autocast_equal_the_fp32_path(name):
    C, d = 300, 32
    # one object per image plus pixel noise: pooled embeddings of norm ~1, logits up to ~40
    noise = torch.randn(2, d, 8, 8, generator=torch.Generator().manual_seed(40))
    emb = F.normalize(_f32(2, d, 1, 1, seed=44, dim=1) + 0.3 * noise, dim=1)
    mu = _f32(C, d, seed=41)
    target = torch.randint(0, C, (2, 8, 8), generator=torch.Generator().manual_seed(42))
    labels = [torch.tensor([1, 5]), torch.tensor([7])]
    grid = F.normalize(F.avg_pool2d(emb, 2), dim=1)
    fns = {
        "knn": lambda x, m: knn_sampled_ce(x, target, m, 8, S),
        "knn_grid": lambda x, m: knn_sampled_ce(x, target, m, 8, S, grid=grid),
        "image": lambda x, m: image_level_ce(x, labels, m, S),
        "image_k": lambda x, m: image_level_ce(x, labels, m, S, k=8),
    }
    fn = fns[name]
    ref, ref_g = _grads(fn, emb, mu)
    got, got_g = _grads(fn, emb, mu, autocast=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        # bf16 inputs (a bf16 forward's output) are computed in fp32 too
        got16 = fn(emb.bfloat16(), mu.bfloat16())
        # the same math without the fp32 guard computes something else
        if name.startswith("knn"):
            unguarded = knn_sampled_ce.__wrapped__(emb, target, mu, 8, S)
        else:
            pooled = emb.mean(dim=(2, 3))[[0, 0, 1]]
            excl = torch.tensor([[1, 5], [1, 5], [7, -1]])  # label sets, -1 padded
            tgt = torch.tensor([1, 5, 7])
            unguarded = pooled_ce.__wrapped__(pooled, tgt, excl, mu, S).mean()
    assert got.dtype == torch.float32 and torch.allclose(got, ref, rtol=1e-6, atol=1e-6)
    for a, b in zip(got_g, ref_g):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)
    assert torch.allclose(got16, fn(emb.bfloat16().float(), mu.bfloat16().float()), atol=1e-6)
    assert (unguarded.float() - ref).abs() > 1e-3


def test_margin_regularizer_under_bf16_autocast_equals_fp32():
    w = torch.randn(400, 8, generator=torch.Generator().manual_seed(43))
    ref, ref_g = _grads(lambda t: margin_regularizer(F.normalize(t, dim=1), 0.5), w)
    got, got_g = _grads(lambda t: margin_regularizer(F.normalize(t, dim=1), 0.5), w, autocast=True)
    assert ref > 0 and torch.allclose(got, ref, rtol=1e-6, atol=1e-7)
    assert torch.allclose(got_g[0], ref_g[0], rtol=1e-5, atol=1e-7)
