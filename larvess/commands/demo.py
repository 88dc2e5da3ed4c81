"""The whole pipeline on a CPU, through the same commands as real training (`make demo`).

    python scripts/demo.py                 # ~5 minutes on 2 cores
    python scripts/demo.py --quick         # a tiny world and a few steps (CI's smoke run)
    python -m larvess.commands.demo ...    # the same

1. writes the toy world (python -m larvess.data.toy)
2. shards its ImageNet-format part (larvess-shard)
3. trains recipes/toy.yaml (accelerate launch -m larvess.commands.train, i.e. larvess-train)
4. evaluates on the toy ADE-format validation set (larvess-eval)
and prints all / base / novel mIoU with where the overlays and logs are. Each stage runs in its
own process, as a user runs the commands.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]  # the checkout: recipes/toy.yaml, runs/, toy_world/
QUICK_WORLD = ["--coco", "48", "--imagenet-per-class", "4", "--ade-train", "48", "--ade-val", "8"]


def run(cmd: list[str], what: str) -> float:
    print(f"\n== {what}\n$ {' '.join(cmd)}", flush=True)
    t0 = time.time()
    subprocess.run(cmd, cwd=ROOT, check=True)
    return time.time() - t0


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="demo", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    ap.add_argument("--world", type=Path, default=Path("toy_world"), help="toy world folder")
    ap.add_argument("--runs", default="runs", help="runs folder")
    ap.add_argument("--name", default="toy", help="run name")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=None, help="override schedule.steps")
    ap.add_argument("--quick", action="store_true", help="tiny world, 6 steps: a smoke run")
    ap.add_argument(
        "--docs", type=Path, default=None, help="also copy the grid to DOCS/demo_grid.png"
    )
    ap.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "toy.yaml")
    ap.add_argument("overrides", nargs="*", help="extra key.sub=value recipe overrides")
    return ap


def run_demo(argv: list[str] | None = None) -> dict:
    """All four stages; returns the summary, the stage times and the training images/s."""
    args = parser().parse_args(argv)
    if not args.recipe.is_file():
        raise FileNotFoundError(f"{args.recipe}: the toy recipe (pass --recipe FILE)")
    py = sys.executable
    world = args.world if args.world.is_absolute() else ROOT / args.world
    steps = args.steps if args.steps is not None else (6 if args.quick else None)
    times = {}

    if (world / "toy_world.json").is_file() and not (world / "hypernyms.tsv").is_file():
        print(f"{world}: a toy world of an older larvess (no hypernym table): writing it anew")
        shutil.rmtree(world)
    if not (world / "toy_world.json").is_file():
        cmd = [py, "-m", "larvess.data.toy", "--out", str(world), "--seed", str(args.seed)]
        times["world"] = run(cmd + (QUICK_WORLD if args.quick else []), "toy world")
    shards = world / "shards"
    times["shard"] = run(
        [py, "-m", "larvess.commands.shard", "--root", str(world / "imagenet"), "--out",
         str(shards), "--synsets", str(world / "imagenet_synsets.txt"), "--shard-size", "200",
         "--workers", "2", "--seed", str(args.seed)],
        "shard the ImageNet-format part",
    )  # fmt: skip

    overrides = [
        f"name={args.name}",
        f"runs_dir={args.runs}",
        f"train.seed={args.seed}",
        f"data.coco.root={world / 'coco_stuff'}",
        f"data.imagenet.root={shards}",
        f"data.imagenet.names={world / 'imagenet_lemmas.txt'}",
        f"vocab.alias_file={world / 'aliases.txt'}",
        f"vocab.hierarchy_file={world / 'hypernyms.tsv'}",
        f"data.wa.root={world / 'ade'}",
        "train.resume=never",
    ]
    if steps is not None:
        overrides += [f"schedule.steps={steps}", f"schedule.warmup_steps={min(50, steps - 1)}"]
        overrides += [f"train.ckpt_every={steps}"]
    if args.quick:
        overrides += [
            "data.coco.batch_size=4",
            "data.imagenet.batch_size=2",
            "data.wa.batch_size=2",
        ]
    overrides += args.overrides
    env_launch = [py, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1",
                  "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]  # fmt: skip
    train = ["-m", "larvess.commands.train", str(args.recipe), *overrides]
    times["train"] = run(env_launch + train, "train")

    run_dir = Path(args.runs) if Path(args.runs).is_absolute() else ROOT / args.runs
    run_dir = run_dir / args.name
    out = run_dir / "eval_ade150"
    times["eval"] = run(
        [py, "-m", "larvess.commands.eval_ade", "--checkpoint", str(run_dir), "--dataset", "ade150",
         "--root", str(world / "ade"), "--save-vis", "8", "--grid", "4", "--out", str(out)],
        "evaluate on the toy ADE-format validation set",
    )  # fmt: skip

    summary = json.loads((out / "results.json").read_text())["summary"]
    print("\n== toy world results (mIoU %, mmseg convention; detectron2 in brackets)")
    print(f"{'':8}{'all':>16}{'base':>16}{'novel':>16}")
    cells = [
        f"{summary[k]:.1f} ({summary[k + '_d2']:.1f})" for k in ("mIoU", "base_mIoU", "novel_mIoU")
    ]
    print(f"{'mIoU':8}" + "".join(f"{c:>16}" for c in cells))
    print(f"pAcc {summary['pAcc']:.1f}  mAcc {summary['mAcc']:.1f}  fwIoU {summary['fwIoU']:.1f}")
    print(f"picture: {out / 'grid.png'}   overlays: {out / 'vis'}")
    print(f"TensorBoard logs: {run_dir / 'tb'}   model: {run_dir}")
    recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    images = recipe["schedule"]["steps"] * sum(s["batch_size"] for s in recipe["data"])
    total = sum(times.values())
    print("time (s): " + ", ".join(f"{k} {v:.0f}" for k, v in times.items())
          + f"; total {total:.0f} ({total / 60:.1f} min); training {images} images at "
          f"{images / times['train']:.0f} img/s")  # fmt: skip
    if args.docs is not None and (out / "grid.png").is_file():
        args.docs.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out / "grid.png", args.docs / "demo_grid.png")
        print(f"copied the picture to {args.docs / 'demo_grid.png'}")
    return {"summary": summary, "times": times, "images_per_s": images / times["train"]}


def main(argv: list[str] | None = None) -> int:
    """Entry point: 0 when every stage succeeded (a failed stage's own message is above)."""
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    try:
        run_demo(argv)
    except subprocess.CalledProcessError as err:
        print(f"error: stage failed (exit status {err.returncode}): {' '.join(err.cmd)}",
              file=sys.stderr)  # fmt: skip
        return 1
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
