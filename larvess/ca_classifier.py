"""LarvSeg 3.3 Category-wise Attentive Classifier (CA-Classifier) with a slot-mean memory bank.

Memory bank. Per class c a FIFO ring of M slots. One enqueue takes the K pixels of one image
with the highest detached score for c, L2-normalises them and stores their *mean* as one slot.
For a unit pixel x_p the mean cosine to every stored feature f_1..f_{MK} is
    (1/MK) sum_i x_p . f_i = x_p . (1/M) sum_slots (1/K) sum_{i in slot} f_i,
so S_fg(p) = x_p . (mean of the filled slots) is exactly the mean cosine to every feature in the
ring, with K times less memory (C x M x d floats). The identity needs the same K in every slot,
which holds whenever images have at least ``topk`` feature-grid pixels (else K = h*w).

Attention. A_p = sigmoid(standardise_p(S_fg(p) - S_bg(p))) over the image's pixels (population
std + 1e-5), computed without gradient: the bank is a detached memory and A only decides which
pixels' embeddings get pooled. Pooling happens at the feature grid the embeddings are given
at (LarvSeg upsamples A and z; pooling a bilinear upsampling is a re-weighted mean of the same
grid values, so we pool at the grid and skip the upsampling).

Background classes S_bg for label l of an image with label set L:
- |L| > 1: the other labels of the image whose bank is warm.
- |L| = 1: as the official LarvSeg code (details and reference in ca_background.py): among the
  candidate rows (the source's classes; ``candidates``), classes b != l whose mean of the top-5
  raw cosine pixel scores x_p . mu_b exceeds ``bg_threshold`` (0.2; 0.35 ImageNet), that are
  warm, and that pass the MSE filter (standardised S_fg and S_b differ by more than
  ``bg_mse_threshold``: 1.0; 2.0 in the reference's ImageNet config).
With none, S_bg = 1 - S_fg.

Negatives of the pooled CE: the candidate rows outside the image's label set (all rows when
``candidates`` is None), all of them (k=None) or the k nearest of the pooled embedding.

Warm-up: the loss term of pair (image, l) is 0 until class l's ring has been filled ``warm_up``
times (count >= warm_up * M, at least one enqueue); the loss is the mean over all pairs.

Distributed: every enqueue batch is all-gathered (torch.distributed, when initialised) and
applied in rank order, so all processes hold the identical bank.

Precision: loss / enqueue / similarity / attention run under ``in_fp32`` (autocast off, fp32).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from larvess.ca_background import standardised_mse, top_score_mean
from larvess.losses import in_fp32, pooled_ce, zero_with_grad

__all__ = ["CAClassifier"]


class CAClassifier(nn.Module):
    """Memory bank (buffers bank [C,M,d], ptr [C], count [C]) and the attentive pooled CE.

    Args:
        num_classes: C.
        dim: d.
        bank_size: M slots per class.
        topk: K pixels averaged into one slot.
        warm_up: rings to fill before a class's loss term counts.
        bg_threshold: single-label background threshold on the mean of the top-5 raw cosine
            pixel scores (per call: ``loss(bg_threshold=...)``).
        bg_mse_threshold: the reference's MSE filter threshold (per call as well).
        bg_topk: pixels in that top-k mean (reference: 5).
    """

    def __init__(
        self,
        num_classes: int,
        dim: int,
        bank_size: int = 20,
        topk: int = 20,
        warm_up: int = 1,
        bg_threshold: float = 0.2,
        bg_mse_threshold: float = 1.0,
        bg_topk: int = 5,
    ) -> None:
        super().__init__()
        if min(num_classes, dim, bank_size, topk) < 1 or warm_up < 0:
            raise ValueError(
                f"CAClassifier: bad sizes num_classes={num_classes} dim={dim} "
                f"bank_size={bank_size} topk={topk} warm_up={warm_up}"
            )
        self.num_classes, self.dim = num_classes, dim
        self.bank_size, self.topk, self.warm_up = bank_size, topk, warm_up
        self.bg_threshold, self.bg_mse_threshold = bg_threshold, bg_mse_threshold
        self.bg_topk = bg_topk
        self.register_buffer("bank", torch.zeros(num_classes, bank_size, dim))
        self.register_buffer("ptr", torch.zeros(num_classes, dtype=torch.long))
        self.register_buffer("count", torch.zeros(num_classes, dtype=torch.long))

    # ---- memory bank -------------------------------------------------------------------
    def warm(self, classes: Tensor) -> Tensor:
        """BoolTensor [n]: rings filled warm_up times (and at least one enqueue)."""
        need = max(1, self.warm_up * self.bank_size)
        return self.count[classes.to(self.count.device)] >= need

    def bank_mean(self, classes: Tensor) -> Tensor:
        """[n,d] mean of the filled slots of each class (zeros for an empty ring)."""
        classes = classes.to(self.bank.device)
        filled = self.count[classes].clamp(max=self.bank_size)
        slot_ok = torch.arange(self.bank_size, device=self.bank.device)[None] < filled[:, None]
        total = (self.bank[classes] * slot_ok[..., None]).sum(dim=1)
        return total / filled.clamp(min=1)[:, None].to(total.dtype)

    def _slot_mean(self, emb: Tensor, score: Tensor) -> Tensor:
        """Mean of the normalised embeddings of the topk highest-score pixels -> [d]."""
        x = emb.detach().reshape(emb.shape[0], -1)
        top = score.detach().reshape(-1).topk(min(self.topk, x.shape[1])).indices
        return F.normalize(x[:, top].T, dim=1).mean(dim=0)

    @in_fp32
    def enqueue(self, emb: Tensor, score: Tensor, c: int) -> None:
        """Push the topk highest-``score`` pixels of one image as one slot of class c.

        emb [d,h,w], score [h,w]. A collective when torch.distributed is initialised: every
        process must call it the same number of times."""
        if not 0 <= int(c) < self.num_classes:
            raise ValueError(f"enqueue: class {int(c)} outside [0, {self.num_classes})")
        slot = self._slot_mean(emb, score)
        self._push(slot[None], torch.tensor([int(c)], device=slot.device))

    @torch.no_grad()
    def _push(self, slots: Tensor, classes: Tensor) -> None:
        """FIFO-write slots [n,d] of classes [n] (all-gathered across processes first)."""
        dev = self.bank.device
        slots, classes = slots.detach().to(dev, self.bank.dtype), classes.to(dev).long()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            slots, classes = _all_gather_padded(slots, classes)
        if classes.numel() == 0:
            return
        M = self.bank_size
        perm = torch.sort(classes, stable=True).indices
        uniq, n_c = torch.unique_consecutive(classes[perm], return_counts=True)
        start = torch.cumsum(n_c, 0) - n_c
        rank_sorted = torch.arange(len(perm), device=dev) - torch.repeat_interleave(start, n_c)
        rank = torch.empty_like(rank_sorted)
        rank[perm] = rank_sorted  # order of each push among its class's pushes, oldest first
        n_of = torch.zeros(self.num_classes, dtype=torch.long, device=dev)
        n_of[uniq] = n_c
        keep = rank >= n_of[classes] - M  # only the newest M survive the ring anyway
        pos = (self.ptr[classes] + rank) % M
        self.bank[classes[keep], pos[keep]] = slots[keep]
        self.ptr[uniq] = (self.ptr[uniq] + n_c) % M
        self.count[uniq] += n_c

    @in_fp32
    def similarity(self, emb: Tensor, c: int) -> Tensor:
        """S_fg [h,w]: mean cosine of each pixel of emb [d,h,w] (unit) to class c's ring."""
        m = self.bank_mean(torch.tensor([int(c)], device=self.bank.device))[0]
        return torch.einsum("dhw,d->hw", emb, m.to(emb.dtype))

    # ---- loss --------------------------------------------------------------------------
    def _single_label_background(
        self,
        x: Tensor,
        lab: int,
        table: Tensor,
        threshold: float,
        mse_threshold: float,
        candidates: Tensor | None = None,
    ) -> Tensor:
        """Background rows for a single-label image (see ca_background.py).

        x [P,d] detached unit pixels, table mu [C,d], candidates LongTensor of rows (None = all).
        """
        rows = (
            torch.arange(table.shape[0], device=table.device)
            if candidates is None
            else candidates.to(table.device)
        )
        top = top_score_mean(x, table, rows, self.bg_topk)
        cand = rows[(top > threshold) & (rows != lab)]
        cand = cand[self.warm(cand)]
        if len(cand) == 0:
            return cand
        lab_t = torch.tensor([int(lab)], device=self.bank.device)
        s_fg = x @ self.bank_mean(lab_t)[0].to(x.dtype)  # [P]
        s_bg = x @ self.bank_mean(cand).to(x.dtype).T  # [P,n]
        return cand[standardised_mse(s_fg, s_bg) > mse_threshold]

    @in_fp32
    def attention(
        self,
        emb: Tensor,
        lab: int,
        others: list[int] | Tensor,
        table: Tensor,
        bg_threshold: float | None = None,
        candidates: Tensor | None = None,
        bg_mse_threshold: float | None = None,
    ) -> Tensor:
        """A [h,w] for label lab of one image; emb [d,h,w] unit; others = the image's other
        labels (empty for a single-label image, which then selects its background among
        ``candidates`` with bg_threshold / bg_mse_threshold, default the constructor's)."""
        with torch.no_grad():
            x = emb.detach()
            s_fg = self.similarity(x, lab)
            others = torch.as_tensor(others, dtype=torch.long, device=self.bank.device)
            if len(others):
                bg = others[self.warm(others)]
            else:
                bg = self._single_label_background(
                    x.reshape(x.shape[0], -1).T,
                    lab,
                    table.detach(),
                    self.bg_threshold if bg_threshold is None else bg_threshold,
                    self.bg_mse_threshold if bg_mse_threshold is None else bg_mse_threshold,
                    candidates,
                )
            if len(bg):
                s_bg = torch.einsum("dhw,nd->hw", x, self.bank_mean(bg).to(x.dtype)) / len(bg)
            else:
                s_bg = 1.0 - s_fg
            diff = s_fg - s_bg
            return torch.sigmoid((diff - diff.mean()) / (diff.std(correction=0) + 1e-5))

    @in_fp32
    def loss(
        self,
        emb: Tensor,
        labels: list[Tensor],
        table: Tensor,
        scale: float,
        k: int | None = None,
        bg_threshold: float | None = None,
        candidates: Tensor | None = None,
        bg_mse_threshold: float | None = None,
    ) -> Tensor:
        """CA loss over every (image, label) pair, then enqueue this batch.

        Args:
            emb: x [B,d,h,w] unit embeddings at the feature grid (with gradient).
            labels: B LongTensors of unique rows (global ids).
            table: mu [C,d], the full table (the bank is indexed by its rows).
            scale: s.
            k: negatives of the pooled CE: the target plus its k nearest candidate rows outside
                the label set (None = all of them; too many at 21K classes).
            bg_threshold: single-label background threshold for this batch's source
                (LarvSeg: 0.35 for ImageNet); None = the one given at construction.
            candidates: LongTensor of global rows of this batch's source: the only rows that can
                be single-label background classes or negatives of the pooled CE (None = all).
                Every label must be among them.
            bg_mse_threshold: the MSE filter's threshold for this source (reference ImageNet
                config: 2.0); None = the one given at construction.
        Returns:
            scalar: mean over pairs, cold pairs count 0; 0 (with grad) when nothing is warm.
        """
        if emb.dim() != 4 or len(labels) != emb.shape[0]:
            raise ValueError(
                f"CAClassifier.loss needs emb [B,d,h,w] and B label tensors, got "
                f"{tuple(emb.shape)} and {len(labels)}"
            )
        pairs = [(b, int(lab)) for b, L in enumerate(labels) for lab in L.reshape(-1).tolist()]
        for b, lab in pairs:
            if not 0 <= lab < self.num_classes:
                raise ValueError(f"image {b}: label {lab} outside [0, {self.num_classes})")
        local = None
        if candidates is not None:
            candidates = candidates.reshape(-1).to(table.device).long()
            if len(candidates) and (
                int(candidates.min()) < 0 or int(candidates.max()) >= len(table)
            ):
                raise ValueError(f"candidates outside the table's rows [0, {len(table)})")
            local = torch.full((len(table),), -1, dtype=torch.long, device=table.device)
            local[candidates] = torch.arange(len(candidates), device=table.device)
            missing = [lab for _, lab in pairs if int(local[lab]) < 0]
            if missing:
                raise ValueError(f"labels {sorted(set(missing))} are not among the candidates")
        if not pairs:
            # still take part in the all-gather: the other processes may have pairs to push
            self._push(emb.new_zeros(0, emb.shape[1]), torch.zeros(0, dtype=torch.long))
            return zero_with_grad(emb, table)
        cls = torch.tensor([lab for _, lab in pairs], device=emb.device)
        warm = self.warm(cls).tolist()
        pooled, target, excluded = [], [], []
        for (b, lab), is_warm in zip(pairs, warm):
            if not is_warm:
                continue
            L = labels[b].reshape(-1).to(emb.device)
            A = self.attention(
                emb[b], lab, L[L != lab], table, bg_threshold, candidates, bg_mse_threshold
            )
            pooled.append((emb[b] * A).mean(dim=(1, 2)))
            target.append(lab)
            excluded.append(L)
        if pooled:
            tgt = torch.tensor(target, device=table.device)
            if local is None:
                rows_table = table
            else:  # restrict to the source's rows: local ids into table[candidates]
                rows_table = table[candidates]
                tgt = local[tgt]
                excluded = [local[L.to(table.device)] for L in excluded]
                excluded = [e[e >= 0] for e in excluded]
            per_pair = pooled_ce(torch.stack(pooled), tgt, excluded, rows_table, scale, k=k)
            out = per_pair.sum() / len(pairs)
        else:
            out = zero_with_grad(emb, table)
        # enqueue after scoring: the score above used the bank before this batch
        with torch.no_grad():
            mu = table.detach()
            slots = [
                self._slot_mean(
                    emb[b], torch.einsum("dhw,d->hw", emb[b].detach(), mu[lab].to(emb.dtype))
                )
                for b, lab in pairs
            ]
            self._push(torch.stack(slots), cls)
        return out


def _all_gather_padded(slots: Tensor, classes: Tensor) -> tuple[Tensor, Tensor]:
    """Concatenate (slots [n,d], classes [n]) of every process in rank order; n may differ."""
    world = dist.get_world_size()
    n = torch.tensor([classes.numel()], device=slots.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    n_max = int(max(s.item() for s in sizes))
    pad_s = slots.new_zeros(n_max, slots.shape[1])
    pad_c = classes.new_full((n_max,), -1)
    pad_s[: len(classes)], pad_c[: len(classes)] = slots, classes
    all_s = [torch.zeros_like(pad_s) for _ in range(world)]
    all_c = [torch.zeros_like(pad_c) for _ in range(world)]
    dist.all_gather(all_s, pad_s)
    dist.all_gather(all_c, pad_c)
    s, c = torch.cat(all_s), torch.cat(all_c)
    return s[c >= 0], c[c >= 0]
