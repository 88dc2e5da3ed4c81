import colorsys

import numpy as np
import pytest
import torch
from data_fixtures import block_label
from PIL import Image

from larvess.data.transforms import (
    MEAN,
    STD,
    TrainAugment,
    denormalize,
    normalize,
    photometric_distortion,
    resize_size,
    train_augment,
)


def test_resize_size_is_mmseg_keep_ratio():
    # mmcv: factor = min(long_max / long, short_max / short), size = int(x * f + 0.5)
    for h, w, r in [(480, 640, 1.0), (480, 640, 0.5), (1000, 300, 2.0), (333, 777, 1.37)]:
        f = min(2048 * r / max(h, w), 512 * r / min(h, w))
        assert resize_size(h, w, r, (2048, 512)) == (int(h * f + 0.5), int(w * f + 0.5))
    # no padding for image-level sources: short side raised to the crop
    assert min(resize_size(100, 150, 0.5, (1280, 320), min_short=320)) == 320
    assert resize_size(1000, 1500, 1.0, (1280, 320), min_short=320) == (320, 480)


def test_normalize_denormalize_round_trip():
    img = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    x = normalize(img)
    assert x.shape == (3, 5, 7) and x.dtype == torch.float32
    ref = (img[1, 2, 0] / 255.0 - MEAN[0]) / STD[0]
    assert x[0, 1, 2].item() == pytest.approx(ref, abs=1e-5)
    torch.testing.assert_close(denormalize(x), torch.from_numpy(img).permute(2, 0, 1) / 255.0)
    torch.testing.assert_close(denormalize(x[None])[0], denormalize(x))


def _reference_augment(image, label, rng, c, ratio_range, base, flip_prob):
    """mmseg's pipeline written plainly: full resize, crop with retries, flip, pad."""
    h, w = label.shape
    r = rng.uniform(*ratio_range)
    f = min(base[0] * r / max(h, w), base[1] * r / min(h, w))
    nh, nw = int(h * f + 0.5), int(w * f + 0.5)
    img = np.asarray(Image.fromarray(image).resize((nw, nh), Image.BILINEAR)).astype(np.float32)
    # nearest by pixel centres: output i takes source floor((i + 0.5) * h / nh)
    lab = np.empty((nh, nw), np.int64)
    for i in range(nh):
        for j in range(nw):
            lab[i, j] = label[
                min(int((i + 0.5) * h / nh), h - 1), min(int((j + 0.5) * w / nw), w - 1)
            ]

    def crop():
        y0 = rng.integers(0, max(nh - c, 0) + 1)
        x0 = rng.integers(0, max(nw - c, 0) + 1)
        return y0, x0

    y0, x0 = crop()
    for _ in range(10):
        patch = lab[y0 : y0 + c, x0 : x0 + c]
        vals, cnt = np.unique(patch, return_counts=True)
        cnt = cnt[vals != -1]
        if len(cnt) > 1 and cnt.max() / cnt.sum() < 0.75:
            break
        y0, x0 = crop()
    img, lab = img[y0 : y0 + c, x0 : x0 + c], lab[y0 : y0 + c, x0 : x0 + c]
    if rng.random() < flip_prob:
        img, lab = img[:, ::-1], lab[:, ::-1]
    out_img = np.zeros((c, c, 3), np.float32)
    out_img[: img.shape[0], : img.shape[1]] = (img - np.array(MEAN) * 255) / (np.array(STD) * 255)
    out_lab = np.full((c, c), -1, np.int64)
    out_lab[: lab.shape[0], : lab.shape[1]] = lab
    return out_img.transpose(2, 0, 1), out_lab


@pytest.mark.parametrize("seed", range(6))
def test_augment_matches_plain_mmseg_pipeline(seed):
    rng0 = np.random.default_rng(seed)
    h, w = int(rng0.integers(40, 120)), int(rng0.integers(40, 120))
    label = block_label(h, w, [-1, 0, 3, 255, 300], 7, seed)  # 255 is a real class here
    image = rng0.integers(0, 256, (h, w, 3), dtype=np.uint8)
    args = dict(c=64, ratio_range=(0.5, 2.0), base=(256, 64), flip_prob=0.5)
    ref_img, ref_lab = _reference_augment(image, label, np.random.default_rng(seed), **args)
    x, y = train_augment(
        image,
        label,
        np.random.default_rng(seed),
        crop_size=64,
        base_scale=(256, 64),
        photometric=False,
    )
    assert x.shape == (3, 64, 64) and y.shape == (64, 64) and y.dtype == torch.int64
    np.testing.assert_array_equal(y.numpy(), ref_lab)
    # resampling only the crop window may differ from a full resize by rounding at its edge
    diff = np.abs(x.numpy() - ref_img) * 255 * np.array(STD)[:, None, None]
    assert np.median(diff) < 0.5 and diff.max() < 3
    assert set(np.unique(y.numpy())) <= {-1, 0, 3, 255, 300}


def test_ignore_and_class_255_survive_and_padding_is_ignore():
    label = np.full((30, 40), 255, np.int64)
    label[:, :10] = -1
    image = np.full((30, 40, 3), 128, np.uint8)
    for seed in range(5):
        rng = np.random.default_rng(seed)
        x, y = train_augment(
            image, label, rng, crop_size=64, ratio_range=(0.5, 1.5), base_scale=(40, 30)
        )
        vals = set(np.unique(y.numpy()))
        assert vals <= {-1, 255} and 255 in vals and -1 in vals
        # the resized image is smaller than the crop: padding is label -1 and image 0
        assert (y[-1] == -1).all() and (y[:, -1] == -1).all()
        assert (x[:, -1, :] == 0).all() and (x[:, :, -1] == 0).all()


def test_image_and_label_stay_aligned():
    # the image colour is a function of the label; it must still be after augmentation
    label = block_label(96, 128, list(range(6)), 16, 3)
    colours = np.random.default_rng(1).integers(0, 256, (6, 3)).astype(np.uint8)
    image = colours[label]
    for seed in range(8):
        x, y = train_augment(
            image, label, np.random.default_rng(seed), crop_size=48, photometric=False
        )
        rgb = (denormalize(x).permute(1, 2, 0).numpy() * 255).round()
        lab = y.numpy()
        # interior pixels: the 3x3 neighbourhood has one label
        inner = np.ones_like(lab, bool)
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                inner[1:-1, 1:-1] &= (
                    lab[1:-1, 1:-1]
                    == lab[1 + dy : lab.shape[0] - 1 + dy, 1 + dx : lab.shape[1] - 1 + dx]
                )
        inner[[0, -1], :] = inner[:, [0, -1]] = False
        inner &= lab >= 0
        assert inner.sum() > 100
        np.testing.assert_allclose(rgb[inner], colours[lab[inner]], atol=2)


def test_no_padding_for_image_level_sources():
    image = np.random.default_rng(0).integers(0, 256, (50, 200, 3), dtype=np.uint8)
    label = np.zeros((50, 200), np.int64)
    for seed in range(5):
        rng = np.random.default_rng(seed)
        x, y = train_augment(image, label, rng, crop_size=96, pad=False, cat_max_ratio=1.0)
        assert x.shape == (3, 96, 96) and (y == 0).all()
        x2, y2 = train_augment(image, None, np.random.default_rng(seed), crop_size=96, pad=False)
        assert y2 is None and torch.equal(x, x2)


def _reference_photometric(img, rng, bd=32, cr=(0.5, 1.5), sr=(0.5, 1.5), hd=18):
    """mmseg PhotoMetricDistortion per pixel with colorsys; OpenCV hue units (0..180)."""
    img = img.astype(np.float64)

    def conv(a, alpha=1.0, beta=0.0):
        return np.clip(a * alpha + beta, 0, 255).astype(np.uint8).astype(np.float64)

    if rng.integers(2):
        img = conv(img, beta=rng.uniform(-bd, bd))
    mode = rng.integers(2)
    if mode == 1 and rng.integers(2):
        img = conv(img, alpha=rng.uniform(*cr))
    sat = rng.uniform(*sr) if rng.integers(2) else 1.0
    hue = int(rng.integers(-hd, hd + 1)) if rng.integers(2) else 0
    out = np.empty_like(img)
    for i in range(img.shape[0]):
        for j in range(img.shape[1]):
            h, s, v = colorsys.rgb_to_hsv(*(img[i, j] / 255.0))
            s = min(s * sat, 1.0)
            h = (h + hue / 180.0) % 1.0
            out[i, j] = np.array(colorsys.hsv_to_rgb(h, s, v)) * 255
    img = out
    if mode == 0 and rng.integers(2):
        img = conv(img, alpha=rng.uniform(*cr))
    return img


@pytest.mark.parametrize("seed", range(12))
def test_photometric_matches_plain_reference(seed):
    img = np.random.default_rng(100 + seed).integers(30, 226, (6, 6, 3), dtype=np.uint8)
    out = photometric_distortion(img, np.random.default_rng(seed))
    ref = _reference_photometric(img, np.random.default_rng(seed))
    assert out.dtype == np.uint8 and out.shape == img.shape
    # PIL's HSV is 8-bit: a few levels of rounding
    assert np.abs(out.astype(np.float64) - ref).max() <= 8


def test_same_rng_same_sample_and_train_augment_object():
    image = np.random.default_rng(0).integers(0, 256, (70, 90, 3), dtype=np.uint8)
    label = block_label(70, 90, [-1, 1, 2], 9, 0)
    aug = TrainAugment(crop_size=32)
    a = aug(image, label, np.random.default_rng(5))
    b = aug(image, label, np.random.default_rng(5))
    c = aug(image, label, np.random.default_rng(6))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    with pytest.raises(ValueError, match="does not match"):
        aug(image, label[:-1], np.random.default_rng(0))
