"""Small dataset fixtures in the real file formats, shared by the data-reader tests."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

REFERENCE = Path(__file__).resolve().parents[1] / "larvess" / "meta"  # shipped metadata


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


# --- COCO-Stuff in its three on-disk layouts -------------------------------------------------

COCO_UNUSED_IDS = (12, 26, 29, 30, 45, 66, 68, 69, 71, 83, 91)  # labels.txt ids, never in data
COCO_KEPT_IDS = [i for i in range(1, 183) if i not in COCO_UNUSED_IDS]  # trainId k -> id


def coco_trainid(cid: int) -> int:
    """labels.txt id -> 0..170 trainId (mmseg / detectron2 numbering)."""
    return COCO_KEPT_IDS.index(cid)


def write_coco_stuff(
    root: Path, layout: str, id_maps: dict[str, np.ndarray], split: str = "train2017"
) -> None:
    """Write images + label PNGs as each tool leaves them on disk.

    ``id_maps``: {image stem: int [H, W] labels.txt ids, 0 = unlabeled}. Layouts:
    "raw" (zip unpacked into annotations/), "raw_stuffthingmaps" (into stuffthingmaps/),
    "mmseg" (raw PNGs + *_labelTrainIds.png beside them in annotations/), "zsseg"
    (zsseg.baseline's prepare_coco_stuff_164k_sem_seg.py: images in root/<split>/, raw
    stuffthingmaps/ + stuffthingmaps_detectron2/), "zsseg_only" (no raw folder), "catseg"
    (CAT-Seg's prepare_coco_stuff.py: images/, raw annotations/ + annotations_detectron2/),
    "catseg_only" (annotations_detectron2/ only).
    """
    lut = np.full(256, 255, np.int64)
    lut[COCO_KEPT_IDS] = np.arange(171)
    for n, (stem, ids) in enumerate(sorted(id_maps.items())):
        h, w = ids.shape
        raw = np.where(ids == 0, 255, ids - 1)
        trainid = lut[ids]
        zs = layout.startswith("zsseg")
        write_jpeg((root / split if zs else root / "images" / split) / f"{stem}.jpg", h, w, n)
        if layout in ("raw", "mmseg", "catseg"):
            write_png(root / "annotations" / split / f"{stem}.png", raw)
        if layout in ("raw_stuffthingmaps", "zsseg"):
            write_png(root / "stuffthingmaps" / split / f"{stem}.png", raw, palette=True)
        if layout == "mmseg":
            write_png(root / "annotations" / split / f"{stem}_labelTrainIds.png", trainid)
        if zs:
            write_png(root / "stuffthingmaps_detectron2" / split / f"{stem}.png", trainid)
        if layout.startswith("catseg"):
            write_png(root / "annotations_detectron2" / split / f"{stem}.png", trainid)


# --- the ADE20K_2021_17_01 download (input of scripts/prepare_ade847.py) ----------------------


def ade_seg_rgb(classes: np.ndarray, seed: int) -> np.ndarray:
    """Full-ADE class map -> the _seg.png pixels: R // 10 * 256 + G = class, B = instance."""
    rng = np.random.default_rng(seed)
    hi, lo = classes // 256, classes % 256
    extra = np.minimum(rng.integers(0, 10, classes.shape), 255 - hi * 10)  # R // 10 ignores it
    rgb = np.stack([hi * 10 + extra, lo, rng.integers(0, 256, classes.shape)], axis=-1)
    return rgb.astype(np.uint8)


ADE_FULL_CLASSES = 3688  # objects of ADE20K_2021_17_01 (index_ade20k.pkl: C)
ADE_INDEX_KEYS = (  # the 16 keys of the release's index_ade20k.pkl, its 'description' included
    "filename", "folder", "scene", "objectIsPart", "objectPresence", "objectcounts",
    "objectnames", "proportionClassIsPart", "wordnet_found", "wordnet_level1", "wordnet_synset",
    "wordnet_hypernym", "wordnet_gloss", "wordnet_synonyms", "wordnet_frequency", "description",
)  # fmt: skip


def ade_full_index(files: list[str], folders: list[str], class_maps: list[np.ndarray]) -> dict:
    """index_ade20k.pkl as the release ships it (the ADE20K toolkit's starter notebook lists the
    keys): per-image lists, [C, N] float count arrays, per-class lists and arrays; scene names
    with a leading '/' ('/street'). Counts: one instance per class present in the map."""
    c, n = ADE_FULL_CLASSES, len(files)
    presence = np.zeros((c, n), np.float64)  # float in the release ("It has 70.0 objects")
    for i, m in enumerate(class_maps):
        ids = np.unique(m)
        presence[ids[(ids > 0) & (ids <= c)] - 1, i] = 1.0
    names = [f"object{i}" for i in range(c)]
    idx = {
        "filename": list(files),
        "folder": list(folders),
        "scene": ["/" + f.rstrip("/").split("/")[-1] for f in folders],
        "objectIsPart": np.zeros((c, n), np.float64),
        "objectPresence": presence,
        "objectcounts": presence.sum(axis=1),
        "objectnames": names,
        "proportionClassIsPart": np.zeros(c, np.float64),
        "wordnet_found": np.ones(c, bool),
        "wordnet_level1": names,
        "wordnet_synset": [f"{x}.n.01" for x in names],
        "wordnet_hypernym": ["entity.n.01"] * c,
        "wordnet_gloss": [""] * c,
        "wordnet_synonyms": names,
        "wordnet_frequency": np.ones(c, np.float64),
    }
    idx["description"] = {k: f"{k} (fixture)" for k in idx}
    assert tuple(idx) == ADE_INDEX_KEYS
    return idx


def make_ade_full_download(
    parent: Path, images: list[tuple[str, str, str, np.ndarray]], index: bool = True
) -> Path:
    """ADE20K_2021_17_01 under parent, as the zip unpacks; returns the dataset folder.

    ``images``: (split, "<scene category>/<scene>", stem, int [H, W] full-ADE class map). Each
    image gets <stem>.jpg, <stem>_seg.png, <stem>.json and a <stem>/ folder of instance masks in
    images/ADE/<split>/<scene>/; index_ade20k.pkl (ade_full_index) lists them ('folder' relative
    to parent).
    """
    ds = parent / "ADE20K_2021_17_01"
    folders, files = [], []
    for n, (split, scene, stem, classes) in enumerate(images):
        d = ds / "images" / "ADE" / split / scene
        h, w = classes.shape
        write_jpeg(d / f"{stem}.jpg", h, w, 10 + n)
        Image.fromarray(ade_seg_rgb(classes, n)).save(d / f"{stem}_seg.png")
        (d / f"{stem}.json").write_text("{}")
        (d / stem).mkdir()
        Image.fromarray(np.zeros((h, w), np.uint8)).save(d / stem / f"instance_000_{stem}.png")
        folders.append(f"ADE20K_2021_17_01/images/ADE/{split}/{scene}")
        files.append(f"{stem}.jpg")
    if index:
        import pickle

        idx = ade_full_index(files, folders, [c for *_, c in images])
        with open(ds / "index_ade20k.pkl", "wb") as f:
            pickle.dump(idx, f)
    (ds / "objects.txt").write_text("objectnames\n")
    return ds


# --- ImageNet class folders (input of the shard writer) --------------------------------------


def image_bytes(rng: np.random.Generator, size: int = 24, mode: str = "RGB", **kw) -> bytes:
    """A random image's file bytes: JPEG in `mode` (PNG for RGBA); kw go to PIL's save."""
    a = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    im = Image.fromarray(a).convert(mode)
    buf = io.BytesIO()
    im.save(buf, format="JPEG" if mode != "RGBA" else "PNG", **kw)
    return buf.getvalue()


def make_class_folders(root: Path, wnids: list[str]) -> tuple[Path, dict[str, bytes], set[str]]:
    """root/<wnid>/*: 5 valid RGB JPEGs per class (one progressive) + odd files in class 2 (CMYK,
    grey, PNG bytes under .JPEG, cut short, text). Returns (root, {rel path: bytes}, bad paths)."""
    rng = np.random.default_rng(0)
    files: dict[str, bytes] = {}
    for w in wnids:
        (root / w).mkdir(parents=True)
        for i in range(5):
            files[f"{w}/{w}_{i}.JPEG"] = image_bytes(rng, progressive=(i == 0))
    odd = wnids[1]
    files[f"{odd}/{odd}_cmyk.JPEG"] = image_bytes(rng, mode="CMYK")
    files[f"{odd}/{odd}_grey.JPEG"] = image_bytes(rng, mode="L")
    files[f"{odd}/{odd}_png.JPEG"] = image_bytes(rng, mode="RGBA")  # PNG under a .JPEG name
    files[f"{odd}/{odd}_trunc.JPEG"] = image_bytes(rng, size=64)[:400]
    files[f"{odd}/{odd}_text.JPEG"] = b"not an image\n"
    for rel, data in files.items():
        (root / rel).write_bytes(data)
    return root, files, {f"{odd}/{odd}_trunc.JPEG", f"{odd}/{odd}_text.JPEG"}


def read_tars(out: Path) -> dict[str, dict]:
    """Naive reader: key -> {ext: bytes, "shard": name} over every out/*.tar."""
    samples: dict[str, dict] = {}
    for t in sorted(out.glob("*.tar")):
        with tarfile.open(t) as tf:
            for m in tf.getmembers():
                key, ext = m.name.split(".", 1)
                s = samples.setdefault(key, {"shard": t.name})
                assert s["shard"] == t.name, f"{key} in two shards"
                s[ext] = tf.extractfile(m).read()
    return samples
