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
  source's rows, classes b != l whose mean of the top-5 raw cosine pixel scores x_p . mu_b
  exceeds ``bg_threshold`` (0.2; 0.35 ImageNet), that are warm, and that pass the MSE filter
  (standardised S_fg and S_b differ by more than ``bg_mse_threshold``: 1.0; 2.0 in the
  reference's ImageNet config).
With none, S_bg = 1 - S_fg.

Negatives of the pooled CE: the source's rows outside the image's label set, all of them (k=None)
or the k nearest of the pooled embedding.

Warm-up: the loss term of pair (image, l) is 0 until class l's ring has been filled ``warm_up``
times (count >= warm_up * M, at least one enqueue); the loss is the mean over all pairs.

State. ``loss`` is pure: it scores against the bank as it is and changes nothing. What a batch
would push is ``slots`` (its own call); the train loop pushes it with ``push`` in the state phase
of an applied, finite step, so a skipped step leaves the bank as it was. Under gradient
accumulation every micro-batch of a step scores against the bank of the step's start, and the
step pushes all its micro-batches' slots in order after the optimiser step.

Distributed: every push is all-gathered (torch.distributed, when initialised) and applied in
rank order, so all processes hold the identical bank.

No host waits in ``loss`` and ``slots``: every pair is scored at once, cold pairs masked; sizes
come from label counts (host ints), never from tensor values.

Precision: loss / slots / similarity / attention run under ``in_fp32`` (autocast off, fp32).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from larvess.ca_background import background_scores
from larvess.losses import LabelPairs, label_pairs, pooled_ce
from larvess.numerics import in_fp32, zero_with_grad

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
        """[n,d] mean of the filled slots of each class (zeros for an empty ring).

        Slots not yet written are zero (the ring fills 0, 1, ... before it wraps), so the sum
        over all M slots is the sum over the filled ones: no [n,M,d] gather."""
        classes = classes.to(self.bank.device)
        filled = self.count[classes].clamp(min=1, max=self.bank_size)
        return self.bank.sum(dim=1)[classes] / filled[:, None].to(self.bank.dtype)

    @in_fp32
    def slots(self, emb: Tensor, score: Tensor) -> Tensor:
        """[n,d]: per image the mean of the normalised embeddings of its topk highest-score
        pixels; emb [n,d,h,w] (or one image [d,h,w]), score [n,h,w] (or [h,w])."""
        x, score = emb.detach(), score.detach()
        if x.dim() == 3:
            x, score = x[None], score[None]
        x = x.flatten(2)  # [n,d,Q]
        top = score.flatten(1).topk(min(self.topk, x.shape[2]), dim=1).indices  # [n,K]
        picked = x.gather(2, top[:, None, :].expand(-1, x.shape[1], -1))  # [n,d,K]
        return F.normalize(picked, dim=1).mean(dim=2)

    def enqueue(self, emb: Tensor, score: Tensor, c: int) -> None:
        """Push the topk highest-``score`` pixels of one image as one slot of class c.

        emb [d,h,w], score [h,w]. A collective when torch.distributed is initialised: every
        process must call it the same number of times."""
        if not 0 <= int(c) < self.num_classes:
            raise ValueError(f"enqueue: class {int(c)} outside [0, {self.num_classes})")
        self.push(self.slots(emb, score), torch.tensor([int(c)]))

    @torch.no_grad()
    def push(self, slots: Tensor, classes: Tensor) -> None:
        """FIFO-write slots [n,d] of classes [n] (all-gathered across processes first): the
        state change of the bank, called once per applied step by the train loop."""
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
    def _pairs(self, emb: Tensor, labels: list[Tensor] | LabelPairs) -> LabelPairs:
        pairs = labels if isinstance(labels, LabelPairs) else label_pairs(labels, emb.device)
        if emb.dim() != 4 or len(pairs.counts) != emb.shape[0]:
            raise ValueError(
                f"CAClassifier needs emb [B,d,h,w] and B label tensors, got "
                f"{tuple(emb.shape)} and {len(pairs.counts)}"
            )
        return pairs

    @in_fp32
    def attention_of_pairs(
        self,
        x: Tensor,
        pairs: LabelPairs,
        table: Tensor,
        rows: Tensor,
        bg_threshold: float,
        bg_mse_threshold: float,
    ) -> Tensor:
        """A [P,Q] for every pair: x [B,d,Q] the images (unit, detached), table mu_s [R,d] the
        source's rows, rows [R] their bank classes; pairs in local ids (< R)."""
        x_img, x = x, x[pairs.image]  # [B,d,Q], [P,d,Q]
        means = self.bank_mean(rows).to(x.dtype)  # [R,d]: the source's rings
        warm = self.warm(rows)  # [R]
        related = pairs.related_mask(len(rows))  # [P,R] with the tree: never background
        s_fg = torch.einsum("pdq,pd->pq", x, means[pairs.target])
        # the image's other labels: background of a multi-label image
        others = pairs.excluded()  # [P,E]
        on = (others >= 0) & (others != pairs.target[:, None])
        on &= warm[others.clamp(min=0)]
        if related is not None:  # its own expansion (ancestors) is not a label's background
            on &= ~related.gather(1, others.clamp(min=0))
        bg_sum = torch.einsum("pdq,ped,pe->pq", x, means[others.clamp(min=0)], on.to(x.dtype))
        bg_cnt = on.sum(dim=1)
        single = [i for i, one in enumerate(pairs.is_single()) if one]  # host bools
        if single:  # single-label images: the reference's threshold + MSE rule
            idx = torch.tensor(single).to(x.device, non_blocking=True)
            s_sum, s_cnt = background_scores(
                x_img.transpose(1, 2), _runs([pairs.pair_images()[i] for i in single]),
                s_fg[idx], pairs.target[idx], table, means, warm,
                bg_threshold, bg_mse_threshold, self.bg_topk,
                barred=None if related is None else related[idx],
            )  # fmt: skip
            bg_sum, bg_cnt = bg_sum.index_copy(0, idx, s_sum), bg_cnt.index_copy(0, idx, s_cnt)
        s_bg = torch.where(bg_cnt[:, None] > 0, bg_sum / bg_cnt.clamp(min=1)[:, None], 1 - s_fg)
        diff = s_fg - s_bg
        mean, std = diff.mean(dim=1, keepdim=True), diff.std(dim=1, correction=0, keepdim=True)
        return torch.sigmoid((diff - mean) / (std + 1e-5))

    @in_fp32
    def attention(
        self,
        emb: Tensor,
        lab: int,
        others: list[int] | Tensor,
        table: Tensor,
        bg_threshold: float | None = None,
        bg_mse_threshold: float | None = None,
    ) -> Tensor:
        """A [h,w] for label lab of one image; emb [d,h,w] unit; others = the image's other
        labels (empty for a single-label image, which then selects its background among all
        rows of ``table`` with bg_threshold / bg_mse_threshold, default the constructor's)."""
        labels = [torch.tensor([int(lab), *[int(o) for o in others]])]
        pairs = label_pairs(labels, emb.device)
        first = LabelPairs(pairs.image[:1], pairs.target[:1], pairs.label_set, pairs.counts)
        rows = torch.arange(len(table), device=emb.device)
        A = self.attention_of_pairs(
            emb.detach().flatten(1)[None], first, table.detach(), rows,
            self.bg_threshold if bg_threshold is None else bg_threshold,
            self.bg_mse_threshold if bg_mse_threshold is None else bg_mse_threshold,
        )  # fmt: skip
        return A.view(emb.shape[1:])

    @in_fp32
    def loss(
        self,
        emb: Tensor,
        labels: list[Tensor] | LabelPairs,
        table: Tensor,
        scale: float,
        k: int | None = None,
        bg_threshold: float | None = None,
        rows: Tensor | None = None,
        bg_mse_threshold: float | None = None,
    ) -> Tensor:
        """CA loss over every (image, label) pair, scored against the bank as it is (pure).

        Args:
            emb: x [B,d,h,w] unit embeddings at the feature grid (with gradient).
            labels: B LongTensors of unique rows of ``table`` (or their ``label_pairs``).
            table: mu_s [R,d], the source's rows: the only rows that can be single-label
                background classes or negatives of the pooled CE.
            scale: s.
            k: negatives of the pooled CE: the target plus its k nearest rows outside the label
                set (None = all of them; too many at 21K classes).
            bg_threshold: single-label background threshold for this batch's source
                (LarvSeg: 0.35 for ImageNet); None = the one given at construction.
            rows: LongTensor [R], the bank class of each row of ``table`` (the source's
                vocabulary rows); None = table is the full table (rows 0..C-1).
            bg_mse_threshold: the MSE filter's threshold for this source (reference ImageNet
                config: 2.0); None = the one given at construction.
        Returns:
            scalar: mean over pairs, cold pairs count 0; 0 (with grad) when there is no pair.
        """
        pairs = self._pairs(emb, labels)
        if pairs.num == 0:
            return zero_with_grad(emb, table)
        rows = torch.arange(len(table), device=emb.device) if rows is None else rows
        rows = rows.to(self.bank.device)
        x = emb[pairs.image].flatten(2)  # [P,d,Q]
        with torch.no_grad():
            A = self.attention_of_pairs(
                emb.detach().flatten(2), pairs, table.detach(), rows,
                self.bg_threshold if bg_threshold is None else bg_threshold,
                self.bg_mse_threshold if bg_mse_threshold is None else bg_mse_threshold,
            )  # fmt: skip
        pooled = (x * A[:, None, :]).mean(dim=2)
        related = pairs.related_mask(len(table))
        per_pair = pooled_ce(
            pooled, pairs.target, pairs.excluded(), table, scale, k=k, related=related
        )
        warm = self.warm(rows[pairs.target])
        return torch.where(warm, per_pair, 0.0).sum() / pairs.num

    @in_fp32
    def pending(
        self,
        emb: Tensor,
        labels: list[Tensor] | LabelPairs,
        table: Tensor,
        rows: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """What this batch would push, one slot per (image, label) pair: (slots [P,d], bank
        classes [P]); each slot from the image's topk pixels by detached score x . mu_l.
        Arguments as for ``loss``."""
        pairs = self._pairs(emb, labels)
        rows = torch.arange(len(table), device=emb.device) if rows is None else rows
        x = emb.detach()[pairs.image]
        score = torch.einsum("pdhw,pd->phw", x, table.detach()[pairs.target].to(x.dtype))
        return self.slots(x, score), rows.to(pairs.target.device)[pairs.target]


def _runs(images: list[int]) -> list[tuple[int, int, int]]:
    """Host image ids of consecutive pairs -> (image, first, end) runs."""
    out: list[tuple[int, int, int]] = []
    for i, b in enumerate(images):
        if out and out[-1][0] == b and out[-1][2] == i:
            out[-1] = (b, out[-1][1], i + 1)
        else:
            out.append((b, i, i + 1))
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
