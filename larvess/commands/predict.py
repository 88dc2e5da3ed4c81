"""Segment images with a trained model: a label-map PNG and a colour overlay with a legend.

    larvess-predict --checkpoint runs/c171_i21k photo.jpg more/*.png --out preds
    larvess-predict --checkpoint runs/x img.jpg --names objectInfo150.txt

(also `python scripts/predict.py ...`; in Python: larvess.Predictor, the same code path.)

Over the full trained vocabulary by default (k = 1 nearest-row search when it is large), or over a
named subset (--names FILE in any format larvess.names.read_names_file reads, or --classes a,b,c).
Any image PIL can open (grayscale, RGBA, palette, EXIF-rotated, large). OUT/<stem>_label.png holds
the class index (16-bit PNG when more than 256 classes; index into the list in OUT/classes.json),
OUT/<stem>_overlay.png the overlay with a legend. An unreadable file is reported by name and the
others are still processed; the exit status is 1 if any failed.

Roll-up (``--rollup``, larvess/rollup.py): with --classes / --names, each class scores as the best
trained row inside it (``--classes dog`` on a 21K model: every breed row votes for dog); auto =
on when some trained row lies inside an asked class other than its own. Over the whole
vocabulary ``--rollup on`` labels each pixel with the top-level row above its best row
(classes.json lists those rows); auto = off there. Untrained rows never take a pixel.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from larvess.names import read_names_file
from larvess.predictor import Predictor, open_rgb
from larvess.viz import legend, overlay, palette, present_classes, save_png


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="larvess-predict", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    ap.add_argument("images", nargs="+", type=Path)
    ap.add_argument("--checkpoint", required=True, help="run folder, checkpoint folder or model.pt")
    ap.add_argument("--out", type=Path, default=Path("predictions"))
    ap.add_argument("--names", default=None, help="restrict to the classes of this names file")
    ap.add_argument("--classes", default=None, help="restrict to these comma-separated names")
    ap.add_argument(
        "--rollup",
        choices=["auto", "on", "off"],
        default="auto",
        help="roll rows up into the classes that contain them (auto: on for --classes/--names "
        "when the tree nests some row inside one; over the whole vocabulary: top-level rows)",
    )
    ap.add_argument("--window", type=int, default=None, help="default: the run's recipe")
    ap.add_argument("--stride", type=int, default=None, help="default: the run's recipe")
    ap.add_argument("--short-side", type=int, default=None, help="default: the run's recipe")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return ap


def run(argv: list[str] | None = None) -> int:
    """Predict every image; returns the exit status (1 if an image could not be read). Raises
    on a bad model or class list."""
    args = parser().parse_args(argv)
    wanted = None
    if args.names:
        wanted = read_names_file(args.names)
    elif args.classes:
        wanted = [n.strip() for n in args.classes.split(",") if n.strip()]
    rollup = {"auto": None, "on": True, "off": False}[args.rollup]
    pred = Predictor.from_run(args.checkpoint, wanted, args.device, rollup=rollup)
    for note in pred.notes:
        print(f"note: {note}", file=sys.stderr)
    rows, names = pred.rows, pred.names
    colours = palette(len(rows))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "classes.json").write_text(json.dumps(names, indent=0))

    # inputs that share a file name (a/x.jpg, b/x.png) must not overwrite each other's outputs
    stems = [p.stem for p in args.images]
    outs = [s if stems.count(s) == 1 else f"{s}_{i}" for i, s in enumerate(stems)]
    failed = 0
    for path, stem in zip(args.images, outs):
        try:
            image = open_rgb(path)
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            failed += 1
            continue
        labels, _ = pred.predict(
            image, window=args.window, stride=args.stride, short_side=args.short_side
        )
        dtype = np.uint8 if len(rows) <= 256 else np.uint16
        Image.fromarray(labels.astype(dtype)).save(args.out / f"{stem}_label.png")
        shown = overlay(image, labels, colours)
        panel = legend(present_classes(labels), names, colours, width=shown.shape[1])
        save_png(np.concatenate([shown, panel], axis=0), args.out / f"{stem}_overlay.png")
        print(f"{path} -> {args.out / (stem + '_overlay.png')}")
    if failed:
        print(f"{failed} of {len(args.images)} images could not be read", file=sys.stderr)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    """Console entry point: run's status; a bad model or class list is one line and status 1."""
    try:
        return run(argv)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
