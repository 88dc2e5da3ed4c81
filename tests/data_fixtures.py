"""Small dataset fixtures in the real file formats, shared by the data-reader tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"


def block_label(h: int, w: int, values: list[int], block: int, seed: int) -> np.ndarray:
    """int64 [h, w] map of block x block tiles, each a value drawn from ``values``."""
    rng = np.random.default_rng(seed)
    tiles = rng.choice(np.asarray(values), size=(-(-h // block), -(-w // block)))
    return np.kron(tiles, np.ones((block, block), np.int64))[:h, :w].astype(np.int64)


def write_jpeg(path: Path, h: int, w: int, seed: int) -> np.ndarray:
    """Write a smooth random RGB JPEG; returns the uint8 array written (before compression)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(small).resize((w, h), Image.BILINEAR))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path, quality=95)
    return img


def write_png(path: Path, label: np.ndarray, palette: bool = False) -> None:
    """uint8 label PNG, mode "P" (with a palette, as ADE / cocostuff tools write) or "L"."""
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(label.astype(np.uint8))
    if palette:
        im = im.convert("P")
        im.putpalette(list(np.random.default_rng(0).integers(0, 256, 768)))
    im.save(path)


def write_tiff16(path: Path, label: np.ndarray) -> None:
    """uint16 TIFF (PIL mode "I;16"), the detectron2 ADE-847 format."""
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(label.astype(np.uint16))
    assert im.mode == "I;16"
    im.save(path)


def write_object_info(path: Path, names: list[str]) -> None:
    """objectInfo150.txt format: tab-separated, trailing space on some fields."""
    lines = ["Idx\tRatio\tTrain\tVal\tName"]
    for i, n in enumerate(names, 1):
        sp = " " if i % 3 == 0 else ""
        lines.append(f"{i}{sp}\t0.01\t10\t1\t{n}{sp}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def write_847_names(path: Path, names: list[str]) -> None:
    """ade847_categories.tsv format: trainId, ade_full_id, name."""
    lines = ["trainId\tade_full_id\tname"] + [f"{i}\t{1000 + i}\t{n}" for i, n in enumerate(names)]
    path.write_text("\n".join(lines) + "\n")


def make_ade150(root: Path, n_images: int = 3, n_classes: int = 5, seed: int = 0) -> Path:
    """ADEChallengeData2016 under root with training + validation; returns the dataset folder."""
    d = root / "ADEChallengeData2016"
    write_object_info(d / "objectInfo150.txt", [f"class{i}, syn{i}" for i in range(n_classes)])
    for split in ("training", "validation"):
        for i in range(n_images):
            h, w = 60 + 8 * i, 90 - 6 * i
            write_jpeg(d / "images" / split / f"ADE_{split}_{i:08d}.jpg", h, w, seed + i)
            lab = block_label(h, w, list(range(n_classes + 1)), 10, seed + 100 + i)
            write_png(
                d / "annotations" / split / f"ADE_{split}_{i:08d}.png", lab, palette=i % 2 == 0
            )
    return d


def make_ade847(root: Path, n_images: int = 2, n_classes: int = 300, seed: int = 0) -> Path:
    """detectron2-style ADE-full folder (TIFF labels, 65535 ignore) + names tsv at root/names.tsv."""
    root.mkdir(parents=True, exist_ok=True)
    write_847_names(root / "names.tsv", [f"thing{i}, alt{i}" for i in range(n_classes)])
    for split in ("training", "validation"):
        for i in range(n_images):
            h, w = 64, 48 + 8 * i
            write_jpeg(root / "images_detectron2" / split / f"img{i}.jpg", h, w, seed + i)
            vals = [0, 7, 255, 256, n_classes - 1, 65535]
            lab = block_label(h, w, vals, 8, seed + 50 + i)
            write_tiff16(root / "annotations_detectron2" / split / f"img{i}.tif", lab)
    return root
