import numpy as np
import pytest
import torch
from PIL import Image

from larvess.viz import (
    composite,
    legend,
    overlay,
    palette,
    present_classes,
    results_grid,
    save_png,
)


def make_case(h=20, w=30, k=5, seed=0):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    gt = rng.integers(0, k, size=(h, w))
    gt[:5] = -1
    pred = rng.integers(0, k, size=(h, w))
    return image, pred, gt


def test_palette_deterministic_and_distinct():
    assert np.array_equal(palette(50), palette(50))
    assert np.array_equal(palette(10), palette(300)[:10])
    big = palette(21841)
    assert big.dtype == np.uint8 and big.shape == (21841, 3)
    assert len(np.unique(big, axis=0)) == 21841
    first = palette(150).astype(float)
    dist = np.sqrt(((first[:, None] - first[None]) ** 2).sum(-1))
    np.fill_diagonal(dist, np.inf)
    assert dist.min() > 15  # first 150 colours visibly different in RGB


def test_overlay_blends_and_keeps_ignore_pixels():
    image, _, gt = make_case()
    colours = palette(5)
    out = overlay(image, torch.from_numpy(gt), colours, alpha=0.25)
    assert out.shape == image.shape and out.dtype == np.uint8
    for y, x in [(0, 0), (4, 29), (10, 3), (19, 17)]:
        if gt[y, x] == -1:
            assert np.array_equal(out[y, x], image[y, x])
        else:
            expected = np.round(0.75 * image[y, x] + 0.25 * colours[gt[y, x]])
            assert np.array_equal(out[y, x], expected.astype(np.uint8))
    assert np.array_equal(out[:5], image[:5])
    with pytest.raises(ValueError, match="label value 7"):
        overlay(image, np.full(gt.shape, 7), colours)
    with pytest.raises(ValueError, match="label shape"):
        overlay(image, gt[:, :10], colours)


def test_legend_grows_with_entries():
    colours = palette(40)
    names = [f"class number {i}" for i in range(40)]
    small = legend([3], names, colours, width=200)
    large = legend(list(range(40)), names, colours, width=200)
    assert small.shape[1] == large.shape[1] == 200
    assert large.shape[0] > small.shape[0]
    # The swatch of class 3 is drawn inside its outline.
    assert (small == colours[3]).all(axis=-1).sum() >= 10 * 10
    assert (small == 0).all(axis=-1).any()  # black text / outline


def test_composite_layout_and_png(tmp_path):
    image, pred, gt = make_case()
    names = [["wall", "walls"], "floor", "sky", "tree", "lamp"]
    out = composite(image, pred, gt, class_names=names, alpha=0.5)
    h, w = image.shape[:2]
    assert out.shape[1] == 3 * w and out.shape[0] > h
    assert np.array_equal(out[:h, :w], image)
    assert np.array_equal(out[:h, w : 2 * w], overlay(image, pred, palette(5)))
    assert np.array_equal(out[:5, 2 * w :], image[:5])  # gt ignore rows uncoloured
    two = composite(image, pred, class_names=None)
    assert two.shape == (h, 2 * w, 3)
    save_png(out, tmp_path / "sub" / "vis.png")
    back = np.asarray(Image.open(tmp_path / "sub" / "vis.png"))
    assert np.array_equal(back, out)
    assert present_classes(pred, gt) == [0, 1, 2, 3, 4]
    capped = composite(image, pred, gt, class_names=names, max_legend=1)
    counts = [int((pred == c).sum() + (gt == c).sum()) for c in range(5)]
    top = counts.index(max(counts))
    expected = legend([top], names, palette(5), width=3 * w)
    assert np.array_equal(capped[h:], expected)
    assert capped.shape[0] < out.shape[0]


def test_results_grid_rows_cells_and_the_base_novel_legends():
    rng = np.random.default_rng(0)
    names = ["sky", "road", "zebra", "kite"]
    is_base = np.array([True, True, False, False])
    H, W, zoom, pad = 10, 12, 2, 4
    image = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    gt = np.zeros((H, W), np.int64)
    gt[:, 6:] = 2  # a novel class in the truth
    pred = np.ones((H, W), np.int64)
    base_only = results_grid([(image, gt * 0, pred)], names, is_base, zoom=zoom, pad=pad)
    both = results_grid([(image, gt, pred)] * 2, names, is_base, zoom=zoom, pad=pad)
    assert base_only.shape[1] == both.shape[1] == 3 * W * zoom + 4 * pad
    # the first cell of the first row is the image itself, magnified by repetition
    top = 14 + pad  # the column-title strip
    cell = both[top : top + H * zoom, pad : pad + W * zoom]
    assert np.array_equal(cell, image.repeat(zoom, 0).repeat(zoom, 1))
    # a second sample and a novel legend group make the picture taller
    assert both.shape[0] > base_only.shape[0] + H * zoom
    with pytest.raises(ValueError, match="is_base"):
        results_grid([(image, gt, pred)], names, is_base[:3])
    with pytest.raises(ValueError, match="at least one"):
        results_grid([], names, is_base)
