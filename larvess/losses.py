"""Losses: ESS kNN-sampled CE (eq. 6) and margin regulariser (eq. 7); LarvSeg image-level CE.

Every logit is z_pc = s * x_p . mu_c with unit x_p and mu_c. No function here builds a tensor
whose size is (pixels x C) or (C x C); with k given, memory is O(N k d + C d).

Precision: every public loss runs under ``in_fp32`` (defined in knn.py, re-exported here):
autocast off, float16/bfloat16 inputs cast to float32, so a bf16-autocast forward gives the
same loss and the same negatives as an fp32 one.

Per-source negatives: restrict a loss to a source's rows by passing ``table[rows]`` and local
targets (``rows`` a LongTensor of global ids); the indexing is differentiable, so the gradient
lands on exactly those rows of the full table.

Chunks: the gather below works in chunks of ``_GATHER_ELEMS`` elements on the CPU and of a
fraction of the free memory on CUDA (``knn.block_elems``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from larvess import knn
from larvess.knn import fp32_math, in_fp32

__all__ = [
    "in_fp32",
    "fp32_math",
    "knn_sampled_ce",
    "margin_regularizer",
    "image_level_ce",
    "pooled_ce",
    "LogitStandardizer",
    "zero_with_grad",
]


def zero_with_grad(*tensors: Tensor) -> Tensor:
    """A scalar 0 connected to the graph of ``tensors`` (so backward() and DDP stay happy)."""
    return sum(t.sum() for t in tensors) * 0.0


class LogitStandardizer(nn.Module):
    """LarvSeg's per-pixel logit standardisation across all C classes, exact at any C.

    For z_c = s x.mu_c: mean_c z_c = s x.m with m = mean_c mu_c, and
    var_c z_c = s^2 x^T Sigma x with Sigma = mean_c (mu_c - m)(mu_c - m)^T (population
    covariance). So only a d-vector and a dxd matrix are needed, never C logits per pixel.
    Output: gamma * (z - mean) / sqrt(var + eps) + beta, for the selected logits only.
    """

    def __init__(self, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.gamma = nn.Parameter(torch.ones(()))
        self.beta = nn.Parameter(torch.zeros(()))

    def forward(self, x: Tensor, z: Tensor, mu: Tensor, scale: float) -> Tensor:
        """x [N,d] embeddings, z [N,K] selected logits s*x.mu_rows, mu [C,d] all rows -> [N,K]."""
        m = mu.mean(dim=0)
        centred = mu - m
        sigma = centred.T @ centred / mu.shape[0]
        mean = scale * (x @ m)
        var = scale**2 * ((x @ sigma) * x).sum(dim=1)
        z_hat = (z - mean[:, None]) / torch.sqrt(var[:, None] + self.eps)
        return self.gamma * z_hat + self.beta


class _GatherDot(torch.autograd.Function):
    """z[i,j] = x_i . mu[rows_ij] for x [N,d], mu [C,d], rows [N,k] -> [N,k].

    Plain autograd would hold mu[rows] ([N,k,d], 8x the embeddings for k=8) and its gradient at
    the same time; here both directions work in row chunks (``_gather_step``) and only x, mu
    and rows are saved, so the loss adds O(N k + chunk) memory on top of the embeddings.
    """

    @staticmethod
    def forward(ctx, x: Tensor, mu: Tensor, rows: Tensor) -> Tensor:
        ctx.save_for_backward(x, mu, rows)
        step = _gather_step(x, rows.shape[1])
        out = x.new_empty(rows.shape)
        for i in range(0, x.shape[0], step):
            out[i : i + step] = torch.bmm(mu[rows[i : i + step]], x[i : i + step, :, None])[..., 0]
        return out

    @staticmethod
    def backward(ctx, g: Tensor):
        x, mu, rows = ctx.saved_tensors
        step = _gather_step(x, rows.shape[1])  # sized again: free memory differs in backward
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


# CPU chunk: 2**20 gathered elements. On CUDA each chunk takes _GATHER_FRACTION of the free
# memory; backward holds two chunk-sized temporaries (mu[rows] and the [n,k,d] contribution).
_GATHER_ELEMS = 1 << 20
_GATHER_FRACTION = 0.125


def _gather_step(x: Tensor, k: int) -> int:
    """Rows of x per chunk so that a chunk gathers about one block of [n,k,d] elements."""
    elems = knn.block_elems(x.device, _GATHER_ELEMS, _GATHER_FRACTION, x.element_size())
    return max(1, elems // max(1, k * x.shape[1]))


def _sampled_logits(
    x: Tensor,
    target: Tensor,
    negatives: Tensor,
    mu: Tensor,
    scale: float,
    neg_mask: Tensor | None = None,
) -> Tensor:
    """[z_target, z_neg1..k] -> [N,1+k]; x [N,d], target [N], negatives [N,k] rows of mu.

    neg_mask [N,k] (True = keep) turns padded negatives into -inf."""
    # one gather for target and negatives: a single [C,d] gradient buffer in backward
    z = scale * _GatherDot.apply(x, mu, torch.cat([target[:, None], negatives], dim=1))
    if neg_mask is not None:
        keep = torch.cat([neg_mask.new_ones(neg_mask.shape[0], 1), neg_mask], dim=1)
        z = z.masked_fill(~keep, float("-inf"))
    return z


def _ce_target_first(logits: Tensor) -> Tensor:
    """Per-row CE with the target in column 0: logsumexp(z) - z_0."""
    return torch.logsumexp(logits, dim=1) - logits[:, 0]


def _cell_of_pixel(grid_hw: tuple[int, int], size: tuple[int, int], device) -> Tensor:
    """[H,W] flat index of the grid cell each pixel comes from under nearest upsampling.

    Computed by F.interpolate itself so the mapping matches mode="nearest" exactly."""
    h, w = grid_hw
    ids = torch.arange(h * w, device=device, dtype=torch.float32).view(1, 1, h, w)
    return F.interpolate(ids, size=size, mode="nearest").view(size).long()


@in_fp32
def knn_sampled_ce(
    emb: Tensor,
    target: Tensor,
    table: Tensor,
    k: int,
    scale: float,
    ignore_index: int = -1,
    grid: Tensor | None = None,
    backend: str = "auto",
    logit_norm: LogitStandardizer | None = None,
) -> Tensor:
    """ESS eq. 6: CE over [target, k nearest other classes], mean over labelled pixels.

    Args:
        emb: x, [N,d] or [B,d,H,W], unit norm.
        target: [N] or [B,H,W] rows of ``table``; ``ignore_index`` marks unlabelled pixels.
        table: mu, [C,d] unit rows.
        k: negatives per pixel (clamped to C-1; with k >= C-1 this is full-softmax CE exactly).
        scale: s (ESS: 2/tau = 40).
        grid: optional [B,d,h,w] embeddings at the feature stride (shared-negatives mode, ESS
            supplementary). Each cell searches its k+1 nearest classes once; every pixel
            mapped to that cell by nearest upsampling takes that list, drops its own target if
            present, else the last (farthest) one: the same rule as the per-pixel search, so
            when each cell's pixels equal the cell embedding both modes agree exactly.
        backend: knn backend.
        logit_norm: optional LogitStandardizer applied to the k+1 logits.

    Returns:
        scalar; 0 (connected to the graph) when no pixel is labelled.
    """
    C, d = table.shape
    if emb.dim() == 4:
        B, _, H, W = emb.shape
        if tuple(target.shape) != (B, H, W):
            raise ValueError(f"target must be [B,H,W]={(B, H, W)}, got {tuple(target.shape)}")
        x = emb.permute(0, 2, 3, 1).reshape(-1, emb.shape[1])
    elif emb.dim() == 2:
        if grid is not None:
            raise ValueError("grid (shared negatives) needs emb [B,d,H,W]")
        if tuple(target.shape) != (emb.shape[0],):
            raise ValueError(f"target must be [N]={emb.shape[0]}, got {tuple(target.shape)}")
        x = emb
    else:
        raise ValueError(f"emb must be [N,d] or [B,d,H,W], got {tuple(emb.shape)}")
    if x.shape[1] != d:
        raise ValueError(f"emb has d={x.shape[1]} but the table has d={d}")
    y = target.reshape(-1)
    labelled = y != ignore_index
    if not bool(labelled.any()):
        return zero_with_grad(emb, table)
    y_l = y[labelled]
    if int(y_l.min()) < 0 or int(y_l.max()) >= C:
        bad = y_l[(y_l < 0) | (y_l >= C)][0].item()
        raise ValueError(f"target value {bad} outside the table's rows [0, {C})")
    k = min(k, C - 1)
    all_labelled = bool(labelled.all())  # skip an [N,d] copy in the common case
    x_l = x if all_labelled else x[labelled]
    if k == 0:  # a single class: CE is exactly 0
        return zero_with_grad(x_l, table)
    if grid is None:
        neg = knn.search(x_l, table, k, backend=backend, exclude=y_l)
    else:
        if grid.dim() != 4 or grid.shape[0] != B or grid.shape[1] != d:
            raise ValueError(f"grid must be [B={B},d={d},h,w], got {tuple(grid.shape)}")
        h, w = grid.shape[2:]
        cells = grid.permute(0, 2, 3, 1).reshape(-1, d)
        cand = knn.search(cells, table, k + 1, backend=backend)  # [B*h*w, k+1]
        cell = _cell_of_pixel((h, w), (H, W), emb.device)
        cell = cell.view(1, H * W) + (h * w) * torch.arange(B, device=emb.device)[:, None]
        cell = cell.reshape(-1) if all_labelled else cell.reshape(-1)[labelled]
        cand = cand[cell]  # [n, k+1]
        drop = cand == y_l[:, None]
        drop[:, -1] |= ~drop.any(dim=1)
        neg = cand[~drop].view(-1, k)
    logits = _sampled_logits(x_l, y_l, neg, table, scale)
    if logit_norm is not None:
        logits = logit_norm(x_l, logits, table, scale)
    return _ce_target_first(logits).mean()


@in_fp32
def margin_regularizer(
    table: Tensor, margin: float = 0.2, backend: str = "auto", nearest: Tensor | None = None
) -> Tensor:
    """ESS eq. 7: L_r = mean_c max(0, m - min_{j!=c} ||mu_c - mu_j||).

    The nearest other row comes from the kNN search (inner product = L2 order on unit rows),
    never a CxC matrix. The distance is the norm of the difference, which on unit rows equals
    sqrt(2 - 2 cos) without the cancellation that formula suffers near 0.
    nearest: LongTensor [C] from ``nearest_rows`` of an earlier table (the search is O(C^2 d):
    2 s of a CPU step at 21,841 rows); the distances are always those of the current rows.
    """
    C = table.shape[0]
    if C < 2:
        return zero_with_grad(table)
    if nearest is None:
        nearest = nearest_rows(table, backend)
    dist = (table - table[nearest]).norm(dim=1)
    return F.relu(margin - dist).mean()


@in_fp32
def nearest_rows(table: Tensor, backend: str = "auto") -> Tensor:
    """LongTensor [C]: the nearest other row of every row of a unit table [C,d] (no gradient)."""
    own = torch.arange(table.shape[0], device=table.device)
    return knn.search(table.detach(), table.detach(), 1, backend=backend, exclude=own)[:, 0]


@in_fp32
def pooled_ce(
    pooled: Tensor,
    target: Tensor,
    excluded: list[Tensor],
    table: Tensor,
    scale: float,
    k: int | None = None,
    backend: str = "auto",
) -> Tensor:
    """Per-pair CE of pooled embeddings; shared by image_level_ce and the CA-Classifier.

    For pair i the logits are s * pooled_i . mu over {target_i} u (classes not in excluded_i):
    all of them with k=None, else the k nearest rows of pooled_i outside excluded_i
    (fewer when fewer remain). Pooling is linear, so s * mean_p(x_p) . mu_c = mean_p z_pc.

    Args:
        pooled: [P,d] pooled (not re-normalised) embeddings.
        target: [P] target rows.
        excluded: P LongTensors of rows never used as negatives (the image's label set L;
            may contain the target itself).
        table: mu [C,d].
    Returns:
        [P] per-pair losses.
    """
    C = table.shape[0]
    P = pooled.shape[0]
    dev = pooled.device
    n_ex = torch.tensor([len(e) for e in excluded], device=dev)
    ex_pad = torch.full((P, max(1, int(n_ex.max()) if P else 1)), -1, dtype=torch.long, device=dev)
    for i, e in enumerate(excluded):
        ex_pad[i, : len(e)] = e.to(dev)
    if k is None:
        z = scale * pooled @ table.T  # [P,C]: a few pairs x C, never pixels x C
        mask = torch.zeros(P, C, dtype=torch.bool, device=dev)
        rows = torch.arange(P, device=dev)[:, None].expand_as(ex_pad)
        valid = ex_pad >= 0
        mask[rows[valid], ex_pad[valid]] = True
        mask[torch.arange(P, device=dev), target] = True  # the target goes first, not twice
        z_t = scale * (pooled * table[target]).sum(dim=1, keepdim=True)
        logits = torch.cat([z_t, z.masked_fill(mask, float("-inf"))], dim=1)
        return _ce_target_first(logits)
    # the target is a negative for nobody: count it among the excluded when it is not listed
    in_ex = (ex_pad == target[:, None]).any(dim=1).logical_not().long()
    n_block = n_ex + in_ex  # rows barred from the negatives, target included
    n_neg = torch.clamp(C - n_block, max=k)
    K = int(n_neg.max())
    if K == 0:
        return _ce_target_first(scale * (pooled * table[target]).sum(dim=1, keepdim=True))
    kk = min(C, K + int(n_block.max()))
    cand = knn.search(pooled.detach(), table, kk, backend=backend)  # [P,kk]
    barred = (cand[:, :, None] == ex_pad[:, None, :]).any(dim=2) | (cand == target[:, None])
    # stable sort puts the allowed candidates first, nearest first
    order = torch.sort(barred.to(torch.uint8), dim=1, stable=True).indices[:, :K]
    neg = cand.gather(1, order)
    keep = torch.arange(K, device=dev)[None, :] < n_neg[:, None]
    logits = _sampled_logits(pooled, target, neg, table, scale, neg_mask=keep)
    return _ce_target_first(logits)


@in_fp32
def image_level_ce(
    emb: Tensor,
    labels: list[Tensor],
    table: Tensor,
    scale: float,
    k: int | None = None,
    backend: str = "auto",
) -> Tensor:
    """LarvSeg 3.1: CE of the average-pooled logits per (image, label) pair.

    For image b with label set L_b and each l in L_b: CE over all classes except L_b \\ {l}
    with target l (other labels are ignored, not negatives); mean over all pairs. With k, the
    negatives are the k nearest rows of the pooled embedding outside L_b.

    Args:
        emb: x [B,d,h,w] unit-norm embeddings (any resolution; pooling is a mean).
        labels: B LongTensors of unique rows (an empty one contributes no pair).
        table: mu [C,d].
    Returns:
        scalar; 0 (connected to the graph) when there is no pair.
    """
    if emb.dim() != 4 or len(labels) != emb.shape[0]:
        raise ValueError(
            f"image_level_ce needs emb [B,d,h,w] and B label tensors, got {tuple(emb.shape)} "
            f"and {len(labels)}"
        )
    C = table.shape[0]
    pooled_b = emb.mean(dim=(2, 3))  # [B,d]
    img, tgt, excl = [], [], []
    for b, L in enumerate(labels):
        L = L.reshape(-1).to(emb.device)
        if len(L) and (int(L.min()) < 0 or int(L.max()) >= C):
            raise ValueError(f"image {b}: label {L.tolist()} outside the table's rows [0, {C})")
        for lab in L:
            img.append(b)
            tgt.append(lab)
            excl.append(L)
    if not img:
        return zero_with_grad(emb, table)
    idx = torch.tensor(img, device=emb.device)
    target = torch.stack(tgt)
    return pooled_ce(pooled_b[idx], target, excl, table, scale, k=k, backend=backend).mean()
