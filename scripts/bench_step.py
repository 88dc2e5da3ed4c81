"""Benchmark one full training step against the number of classes C.

One step = forward of every source's batch, all losses (kNN-sampled CE on a mask source,
image-level CE + CA on an image-label source, margin), backward, SGD step, exactly as
larvess.engine composes them. The mask source has 171 classes (COCO-Stuff); the image source
holds the rest of the vocabulary (C - 171 rows: ImageNet-like), negatives from each source's
own rows. Side by side for C = 171 (+ a 171-class image source), 21,841 and 100,000; time per step
(median of the timed steps after warm-up), peak memory (CUDA: max_memory_allocated; CPU: the
rise of ru_maxrss in a fresh subprocess per row) and the host's waits on the device per step
(larvess.syncs: calls such as .item() or mask indexing made by project code; on a GPU each one
stops the host from running ahead).

    python scripts/bench_step.py                      # CPU proxy: ViT-tiny at 128 px
    python scripts/bench_step.py --real               # ViT-B/16 at the real crops (512 / 320)
    python scripts/bench_step.py --classes 171 21841 --steps 5 --out bench_out

Prints a table and writes OUT/bench_step.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from larvess.build import param_groups
from larvess.ca_classifier import CAClassifier
from larvess.config import LossConfig, OptimConfig, SourceConfig
from larvess.losses import nearest_rows
from larvess.model import ClassTable, Segmenter
from larvess.objective import compute_losses, make_sources
from larvess.syncs import count_syncs

MASK_CLASSES = 171


def one_row(args: argparse.Namespace, num_classes: int) -> dict:
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    if args.real:
        backbone, kw, mask_crop, img_crop = "vit_base_patch16_224", {}, 512, 320
    else:
        backbone, kw = "vit_tiny_patch16_224", dict(depth=6, embed_dim=192, num_heads=3)
        mask_crop = img_crop = args.crop
    seg = Segmenter(backbone, dim=64, img_size=mask_crop, backbone_kwargs=kw).to(dev)
    table = ClassTable(num_classes, 64).to(dev)
    ca = CAClassifier(num_classes, 64, bank_size=20, topk=20, warm_up=0).to(dev)
    opt = torch.optim.SGD(param_groups(seg, table, OptimConfig()), lr=1e-3, momentum=0.9)
    lo = LossConfig(k=8, cls_k=64, label_stride=2, margin_refresh=args.margin_refresh)
    sources = [
        SourceConfig(name="coco", kind="coco_stuff", root="-", batch_size=args.batch),
        SourceConfig(name="in", kind="imagenet_wds", root="-", batch_size=args.batch,
                     cls_weight=0.2, ca_weight=0.1),
    ]  # fmt: skip
    img_rows = torch.arange(MASK_CLASSES, num_classes) if num_classes > MASK_CLASSES else None
    img_rows = img_rows if img_rows is not None else torch.arange(num_classes)
    rows = [torch.arange(MASK_CLASSES), img_rows]
    sources = make_sources(sources, rows, num_classes, lo, dev)
    g = torch.Generator().manual_seed(1)

    def batches() -> list[dict]:
        label = torch.randint(0, MASK_CLASSES, (args.batch, mask_crop, mask_crop), generator=g)
        labels = [img_rows[torch.randint(len(img_rows), (1,), generator=g)]
                  for _ in range(args.batch)]  # fmt: skip
        return [
            {"image": torch.randn(args.batch, 3, mask_crop, mask_crop, generator=g).to(dev),
             "label": label.to(dev)},
            {"image": torch.randn(args.batch, 3, img_crop, img_crop, generator=g).to(dev),
             "labels": [x.to(dev) for x in labels]},
        ]  # fmt: skip

    amp = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else None
    times, nearest, syncs = [], None, []
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for step in range(args.warmup + args.steps):
        bl = batches()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with count_syncs() as counts:
            opt.zero_grad(set_to_none=True)
            if step % lo.margin_refresh == 0:  # as engine.train: L_r's O(C^2 d) search
                with torch.no_grad():
                    nearest = nearest_rows(table(), lo.knn_backend)
            with amp if amp else torch.autocast("cpu", enabled=False):
                xs = [seg(b["image"]).float() for b in bl]
                mu = table().float()
                out = compute_losses(xs, mu, bl, sources, lo, ca=ca, margin_nearest=nearest)
            out.terms["total"].backward()
            opt.step()
            ca.push(*out.pushes)  # the state phase of an applied step
        if dev.type == "cuda":
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
            syncs.append(sum(counts.values()))
    terms = out.terms
    peak = (torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)  # fmt: skip
    return {"classes": num_classes, "step_s": statistics.median(times), "peak_mib": peak,
            "images_per_s": 2 * args.batch / statistics.median(times), "device": str(dev),
            "backbone": backbone, "mask_crop": mask_crop, "image_crop": img_crop,
            "batch_per_source": args.batch, "margin_refresh": lo.margin_refresh,
            "syncs_per_step": statistics.mean(syncs), "sync_sites": dict(counts),
            "loss": float(terms["total"].detach())}  # fmt: skip


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--classes", type=int, nargs="+", default=[171, 21841, 100000])
    ap.add_argument("--real", action="store_true", help="ViT-B/16 at 512 / 320 crops")
    ap.add_argument("--crop", type=int, default=128, help="proxy crop size (without --real)")
    ap.add_argument("--batch", type=int, default=4, help="images per source per step")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument(
        "--margin-refresh",
        type=int,
        nargs="+",
        default=[1, 10],
        help="steps between L_r's neighbour searches (rows for each value)",
    )
    ap.add_argument("--out", default="bench_out")
    ap.add_argument("--row", type=int, default=None, help=argparse.SUPPRESS)  # child process
    args = ap.parse_args(argv)
    if args.row is not None:
        args.margin_refresh = args.margin_refresh[0]
        print(json.dumps(one_row(args, args.row)))
        return []
    rows = []
    for c, refresh in [(c, r) for r in args.margin_refresh for c in args.classes]:
        # a fresh process per row: peak memory is this row's alone
        cmd = [
            sys.executable,
            __file__,
            "--row",
            str(c),
            "--crop",
            str(args.crop),
            "--batch",
            str(args.batch),
            "--steps",
            str(args.steps),
            "--warmup",
            str(args.warmup),
            "--margin-refresh",
            str(refresh),
        ]
        cmd += ["--real"] if args.real else []  # fmt: skip
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(f"C={c} failed:\n{out.stderr[-2000:]}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    base = rows[0]
    print(f"\none training step ({base['backbone']}, crops {base['mask_crop']}/"
          f"{base['image_crop']}, {base['batch_per_source']} + {base['batch_per_source']} "
          f"images, {base['device']})")  # fmt: skip
    print(f"{'classes':>8} {'L_r every':>9} {'step s':>8} {'img/s':>7} {'peak MiB':>9} "
          f"{'time x':>7} {'mem x':>6} {'syncs':>6}")  # fmt: skip
    for r in rows:  # ratios against the 171-class row with the same refresh
        ref = next(b for b in rows if b["margin_refresh"] == r["margin_refresh"])
        r["time_ratio"] = r["step_s"] / ref["step_s"]
        r["memory_ratio"] = r["peak_mib"] / ref["peak_mib"]
        print(f"{r['classes']:>8} {r['margin_refresh']:>9} {r['step_s']:>8.3f} "
              f"{r['images_per_s']:>7.1f} {r['peak_mib']:>9.1f} {r['time_ratio']:>7.2f} "
              f"{r['memory_ratio']:>6.2f} {r['syncs_per_step']:>6.1f}")  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_step.json").write_text(json.dumps(rows, indent=1))
    print(f"wrote {out / 'bench_step.json'}")
    return rows


if __name__ == "__main__":
    main()
