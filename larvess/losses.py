"""Losses: ESS kNN-sampled CE (eq. 6) and margin regulariser (eq. 7); LarvSeg image-level CE.

Every logit is z_pc = s * x_p . mu_c with unit x_p and mu_c. No function here builds a tensor
whose size is (pixels x C) or (C x C); with k given, memory is O(N k d + C d).

Pure functions: they read tensors and return losses; nothing here changes state.

No host waits: shapes come from the host (label counts are tensor lengths), values stay on the
device. Unlabelled pixels are masked, not cut out (a cut needs their count on the host); labels
are checked where they enter (the readers), not here in every step.

Precision: every public loss runs under ``numerics.in_fp32`` (autocast off, float16/bfloat16
inputs cast to float32), so a bf16-autocast forward gives the same loss and the same negatives
as an fp32 one.

Per-source negatives: restrict a loss to a source's rows by passing ``table[rows]`` and local
targets (``rows`` a LongTensor of global ids); the indexing is differentiable, so the gradient
lands on exactly those rows of the full table.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import pad_sequence

from larvess import knn
from larvess.numerics import gather_dot, in_fp32, zero_with_grad

__all__ = [
    "LabelPairs",
    "label_pairs",
    "knn_sampled_ce",
    "margin_regularizer",
    "nearest_rows",
    "image_level_ce",
    "pooled_ce",
    "LogitStandardizer",
]


@dataclass(frozen=True)
class LabelPairs:
    """Every (image, label) pair of a batch of image-level labels, as tensors.

    image [P] and target [P]: the image and the label row of each pair; label_set [B,E]: each
    image's labels padded with -1 (E = the largest label count). ``counts`` (host ints) is the
    number of labels of each image: a shape, known without asking the device.
    With the tree (tree_labels.py): related, COO (pair index [nnz], row [nnz]) of the rows
    related to each pair's target, never its negatives; single (host bools [P]): the pair takes
    the single-label background rule (default: its image has one label).
    """

    image: Tensor
    target: Tensor
    label_set: Tensor
    counts: tuple[int, ...]
    related: tuple[Tensor, Tensor] | None = None
    single: tuple[bool, ...] | None = None

    @property
    def num(self) -> int:
        return len(self.image)

    def is_single(self) -> list[bool]:
        """Host bools [P]: the pairs that take the single-label background rule (no sync)."""
        if self.single is not None:
            return list(self.single)
        return [n == 1 for n in self.counts for _ in range(n)]

    def pair_images(self) -> list[int]:
        """Host ints [P]: the image of each pair (pairs come image by image; no sync)."""
        return [b for b, n in enumerate(self.counts) for _ in range(n)]

    def excluded(self) -> Tensor:
        """[P,E]: the label set of each pair's image (never a negative of that pair)."""
        return self.label_set[self.image]

    def related_mask(self, num_rows: int) -> Tensor | None:
        """[P, num_rows] bool: the rows related to each pair's target (None without a tree)."""
        if self.related is None:
            return None
        mask = torch.zeros(self.num, num_rows, dtype=torch.bool, device=self.target.device)
        mask[self.related[0], self.related[1]] = True
        return mask

    def to_local(self, index: Tensor) -> LabelPairs:
        """Map rows through ``index`` [C+1] (row -> local id, last entry -1: -1 stays -1)."""
        rel = None if self.related is None else (self.related[0], index[self.related[1]])
        return LabelPairs(self.image, index[self.target], index[self.label_set], self.counts, rel,
                          self.single)  # fmt: skip

    def to(self, device: torch.device | str) -> LabelPairs:
        """The same pairs on ``device`` (copies that do not wait)."""

        def mv(t: Tensor) -> Tensor:
            return t.to(device, non_blocking=True)

        rel = None if self.related is None else (mv(self.related[0]), mv(self.related[1]))
        return LabelPairs(mv(self.image), mv(self.target), mv(self.label_set), self.counts, rel,
                          self.single)  # fmt: skip


def label_pairs(labels: list[Tensor], device: torch.device | str | None = None) -> LabelPairs:
    """B LongTensors of unique label rows -> their LabelPairs (on ``device``, default the
    labels'). No host sync: only the tensors' lengths are read."""
    flat = [L.reshape(-1).long() for L in labels]
    dev = torch.device(device) if device is not None else (flat[0].device if flat else "cpu")
    counts = tuple(len(L) for L in flat)
    # built on the host from host ints, copied without waiting
    image = torch.tensor([b for b, n in enumerate(counts) for _ in range(n)], dtype=torch.long)
    if sum(counts):
        label_set = pad_sequence([L.to(dev) for L in flat], batch_first=True, padding_value=-1)
        target = torch.cat(flat).to(dev)
    else:
        label_set = torch.full((len(flat), 0), -1, dtype=torch.long, device=dev)
        target = torch.zeros(0, dtype=torch.long, device=dev)
    return LabelPairs(image.to(dev, non_blocking=True), target, label_set, counts)


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
    z = scale * gather_dot(x, mu, torch.cat([target[:, None], negatives], dim=1))
    return z if neg_mask is None else _mask_negatives(z, neg_mask)


def _mask_negatives(logits: Tensor, keep: Tensor) -> Tensor:
    """[N,1+k] logits, [N,k] keep -> the negatives not kept set to -inf (the target stays)."""
    keep = torch.cat([keep.new_ones(keep.shape[0], 1), keep], dim=1)
    return logits.masked_fill(~keep, float("-inf"))


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
    barred: tuple[Tensor, Tensor] | None = None,
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
        barred: optional (group [C+1] LongTensor, mask [T,C] BoolTensor) from the tree: rows
            mask[group[y]] (y's related rows and y itself) are never negatives of target y.
            The k nearest are searched among the others (per pixel; not with ``grid``).

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
    k = knn.num_negatives(k, C)
    if k == 0 or x.shape[0] == 0:  # a single class (CE is exactly 0), or no pixel
        return zero_with_grad(emb, table)
    y = target.reshape(-1)
    # unlabelled pixels are scored against row 0 and masked out of the mean: cutting them out
    # would need their number on the host (a sync per step)
    labelled = y != ignore_index
    y = torch.where(labelled, y, 0)
    keep = None
    if barred is not None:
        if grid is not None:
            raise ValueError("barred (the tree) needs the per-pixel search, not grid")
        group, mask = barred
        g = group[y]
        neg = knn.search(x, table, k, backend=backend, bar=(g, mask))
        keep = ~mask[g[:, None], neg]  # fewer than k allowed rows: the rest are masked
    elif grid is None:
        neg = knn.search(x, table, k, backend=backend, exclude=y)
    else:
        if grid.dim() != 4 or grid.shape[0] != B or grid.shape[1] != d:
            raise ValueError(f"grid must be [B={B},d={d},h,w], got {tuple(grid.shape)}")
        h, w = grid.shape[2:]
        cells = grid.permute(0, 2, 3, 1).reshape(-1, d)
        cand = knn.search(cells, table, k + 1, backend=backend)  # [B*h*w, k+1]
        cell = _cell_of_pixel((h, w), (H, W), emb.device)
        cell = cell.view(1, H * W) + (h * w) * torch.arange(B, device=emb.device)[:, None]
        neg = knn.drop_target(cand[cell.reshape(-1)], y)
    logits = _sampled_logits(x, y, neg, table, scale)
    if logit_norm is not None:
        logits = logit_norm(x, logits, table, scale)
    if keep is not None:  # after the norm: its statistics are over the rows' logits, not -inf
        logits = _mask_negatives(logits, keep)
    w = labelled.to(logits.dtype)
    return (_ce_target_first(logits) * w).sum() / w.sum().clamp(min=1.0)


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
    excluded: Tensor,
    table: Tensor,
    scale: float,
    k: int | None = None,
    backend: str = "auto",
    related: Tensor | None = None,
) -> Tensor:
    """Per-pair CE of pooled embeddings; shared by image_level_ce and the CA-Classifier.

    For pair i the logits are s * pooled_i . mu over {target_i} u (classes not in excluded_i):
    all of them with k=None, else the k nearest rows of pooled_i outside excluded_i
    (fewer when fewer remain). Pooling is linear, so s * mean_p(x_p) . mu_c = mean_p z_pc.

    Args:
        pooled: [P,d] pooled (not re-normalised) embeddings.
        target: [P] target rows.
        excluded: [P,E] rows never used as negatives, -1 padded (the image's label set L; may
            contain the target itself).
        table: mu [C,d].
        related: optional [P,C] bool, more rows barred per pair (the tree's related rows).
            The scores are then [P,C] and the k nearest allowed rows their top k: exact, and
            a few pairs x C, never pixels x C.
    Returns:
        [P] per-pair losses.
    """
    C = table.shape[0]
    P, E = excluded.shape
    valid = excluded >= 0
    dense = k is None or related is not None
    if dense:
        z = scale * pooled @ table.T  # [P,C]: a few pairs x C, never pixels x C
        barred = torch.zeros(P, C + 1, dtype=torch.bool, device=pooled.device)
        barred.scatter_(1, torch.where(valid, excluded, C), True)  # padding lands in column C
        barred = barred[:, :C].scatter(1, target[:, None], True)  # the target goes first
        if related is not None:
            barred |= related
        z_t = scale * (pooled * table[target]).sum(dim=1, keepdim=True)
        z = z.masked_fill(barred, float("-inf"))
        if k is not None:  # the k nearest allowed rows; -inf where fewer remain
            z = z.topk(min(C, knn.num_negatives(k, C) or 1), dim=1).values
        return _ce_target_first(torch.cat([z_t, z], dim=1))
    K = knn.num_negatives(k, C)
    if K == 0 or P == 0:
        return _ce_target_first(scale * (pooled * table[target]).sum(dim=1, keepdim=True))
    # enough candidates that K of them lie outside the label set and the target
    cand = knn.search(pooled.detach(), table, min(C, K + E + 1), backend=backend)  # [P,kk]
    barred = (cand[:, :, None] == torch.where(valid, excluded, -1)[:, None, :]).any(dim=2)
    barred |= cand == target[:, None]
    # stable sort puts the allowed candidates first, nearest first; barred ones left are masked
    order = torch.sort(barred.to(torch.uint8), dim=1, stable=True).indices[:, :K]
    keep = ~barred.gather(1, order)
    logits = _sampled_logits(pooled, target, cand.gather(1, order), table, scale, neg_mask=keep)
    return _ce_target_first(logits)


@in_fp32
def image_level_ce(
    emb: Tensor,
    labels: list[Tensor] | LabelPairs,
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
        labels: B LongTensors of unique rows of ``table`` (an empty one contributes no pair),
            or their ``label_pairs``.
        table: mu [C,d].
    Returns:
        scalar; 0 (connected to the graph) when there is no pair.
    """
    pairs = labels if isinstance(labels, LabelPairs) else label_pairs(labels, emb.device)
    if emb.dim() != 4 or len(pairs.counts) != emb.shape[0]:
        raise ValueError(
            f"image_level_ce needs emb [B,d,h,w] and B label tensors, got {tuple(emb.shape)} "
            f"and {len(pairs.counts)}"
        )
    if pairs.num == 0:
        return zero_with_grad(emb, table)
    pooled = emb.mean(dim=(2, 3))[pairs.image]  # [P,d]
    related = pairs.related_mask(table.shape[0])
    return pooled_ce(
        pooled, pairs.target, pairs.excluded(), table, scale, k, backend, related=related
    ).mean()
