"""File helpers every dataset reader shares: images, label maps, image/label pairing, row mapping,
the package's metadata files, and the reader protocol (class_names, wnids, set_rows)."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from larvess.meta import META  # the names tables shipped with us

log = logging.getLogger(__name__)


def meta_file(name: str) -> Path:
    """Path of a metadata file shipped in larvess/meta (e.g. "cocostuff_labels.txt")."""
    path = META / name
    if not path.is_file():
        raise FileNotFoundError(f"package metadata file missing: {path} (broken install?)")
    return path


def announce(message: str, logger: logging.Logger = log) -> None:
    """Tell the user something: through logging when it is set up to show INFO, else on stderr."""
    if logger.isEnabledFor(logging.INFO) and logger.hasHandlers():
        logger.info(message)
    else:
        print(message, file=sys.stderr, flush=True)


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


def list_files(folder: Path, suffix: str, exclude: tuple[str, ...] = ()) -> dict[str, Path]:
    """{key: path} of the files in ``folder`` named <key><suffix>, except names ending with one
    of ``exclude``; hidden files (temporary ones of an interrupted writer) are not listed."""
    out = {}
    with os.scandir(folder) as it:
        for e in it:
            n = e.name
            if (
                n.endswith(suffix)
                and len(n) > len(suffix)
                and not n.startswith(".")
                and not (exclude and n.endswith(exclude))
                and e.is_file()
            ):
                out[n[: -len(suffix)]] = Path(e.path)
    return out


def has_file(folder: Path, suffix: str, exclude: tuple[str, ...] = ()) -> bool:
    """Whether ``folder`` is a directory holding a file named *<suffix> (stops at the first)."""
    if not folder.is_dir():
        return False
    with os.scandir(folder) as it:
        for e in it:
            n = e.name
            if (
                n.endswith(suffix)
                and not n.startswith(".")
                and not (exclude and n.endswith(exclude))
            ):
                return True
    return False


def pair_files(
    img_dir: Path,
    img_ext: str,
    lab_dir: Path,
    lab_ext: str,
    skip_missing: bool,
    lab_exclude: tuple[str, ...] = (),
) -> tuple[list[tuple[str, Path, Path]], int]:
    """Match images <key><img_ext> and labels <key><lab_ext> -> ([(key, image, label)], skipped).

    ``lab_ext`` may be a longer suffix ("_labelTrainIds.png"); label files ending with one of
    ``lab_exclude`` are not labels of this layout. Unmatched files are an error naming them
    unless skip_missing (then skipped, counted and logged).
    """
    for d in (img_dir, lab_dir):
        if not d.is_dir():
            raise FileNotFoundError(f"folder not found: {d}")
    imgs = list_files(img_dir, img_ext)
    labs = list_files(lab_dir, lab_ext, lab_exclude)
    no_lab = sorted(set(imgs) - set(labs))
    no_img = sorted(set(labs) - set(imgs))
    if (no_lab or no_img) and not skip_missing:
        parts = [f"{len(no_lab)} image(s) without a label file (*{lab_ext}) in {lab_dir}: "]
        parts[0] += ", ".join(str(imgs[k].name) for k in no_lab[:5])
        parts.append(f"{len(no_img)} label file(s) without an image in {img_dir}: ")
        parts[1] += ", ".join(str(labs[k].name) for k in no_img[:5])
        raise FileNotFoundError("; ".join(parts))
    skipped = len(no_lab) + len(no_img)
    if skipped:
        log.warning(
            "skipped %d unmatched image/label files (%d images without a label in %s, "
            "%d labels without an image in %s)",
            skipped,
            len(no_lab),
            lab_dir,
            len(no_img),
            img_dir,
        )
    pairs = [(k, imgs[k], labs[k]) for k in sorted(set(imgs) & set(labs))]
    if not pairs:
        raise FileNotFoundError(f"no {img_ext} images with {lab_ext} labels in {img_dir}")
    return pairs, skipped


def to_rows(label: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """Local ids (-1 ignore) -> vocabulary rows (-1 ignore); rows None = identity."""
    if rows is None:
        return label
    return torch.where(label >= 0, rows[label.clamp(min=0)], label.new_full((), -1))


class RowsMixin:
    """The reader protocol the builder relies on.

    ``class_names``: list[list[str]] (local id -> names, display name first); ``wnids``: None
    (a WordNet id per class where the source has them); ``set_rows(rows)``: local id ->
    vocabulary row, used to emit labels; ``rows`` reads it back (None = not set yet). A reader
    refuses to emit training samples before its rows are set (``require_rows``): local ids
    passed off as vocabulary rows would train the wrong classes silently. Subclasses set
    ``root`` and ``class_names``.
    """

    wnids: list[str] | None = None
    root: Path
    class_names: list[list[str]]
    _rows: torch.Tensor | None = None

    def set_rows(self, rows: torch.Tensor | None) -> None:
        """Store the local id -> vocabulary row mapping (a LongTensor, one entry per class)."""
        if rows is None:
            self._rows = None
            return
        rows = torch.as_tensor(rows, dtype=torch.long)
        if rows.ndim != 1 or len(rows) != len(self.class_names):
            raise ValueError(
                f"{type(self).__name__} {self.root}: rows has shape {tuple(rows.shape)}, "
                f"expected one row per class ({len(self.class_names)})"
            )
        self._rows = rows

    def require_rows(self) -> torch.Tensor:
        """The row mapping; a RuntimeError naming the reader when set_rows was never called."""
        if self._rows is None:
            raise RuntimeError(
                f"{type(self).__name__} {self.root}: set_rows(rows) was not called, so its labels "
                "would be local class ids, not vocabulary rows; call set_rows(rows) first "
                f"(torch.arange({len(self.class_names)}) for the local ids themselves)"
            )
        return self._rows

    @property
    def rows(self) -> torch.Tensor | None:
        return self._rows

    @rows.setter
    def rows(self, value: torch.Tensor | None) -> None:
        self.set_rows(value)
