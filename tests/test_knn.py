"""knn.search against a plain brute-force reference."""

import pytest
import torch
import torch.nn.functional as F

from larvess import knn


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
