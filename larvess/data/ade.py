"""ADE20K-150 and ADE20K-full-847: training reader (masks or weak labels) and evaluation reader.

ade150: root = ADEChallengeData2016 (or its parent) with images/<split>/*.jpg and
annotations/<split>/*.png; PNG 0 = ignore, 1..N -> local 0..N-1; names from
root/objectInfo150.txt unless ``names_file`` (any number of lines).
ade847: root with images_detectron2/<split>/*.jpg and annotations_detectron2/<split>/*.tif
(uint16, 0..N-1 trainId, 65535 ignore); ``names_file`` (ade847_categories.tsv format) required.
Any other label value is an error naming the file and the value.

AdeTrain masks -> {"image" [3, c, c], "label" [c, c] rows, "key"}; weak=True (WA150 / WA847) ->
{"image" [3, c, c], "labels" LongTensor [n] sorted unique rows of the classes present in the
augmented crop (possibly empty), "key"}. The weak default never pads (see transforms).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from larvess.data.coco_stuff import pair_files, read_label, read_rgb, to_rows
from larvess.data.transforms import TrainAugment
from larvess.vocab import read_names_file

_IGNORE_847 = 65535


def ade_layout(
    root: str | Path,
    dataset: str,
    split: str,
    names_file: str | Path | None = None,
    skip_missing: bool = False,
) -> tuple[list[list[str]], list[tuple[str, Path, Path]], int]:
    """(class names, [(key, image, label)], number skipped) of an ADE folder."""
    root = Path(root)
    if dataset == "ade150":
        if not (root / "images").is_dir() and (root / "ADEChallengeData2016").is_dir():
            root = root / "ADEChallengeData2016"
        names = read_names_file(names_file or root / "objectInfo150.txt")
        pairs, skipped = pair_files(
            root / "images" / split, ".jpg", root / "annotations" / split, ".png", skip_missing
        )
    elif dataset == "ade847":
        if names_file is None:
            raise ValueError("ade847 needs names_file (ade847_categories.tsv format)")
        names = read_names_file(names_file)
        pairs, skipped = pair_files(
            root / "images_detectron2" / split,
            ".jpg",
            root / "annotations_detectron2" / split,
            ".tif",
            skip_missing,
        )
    else:
        raise ValueError(f"dataset must be 'ade150' or 'ade847', got {dataset!r}")
    return names, pairs, skipped


def read_ade_label(path: str | Path, dataset: str, num_classes: int) -> np.ndarray:
    """ADE label file -> int64 [H, W] local ids, -1 ignore; bad values raise naming the file."""
    raw = read_label(path).astype(np.int64)
    if dataset == "ade150":
        label = raw - 1  # 0 (other) -> -1
        bad = (label < -1) | (label >= num_classes)
        valid = f"0..{num_classes}"
    else:
        label = np.where(raw == _IGNORE_847, -1, raw)
        bad = (label < -1) | (label >= num_classes)
        valid = f"0..{num_classes - 1} and {_IGNORE_847}"
    if bad.any():
        v = int(raw[bad].flat[0])
        raise ValueError(f"{path}: label value {v} out of range (valid: {valid})")
    return label


def load_ade_item(
    item: tuple[str, Path, Path], dataset: str, num_classes: int
) -> tuple[np.ndarray, np.ndarray, str]:
    """(key, image path, label path) -> (uint8 [H, W, 3], int64 [H, W] local ids, key)."""
    key, img_path, lab_path = item
    image = read_rgb(img_path)
    label = read_ade_label(lab_path, dataset, num_classes)
    if label.shape != image.shape[:2]:
        raise ValueError(
            f"{img_path}: image size {image.shape[:2]} does not match {lab_path} {label.shape}"
        )
    return image, label, key


class AdeTrain(torch.utils.data.Dataset):
    """ADE training images with pixel masks, or crop label sets with ``weak=True`` (WA150/847).

    full=False: ADE20K-150 (dataset "ade150"); full=True: ADE20K-full-847 ("ade847").
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
        self.class_names, self.items, self.n_skipped = ade_layout(
            root, self.dataset, split or "training", names_file, skip_missing
        )
        self.rows = None if rows is None else torch.as_tensor(rows, dtype=torch.long)
        if self.rows is not None and len(self.rows) != len(self.class_names):
            raise ValueError(
                f"rows has {len(self.rows)} entries for {len(self.class_names)} classes"
            )
        self.transform = transform if transform is not None else TrainAugment(512, pad=not weak)

    @staticmethod
    def read_class_names(
        root: str | Path, full: bool = False, names_file: str | Path | None = None
    ) -> list[list[str]]:
        """Class names in local order (objectInfo150.txt of root, or names_file), no data read."""
        if full:
            if names_file is None:
                raise ValueError("ade847 needs names_file (ade847_categories.tsv format)")
            return read_names_file(names_file)
        root = Path(root)
        if not (root / "objectInfo150.txt").is_file() and (root / "ADEChallengeData2016").is_dir():
            root = root / "ADEChallengeData2016"
        return read_names_file(names_file or root / "objectInfo150.txt")

    def __len__(self) -> int:
        return len(self.items)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray, str]:
        """Unaugmented (image uint8 [H, W, 3], label int64 [H, W] local ids, key)."""
        return load_ade_item(self.items[index], self.dataset, len(self.class_names))

    def get(self, index: int, rng: np.random.Generator) -> dict:
        image, label, key = self.load(index)
        x, y = self.transform(image, label, rng)
        y = to_rows(y, self.rows)
        if not self.weak:
            return {"image": x, "label": y, "key": key}
        return {"image": x, "labels": torch.unique(y[y >= 0]), "key": key}

    def __getitem__(self, index: int) -> dict:
        return self.get(index, np.random.default_rng())


class AdeEval(torch.utils.data.Dataset):
    """ADE validation at full resolution, no augmentation.

    item -> {"image": uint8 [H, W, 3], "label": int64 [H, W] local ids (-1 ignore), "key": str}.
    """

    def __init__(
        self,
        root: str | Path,
        dataset: str = "ade150",
        split: str = "validation",
        names_file: str | Path | None = None,
    ) -> None:
        self.dataset = dataset
        self.class_names, self.items, _ = ade_layout(root, dataset, split, names_file)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        image, label, key = load_ade_item(self.items[index], self.dataset, len(self.class_names))
        return {"image": image, "label": label, "key": key}
