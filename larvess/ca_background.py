"""Single-label background of the CA-Classifier, as the official LarvSeg code selects it.

Reference: github.com/HaojunYu1998/LarvSeg, ``mmseg/models/decode_heads/larv_seg_head.py``
(``LarvSegHead._coseg_score`` and the module-level ``mse``; the identical code is in
``mask_transformer_extend_voc_head.py``, the head of the released coseg configs). For a label l
of an image without other labels:

1. score[p, c] = the raw cosine x_p . mu_c (the head's ``scores``: detached, before its logit
   norm, at the feature grid) for every class c of the batch's dataset (``cls_index``).
2. bg_scores[c] = mean of the top ``background_topk`` = 5 values of score[:, c] over the pixels.
3. background = {c : bg_scores[c] > background_thresh} minus l.
4. The "MSE filter": S_fg [P] (mean cosine to l's memory) and each S_bg,c [P] are standardised
   over the pixels, (s - mean) / std with torch's default *unbiased* std and no epsilon;
   mse_c = mean_p (S_fg' - S_bg,c')^2; keep c with mse_c > background_mse_thresh.
   Since an unbiased-standardised map has sum_p z_p^2 = P - 1, mse_c = 2 (P-1)/P (1 - r_c) with
   r_c the Pearson correlation of S_fg and S_bg,c. So the filter drops background classes whose
   memory response follows the foreground's: r_c >= 1 - P / (2 (P-1)) (~0.5) at threshold 1.0,
   r_c >= -1 / (P-1) (~0) at 2.0 -- synonyms, parents, parts that would cancel the foreground in
   S_fg - S_bg. A constant map (std 0) gives NaN, which never passes: dropped.
5. The surviving S_bg,c are averaged; if none survive, S_bg = 1 - S_fg. (With other labels in
   the image, those are the background: no threshold, no MSE filter.)

Thresholds in the reference: head defaults background_thresh = 0.2, background_mse_thresh = 1.0
(the WA150 + C171 configs, e.g. configs/coseg_coco171_ade150w/*_bg.py, leave them at default);
the ImageNet config configs/coseg_coco171_ade847w_in585/
vitb16_320k_wa847_c171_i585_s100_ib0.2_ab0.2_co_ic0.1_ac0.1_mbs10_wu1_fg20_bg5_bgt0.35_mse2.0.py
sets 0.35 and 2.0.

Deliberate differences:
- Only warm classes (ring filled ``warm_up`` times) count as background. The reference starts
  every ring as random unit vectors, so a cold class contributes ~0 noise that passes the MSE
  filter and dilutes the mean. (An all-zero cold ring here would be dropped by step 4 anyway.)
- Steps 1-5 run for all single-label pairs of a batch at once, in class chunks (exact top-5 per
  class), so no [pixels, C] tensor exists at C = 21K and no step asks the host for a value:
  every candidate is scored and the rule is a mask.
- The reference's ImageNet configs score 100 random classes plus the label (``use_sample_class``);
  here the caller passes ``candidates`` (the source's rows, or a sample of them).
"""

from __future__ import annotations

import torch
from torch import Tensor

from larvess.numerics import block_elems

__all__ = ["top_score_mean", "standardised_mse", "background_scores"]

_SCORE_ELEMS = 1 << 22  # CPU block of [B, P, classes] scores; device-sized on CUDA


def top_score_mean(x: Tensor, table: Tensor, rows: Tensor | None = None, topk: int = 5) -> Tensor:
    """Mean of the ``topk`` highest raw cosines over the pixels, per candidate class (steps
    1-2 on their own; ``background_scores`` computes the same inside its class chunks).

    Args:
        x: [P,d] or [B,P,d] pixel embeddings (unit).
        table: [C,d] class rows (unit).
        rows: LongTensor [n] of candidate rows (None = all C).
        topk: pixels averaged (min(topk, P)).
    Returns:
        [n] or [B,n] in the order of ``rows``.
    """
    single = x.dim() == 2
    xb = x[None] if single else x
    if rows is None:
        rows = torch.arange(table.shape[0], device=table.device)
    B, P, _ = xb.shape
    kk = min(topk, P)
    out = xb.new_empty(B, len(rows))
    block = block_elems(xb.device, _SCORE_ELEMS, elem_bytes=xb.element_size())
    step = max(1, block // max(1, B * P))
    with torch.no_grad():
        for c0 in range(0, len(rows), step):
            mu = table[rows[c0 : c0 + step]].to(xb.dtype)  # [n,d]
            scores = torch.einsum("bpd,nd->bpn", xb.detach(), mu)
            out[:, c0 : c0 + step] = scores.topk(kk, dim=1).values.mean(dim=1)
    return out[0] if single else out


def standardised_mse(fg: Tensor, bg: Tensor) -> Tensor:
    """The reference's ``mse(fg[:, None], bg)``: fg [...,P], bg [...,P,n] -> [...,n] (NaN for a
    constant map); pixels on the second-last axis of bg. Step 4 written as the reference does;
    ``background_scores`` computes it as 2 (P-1)/P (1 - r), and the tests hold the two equal."""

    def z(t: Tensor) -> Tensor:
        return (t - t.mean(dim=-2, keepdim=True)) / t.std(dim=-2, keepdim=True)

    return (z(fg[..., None]) - z(bg)).pow(2).mean(dim=-2)


def background_scores(
    x: Tensor,
    runs: list[tuple[int, int, int]],
    s_fg: Tensor,
    target: Tensor,
    table: Tensor,
    means: Tensor,
    warm: Tensor,
    threshold: float,
    mse_threshold: float,
    topk: int = 5,
    barred: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The single-label background of P pairs at once, as the sum and count of S_b over the
    selected classes b (so S_bg = sum / count, or 1 - S_fg when the count is 0).

    Steps 1-2 (raw cosines, top-5 means) and S_b depend on the image only, so they are computed
    once per image; the pair's part is its MSE filter, through the identity above: mse_c =
    2 (Q-1)/Q (1 - r_c) with r_c the correlation of S_fg and S_b,c, a [pairs, Q] x [Q, n]
    product per image, never a [pairs, Q, classes] tensor. With the tree an image carries its
    label's whole expansion, so this saves a factor of its length.

    Args:
        x: [B,Q,d] detached unit pixels of the images.
        runs: host (image b, first pair, end pair): the pairs of image b are rows first..end-1
            of the pair tensors (pairs come image by image).
        s_fg: [P,Q] the label's memory score S_fg.
        target: [P] the label's row of ``table``.
        table: [R,d] the source's rows (raw cosine scores of steps 1-2).
        means: [R,d] the bank mean of each row (S_b = x . means_b).
        warm: [R] bool, rows whose ring is warm.
        barred: optional [P,R] bool, rows never a pair's background (the tree's related rows).
    Returns:
        (bg_sum [P,Q], bg_count [P]).
    """
    B, Q, _ = x.shape
    P, R = s_fg.shape[0], table.shape[0]
    kk = min(topk, Q)
    bg_sum, bg_cnt = x.new_zeros(P, Q), torch.zeros(P, dtype=torch.long, device=x.device)
    fg_c = s_fg - s_fg.mean(dim=1, keepdim=True)
    fg_sd = s_fg.std(dim=1, keepdim=True)  # unbiased, as the reference's mse()
    block = block_elems(x.device, _SCORE_ELEMS, elem_bytes=x.element_size())
    step = max(1, block // max(1, 2 * B * Q))  # raw and memory scores, [B,Q,n] each
    ids = torch.arange(R, device=x.device)
    for c0 in range(0, R, step):
        c1 = min(R, c0 + step)
        raw = torch.einsum("bqd,nd->bqn", x, table[c0:c1].to(x.dtype))
        top = raw.topk(kk, dim=1).values.mean(dim=1)  # [B,n]
        s_b = torch.einsum("bqd,nd->bqn", x, means[c0:c1].to(x.dtype))
        sb_c = s_b - s_b.mean(dim=1, keepdim=True)
        sb_sd = s_b.std(dim=1)  # [B,n]
        ok = warm[None, c0:c1] & (ids[None, c0:c1] != target[:, None])  # [P,n]
        if barred is not None:
            ok &= ~barred[:, c0:c1]
        for b, i, j in runs:
            r = (fg_c[i:j] @ sb_c[b]) / ((Q - 1) * fg_sd[i:j] * sb_sd[b][None])
            mse = 2 * (Q - 1) / Q * (1 - r)  # NaN for a constant map: never passes
            keep = ok[i:j] & (top[b][None] > threshold) & (mse > mse_threshold)
            bg_sum[i:j] += keep.to(x.dtype) @ s_b[b].T
            bg_cnt[i:j] += keep.sum(dim=1)
    return bg_sum, bg_cnt
