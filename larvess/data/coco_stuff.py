"""COCO-Stuff-164k training reader (mask source).

Layout: root/images/<split>/*.jpg, root/stuffthingmaps/<split>/*.png, split in
{train2017, val2017}; names from root/labels.txt (or ``labels_file``). PNG value v is labels.txt
id v + 1, 255 = unlabeled (-> -1). With the real 183-line labels file the 11 unused ids are
dropped and the rest map in order to 0..170 (see ``larvess.vocab.coco_stuff_classes``); PNG
values of dropped ids become -1, values above the largest listed id are an error.

``from_json=True`` paints the label map from the COCO JSONs instead (default
root/annotations/stuff_<split>.json and instances_<split>.json), decoded with pycocotools.
Painting: every pixel starts as ignore; each annotation of the stuff JSON with category
92..182 and each annotation of the instances JSON (1..90, crowd included) sets its pixels to its
class; stuff 183 "other" (the thing area) is not painted; pixels covered by two or more painted
annotations are set back to ignore. So the result does not depend on the order.

Sample: {"image": float32 [3, c, c], "label": int64 [c, c] vocabulary rows (-1 ignore), "key"}.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from larvess.data.transforms import TrainAugment
from larvess.vocab import coco_stuff_classes, read_coco_stuff_labels

log = logging.getLogger(__name__)


def read_rgb(path: str | Path) -> np.ndarray:
    """Image file -> uint8 [H, W, 3] RGB; an unreadable or truncated file is a ValueError naming it."""
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except OSError as err:
        raise ValueError(f"{path}: cannot read image ({err})") from err


def read_label(path: str | Path) -> np.ndarray:
    """Single-channel label image (PNG L/P, TIFF I;16 / I) -> integer [H, W] raw values."""
    try:
        with Image.open(path) as im:
            if im.mode not in ("L", "P", "I", "I;16", "I;16L", "I;16B"):
                raise ValueError(f"{path}: label image must be single-channel, got mode {im.mode}")
            return np.asarray(im)
    except OSError as err:
        raise ValueError(f"{path}: cannot read label image ({err})") from err


def pair_files(
    img_dir: Path, img_ext: str, lab_dir: Path, lab_ext: str, skip_missing: bool
) -> tuple[list[tuple[str, Path, Path]], int]:
    """Match images and label files by stem -> ([(key, image, label)], number skipped).

    Unmatched files are an error naming them unless skip_missing (then skipped and logged).
    """
    for d in (img_dir, lab_dir):
        if not d.is_dir():
            raise FileNotFoundError(f"folder not found: {d}")
    imgs = {p.stem: p for p in img_dir.glob(f"*{img_ext}")}
    labs = {p.stem: p for p in lab_dir.glob(f"*{lab_ext}")}
    no_lab = sorted(set(imgs) - set(labs))
    no_img = sorted(set(labs) - set(imgs))
    if (no_lab or no_img) and not skip_missing:
        parts = [f"{len(no_lab)} image(s) without a label file in {lab_dir}: "]
        parts[0] += ", ".join(str(imgs[k].name) for k in no_lab[:5])
        parts.append(f"{len(no_img)} label file(s) without an image in {img_dir}: ")
        parts[1] += ", ".join(str(labs[k].name) for k in no_img[:5])
        raise FileNotFoundError("; ".join(parts))
    skipped = len(no_lab) + len(no_img)
    if skipped:
        log.warning("skipped %d unmatched image/label files (%s, %s)", skipped, img_dir, lab_dir)
    pairs = [(k, imgs[k], labs[k]) for k in sorted(set(imgs) & set(labs))]
    if not pairs:
        raise FileNotFoundError(f"no {img_ext} images with {lab_ext} labels in {img_dir}")
    return pairs, skipped


def to_rows(label: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """Local ids (-1 ignore) -> vocabulary rows (-1 ignore); rows None = identity."""
    if rows is None:
        return label
    return torch.where(label >= 0, rows[label.clamp(min=0)], label.new_full((), -1))


def ann_to_mask(seg: list | dict, h: int, w: int) -> np.ndarray:
    """COCO segmentation (polygons, uncompressed or compressed RLE) -> bool [h, w]."""
    from pycocotools import mask as mask_utils

    if isinstance(seg, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(seg, h, w))
    elif isinstance(seg.get("counts"), list):
        rle = mask_utils.frPyObjects(seg, h, w)
    else:
        rle = seg
    with warnings.catch_warnings():
        # pycocotools' own numpy-2 copy= deprecation, not ours
        warnings.simplefilter("ignore", DeprecationWarning)
        return mask_utils.decode(rle).astype(bool)


class CocoStuff(torch.utils.data.Dataset):
    """COCO-Stuff-164k with pixel masks; ``get(i, rng)`` gives an augmented sample."""

    def __init__(
        self,
        root: str | Path,
        split: str | None = "train2017",
        labels_file: str | Path | None = None,
        rows: torch.Tensor | None = None,
        transform: TrainAugment | None = None,
        from_json: bool = False,
        stuff_json: str | Path | None = None,
        instances_json: str | Path | None = None,
        skip_missing: bool = False,
    ) -> None:
        self.root = Path(root)
        self.split = split = split or "train2017"
        self.rows = None if rows is None else torch.as_tensor(rows, dtype=torch.long)
        self.transform = transform if transform is not None else TrainAugment(crop_size=512)
        labels_file = Path(labels_file) if labels_file else self.root / "labels.txt"
        self.from_json = from_json
        if not from_json:
            if not labels_file.is_file():
                raise FileNotFoundError(f"COCO-Stuff labels file not found: {labels_file}")
            self._set_classes(read_coco_stuff_labels(labels_file), str(labels_file))
            self.items, self.n_skipped = pair_files(
                self.root / "images" / split,
                ".jpg",
                self.root / "stuffthingmaps" / split,
                ".png",
                skip_missing,
            )
        else:
            ann = self.root / "annotations"
            self._stuff_json = Path(stuff_json or ann / f"stuff_{split}.json")
            self._inst_json = Path(instances_json or ann / f"instances_{split}.json")
            self._load_json(labels_file, skip_missing)
        if self.rows is not None and len(self.rows) != len(self.class_names):
            raise ValueError(
                f"rows has {len(self.rows)} entries for {len(self.class_names)} classes"
            )

    @staticmethod
    def read_class_names(
        root: str | Path, labels_file: str | Path | None = None
    ) -> list[list[str]]:
        """Class names in local order from root/labels.txt (or labels_file), without the data."""
        path = Path(labels_file) if labels_file else Path(root) / "labels.txt"
        if not path.is_file():
            raise FileNotFoundError(f"COCO-Stuff labels file not found: {path}")
        return [[n] for n in coco_stuff_classes(read_coco_stuff_labels(path))[1]]

    def _set_classes(self, pairs: list[tuple[int, str]], origin: str) -> None:
        self.ids, names = coco_stuff_classes(pairs)
        self.class_names = [[n] for n in names]
        self.max_id = max(i for i, _ in pairs)
        self._origin = origin
        self._id_to_local = {cid: k for k, cid in enumerate(self.ids)}
        # PNG value v = id - 1; ids listed but dropped (unused) -> -1; beyond max_id -> invalid
        self._lut = np.full(256, -1, np.int64)
        self._valid = np.zeros(256, bool)
        self._valid[255] = True
        self._valid[: min(self.max_id, 255)] = True
        for cid, k in self._id_to_local.items():
            if 1 <= cid <= 255:
                self._lut[cid - 1] = k

    def _load_json(self, labels_file: Path, skip_missing: bool) -> None:
        data = {}
        for p in (self._stuff_json, self._inst_json):
            if not p.is_file():
                raise FileNotFoundError(f"COCO JSON not found: {p}")
            data[p] = json.loads(p.read_text(encoding="utf-8"))
        stuff, inst = data[self._stuff_json], data[self._inst_json]
        if labels_file.is_file():
            pairs = read_coco_stuff_labels(labels_file)
            origin = str(labels_file)
        else:
            cats = {c["id"]: c["name"] for c in inst["categories"] + stuff["categories"]}
            pairs = sorted((i, n) for i, n in cats.items() if i != 183)
            origin = f"{self._inst_json} + {self._stuff_json}"
        self._set_classes(pairs, origin)
        images = {im["id"]: im for im in inst["images"] + stuff["images"]}
        self._anns: dict[int, list[tuple[int, object]]] = {i: [] for i in images}
        for src, d in ((self._stuff_json, stuff), (self._inst_json, inst)):
            for a in d["annotations"]:
                cid = a["category_id"]
                if cid == 183:
                    continue
                if cid < 1 or cid > self.max_id:
                    raise ValueError(f"{src}: category_id {cid} outside 1..{self.max_id}")
                if a["image_id"] not in self._anns:
                    raise ValueError(
                        f"{src}: annotation {a.get('id')} of unknown image {a['image_id']}"
                    )
                self._anns[a["image_id"]].append((cid, a["segmentation"]))
        img_dir = self.root / "images" / self.split
        self.items, missing = [], []
        for iid in sorted(images, key=lambda i: images[i]["file_name"]):
            im = images[iid]
            path = img_dir / im["file_name"]
            if not path.is_file():
                missing.append(path.name)
                continue
            self.items.append((Path(im["file_name"]).stem, path, (iid, im["height"], im["width"])))
        if missing and not skip_missing:
            raise FileNotFoundError(
                f"{len(missing)} image(s) of {self._inst_json} missing in {img_dir}: "
                + ", ".join(missing[:5])
            )
        if missing:
            log.warning("skipped %d images missing in %s", len(missing), img_dir)
        self.n_skipped = len(missing)
        if not self.items:
            raise FileNotFoundError(f"no images of {self._inst_json} found in {img_dir}")

    def __len__(self) -> int:
        return len(self.items)

    def _paint(self, iid: int, h: int, w: int) -> np.ndarray:
        label = np.full((h, w), -1, np.int64)
        count = np.zeros((h, w), np.uint8)
        for cid, seg in self._anns[iid]:
            m = ann_to_mask(seg, h, w)
            label[m] = self._id_to_local.get(cid, -1)
            count[m] += 1
        label[count > 1] = -1
        return label

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray, str]:
        """Unaugmented (image uint8 [H, W, 3], label int64 [H, W] local ids, key)."""
        key, img_path, lab = self.items[index]
        image = read_rgb(img_path)
        if not self.from_json:
            raw = read_label(lab)
            if raw.dtype == np.uint8:
                values = np.flatnonzero(np.bincount(raw.ravel(), minlength=256))
            else:
                values = np.unique(raw)
            bad = values[(values > 255) | ~self._valid[np.minimum(values, 255)]]
            if bad.size:
                raise ValueError(
                    f"{lab}: label value {int(bad[0])} is not a class of {self._origin} "
                    f"(PNG values 0..{self.max_id - 1} and 255)"
                )
            label = self._lut[raw]
            src = lab
        else:
            iid, h, w = lab
            label = self._paint(iid, h, w)
            src = self._inst_json
        if label.shape != image.shape[:2]:
            raise ValueError(
                f"{img_path}: image size {image.shape[:2]} does not match label {label.shape} "
                f"of {src}"
            )
        return image, label, key

    def get(self, index: int, rng: np.random.Generator) -> dict:
        image, label, key = self.load(index)
        x, y = self.transform(image, label, rng)
        return {"image": x, "label": to_rows(y, self.rows), "key": key}

    def __getitem__(self, index: int) -> dict:
        return self.get(index, np.random.default_rng())
