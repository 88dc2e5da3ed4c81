"""CA-Classifier against explicit rings of every pushed feature and naive attention pooling."""

import contextlib
import os
import socket
import tempfile
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from larvess import numerics
from larvess.ca_background import background_scores, standardised_mse, top_score_mean
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
        seq.push(s[None], c[None])
    # class 1 got pushes 0,1,3,4,5: slots after 5 writes into 3 places: [p3, p4, p5]? no:
    # write order pos 0,1,2,0,1 -> [p3(push idx 4), p4(idx 5), p2(idx 3)]
    assert torch.equal(seq.bank[1], slots[[4, 5, 3]])
    assert int(seq.ptr[1]) == 2 and int(seq.count[1]) == 5
    assert torch.equal(seq.bank[3, :2], slots[[2, 6]]) and int(seq.ptr[3]) == 2
    batched = CAClassifier(4, d, bank_size=M, topk=1)
    batched.push(slots, classes)
    for name in ("bank", "ptr", "count"):
        assert torch.equal(getattr(seq, name), getattr(batched, name))
    assert set(batched.state_dict()) == {"bank", "ptr", "count"}


def naive_loss(ca_before, emb, labels, mu, s):
    """Plain per-pair attention pooling + CE over classes outside L \\ {lab}; cold pairs 0."""
    classes = list(range(mu.shape[0]))
    return naive_loss_candidates(ca_before, emb, labels, mu, s, classes, None, None, None)


def test_loss_is_pure_matches_naive_with_warm_up_and_pending_equals_per_pair_enqueues():
    C, d, M = 8, 5, 2
    mu = unit(C, d, seed=1)
    ca = CAClassifier(C, d, bank_size=M, topk=3, warm_up=2)
    seq = CAClassifier(C, d, bank_size=M, topk=3, warm_up=2)  # one enqueue per pair, in order
    labels = [torch.tensor([1, 4]), torch.tensor([4, 6]), torch.tensor([1, 4, 6])]
    for step in range(4):
        emb = unit(3, d, 4, 4, seed=10 + step, dim=1).requires_grad_(True)
        before = {k: v.clone() for k, v in ca.state_dict().items()}
        got = ca.loss(emb, labels, mu, S)
        ref = naive_loss(seq, emb, labels, mu, S)
        assert torch.allclose(got, ref, atol=1e-5), step
        for k, v in ca.state_dict().items():  # the loss changed nothing
            assert torch.equal(v, before[k]), k
        # the state phase: what the batch pushes equals one enqueue per pair, in pair order
        ca.push(*ca.pending(emb, labels, mu))
        for b, L in enumerate(labels):
            for lab in L.tolist():
                seq.enqueue(
                    emb[b].detach(), torch.einsum("dhw,d->hw", emb[b].detach(), mu[lab]), lab
                )
        for name in ("bank", "ptr", "count"):
            assert torch.allclose(getattr(ca, name).double(), getattr(seq, name).double()), name
        # classes 1 and 6 are pushed twice per step, class 4 three times: warm (count >= 4)
        # from step 1 for 4, from step 2 for 1 and 6; nothing warm at step 0
        if step == 0:
            assert got.item() == 0.0
        if step >= 2:
            assert got.item() > 0.0
        got.backward()
        assert emb.grad is not None and torch.isfinite(emb.grad).all()
    assert ca.count.tolist() == [0, 8, 0, 0, 12, 0, 8, 0]


def naive_standardised_mse(fg, bg):
    """The reference's mse(): per column (x - mean) / unbiased std, mean squared difference."""
    P = len(fg)

    def z(v):
        m = sum(v) / P
        sd = (sum((t - m) ** 2 for t in v) / (P - 1)) ** 0.5
        return [(t - m) / sd for t in v]

    f, g = z(fg.tolist()), z(bg.tolist())
    return sum((a - b) ** 2 for a, b in zip(f, g)) / P


def naive_background(ca, x, lab, mu, candidates, threshold, mse_threshold):
    """Official LarvSeg selection written plainly: x [d,h,w]."""
    px, mu = x.reshape(x.shape[0], -1).T.detach(), mu.detach()  # [P,d]
    need = max(1, ca.warm_up * ca.bank_size)
    fg = ca.similarity(x, lab).reshape(-1)
    out = []
    for c in candidates:
        scores = sorted((float(px[p] @ mu[c]) for p in range(len(px))), reverse=True)
        top5 = sum(scores[:5]) / min(5, len(scores))
        if top5 <= threshold or c == lab or int(ca.count[c]) < need:
            continue
        if naive_standardised_mse(fg, ca.similarity(x, c).reshape(-1)) > mse_threshold:
            out.append(c)
    return out


def _bg_world():
    """A bank where the MSE filter matters: class 1's memory equals the label's (r = 1: dropped),
    class 2's is its opposite (r = -1: kept), 3..7 random, 8 and 9 cold."""
    C, d = 10, 6
    g = torch.Generator().manual_seed(7)
    mu = F.normalize(torch.randn(C, d, generator=g, dtype=torch.float64), dim=1)
    ca = CAClassifier(C, d, bank_size=1, topk=1).double()
    mem = F.normalize(torch.randn(C, d, generator=g, dtype=torch.float64), dim=1)
    mem[1], mem[2] = mem[0], -mem[0]
    for c in range(8):
        ca.push(mem[c][None], torch.tensor([c]))
    # pixels near a mix of classes: every class has some pixels with a high raw cosine
    x = F.normalize(
        mu[torch.arange(24) % C].T.reshape(d, 4, 6)
        + 0.3 * torch.randn(d, 4, 6, generator=g, dtype=torch.float64),
        dim=0,
    )
    return ca, mu, x


@pytest.mark.parametrize("mse_threshold", [1.0, 2.0])
def test_single_label_background_matches_the_official_rule(mse_threshold):
    ca, mu, x = _bg_world()
    cands = torch.tensor([0, 1, 2, 3, 4, 5, 6, 8, 9])  # row 7 is not this source's
    threshold = 0.35
    px = x.reshape(6, -1).T
    s_fg = ca.similarity(x, 0).reshape(1, -1)
    total, count = background_scores(
        px[None], [(0, 0, 1)], s_fg, torch.tensor([0]), mu[cands], ca.bank_mean(cands), ca.warm(cands),
        threshold, mse_threshold,
    )  # fmt: skip
    ref = naive_background(ca, x, 0, mu, cands.tolist(), threshold, mse_threshold)
    assert int(count[0]) == len(ref)
    ref_sum = sum(ca.similarity(x, c).reshape(-1) for c in ref)
    assert torch.allclose(total[0], ref_sum, atol=1e-12)
    # the world exercises each rule: above threshold but filtered (1: same memory as the label),
    # kept (2: opposite memory), cold (8, 9) and another source's class (7) never selected
    passed = [c for c in range(10) if c != 0 and _top5(x, mu, c) > threshold]
    assert {1, 2, 7, 8, 9} <= set(passed)
    assert 2 in ref and 1 not in ref and not {7, 8, 9} & set(ref)
    # in class chunks of one row: the same sums
    import larvess.ca_background as cab

    small = cab._SCORE_ELEMS
    try:
        cab._SCORE_ELEMS = 2 * px.shape[0]
        chunked = background_scores(
            px[None], [(0, 0, 1)], s_fg, torch.tensor([0]), mu[cands], ca.bank_mean(cands), ca.warm(cands),
            threshold, mse_threshold,
        )  # fmt: skip
    finally:
        cab._SCORE_ELEMS = small
    assert torch.allclose(chunked[0], total, atol=1e-12) and torch.equal(chunked[1], count)


def _top5(x, mu, c):
    s = (x.reshape(x.shape[0], -1).T @ mu[c]).sort(descending=True).values
    return float(s[:5].mean())


def test_standardised_mse_is_one_minus_correlation_and_drops_constant_maps():
    g = torch.Generator().manual_seed(8)
    fg = torch.randn(50, generator=g, dtype=torch.float64)
    bg = torch.randn(50, 4, generator=g, dtype=torch.float64)
    bg[:, 1] = 3 * fg + 1  # r = 1
    bg[:, 2] = 0.5  # constant: NaN, never above a threshold
    got = standardised_mse(fg, bg)
    for j in (0, 1, 3):
        r = torch.corrcoef(torch.stack([fg, bg[:, j]]))[0, 1]
        assert torch.allclose(got[j], 2 * 49 / 50 * (1 - r), atol=1e-12)
        assert abs(float(got[j]) - naive_standardised_mse(fg, bg[:, j])) < 1e-12
    assert got[1].abs() < 1e-12 and torch.isnan(got[2]) and not bool(got[2] > 0)


def test_top_score_mean_in_chunks_matches_full(monkeypatch):
    import larvess.ca_background as cab

    g = torch.Generator().manual_seed(9)
    x = F.normalize(torch.randn(3, 11, 5, generator=g, dtype=torch.float64), dim=-1)
    mu = F.normalize(torch.randn(40, 5, generator=g, dtype=torch.float64), dim=1)
    rows = torch.tensor([39, 2, 17, 5, 0, 33, 8])
    full = (x @ mu[rows].T).topk(5, dim=1).values.mean(dim=1)
    monkeypatch.setattr(cab, "_SCORE_ELEMS", 40)  # one class per chunk
    assert torch.allclose(top_score_mean(x, mu, rows), full, atol=1e-14)
    assert torch.allclose(top_score_mean(x[1], mu, rows), full[1], atol=1e-14)
    assert top_score_mean(x[:, :3], mu, None, topk=5).shape == (3, 40)  # P < 5: mean of all


def test_single_label_attention_uses_the_selected_background():
    ca, mu, x = _bg_world()
    bg = naive_background(ca, x, 0, mu, list(range(10)), 0.35, 1.0)
    A = ca.attention(x, 0, [], mu, bg_threshold=0.35, bg_mse_threshold=1.0)
    fg = ca.similarity(x, 0)
    s_bg = sum(ca.similarity(x, c) for c in bg) / len(bg)
    diff = fg - s_bg
    ref = torch.sigmoid((diff - diff.mean()) / (diff.std(correction=0) + 1e-5))
    assert len(bg) >= 2 and torch.allclose(A, ref, atol=1e-12)
    # a threshold nothing passes: no background, S_bg = 1 - S_fg
    A_none = ca.attention(x, 0, [], mu, bg_threshold=1.0)
    diff = 2 * fg - 1
    ref = torch.sigmoid((diff - diff.mean()) / (diff.std(correction=0) + 1e-5))
    assert torch.allclose(A_none, ref, atol=1e-12)


def test_multi_label_attention_uses_the_other_labels():
    C, d = 5, 4
    mu = torch.eye(d + 1)[:, :d]
    mu[4] = F.normalize(torch.ones(d), dim=0)
    ca = CAClassifier(C, d, bank_size=1, topk=1)
    for c in range(C):
        ca.push(mu[c][None], torch.tensor([c]))
    x = torch.zeros(d, 1, 4)
    x[0, 0, :2] = 1.0
    x[1, 0, 2:] = 1.0
    A = ca.attention(x, 0, [1], mu)
    fg, bg = ca.similarity(x, 0), ca.similarity(x, 1)
    diff = fg - bg
    ref = torch.sigmoid((diff - diff.mean()) / (diff.std(unbiased=False) + 1e-5))
    assert torch.allclose(A, ref, atol=1e-6) and A[0, 0] > 0.5 > A[0, 3]


def naive_loss_candidates(ca_before, emb, labels, mu, s, cands, k, threshold, mse_threshold):
    """Naive CA loss with a source's candidate rows: background and negatives among them;
    threshold None: a single-label image has no background (LarvSeg without suppression)."""
    need = max(1, ca_before.warm_up * ca_before.bank_size)
    total, n = torch.zeros((), dtype=emb.dtype), 0
    for b, L in enumerate(labels):
        for lab in L.tolist():
            n += 1
            if int(ca_before.count[lab]) < need:
                continue
            x = emb[b].detach()
            fg = ca_before.similarity(x, lab)
            if len(L) > 1 or threshold is None:
                bgs = [c for c in L.tolist() if c != lab and int(ca_before.count[c]) >= need]
            else:
                bgs = naive_background(ca_before, x, lab, mu, cands, threshold, mse_threshold)
            bg = sum(ca_before.similarity(x, c) for c in bgs) / len(bgs) if bgs else 1 - fg
            diff = fg - bg
            A = torch.sigmoid((diff - diff.mean()) / (diff.std(unbiased=False) + 1e-5))
            pooled = (emb[b] * A).mean(dim=(1, 2))
            others = [c for c in cands if c not in L.tolist()]
            if k is not None:
                others = sorted(others, key=lambda c: -float(pooled.detach() @ mu[c].detach()))[:k]
            z = s * torch.stack([pooled @ mu[c] for c in [lab] + others])
            total = total + torch.logsumexp(z, 0) - z[0]
    return total / n


@pytest.mark.parametrize("k", [None, 3])
def test_loss_with_source_candidates_and_k_matches_naive(k):
    C, d = 12, 5
    g = torch.Generator().manual_seed(11)
    w = torch.randn(C, d, generator=g, dtype=torch.float64).requires_grad_(True)
    cands = [0, 2, 3, 5, 6, 8, 9, 11]  # this source's rows
    ca = CAClassifier(C, d, bank_size=1, topk=2).double()
    for c in range(C):  # every class warm, other sources' too
        ca.push(
            F.normalize(torch.randn(1, d, generator=g, dtype=torch.float64), dim=1),
            torch.tensor([c]),
        )
    labels = [torch.tensor([2, 5]), torch.tensor([8]), torch.tensor([0])]
    emb = F.normalize(torch.randn(3, d, 4, 4, generator=g, dtype=torch.float64), dim=1)
    emb.requires_grad_(True)
    before = CAClassifier(C, d, bank_size=1, topk=2).double()
    before.load_state_dict(ca.state_dict())
    mu = F.normalize(w, dim=1)
    rows = torch.tensor(cands)
    local = torch.full((C + 1,), -1)
    local[rows] = torch.arange(len(rows))
    got = ca.loss(
        emb,
        [local[L] for L in labels],  # the source's label space
        mu[rows],
        S,
        k=k,
        bg_threshold=0.1,
        rows=rows,
        bg_mse_threshold=1.0,
    )
    ref = naive_loss_candidates(before, emb, labels, mu, S, cands, k, 0.1, 1.0)
    assert torch.allclose(got, ref, atol=1e-10)
    ga = torch.autograd.grad(got, [emb, w], retain_graph=True)
    gb = torch.autograd.grad(ref, [emb, w])
    for a, b in zip(ga, gb):
        assert torch.allclose(a, b, atol=1e-9)
    others = [c for c in range(C) if c not in cands]
    assert torch.all(ga[1][others] == 0)  # other sources' rows: never negatives


def test_ca_loss_under_bf16_autocast_equals_fp32(monkeypatch):
    C, d = 40, 16
    g = torch.Generator().manual_seed(12)
    mu = F.normalize(torch.randn(C, d, generator=g), dim=1)
    labels = [torch.tensor([3, 9]), torch.tensor([17]), torch.tensor([25])]
    base = F.normalize(torch.randn(3, d, 1, 1, generator=g), dim=1)
    embs = [F.normalize(base + 0.4 * torch.randn(3, d, 6, 6, generator=g), dim=1) for _ in range(3)]

    def run(autocast):
        ca = CAClassifier(C, d, bank_size=1, topk=3)
        outs = []
        for e in embs:
            e = e.clone().requires_grad_(True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                out = ca.loss(e, labels, mu, S, k=5)
                pending = ca.pending(e, labels, mu)
            outs.append((out.detach(), torch.autograd.grad(out, e)[0]))
            ca.push(*pending)
        return outs, ca.bank.clone()

    ref, bank_ref = run(False)
    got, bank_got = run(True)
    assert ref[-1][0] > 0  # warm by the last step
    for (a, ga), (b, gb) in zip(got, ref):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-6)
        assert torch.allclose(ga, gb, rtol=1e-5, atol=1e-7)
    assert torch.equal(bank_got, bank_ref)
    # the public enqueue / similarity too (bf16 inputs are computed on in fp32)
    e16 = embs[0][0].bfloat16()
    score = torch.einsum("dhw,d->hw", e16.float(), mu[3])
    a, b = CAClassifier(C, d, topk=3), CAClassifier(C, d, topk=3)
    a.enqueue(e16.float(), score, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        b.enqueue(e16, score, 3)
        sim16 = b.similarity(e16, 3)
    assert torch.equal(a.bank, b.bank) and sim16.dtype == torch.float32
    assert torch.allclose(sim16, a.similarity(e16.float(), 3), rtol=1e-6, atol=1e-7)
    # without the fp32 guard (in_fp32 made a no-op) the same steps give another loss
    monkeypatch.setattr(numerics, "fp32_math", lambda *a: contextlib.nullcontext())
    monkeypatch.setattr(numerics, "_fp32", lambda t: t)
    unguarded, _ = run(True)
    assert (unguarded[-1][0] - ref[-1][0]).abs() > 1e-4


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
            ca.push(*ca.pending(emb, labels, mu))
        # a batch without any label on rank 0 (an all-ignore weak crop) must still join the
        # all-gather of rank 1's pushes
        emb = F.normalize(torch.randn(2 + rank, 4, 3, 3, generator=g), dim=1)
        empty = [torch.zeros(0, dtype=torch.long)] * 2
        batch = empty if rank == 0 else labels
        ca.loss(emb, batch, mu, S)
        ca.push(*ca.pending(emb, batch, mu))
        ca.enqueue(torch.randn(4, 3, 3, generator=g), torch.randn(3, 3, generator=g), rank)
        torch.save(ca.state_dict(), os.path.join(out_dir, f"bank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
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
