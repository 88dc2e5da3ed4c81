"""PC2Seg pixel-contrastive regulariser (Zhong et al., "Pixel Contrastive-Consistent
Semi-Supervised Semantic Segmentation", ICCV 2021, and its supplementary material).

An image (here: an image-labelled one) is seen in two views with the same geometry and different
photometric augmentation, so pixel p of view 1 and pixel p of view 2 show the same content. With
x1_p, x2_p the unit embeddings of p in the two views, the loss of anchor p is the InfoNCE

    l_p = -log( e^{x1_p . x2_p / tau} / (e^{x1_p . x2_p / tau} + sum_n e^{x1_p . x2_{j_pn} / tau}) )

(cosine similarity = dot product of unit vectors): pulled to the same pixel in the other view,
pushed from N sampled negative pixels j_p1..j_pN of the other view. The loss is the mean of l_p
over the anchors that have negatives.

Negatives, as the supplementary states them (Sec. C, "Training Time and Computational Cost"):
- N = 200 negative pixels per anchor ("if we only draw 200 negative pixels ... [4*33^2, 200]").
- Drawn from the pixels of the whole batch: its "all pixels as negatives" baseline is the
  [4*33^2, 4*33^2] matrix over all pixels of all 4 images, i.e. other images' pixels included.
- Pseudo labels filter them: "the negative sampling itself requires (4*33^2)^2 * 20 operations to
  compare the pseudo labels", a comparison of every anchor with every candidate pixel. Here: with
  ``pseudo`` given, a negative never shares the anchor's pseudo label (false negatives removed);
  without it, negatives are uniform over all other pixels.
  (The count of 20 per pair suggests the paper compares 20-class pseudo-label distributions; we
  compare hard labels, which needs no per-pixel distribution over 21K classes.)
- Sampling is uniform with replacement (the supplementary does not say which), never the anchor's
  own pixel, never an invalid pixel.
Temperature: the supplementary we hold does not state tau. ``PC2SEG_TAU = 0.5`` is the default
here, recalled from the main paper and NOT verified against it (we hold only the
supplementary); the recipe should set it explicitly. Projection: the paper applies the loss to a
128-d projection of Conv5 features (supplementary Tab. B.1, Fig. D.1); here to whatever unit
embeddings the caller passes (larvess: the d-dim pixel embeddings).

The sampling is a separate function taking a ``torch.Generator`` so that a test can redraw the
same negatives; the loss gathers negatives in chunks (numerics.gather_dot), never an [N, N] matrix.
"""

from __future__ import annotations

import torch
from torch import Tensor

from larvess import knn
from larvess.numerics import gather_dot, in_fp32, zero_with_grad

__all__ = [
    "PC2SEG_NEGATIVES",
    "PC2SEG_TAU",
    "sample_negatives",
    "pseudo_labels",
    "pixel_contrastive_loss",
]

PC2SEG_NEGATIVES = 200  # supplementary Sec. C
PC2SEG_TAU = 0.5  # not stated in the supplementary; see the module docstring


def sample_negatives(
    num_pixels: int,
    num_negatives: int = PC2SEG_NEGATIVES,
    generator: torch.Generator | None = None,
    pseudo: Tensor | None = None,
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor]:
    """Negative indices for each of ``num_pixels`` anchors, drawn among the same pixels.

    Args:
        num_pixels: M pixels (anchors and candidates are the same list, e.g. a batch's valid
            pixels flattened).
        num_negatives: K per anchor (with replacement).
        generator: torch.Generator for the draw (its device is where the draw happens; without
            one, the global generator of ``device``).
        pseudo: optional LongTensor [M] of pseudo labels: a negative never has the anchor's.
        device: device of the outputs (default: pseudo's, else CPU).
    Returns:
        (idx LongTensor [M,K] in [0, M), ok BoolTensor [M]): ok is False for an anchor with no
        eligible pixel (M = 1, or every pixel shares its pseudo label); its row is all 0.
    """
    M, K = int(num_pixels), int(num_negatives)
    if device is None:
        device = pseudo.device if pseudo is not None else "cpu"
    gen_dev = generator.device if generator is not None else device  # no host copy by default
    u = torch.rand(M, K, generator=generator, dtype=torch.float64, device=gen_dev).to(device)
    if pseudo is None:
        n_other = torch.full((M,), M - 1, dtype=torch.long, device=device)
        r = torch.minimum((u * n_other[:, None]).long(), (n_other - 1).clamp(min=0)[:, None])
        own = torch.arange(M, device=device)[:, None]
        idx = r + (r >= own).long()  # skip the anchor itself
    else:
        pseudo = pseudo.reshape(-1).to(device)
        if len(pseudo) != M:
            raise ValueError(f"pseudo must have {M} entries, got {len(pseudo)}")
        order = torch.sort(pseudo, stable=True).indices  # pixels grouped by pseudo label
        _, inv, counts = torch.unique(pseudo, return_inverse=True, return_counts=True)
        starts = torch.cumsum(counts, 0) - counts
        start, n_same = starts[inv], counts[inv]  # the anchor's block in ``order``
        n_other = M - n_same
        r = torch.minimum((u * n_other[:, None]).long(), (n_other - 1).clamp(min=0)[:, None])
        r = r + (r >= start[:, None]).long() * n_same[:, None]  # skip the anchor's block
        idx = order[r.clamp(max=M - 1)] if M else r
    ok = n_other > 0
    return idx.masked_fill(~ok[:, None], 0), ok


def pseudo_labels(emb: Tensor, table: Tensor, backend: str = "auto") -> Tensor:
    """[B,d,h,w] unit embeddings -> [B,h,w] row of ``table`` with the highest cosine (pass
    ``mu[rows]`` to label among a source's classes; the result is then a local index)."""
    B, d, h, w = emb.shape
    x = emb.detach().permute(0, 2, 3, 1).reshape(-1, d)
    return knn.search(x, table, 1, backend=backend)[:, 0].view(B, h, w)


@in_fp32
def pixel_contrastive_loss(
    x1: Tensor,
    x2: Tensor,
    num_negatives: int = PC2SEG_NEGATIVES,
    tau: float = PC2SEG_TAU,
    generator: torch.Generator | None = None,
    valid: Tensor | None = None,
    pseudo: Tensor | None = None,
    negatives: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """PC2Seg pixel contrastive loss of view-1 anchors against view 2 (fp32 math).

    Args:
        x1, x2: [B,d,h,w] unit embeddings of the same pixels in two views (same geometry).
        num_negatives: N per anchor (PC2Seg: 200).
        tau: temperature.
        generator: for the negative draw (``sample_negatives``).
        valid: optional BoolTensor [B,h,w]; only valid pixels are anchors or negatives.
        pseudo: optional LongTensor [B,h,w] pseudo labels: negatives differ from the anchor's.
        negatives: optional precomputed ``sample_negatives`` output over the valid pixels
            (flattened in [B,h,w] order), instead of drawing.
    Returns:
        scalar mean over anchors with negatives; 0 (with grad) when there is none.
    """
    if x1.dim() != 4 or x1.shape != x2.shape:
        raise ValueError(
            f"x1 and x2 must be the same [B,d,h,w], got {tuple(x1.shape)}, {tuple(x2.shape)}"
        )
    B, d, h, w = x1.shape
    a = x1.permute(0, 2, 3, 1).reshape(-1, d)
    p = x2.permute(0, 2, 3, 1).reshape(-1, d)
    lab = None if pseudo is None else pseudo.reshape(-1).to(x1.device)
    if valid is not None:
        if tuple(valid.shape) != (B, h, w):
            raise ValueError(f"valid must be [B,h,w]={(B, h, w)}, got {tuple(valid.shape)}")
        keep = valid.reshape(-1).to(x1.device)
        a, p = a[keep], p[keep]
        lab = None if lab is None else lab[keep]
    M = a.shape[0]
    if negatives is None:
        negatives = sample_negatives(M, num_negatives, generator, lab, device=x1.device)
    idx, ok = negatives
    if tuple(idx.shape[:1]) != (M,) or tuple(ok.shape) != (M,):
        raise ValueError(f"negatives must be ([{M},K], [{M}]), got {tuple(idx.shape)}")
    if M == 0 or not bool(ok.any()):
        return zero_with_grad(x1, x2)
    pos = (a * p).sum(dim=1, keepdim=True) / tau  # [M,1]
    neg = gather_dot(a, p, idx.to(x1.device)) / tau  # [M,K]: x1_i . x2_j
    logits = torch.cat([pos, neg], dim=1)
    per_anchor = torch.logsumexp(logits, dim=1) - logits[:, 0]
    return per_anchor[ok.to(x1.device)].mean()
