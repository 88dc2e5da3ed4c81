"""objective.py: per-source negatives and the per-source loss combination against the same
terms written out by hand; label subsampling; the margin search cache; logit norm; the CA pushes
handed back instead of made."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from larvess.ca_classifier import CAClassifier
from larvess.config import LossConfig, SourceConfig
from larvess.losses import LogitStandardizer, image_level_ce, margin_regularizer, nearest_rows
from larvess.objective import (
    compute_losses,
    local_index,
    make_sources,
    source_shares,
    subsample_labels,
)

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


def test_local_index_maps_rows_into_the_source_label_space():
    rows = torch.tensor([7, 2, 9])
    index = local_index(rows, 10)
    assert index[torch.tensor([[9, -1], [7, 2]])].tolist() == [[2, -1], [0, 1]]
    assert index[[0, 1, 3]].tolist() == [-1, -1, -1]  # rows outside the source


@pytest.mark.parametrize("stride", [1, 2, 3, 4])
@pytest.mark.parametrize("size", [(8, 8), (7, 10), (5, 3)])
def test_subsample_labels_takes_each_cells_centre_pixel(stride, size):
    H, W = size
    label = torch.randint(-1, 50, (2, H, W), generator=torch.Generator().manual_seed(stride))
    got = subsample_labels(label, stride)
    o = stride // 2
    rows = [i * stride + o for i in range(H) if i * stride + o < H]
    cols = [j * stride + o for j in range(W) if j * stride + o < W]
    assert got.shape == (2, len(rows), len(cols))
    assert len(rows) == -(-(H - o) // stride) and len(cols) == -(-(W - o) // stride)
    for b in range(2):
        for a, i in enumerate(rows):
            for c, j in enumerate(cols):
                assert got[b, a, c] == label[b, i, j]


@pytest.mark.parametrize("negatives", ["source", "all"])
@pytest.mark.parametrize("combine", ["batch_mean", "sum"])
def test_compute_losses_equals_the_terms_by_hand(negatives, combine):
    mu, xs, batches, sources, rows = setup()
    # k >= every source's class count - 1: the kNN-sampled CE is the full softmax over the
    # candidates, so the reference can be written without any search
    lo = LossConfig(k=40, cls_k=None, margin_weight=0.5, margin=1.5, negatives=negatives,
                    combine=combine)  # fmt: skip
    terms = compute_losses(xs, mu, batches, make_sources(sources, rows, 30, lo), lo).terms
    share = [0.75, 0.25] if combine == "batch_mean" else [1.0, 1.0]
    cand = rows if negatives == "source" else [torch.arange(30)] * 2
    # pixel CE: softmax over the source's rows only
    x = xs[0].permute(0, 2, 3, 1).reshape(-1, 6)
    y = batches[0]["label"].reshape(-1)
    keep = y >= 0
    local = local_index(cand[0], 30)[y[keep]]
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
    local_labels = [local_index(cand[1], 30)[L] for L in batches[1]["labels"]]
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
    srcs = make_sources(sources, rows, 30, lo)
    got = compute_losses(xs, mu, batches, srcs, lo, logit_norm=norm).terms["seg/coco"]
    x = xs[0].permute(0, 2, 3, 1).reshape(-1, 6)
    y = batches[0]["label"].reshape(-1)
    keep = y >= 0
    z = S * x[keep] @ mu[rows[0]].T
    z = (z - z.mean(dim=1, keepdim=True)) / torch.sqrt(z.var(dim=1, unbiased=False)[:, None] + 1e-5)
    want = F.cross_entropy(3.0 * z + 0.5, y[keep])  # COCO rows 0..9 are their own local ids
    assert torch.allclose(got, want, atol=1e-4)
    got.backward()
    assert norm.gamma.grad is not None and norm.gamma.grad.abs() > 0


@pytest.mark.parametrize("negatives", ["source", "all"])
def test_compute_losses_leaves_the_bank_alone_and_returns_its_pushes(negatives):
    mu, xs, batches, sources, rows = setup()
    sources[1].ca_weight = 0.5
    lo = LossConfig(k=40, cls_k=None, margin_weight=0.0, negatives=negatives)
    srcs = make_sources(sources, rows, 30, lo)
    ca = CAClassifier(30, 6, bank_size=1, topk=2)
    for c in range(30):  # every ring warm
        ca.push(unit(1, 6, seed=100 + c), torch.tensor([c]))
    before = {k: v.clone() for k, v in ca.state_dict().items()}
    out = compute_losses(xs, mu, batches, srcs, lo, ca=ca)
    for k, v in ca.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert out.terms["ca/in"] > 0
    # the pushes: one slot per (image, label) pair, in vocabulary rows
    slots, classes = out.pushes
    assert classes.tolist() == [12, 3, 20]
    local = [srcs[1].index[L] for L in batches[1]["labels"]]
    want = ca.pending(xs[1], local, mu[srcs[1].rows], rows=srcs[1].rows)
    assert torch.allclose(slots, want[0]) and torch.equal(classes, want[1])
    # and the CA term is the CA loss on the source's rows, weighted by share x ca_weight
    ref = ca.loss(xs[1], local, mu[srcs[1].rows], S, rows=srcs[1].rows)
    assert torch.allclose(out.terms["ca/in"], srcs[1].share * 0.5 * ref)
