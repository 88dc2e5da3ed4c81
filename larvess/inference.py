"""Sliding-window inference (LarvSeg protocol: short side 512, 512 windows, stride 512).

The defaults here are LarvSeg's; a trained run has its own (its recipe's ``eval:`` section):
``larvess.Predictor.from_run(run).predict(image)`` applies them, as the commands do.

Pipeline for one image [H, W, 3] uint8:

1. normalise, resize so the short side is ``short_side`` (bilinear, aspect kept);
2. cut ``window`` x ``window`` crops every ``stride`` pixels, the last crop of each axis aligned
   to the border (mmseg ``slide_inference``); an axis shorter than the window is zero-padded
   (= the mean colour after normalisation) to the full window and the padding cropped away from
   the output, so the segmenter always sees the resolution it is evaluated at;
3. run the segmenter on batches of crops -> x [b, d, window/p, window/p], upsample bilinearly to
   the window and re-normalise (the training-time embedding x_p);
4. average x_p over the windows covering each pixel, resize the averaged map bilinearly to
   [H, W] and take argmax_c x_p . mu_c over the K evaluated rows.

The score z_pc = s x_p . mu_c is linear in x_p and bilinear resizing is linear, so averaging the
embeddings and resizing them before the dot product gives exactly the logits mmseg computes
(average logits over windows, resize logits, argmax), while the buffers hold d instead of K
channels. For K > ``knn_threshold`` the argmax is ``larvess.knn.search(k=1)`` on the averaged,
resized embeddings re-normalised to unit length (the scale does not change the argmax).

Roll-up (larvess/rollup.py) is the same argmax over the voting rows, each labelled with its class.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from larvess.data.transforms import normalize
from larvess.model import upsample_embeddings

EmbedFn = Callable[[torch.Tensor], torch.Tensor]  # images [b,3,H,W] -> x [b,d,h,w] (a Segmenter)


def preprocess(image: np.ndarray | Image.Image) -> torch.Tensor:
    """uint8 RGB [H, W, 3] (numpy or PIL) -> float32 [3, H, W] normalised with MEAN / STD."""
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    if (
        not isinstance(image, np.ndarray)
        or image.dtype != np.uint8
        or image.ndim != 3
        or image.shape[2] != 3
    ):
        desc = (
            f"{image.dtype} {image.shape}"
            if isinstance(image, np.ndarray)
            else type(image).__name__
        )
        raise ValueError(f"inference.preprocess: expected a uint8 [H, W, 3] image, got {desc}")
    return normalize(image)


def resize_short_side(img: torch.Tensor, short_side: int) -> torch.Tensor:
    """[3, H, W] -> [3, h, w] with min(h, w) = short_side, aspect ratio kept (bilinear)."""
    h, w = img.shape[-2:]
    scale = short_side / min(h, w)
    size = (max(1, int(h * scale + 0.5)), max(1, int(w * scale + 0.5)))
    if size == (h, w):
        return img
    return F.interpolate(img[None], size=size, mode="bilinear", align_corners=False)[0]


def window_starts(length: int, window: int, stride: int) -> list[int]:
    """Start offsets along one axis: every ``stride``, the last one aligned to the border.

    An axis not longer than the window has the single start 0.
    """
    if length <= window:
        return [0]
    n = -(-(length - window) // stride) + 1
    return [min(i * stride, length - window) for i in range(n)]


def _default_device(segmenter: EmbedFn) -> torch.device:
    if isinstance(segmenter, torch.nn.Module):
        for p in segmenter.parameters():
            return p.device
    return torch.device("cpu")


@torch.no_grad()
def slide_embeddings(
    segmenter: EmbedFn,
    img: torch.Tensor,
    window: int = 512,
    stride: int = 512,
    batch_size: int = 8,
    amp: bool = False,
    progress: bool = False,
) -> torch.Tensor:
    """Window-averaged pixel embeddings of one normalised image.

    Args:
        segmenter: images [b, 3, window, window] -> normalised x [b, d, h', w'].
        img: float [3, H, W] normalised, on the device the segmenter runs on.
        amp: bf16 autocast for the segmenter on CUDA.
    Returns:
        float32 [d, H, W]: mean over covering windows of the upsampled, re-normalised x_p
        (not re-normalised after averaging, so that it stays linear in the per-window logits).
    """
    if window <= 0 or stride <= 0 or stride > window:
        raise ValueError(
            f"inference: need 0 < stride <= window, got window={window} stride={stride}"
        )
    _, h, w = img.shape
    boxes = [
        (y, x) for y in window_starts(h, window, stride) for x in window_starts(w, window, stride)
    ]
    wh, ww = min(window, h), min(window, w)
    total = count = None
    use_amp = amp and img.device.type == "cuda"
    for i in tqdm(range(0, len(boxes), batch_size), disable=not progress, desc="windows"):
        chunk = boxes[i : i + batch_size]
        crops = torch.stack([img[:, y : y + wh, x : x + ww] for y, x in chunk])
        crops = F.pad(crops, (0, window - ww, 0, window - wh))
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
            x = segmenter(crops)
        emb = upsample_embeddings(x.float(), (window, window))[:, :, :wh, :ww]
        if total is None:
            total = img.new_zeros((emb.shape[1], h, w), dtype=torch.float32)
            count = img.new_zeros((h, w), dtype=torch.float32)
        for (y, x0), emb_win in zip(chunk, emb):
            total[:, y : y + wh, x0 : x0 + ww] += emb_win
            count[y : y + wh, x0 : x0 + ww] += 1
    return total / count


def _linear_source(n_in: int, n_out: int, device: torch.device) -> tuple:
    """Indices and weights of 1-D linear interpolation, align_corners=False (PyTorch's rule)."""
    dst = torch.arange(n_out, device=device, dtype=torch.float64)
    src = ((dst + 0.5) * (n_in / n_out) - 0.5).clamp_(min=0.0)
    i0 = src.floor().long().clamp_(max=n_in - 1)
    i1 = (i0 + 1).clamp_(max=n_in - 1)
    w1 = (src - i0).float()
    return i0, i1, 1.0 - w1, w1


@torch.no_grad()
def classify_embeddings(
    x: torch.Tensor,
    rows_mu: torch.Tensor,
    out_size: tuple[int, int],
    knn_threshold: int = 4096,
    max_scores: int = 1 << 24,
    classes: torch.Tensor | None = None,
) -> torch.Tensor:
    """Resize embeddings to ``out_size`` (bilinear) and label each pixel with its best row.

    Args:
        x: float [d, h, w] (window-averaged) embeddings.
        rows_mu: float [K, d] normalised rows of the evaluated vocabulary; with ``classes``,
            [P, d] rows labelled by ``classes``.
        out_size: (H, W) of the original image.
        knn_threshold: above this K, use ``larvess.knn.search`` (k=1) instead of a matmul.
        max_scores: cap on the [pixels, K] score block held at once (the resize runs in strips
            of output rows, so no [d, H, W] or [K, H, W] map of the full image is ever built).
        classes: LongTensor [P], a label per row: each pixel takes the label of its best row
            (larvess/rollup.py: the argmax of the rolled-up class scores is the class of the
            best voting row, so roll-up is this relabelled argmax, kNN path included).
    Returns:
        LongTensor [H, W] on x's device: indices into the K rows (into the classes with
        ``classes``).
    """
    d, h, w = x.shape
    k = rows_mu.shape[0]
    if rows_mu.ndim != 2 or rows_mu.shape[1] != d:
        raise ValueError(
            f"inference: rows_mu must be [K, {d}] to match the embeddings, got {tuple(rows_mu.shape)}"
        )
    if classes is not None:
        if classes.shape != (k,):
            raise ValueError(
                f"inference: classes must be [{k}] (a label per row), got {tuple(classes.shape)}"
            )
        classes = classes.to(x.device)
    if k == 0:
        raise ValueError("inference: no row to choose from (no class has a trained row)")
    big = k > knn_threshold
    if big:
        from larvess.knn import search
    out_h, out_w = out_size
    mu = rows_mu.to(x.device, torch.float32)
    y0, y1, wy0, wy1 = _linear_source(h, out_h, x.device)
    c0, c1, wc0, wc1 = _linear_source(w, out_w, x.device)
    pred = torch.empty((out_h, out_w), dtype=torch.long, device=x.device)
    pixels = (1 << 16) if big else max(1, max_scores // k)
    strip = max(1, pixels // out_w)
    for r in range(0, out_h, strip):
        rows = slice(r, min(r + strip, out_h))
        xs = x[:, y0[rows]] * wy0[rows, None] + x[:, y1[rows]] * wy1[rows, None]
        xs = xs[:, :, c0] * wc0 + xs[:, :, c1] * wc1
        queries = xs.flatten(1).T
        if big:
            best = search(F.normalize(queries, dim=1), mu, k=1)[:, 0]
        else:
            best = (queries @ mu.T).argmax(dim=1)
        if classes is not None:
            best = classes[best]
        pred[rows] = best.view(-1, out_w)
    return pred


def embed_image(
    segmenter: EmbedFn,
    image: np.ndarray | Image.Image | torch.Tensor,
    window: int = 512,
    stride: int = 512,
    short_side: int | None = 512,
    batch_size: int = 8,
    device: torch.device | str | None = None,
    amp: bool = False,
    progress: bool = False,
) -> tuple[torch.Tensor, tuple[int, int]]:
    """Steps 1-3 of the protocol: (x float [d, h, w] window-averaged embeddings on the device,
    (H, W) of the original image). ``classify_embeddings`` labels them; arguments as in
    ``slide_inference``. Several protocols (plain, roll-up) can share one call."""
    img = image if isinstance(image, torch.Tensor) else preprocess(image)
    if img.ndim != 3 or img.shape[0] != 3 or not img.is_floating_point():
        raise ValueError(
            f"inference: image tensor must be float [3, H, W], got {img.dtype} {tuple(img.shape)}"
        )
    dev = torch.device(device) if device is not None else _default_device(segmenter)
    out_size = (int(img.shape[-2]), int(img.shape[-1]))
    img = img.to(dev, torch.float32)
    if short_side is not None:
        img = resize_short_side(img, short_side)
    was_training = isinstance(segmenter, torch.nn.Module) and segmenter.training
    if was_training:
        segmenter.eval()
    try:
        x = slide_embeddings(segmenter, img, window, stride, batch_size, amp, progress)
    finally:
        if was_training:
            segmenter.train()
    return x, out_size


def slide_inference(
    segmenter: EmbedFn,
    rows_mu: torch.Tensor,
    image: np.ndarray | Image.Image | torch.Tensor,
    window: int = 512,
    stride: int = 512,
    short_side: int | None = 512,
    batch_size: int = 8,
    device: torch.device | str | None = None,
    knn_threshold: int = 4096,
    amp: bool = False,
    progress: bool = False,
    classes: torch.Tensor | None = None,
) -> torch.LongTensor:
    """Predict one image with sliding windows (see the module docstring for the protocol).

    Args:
        segmenter: callable images [b, 3, window, window] -> normalised x [b, d, h', w']
            (an nn.Module is switched to eval mode for the call and restored afterwards).
        rows_mu: float [K, d] normalised class rows to choose from ([P, d] with ``classes``).
        image: uint8 [H, W, 3] numpy / PIL, or an already normalised float tensor [3, H, W].
        short_side: resize so that min(h, w) = short_side before sliding; None = keep the size.
        device: where the segmenter runs; None = the device of its parameters (CPU for a plain
            callable without parameters).
        knn_threshold: K above which the kNN search (k=1) replaces the matmul argmax.
        amp: bf16 autocast on CUDA.
        classes: LongTensor [P], a label per row (``classify_embeddings``; roll-up).
    Returns:
        LongTensor [H, W] on the CPU: for each pixel of the original image, an index into rows_mu
        (into the classes with ``classes``).
    """
    x, out_size = embed_image(
        segmenter, image, window, stride, short_side, batch_size, device, amp, progress
    )
    return classify_embeddings(x, rows_mu, out_size, knn_threshold, classes=classes).cpu()
