"""Exact maximum-inner-product k-nearest-neighbour search (no gradient), and the rules every
caller of it shares: how many negatives a target gets (``num_negatives``) and how its own row is
dropped from a search (``drop_target``).

For unit vectors the largest inner product is the smallest L2 distance, so this is the search
ESS needs (eq. 6) for pixels against the class table, and for the table against itself (eq. 7).

Backends:
    "torch": blocked matmul + running top-k. One block of scores is ``block_elems`` elements
             (numerics.py): ``_BLOCK_ELEMS`` (16 MiB) on the CPU; on CUDA a fraction of the
             device's free memory, so a GPU step issues a handful of matmuls, not thousands.
    "faiss": ``IndexFlatIP`` (exact). On CUDA tensors a ``GpuIndexFlatIP`` when the faiss build
             has GPU support; else it falls back to "torch" with a warning (a host round trip
             through a CPU index is never faster than the GPU matmul). The index objects (and the
             GPU resources) stay resident between calls and are re-filled each call, since the
             table changes every step.
    "auto":  the faster of the two for the device and size (see ``_pick_backend``).

The search runs in fp32 even under autocast (``numerics.in_fp32``).
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from larvess.numerics import block_elems, in_fp32

__all__ = ["search", "available_backends", "num_negatives", "drop_target"]

# One block of scores on the CPU: 2**22 floats = 16 MiB in float32. Big enough that the matmul
# dominates the per-block overhead, small enough to be negligible next to a batch's activations.
_BLOCK_ELEMS = 1 << 22

try:  # faiss is a project dependency, but keep the torch path usable without it
    import faiss  # type: ignore

    _HAS_FAISS = True
    _FAISS_GPU = hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
except ImportError:  # pragma: no cover - exercised only in environments without faiss
    faiss = None
    _HAS_FAISS = False
    _FAISS_GPU = False

_GPU_RES = None  # faiss.StandardGpuResources, created once
_INDEXES: dict = {}  # (device, d) -> resident faiss index, reset and re-filled every call
_WARNED: set = set()


# ---- the rules every caller shares -----------------------------------------------------------
def num_negatives(k: int, num_rows: int) -> int:
    """Negatives of one target among ``num_rows`` rows: k, at most every other row (C-1). With
    k >= C-1 a sampled CE over them is exactly the full-softmax CE."""
    return max(0, min(k, num_rows - 1))


def drop_target(cand: Tensor, target: Tensor) -> Tensor:
    """[N,k+1] candidate rows (best first), [N] targets -> [N,k]: each row without its target,
    or without its last (farthest) candidate when the target is not among them.

    A stable sort moves the dropped entry to the end: no data-dependent shape, no host sync."""
    drop = cand == target.to(cand.device).view(-1, 1)
    drop[:, -1] |= ~drop.any(dim=1)
    order = torch.sort(drop.to(torch.uint8), dim=1, stable=True).indices[:, :-1]
    return cand.gather(1, order)


# ---- backends --------------------------------------------------------------------------------
def available_backends() -> list[str]:
    """Backends usable in this environment ("auto" always is)."""
    return ["torch"] + (["faiss"] if _HAS_FAISS else [])


def _search_plan(n: int, c: int, k: int, block: int) -> tuple[int, int]:
    """(query chunk, class chunk) so that one [q_chunk, c_chunk] block of scores holds about
    ``block`` elements. Class chunks bound the memory when C is huge; query chunks when N is."""
    c_chunk = min(c, max(k, block // max(1, min(n, 4096))))
    return max(1, block // c_chunk), c_chunk


def _search_torch(
    queries: Tensor, table: Tensor, k: int, bar: tuple[Tensor, Tensor] | None = None
) -> Tensor:
    N, C = queries.shape[0], table.shape[0]
    block = block_elems(queries.device, _BLOCK_ELEMS, elem_bytes=queries.element_size())
    out = torch.empty(N, k, dtype=torch.long, device=queries.device)
    q_chunk, c_chunk = _search_plan(N, C, k, block)
    for q0 in range(0, N, q_chunk):
        q = queries[q0 : q0 + q_chunk]
        best_v = best_i = None
        for c0 in range(0, C, c_chunk):
            scores = q @ table[c0 : c0 + c_chunk].T
            if bar is not None:  # barred rows of each query's group: one block-sized gather
                group, mask = bar
                scores.masked_fill_(
                    mask[:, c0 : c0 + c_chunk][group[q0 : q0 + q_chunk]], -torch.inf
                )
            v, i = scores.topk(min(k, scores.shape[1]), dim=1)
            i = i + c0
            if best_v is not None:
                # running merge: the k best of (k best so far) u (k best of this chunk)
                v, j = torch.cat([best_v, v], 1).topk(k, dim=1)
                i = torch.cat([best_i, i], 1).gather(1, j)
            best_v, best_i = v, i
        out[q0 : q0 + q_chunk] = best_i
    return out


def _faiss_index(d: int, device: torch.device):
    """The resident flat inner-product index for (device, d), emptied for re-filling."""
    global _GPU_RES
    key = (str(device), d)
    index = _INDEXES.get(key)
    if index is None:
        if device.type == "cuda":
            if _GPU_RES is None:
                _GPU_RES = faiss.StandardGpuResources()
            cfg = faiss.GpuIndexFlatConfig()
            cfg.device = device.index if device.index is not None else torch.cuda.current_device()
            index = faiss.GpuIndexFlatIP(_GPU_RES, d, cfg)
        else:
            index = faiss.IndexFlatIP(d)
        _INDEXES[key] = index
    index.reset()
    return index


def _search_faiss(queries: Tensor, table: Tensor, k: int) -> Tensor:
    if not _HAS_FAISS:
        raise RuntimeError("knn backend 'faiss' requested but faiss is not installed")
    if queries.is_cuda:  # only reached with a GPU faiss build (see _resolve_backend)
        import faiss.contrib.torch_utils  # noqa: F401  (lets GPU indexes take torch tensors)

        index = _faiss_index(table.shape[1], queries.device)
        index.add(table.detach().float().contiguous())
        _, idx = index.search(queries.detach().float().contiguous(), k)
        return idx.to(queries.device, torch.long)
    index = _faiss_index(table.shape[1], torch.device("cpu"))
    index.add(table.detach().to("cpu", torch.float32).contiguous().numpy())
    _, idx = index.search(queries.detach().to("cpu", torch.float32).contiguous().numpy(), k)
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
    torch matmul path (device-sized blocks) is used; a GPU faiss index is taken only when asked
    for by name (not measured here: no GPU faiss build in this environment)."""
    if device.type != "cpu" or not _HAS_FAISS:
        return "torch"
    return "faiss" if n >= _FAISS_MIN_QUERIES else "torch"


def _resolve_backend(backend: str, n: int, c: int, device: torch.device) -> str:
    """The backend that will run: "auto" picked; "faiss" on CUDA without GPU faiss -> "torch"."""
    if backend == "auto":
        return _pick_backend(n, c, device)
    if backend == "faiss" and device.type == "cuda" and _HAS_FAISS and not _FAISS_GPU:
        if "faiss-gpu" not in _WARNED:
            _WARNED.add("faiss-gpu")
            warnings.warn(
                "knn backend 'faiss' on CUDA tensors, but this faiss build has no GPU support "
                "(install faiss-gpu): using the exact torch matmul search on the GPU instead",
                RuntimeWarning,
                stacklevel=3,
            )
        return "torch"
    if backend not in ("torch", "faiss"):
        raise ValueError(f"knn.search: unknown backend {backend!r} (auto, torch, faiss)")
    return backend


@in_fp32
def search(
    queries: Tensor,
    table: Tensor,
    k: int,
    backend: str = "auto",
    exclude: Tensor | None = None,
    bar: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """Exact top-k rows of ``table`` by inner product with each query (fp32 or fp64 math, even
    under autocast).

    Args:
        queries: [N,d].
        table: [C,d] (same device as queries).
        k: neighbours per query; k <= C, or k <= C-1 with ``exclude``.
        backend: "auto" | "torch" | "faiss".
        exclude: optional LongTensor [N], one row per query never returned. The search takes
            k+1 neighbours and drops that row, or the last one when it is not among them.
        bar: optional (group [N] LongTensor, mask [G,C] BoolTensor): rows mask[group[i]] are
            never returned for query i (the tree's related rows); where fewer than k remain,
            the last entries are barred rows (the caller masks them). Torch backend only
            (faiss has no per-query mask): "auto" and "faiss" run the torch search with it.

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
    backend = "torch" if bar is not None else _resolve_backend(backend, N, C, queries.device)
    kk = k + 1 if exclude is not None else k
    if N == 0:
        return torch.empty(0, k, dtype=torch.long, device=queries.device)
    with torch.no_grad():
        if backend == "torch":
            idx = _search_torch(queries.detach(), table.detach().to(queries.dtype), kk, bar)
        else:
            idx = _search_faiss(queries, table, kk)
        if exclude is None:
            return idx
        return drop_target(idx, exclude)
