"""ADE20K_2021_17_01 (the full ADE20K download) -> the detectron2 ADE-847 layout the reader uses.

    larvess-prepare-ade847 --root DIR [--out DIR] [--splits training validation]
        [--images link|copy|symlink] [--max-short-side N] [--workers N] [--no-index]
        [--compression deflate|none]

(also `python scripts/prepare_ade847.py ...`, the same function.)

As MaskFormer's datasets/prepare_ade20k_full_sem_seg.py by default: the shorter side is resized
to 512 (image bilinear, label nearest as OpenCV's INTER_NEAREST); --max-short-side 0 keeps the
full resolution. Input layout, output layout, the class mapping and the comparison with
MaskFormer's script: larvess/data/ade847_prepare.py. Resumable; skipped images are listed in
OUT/prepare_ade847_skipped.txt and make the exit status 1 (2 for a setup error).
"""

from __future__ import annotations

import argparse
import os
import pickle
import sys
from pathlib import Path

from larvess.data.ade847_prepare import (
    ADE_DIR,
    MAX_SHORT_SIDE,
    SKIPPED_FILE,
    SPLITS,
    TABLE,
    prepare,
)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="larvess-prepare-ade847",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.split("\n")[6:]),
    )
    ap.add_argument("--root", required=True, help=f"the {ADE_DIR} folder or the folder holding it")
    ap.add_argument("--out", help=f"output folder (default: the {ADE_DIR} folder)")
    ap.add_argument("--splits", nargs="+", choices=SPLITS, default=list(SPLITS))
    ap.add_argument(
        "--images",
        choices=("link", "copy", "symlink"),
        default="link",
        help="how full-size images reach images_detectron2/ (link: hard link, copy where that "
        "fails); resized images are always written",
    )
    ap.add_argument(
        "--max-short-side",
        type=int,
        default=MAX_SHORT_SIDE,
        help=f"resize so the shorter side is at most N (default {MAX_SHORT_SIDE}, as MaskFormer); "
        "0 = keep the full resolution",
    )
    ap.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    ap.add_argument("--no-index", action="store_true", help="walk the image tree, no pickle")
    ap.add_argument("--table", default=str(TABLE), help="trainId/ade_full_id/name table")
    ap.add_argument(
        "--compression",
        choices=("deflate", "none"),
        default="deflate",
        help="TIFF compression (lossless; deflate is ~10-100x smaller for label maps)",
    )
    ap.add_argument("--no-progress", action="store_true")
    return ap


def main(argv: list[str] | None = None) -> int:
    """Parse argv (None: sys.argv[1:]) and prepare; 0 done, 1 some images skipped, 2 setup error."""
    a = parser().parse_args(argv)
    try:
        info = prepare(
            a.root,
            a.out,
            splits=tuple(a.splits),
            images=a.images,
            max_short_side=a.max_short_side,
            workers=a.workers,
            use_index=not a.no_index,
            table=a.table,
            progress=not a.no_progress,
            compression=a.compression,
        )
    except (OSError, ValueError, KeyError, pickle.UnpicklingError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    src = "index_ade20k.pkl" if info["index_used"] else "the image tree"
    print(
        f"ADE-847 from {info['dataset']} ({src}) -> {info['out']}: {info['written']} written, "
        f"{info['present']} already complete, {info['skipped']} skipped; per split "
        f"{info['per_split']}; images written by {info['images_by']} "
        f"({info['seconds']:.0f} s)"
    )
    if info["annotated_pixels"]:
        mapped = info["annotated_pixels"] - info["unmapped_pixels"]
        print(
            f"{100 * mapped / info['annotated_pixels']:.1f}% of the annotated pixels written "
            "fall in the 847 classes; the rest and the unlabeled pixels are 65535 (ignore)"
        )
    if info["not_in_index"]:
        print(f"{info['not_in_index']} .jpg files under images/ADE are not in the index (not used)")
    if info["stale_partials_removed"]:
        print(f"removed {info['stale_partials_removed']} temporary files of an interrupted run")
    if info["skipped"]:
        print(f"skipped {info['skipped']} images (all in {Path(info['out']) / SKIPPED_FILE}):")
        for ln in info["skipped_list"][:10]:
            print("  " + ln.replace("\t", "  "))
        return 1
    print(f"reader root: {info['out']}  (ade847; names: larvess/meta/ade847_categories.tsv)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
