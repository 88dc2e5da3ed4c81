"""ADE20K_2021_17_01 (the full ADE20K download) -> the detectron2 ADE-847 layout the reader uses.

    python scripts/prepare_ade847.py --root DIR [--out DIR] [--splits training validation]
        [--images link|copy|symlink] [--max-short-side N] [--workers N] [--no-index]
        [--compression deflate|none]

Input layout, output layout, the class mapping and how it compares with MaskFormer's script:
larvess/data/ade847_prepare.py. Resumable; skipped images are listed in
OUT/prepare_ade847_skipped.txt and make the exit status 1 (2 for a setup error).
"""

from __future__ import annotations

import argparse
import os
import pickle
import sys
from pathlib import Path

from larvess.data.ade847_prepare import (  # noqa: F401  (read_847_table: for the tests)
    ADE_DIR,
    SKIPPED_FILE,
    SPLITS,
    TABLE,
    prepare,
    read_847_table,
)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", required=True, help=f"the {ADE_DIR} folder or the folder holding it")
    ap.add_argument("--out", help=f"output folder (default: the {ADE_DIR} folder)")
    ap.add_argument("--splits", nargs="+", choices=SPLITS, default=list(SPLITS))
    ap.add_argument(
        "--images",
        choices=("link", "copy", "symlink"),
        default="link",
        help="how images reach images_detectron2/ (link: hard link, copy where that fails)",
    )
    ap.add_argument(
        "--max-short-side",
        type=int,
        default=0,
        help="resize so the shorter side is at most N, as MaskFormer's script (512); 0 = keep",
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
    a = ap.parse_args(argv)
    try:
        info = prepare(
            a.root,
            a.out,
            tuple(a.splits),
            a.images,
            a.max_short_side,
            a.workers,
            not a.no_index,
            a.table,
            not a.no_progress,
            a.compression,
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
