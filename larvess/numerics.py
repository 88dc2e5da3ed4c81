"""Numeric helpers every loss shares: fp32 math under autocast, temporary block sizes taken from
the device, a zero that keeps the graph, and the chunked gather-dot kernel.

Precision. ``in_fp32`` (a decorator) / ``fp32_math`` (a context) turn autocast off for the
tensors' device types and cast float16/bfloat16 inputs to float32; float64 stays float64. Every
public loss (losses.py, ca_classifier.py, pc2seg.py) and ``knn.search`` run under it: under bf16
autocast the top-k of bf16 scores changes a sizeable share of neighbour sets (bf16 keeps 8
mantissa bits; cosines of nearby classes differ by less than that).

Blocks. A temporary block holds a fixed number of elements on the CPU and a fraction of the
device's free memory on CUDA (``block_elems``), so a GPU step issues a handful of large kernels
instead of thousands of small ones.
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch import Tensor

__all__ = ["fp32_math", "in_fp32", "free_bytes", "block_elems", "zero_with_grad", "gather_dot"]

_LOW = (torch.float16, torch.bfloat16)
_MAX_ELEMS = (1 << 31) - 1  # int32 indexing limits of some kernels


# ---- fp32 math -------------------------------------------------------------------------------
@contextlib.contextmanager
def fp32_math(*tensors: object):
    """Autocast off for "cpu" and for the device types of ``tensors`` (non-tensors ignored)."""
    types = {"cpu"} | {t.device.type for t in tensors if isinstance(t, Tensor)}
    with contextlib.ExitStack() as stack:
        for dev in sorted(types):
            try:
                stack.enter_context(torch.autocast(dev, enabled=False))
            except (RuntimeError, ValueError):  # a device type autocast does not know
                pass
        yield


def _fp32(t: object) -> object:
    return t.float() if isinstance(t, Tensor) and t.dtype in _LOW else t


def in_fp32(fn):
    """Decorator: run ``fn`` with autocast off and float16/bfloat16 tensor arguments cast to
    float32 (the cast is differentiable: gradients reach the low-precision inputs)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with fp32_math(*args, *kwargs.values()):
            return fn(*map(_fp32, args), **{k: _fp32(v) for k, v in kwargs.items()})

    return wrapper


# ---- block sizes from the device -------------------------------------------------------------
def free_bytes(device: torch.device) -> int | None:
    """Free memory of a CUDA device, counting PyTorch's cached-but-unused blocks; None off CUDA."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    free, _total = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return int(free) + max(0, int(cached))


def block_elems(
    device: torch.device, cpu_elems: int, fraction: float = 0.25, elem_bytes: int = 4
) -> int:
    """Elements one temporary block may hold: ``cpu_elems`` off CUDA; on CUDA ``fraction`` of
    the free memory (``free_bytes``) in ``elem_bytes`` units, at least ``cpu_elems`` and at most
    2**31 - 1."""
    free = free_bytes(device)
    if free is None:
        return cpu_elems
    return int(min(_MAX_ELEMS, max(cpu_elems, int(fraction * free) // max(1, elem_bytes))))


# ---- graph helpers ---------------------------------------------------------------------------
def zero_with_grad(*tensors: Tensor) -> Tensor:
    """A scalar 0 connected to the graph of ``tensors`` (so backward() and DDP stay happy)."""
    return sum(t.sum() for t in tensors) * 0.0


# CPU chunk: 2**20 gathered elements. On CUDA each chunk takes GATHER_FRACTION of the free
# memory; backward holds two chunk-sized temporaries (mu[rows] and the [n,k,d] contribution).
GATHER_ELEMS = 1 << 20
GATHER_FRACTION = 0.125


def gather_step(x: Tensor, k: int) -> int:
    """Rows of x per chunk so that a chunk gathers about one block of [n,k,d] elements."""
    elems = block_elems(x.device, GATHER_ELEMS, GATHER_FRACTION, x.element_size())
    return max(1, elems // max(1, k * x.shape[1]))


class _GatherDot(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, mu: Tensor, rows: Tensor) -> Tensor:
        ctx.save_for_backward(x, mu, rows)
        step = gather_step(x, rows.shape[1])
        out = x.new_empty(rows.shape)
        for i in range(0, x.shape[0], step):
            out[i : i + step] = torch.bmm(mu[rows[i : i + step]], x[i : i + step, :, None])[..., 0]
        return out

    @staticmethod
    def backward(ctx, g: Tensor):
        x, mu, rows = ctx.saved_tensors
        step = gather_step(x, rows.shape[1])  # sized again: free memory differs in backward
        gx = torch.empty_like(x) if ctx.needs_input_grad[0] else None
        gmu = torch.zeros_like(mu) if ctx.needs_input_grad[1] else None
        for i in range(0, x.shape[0], step):
            r, gi = rows[i : i + step], g[i : i + step]
            if gx is not None:
                gx[i : i + step] = torch.bmm(gi[:, None, :], mu[r])[:, 0]
            if gmu is not None:
                contrib = gi[..., None] * x[i : i + step, None, :]  # [n,k,d]
                gmu.index_add_(0, r.reshape(-1), contrib.reshape(-1, x.shape[1]))
        return gx, gmu, None


def gather_dot(x: Tensor, mu: Tensor, rows: Tensor) -> Tensor:
    """z[i,j] = x_i . mu[rows_ij] for x [N,d], mu [C,d], rows [N,k] -> [N,k], differentiable in
    x and mu.

    Plain autograd would hold mu[rows] ([N,k,d], 8x the embeddings for k=8) and its gradient at
    the same time; here both directions work in row chunks (``gather_step``) and only x, mu and
    rows are saved, so the call adds O(N k + chunk) memory on top of the embeddings.
    """
    return _GatherDot.apply(x, mu, rows)
