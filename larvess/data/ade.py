"""ADE20K-150 and ADE20K-full-847: training reader (masks or weak labels) and evaluation reader.

ade150: root = ADEChallengeData2016 (or its parent) with images/<split>/*.jpg and label PNGs in
annotations/<split>/ as the zip ships them (0 = ignore, 1..N -> local 0..N-1), else in
annotations_detectron2/<split>/ as detectron2's and CAT-Seg's prepare_ade20k_sem_seg.py /
prepare_ade20k_150.py write them (uint8 value - 1: 0..N-1 local, 0 -> 255 = ignore); a split
with neither is an error naming what was found and the command that writes the second. Names from
root/objectInfo150.txt (it ships in ADEChallengeData2016.zip), else the package's
larvess/meta/objectInfo150.txt, unless ``names_file`` (any number of lines).
ade847: the detectron2 layout images_detectron2/<split>/*.jpg + annotations_detectron2/<split>/*.tif
(uint16, 0..N-1 trainId, 65535 ignore), found at root, root/ADE20K_2021_17_01 or one or two folder
levels below root; names from ``names_file``, else the package's larvess/meta/ade847_categories.tsv.
A root with only the ADE20K_2021_17_01 download (index_ade20k.pkl, images/ADE/) is an error that
names the command preparing it (scripts/prepare_ade847.py).
Any other label value is an error naming the file and the value.

AdeTrain masks -> {"image" [3, c, c], "label" [c, c] rows, "key"}; weak=True (WA150 / WA847) ->
{"image" [3, c, c], "labels" LongTensor [n] sorted unique rows of the classes present in the
augmented crop (possibly empty), "key"}. The weak default never pads (see transforms).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from larvess.data.io import (
    RowsMixin,
    has_file,
    meta_file,
    pair_files,
    read_label,
    read_rgb,
    to_rows,
)
from larvess.data.transforms import TrainAugment
from larvess.names import read_names_file

_IGNORE_847 = 65535
_IGNORE_D2 = 255  # ignore of detectron2's converted ADE-150 PNGs
ADE_FULL_DIR = "ADE20K_2021_17_01"
PREPARE_SCRIPT = "scripts/prepare_ade847.py"
# label file kinds: the zip's ADE-150 PNGs, detectron2's converted ones, the ADE-847 TIFFs
LABEL_KINDS = ("ade150", "ade150_detectron2", "ade847")


def _is_prepared_847(d: Path) -> bool:
    ann = d / "annotations_detectron2"
    if not (d / "images_detectron2").is_dir() or not ann.is_dir():
        return False
    return any(has_file(s, ".tif") for s in ann.iterdir() if s.is_dir())


def find_ade847_root(root: str | Path) -> Path:
    """Folder holding the prepared ADE-847 layout: root, root/ADE20K_2021_17_01, or the one
    folder one (else two) levels below root that has images_detectron2/ and TIFF labels in
    annotations_detectron2/<split>/. The bare download is an error naming the prepare command."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"ADE-847 root not found: {root}")
    for d in (root, root / ADE_FULL_DIR):
        if _is_prepared_847(d):
            return d
    for pattern in ("*/annotations_detectron2", "*/*/annotations_detectron2"):
        found = sorted({p.parent for p in root.glob(pattern) if _is_prepared_847(p.parent)})
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise FileNotFoundError(
                f"{root}: several prepared ADE-847 folders below it, pass one of them as the "
                f"root: {', '.join(map(str, found))}"
            )
    for d in (root, root / ADE_FULL_DIR):
        if (d / "index_ade20k.pkl").is_file() or (d / "images" / "ADE").is_dir():
            raise FileNotFoundError(
                f"{root}: found the {ADE_FULL_DIR} download at {d} but not the prepared ADE-847 "
                "layout (images_detectron2/, annotations_detectron2/<split>/*.tif). Prepare it "
                f"once with:  python {PREPARE_SCRIPT} --root {d} --out {d}"
            )
    raise FileNotFoundError(
        f"no ADE-847 layout (images_detectron2/ and annotations_detectron2/<split>/*.tif) in "
        f"{root} or up to two folder levels below it; prepare it from the {ADE_FULL_DIR} "
        f"download with:  python {PREPARE_SCRIPT} --root <download> --out <dir>"
    )


def find_ade150_root(root: str | Path) -> Path:
    """ADEChallengeData2016 folder: root itself or root/ADEChallengeData2016."""
    root = Path(root)
    if not (root / "images").is_dir() and (root / "ADEChallengeData2016").is_dir():
        return root / "ADEChallengeData2016"
    return root


def ade_class_names(
    root: str | Path | None, dataset: str, names_file: str | Path | None = None
) -> list[list[str]]:
    """Class names in local order: names_file, else (ade150) root's objectInfo150.txt, else the
    package's objectInfo150.txt / ade847_categories.tsv."""
    if names_file is not None:
        return read_names_file(names_file)
    if dataset == "ade847":
        return read_names_file(meta_file("ade847_categories.tsv"))
    if dataset != "ade150":
        raise ValueError(f"dataset must be 'ade150' or 'ade847', got {dataset!r}")
    local = find_ade150_root(root) / "objectInfo150.txt" if root is not None else None
    return read_names_file(local if local and local.is_file() else meta_file("objectInfo150.txt"))


def ade150_labels(d: Path, split: str) -> tuple[Path, str]:
    """(label folder, label kind) of an ADE-150 split: annotations/ (the zip's PNGs), else
    annotations_detectron2/ (detectron2's conversion); neither is an error saying what is there."""
    raw, d2 = d / "annotations" / split, d / "annotations_detectron2" / split
    if has_file(raw, ".png"):
        return raw, "ade150"
    if has_file(d2, ".png"):
        return d2, "ade150_detectron2"
    found = [str(p) for p in (d / "images" / split, raw, d2) if p.is_dir()]
    raise FileNotFoundError(
        f"ADE-150 {d}: no label PNGs for split {split!r} in {raw} (the zip's layout) or {d2} "
        f"(detectron2's conversion, v - 1 with 0 -> 255); folders present: {found or 'none'}. "
        "Unzip ADEChallengeData2016.zip there, or convert its annotations/ with detectron2's "
        "datasets/prepare_ade20k_sem_seg.py"
    )


def ade_layout(
    root: str | Path,
    dataset: str,
    split: str,
    names_file: str | Path | None = None,
    skip_missing: bool = False,
) -> tuple[list[list[str]], list[tuple[str, Path, Path]], int, str]:
    """(class names, [(key, image, label)], number skipped, label kind) of an ADE folder."""
    d = resolve_ade_root(root, dataset)
    names = ade_class_names(d, dataset, names_file)
    if dataset == "ade150":
        lab_dir, kind = ade150_labels(d, split)
        dirs = (d / "images" / split, lab_dir, ".png")
    else:
        dirs = (d / "images_detectron2" / split, d / "annotations_detectron2" / split, ".tif")
        kind = "ade847"
    pairs, skipped = pair_files(dirs[0], ".jpg", dirs[1], dirs[2], skip_missing)
    return names, pairs, skipped, kind


def resolve_ade_root(root: str | Path, dataset: str) -> Path:
    """The folder the data of ``dataset`` lives in (see find_ade150_root / find_ade847_root)."""
    if dataset == "ade150":
        return find_ade150_root(root)
    if dataset == "ade847":
        return find_ade847_root(root)
    raise ValueError(f"dataset must be 'ade150' or 'ade847', got {dataset!r}")


def read_ade_label(path: str | Path, kind: str, num_classes: int) -> np.ndarray:
    """ADE label file -> int64 [H, W] local ids, -1 ignore; bad values raise naming the file.

    kind (LABEL_KINDS): "ade150" PNG 0 ignore, v -> v - 1; "ade150_detectron2" PNG 255 ignore,
    v -> v; "ade847" TIFF 65535 ignore, v -> v."""
    raw = read_label(path).astype(np.int64)
    if kind == "ade150":
        label = raw - 1  # 0 (other) -> -1
        valid = f"0..{num_classes}"
    elif kind in ("ade150_detectron2", "ade847"):
        ignore = _IGNORE_D2 if kind == "ade150_detectron2" else _IGNORE_847
        label = np.where(raw == ignore, -1, raw)
        valid = f"0..{num_classes - 1} and {ignore}"
    else:
        raise ValueError(f"label kind must be one of {LABEL_KINDS}, got {kind!r}")
    bad = (label < -1) | (label >= num_classes)
    if bad.any():
        v = int(raw[bad].flat[0])
        raise ValueError(f"{path}: label value {v} out of range (valid: {valid}; {kind} labels)")
    return label


def load_ade_item(
    item: tuple[str, Path, Path], kind: str, num_classes: int
) -> tuple[np.ndarray, np.ndarray, str]:
    """(key, image path, label path) -> (uint8 [H, W, 3], int64 [H, W] local ids, key)."""
    key, img_path, lab_path = item
    image = read_rgb(img_path)
    label = read_ade_label(lab_path, kind, num_classes)
    if label.shape != image.shape[:2]:
        raise ValueError(
            f"{img_path}: image size {image.shape[:2]} does not match {lab_path} {label.shape}"
        )
    return image, label, key


class AdeTrain(RowsMixin, torch.utils.data.Dataset):
    """ADE training images with pixel masks, or crop label sets with ``weak=True`` (WA150/847).

    full=False: ADE20K-150 (dataset "ade150"); full=True: ADE20K-full-847 ("ade847").
    Reader protocol: ``class_names``, ``wnids`` (None), ``set_rows`` / ``rows`` (``get`` refuses
    to run before them); ``root`` is the folder the data was found in; ``label_kind`` the label
    files read (LABEL_KINDS).
    """

    def __init__(
        self,
        root: str | Path,
        full: bool = False,
        split: str | None = "training",
        weak: bool = False,
        names_file: str | Path | None = None,
        rows: torch.Tensor | None = None,
        transform: TrainAugment | None = None,
        skip_missing: bool = False,
    ) -> None:
        self.dataset = "ade847" if full else "ade150"
        self.weak = weak
        self.root = resolve_ade_root(root, self.dataset)
        self.class_names, self.items, self.n_skipped, self.label_kind = ade_layout(
            self.root, self.dataset, split or "training", names_file, skip_missing
        )
        self.set_rows(rows)
        self.transform = transform if transform is not None else TrainAugment(512, pad=not weak)

    @staticmethod
    def read_class_names(
        root: str | Path, full: bool = False, names_file: str | Path | None = None
    ) -> list[list[str]]:
        """Class names in local order (names_file, root's objectInfo150.txt for ade150, else the
        package's names table), without reading the data."""
        return ade_class_names(root, "ade847" if full else "ade150", names_file)

    def __len__(self) -> int:
        return len(self.items)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray, str]:
        """Unaugmented (image uint8 [H, W, 3], label int64 [H, W] local ids, key)."""
        return load_ade_item(self.items[index], self.label_kind, len(self.class_names))

    def get(self, index: int, rng: np.random.Generator) -> dict:
        image, label, key = self.load(index)
        x, y = self.transform(image, label, rng)
        y = to_rows(y, self.require_rows())
        if not self.weak:
            return {"image": x, "label": y, "key": key}
        return {"image": x, "labels": torch.unique(y[y >= 0]), "key": key}

    def __getitem__(self, index: int) -> dict:
        return self.get(index, np.random.default_rng())


class AdeEval(torch.utils.data.Dataset):
    """ADE validation at full resolution, no augmentation.

    item -> {"image": uint8 [H, W, 3], "label": int64 [H, W] local ids (-1 ignore), "key": str}.
    """

    wnids: list[str] | None = None

    def __init__(
        self,
        root: str | Path,
        dataset: str = "ade150",
        split: str = "validation",
        names_file: str | Path | None = None,
    ) -> None:
        self.dataset = dataset
        self.root = resolve_ade_root(root, dataset)
        self.class_names, self.items, _, self.label_kind = ade_layout(
            self.root, dataset, split, names_file
        )

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        image, label, key = load_ade_item(self.items[index], self.label_kind, len(self.class_names))
        return {"image": image, "label": label, "key": key}
