"""tree_labels.py and the tree's rules in the losses (loss.hierarchy=tree), each against a naive
implementation with plain sets, on a small tree with residual classes (COCO food-other holds
pizza, furniture-other holds chair) and merged rows (COCO chair + ADE chair + the chair synset).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_vocab import SOURCES, _tree_vocab

from larvess.ca_classifier import CAClassifier
from larvess.config import LossConfig, SourceConfig
from larvess.losses import image_level_ce, knn_sampled_ce, label_pairs, pooled_ce
from larvess.objective import compute_losses, local_index, make_sources, prepare_batch
from larvess.tree_labels import pixel_barred, rows_with_covering, source_tree, tree_pairs

S = 40.0


def world():
    v, h = _tree_vocab()
    t = v.tree(h)
    return v, t, t.covering.to_sets(), t.related.to_sets()


def row(v, source: str, name: str) -> int:
    """The vocabulary row of a class of the test-tree world's source (SOURCES in test_vocab)."""
    names = [c[0][0] for src, classes, _ in SOURCES if src == source for c in classes]
    return int(v.rows_of(source)[names.index(name)])


def unit(*shape, seed, dim=-1):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=dim)


def test_labels_expand_to_the_covering_rows_and_carry_their_related_rows():
    v, t, cov, rel = world()
    rows = rows_with_covering(t, v.rows_of("in"))
    assert rows[: len(v.rows_of("in"))].tolist() == v.rows_of("in").tolist()
    # every row covering an ImageNet row is a row of the source now (COCO food-other and dog)
    assert set().union(*(cov[r] for r in v.rows_of("in").tolist())) <= set(rows.tolist())
    st = source_tree(t, rows)
    index = local_index(rows, len(v))
    g = torch.Generator().manual_seed(0)
    labels = [rows[torch.randperm(len(rows), generator=g)[:n]] for n in (1, 2, 1, 3)]
    pairs = tree_pairs([index[L] for L in labels], st)
    # naive: each image's labels, then every row covering one of them (within the source)
    k = 0
    got_rel = {}
    for p, q in zip(*pairs.related):
        got_rel.setdefault(int(p), set()).add(int(rows[q]))
    for b, L in enumerate(labels):
        want = set(L.tolist()).union(*(cov[x] for x in L.tolist())) & set(rows.tolist())
        n = pairs.counts[b]
        got = set(rows[pairs.label_set[b, :n]].tolist())
        assert got == want and n == len(want), b
        for _ in range(n):
            target = int(rows[pairs.target[k]])
            assert got_rel.get(k, set()) == rel[target] & set(rows.tolist())
            # single-label rule exactly when every other label overlaps the target
            assert pairs.single[k] == (not (want - rel[target] - {target}))
            k += 1
    assert k == pairs.num
    # an ImageNet golden retriever image is also a dog, retriever and animal image
    golden = row(v, "in", "golden")
    (exp,) = [rows[pairs.label_set[0, : pairs.counts[0]]].tolist()]
    one = tree_pairs([index[torch.tensor([golden])]], st)
    names = {v.entries[int(rows[x])].name for x in one.label_set[0].tolist()}
    assert {"golden", "retriever", "dog", "animal"} <= names, names
    assert exp  # (the random images above had labels)


def naive_pooled(pooled, target, label_set, related, mu, s, k):
    out = []
    for i in range(len(target)):
        t = int(target[i])
        allowed = [
            c for c in range(len(mu)) if c != t and c not in label_set[i] and c not in related[i]
        ]
        if k is not None:
            allowed = sorted(allowed, key=lambda c: -float(pooled[i] @ mu[c]))[:k]
        z = s * torch.stack([pooled[i] @ mu[c] for c in [t] + allowed])
        out.append(torch.logsumexp(z, 0) - z[0])
    return torch.stack(out)


@pytest.mark.parametrize("k", [None, 2, 50])
def test_pooled_ce_bars_the_related_rows(k):
    C, d = 12, 5
    mu, pooled = unit(C, d, seed=1), unit(4, d, seed=2)
    target = torch.tensor([3, 0, 7, 7])
    sets = [{3, 5}, {0}, {7, 1}, {7, 1}]
    related = [{4, 9, 10}, set(), {2}, set(range(C)) - {7}]  # the last: nothing left
    excluded = torch.tensor([[3, 5], [0, -1], [7, 1], [7, 1]])
    mask = torch.zeros(4, C, dtype=torch.bool)
    for i, r in enumerate(related):
        mask[i, list(r)] = True
    got = pooled_ce(pooled, target, excluded, mu, S, k=k, related=mask)
    ref = naive_pooled(pooled, target, sets, related, mu, S, k)
    assert torch.allclose(got, ref, atol=1e-10) and got[3] == 0


def test_pixel_ce_bars_the_related_rows_of_each_target():
    v, t, cov, rel = world()
    rows = torch.arange(len(v))  # negatives from every row (loss.negatives=all)
    st = source_tree(t, rows)
    own = v.rows_of("coco")
    group, mask = pixel_barred(st, own)
    d = 6
    mu, x = unit(len(v), d, seed=3), unit(40, d, seed=4)
    g = torch.Generator().manual_seed(5)
    y = own[torch.randint(len(own), (40,), generator=g)]
    y[::7] = -1
    for k in (3, len(v)):
        got = knn_sampled_ce(x, y, mu, k, S, barred=(group, mask))
        total, n = 0.0, 0
        for i in range(40):
            if y[i] < 0:
                continue
            tgt = int(y[i])
            allowed = [c for c in range(len(v)) if c != tgt and c not in rel[tgt]]
            allowed = sorted(allowed, key=lambda c: -float(x[i] @ mu[c]))[: min(k, len(v) - 1)]
            z = S * torch.stack([x[i] @ mu[c] for c in [tgt] + allowed])
            total += float(torch.logsumexp(z, 0) - z[0])
            n += 1
        assert abs(float(got) - total / n) < 1e-9, k
    # COCO's own classes are never each other's related rows: food-other still pushes pizza
    food, pizza = row(v, "coco", "food-other"), row(v, "coco", "pizza")
    assert not mask[int(group[food]), pizza] and mask[int(group[food]), food]


def naive_ca(before, emb, labels_sets, related, mu, s, k, thr, mse_thr):
    """CA under the tree written plainly: background = the other labels unrelated to the target
    (warm), or else the single-label rule among the rows unrelated to it."""
    from test_ca_classifier import naive_standardised_mse

    need = max(1, before.warm_up * before.bank_size)
    total, n = torch.zeros((), dtype=emb.dtype), 0
    for b, L in enumerate(labels_sets):
        for lab in L:
            n += 1
            if int(before.count[lab]) < need:
                continue
            x = emb[b].detach()
            fg = before.similarity(x, lab)
            others = [c for c in L if c != lab and c not in related[lab]]
            if others:
                bgs = [c for c in others if int(before.count[c]) >= need]
            else:
                px = x.reshape(x.shape[0], -1).T
                bgs = []
                for c in range(len(mu)):
                    if c == lab or c in related[lab] or int(before.count[c]) < need:
                        continue
                    top = (px @ mu[c].detach()).sort(descending=True).values[:5].mean()
                    if top <= thr:
                        continue
                    f, bg = fg.reshape(-1), before.similarity(x, c).reshape(-1)
                    if naive_standardised_mse(f, bg) > mse_thr:
                        bgs.append(c)
            bg = sum(before.similarity(x, c) for c in bgs) / len(bgs) if bgs else 1 - fg
            diff = fg - bg
            A = torch.sigmoid((diff - diff.mean()) / (diff.std(unbiased=False) + 1e-5))
            pooled = (emb[b] * A).mean(dim=(1, 2))
            allowed = [c for c in range(len(mu)) if c not in L and c not in related[lab]]
            if k is not None:
                allowed = sorted(allowed, key=lambda c: -float(pooled.detach() @ mu[c].detach()))[
                    :k
                ]
            z = s * torch.stack([pooled @ mu[c] for c in [lab] + allowed])
            total = total + torch.logsumexp(z, 0) - z[0]
    return total / n


@pytest.mark.parametrize("k", [None, 3])
def test_ca_loss_under_the_tree_matches_naive(k):
    v, t, cov, rel = world()
    C, d = len(v), 5
    rows = torch.arange(C)
    st = source_tree(t, rows)
    ca = CAClassifier(C, d, bank_size=1, topk=2).double()
    for c in range(C):
        ca.push(unit(1, d, seed=100 + c), torch.tensor([c]))
    golden, chair = row(v, "in", "golden"), row(v, "coco", "chair")
    pizza, sofa = row(v, "coco", "pizza"), row(v, "in", "sofa")
    labels = [torch.tensor([golden]), torch.tensor([chair, pizza]), torch.tensor([sofa])]
    pairs = tree_pairs(labels, st)
    sets = [pairs.label_set[b, : pairs.counts[b]].tolist() for b in range(3)]
    assert len(sets[0]) >= 4  # golden + its covering rows: multi-label, yet single-label rule
    w = unit(C, d, seed=7).clone().requires_grad_(True)
    mu = F.normalize(w, dim=1)
    emb = unit(3, d, 4, 4, seed=8, dim=1).clone().requires_grad_(True)
    got = ca.loss(emb, pairs, mu, S, k=k, bg_threshold=0.1, bg_mse_threshold=1.0)
    ref = naive_ca(ca, emb, sets, rel, mu, S, k, 0.1, 1.0)
    assert torch.allclose(got, ref, atol=1e-10)
    ga = torch.autograd.grad(got, [emb, w], retain_graph=True)
    gb = torch.autograd.grad(ref, [emb, w])
    for a, b in zip(ga, gb):
        assert torch.allclose(a, b, atol=1e-9)


def test_a_breed_image_teaches_the_dog_row_under_the_tree_and_pushes_it_away_when_flat():
    v, t, cov, rel = world()
    C, d = len(v), 6
    cfgs = [
        SourceConfig(name="coco", kind="coco_stuff", root="-", batch_size=2),
        SourceConfig(name="in", kind="imagenet_wds", root="-", batch_size=2, cls_weight=1.0,
                     ca_weight=0.0),
    ]  # fmt: skip
    golden, dog = row(v, "in", "golden"), row(v, "coco", "dog")
    batches = [
        {"label": v.rows_of("coco")[torch.zeros(2, 4, 4, dtype=torch.long)]},
        {"labels": [torch.tensor([golden]), torch.tensor([golden])]},
    ]
    xs = [unit(2, d, 4, 4, seed=11, dim=1), unit(2, d, 4, 4, seed=12, dim=1)]
    grads = {}
    for mode in ("flat", "tree"):
        lo = LossConfig(k=50, cls_k=None, margin_weight=0.0, hierarchy=mode)
        srcs = make_sources(cfgs, [v.rows_of("coco"), v.rows_of("in")], C, lo, tree=t)
        ready = [prepare_batch(s, b) for s, b in zip(srcs, batches)]
        mu = unit(C, d, seed=13).clone().requires_grad_(True)
        out = compute_losses(xs, mu, ready, srcs, lo)
        (grads[mode],) = torch.autograd.grad(out.terms["cls/in"], [mu])
        if mode == "tree":  # the cls term is the image-level CE over the expanded pairs
            src = srcs[1]
            pairs = ready[1]["pairs"]
            want = image_level_ce(xs[1], pairs, mu[src.rows], S)
            assert torch.allclose(out.terms["cls/in"], src.share * want)
    # flat: the dog row is a negative of the breed images (its gradient raises its score:
    # descending moves it away); tree: a target, moved toward the pooled embedding
    pooled = xs[1].mean(dim=(2, 3)).mean(dim=0)
    assert float(grads["flat"][dog] @ pooled) > 0 > float(grads["tree"][dog] @ pooled)
    # and flat pairs equal plain label_pairs: prepare_batch keeps today's behaviour
    lo = LossConfig(k=50, cls_k=None, margin_weight=0.0)
    srcs = make_sources(cfgs, [v.rows_of("coco"), v.rows_of("in")], C, lo)
    p = prepare_batch(srcs[1], batches[1])["pairs"]
    ref = label_pairs(batches[1]["labels"]).to_local(srcs[1].index)
    assert torch.equal(p.target, ref.target) and p.related is None
