"""Exact maximum-inner-product k-nearest-neighbour search (no gradient).

For unit vectors the largest inner product is the smallest L2 distance, so this is the search
ESS needs (eq. 6) for pixels against the class table, and for the table against itself (eq. 7).

Backends:
    "torch": blocked matmul + running top-k; peak extra memory is one block of
             ``_BLOCK_ELEMS`` scores whatever N and C are.
    "faiss": ``IndexFlatIP`` (exact); on GPU when the faiss build has GPU support and the
             tensors are on CUDA, on CPU otherwise.
    "auto":  the faster of the two for the device and size (see ``_pick_backend``).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["search", "available_backends"]

# One block of scores: 2**22 floats = 16 MiB in float32. Big enough that the matmul dominates
# the per-block overhead, small enough to be negligible next to the activations of a batch.
_BLOCK_ELEMS = 1 << 22

try:  # faiss is a project dependency, but keep the torch path usable without it
    import faiss  # type: ignore

    _HAS_FAISS = True
    _FAISS_GPU = hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
except ImportError:  # pragma: no cover - exercised only in environments without faiss
    faiss = None
    _HAS_FAISS = False
    _FAISS_GPU = False

_GPU_RES = None


def available_backends() -> list[str]:
    """Backends usable in this environment ("auto" always is)."""
    return ["torch"] + (["faiss"] if _HAS_FAISS else [])


def _search_torch(queries: Tensor, table: Tensor, k: int) -> Tensor:
    N, C = queries.shape[0], table.shape[0]
    out = torch.empty(N, k, dtype=torch.long, device=queries.device)
    # Class chunks bound the memory when C is huge; query chunks bound it when N is.
    c_chunk = min(C, max(k, _BLOCK_ELEMS // max(1, min(N, 4096))))
    q_chunk = max(1, _BLOCK_ELEMS // c_chunk)
    for q0 in range(0, N, q_chunk):
        q = queries[q0 : q0 + q_chunk]
        best_v = best_i = None
        for c0 in range(0, C, c_chunk):
            scores = q @ table[c0 : c0 + c_chunk].T
            v, i = scores.topk(min(k, scores.shape[1]), dim=1)
            i = i + c0
            if best_v is not None:
                # running merge: the k best of (k best so far) u (k best of this chunk)
                v, j = torch.cat([best_v, v], 1).topk(k, dim=1)
                i = torch.cat([best_i, i], 1).gather(1, j)
            best_v, best_i = v, i
        out[q0 : q0 + q_chunk] = best_i
    return out


def _search_faiss(queries: Tensor, table: Tensor, k: int) -> Tensor:
    global _GPU_RES
    if not _HAS_FAISS:
        raise RuntimeError("knn backend 'faiss' requested but faiss is not installed")
    q = queries.detach().to("cpu", torch.float32).contiguous().numpy()
    t = table.detach().to("cpu", torch.float32).contiguous().numpy()
    if _FAISS_GPU and queries.is_cuda:
        if _GPU_RES is None:
            _GPU_RES = faiss.StandardGpuResources()
        cfg = faiss.GpuIndexFlatConfig()
        cfg.device = queries.device.index or 0
        index = faiss.GpuIndexFlatIP(_GPU_RES, t.shape[1], cfg)
    else:
        index = faiss.IndexFlatIP(t.shape[1])
    index.add(t)
    _, idx = index.search(q, k)
    return torch.from_numpy(idx).to(queries.device)


# CPU crossover in the number of queries, measured with scripts/bench_knn.py and a finer N sweep
# on this 2-core CPU (OMP_NUM_THREADS=1, faiss 1.15 with 1 OpenMP thread, d=64, k=9): seconds
# torch / faiss at N=512: C=171 0.0010/0.0009, 1284 0.0026/0.0040, 21841 0.129/0.114,
# 100000 0.37/0.78; at N=2048: 0.0042/0.0025, 0.011/0.0078, 0.25/0.11, 1.37/0.38; at
# N=131072 faiss is 1.7x (C=171) to 4.4x (C=100000) faster. Below ~1-2K queries faiss's
# per-call overhead (index build, float32 copies) dominates; above it its blocked BLAS + heap
# selection beats matmul + topk.
_FAISS_MIN_QUERIES = 2048


def _pick_backend(n: int, c: int, device: torch.device) -> str:
    """ "auto": faiss on CPU for N >= _FAISS_MIN_QUERIES queries, torch otherwise. On CUDA the
    torch matmul path is used: a numpy-fed faiss index would add a host round trip."""
    if device.type != "cpu" or not _HAS_FAISS:
        return "torch"
    return "faiss" if n >= _FAISS_MIN_QUERIES else "torch"


def search(
    queries: Tensor,
    table: Tensor,
    k: int,
    backend: str = "auto",
    exclude: Tensor | None = None,
) -> Tensor:
    """Exact top-k rows of ``table`` by inner product with each query.

    Args:
        queries: [N,d].
        table: [C,d] (same device as queries).
        k: neighbours per query; k <= C, or k <= C-1 with ``exclude``.
        backend: "auto" | "torch" | "faiss".
        exclude: optional LongTensor [N], one row per query never returned. The search takes
            k+1 neighbours and drops that row, or the last one when it is not among them.

    Returns:
        LongTensor [N,k] of table rows, best first (order among exact ties unspecified).
    """
    if queries.dim() != 2 or table.dim() != 2 or queries.shape[1] != table.shape[1]:
        raise ValueError(
            f"knn.search needs queries [N,d] and table [C,d], got {tuple(queries.shape)} and "
            f"{tuple(table.shape)}"
        )
    N, C = queries.shape[0], table.shape[0]
    k_max = C - 1 if exclude is not None else C
    if not 1 <= k <= k_max:
        what = "C-1 (exclude given)" if exclude is not None else "C"
        raise ValueError(f"knn.search: k={k} must be in [1, {what}={k_max}]")
    if exclude is not None and tuple(exclude.shape) != (N,):
        raise ValueError(f"knn.search: exclude must be [N]={N}, got {tuple(exclude.shape)}")
    if backend == "auto":
        backend = _pick_backend(N, C, queries.device)
    kk = k + 1 if exclude is not None else k
    if N == 0:
        return torch.empty(0, k, dtype=torch.long, device=queries.device)
    with torch.no_grad():
        if backend == "torch":
            idx = _search_torch(queries.detach(), table.detach().to(queries.dtype), kk)
        elif backend == "faiss":
            idx = _search_faiss(queries, table, kk)
        else:
            raise ValueError(f"knn.search: unknown backend {backend!r} (auto, torch, faiss)")
        if exclude is None:
            return idx
        drop = idx == exclude.to(idx.device).view(-1, 1)
        # rows where the excluded class is not among the k+1: drop the last (the farthest)
        drop[:, -1] |= ~drop.any(dim=1)
        return idx[~drop].view(N, k)
