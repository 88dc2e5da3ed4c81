"""Toy world: determinism, real-format files, and classes that a simple classifier separates."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from larvess.data.toy import make_toy_world, render_texture, toy_classes

SMALL = dict(size=64, n_coco=6, n_imagenet_per_class=2, n_ade_train=5, n_ade_val=4, progress=False)


def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("toy") / "w"
    make_toy_world(out, seed=3, workers=1, **SMALL)
    return out


def test_same_seed_same_bytes_any_worker_count(world: Path, tmp_path: Path) -> None:
    make_toy_world(tmp_path / "b", seed=3, workers=2, **SMALL)
    make_toy_world(tmp_path / "c", seed=4, workers=1, **SMALL)
    a, b, c = _digest(world), _digest(tmp_path / "b"), _digest(tmp_path / "c")
    assert len(a) == 2 * 6 + 12 * 2 + 2 * 5 + 2 * 4 + 6  # images, masks, 6 metadata files
    assert a == b
    assert a.keys() == c.keys()
    jpgs = [k for k in a if k.endswith((".jpg", ".JPEG"))]
    assert all(a[k] != c[k] for k in jpgs)


def test_coco_stuff_format_base_only(world: Path) -> None:
    root = world / "coco_stuff"
    lines = (root / "labels.txt").read_text().splitlines()
    assert lines[0] == "0: unlabeled"
    ids = [int(s.split(":")[0]) for s in lines[1:]]
    names = [s.split(": ", 1)[1] for s in lines[1:]]
    table = toy_classes()
    assert ids == list(range(1, 13))
    assert names == [c.name for c in table if c.base]
    pngs = sorted((root / "stuffthingmaps" / "train2017").glob("*.png"))
    jpgs = sorted((root / "images" / "train2017").glob("*.jpg"))
    assert [p.stem for p in pngs] == [p.stem for p in jpgs] and len(pngs) == 6
    seen = set()
    for p, j in zip(pngs, jpgs):
        m = Image.open(p)
        assert m.mode == "L" and m.size == (64, 64) and Image.open(j).size == (64, 64)
        v = np.unique(np.asarray(m))
        # PNG value v = labels.txt id - 1; only base ids (0..11) or 255 ignore, never a novel class
        assert set(v.tolist()) <= set(range(12)) | {255}
        seen |= set(v.tolist())
    assert 255 in seen and len(seen - {255}) >= 4


def test_imagenet_folder_novel_only(world: Path) -> None:
    novel = [c for c in toy_classes() if not c.base]
    synsets = (world / "imagenet_synsets.txt").read_text().split()
    assert synsets == [c.wnid for c in novel] == [f"n{90000001 + k}" for k in range(12)]
    lemmas = dict(s.split("\t") for s in (world / "imagenet_lemmas.txt").read_text().splitlines())
    assert lemmas == {c.wnid: c.name for c in novel}
    assert sorted(p.name for p in (world / "imagenet").iterdir()) == sorted(synsets)
    for w in synsets:
        files = sorted((world / "imagenet" / w).glob("*.JPEG"))
        assert len(files) == 2
        im = Image.open(files[0])
        assert im.format == "JPEG" and im.mode == "RGB"
    base_names = {c.name for c in toy_classes() if c.base}
    assert not base_names & set(lemmas.values())


def test_ade_format(world: Path) -> None:
    root = world / "ade" / "ADEChallengeData2016"
    rows = [s.split("\t") for s in (root / "objectInfo150.txt").read_text().splitlines()]
    assert rows[0] == ["Idx", "Ratio", "Train", "Val", "Name"]
    table = toy_classes()
    assert [int(r[0]) for r in rows[1:]] == list(range(1, 25))
    assert [r[4] for r in rows[1:]] == [c.name for c in table]
    for split, n, col in (("training", 5, 2), ("validation", 4, 3)):
        imgs = sorted((root / "images" / split).glob("*.jpg"))
        anns = sorted((root / "annotations" / split).glob("*.png"))
        assert len(imgs) == n and [p.stem for p in imgs] == [p.stem for p in anns]
        present = np.zeros(25, int)
        for a in anns:
            v = np.unique(np.asarray(Image.open(a)))
            assert v.max() <= 24  # 0 = ignore, i = objectInfo150 Idx i
            present[v] += 1
        # the Train / Val columns count the images that contain each class
        assert [int(r[col]) for r in rows[1:]] == present[1:].tolist()
    manifest = json.loads((world / "toy_world.json").read_text())
    assert manifest["seed"] == 3 and manifest["counts"]["imagenet"] == 24
    assert manifest["base"] == [c.name for c in table if c.base]


def _features(img: np.ndarray) -> np.ndarray:
    """Mean colour (3) + magnitude-weighted gradient-orientation histogram (8) + mean |grad|."""
    g = img.mean(-1)
    gy, gx = np.gradient(g)
    mag = np.hypot(gx, gy)
    ang = np.mod(np.arctan2(gy, gx), np.pi)
    bins = (ang / np.pi * 8).astype(int).clip(0, 7).ravel()
    h = np.bincount(bins, weights=mag.ravel(), minlength=8)
    return np.concatenate([img.reshape(-1, 3).mean(0), h / (h.sum() + 1e-8), [mag.mean()]])


def _nearest_mean_accuracy(x: np.ndarray, n_train: int) -> float:
    """x [C, n, f]: class means from the first n_train samples, accuracy on the rest."""
    mu = x[:, :n_train].mean(1)
    test = x[:, n_train:]
    pred = ((test[:, :, None] - mu[None, None]) ** 2).sum(-1).argmin(-1)
    return float((pred == np.arange(len(x))[:, None]).mean())


def test_classes_distinguishable_but_not_by_colour_alone() -> None:
    table = toy_classes()
    rng = np.random.default_rng(0)
    x = np.array([[_features(render_texture(c, 48, 48, rng)) for _ in range(8)] for c in table])
    full = _nearest_mean_accuracy(x, 4)
    colour = _nearest_mean_accuracy(x[..., :3], 4)
    assert full > 0.5  # chance is 1/24; measured ~0.75
    assert colour < full - 0.2  # 4 classes per hue: colour alone confuses them (~0.3)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="num_base"):
        toy_classes(0, 12)
    with pytest.raises(ValueError, match="num_novel"):
        toy_classes(12, 25)
    with pytest.raises(ValueError, match="size"):
        make_toy_world("/nonexistent", size=8)
    assert len(toy_classes(3, 2)) == 5 and len({c.name for c in toy_classes(24, 24)}) == 48


def test_project_readers_and_vocabulary_read_the_toy_world(world: Path, tmp_path: Path) -> None:
    """The toy files go through the real readers: one 24-row vocabulary, rows agree by name."""
    from larvess.data.ade import AdeEval, AdeTrain
    from larvess.data.coco_stuff import CocoStuff
    from larvess.data.imagenet_shards import write_shards
    from larvess.data.imagenet_wds import ImageNetShards
    from larvess.vocab import Vocabulary, read_names_file, read_synset_lemmas

    coco = CocoStuff(world / "coco_stuff")
    ade_root = world / "ade" / "ADEChallengeData2016"
    lemmas = read_synset_lemmas(world / "imagenet_lemmas.txt")
    synsets = (world / "imagenet_synsets.txt").read_text().split()
    vocab = Vocabulary(alias_file=world / "aliases.txt")  # the toy synsets' curated mapping
    r_coco = vocab.add_source(
        "coco", read_names_file(world / "coco_stuff" / "labels.txt"), None, True
    )
    r_ade = vocab.add_source("ade", read_names_file(ade_root / "objectInfo150.txt"))
    r_in = vocab.add_source("in", [lemmas[w] for w in synsets], synsets, by_synset=True)
    assert len(vocab) == 24 and len(coco.class_names) == 12 and len(coco) == 6
    assert r_coco.tolist() == r_ade[:12].tolist() and r_in.tolist() == r_ade[12:].tolist()
    assert len(AdeTrain(ade_root, weak=True)) == 5 and len(AdeEval(world / "ade")) == 4
    item = AdeEval(world / "ade")[0]
    assert item["label"].shape == (64, 64) and item["label"].min() >= -1
    write_shards(world / "imagenet", tmp_path / "sh", shard_size=8, progress=False)
    ds = ImageNetShards(tmp_path / "sh", rows=r_in, rank=0, world_size=1)
    s = next(iter(ds))
    assert s["image"].shape == (3, 64, 64) and int(s["labels"]) in r_in.tolist()
    wnid = s["key"].split("_")[0]
    assert vocab.names[int(s["labels"])] == lemmas[wnid][0]
