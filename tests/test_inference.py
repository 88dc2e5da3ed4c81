import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from larvess.inference import (
    classify_embeddings,
    preprocess,
    slide_inference,
    window_starts,
)

D, K, P = 8, 12, 16


class FakeSegmenter(torch.nn.Module):
    """A fixed stride-16 conv followed by L2 normalisation: images -> [B, D, H/16, W/16]."""

    def __init__(self, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv = torch.nn.Conv2d(3, D, kernel_size=P, stride=P)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g) * 0.05)
            self.conv.bias.copy_(torch.randn(D, generator=g) * 0.1)
        self.calls = []

    def forward(self, images):
        self.calls.append(tuple(images.shape))
        return F.normalize(self.conv(images), dim=1)


def make_mu(k=K, seed=1):
    return F.normalize(torch.randn(k, D, generator=torch.Generator().manual_seed(seed)), dim=1)


def make_image(h, w, seed=2):
    # Smooth image so neighbouring windows see related content.
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(max(h // 8, 2), max(w // 8, 2), 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((w, h), Image.BILINEAR))


def assert_is_argmax(pred, logits, tol=1e-4):
    """pred [H, W] picks a class whose logit is within tol of the best one at every pixel."""
    assert pred.shape == logits.shape[1:] and pred.dtype == torch.long
    best = logits.max(0).values
    chosen = logits.gather(0, pred[None])[0]
    assert bool((chosen >= best - tol).all())


def naive_starts(length, window, stride):
    starts, y = [], 0
    while True:
        end = min(y + window, length)
        starts.append(max(end - window, 0))
        if end >= length:
            return starts
        y += stride


def reference_logits(seg, mu, image, window, stride, short_side):
    """mmseg-style: average per-window logits, resize logits to the original size."""
    img = preprocess(image)
    H, W = img.shape[1:]
    if short_side is not None:
        s = short_side / min(H, W)
        size = (int(H * s + 0.5), int(W * s + 0.5))
        img = F.interpolate(img[None], size=size, mode="bilinear", align_corners=False)[0]
    h, w = img.shape[1:]
    logits = torch.zeros(mu.shape[0], h, w)
    count = torch.zeros(h, w)
    with torch.no_grad():
        for y in naive_starts(h, window, stride):
            for x in naive_starts(w, window, stride):
                crop = img[:, y : y + window, x : x + window]
                ch, cw = crop.shape[1:]
                padded = torch.zeros(3, window, window)
                padded[:, :ch, :cw] = crop
                e = seg(padded[None])
                e = F.interpolate(e, size=(window, window), mode="bilinear", align_corners=False)
                e = F.normalize(e, dim=1)[0, :, :ch, :cw]
                logits[:, y : y + ch, x : x + cw] += torch.einsum("dhw,kd->khw", e, mu)
                count[y : y + ch, x : x + cw] += 1
    assert bool((count > 0).all())
    logits = logits / count
    return F.interpolate(logits[None], size=(H, W), mode="bilinear", align_corners=False)[0]


def test_one_window_equals_whole_image_forward():
    seg, mu = FakeSegmenter(), make_mu()
    image = make_image(64, 64)
    pred = slide_inference(seg, mu, image, window=64, stride=64, short_side=64)
    with torch.no_grad():
        x = seg(preprocess(image)[None])
        x = F.normalize(
            F.interpolate(x, size=(64, 64), mode="bilinear", align_corners=False), dim=1
        )
    logits = torch.einsum("dhw,kd->khw", x[0], mu)
    assert_is_argmax(pred, logits)
    assert seg.calls[0] == (1, 3, 64, 64)


@pytest.mark.parametrize(
    "h, w, window, stride, short_side",
    [
        (64, 96, 64, 64, 64),  # two windows side by side, no overlap
        (75, 101, 48, 32, 70),  # overlapping windows, odd sizes, resized down
        (37, 53, 32, 24, None),  # odd sizes at native resolution
        (40, 50, 32, 16, 60),  # resized up, heavy overlap
        (20, 30, 64, 64, None),  # smaller than the window: padded
    ],
)
def test_matches_naive_logit_averaging(h, w, window, stride, short_side):
    seg, mu = FakeSegmenter(), make_mu()
    image = make_image(h, w)
    pred = slide_inference(
        seg, mu, image, window=window, stride=stride, short_side=short_side, batch_size=3
    )
    assert pred.shape == (h, w)
    logits = reference_logits(FakeSegmenter(), mu, image, window, stride, short_side)
    assert_is_argmax(pred, logits)
    assert all(shape[1:] == (3, window, window) for shape in seg.calls)
    assert max(shape[0] for shape in seg.calls) <= 3


@pytest.mark.parametrize("length", [1, 31, 32, 33, 64, 65, 100, 129])
@pytest.mark.parametrize("window, stride", [(32, 32), (32, 16), (32, 20), (32, 1)])
def test_window_starts_cover_every_pixel(length, window, stride):
    starts = window_starts(length, window, stride)
    assert starts == naive_starts(length, window, stride)
    count = np.zeros(length, dtype=int)
    for s in starts:
        count[s : s + window] += 1
    assert (count >= 1).all()
    assert starts[0] == 0 and all(0 < b - a <= stride for a, b in zip(starts, starts[1:]))
    if length >= window:
        assert starts[-1] + window == length
    if stride == window and length % window == 0:
        assert (count == 1).all()


def test_knn_path_equals_matmul_path():
    pytest.importorskip("larvess.knn")
    seg, mu = FakeSegmenter(), make_mu(k=30)
    image = make_image(45, 70)
    kw = dict(window=32, stride=24, short_side=40)
    dense = slide_inference(seg, mu, image, **kw)
    knn = slide_inference(seg, mu, image, knn_threshold=0, **kw)
    logits = reference_logits(FakeSegmenter(), mu, image, kw["window"], kw["stride"], 40)
    assert_is_argmax(dense, logits)
    assert_is_argmax(knn, logits)
    top2 = logits.topk(2, dim=0).values
    clear = (top2[0] - top2[1]) > 1e-4
    assert bool(clear.float().mean() > 0.9)
    assert torch.equal(dense[clear], knn[clear])


@pytest.mark.parametrize("out_size", [(40, 29), (7, 9), (13, 17)])
def test_classify_strips_equal_full_resize(out_size):
    g = torch.Generator().manual_seed(3)
    x = F.normalize(torch.randn(D, 13, 17, generator=g), dim=0)
    mu = make_mu()
    # A small score budget forces many strips of output rows.
    pred = classify_embeddings(x, mu, out_size, max_scores=3 * K * out_size[1])
    full = F.interpolate(x[None], size=out_size, mode="bilinear", align_corners=False)[0]
    assert_is_argmax(pred, torch.einsum("dhw,kd->khw", full, mu), tol=1e-5)
    with pytest.raises(ValueError, match="rows_mu must be"):
        classify_embeddings(x, torch.zeros(K, D + 1), out_size)


def test_preprocess_and_input_checks():
    image = make_image(10, 12)
    x = preprocess(image)
    assert x.shape == (3, 10, 12) and x.dtype == torch.float32
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    for c in range(3):
        expected = (image[4, 5, c] / 255.0 - mean[c]) / std[c]
        assert float(x[c, 4, 5]) == pytest.approx(expected, abs=1e-5)
    assert torch.equal(preprocess(Image.fromarray(image)), x)
    with pytest.raises(ValueError, match="uint8"):
        preprocess(image.astype(np.float32))
    with pytest.raises(ValueError, match="uint8"):
        preprocess(image[:, :, :2])
    with pytest.raises(ValueError, match="stride <= window"):
        slide_inference(FakeSegmenter(), make_mu(), make_image(40, 40), window=32, stride=48)


def test_train_mode_restored_and_tensor_input():
    seg, mu = FakeSegmenter(), make_mu()
    seg.train()
    image = make_image(40, 56)
    a = slide_inference(seg, mu, image, window=32, stride=32, short_side=None)
    assert seg.training
    b = slide_inference(seg, mu, preprocess(image), window=32, stride=32, short_side=None)
    assert torch.equal(a, b)
    assert a.min() >= 0 and a.max() < K
