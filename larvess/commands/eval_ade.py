"""Evaluate a trained segmenter on ADE20K-150 or ADE20K-full-847: all / base / novel mIoU.

    larvess-eval --checkpoint runs/c171_wa150 --dataset ade150 --root data/ade
    larvess-eval --checkpoint runs/x --dataset ade847 --root data/ade847 \
        --names data/ade847/ade847_categories.tsv --save-vis 8

(also `python scripts/eval_ade.py ...`, the same function.)

Predictions are restricted to the evaluated classes (their rows of the class table). Base / novel:
by default base = evaluated classes that had pixel masks in training; ``--novel FILE`` takes the
novel classes from a list of names instead (``--novel larvseg``: LarvSeg's own A150 split, 63 base
/ 87 novel w.r.t. COCO-Stuff-171, shipped in larvess/meta/). Sliding windows, stride and short side
from the run's recipe.yaml (eval section; LarvSeg: 512 / 512 / 512), flags override. Writes
OUT/results.json, OUT/per_class.csv and OUT/vis/*.png; prints a summary line per protocol.

Two protocols from one segmenter pass (larvess/rollup.py): **plain** (LarvSeg: the argmax over the
evaluated classes' own rows) and **roll-up** (each class scores as the best trained row whose
meaning lies inside its own: a 21K model's breed rows vote for ADE's dog, never for a residual
class when the dataset has the specific one). ``--rollup auto`` reports roll-up when the run's
vocabulary has a trained row inside an evaluated class other than its own; ``on`` always;
``off`` the plain protocol only. The hierarchy: the run's ``vocab.hierarchy_file``, else the
shipped WordNet table (wnids it lacks stand alone). Classes no training source reaches (no
masks, no image label, no merge with a trained row, no trained row inside them) are listed,
never predicted, and left out of every figure of both protocols (their pixels count as ignored).
results.json: ``summary`` / ``per_class`` (plain), ``rollup`` {summary, per_class}, ``unreached``;
per_class.csv: the plain columns, then ``rollup_IoU`` / ``rollup_Acc`` / ``rollup_pred_pixels``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from larvess.data.ade import AdeEval
from larvess.meta import NOVEL_LARVSEG
from larvess.metrics import (
    SegMetrics,
    format_summary,
    per_class_rows,
    summary_dict,
    write_per_class_csv,
    write_results_json,
)
from larvess.predictor import Predictor
from larvess.viz import composite, results_grid, save_png
from larvess.vocab import normalize_name


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="larvess-eval", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    ap.add_argument("--checkpoint", required=True, help="run folder, checkpoint folder or model.pt")
    ap.add_argument("--dataset", required=True, choices=["ade150", "ade847"])
    ap.add_argument("--root", required=True, help="dataset folder")
    ap.add_argument("--names", default=None, help="class names file (required for ade847)")
    ap.add_argument("--split", default="validation")
    ap.add_argument("--save-vis", type=int, default=0, metavar="N", help="overlays for N images")
    ap.add_argument(
        "--grid",
        type=int,
        default=0,
        metavar="N",
        help="OUT/grid.png: the first N images showing a novel class (image | truth | prediction)",
    )
    ap.add_argument("--out", default=None, help="output folder (default: beside the model)")
    ap.add_argument(
        "--novel",
        default=None,
        metavar="FILE",
        help="novel class names, one per line ('larvseg': LarvSeg's A150 split)",
    )
    ap.add_argument(
        "--rollup",
        choices=["auto", "on", "off"],
        default="auto",
        help="also score with hierarchy roll-up (auto: when some trained row lies inside an "
        "evaluated class other than its own)",
    )
    ap.add_argument("--window", type=int, default=None, help="default: the run's recipe")
    ap.add_argument("--stride", type=int, default=None, help="default: the run's recipe")
    ap.add_argument("--short-side", type=int, default=None, help="default: the run's recipe")
    ap.add_argument("--batch-size", type=int, default=None, help="windows per forward")
    ap.add_argument("--limit", type=int, default=0, help="evaluate the first N images only")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return ap


def run(argv: list[str] | None = None) -> dict:
    """Evaluate; returns SegMetrics.compute's results of the plain protocol, with ``rollup``
    (the roll-up protocol's, when on) and ``unreached`` (class names). Raises on a bad input."""
    args = parser().parse_args(argv)
    data = AdeEval(args.root, args.dataset, split=args.split, names_file=args.names)
    rollup = {"auto": None, "on": True, "off": False}[args.rollup]
    pred = Predictor.from_run(args.checkpoint, data.class_names, args.device, rollup=rollup)
    for note in pred.notes:
        print(f"note: {note}")
    protocols = list(pred.votes)  # "plain", then "rollup" when on
    unreached = pred.unreached.numpy()
    ev = pred.eval
    window, stride = args.window or ev.window, args.stride or ev.stride
    short_side, batch_size = args.short_side or ev.short_side, args.batch_size or ev.batch_size
    if args.novel:
        is_base = ~novel_mask(args.novel, data.class_names)
    else:
        is_base = pred.is_base.numpy()

    out = Path(args.out) if args.out else pred.path.parent / f"eval_{args.dataset}"
    out.mkdir(parents=True, exist_ok=True)
    metrics = {p: SegMetrics(len(pred.rows), ignore_index=-1) for p in protocols}
    shown = []  # (image, truth, prediction) for the grid
    n = len(data) if args.limit <= 0 else min(args.limit, len(data))
    for i in tqdm(range(n), desc=f"eval {args.dataset}", unit="img"):
        sample = data[i]
        got = pred.predict_protocols(
            sample["image"], window=window, stride=stride, short_side=short_side,
            batch_size=batch_size,
        )  # fmt: skip
        for p in protocols:
            metrics[p].update(got[p], sample["label"])
        labels = got[pred.protocol]  # the overlays and the grid show roll-up when it is on
        if i < args.save_vis:
            panel = composite(sample["image"], labels, sample["label"], data.class_names)
            save_png(panel, out / "vis" / f"{sample['key']}.png")
        truth = sample["label"]
        if len(shown) < args.grid and (~is_base[np.unique(truth[truth >= 0])]).any():
            shown.append((sample["image"], truth, labels))

    computed = {
        p: metrics[p].compute(base=is_base, novel=~is_base, exclude=unreached) for p in protocols
    }
    results = computed["plain"]
    if shown:
        save_png(results_grid(shown, data.class_names, is_base), out / "grid.png")
    names = [syn[0] for syn in data.class_names]
    extra = {"unreached": [names[i] for i in np.flatnonzero(unreached)]}
    if "rollup" in computed:
        r = computed["rollup"]
        extra["rollup"] = {
            "summary": summary_dict(r), "per_class": per_class_rows(r, data.class_names)
        }  # fmt: skip
    write_results_json(out / "results.json", results, data.class_names, extra)
    write_per_class_csv(
        out / "per_class.csv", results, data.class_names, computed.get("rollup"), "rollup_"
    )
    head = f"{args.dataset} ({n} images, step {pred.step})"
    for p in protocols:
        print(format_summary(computed[p], prefix=f"{head} {p}:"))
    if extra["unreached"]:
        print(
            f"left out of every figure: {len(extra['unreached'])} classes no training source "
            f"reaches: {', '.join(extra['unreached'])}"
        )
    print(
        f"wrote {out / 'results.json'}, {out / 'per_class.csv'}"
        + (f", {min(n, args.save_vis)} overlays in {out / 'vis'}" if args.save_vis else "")
        + (f", {out / 'grid.png'} ({len(shown)} images)" if shown else "")
    )
    meta = {"checkpoint": str(pred.path), "dataset": args.dataset, "images": n,
            "base_classes": int(is_base.sum()), "novel_classes": int((~is_base).sum()),
            "split": args.novel or "vocabulary (classes with masks in training)",
            "window": window, "stride": stride, "short_side": short_side,
            "protocols": protocols, "rollup": args.rollup, "unreached": extra["unreached"],
            "notes": pred.notes}  # fmt: skip
    (out / "eval_info.json").write_text(json.dumps(meta, indent=1))
    if "rollup" in computed:
        results = results | {"rollup": computed["rollup"]}
    return results | {"unreached": extra["unreached"]}


def novel_mask(novel: str, class_names: list[list[str]]) -> np.ndarray:
    """bool [K]: evaluated classes named in the novel list (matched on normalised names)."""
    path = NOVEL_LARVSEG if novel == "larvseg" else Path(novel)
    if not path.is_file():
        raise FileNotFoundError(f"novel class list not found: {path}")
    index = {}
    for i, syn in enumerate(class_names):
        for s in syn:
            index.setdefault(normalize_name(s), i)
    mask = np.zeros(len(class_names), dtype=bool)
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        name = line.split("#", 1)[0].strip()
        if not name:
            continue
        i = index.get(normalize_name(name))
        if i is None:
            raise ValueError(f"{path}:{n}: {name!r} is not a class of the evaluated dataset")
        mask[i] = True
    return mask


def main(argv: list[str] | None = None) -> int:
    """Console entry point: 0 on success; a missing or bad input is one line and status 1."""
    try:
        run(argv)
    except (FileNotFoundError, ValueError) as err:  # RecipeError is a ValueError
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
