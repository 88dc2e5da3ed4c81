"""COCO-Stuff-164k training reader (mask source).

Layouts, detected from the folder and file names under ``root`` (split in {train2017, val2017});
the first one present wins, and the choice is announced once:

1. "zsseg": root/stuffthingmaps_detectron2/<split>/*.png, trainid171 (zsseg.baseline's
   datasets/prepare_coco_stuff_164k_sem_seg.py writes them from stuffthingmaps/, a script SAN
   ships too; images in root/<split>/).
2. "catseg": root/annotations_detectron2/<split>/*.png, trainid171 (CAT-Seg's
   datasets/prepare_coco_stuff.py writes them from annotations/ in its coco-stuff/ tree;
   images in root/images/<split>/).
3. "mmseg": root/annotations/<split>/*_labelTrainIds.png, trainid171 (mmseg's
   tools/dataset_converters/coco_stuff164k.py writes them beside the raw PNGs).
4. "raw": root/annotations/<split>/*.png other than *_labelTrainIds.png, raw182 (the
   stuffthingmaps_trainval2017.zip unpacked into annotations/, as the COCO-Stuff README and
   CAT-Seg say).
5. "raw": root/stuffthingmaps/<split>/*.png, raw182 (the same zip unpacked into stuffthingmaps/,
   as zsseg.baseline expects before its conversion).

Converted layouts come first: a raw folder beside one is normally the conversion's input.
Images: root/images/<split>/*.jpg, else root/<split>/*.jpg (detectron2's coco/ folder).

Label formats (``label_format`` None = the format of the detected layout):
- "raw182": PNG value v = labels.txt id v + 1 (0..181), 255 = unlabeled (-> -1). With the real
  183-line labels.txt the 11 ids never used in the data (PNG values 11, 25, 28, 29, 44, 65, 67,
  68, 70, 82, 90) are an error, and the other 171 map in order to 0..170.
- "trainid171": PNG value = class index 0..170 (0..n-1 for a labels file of n classes), 255 =
  ignore; any other value is an error.
An explicit ``label_format`` picks the first layout of that format; where none is present, the
first layout found is read in the requested format (e.g. trainId PNGs converted in place into
stuffthingmaps/), with a warning. The format is decided per dataset, never guessed per file; a
value outside it is an error naming the file and the value.

Class names: ``labels_file``, else root/labels.txt when present, else the package's
larvess/meta/cocostuff_labels.txt (COCO-Stuff's labels.txt; no download ships it).

``from_json=True`` paints the label map from the COCO JSONs instead (default
root/annotations/stuff_<split>.json and instances_<split>.json), decoded with pycocotools; names
from ``labels_file`` / root/labels.txt, else the JSON categories.
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

from larvess.data.io import (
    RowsMixin,
    announce,
    has_file,
    meta_file,
    pair_files,
    read_label,
    read_rgb,
    to_rows,
)
from larvess.data.transforms import TrainAugment
from larvess.names import coco_stuff_classes, read_coco_stuff_labels

log = logging.getLogger(__name__)

LABEL_FORMATS = ("raw182", "trainid171")
TRAINID_SUFFIX = "_labelTrainIds.png"
_ANNOUNCED: set[tuple] = set()


def coco_stuff_labels_file(root: str | Path, labels_file: str | Path | None = None) -> Path:
    """The names file in effect: ``labels_file``, root/labels.txt, else the package's copy."""
    if labels_file:
        path = Path(labels_file)
        if not path.is_file():
            raise FileNotFoundError(f"COCO-Stuff labels file not found: {path}")
        return path
    local = Path(root) / "labels.txt"
    return local if local.is_file() else meta_file("cocostuff_labels.txt")


def coco_stuff_layouts(root: Path, split: str) -> list[tuple[str, Path, str, tuple, str]]:
    """Candidate layouts in precedence order: (name, label dir, suffix, excluded, format)."""
    ann, stm = root / "annotations" / split, root / "stuffthingmaps" / split
    return [
        ("zsseg", root / "stuffthingmaps_detectron2" / split, ".png", (), "trainid171"),
        ("catseg", root / "annotations_detectron2" / split, ".png", (), "trainid171"),
        ("mmseg", ann, TRAINID_SUFFIX, (), "trainid171"),
        ("raw", ann, ".png", (TRAINID_SUFFIX,), "raw182"),
        ("raw", stm, ".png", (TRAINID_SUFFIX,), "raw182"),
    ]


def detect_layout(
    root: Path, split: str, label_format: str | None
) -> tuple[str, Path, str, tuple, str]:
    """(layout, label dir, label suffix, excluded suffixes, label format) of a COCO-Stuff folder."""
    if label_format is not None and label_format not in LABEL_FORMATS:
        raise ValueError(
            f"label_format must be one of {LABEL_FORMATS} or None, got {label_format!r}"
        )
    cands = coco_stuff_layouts(root, split)
    found = [c for c in cands if has_file(c[1], c[2], c[3])]
    if not found:
        looked = ", ".join(f"{c[1]}/*{c[2]}" for c in cands)
        raise FileNotFoundError(
            f"no COCO-Stuff label maps for split {split!r}; looked for {looked}. Unzip "
            f"stuffthingmaps_trainval2017.zip into {root / 'annotations'} (the raw layout; "
            "COCO-Stuff's README), or run your toolkit's conversion (zsseg.baseline, CAT-Seg, "
            "mmseg: the layouts in larvess/data/coco_stuff.py)"
        )
    if label_format is None:
        chosen, fmt = found[0], found[0][4]
    else:
        same = [c for c in found if c[4] == label_format]
        chosen, fmt = (same or found)[0], label_format
        if not same:
            log.warning(
                "COCO-Stuff %s: no %s layout; reading %s/*%s (a %s folder) as %s as requested",
                root, label_format, chosen[1], chosen[2], chosen[4], label_format,
            )  # fmt: skip
    others = [f"{c[0]} ({c[1]}/*{c[2]})" for c in found if c is not chosen]
    key = (str(root), split, chosen[0], str(chosen[1]), fmt)
    if key not in _ANNOUNCED:
        _ANNOUNCED.add(key)
        msg = f"COCO-Stuff {root} {split}: layout {chosen[0]}, labels {chosen[1]}/*{chosen[2]}"
        msg += f" read as {fmt}"
        if others:
            msg += "; also present, not used: " + ", ".join(others)
        announce(msg, log)
    return chosen[0], chosen[1], chosen[2], chosen[3], fmt


def image_dir(root: Path, split: str) -> Path:
    """root/images/<split> (COCO-Stuff, mmseg, CAT-Seg), else root/<split> (detectron2's coco/,
    as zsseg.baseline uses it)."""
    d = root / "images" / split
    return d if d.is_dir() or not (root / split).is_dir() else root / split


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


class CocoStuff(RowsMixin, torch.utils.data.Dataset):
    """COCO-Stuff-164k with pixel masks; ``get(i, rng)`` gives an augmented sample.

    Attributes: ``layout`` ("zsseg", "catseg", "mmseg", "raw" or "json"), ``label_format``
    ("raw182" / "trainid171"; None for json), ``label_dir``, ``class_names``, ``wnids`` (None),
    ``rows`` (see ``set_rows``), ``items`` [(key, image, label)], ``n_skipped``.
    """

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
        label_format: str | None = None,
    ) -> None:
        self.root = Path(root)
        self.split = split = split or "train2017"
        self.transform = transform if transform is not None else TrainAugment(crop_size=512)
        self.from_json = from_json
        if not self.root.is_dir():
            raise FileNotFoundError(f"COCO-Stuff root not found: {self.root}")
        if not from_json:
            names_path = coco_stuff_labels_file(self.root, labels_file)
            self.layout, self.label_dir, suffix, exclude, self.label_format = detect_layout(
                self.root, split, label_format
            )
            self._set_classes(read_coco_stuff_labels(names_path), str(names_path))
            self.items, self.n_skipped = pair_files(
                image_dir(self.root, split), ".jpg", self.label_dir, suffix, skip_missing, exclude
            )
        else:
            if label_format is not None:
                raise ValueError("label_format applies to the PNG layouts, not to from_json")
            self.layout, self.label_format, self.label_dir = "json", None, None
            ann = self.root / "annotations"
            self._stuff_json = Path(stuff_json or ann / f"stuff_{split}.json")
            self._inst_json = Path(instances_json or ann / f"instances_{split}.json")
            local = self.root / "labels.txt"
            names_path = coco_stuff_labels_file(self.root, labels_file) if labels_file else None
            self._load_json(names_path or (local if local.is_file() else None), skip_missing)
        self.set_rows(rows)

    @staticmethod
    def read_class_names(
        root: str | Path, labels_file: str | Path | None = None
    ) -> list[list[str]]:
        """Class names in local order (labels_file, root/labels.txt or the package's copy)."""
        path = coco_stuff_labels_file(root, labels_file)
        return [[n] for n in coco_stuff_classes(read_coco_stuff_labels(path))[1]]

    def _set_classes(self, pairs: list[tuple[int, str]], origin: str) -> None:
        self.ids, names = coco_stuff_classes(pairs)
        self.class_names = [[n] for n in names]
        self.max_id = max(i for i, _ in pairs)
        self._origin = origin
        self._names_by_id = dict(pairs)
        self._unused = {i for i, _ in pairs} - set(self.ids) - {0}  # the 11 of the real file
        self._id_to_local = {cid: k for k, cid in enumerate(self.ids)}
        # value -> local id (-1 = ignore) and which values are allowed at all
        self._lut = np.full(256, -1, np.int64)
        self._valid = np.zeros(256, bool)
        self._valid[255] = True
        if self.label_format == "trainid171":
            n = len(self.ids)
            if n > 255:
                raise ValueError(f"{origin}: {n} classes do not fit trainId PNGs (255 = ignore)")
            self._lut[:n] = np.arange(n)
            self._valid[:n] = True
        else:  # raw182 (and the JSON path, which only uses _id_to_local)
            for cid, k in self._id_to_local.items():
                if 1 <= cid <= 255:
                    self._lut[cid - 1] = k
                    self._valid[cid - 1] = True

    def _bad_value(self, path: Path, values: np.ndarray) -> ValueError:
        v = int(values[0])
        more = f" (and {len(values) - 1} other invalid value(s))" if len(values) > 1 else ""
        where = f"{self.layout} layout ({self.label_dir})"
        if self.label_format == "trainid171":
            return ValueError(
                f"{path}: label value {v} is not a trainid171 value (0..{len(self.ids) - 1}, "
                f"255 ignore){more}; {where} read as trainid171. If these PNGs hold raw "
                "COCO-Stuff values (labels.txt id - 1), pass label_format='raw182'"
            )
        if v + 1 in self._unused:
            return ValueError(
                f"{path}: label value {v} is COCO-Stuff id {v + 1} "
                f"({self._names_by_id[v + 1]!r}), one of the 11 ids never used in the data"
                f"{more}; {where} read as raw182 (value = labels.txt id - 1). If these PNGs "
                "hold 0..170 trainIds, pass label_format='trainid171'"
            )
        return ValueError(
            f"{path}: label value {v} is not a class of {self._origin} "
            f"(raw182: PNG values 0..{self.max_id - 1} = labels.txt id - 1, 255 unlabeled){more}; "
            f"{where}"
        )

    def _load_json(self, labels_file: Path | None, skip_missing: bool) -> None:
        data = {}
        for p in (self._stuff_json, self._inst_json):
            if not p.is_file():
                raise FileNotFoundError(f"COCO JSON not found: {p}")
            data[p] = json.loads(p.read_text(encoding="utf-8"))
        stuff, inst = data[self._stuff_json], data[self._inst_json]
        if labels_file is not None:
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
        img_dir = image_dir(self.root, self.split)
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

    def read_png_label(self, path: Path) -> np.ndarray:
        """Label PNG -> int64 [H, W] local ids (-1 ignore); invalid values raise naming the file."""
        raw = read_label(path)
        if raw.dtype == np.uint8:
            values = np.flatnonzero(np.bincount(raw.ravel(), minlength=256))
        else:
            values = np.unique(raw)
        bad = values[(values < 0) | (values > 255) | ~self._valid[np.clip(values, 0, 255)]]
        if bad.size:
            raise self._bad_value(path, bad)
        return self._lut[raw]

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray, str]:
        """Unaugmented (image uint8 [H, W, 3], label int64 [H, W] local ids, key)."""
        key, img_path, lab = self.items[index]
        image = read_rgb(img_path)
        if not self.from_json:
            label = self.read_png_label(lab)
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
        return {"image": x, "label": to_rows(y, self.require_rows()), "key": key}

    def __getitem__(self, index: int) -> dict:
        return self.get(index, np.random.default_rng())
