"""Colour overlays of label maps with a legend of the classes present.

Label maps are int [H, W] arrays of class indices with -1 (or ``ignore_index``) = unlabelled;
unlabelled pixels keep the image's own colours. Images are uint8 [H, W, 3] RGB.
"""

from __future__ import annotations

import colorsys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from larvess.data.transforms import nearest_index

# Generalised golden ratio for 3-D (the "plastic" constant): i * (1/g, 1/g^2, 1/g^3) mod 1 is a
# low-discrepancy sequence, so every prefix of the palette spreads over hue, saturation and value.
_G3 = 1.22074408460575947536
_STEPS = np.array([1 / _G3, 1 / _G3**2, 1 / _G3**3])
_MIN_SAT, _MIN_VAL = 0.4, 0.45


def palette(num_classes: int) -> np.ndarray:
    """Deterministic uint8 [num_classes, 3] RGB colours, one per class.

    (hue, saturation, value) of class c follow the 3-D golden-ratio sequence 0.5 + c * steps
    (mod 1), with saturation and value kept away from grey and black. Class c always gets the
    same colour whatever ``num_classes`` is; 21,841 classes get distinct colours.
    """
    hsv = (0.5 + np.arange(num_classes)[:, None] * _STEPS) % 1.0
    colours = np.empty((num_classes, 3), dtype=np.uint8)
    for c, (hue, sat, val) in enumerate(hsv):
        rgb = colorsys.hsv_to_rgb(
            hue, _MIN_SAT + (1 - _MIN_SAT) * sat, _MIN_VAL + (1 - _MIN_VAL) * val
        )
        colours[c] = [round(255 * v) for v in rgb]
    return colours


def _to_numpy(x: np.ndarray | torch.Tensor) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _check_pair(image: np.ndarray, label: np.ndarray) -> None:
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"viz: image must be uint8 [H, W, 3], got {image.dtype} {image.shape}")
    if label.shape != image.shape[:2]:
        raise ValueError(f"viz: label shape {label.shape} != image size {image.shape[:2]}")


def overlay(
    image: np.ndarray,
    label: np.ndarray | torch.Tensor,
    colours: np.ndarray | None = None,
    alpha: float = 0.5,
    ignore_index: int = -1,
) -> np.ndarray:
    """Blend class colours into the image: out = (1 - alpha) image + alpha colour.

    Args:
        image: uint8 [H, W, 3].
        label: int [H, W] class indices, ``ignore_index`` = left as the image.
        colours: uint8 [K, 3] palette (default ``palette(max label + 1)``).
    Returns uint8 [H, W, 3].
    """
    label = _to_numpy(label).astype(np.int64)
    _check_pair(image, label)
    valid = label != ignore_index
    top = int(label[valid].max()) if valid.any() else -1
    if colours is None:
        colours = palette(top + 1)
    if (valid & (label < 0)).any() or top >= len(colours):
        bad = label[valid & ((label < 0) | (label >= len(colours)))][0]
        raise ValueError(
            f"viz.overlay: label value {bad} has no colour (palette of {len(colours)})"
        )
    out = image.copy()
    blended = (1.0 - alpha) * image[valid] + alpha * colours[label[valid]]
    out[valid] = np.clip(np.round(blended), 0, 255).astype(np.uint8)
    return out


def _display_name(name: str | Sequence[str]) -> str:
    return name if isinstance(name, str) else str(name[0])


def legend(
    class_ids: Sequence[int],
    class_names: Sequence[str | Sequence[str]],
    colours: np.ndarray,
    width: int,
    swatch: int = 12,
    pad: int = 4,
) -> np.ndarray:
    """A white uint8 [h, width, 3] panel with one coloured swatch + name per class, in a grid.

    ``class_names`` are display names or vocabulary entries ``[name, synonym, ...]``. Entries are
    laid out left to right in columns as wide as the longest name; h grows with the entry count.
    Uses PIL's built-in default font (no font files needed).
    """
    labels = [f"{c}: {_display_name(class_names[c])}" for c in class_ids]
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    boxes = [probe.textbbox((0, 0), text) for text in labels]
    text_w = max((b[2] - b[0] for b in boxes), default=0)
    text_h = max((b[3] for b in boxes), default=0)
    line_h = max(swatch, text_h) + pad
    cell_w = swatch + pad + text_w + 2 * pad
    n_cols = max(1, (width - pad) // cell_w)
    n_rows = -(-len(labels) // n_cols)
    panel = Image.new("RGB", (width, n_rows * line_h + pad), (255, 255, 255))
    draw = ImageDraw.Draw(panel)
    for i, (c, text) in enumerate(zip(class_ids, labels)):
        x0 = pad + (i % n_cols) * cell_w
        y0 = pad + (i // n_cols) * line_h
        colour = tuple(int(v) for v in colours[c])
        draw.rectangle([x0, y0, x0 + swatch - 1, y0 + swatch - 1], fill=colour, outline=(0, 0, 0))
        draw.text((x0 + swatch + pad, y0), text, fill=(0, 0, 0))
    return np.asarray(panel, dtype=np.uint8)


def present_classes(*labels: np.ndarray | torch.Tensor, ignore_index: int = -1) -> list[int]:
    """Sorted class indices occurring in any of the label maps (ignore excluded)."""
    found: set[int] = set()
    for label in labels:
        values = np.unique(_to_numpy(label))
        found.update(int(v) for v in values if v != ignore_index)
    return sorted(found)


def composite(
    image: np.ndarray,
    pred: np.ndarray | torch.Tensor,
    gt: np.ndarray | torch.Tensor | None = None,
    class_names: Sequence[str | Sequence[str]] | None = None,
    colours: np.ndarray | None = None,
    alpha: float = 0.5,
    ignore_index: int = -1,
    max_legend: int = 60,
) -> np.ndarray:
    """Side by side ``image | prediction overlay | ground-truth overlay`` with a legend below.

    Args:
        image: uint8 [H, W, 3]; pred, gt: int [H, W] (gt optional: then two panels).
        class_names: names for the legend (indexed by class); None = no legend.
        colours: uint8 [K, 3] palette (default ``palette(len(class_names))`` or from the labels).
        max_legend: at most this many legend entries, the classes with the most pixels first.
    Returns uint8 [H + legend height, 2 W or 3 W, 3].
    """
    maps = [_to_numpy(pred).astype(np.int64)] + (
        [] if gt is None else [_to_numpy(gt).astype(np.int64)]
    )
    if colours is None:
        top = max((int(m.max()) for m in maps if m.size), default=0)
        colours = palette(max(top + 1, len(class_names) if class_names is not None else 0))
    panels = [image] + [overlay(image, m, colours, alpha, ignore_index) for m in maps]
    strip = np.concatenate(panels, axis=1)
    if class_names is None:
        return strip
    ids = present_classes(*maps, ignore_index=ignore_index)
    if len(ids) > max_legend:
        counts = {c: sum(int((m == c).sum()) for m in maps) for c in ids}
        ids = sorted(sorted(ids, key=lambda c: -counts[c])[:max_legend])
    if not ids:
        return strip
    panel = legend(ids, class_names, colours, width=strip.shape[1])
    return np.concatenate([strip, panel], axis=0)


def save_png(array: np.ndarray, path: str | Path) -> None:
    """Write a uint8 [H, W, 3] array as PNG (parent folders are created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(array, dtype=np.uint8)).save(path, format="PNG")


def results_grid(
    samples: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]],
    class_names: Sequence[str | Sequence[str]],
    is_base: np.ndarray,
    colours: np.ndarray | None = None,
    alpha: float = 0.6,
    ignore_index: int = -1,
    pad: int = 4,
    zoom: int = 2,
) -> np.ndarray:
    """One picture of a few results: a row per sample ``image | ground truth | prediction``,
    column titles above and a legend below that lists base and novel classes apart.

    Args:
        samples: (image uint8 [H, W, 3], gt int [H, W], pred int [H, W]) per row; every image
            is shown at the first one's size (nearest resampling keeps label maps exact).
        class_names: display names (or vocabulary entries) of the evaluated classes.
        is_base: bool [K]: classes with masks in training (False = novel, image-level only).
        zoom: integer magnification of every cell (pixel repetition: label edges stay exact).
    Returns uint8 [h, w, 3].
    """
    if not samples:
        raise ValueError("results_grid needs at least one sample")
    is_base = np.asarray(is_base, dtype=bool)
    if len(is_base) != len(class_names):
        raise ValueError(f"is_base has {len(is_base)} entries for {len(class_names)} classes")
    colours = palette(len(class_names)) if colours is None else colours
    H, W = samples[0][0].shape[:2]
    white = np.full((pad, 3 * W * zoom + 4 * pad, 3), 255, np.uint8)
    rows, maps = [_title_strip(["image", "ground truth", "prediction"], W * zoom, pad)], []
    for image, gt, pred in samples:
        gt, pred = _to_numpy(gt).astype(np.int64), _to_numpy(pred).astype(np.int64)
        _check_pair(image, gt)
        _check_pair(image, pred)
        if image.shape[:2] != (H, W):
            image = np.asarray(Image.fromarray(image).resize((W, H), Image.BILINEAR))
            rows_i, cols_i = nearest_index(gt.shape[0], H), nearest_index(gt.shape[1], W)
            gt, pred = (m[rows_i][:, cols_i] for m in (gt, pred))
        maps += [gt, pred]
        cells = [image] + [overlay(image, m, colours, alpha, ignore_index) for m in (gt, pred)]
        cells = [c.repeat(zoom, axis=0).repeat(zoom, axis=1) for c in cells]
        gap = np.full((H * zoom, pad, 3), 255, np.uint8)
        rows += [np.concatenate([gap, *sum(([c, gap] for c in cells), [])], axis=1), white]
    grid = np.concatenate(rows, axis=0)
    ids = present_classes(*maps, ignore_index=ignore_index)
    for base, what in ((True, "base (masks)"), (False, "novel (image-level labels only)")):
        group = [c for c in ids if is_base[c] == base]
        if group:
            grid = np.concatenate([grid, _title_strip([what], grid.shape[1], pad, left=True)])
            grid = np.concatenate([grid, legend(group, class_names, colours, grid.shape[1])])
    return grid


def _title_strip(titles: Sequence[str], cell_w: int, pad: int, left: bool = False) -> np.ndarray:
    """White uint8 [h, len(titles) * (cell_w + pad) + pad, 3] with one title per column."""
    width = cell_w if left else len(titles) * (cell_w + pad) + pad
    panel = Image.new("RGB", (width, 14 + pad), (255, 255, 255))
    draw = ImageDraw.Draw(panel)
    for i, text in enumerate(titles):
        draw.text((pad + i * (cell_w + pad), pad // 2 + 1), text, fill=(0, 0, 0))
    return np.asarray(panel, dtype=np.uint8)
