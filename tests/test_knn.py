"""knn.search against a plain brute-force reference."""

import pytest
import torch
import torch.nn.functional as F

from larvess import knn, numerics


def brute_force(queries, table, k, exclude=None):
    out = []
    for i in range(queries.shape[0]):
        scores = [(float(queries[i] @ table[c]), c) for c in range(table.shape[0])]
        if exclude is not None:
            scores = [sc for sc in scores if sc[1] != int(exclude[i])]
        scores.sort(key=lambda t: -t[0])
        out.append([c for _, c in scores[:k]])
    return out


def unit(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)


BACKENDS = ["auto", *knn.available_backends()]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n,c,k", [(50, 7, 3), (40, 300, 5), (3, 5, 5)])
def test_search_matches_brute_force(backend, n, c, k):
    q, t = unit(n, 8, 0), unit(c, 8, 1)
    got = knn.search(q, t, k, backend=backend)
    assert got.shape == (n, k) and got.dtype == torch.long
    ref = brute_force(q, t, k)
    for i in range(n):
        assert set(got[i].tolist()) == set(ref[i])


@pytest.mark.parametrize("backend", BACKENDS)
def test_exclude_drops_own_row_or_last(backend):
    q, t = unit(60, 8, 2), unit(20, 8, 3)
    ex = torch.randint(0, 20, (60,), generator=torch.Generator().manual_seed(4))
    # make the excluded row the best match for half of the queries
    q[:30] = t[ex[:30]]
    got = knn.search(q, t, 4, backend=backend, exclude=ex)
    ref = brute_force(q, t, 4, exclude=ex)
    for i in range(60):
        assert int(ex[i]) not in got[i].tolist()
        assert set(got[i].tolist()) == set(ref[i])


def test_torch_backend_chunks_classes_and_queries(monkeypatch):
    # tiny blocks force many class chunks and query chunks through the running merge
    monkeypatch.setattr(knn, "_BLOCK_ELEMS", 64)
    q, t = unit(37, 6, 5), unit(203, 6, 6)
    got = knn.search(q, t, 7, backend="torch")
    ref = brute_force(q, t, 7)
    for i in range(37):
        assert set(got[i].tolist()) == set(ref[i])


def test_self_search_with_exclude_finds_nearest_other_row():
    t = unit(30, 5, 7)
    got = knn.search(t, t, 1, backend="torch", exclude=torch.arange(30))[:, 0]
    for c in range(30):
        others = [j for j in range(30) if j != c]
        best = max(others, key=lambda j: float(t[c] @ t[j]))
        assert int(got[c]) == best


def test_bad_k_is_a_clear_error():
    q, t = unit(4, 5, 8), unit(6, 5, 9)
    with pytest.raises(ValueError, match="k=7"):
        knn.search(q, t, 7)
    with pytest.raises(ValueError, match="C-1"):
        knn.search(q, t, 6, exclude=torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="unknown backend"):
        knn.search(q, t, 2, backend="annoy")


# ---- chunk sizes from the device -------------------------------------------------------------
def test_search_plan_issues_a_handful_of_blocks_on_a_gpu(monkeypatch):
    # c171_i21k: ~2M labelled pixels against 21,841 rows, k+1 = 9
    N, C, k = 2_000_000, 21_841, 9

    def n_blocks(block):
        q, c = knn._search_plan(N, C, k, block)
        assert q * c <= max(block, k * q)  # one block of scores stays within the budget
        return -(-N // q) * -(-C // c)

    assert n_blocks(knn._BLOCK_ELEMS) > 10_000  # the CPU constant: ~11K matmul + topk calls
    monkeypatch.setattr(numerics, "free_bytes", lambda device: 60 << 30)  # an H100, 60 GiB free
    gpu_block = numerics.block_elems(torch.device("cuda"), knn._BLOCK_ELEMS, elem_bytes=4)
    assert n_blocks(gpu_block) <= 32


def test_torch_search_takes_its_block_from_the_device(monkeypatch):
    # pretend the CPU were a device with 4000 free bytes: block = 0.25 * 4000 / 8 (float64)
    monkeypatch.setattr(numerics, "free_bytes", lambda device: 4000)
    monkeypatch.setattr(knn, "_BLOCK_ELEMS", 16)
    seen = []
    plan = knn._search_plan
    monkeypatch.setattr(knn, "_search_plan", lambda *a: seen.append(a[-1]) or plan(*a))
    q, t = unit(29, 6, 10), unit(150, 6, 11)
    got = knn.search(q, t, 5, backend="torch")
    assert seen == [125]
    ref = brute_force(q, t, 5)
    for i in range(29):
        assert set(got[i].tolist()) == set(ref[i])


# ---- faiss: resident index, GPU fallback ---------------------------------------------------
@pytest.mark.skipif("faiss" not in knn.available_backends(), reason="faiss not installed")
def test_faiss_index_stays_resident_and_is_refilled_each_call():
    q = unit(40, 7, 12)
    t1, t2 = unit(30, 7, 13), unit(45, 7, 14)
    a = knn.search(q, t1, 3, backend="faiss")
    index = knn._INDEXES[("cpu", 7)]
    b = knn.search(q, t2, 3, backend="faiss")  # a new table: no stale rows of t1
    assert knn._INDEXES[("cpu", 7)] is index and index.ntotal == 45
    for got, t in ((a, t1), (b, t2)):
        ref = brute_force(q, t, 3)
        for i in range(40):
            assert set(got[i].tolist()) == set(ref[i])


def test_faiss_on_cuda_without_gpu_faiss_falls_back_to_torch(monkeypatch):
    gpu = torch.device("cuda", 0)
    monkeypatch.setattr(knn, "_HAS_FAISS", True)
    monkeypatch.setattr(knn, "_FAISS_GPU", False)
    monkeypatch.setattr(knn, "_WARNED", set())
    with pytest.warns(RuntimeWarning, match="no GPU support"):
        assert knn._resolve_backend("faiss", 10, 10, gpu) == "torch"
    monkeypatch.setattr(knn, "_FAISS_GPU", True)
    assert knn._resolve_backend("faiss", 10, 10, gpu) == "faiss"
    assert knn._resolve_backend("auto", 10**6, 10, gpu) == "torch"
    assert knn._resolve_backend("faiss", 10, 10, torch.device("cpu")) == "faiss"


# ---- fp32 under autocast -----------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_search_under_bf16_autocast_equals_fp32(backend):
    q = unit(1500, 64, 15).float()
    t = unit(1000, 64, 16).float()
    ref = knn.search(q, t, 9, backend=backend)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        raw = (q @ t.T).topk(9, dim=1).indices  # what an unprotected search would compute
        got = knn.search(q, t, 9, backend=backend)
        got_bf16_in = knn.search(q.bfloat16(), t, 9, backend=backend)
    changed = sum(set(a) != set(b) for a, b in zip(raw.tolist(), ref.tolist()))
    assert changed > 0.03 * len(q)  # bf16 scores change many neighbour sets (~10% here)
    assert torch.equal(got, ref)
    # a bf16 input is searched in fp32 (not in bf16): same as searching its fp32 copy
    assert torch.equal(got_bf16_in, knn.search(q.bfloat16().float(), t, 9, backend=backend))
