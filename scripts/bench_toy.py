"""Toy-world ablation: what each part of the method buys, over world seeds, at the demo's budget.

    python scripts/bench_toy.py                        # every variant x seeds 0-2; docs/results.md
    python scripts/bench_toy.py --seeds 0 --variants method all_masks --steps 100   # a quick look
    python scripts/bench_toy.py --jobs 2     # two runs at once, one torch thread each

Each seed S gets its own toy world (bench_out/toy/world_sS, made once) and training seed S. Every
run trains recipes/toy.yaml plus the variant's overrides (VARIANTS; WHAT says what each is) for
the same number of optimiser steps, by default the recipe's own (the demo's), with
scripts/train.py, and is scored with scripts/eval_ade.py on the world's ADE validation set with
the world's novel classes as the novel split. Resumable: finished runs are kept in
bench_out/toy/bench_toy.json under a fingerprint of the recipe and the variant's overrides, so
a changed recipe is run again rather than mixed with old rows (a code change is not in the
fingerprint: move bench_toy.json aside to run everything again). Prints a table, writes
docs/results.md, docs/results_chart.png and docs/bench_toy.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

from larvess.config import load_recipe

ROOT = Path(__file__).resolve().parents[1]
RECIPE = "recipes/toy.yaml"
# the toy recipe's per-source settings, for variants that replace the source list
_JITTER = "crop_size: 96, scale_range: [0.8, 1.25], photometric: false"
_COCO = f"{{name: coco, kind: coco_stuff, root: x, batch_size: 8, num_workers: 1, {_JITTER}}}"
_ADE = f"{{name: ade, kind: ade150, root: x, batch_size: 8, num_workers: 0, {_JITTER}}}"
VARIANTS = {
    "masks_only": [f"data=[{_COCO}]", "loss.negatives=all"],
    "all_masks": [f"data=[{_COCO}, {_ADE}]"],
    "image_ce": ["data.imagenet.ca_weight=0", "data.wa.ca_weight=0"],
    "method": [],
    "negatives_all": ["loss.negatives=all"],
    "sum": ["loss.combine=sum"],
    "pc2": ["loss.pc2_weight=0.1"],
    "full_softmax": ["loss.k=23"],
}
WHAT = {
    "masks_only": "COCO-format masks of the base classes only (novel classes never supervised; "
    "negatives from all rows, so that the novel classes' untrained rows are pushed away)",
    "all_masks": "the upper bound: base masks plus the ADE-format training masks of all 24 "
    "classes (novel classes get masks too), 8 + 8 images a step (the method: 8 + 4 + 4)",
    "image_ce": "`method` without the CA-Classifier: image-level CE only on the image sources",
    "method": "the full method, `recipes/toy.yaml` as shipped (what `make demo` runs)",
    "negatives_all": "`method` with negatives searched in the whole table, not only among the "
    "source's own classes (LarvSeg's `cls_emb[cls_index]`, the method's default)",
    "sum": "`method` with the per-source losses summed instead of weighted by their batch share "
    "(LarvSeg's DDP average, the method's default)",
    "pc2": "`method` plus the PC2Seg pixel-contrastive term (weight 0.1) on the image sources",
    "full_softmax": "`method` with k = 23 = C - 1: the kNN-sampled CE becomes full-softmax CE",
}
METRICS = ("mIoU", "base_mIoU", "novel_mIoU")


def make_world(seed: int, out: Path) -> Path:
    """The toy world of `seed` with its shards (made once, kept under `out`)."""
    world = out / f"world_s{seed}"
    py = sys.executable
    if not (world / "toy_world.json").is_file():
        cmd = [py, "-m", "larvess.data.toy", "--out", str(world), "--seed", str(seed)]
        subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    if not (world / "shards" / "info.json").is_file():
        subprocess.run(
            [py, "scripts/shard_imagenet21k.py", "--root", str(world / "imagenet"), "--out",
             str(world / "shards"), "--synsets", str(world / "imagenet_synsets.txt"),
             "--shard-size", "200", "--workers", "2", "--seed", str(seed)],
            cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
    novel = world / "novel.txt"  # one split for every variant, all_masks included
    novel.write_text("\n".join(json.loads((world / "toy_world.json").read_text())["novel"]) + "\n")
    return world


def fingerprint(variant: str) -> str:
    """What a run's result depends on besides seed and steps: the recipe text and the overrides."""
    text = (ROOT / RECIPE).read_text() + "\n".join(VARIANTS[variant])
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def run_variant(
    variant: str, seed: int, steps: int, world: Path, out: Path, threads: int | None = None
) -> dict:
    """Train and score one (variant, seed); `threads` caps torch's threads (OMP_NUM_THREADS)."""
    name = f"{variant}_s{seed}"
    overrides = VARIANTS[variant] + [
        f"name={name}",
        f"runs_dir={out / 'runs'}",
        f"train.seed={seed}",
        "train.resume=never",
        f"schedule.steps={steps}",
        f"train.ckpt_every={steps}",
        f"data.coco.root={world / 'coco_stuff'}",
    ]
    if variant == "masks_only":  # novel classes still need (never trained) rows to be scored
        overrides.append(
            f"vocab.extra_names=[{world / 'ade' / 'ADEChallengeData2016' / 'objectInfo150.txt'}]"
        )
    elif variant == "all_masks":
        overrides.append(f"data.ade.root={world / 'ade'}")
    else:
        overrides += [
            f"data.imagenet.root={world / 'shards'}",
            f"data.imagenet.names={world / 'imagenet_lemmas.txt'}",
            f"vocab.alias_file={world / 'aliases.txt'}",
            f"data.wa.root={world / 'ade'}",
        ]
    py = sys.executable
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    log = out / "runs" / f"{name}.log"  # both commands' output; named if one fails
    log.parent.mkdir(parents=True, exist_ok=True)

    def call(cmd: list[str]) -> None:
        with log.open("a") as f:
            if subprocess.run(
                cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT
            ).returncode:
                raise RuntimeError(f"{variant} seed {seed} failed: {' '.join(cmd[:2])}; see {log}")

    log.write_text("")
    t0 = time.time()
    call([py, "scripts/train.py", RECIPE, *overrides])
    train_s = time.time() - t0
    run = out / "runs" / name
    ev = run / "eval_ade150"
    call([py, "scripts/eval_ade.py", "--checkpoint", str(run), "--dataset", "ade150", "--root",
          str(world / "ade"), "--novel", str(world / "novel.txt"), "--out", str(ev)])  # fmt: skip
    summary = json.loads((ev / "results.json").read_text())["summary"]
    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    images = steps * sum(s["batch_size"] for s in recipe["data"])
    row = {"variant": variant, "seed": seed, "steps": steps, "recipe": fingerprint(variant),
           "threads": threads, "train_s": round(train_s, 1),
           "images_per_s": round(images / train_s, 1)}  # fmt: skip
    row.update({m: summary[m] for m in METRICS})
    row.update({m + "_d2": summary[m + "_d2"] for m in METRICS})
    return row


def mean_sd(values: list[float]) -> str:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return "n/a"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.1f} ± {sd:.1f}"


def table(rows: list[dict]) -> str:
    lines = [
        "| variant | all mIoU | base mIoU | novel mIoU | novel / all_masks | train s | img/s | runs |",
        "|---|---|---|---|---|---|---|---|",
    ]
    bound = mean(rows, "all_masks", "novel_mIoU")
    for v in VARIANTS:
        rs = [r for r in rows if r["variant"] == v]
        if rs:
            cells = [mean_sd([r[m] for r in rs]) for m in METRICS]
            frac = mean(rows, v, "novel_mIoU") / bound if bound > 0 else math.nan
            t = statistics.mean(r["train_s"] for r in rs)
            ips = statistics.mean(r["images_per_s"] for r in rs)
            lines.append(f"| {v} | " + " | ".join(cells) + f" | {frac:.2f} | {t:.0f} | {ips:.0f} "
                         f"| {len(rs)} |")  # fmt: skip
    return "\n".join(lines)


def mean(rows: list[dict], variant: str, metric: str) -> float:
    vals = [r[metric] for r in rows if r["variant"] == variant and r[metric] is not None]
    return statistics.mean(vals) if vals else math.nan


def chart(rows: list[dict], path: Path) -> None:
    """Grouped bars: base and novel mIoU per variant, mean with the seeds' standard deviation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [v for v in VARIANTS if any(r["variant"] == v for r in rows)]
    fig, ax = plt.subplots(figsize=(9, 3.6))
    for j, (metric, label) in enumerate((("base_mIoU", "base"), ("novel_mIoU", "novel"))):
        vals = [[r[metric] for r in rows if r["variant"] == v] for v in names]
        sds = [statistics.stdev(x) if len(x) > 1 else 0.0 for x in vals]
        xs = [i + (j - 0.5) * 0.38 for i in range(len(names))]
        ax.bar(xs, [statistics.mean(x) for x in vals], 0.38, yerr=sds, capsize=3, label=label)
    ax.set_xticks(range(len(names)), names, rotation=20, ha="right")
    ax.set_ylabel("mIoU (%)")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def untuned_text(rows: list[dict]) -> str:
    """The method on world seeds the recipe was not tuned on, one line per seed."""
    lines = [f"- world seed {r['seed']}: all {r['mIoU']:.1f}, base {r['base_mIoU']:.1f}, novel "
             f"{r['novel_mIoU']:.1f} mIoU ({r['train_s']:.0f} s)" for r in rows]  # fmt: skip
    if not lines:
        return ""
    return "\n`method` on a world seed the recipe was never tuned on:\n\n" + "\n".join(lines) + "\n"


def write_doc(rows: list[dict], path: Path, steps: int, untuned: list[dict] | None = None) -> None:
    """docs/results.md: the setup, the table, the chart and the differences, from `rows` (the
    tuning seeds) and `untuned` (the method on other seeds)."""
    seeds = sorted({r["seed"] for r in rows})
    diffs = []
    for a, b, what in [
        ("image_ce", "masks_only", "image-level CE over masks only"),
        ("method", "image_ce", "CA-Classifier over image-level CE alone"),
        ("method", "negatives_all", "per-source negatives over negatives from all rows"),
        ("method", "sum", "batch-share weighting over the sum of source losses"),
        ("pc2", "method", "PC2Seg term over none"),
        ("method", "full_softmax", "kNN-sampled CE (k = 8) over full-softmax CE"),
        ("all_masks", "method", "masks for every class (upper bound) over the method"),
    ]:
        d_novel = mean(rows, a, "novel_mIoU") - mean(rows, b, "novel_mIoU")
        d_base = mean(rows, a, "base_mIoU") - mean(rows, b, "base_mIoU")
        if not math.isnan(d_novel):
            diffs.append(
                f"- {what}: novel {d_novel:+.1f}, base {d_base:+.1f} mIoU points (mean over seeds)"
            )
    path.parent.mkdir(parents=True, exist_ok=True)
    chart(rows, path.parent / "results_chart.png")
    variants = "\n".join(f"- `{v}`: {WHAT[v]}" for v in VARIANTS)
    grid = path.parent / "demo_grid.png"
    grid_text = (
        "\nValidation images from the demo run (`make demo`, world seed 0): image, ground truth, "
        "prediction; the legend lists base and novel classes apart:\n\n![demo results](demo_grid.png)\n"
        if grid.is_file()
        else ""
    )
    threads = sorted({r.get("threads") for r in rows if r.get("threads")})
    shared = (
        f" Runs went several at a time (`--jobs`, torch threads per run: {threads}), so their "
        "seconds and img/s are a shared machine's: `make demo` alone trains faster (README)."
        if threads
        else ""
    )
    doc = f"""# Results on the toy world

Generated by `scripts/bench_toy.py` (do not edit by hand). Toy world: `python -m larvess.data.toy
--seed S` (24 procedural texture classes, 12 base with COCO-Stuff-format masks, 12 novel seen only
in ImageNet-format object images and ADE-format scenes with image-level labels; 128 px), one world
per seed S in {seeds}, training seed S. Every run: `{RECIPE}` plus the variant's overrides for
{steps} optimiser steps (the demo's own budget) on this 2-core CPU; scored by
`scripts/eval_ade.py --novel` on the world's 200 ADE-format validation images (masks for all 24
classes; the same 12 novel classes for every variant). mIoU in %, mmseg convention, mean ±
standard deviation over seeds; `novel / all_masks` is the variant's novel mIoU as a fraction of
the all-masks upper bound's. Training seconds include process start; img/s = images seen / that
time.{shared}

{table(rows)}
{untuned_text(untuned or [])}
![base and novel mIoU per variant](results_chart.png)

Variants:
{variants}

What the differences are:
{chr(10).join(diffs)}
{grid_text}
Loss memory against the number of classes (`scripts/bench_loss.py`, the analogue of ESS Fig. 1;
the kNN-sampled loss stays flat where full softmax grows with C):

![loss memory vs C](bench_loss.png)

Per-run figures (seconds of training, every mIoU under both conventions): `bench_toy.json` beside
this file.
"""
    path.write_text(doc)
    (path.parent / "bench_toy.json").write_text(json.dumps(rows, indent=1))


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="world + train seeds")
    ap.add_argument(
        "--untuned-seeds",
        type=int,
        nargs="*",
        default=[3],
        help="seeds the recipe was not tuned on: the method only, reported apart",
    )
    ap.add_argument("--steps", type=int, default=None, help="default: the recipe's (the demo's)")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--out", type=Path, default=ROOT / "bench_out" / "toy")
    ap.add_argument("--doc", type=Path, default=ROOT / "docs" / "results.md")
    ap.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="runs at once, each with cores / jobs torch threads (img/s then shared)",
    )
    args = ap.parse_args(argv)
    steps = args.steps or load_recipe(ROOT / RECIPE).schedule.steps
    args.out.mkdir(parents=True, exist_ok=True)
    result_file = args.out / "bench_toy.json"
    rows = json.loads(result_file.read_text()) if result_file.is_file() else []

    prints = {v: fingerprint(v) for v in VARIANTS}  # the recipe is read once, not per row

    def current(r: dict) -> bool:
        return r["steps"] == steps and r.get("recipe") == prints.get(r["variant"])

    def split(rows: list[dict]) -> tuple[list[dict], list[dict]]:
        """-> (current rows of the tuning seeds, current method rows of the untuned seeds)."""
        done = [r for r in rows if current(r)]
        return [r for r in done if r["seed"] in args.seeds], [
            r for r in done if r["seed"] in args.untuned_seeds and r["variant"] == "method"
            and r["seed"] not in args.seeds]  # fmt: skip

    todo = [(s, v) for v in args.variants for s in args.seeds]  # whole rows first
    todo += [(s, "method") for s in args.untuned_seeds if s not in args.seeds]
    todo = [(s, v) for s, v in todo if not any(
        current(r) and r["variant"] == v and r["seed"] == s for r in rows)]  # fmt: skip
    for seed in sorted({s for s, _ in todo}):  # worlds first, one at a time
        make_world(seed, args.out)
    threads = max(1, (os.cpu_count() or 1) // args.jobs) if args.jobs > 1 else None
    lock = threading.Lock()

    def one(n: int, seed: int, v: str) -> None:
        print(f"[{n}/{len(todo)}] {v} seed {seed} ...", flush=True)
        r = run_variant(v, seed, steps, args.out / f"world_s{seed}", args.out, threads)
        with lock:
            rows.append(r)
            print(f"  {v} seed {seed}: base {r['base_mIoU']:.1f} novel {r['novel_mIoU']:.1f}, "
                  f"train {r['train_s']:.0f} s ({r['images_per_s']:.0f} img/s)", flush=True)  # fmt: skip
            result_file.write_text(json.dumps(rows, indent=1))
            # the document always shows every finished run, even if the grid is cut short
            done, untuned = split(rows)
            write_doc(done, args.doc, steps, untuned)

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for f in [pool.submit(one, n, s, v) for n, (s, v) in enumerate(todo, 1)]:
            f.result()  # a failed run stops the bench with its error
    rows, untuned = split(rows)
    write_doc(rows, args.doc, steps, untuned)
    print(table(rows))
    print(f"wrote {result_file} and {args.doc}")
    return rows


if __name__ == "__main__":
    main()
