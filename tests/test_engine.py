"""engine.compute_losses: per-source negatives and the per-source loss combination, against
the same terms written out by hand; the margin search cache; Net's grouped forward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from larvess.build import param_groups
from larvess.config import LossConfig, OptimConfig, SourceConfig
from larvess.engine import Net, compute_losses, local_index, source_shares, to_local
from larvess.losses import LogitStandardizer, image_level_ce, margin_regularizer, nearest_rows
from larvess.model import ClassTable, Segmenter

S = 40.0


def unit(*shape, seed):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=1)


def setup():
    C, d = 30, 6
    mu = unit(C, d, seed=0).requires_grad_()
    x_mask = unit(2, d, 4, 4, seed=1)
    x_img = unit(2, d, 4, 4, seed=2)
    mask_rows = torch.arange(0, 10)  # a COCO-like source: rows 0..9
    img_rows = torch.tensor([3, 4] + list(range(10, 30)))  # ImageNet-like: 2 shared rows + 20
    label = torch.randint(0, 10, (2, 4, 4), generator=torch.Generator().manual_seed(3))
    label[0, 0, :2] = -1
    batches = [{"label": label}, {"labels": [torch.tensor([12]), torch.tensor([3, 20])]}]
    sources = [
        SourceConfig(name="coco", kind="coco_stuff", root="-", batch_size=6),
        SourceConfig(name="in", kind="imagenet_wds", root="-", batch_size=2, cls_weight=0.5,
                     ca_weight=0.0),
    ]  # fmt: skip
    return mu, [x_mask, x_img], batches, sources, [mask_rows, img_rows]


def test_source_shares():
    _, _, _, sources, _ = setup()
    assert source_shares(sources, "batch_mean") == [0.75, 0.25]
    assert source_shares(sources, "sum") == [1.0, 1.0]


def test_to_local_maps_rows_into_the_source_label_space():
    rows = torch.tensor([7, 2, 9])
    index = local_index(rows, 10)
    assert to_local(index, torch.tensor([[9, -1], [7, 2]])).tolist() == [[2, -1], [0, 1]]


@pytest.mark.parametrize("negatives", ["source", "all"])
@pytest.mark.parametrize("combine", ["batch_mean", "sum"])
def test_compute_losses_equals_the_terms_by_hand(negatives, combine):
    mu, xs, batches, sources, rows = setup()
    # k >= every source's class count - 1: the kNN-sampled CE is the full softmax over the
    # candidates, so the reference can be written without any search
    lo = LossConfig(k=40, cls_k=None, margin_weight=0.5, margin=1.5, negatives=negatives,
                    combine=combine)  # fmt: skip
    terms = compute_losses(xs, mu, batches, sources, rows, None, lo)
    share = [0.75, 0.25] if combine == "batch_mean" else [1.0, 1.0]
    cand = rows if negatives == "source" else [torch.arange(30)] * 2
    # pixel CE: softmax over the source's rows only
    x = xs[0].permute(0, 2, 3, 1).reshape(-1, 6)
    y = batches[0]["label"].reshape(-1)
    keep = y >= 0
    local = to_local(local_index(cand[0], 30), y[keep])
    seg = F.cross_entropy(S * x[keep] @ mu[cand[0]].T, local)
    # image-level CE: pooled embedding against the source's rows, other labels excluded
    want_cls = 0.0
    pairs = [(0, 12, []), (1, 3, [20]), (1, 20, [3])]
    pooled = xs[1].mean(dim=(2, 3))
    for b, t, other in pairs:
        allowed = [r for r in cand[1].tolist() if r not in other]
        z = S * pooled[b] @ mu[allowed].T
        want_cls = want_cls - F.log_softmax(z, dim=0)[allowed.index(t)]
    want_cls = want_cls / len(pairs)
    want = share[0] * seg + share[1] * 0.5 * want_cls + 0.5 * margin_regularizer(mu, 1.5)
    assert torch.allclose(terms["total"], want, atol=1e-5)
    assert torch.allclose(terms["seg/coco"], share[0] * seg, atol=1e-5)
    # gradients: with source negatives, no COCO pixel pushes an ImageNet-only row
    mu.grad = None
    terms["seg/coco"].backward()
    touched = mu.grad.abs().sum(dim=1) > 0
    assert touched[:10].any()
    assert touched[10:].any() == (negatives == "all")
    # image_level_ce itself agrees on local labels
    local_labels = [to_local(local_index(cand[1], 30), L) for L in batches[1]["labels"]]
    got = image_level_ce(xs[1], local_labels, mu[cand[1]], S)
    assert torch.allclose(got, want_cls, atol=1e-5)


def test_margin_with_cached_neighbours_equals_a_fresh_search():
    mu = unit(50, 4, seed=5).requires_grad_()
    fresh = margin_regularizer(mu, 0.8)
    cached = margin_regularizer(mu, 0.8, nearest=nearest_rows(mu))
    assert torch.allclose(fresh, cached) and fresh > 0
    # a stale neighbour list still scores the current rows' distances
    stale = torch.roll(nearest_rows(mu), 1)
    naive = F.relu(0.8 - (mu - mu[stale]).norm(dim=1)).mean()
    assert torch.allclose(margin_regularizer(mu, 0.8, nearest=stale), naive)


def test_logit_norm_standardises_the_pixel_logits_over_the_source_rows():
    """LarvSeg's _mask_norm: each pixel's logits over its source's classes standardised
    (population variance), then gamma * z + beta; the CE follows, written out by hand here."""
    mu, xs, batches, sources, rows = setup()
    norm = LogitStandardizer()
    with torch.no_grad():
        norm.gamma.fill_(3.0)
        norm.beta.fill_(0.5)
    lo = LossConfig(k=40, cls_k=None, margin_weight=0.0, negatives="source", combine="sum")
    got = compute_losses(xs, mu, batches, sources, rows, None, lo, logit_norm=norm)["seg/coco"]
    x = xs[0].permute(0, 2, 3, 1).reshape(-1, 6)
    y = batches[0]["label"].reshape(-1)
    keep = y >= 0
    z = S * x[keep] @ mu[rows[0]].T
    z = (z - z.mean(dim=1, keepdim=True)) / torch.sqrt(z.var(dim=1, unbiased=False)[:, None] + 1e-5)
    want = F.cross_entropy(3.0 * z + 0.5, y[keep])  # COCO rows 0..9 are their own local ids
    assert torch.allclose(got, want, atol=1e-4)
    got.backward()
    assert norm.gamma.grad is not None and norm.gamma.grad.abs() > 0


def test_logit_norm_parameters_are_trained_without_decay():
    seg = Segmenter("vit_tiny_patch16_224", dim=8, img_size=32,
                    backbone_kwargs=dict(depth=1, embed_dim=48, num_heads=3))  # fmt: skip
    norm = LogitStandardizer()
    groups = param_groups(seg, ClassTable(5, 8), OptimConfig(weight_decay=0.05), norm)
    (group,) = [g for g in groups if g["name"] == "logit_norm"]
    assert group["weight_decay"] == 0.0 and len(group["params"]) == 2
    assert all(
        g["name"] != "logit_norm" for g in param_groups(seg, ClassTable(5, 8), OptimConfig())
    )


@pytest.mark.parametrize("stem", ["patch", "conv"])
def test_net_groups_sources_of_one_size_into_one_forward_with_the_same_result(stem):
    torch.manual_seed(0)
    seg = Segmenter("vit_tiny_patch16_224", dim=8, img_size=64, stem=stem,
                    backbone_kwargs=dict(depth=2, embed_dim=32, num_heads=2))  # fmt: skip
    net = Net(seg, ClassTable(5, 8)).eval()  # eval: BatchNorm uses its running statistics
    g = torch.Generator().manual_seed(1)
    sizes = [(3, 64), (2, 32), (2, 64), (1, 32)]  # two crop sizes, interleaved
    images = [torch.randn(b, 3, s, s, generator=g, requires_grad=True) for b, s in sizes]
    calls = []
    seg.register_forward_hook(lambda m, inp, out: calls.append(inp[0].shape[0]))
    xs, mu = net(images)
    assert sorted(calls) == [3, 5]  # one backbone call per crop size
    assert [tuple(x.shape) for x in xs] == [(b, 8, s // 16, s // 16) for b, s in sizes]
    weights = [torch.randn(x.shape, generator=g) for x in xs]
    sum((w * x).sum() for w, x in zip(weights, xs)).backward()
    grads = [im.grad.clone() for im in images]
    for im, x, w, gr in zip(images, xs, weights, grads):
        im.grad = None
        ref = seg(im)
        torch.testing.assert_close(x, ref, atol=1e-5, rtol=1e-4)
        (w * ref).sum().backward()
        torch.testing.assert_close(gr, im.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(mu, net.table())
