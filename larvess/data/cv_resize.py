"""OpenCV's cv2.resize rules in numpy, for preparing datasets exactly as OpenCV-based scripts do
(MaskFormer's prepare_ade20k_full_sem_seg.py: INTER_NEAREST labels, INTER_LINEAR images)
without depending on OpenCV.

- nearest (INTER_NEAREST, modules/imgproc/src/resize.cpp resizeNN): destination pixel x takes
  source pixel min(floor(x * (1 / (dst / src))), src - 1), the scale computed in double as
  OpenCV does. This is not floor(x * src / dst): where x * src / dst is an exact integer, the
  rounded reciprocal can land just below it (x=288, 2200 -> 768: OpenCV picks 824, not 825).
- linear (INTER_LINEAR on uint8): half-pixel centres, source position (x + 0.5) * src / dst -
  0.5 in float32, clamped at the borders, two taps per axis (no antialiasing when shrinking),
  weights rounded to 11 bits, the two passes in integers and rounded once at the end, as
  OpenCV's fixed-point path. Its SIMD and IPP builds round the last step differently, so
  images agree with a given cv2 build to within 1 grey level, labels exactly.
"""

from __future__ import annotations

import numpy as np

_COEF_BITS = 11  # INTER_RESIZE_COEF_BITS
_COEF_SCALE = 1 << _COEF_BITS


def nearest_index(src: int, dst: int) -> np.ndarray:
    """int64 [dst] source index of each destination index under INTER_NEAREST."""
    inv = 1.0 / (dst / src)  # OpenCV: ifx = 1./fx with fx = (double)dsize / ssize
    return np.minimum(np.floor(np.arange(dst) * inv).astype(np.int64), src - 1)


def resize_nearest(a: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """a [H, W, ...] -> [h, w, ...] for size (w, h), picking pixels as cv2.INTER_NEAREST."""
    w, h = size
    rows, cols = nearest_index(a.shape[0], h), nearest_index(a.shape[1], w)
    return a[rows[:, None], cols[None, :]]


def _linear_taps(src: int, dst: int) -> tuple[np.ndarray, np.ndarray]:
    """(int64 [dst] left source index, int64 [dst, 2] fixed-point weights summing to 2048)."""
    scale = 1.0 / (dst / src)
    f = ((np.arange(dst) + 0.5) * scale - 0.5).astype(np.float32)  # OpenCV: (float)(...)
    sx = np.floor(f).astype(np.int64)
    f = (f - sx.astype(np.float32)).astype(np.float32)
    low, high = sx < 0, sx >= src - 1
    f[low | high] = 0
    sx[low] = 0
    sx[high] = src - 1
    w0 = np.rint((np.float32(1) - f) * np.float32(_COEF_SCALE)).astype(np.int64)
    return sx, np.stack([w0, _COEF_SCALE - w0], axis=1)


def resize_linear(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 [H, W] or [H, W, C] -> uint8 [h, w(, C)] for size (w, h) as cv2.INTER_LINEAR."""
    if img.dtype != np.uint8:
        raise ValueError(f"resize_linear takes uint8 images, got {img.dtype}")
    w, h = size
    a = img.astype(np.int64)
    sx, ax = _linear_taps(img.shape[1], w)
    sy, ay = _linear_taps(img.shape[0], h)
    x1 = np.minimum(sx + 1, img.shape[1] - 1)  # weight 0 where clamped
    y1 = np.minimum(sy + 1, img.shape[0] - 1)
    ex = (slice(None),) + (None,) * (img.ndim - 2)
    horiz = a[:, sx] * ax[:, 0][ex] + a[:, x1] * ax[:, 1][ex]  # [H, w(, C)], scale 2^11
    ey = (slice(None), None) + (None,) * (img.ndim - 2)
    out = horiz[sy] * ay[:, 0][ey] + horiz[y1] * ay[:, 1][ey]  # scale 2^22
    return ((out + (1 << (2 * _COEF_BITS - 1))) >> (2 * _COEF_BITS)).astype(np.uint8)
