"""CA-Classifier against explicit rings of every pushed feature and naive attention pooling."""

import os
import socket
import tempfile
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from larvess.ca_classifier import CAClassifier

S = 40.0


def unit(*shape, seed, dim=-1):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g), dim=dim)


def test_similarity_is_mean_cosine_to_every_feature_in_the_ring():
    d, M, K = 6, 3, 4
    ca = CAClassifier(5, d, bank_size=M, topk=K)
    ring = []  # explicit FIFO of the K features of each push
    for i in range(7):
        emb = torch.randn(d, 3, 3, generator=torch.Generator().manual_seed(i))  # not unit
        score = torch.randn(3, 3, generator=torch.Generator().manual_seed(100 + i))
        ca.enqueue(emb, score, 2)
        top = score.reshape(-1).argsort(descending=True)[:K]
        feats = [F.normalize(emb.reshape(d, -1)[:, j], dim=0) for j in top.tolist()]
        ring = (ring + [feats])[-M:]
        x = unit(d, 4, 5, seed=50 + i, dim=0)
        ref = torch.zeros(4, 5)
        stored = [f for push in ring for f in push]
        for p in range(4):
            for q in range(5):
                ref[p, q] = sum(F.cosine_similarity(x[:, p, q], f, dim=0) for f in stored)
        ref /= len(stored)
        assert torch.allclose(ca.similarity(x, 2), ref, atol=1e-5)
    assert int(ca.count[2]) == 7 and torch.all(ca.count[[0, 1, 3, 4]] == 0)


def test_fifo_replacement_order_and_batched_push_equals_sequential():
    d, M = 2, 3
    seq = CAClassifier(4, d, bank_size=M, topk=1)
    slots = torch.arange(1.0, 15.0).view(7, 2)
    classes = torch.tensor([1, 1, 3, 1, 1, 1, 3])
    for s, c in zip(slots, classes):
        seq._push(s[None], c[None])
    # class 1 got pushes 0,1,3,4,5: slots after 5 writes into 3 places: [p3, p4, p5]? no:
    # write order pos 0,1,2,0,1 -> [p3(push idx 4), p4(idx 5), p2(idx 3)]
    assert torch.equal(seq.bank[1], slots[[4, 5, 3]])
    assert int(seq.ptr[1]) == 2 and int(seq.count[1]) == 5
    assert torch.equal(seq.bank[3, :2], slots[[2, 6]]) and int(seq.ptr[3]) == 2
    batched = CAClassifier(4, d, bank_size=M, topk=1)
    batched._push(slots, classes)
    for name in ("bank", "ptr", "count"):
        assert torch.equal(getattr(seq, name), getattr(batched, name))
    assert set(batched.state_dict()) == {"bank", "ptr", "count"}


def naive_loss(ca_before, emb, labels, mu, s):
    """Plain per-pair attention pooling + CE over classes outside L \\ {lab}; cold pairs 0."""
    need = max(1, ca_before.warm_up * ca_before.bank_size)
    total, n = torch.zeros(()), 0
    for b, L in enumerate(labels):
        for lab in L.tolist():
            n += 1
            if int(ca_before.count[lab]) < need:
                continue
            x = emb[b].detach()
            fg = ca_before.similarity(x, lab)
            bgs = [c for c in L.tolist() if c != lab and int(ca_before.count[c]) >= need]
            bg = sum(ca_before.similarity(x, c) for c in bgs) / len(bgs) if bgs else 1 - fg
            diff = fg - bg
            A = torch.sigmoid((diff - diff.mean()) / (diff.std(unbiased=False) + 1e-5))
            pooled = (emb[b] * A).mean(dim=(1, 2))
            z = s * mu @ pooled
            keep = [c for c in range(mu.shape[0]) if c == lab or c not in L.tolist()]
            total = total + torch.logsumexp(z[keep], 0) - z[lab]
    return total / n


def test_loss_matches_naive_with_warm_up_and_enqueues_after_scoring():
    C, d, M = 8, 5, 2
    mu = unit(C, d, seed=1)
    ca = CAClassifier(C, d, bank_size=M, topk=3, warm_up=2)
    labels = [torch.tensor([1, 4]), torch.tensor([4, 6]), torch.tensor([1, 4, 6])]
    for step in range(4):
        emb = unit(3, d, 4, 4, seed=10 + step, dim=1).requires_grad_(True)
        before = CAClassifier(C, d, bank_size=M, topk=3, warm_up=2)
        before.load_state_dict(ca.state_dict())
        got = ca.loss(emb, labels, mu, S)
        ref = naive_loss(before, emb, labels, mu, S)
        assert torch.allclose(got, ref, atol=1e-5), step
        # classes 1 and 6 are pushed twice per step, class 4 three times: warm (count >= 4)
        # from step 1 for 4, from step 2 for 1 and 6; nothing warm at step 0
        if step == 0:
            assert got.item() == 0.0
        if step >= 2:
            assert got.item() > 0.0
        got.backward()
        assert emb.grad is not None and torch.isfinite(emb.grad).all()
    assert ca.count.tolist() == [0, 8, 0, 0, 12, 0, 8, 0]


def test_single_label_background_selection():
    C, d = 6, 4
    mu = torch.eye(d)[[0, 1, 2, 3, 0, 1]].float()  # rows 4, 5 duplicate rows 0, 1
    mu[4] = F.normalize(torch.tensor([1.0, 0, 0, 1]), dim=0)
    mu[5] = F.normalize(torch.tensor([0.0, 1, 1, 0]), dim=0)
    ca = CAClassifier(C, d, bank_size=1, topk=1, bg_threshold=0.2, bg_knn=3)
    # warm every class except 3
    for c in (0, 1, 2, 4, 5):
        ca._push(mu[c][None], torch.tensor([c]))
    # image: left half near class 0 (the label), right half near class 2; class 3 also
    # present in one column but cold; class 1 appears nowhere near
    x = torch.zeros(d, 2, 6)
    x[0, :, :3] = 1.0
    x[2, :, 3:5] = 1.0
    x[3, :, 5] = 1.0
    bg = ca._single_label_background(x.reshape(d, -1).T, 0, mu, S, ca.bg_threshold)
    # naive: probability under softmax over each pixel's 3 nearest rows, top-5 mean > 0.2
    z = S * x.reshape(d, -1).T @ mu.T
    expect = []
    for c in range(C):
        p = []
        for i in range(z.shape[0]):
            near = z[i].argsort(descending=True)[:3].tolist()
            p.append(torch.softmax(z[i, near], 0)[near.index(c)].item() if c in near else 0.0)
        top5 = sorted(p, reverse=True)[:5]
        if c != 0 and c != 3 and sum(top5) / 5 > 0.2:
            expect.append(c)
    assert sorted(bg.tolist()) == expect
    assert 2 in expect and 3 not in expect and 0 not in expect and 1 not in expect
    # the per-source threshold given to loss()/attention() is the one applied
    assert ca._single_label_background(x.reshape(d, -1).T, 0, mu, S, 1.0).numel() == 0
    A_default = ca.attention(x, 0, [], mu, S)
    A_strict = ca.attention(x, 0, [], mu, S, bg_threshold=1.0)  # no background: S_bg = 1 - S_fg
    fg = ca.similarity(x, 0)
    diff = 2 * fg - 1
    ref = torch.sigmoid((diff - diff.mean()) / (diff.std(correction=0) + 1e-5))
    assert torch.allclose(A_strict, ref, atol=1e-6) and not torch.allclose(A_default, A_strict)


def test_single_label_attention_uses_selected_background():
    C, d = 5, 4
    mu = torch.eye(d + 1)[:, :d]
    mu[4] = F.normalize(torch.ones(d), dim=0)
    ca = CAClassifier(C, d, bank_size=1, topk=1)
    for c in range(C):
        ca._push(mu[c][None], torch.tensor([c]))
    x = torch.zeros(d, 1, 4)
    x[0, 0, :2] = 1.0
    x[1, 0, 2:] = 1.0
    A = ca.attention(x, 0, [], mu, S)
    fg, bg = ca.similarity(x, 0), ca.similarity(x, 1)
    diff = fg - bg
    ref = torch.sigmoid((diff - diff.mean()) / (diff.std(unbiased=False) + 1e-5))
    assert torch.allclose(A, ref, atol=1e-6) and A[0, 0] > 0.5 > A[0, 3]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, port, out_dir):
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    # a mismatched collective fails after a minute instead of hanging the suite
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=60))
    try:
        ca = CAClassifier(6, 4, bank_size=3, topk=2, warm_up=1)
        mu = unit(6, 4, seed=0)
        g = torch.Generator().manual_seed(rank)
        for _step in range(3):
            emb = F.normalize(torch.randn(2 + rank, 4, 3, 3, generator=g), dim=1)
            labels = [torch.tensor([rank, 3]), torch.tensor([5])] + [torch.tensor([1])] * rank
            ca.loss(emb, labels, mu, S)
        # a batch without any label on rank 0 (an all-ignore weak crop) must still join the
        # all-gather of rank 1's pushes
        emb = F.normalize(torch.randn(2 + rank, 4, 3, 3, generator=g), dim=1)
        empty = [torch.zeros(0, dtype=torch.long)] * 2
        ca.loss(emb, empty if rank == 0 else labels, mu, S)
        ca.enqueue(torch.randn(4, 3, 3, generator=g), torch.randn(3, 3, generator=g), rank)
        torch.save(ca.state_dict(), os.path.join(out_dir, f"bank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")
def test_two_processes_end_with_identical_banks():
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(_free_port(), tmp), nprocs=2, join=True)
        a = torch.load(os.path.join(tmp, "bank0.pt"))
        b = torch.load(os.path.join(tmp, "bank1.pt"))
    for name in ("bank", "ptr", "count"):
        assert torch.equal(a[name], b[name]), name
    # both processes' pushes are in it: per step rank r pushes (r, 3, 5) and rank 1 also 1;
    # in the label-less step only rank 1 pushes (1, 3, 5, 1); then each enqueues its rank once
    assert a["count"].tolist() == [3 + 1, 3 + 3 + 2 + 1, 0, 3 * 2 + 1, 0, 3 * 2 + 1]
    assert a["bank"].abs().sum() > 0
