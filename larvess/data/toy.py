"""Procedural toy world: texture classes written in the real COCO-Stuff, ImageNet and ADE formats.

The same readers, scripts and the demo run on it on a CPU in minutes. Every class is a colour
(6 hues) times a pattern family (8 families); each hue is shared by 4 classes and each pattern by
3, so neither mean colour nor pattern alone separates the classes. Per-image jitter of period,
phase, orientation, colour and noise keeps it from being pixel-colour separable.

    python -m larvess.data.toy --out DIR [--seed S] [--workers N] [--coco N] [--flat] ...

The vocabulary is a tree (``toy_tree``, unless ``tree=False`` / ``--flat``), as ImageNet-21K's
is: every class has a made-up synset under one root, and some classes are internal nodes whose
ImageNet-format images are labelled at 2-3 child synsets (rendered with the parent's texture:
IN-21K labels the breeds, not "dog"), some of them with a few images at the node itself and some
with none (the node is listed, as winter21 lists synsets it has no images of). Two of them are
base classes (masks) with image-labelled children (COCO dog and the breeds); one, the residual
class, has a class of its own dataset nested below it (COCO food-other and pizza: distinct
textures, the residual's synset an ancestor of the nested class's). hypernyms.tsv holds the tree
(``vocab.hierarchy_file``), aliases.txt ties each dataset class to its synset (``vocab.alias_file``).

Layout under DIR (the formats of docs/method.md section 8):
    coco_stuff/{images,stuffthingmaps}/train2017, coco_stuff/labels.txt    base classes only
    imagenet/<wnid>/*.JPEG, imagenet_synsets.txt, imagenet_lemmas.txt      novel classes, base
                                                        parents and the children of both (object
                                                        images over base textures or clutter)
    aliases.txt, hypernyms.tsv                          class <-> synset; the synset tree
    ade/ADEChallengeData2016/{images,annotations}/{training,validation}, objectInfo150.txt
    toy_world.json                                                          manifest
Every image is rendered from its own generator seeded by (seed, source, index), so the bytes
do not depend on the worker count or schedule.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from larvess.hierarchy import write_hypernyms

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 225),
    "yellow": (230, 205, 40),
    "purple": (150, 50, 195),
    "orange": (245, 125, 25),
}
PATTERNS = ("stripes", "bars", "checkers", "dots", "waves", "rings", "zigzags", "speckles")
# base period (pixels) and base orientation (degrees) of each pattern family
_PERIOD = {"stripes": 8, "bars": 22, "checkers": 18, "dots": 12, "waves": 10, "rings": 11,
           "zigzags": 12, "speckles": 7}  # fmt: skip
_ANGLE = {"stripes": 90, "bars": 0, "checkers": 0, "dots": 20, "waves": 90, "rings": 0,
          "zigzags": 90, "speckles": 0}  # fmt: skip
_SOURCES = {"coco": 1, "imagenet": 2, "ade_train": 3, "ade_val": 4}
JPEG_QUALITY = 90
WORLD_VERSION = 2  # 2: the vocabulary is a tree (toy_tree); a world of another version is stale
ROOT_WNID = "n90000000"  # the toy tree's one root ("toy entity"), no class of its own
# The tree, by (base?, index in its pool): (child synsets, share of the node's ImageNet images
# labelled at the node itself; the rest go to the children). Spread over hues and patterns.
TREE: dict[tuple[bool, int], tuple[int, float]] = {
    (True, 0): (3, 0.2),  # a base class with images at the node and below it (COCO dog)
    (True, 3): (2, 0.0),  # a base class with image-labelled children only
    (False, 0): (3, 0.0),  # novel internal nodes: children only (the node listed, no images) ...
    (False, 1): (2, 0.25),  # ... or a few images at the node (also the residual class, below)
    (False, 4): (2, 0.0),
    (False, 7): (3, 0.25),
    (False, 9): (2, 0.0),
}
RESIDUAL = (1, 2)  # novel 2's synset lies below novel 1's: one dataset, "the rest" and a specific


@dataclass(frozen=True)
class ToyClass:
    name: str  # "red stripes": the same name in every source, so the vocabulary merges by name
    colour: str
    pattern: str
    base: bool  # True: has masks in coco_stuff; False: novel (image-level labels only)
    wnid: str | None = None  # made-up WordNet id: novel n90000001..., base n90000101...


@dataclass(frozen=True)
class ToySynset:
    """One synset of the toy tree (hypernyms.tsv); ImageNet-format images are labelled at it."""

    wnid: str
    name: str  # its lemma (imagenet_lemmas.txt): the class name, or "<class> type <j>"
    parent: str | None  # its one hypernym (None: the root)
    texture: str | None  # the class whose texture its images show (None: the root)
    images: int  # ImageNet-format images labelled at it
    listed: bool  # in imagenet_synsets.txt (a class of the ImageNet source, images or not)
    cls: str | None  # the dataset class it is the synset of (None: an ImageNet-only synset)


def toy_classes(num_base: int = 12, num_novel: int = 12) -> list[ToyClass]:
    """Base classes first, then novel; balanced so every hue and pattern occurs in both sets.

    Cell (hue i, pattern j) of the 6 x 8 grid: the first 24 cells are those with i = j mod 2
    (4 per hue, 3 per pattern), split base/novel by (i // 2 + j // 2) parity; the other 24
    cells extend both pools for larger worlds (at most 24 base and 24 novel).
    """
    if not (1 <= num_base <= 24 and 0 <= num_novel <= 24):
        raise ValueError(f"toy world: need 1 <= num_base <= 24, 0 <= num_novel <= 24, "
                         f"got {num_base}, {num_novel}")  # fmt: skip
    hues = list(COLOURS)
    pools: dict[bool, list[tuple[str, str]]] = {True: [], False: []}
    for first in (True, False):
        for i, hue in enumerate(hues):
            for j, pat in enumerate(PATTERNS):
                if (i % 2 == j % 2) == first:
                    pools[(i // 2 + j // 2) % 2 == 0].append((hue, pat))
    base = [ToyClass(f"{h} {p}", h, p, True, f"n{90000101 + k}")
            for k, (h, p) in enumerate(pools[True][:num_base])]  # fmt: skip
    novel = [ToyClass(f"{h} {p}", h, p, False, f"n{90000001 + k}")
             for k, (h, p) in enumerate(pools[False][:num_novel])]  # fmt: skip
    return base + novel


def toy_tree(table: list[ToyClass], per_class: int, tree: bool = True) -> list[ToySynset]:
    """The synsets of the world of class table `table`: the root, one per class, the children.

    Each novel class and each base class with children gets `per_class` ImageNet-format images:
    all at its own synset (a leaf), or a TREE share at the node and the rest spread over its
    children (rendered with its texture); base leaves get none. tree=False: every class a leaf
    under the root (the flat world). The children's wnids follow the classes' (n90000201...).
    """
    out = [ToySynset(ROOT_WNID, "toy entity", None, None, 0, False, None)]
    pool = {True: [c for c in table if c.base], False: [c for c in table if not c.base]}
    nested = {}  # nested class name -> the residual class's wnid
    if tree and len(pool[False]) > max(RESIDUAL):
        nested[pool[False][RESIDUAL[1]].name] = pool[False][RESIDUAL[0]].wnid
    children = []
    for base in (True, False):
        for k, c in enumerate(pool[base]):
            n_kids, share = TREE.get((base, k), (0, 0.0)) if tree else (0, 0.0)
            n = 0 if base and not n_kids else per_class
            own = n if not n_kids else int(round(n * share))
            parent = nested.get(c.name, ROOT_WNID)
            out.append(ToySynset(c.wnid, c.name, parent, c.name, own, n > 0, c.name))
            rest = n - own
            for j in range(n_kids):
                m = rest // n_kids + (j < rest % n_kids)
                children.append((c, j, m))
    for i, (c, j, m) in enumerate(children):
        name = f"{c.name} type {j + 1}"
        out.append(ToySynset(f"n{90000201 + i}", name, c.wnid, c.name, m, True, None))
    return out


def _smooth_noise(h: int, w: int, cell: float, rng: np.random.Generator) -> np.ndarray:
    """Value noise in [0, 1] with feature size ~cell pixels: float32 [h, w]."""
    gh, gw = max(2, int(np.ceil(h / cell)) + 1), max(2, int(np.ceil(w / cell)) + 1)
    grid = Image.fromarray(rng.random((gh, gw), dtype=np.float32), mode="F")
    return np.asarray(grid.resize((w, h), Image.BICUBIC), dtype=np.float32)


def _sq(t: np.ndarray, sharp: float = 2.5) -> np.ndarray:
    """Anti-aliased square wave of period 1 in [0, 1]."""
    return np.clip(0.5 + sharp * np.sin(2 * np.pi * t), 0.0, 1.0)


def _pattern(pattern: str, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """Pattern intensity t in [0, 1]: float32 [h, w], with jittered period, phase, angle."""
    p = _PERIOD[pattern] * float(np.exp(rng.uniform(-0.2, 0.2)))
    theta = np.deg2rad(_ANGLE[pattern] + rng.uniform(-12, 12))
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    u = x * np.cos(theta) + y * np.sin(theta) + rng.uniform(0, 100)
    v = -x * np.sin(theta) + y * np.cos(theta) + rng.uniform(0, 100)
    if pattern in ("stripes", "bars"):
        return _sq(u / p)
    if pattern == "checkers":
        return np.clip(0.5 + 4 * np.sin(2 * np.pi * u / p) * np.sin(2 * np.pi * v / p), 0, 1)
    if pattern == "dots":
        du, dv = (u / p) % 1.0 - 0.5, (v / p) % 1.0 - 0.5
        return np.clip(0.3 * p - np.hypot(du, dv) * p + 0.5, 0, 1)
    if pattern == "waves":
        return _sq((u + 4 * np.sin(2 * np.pi * v / 36)) / p)
    if pattern == "rings":
        cy, cx = rng.uniform(-0.5, 1.5, size=2) * (h, w)
        return _sq(np.hypot(x - cx, y - cy) / p)
    if pattern == "zigzags":
        tri = 2 * np.abs(v / 14 - np.floor(v / 14 + 0.5))
        return _sq((u + 5 * (2 * tri - 1)) / p)
    if pattern == "speckles":
        return np.clip(0.5 + 4 * (_smooth_noise(h, w, p, rng) - 0.5), 0, 1)
    raise ValueError(f"toy world: unknown pattern {pattern!r}")


def render_texture(c: ToyClass, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """One jittered sample of class c's texture: float32 [h, w, 3] in [0, 1]."""
    fg = np.asarray(COLOURS[c.colour], np.float32) / 255 + rng.normal(0, 0.04, 3)
    fg = fg * rng.uniform(0.85, 1.1)
    bg = fg * rng.uniform(0.15, 0.35)
    t = _pattern(c.pattern, h, w, rng)[..., None]
    img = bg + (fg - bg) * t + rng.normal(0, 0.03, (h, w, 3))
    return np.clip(img, 0, 1).astype(np.float32)


def render_clutter(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """Non-vocabulary background: desaturated low-contrast noise, float32 [h, w, 3] in [0, 1]."""
    grey = rng.uniform(0.35, 0.65) + 0.12 * (_smooth_noise(h, w, rng.uniform(6, 24), rng) - 0.5)
    img = grey[..., None] + rng.uniform(-0.05, 0.05, 3) + rng.normal(0, 0.03, (h, w, 3))
    return np.clip(img, 0, 1).astype(np.float32)


def render_scene(
    classes: list[int], table: list[ToyClass], size: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Scene of 2-5 warped Voronoi cells, each a texture of a class drawn from `classes`.

    Returns image uint8 [size, size, 3] and label int64 [size, size] of indices into `table`,
    -1 on a thin band along cell borders (annotators leave borders unlabelled).
    """
    n = int(rng.integers(2, 6))
    ids = rng.choice(classes, size=n, replace=len(classes) < n)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    x = x + 10 * (_smooth_noise(size, size, 32, rng) - 0.5)
    y = y + 10 * (_smooth_noise(size, size, 32, rng) - 0.5)
    sites = rng.uniform(0, size, (n, 2)).astype(np.float32)
    d = np.hypot(x[None] - sites[:, 0, None, None], y[None] - sites[:, 1, None, None])
    order = np.argsort(d, axis=0)
    cell = order[0]
    d_sorted = np.take_along_axis(d, order[:2], axis=0)
    label = np.asarray(ids, np.int64)[cell]
    img = np.zeros((size, size, 3), np.float32)
    for k in np.unique(label):
        m = label == k
        img[m] = render_texture(table[k], size, size, rng)[m]
    label[d_sorted[1] - d_sorted[0] < 1.5] = -1
    return _to_uint8(img), label


def render_object(
    c: ToyClass, size: int, rng: np.random.Generator, background: ToyClass | None = None
) -> np.ndarray:
    """ImageNet-like image: one blob of class c over `background`'s texture (None: clutter that
    belongs to no class). uint8 [size, size, 3]; the image's only label is c."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    cy, cx = size / 2 + rng.uniform(-size / 8, size / 8, 2)
    r0 = size * rng.uniform(0.25, 0.38)
    ang = np.arctan2(y - cy, x - cx)
    r = r0 * (1 + rng.uniform(-0.15, 0.15) * np.cos(2 * (ang - rng.uniform(0, np.pi))))
    for k in (3, 5):
        r = r * (1 + rng.uniform(-0.08, 0.08) * np.sin(k * ang + rng.uniform(0, 2 * np.pi)))
    inside = (np.hypot(y - cy, x - cx) < r)[..., None]
    if background is None:
        behind = render_clutter(size, size, rng)
    else:
        behind = render_texture(background, size, size, rng)
    img = np.where(inside, render_texture(c, size, size, rng), behind)
    return _to_uint8(img)


def _to_uint8(img: np.ndarray) -> np.ndarray:
    return np.round(np.clip(img, 0, 1) * 255).astype(np.uint8)


def _write_jpeg(path: Path, img: np.ndarray) -> None:
    Image.fromarray(img).save(path, format="JPEG", quality=JPEG_QUALITY)


def _job(args: tuple) -> tuple[str, int, np.ndarray | None]:
    """Render and write one image (+ mask); returns per-class pixel counts for ADE statistics.

    args: (kind, index, out, seed, size, table, item); item for "imagenet": (wnid, texture
    class, index at that synset), else None."""
    kind, i, out, seed, size, table, item = args
    rng = np.random.default_rng([seed, _SOURCES[kind], i])
    out = Path(out)
    if kind == "imagenet":
        wnid, c, j = item
        # As on real ImageNet, the unlabelled background is mostly "stuff" the mask data
        # covers (a base class, never the object's own); a background of no class would let
        # the whole image stand for the label, a shortcut that fails in scenes.
        base = [b for b in table if b.base and b.name != c.name]
        bg = base[int(rng.integers(len(base)))] if base and rng.random() < 0.75 else None
        img = render_object(c, size, rng, bg)
        _write_jpeg(out / "imagenet" / wnid / f"{wnid}_{j:05d}.JPEG", img)
        return kind, i, None
    if kind == "coco":
        pool = [k for k, c in enumerate(table) if c.base]
        img, label = render_scene(pool, table, size, rng)
        stem = f"{i + 1:012d}"
        root = out / "coco_stuff"
        _write_jpeg(root / "images" / "train2017" / f"{stem}.jpg", img)
        png = np.where(label < 0, 255, label).astype(np.uint8)  # base k = labels.txt id k+1
        Image.fromarray(png).save(root / "stuffthingmaps" / "train2017" / f"{stem}.png")
        return kind, i, None
    split, prefix = ("training", "train") if kind == "ade_train" else ("validation", "val")
    img, label = render_scene(list(range(len(table))), table, size, rng)
    root = out / "ade" / "ADEChallengeData2016"
    stem = f"ADE_{prefix}_{i + 1:08d}"
    _write_jpeg(root / "images" / split / f"{stem}.jpg", img)
    Image.fromarray((label + 1).astype(np.uint8)).save(root / "annotations" / split / f"{stem}.png")
    return kind, i, np.bincount(label[label >= 0], minlength=len(table))


def make_toy_world(
    out: str | Path,
    seed: int = 0,
    size: int = 128,
    n_coco: int = 1500,
    n_imagenet_per_class: int = 125,
    n_ade_train: int = 1500,
    n_ade_val: int = 200,
    num_base: int = 12,
    num_novel: int = 12,
    workers: int = 2,
    progress: bool = True,
    tree: bool = True,
) -> dict:
    """Write the toy world under `out` (see module docstring); returns the manifest dict.

    n_imagenet_per_class: ImageNet-format images per novel class and per base class with
    children (split over the node and its children, ``toy_tree``). tree=False: the flat world
    (every class a leaf, images of novel classes only)."""
    if size < 32:
        raise ValueError(f"toy world: image size must be >= 32, got {size}")
    table = toy_classes(num_base, num_novel)
    by_name = {c.name: c for c in table}
    synsets = toy_tree(table, n_imagenet_per_class, tree)
    listed = sorted((s for s in synsets if s.listed), key=lambda s: s.wnid)  # the class ids
    items = [(s.wnid, by_name[s.texture], j) for s in listed for j in range(s.images)]
    out = Path(out)
    coco, ade = out / "coco_stuff", out / "ade" / "ADEChallengeData2016"
    dirs = [coco / "images" / "train2017", coco / "stuffthingmaps" / "train2017"]
    dirs += [ade / d / s for d in ("images", "annotations") for s in ("training", "validation")]
    dirs += [out / "imagenet" / s.wnid for s in listed if s.images]  # none for an empty node
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)
    counts = {"coco": n_coco, "imagenet": len(items),
              "ade_train": n_ade_train, "ade_val": n_ade_val}  # fmt: skip
    jobs = [(k, i, str(out), seed, size, table, items[i] if k == "imagenet" else None)
            for k, n in counts.items() for i in range(n)]  # fmt: skip
    pixels = {"ade_train": np.zeros(len(table)), "ade_val": np.zeros(len(table))}
    present = {"ade_train": np.zeros(len(table), int), "ade_val": np.zeros(len(table), int)}
    t0 = time.time()
    bar = tqdm(total=len(jobs), desc="toy world", unit="img", disable=not progress)
    with mp.get_context("fork").Pool(workers) if workers > 1 else _Serial() as pool:
        for kind, _, hist in pool.imap_unordered(_job, jobs, chunksize=16):
            if hist is not None:
                pixels[kind] += hist
                present[kind] += hist > 0
            bar.update()
    bar.close()

    (coco / "labels.txt").write_text(
        "0: unlabeled\n" + "".join(f"{k + 1}: {c.name}\n" for k, c in enumerate(table) if c.base)
    )
    (out / "imagenet_synsets.txt").write_text("".join(f"{s.wnid}\n" for s in listed))
    (out / "imagenet_lemmas.txt").write_text("".join(f"{s.wnid}\t{s.name}\n" for s in listed))
    # the toy world's curated mapping: a synset joins a dataset class only through one
    # (larvess/meta/wordnet_*.tsv for the real datasets, an alias file here)
    (out / "aliases.txt").write_text(
        "# toy synset | toy dataset class (vocab.alias_file)\n"
        + "".join(f"{c.wnid} | {c.name}\n" for c in table)
    )
    write_hypernyms(
        out / "hypernyms.tsv",
        {s.wnid: [s.parent] if s.parent else [] for s in sorted(synsets, key=lambda s: s.wnid)},
        [f"toy world hypernyms (vocab.hierarchy_file), seed-independent; tree: {tree}",
         "format of larvess/meta/wordnet_hypernyms.tsv: wnid<TAB>direct hypernyms, '-' for none",
         f"root {ROOT_WNID} (toy entity); {len(synsets)} synsets"],
    )  # fmt: skip
    ratio = pixels["ade_train"] / max(1.0, float(n_ade_train * size * size))
    lines = ["Idx\tRatio\tTrain\tVal\tName"]
    for k, c in enumerate(table):
        lines.append(f"{k + 1}\t{ratio[k]:.4f}\t{present['ade_train'][k]}\t"
                     f"{present['ade_val'][k]}\t{c.name}")  # fmt: skip
    (ade / "objectInfo150.txt").write_text("\n".join(lines) + "\n")
    has_kids = {s.parent for s in synsets if s.parent}
    cls_of = {s.wnid: s.cls for s in synsets}
    nested = [s for s in synsets if s.cls and s.parent != ROOT_WNID and s.parent]
    manifest = {
        "version": WORLD_VERSION,
        "seed": seed,
        "image_size": size,
        "counts": counts,
        "classes": [asdict(c) for c in table],
        "base": [c.name for c in table if c.base],
        "novel": [c.name for c in table if not c.base],
        # the tree: evaluated classes that are internal nodes (a synset below theirs) and leaves
        "internal": [c.name for c in table if c.wnid in has_kids],
        "leaves": [c.name for c in table if c.wnid not in has_kids],
        "residual": [{"class": cls_of[s.parent], "nested": s.cls} for s in nested],
        "synsets": [asdict(s) for s in synsets],
        "jpeg_quality": JPEG_QUALITY,
    }
    (out / "toy_world.json").write_text(json.dumps(manifest, indent=1) + "\n")
    manifest["seconds"] = round(time.time() - t0, 2)  # not in the file: keeps it byte-identical
    return manifest


class _Serial:
    """Stand-in for a Pool with one worker (no fork, easier to debug)."""

    def __enter__(self) -> _Serial:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def imap_unordered(self, fn, jobs, chunksize=1):
        return map(fn, jobs)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", type=int, default=128, help="image side in pixels")
    ap.add_argument("--coco", type=int, default=1500, help="COCO-Stuff-format scenes (base only)")
    ap.add_argument("--imagenet-per-class", type=int, default=125,
                    help="object images per novel class (and per base class with children)")  # fmt: skip
    ap.add_argument("--ade-train", type=int, default=1500, help="ADE training scenes (all)")
    ap.add_argument("--ade-val", type=int, default=200, help="ADE validation scenes (all)")
    ap.add_argument("--num-base", type=int, default=12)
    ap.add_argument("--num-novel", type=int, default=12)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--flat", action="store_true", help="no tree: every class a leaf")
    a = ap.parse_args(argv)
    m = make_toy_world(a.out, a.seed, a.size, a.coco, a.imagenet_per_class, a.ade_train,
                       a.ade_val, a.num_base, a.num_novel, a.workers, tree=not a.flat)  # fmt: skip
    n = sum(m["counts"].values())
    print(f"toy world: {n} images, {len(m['base'])} base + {len(m['novel'])} novel classes "
          f"({len(m['internal'])} internal nodes), {len(m['synsets']) - 1} synsets "
          f"-> {a.out} in {m['seconds']:.1f} s")  # fmt: skip


if __name__ == "__main__":
    main()
