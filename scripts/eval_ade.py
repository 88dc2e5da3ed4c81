"""Evaluate a trained segmenter on ADE20K-150 or ADE20K-full-847: all / base / novel mIoU.

    python scripts/eval_ade.py --checkpoint runs/c171_wa150 --dataset ade150 --root data/ade
    python scripts/eval_ade.py --checkpoint runs/x --dataset ade847 --root data/ade847 \
        --names data/ade847/ade847_categories.tsv --save-vis 8

Predictions are restricted to the evaluated classes (their rows of the class table); base =
evaluated classes that had pixel masks in training. Sliding windows as LarvSeg (512 / 512, short
side 512). Writes OUT/results.json, OUT/per_class.csv and OUT/vis/*.png; prints a summary line.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from larvess.checkpoint import load_model
from larvess.data.ade import AdeEval
from larvess.inference import slide_inference
from larvess.metrics import SegMetrics, format_summary, write_per_class_csv, write_results_json
from larvess.viz import composite, save_png


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="run folder, checkpoint folder or model.pt")
    ap.add_argument("--dataset", required=True, choices=["ade150", "ade847"])
    ap.add_argument("--root", required=True, help="dataset folder")
    ap.add_argument("--names", default=None, help="class names file (required for ade847)")
    ap.add_argument("--split", default="validation")
    ap.add_argument("--save-vis", type=int, default=0, metavar="N", help="overlays for N images")
    ap.add_argument("--out", default=None, help="output folder (default: beside the model)")
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--stride", type=int, default=512)
    ap.add_argument("--short-side", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=8, help="windows per forward")
    ap.add_argument("--limit", type=int, default=0, help="evaluate the first N images only")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)

    loaded = load_model(args.checkpoint)
    device = torch.device(args.device)
    segmenter = loaded.segmenter.to(device)
    data = AdeEval(args.root, args.dataset, split=args.split, names_file=args.names)
    rows = loaded.vocab.match(data.class_names)
    missing = [data.class_names[i][0] for i in torch.nonzero(rows < 0).flatten().tolist()]
    if missing:
        raise SystemExit(
            f"{loaded.path}: {len(missing)} of {len(rows)} {args.dataset} classes are not in the "
            f"model's vocabulary (e.g. {missing[:8]}); train with their names file in "
            "vocab.extra_names so they get rows"
        )
    is_base = loaded.vocab.is_base(rows).numpy()
    with torch.no_grad():
        mu = loaded.table().to(device)[rows.to(device)]

    out = Path(args.out) if args.out else loaded.path.parent / f"eval_{args.dataset}"
    out.mkdir(parents=True, exist_ok=True)
    metrics = SegMetrics(len(rows), ignore_index=-1)
    n = len(data) if args.limit <= 0 else min(args.limit, len(data))
    for i in tqdm(range(n), desc=f"eval {args.dataset}", unit="img"):
        sample = data[i]
        pred = slide_inference(
            segmenter,
            mu,
            sample["image"],
            window=args.window,
            stride=args.stride,
            short_side=args.short_side,
            batch_size=args.batch_size,
            device=device,
            amp=device.type == "cuda",
        ).cpu()
        metrics.update(pred, sample["label"])
        if i < args.save_vis:
            panel = composite(sample["image"], pred, sample["label"], data.class_names)
            save_png(panel, out / "vis" / f"{sample['key']}.png")

    results = metrics.compute(base=is_base, novel=~is_base)
    write_results_json(out / "results.json", results, data.class_names)
    write_per_class_csv(out / "per_class.csv", results, data.class_names)
    line = format_summary(results, prefix=f"{args.dataset} ({n} images, step {loaded.step}):")
    print(line)
    print(
        f"wrote {out / 'results.json'}, {out / 'per_class.csv'}"
        + (f", {min(n, args.save_vis)} overlays in {out / 'vis'}" if args.save_vis else "")
    )
    meta = {"checkpoint": str(loaded.path), "dataset": args.dataset, "images": n,
            "base_classes": int(is_base.sum()), "novel_classes": int((~is_base).sum())}  # fmt: skip
    (out / "eval_info.json").write_text(json.dumps(meta, indent=1))
    return results


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError) as err:
        sys.exit(f"error: {err}")
