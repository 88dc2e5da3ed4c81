"""Toy-world ablation: what each part of the method buys, over world seeds, at the demo's budget.

    python scripts/bench_toy.py                        # every variant x seeds 0-2; docs/results.md
    python scripts/bench_toy.py --seeds 0 --variants method all_masks --steps 100   # a quick look
    python scripts/bench_toy.py --jobs 2     # two runs at once, one torch thread each
    python scripts/bench_toy.py --variants flat tree --jobs 2     # the tree against flat
    python scripts/bench_toy.py --related-negatives bench_out/toy/runs/flat_s0   # the related
                                   # rows among each ImageNet image's k nearest negatives

Each seed S gets its own toy world (bench_out/toy/world_sS, made once) and training seed S. Every
run trains recipes/toy.yaml plus the variant's overrides (VARIANTS; WHAT says what each is) for
the same number of optimiser steps, by default the recipe's own (the demo's), with
scripts/train.py, and is scored with scripts/eval_ade.py on the world's ADE validation set with
the world's novel classes as the novel split. Resumable: finished runs are kept in
bench_out/toy/bench_toy.json under a fingerprint of the recipe and the variant's overrides, so
a changed recipe is run again rather than mixed with old rows (a code change is not in the
fingerprint: move bench_toy.json aside to run everything again; a world written by older code
is made again, its version in the manifest). A row serves every variant that resolves to the same
recipe (`method` is `tree` when the recipe ships the tree). Besides all / base / novel mIoU, the
per-class IoUs are split into the world's internal-node and leaf classes (its manifest names
them), for the plain protocol and eval_ade's roll-up. Prints a table, writes docs/results.md,
docs/results_chart.png and docs/bench_toy.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

from larvess.config import load_recipe, recipe_to_dict
from larvess.data.toy import WORLD_VERSION

ROOT = Path(__file__).resolve().parents[1]
RECIPE = "recipes/toy.yaml"
# the toy recipe's per-source settings, for variants that replace the source list
_JITTER = "crop_size: 96, scale_range: [0.8, 1.25], photometric: false"
_COCO = f"{{name: coco, kind: coco_stuff, root: x, batch_size: 8, num_workers: 1, {_JITTER}}}"
_ADE = f"{{name: ade, kind: ade150, root: x, batch_size: 8, num_workers: 0, {_JITTER}}}"
_IN = ("{name: imagenet, kind: imagenet_wds, root: x, names: x, batch_size: 4, num_workers: 0, "
       f"cls_weight: 1.0, ca_weight: 1.0, bg_threshold: 0.35, {_JITTER}}}")  # fmt: skip
VARIANTS = {
    "masks_only": [f"data=[{_COCO}]", "loss.negatives=all"],
    "all_masks": [f"data=[{_COCO}, {_ADE}]"],
    "image_ce": ["data.imagenet.ca_weight=0", "data.wa.ca_weight=0"],
    "method": [],
    "flat": ["loss.hierarchy=flat"],
    "tree": ["loss.hierarchy=tree"],
    "flat_no_wa": [f"data=[{_COCO}, {_IN}]", "loss.hierarchy=flat"],
    "tree_no_wa": [f"data=[{_COCO}, {_IN}]", "loss.hierarchy=tree"],
    "negatives_all": ["loss.negatives=all"],
    "sum": ["loss.combine=sum"],
    "pc2": ["loss.pc2_weight=0.1"],
    "full_softmax": ["loss.k=23"],
}
WHAT = {
    "masks_only": "COCO-format masks of the base classes only (novel classes never supervised; "
    "negatives from all rows, so that the novel classes' untrained rows are pushed away; "
    "eval_ade leaves classes no source reaches out of every figure, so its all mIoU is the "
    "base classes' and its novel mIoU n/a)",
    "all_masks": "the upper bound: base masks plus the ADE-format training masks of all 24 "
    "classes (novel classes get masks too), 8 + 8 images a step (the method: 8 + 4 + 4)",
    "image_ce": "`method` without the CA-Classifier: image-level CE only on the image sources",
    "method": "the full method, `recipes/toy.yaml` as shipped (what `make demo` runs)",
    "flat": "`method` with `loss.hierarchy: flat`: every synset an independent row; a child's "
    "image labels the child only and pushes its parent away like any other row",
    "tree": "`method` with `loss.hierarchy: tree`: a child's image label also labels every row "
    "covering it (its parent class) and rows related to a target are never its negatives",
    "flat_no_wa": "`flat` without the WA source (COCO masks + ImageNet only, as c171_i21k): the "
    "internal nodes get no image label of their own but the few at the node",
    "tree_no_wa": "`tree` without the WA source (COCO masks + ImageNet only, as c171_i21k)",
    "negatives_all": "`method` with negatives searched in the whole table, not only among the "
    "source's own classes (LarvSeg's `cls_emb[cls_index]`, the method's default)",
    "sum": "`method` with the per-source losses summed instead of weighted by their batch share "
    "(LarvSeg's DDP average, the method's default)",
    "pc2": "`method` plus the PC2Seg pixel-contrastive term (weight 0.1) on the image sources",
    "full_softmax": "`method` with k = 23 = C - 1: the kNN-sampled CE becomes full-softmax CE",
}
METRICS = ("mIoU", "base_mIoU", "novel_mIoU")
# the tree split of the per-class IoUs (the world's manifest names the internal nodes)
SPLIT = ("internal_novel", "leaf_novel", "internal_base", "leaf_base", "residual", "nested")


def make_world(seed: int, out: Path) -> Path:
    """The toy world of `seed` with its shards (made once, kept under `out`)."""
    world = out / f"world_s{seed}"
    py = sys.executable
    manifest = world / "toy_world.json"
    if manifest.is_file() and json.loads(manifest.read_text()).get("version") != WORLD_VERSION:
        shutil.rmtree(world)  # a world of older code (no tree): its runs are not comparable
    if not manifest.is_file():
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
    """What a run's result depends on besides seed, steps and the world: the recipe as the
    variant resolves it (recipe + overrides, parsed), so a comment or a default spelled out in
    the recipe keeps the rows, and `flat` stays `flat` whichever hierarchy the recipe ships."""
    resolved = recipe_to_dict(load_recipe(ROOT / RECIPE, VARIANTS[variant]))
    text = json.dumps(resolved, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def run_variant(
    variant: str, seed: int, steps: int, world: Path, out: Path, threads: int | None = None
) -> dict:
    """Train and score one (variant, seed); `threads` caps torch's threads (OMP_NUM_THREADS)."""
    name = f"{variant}_s{seed}"
    recipe_print = fingerprint(variant)  # the recipe as this run reads it
    overrides = VARIANTS[variant] + [
        f"name={name}",
        f"runs_dir={out / 'runs'}",
        f"train.seed={seed}",
        "train.resume=never",
        f"schedule.steps={steps}",
        f"train.ckpt_every={steps}",
        f"data.coco.root={world / 'coco_stuff'}",
        # the world's class <-> synset aliases and tree (never the demo's toy_world/)
        f"vocab.alias_file={world / 'aliases.txt'}",
        f"vocab.hierarchy_file={world / 'hypernyms.tsv'}",
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
        ]
        if not variant.endswith("_no_wa"):
            overrides.append(f"data.wa.root={world / 'ade'}")
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
    results = json.loads((ev / "results.json").read_text())
    summary = results["summary"]
    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    images = steps * sum(s["batch_size"] for s in recipe["data"])
    row = {"variant": variant, "seed": seed, "steps": steps, "recipe": recipe_print,
           "threads": threads, "train_s": round(train_s, 1),
           "images_per_s": round(images / train_s, 1)}  # fmt: skip
    row.update({m: summary[m] for m in METRICS})
    row.update({m + "_d2": summary[m + "_d2"] for m in METRICS})
    row["per_class"] = {c["name"]: c["IoU"] for c in results["per_class"]}
    manifest = json.loads((world / "toy_world.json").read_text())
    row.update(tree_split(row["per_class"], manifest))
    if "rollup" in results:  # eval_ade's hierarchy roll-up protocol, when the run has one
        roll = results["rollup"]
        row.update({"rollup_" + m: roll["summary"][m] for m in METRICS})
        row["rollup_per_class"] = {c["name"]: c["IoU"] for c in roll["per_class"]}
        split = tree_split(row["rollup_per_class"], manifest)
        row.update({"rollup_" + k: v for k, v in split.items()})
    row["unreached"] = results.get("unreached", [])
    return row


def tree_split(per_class: dict[str, float | None], manifest: dict) -> dict[str, float | None]:
    """Mean IoU (%) of the world's internal-node and leaf classes, novel and base apart, and the
    residual class and the class nested below it (None where no class of the group scored)."""
    internal, base = set(manifest.get("internal", [])), set(manifest["base"])
    residual = manifest.get("residual") or [{}]
    groups = {
        "internal_novel": [n for n in per_class if n in internal and n not in base],
        "leaf_novel": [n for n in per_class if n not in internal and n not in base],
        "internal_base": [n for n in per_class if n in internal and n in base],
        "leaf_base": [n for n in per_class if n not in internal and n in base],
        "residual": [residual[0].get("class")],
        "nested": [residual[0].get("nested")],
    }
    out = {}
    for k, names in groups.items():
        vals = [per_class[n] for n in names if per_class.get(n) is not None]
        out[k] = statistics.mean(vals) if vals else None
    return out


def mean_sd(values: list[float | None]) -> str:
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
    vals = [r.get(metric) for r in rows if r["variant"] == variant]
    vals = [v for v in vals if v is not None]
    return statistics.mean(vals) if vals else math.nan


def split_table(rows: list[dict], prefix: str = "") -> str:
    """Per variant: mean IoU of the internal-node and leaf classes, novel and base apart, the
    residual class and the class nested below it (``prefix`` "rollup_": the roll-up protocol)."""
    head = ["novel internal", "novel leaves", "base internal", "base leaves", "residual",
            "nested", "all mIoU"]  # fmt: skip
    lines = ["| variant | " + " | ".join(head) + " | runs |", "|---" * (len(head) + 2) + "|"]
    for v in VARIANTS:
        rs = [r for r in rows if r["variant"] == v and prefix + "mIoU" in r]
        if rs:
            cells = [mean_sd([r.get(prefix + k) for r in rs]) for k in (*SPLIT, "mIoU")]
            lines.append(f"| {v} | " + " | ".join(cells) + f" | {len(rs)} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def chart(rows: list[dict], path: Path) -> None:
    """Grouped bars: base and novel mIoU per variant, mean with the seeds' standard deviation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [v for v in VARIANTS if any(r["variant"] == v for r in rows)]
    fig, ax = plt.subplots(figsize=(9, 3.6))
    for j, (metric, label) in enumerate((("base_mIoU", "base"), ("novel_mIoU", "novel"))):
        # None: no class of the group scored (masks_only's novel classes are left out)
        vals = [[r[metric] for r in rows if r["variant"] == v and r[metric] is not None]
                for v in names]  # fmt: skip
        sds = [statistics.stdev(x) if len(x) > 1 else 0.0 for x in vals]
        xs = [i + (j - 0.5) * 0.38 for i in range(len(names))]
        means = [statistics.mean(x) if x else 0.0 for x in vals]
        ax.bar(xs, means, 0.38, yerr=sds, capsize=3, label=label)
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


def tree_text(rows: list[dict]) -> str:
    """The tree section: the world's tree, then IoU by internal node / leaf, per protocol."""
    plain = split_table(rows)
    if not plain:
        return ""
    roll = split_table(rows, "rollup_")
    roll_text = (
        "\nThe same under `eval_ade.py`'s hierarchy roll-up (a class scores as the best trained "
        "row inside it, so child rows vote for their parent class):\n\n" + roll + "\n"
        if roll
        else "\nNo run here has a roll-up evaluation (`eval_ade.py --rollup`).\n"
    )
    kept = ROOT / "bench_out" / "toy" / "related_negatives.json"
    related = json.loads(kept.read_text()) if kept.is_file() else {}
    flat = [v for k, v in sorted(related.items()) if k.startswith("flat_s")]
    if flat:
        k, n = flat[0]["k"], flat[0]["negatives"]
        roll_text += (
            f"\nRelated negatives under flat (`bench_toy.py --related-negatives`, runs "
            f"{', '.join(Path(v['run']).name for v in flat)}, {flat[0]['images']} ImageNet-format "
            f"images each): of the {k} nearest of the {n} other ImageNet-source rows (image-level "
            "CE's negatives with `loss.cls_k` = k), a child synset's image had its parent class "
            f"among them in {mean_sd([100 * v['parent_in_topk'] for v in flat])} % of images, at "
            f"rank {mean_sd([v['parent_rank'] for v in flat])} (1 = nearest); over all images "
            f"{mean_sd([v['related_in_topk'] for v in flat])} of the {k} were related to the "
            f"label (all negatives: {mean_sd([v['related_in_source'] for v in flat])}).\n"
        )
    return f"""
### The tree: internal nodes and leaves

The world's vocabulary is a tree (`larvess/data/toy.py` `toy_tree`, written to
`hypernyms.tsv`, the recipe's `vocab.hierarchy_file`): 7 of the 24 evaluated classes are internal
nodes with 2-3 ImageNet-format child synsets each (images rendered with the parent's texture and
labelled at the child, as IN-21K labels breeds and not "dog"). Of the 5 novel ones, 3 have no
images at the node itself (listed, as winter21 lists synsets it has no images of) and 2 a quarter
of theirs; the 2 base ones (masks) have image-labelled children, one also images at the node
(COCO dog and its breeds). One novel internal node is a residual class with a novel class of its
own dataset nested below it (food-other and pizza: distinct textures). Mean IoU (%) of each
group's classes over seeds (novel internal: 5 classes, novel leaves: 7, base internal: 2, base
leaves: 10; residual and nested: one class each):

{plain}
{roll_text}"""


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
        ("tree", "flat", "the tree over flat"),
        ("tree_no_wa", "flat_no_wa", "the tree over flat without WA"),
    ]:
        d_novel = mean(rows, a, "novel_mIoU") - mean(rows, b, "novel_mIoU")
        d_base = mean(rows, a, "base_mIoU") - mean(rows, b, "base_mIoU")
        if not math.isnan(d_novel):
            diffs.append(
                f"- {what}: novel {d_novel:+.1f}, base {d_base:+.1f} mIoU points (mean over seeds)"
            )
            if a.startswith("tree"):
                d = [mean(rows, a, k) - mean(rows, b, k) for k in SPLIT[:4]]
                diffs[-1] += "; " + ", ".join(
                    f"{k.replace('_', ' ')} {x:+.1f}" for k, x in zip(SPLIT, d) if not math.isnan(x)
                )
    path.parent.mkdir(parents=True, exist_ok=True)
    chart(rows, path.parent / "results_chart.png")
    variants = "\n".join(f"- `{v}`: {WHAT[v]}" for v in VARIANTS)
    absent = [v for v in VARIANTS if not any(r["variant"] == v for r in rows)]
    missing = (
        f"\nNo current rows (not run with this recipe and world; rows measured before are not "
        f"comparable and left out): {', '.join(f'`{v}`' for v in absent)}.\n"
        if absent
        else ""
    )
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
in ImageNet-format object images and ADE-format scenes with image-level labels; 128 px; the
classes' made-up synsets form a tree, below), one world per seed S in {seeds}, training seed S. Every run: `{RECIPE}` plus the variant's overrides for
{steps} optimiser steps (the demo's own budget) on this 2-core CPU; scored by
`scripts/eval_ade.py --novel` on the world's 200 ADE-format validation images (masks for all 24
classes; the same 12 novel classes for every variant). mIoU in %, mmseg convention, mean ±
standard deviation over seeds; `novel / all_masks` is the variant's novel mIoU as a fraction of
the all-masks upper bound's. Training seconds include process start; img/s = images seen / that
time.{shared}

{table(rows)}
{untuned_text(untuned or [])}
{tree_text(rows)}
![base and novel mIoU per variant](results_chart.png)

Variants:
{variants}
{missing}
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


def related_negatives(run: Path, world: Path, k: int = 8, n_images: int = 400) -> dict:
    """The issue's "related negatives" on one trained run: for `n_images` ImageNet-format images
    of `world`, the k nearest rows of the pooled embedding among the ImageNet source's rows other
    than the image's label (image-level CE's negatives with ``loss.cls_k = k``, the source's own
    rows: ``loss.negatives: source``), and how many of them the world's tree relates to the label
    (``VocabTree.related``: rows a tree run never takes as its negatives). Images are centre
    crops of the recipe's training crop size.

    Returns {images, k, child_images, related_in_topk (mean per image), with_related (share of
    images with one or more), related_in_source (mean related rows among all the negatives, the
    cls_k = None case), parent_rank (mean rank of a child image's parent among its negatives,
    1 = nearest), parent_in_topk (share of child images)}, each for all images and for the
    child synsets' images (``child_*``)."""
    import itertools

    import torch

    from larvess.checkpoint import load_model
    from larvess.data.imagenet_wds import ImageNetShards
    from larvess.hierarchy import Hierarchy

    loaded = load_model(run)
    vocab, seg = loaded.vocab, loaded.segmenter.eval()
    tree = vocab.tree(Hierarchy.load(world / "hypernyms.tsv"))
    rows = vocab.rows_of("imagenet")
    crop = yaml.safe_load((run / "recipe.yaml").read_text())["data"][0]["crop_size"]
    ds = ImageNetShards(world / "shards", rows=rows, rank=0, world_size=1)
    manifest = json.loads((world / "toy_world.json").read_text())
    child_wnids = {x["wnid"] for x in manifest["synsets"] if x["cls"] is None and x["parent"]}
    parent_row = {}  # child row -> its parent's row (covering: the class above it)
    for w, r in zip(ds.wnids, rows.tolist()):
        if w in child_wnids:
            parent_row[r] = int(tree.covering[r][0])
    with torch.no_grad():
        mu = loaded.table()
    stats: dict[str, list[float]] = {}

    def add(key: str, value: float, child: bool) -> None:
        stats.setdefault(key, []).append(value)
        if child:
            stats.setdefault("child_" + key, []).append(value)

    samples = list(itertools.islice(ds, n_images))  # the reader repeats forever
    for i in range(0, len(samples), 32):
        batch = samples[i : i + 32]
        imgs = []
        for smp in batch:
            img = smp["image"]
            top, left = (img.shape[1] - crop) // 2, (img.shape[2] - crop) // 2
            imgs.append(img[:, top : top + crop, left : left + crop])
        with torch.no_grad():
            pooled = seg(torch.stack(imgs)).mean(dim=(2, 3))  # [B, d]
        for smp, e in zip(batch, pooled):
            label = int(smp["labels"])
            cand = rows[rows != label]
            order = cand[torch.argsort(mu[cand] @ e, descending=True)]  # nearest first
            rel = set(tree.related[label].tolist())
            child = label in parent_row
            n_rel = sum(int(q) in rel for q in order[:k])
            add("related_in_topk", n_rel, child)
            add("with_related", float(n_rel > 0), child)
            add("related_in_source", float(len(rel & set(cand.tolist()))), child)
            if child:
                rank = 1 + order.tolist().index(parent_row[label])
                add("parent_rank", rank, False)
                add("parent_in_topk", float(rank <= k), False)
    out: dict = {"run": str(run), "images": len(samples), "k": k, "negatives": len(rows) - 1}
    out["child_images"] = len(stats.get("child_related_in_topk", []))
    out.update({key: round(statistics.mean(v), 3) for key, v in stats.items()})
    return out


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
    ap.add_argument(
        "--related-negatives",
        type=Path,
        metavar="RUN",
        help="only count, on the trained run RUN (its world: --related-world), how many of each "
        "ImageNet-format image's k nearest negatives are rows related to its label; print JSON",
    )
    ap.add_argument("--related-world", type=Path, help="the world of --related-negatives")
    ap.add_argument("--related-k", type=int, default=8, help="k of --related-negatives")
    args = ap.parse_args(argv)
    if args.related_negatives:
        world = args.related_world or args.out / "world_s0"
        got = related_negatives(args.related_negatives, world, args.related_k)
        print(json.dumps(got, indent=1))
        kept = args.out / "related_negatives.json"  # per run, for docs/results.md's next write
        done = json.loads(kept.read_text()) if kept.is_file() else {}
        done[Path(got["run"]).name] = got
        kept.write_text(json.dumps(done, indent=1))
        return []
    steps = args.steps or load_recipe(ROOT / RECIPE).schedule.steps
    args.out.mkdir(parents=True, exist_ok=True)
    result_file = args.out / "bench_toy.json"
    rows = json.loads(result_file.read_text()) if result_file.is_file() else []

    prints = {v: fingerprint(v) for v in VARIANTS}  # the recipe is read once, not per row

    def current(r: dict) -> bool:
        return r["steps"] == steps and r.get("recipe") in prints.values()

    def as_variants(done: list[dict]) -> list[dict]:
        """Each current row under every variant that resolves to its recipe (`method` is
        `tree` when the recipe ships the tree: one run, two names), at most one per seed."""
        out, have = [], set()
        for r in done:
            for v in VARIANTS:
                if prints[v] == r["recipe"] and (v, r["seed"]) not in have:
                    have.add((v, r["seed"]))
                    out.append(r if v == r["variant"] else dict(r, variant=v, run_as=r["variant"]))
        return out

    def split(rows: list[dict]) -> tuple[list[dict], list[dict]]:
        """-> (current rows of the tuning seeds, current method rows of the untuned seeds)."""
        done = as_variants([r for r in rows if current(r)])
        return [r for r in done if r["seed"] in args.seeds], [
            r for r in done if r["seed"] in args.untuned_seeds and r["variant"] == "method"
            and r["seed"] not in args.seeds]  # fmt: skip

    # seed-major: variants compared on one world first (a cut-short grid keeps whole pairs)
    todo = [(s, v) for s in args.seeds for v in args.variants]
    todo += [(s, "method") for s in args.untuned_seeds if s not in args.seeds]
    todo = [(s, v) for s, v in todo if not any(
        current(r) and r["recipe"] == prints[v] and r["seed"] == s for r in rows)]  # fmt: skip
    todo = [
        t
        for i, t in enumerate(todo)
        if (t[0], prints[t[1]]) not in {(s, prints[v]) for s, v in todo[:i]}
    ]  # one run for two names of one recipe
    for seed in sorted({s for s, _ in todo}):  # worlds first, one at a time
        make_world(seed, args.out)
    threads = max(1, (os.cpu_count() or 1) // args.jobs) if args.jobs > 1 else None
    lock = threading.Lock()

    def one(n: int, seed: int, v: str) -> None:
        print(f"[{n}/{len(todo)}] {v} seed {seed} ...", flush=True)
        r = run_variant(v, seed, steps, args.out / f"world_s{seed}", args.out, threads)
        with lock:
            rows.append(r)
            got = ", ".join(f"{m} {r[m]:.1f}" for m in METRICS if r[m] is not None)
            print(f"  {v} seed {seed}: {got} (unreached: {len(r['unreached'])}), train "
                  f"{r['train_s']:.0f} s ({r['images_per_s']:.0f} img/s)", flush=True)  # fmt: skip
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
