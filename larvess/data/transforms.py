"""Training augmentations on an image and its label map together (LarvSeg / mmseg pipeline).

Order, as mmseg's ADE20K / COCO-Stuff configs: resize (random ratio of a base scale) -> random
crop (cat_max_ratio) -> horizontal flip -> photometric distortion -> normalise -> pad to the crop.

Resize (mmseg ``Resize(img_scale=(4c, c), ratio_range=(0.5, 2.0), keep_ratio=True)``): with
ratio r ~ U(0.5, 2.0), the image is scaled by ``min(r*L / long_side, r*S / short_side)`` where
(L, S) is the base scale (default (4c, c) for crop size c, i.e. (2048, 512) for 512 crops), so the
resized image fits inside (r*L, r*S). With ``pad=False`` (image-level sources) the factor is
raised so the short side is at least c: the crop is then always full and pooled scores never
see padding.

Labels are local class ids (int64, -1 = ignore) and are resized with nearest neighbour; they are
padded with -1. Images are uint8 [H, W, 3] RGB until normalisation, then float32 [3, c, c].
All randomness comes from an explicit ``numpy.random.Generator``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)

_MEAN255 = np.asarray(MEAN, np.float32) * 255.0
_STD255 = np.asarray(STD, np.float32) * 255.0


def normalize(image: np.ndarray) -> torch.Tensor:
    """uint8 [H, W, 3] RGB -> float32 [3, H, W] normalised with ImageNet MEAN / STD."""
    x = (np.asarray(image, np.float32) - _MEAN255) / _STD255
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


def denormalize(img: torch.Tensor) -> torch.Tensor:
    """Undo ``normalize``: [3, H, W] or [B, 3, H, W] -> the same shape, float in [0, 1]."""
    shape = (3, 1, 1) if img.dim() == 3 else (1, 3, 1, 1)
    mean = torch.tensor(MEAN, dtype=img.dtype, device=img.device).view(shape)
    std = torch.tensor(STD, dtype=img.dtype, device=img.device).view(shape)
    return (img * std + mean).clamp(0.0, 1.0)


def resize_size(
    h: int,
    w: int,
    ratio: float,
    base_scale: tuple[int, int],
    min_short: int | None = None,
) -> tuple[int, int]:
    """Output (h, w) of mmseg's keep-ratio resize to ``ratio * base_scale`` (long, short).

    ``min_short`` raises the factor so that the short side is at least that many pixels.
    """
    long_max, short_max = base_scale[0] * ratio, base_scale[1] * ratio
    f = min(long_max / max(h, w), short_max / min(h, w))
    if min_short is not None:
        f = max(f, min_short / min(h, w))
    nh, nw = int(h * f + 0.5), int(w * f + 0.5)  # mmcv rounds with +0.5
    if min_short is not None:
        # both sides are >= min_short up to float error once f >= min_short / short side
        nh, nw = max(nh, min_short), max(nw, min_short)
    return max(nh, 1), max(nw, 1)


def nearest_index(n_in: int, n_out: int) -> np.ndarray:
    """Source index of each output position for a nearest-neighbour resize (pixel centres)."""
    return np.minimum(((np.arange(n_out) + 0.5) * (n_in / n_out)).astype(np.int64), n_in - 1)


def _crop_box(nh: int, nw: int, crop: int, rng: np.random.Generator) -> tuple[int, int]:
    """Top-left offset of a random crop as mmseg RandomCrop.get_crop_bbox."""
    return int(rng.integers(0, max(nh - crop, 0) + 1)), int(rng.integers(0, max(nw - crop, 0) + 1))


def _convert(x: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    return np.clip(x.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)


def photometric_distortion(
    image: np.ndarray,
    rng: np.random.Generator,
    brightness_delta: int = 32,
    contrast_range: tuple[float, float] = (0.5, 1.5),
    saturation_range: tuple[float, float] = (0.5, 1.5),
    hue_delta: int = 18,
) -> np.ndarray:
    """mmseg PhotoMetricDistortion on uint8 [H, W, 3] RGB -> uint8 [H, W, 3].

    Each of brightness (add U(-32, 32)), contrast (multiply U(0.5, 1.5)), saturation (multiply
    HSV S by U(0.5, 1.5)) and hue (shift H by an integer in [-18, 18] of OpenCV's 180 units)
    applies with probability 1/2; contrast comes second or last with probability 1/2 each.
    HSV goes through PIL (H in 256 units), so the hue shift is rescaled by 256/180.
    """
    img = image
    if rng.integers(2):
        img = _convert(img, beta=rng.uniform(-brightness_delta, brightness_delta))
    mode = int(rng.integers(2))
    if mode == 1 and rng.integers(2):
        img = _convert(img, alpha=rng.uniform(*contrast_range))
    sat = rng.uniform(*saturation_range) if rng.integers(2) else None
    hue = int(rng.integers(-hue_delta, hue_delta + 1)) if rng.integers(2) else None
    if sat is not None or hue is not None:
        h, w = img.shape[:2]
        hsv = np.asarray(Image.fromarray(np.ascontiguousarray(img)).convert("HSV")).copy()
        if sat is not None:
            hsv[..., 1] = _convert(hsv[..., 1], alpha=sat)
        if hue is not None:
            shift = int(round(hue * 256 / 180))
            hsv[..., 0] = ((hsv[..., 0].astype(np.int16) + shift) % 256).astype(np.uint8)
        img = np.asarray(Image.frombytes("HSV", (w, h), hsv.tobytes()).convert("RGB"))
    if mode == 0 and rng.integers(2):
        img = _convert(img, alpha=rng.uniform(*contrast_range))
    return img


def train_augment(
    image: np.ndarray | Image.Image,
    label: np.ndarray | None,
    rng: np.random.Generator,
    crop_size: int = 512,
    ratio_range: tuple[float, float] = (0.5, 2.0),
    base_scale: tuple[int, int] | None = None,
    cat_max_ratio: float = 0.75,
    flip_prob: float = 0.5,
    photometric: bool = True,
    pad: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Augment one sample.

    image: uint8 [H, W, 3] RGB (or a PIL image); label: int [H, W] local ids with -1 ignore, or
    None (image-level sources without a map). Returns (float32 [3, c, c], int64 [c, c] or None);
    with ``pad=False`` the output is exactly c x c too, because the short side is scaled to >= c.
    cat_max_ratio: as mmseg, retry the crop up to 10 times until no class covers more than
    this fraction of the crop's labelled pixels (and at least two classes are present).
    """
    pil = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, np.uint8))
    if pil.mode != "RGB":
        pil = pil.convert("RGB")
    w, h = pil.size
    if label is not None and label.shape != (h, w):
        raise ValueError(f"label shape {label.shape} does not match image size {(h, w)}")
    c = crop_size
    base = base_scale or (4 * c, c)
    ratio = rng.uniform(*ratio_range)
    nh, nw = resize_size(h, w, ratio, base, min_short=None if pad else c)

    # the label of the crop is gathered straight from the source map with nearest indices,
    # so the full resized map is never built
    ri, ci = nearest_index(h, nh), nearest_index(w, nw)
    y0, x0 = _crop_box(nh, nw, c, rng)
    ch, cw = min(c, nh), min(c, nw)
    lab = None
    if label is not None:
        lab = label[ri[y0 : y0 + ch]][:, ci[x0 : x0 + cw]]
        if cat_max_ratio < 1.0:
            for _ in range(10):
                counts = np.bincount(lab.ravel() + 1)[1:]
                counts = counts[counts > 0]
                if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
                    break
                y0, x0 = _crop_box(nh, nw, c, rng)
                lab = label[ri[y0 : y0 + ch]][:, ci[x0 : x0 + cw]]

    # resample only the crop window; box is in source pixel coordinates
    sy, sx = h / nh, w / nw
    box = (x0 * sx, y0 * sy, (x0 + cw) * sx, (y0 + ch) * sy)
    img = np.asarray(pil.resize((cw, ch), Image.BILINEAR, box=box))

    if rng.random() < flip_prob:
        img = img[:, ::-1]
        if lab is not None:
            lab = lab[:, ::-1]
    if photometric:
        img = photometric_distortion(np.ascontiguousarray(img), rng)

    x = normalize(img)
    y = None if lab is None else torch.from_numpy(np.ascontiguousarray(lab, dtype=np.int64))
    if ch < c or cw < c:
        # pad after normalisation: padded image pixels are 0 (the mean), labels -1
        x = torch.nn.functional.pad(x, (0, c - cw, 0, c - ch), value=0.0)
        if y is not None:
            y = torch.nn.functional.pad(y, (0, c - cw, 0, c - ch), value=-1)
    return x, y


@dataclass(frozen=True)
class TrainAugment:
    """The settings of ``train_augment`` for one source; call as aug(image, label, rng).

    Defaults are the LarvSeg mask setting (512 crops, padded). Image-level sources use
    ``TrainAugment(crop_size=320, pad=False)`` (ImageNet) or ``TrainAugment(512, pad=False)``
    (WA150 / WA847).
    """

    crop_size: int = 512
    ratio_range: tuple[float, float] = (0.5, 2.0)
    base_scale: tuple[int, int] | None = None
    cat_max_ratio: float = 0.75
    flip_prob: float = 0.5
    photometric: bool = True
    pad: bool = True

    def __call__(
        self,
        image: np.ndarray | Image.Image,
        label: np.ndarray | None,
        rng: np.random.Generator,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        return train_augment(
            image,
            label,
            rng,
            crop_size=self.crop_size,
            ratio_range=self.ratio_range,
            base_scale=self.base_scale,
            cat_max_ratio=self.cat_max_ratio,
            flip_prob=self.flip_prob,
            photometric=self.photometric,
            pad=self.pad,
        )


def photometric_view(
    images: torch.Tensor,
    brightness: float = 32 / 255,
    contrast: tuple[float, float] = (0.5, 1.5),
    saturation: tuple[float, float] = (0.5, 1.5),
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """A second view of normalised images [B,3,H,W] with the same geometry (PC2Seg): per image
    a random brightness shift, contrast and saturation factor, on the device, no gradient.

    The pixels of both views correspond one to one, so the pixel-contrastive term needs no
    warping; only the appearance differs.
    """
    b, dev = images.shape[0], images.device

    def u(lo: float, hi: float) -> torch.Tensor:
        r = torch.rand(b, 1, 1, 1, generator=generator, device=generator.device if generator
                       else None)  # fmt: skip
        return (lo + (hi - lo) * r).to(dev)

    with torch.no_grad():
        x = denormalize(images.float())
        x = x + u(-brightness, brightness)
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - mean) * u(*contrast) + mean
        gray = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2])[:, None]
        x = (x - gray) * u(*saturation) + gray
        x = x.clamp(0.0, 1.0)
        mean_t = torch.tensor(MEAN, device=dev).view(1, 3, 1, 1)
        std_t = torch.tensor(STD, device=dev).view(1, 3, 1, 1)
        return ((x - mean_t) / std_t).to(images.dtype)
