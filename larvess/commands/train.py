"""Train a large-vocabulary segmenter from a recipe.

    larvess-train recipes/toy.yaml schedule.steps=100
    accelerate launch -m larvess.commands.train recipes/c171_i21k.yaml [key.sub=value ...]
    accelerate launch scripts/train.py recipes/c171_i21k.yaml [key.sub=value ...]

Writes runs/<name>/: recipe.yaml (resolved, with the precision used), git.txt, vocab.json, tb/
(TensorBoard, through accelerate's trackers), checkpoints/step_*/ (accelerate state + model.pt),
and at the end model.pt (larvess: segmenter + class table + vocabulary) and backbone/ (the ViT
alone for timm: timm.create_model("local-dir:RUN/backbone", pretrained=True)). A run whose folder
already holds a checkpoint resumes from the newest one (train.resume=auto, the default).
train.precision=auto (the default) takes the launcher's mixed precision (accelerate launch
--mixed_precision bf16, or `accelerate config`); bf16 / fp16 / fp32 in the recipe win over it.
A bad recipe value is one line `error: FILE: 'key' ...` and exit status 2.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import LoggerType, set_seed

from larvess import build
from larvess.checkpoint import export_backbone, export_model
from larvess.config import Recipe, RecipeError, dump_recipe, load_recipe, recipe_to_dict
from larvess.engine import Net, TrainState, train
from larvess.losses import LogitStandardizer
from larvess.objective import make_sources

# recipe train.precision -> accelerate's mixed_precision, and back (what the run records)
TO_ACCELERATE = {"bf16": "bf16", "fp16": "fp16", "fp32": "no"}
FROM_ACCELERATE = {v: k for k, v in TO_ACCELERATE.items()}


def git_commit() -> str:
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True)
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], cwd=here, capture_output=True, text=True
        )
    except OSError:
        return "unknown (git not found)\n"
    if sha.returncode != 0:
        return "unknown (not a git checkout)\n"
    return sha.stdout.strip() + (" (uncommitted changes)" if dirty.stdout.strip() else "") + "\n"


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="larvess-train", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    ap.add_argument("recipe", help="YAML recipe (a diff over larvess/config.py defaults)")
    ap.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    ap.add_argument("--resume", action="store_true", help="require a checkpoint to resume from")
    return ap


def make_accelerator(recipe: Recipe, src: str) -> tuple[Accelerator, str]:
    """The run's Accelerator and the precision it uses (bf16 | fp16 | fp32).

    precision auto leaves mixed_precision unset, so accelerate takes the launcher's value
    (ACCELERATE_MIXED_PRECISION, set by `accelerate launch` from its flag or config file; "no"
    under plain python). On a CPU, bf16 is CPU autocast. Trackers (train.log_with) log under
    the run folder; the ones whose package is not installed are left out by accelerate.
    """
    t = recipe.train
    known = set(LoggerType.list()) - {"all"}
    for name in t.log_with:
        if name not in known:
            raise RecipeError(
                f"{src}: 'train.log_with' = {name!r} is invalid: one of {sorted(known)}"
            )
    run_dir = Path(recipe.runs_dir) / recipe.name
    # cpu=True without CUDA: accelerate then joins a multi-process launch with gloo (MULTI_CPU)
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision=None if t.precision == "auto" else TO_ACCELERATE[t.precision],
        log_with=list(t.log_with) or None,
        project_dir=str(run_dir),
    )
    used = FROM_ACCELERATE.get(str(accelerator.mixed_precision))
    if used is None:
        raise RecipeError(
            f"{src}: 'train.precision' = {t.precision!r} is invalid here: the launcher asks for "
            f"mixed precision {accelerator.mixed_precision!r}; set one of bf16, fp16, fp32"
        )
    return accelerator, used


def flat_config(recipe: Recipe) -> dict:
    """The recipe as flat {"model.dim": 8, ...} scalars (TensorBoard's hparams take no nesting)."""
    out: dict = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            for i, v in enumerate(value):
                walk(f"{prefix}.{v.get('name') or i}", v)
        elif isinstance(value, bool | int | float | str):
            out[prefix] = value
        else:  # None, lists of scalars
            out[prefix] = str(value)

    walk("", recipe_to_dict(recipe))
    return out


def run(argv: list[str] | None = None) -> dict:
    """Train; returns what was built (the tests inspect it across processes). Raises on error."""
    args = parser().parse_args(argv)
    recipe = load_recipe(args.recipe, args.overrides)
    t = recipe.train
    accelerator, recipe.train.precision = make_accelerator(recipe, args.recipe)
    main_proc = accelerator.is_main_process
    set_seed(t.seed)  # same initial weights on every process
    run_dir = Path(recipe.runs_dir) / recipe.name
    ckpt, state = build.resolve_resume(recipe, require=args.resume)
    for s in recipe.data:  # fail before any data is read when a batch does not divide
        build.per_process_batch(s, accelerator.num_processes)

    # -- build: vocabulary + readers, model, optimiser, CA bank
    vocab, readers = build.build_data(recipe)
    source_rows = [vocab.rows_of(s.name) for s in recipe.data]
    segmenter, table, model_args = build.build_model(recipe, len(vocab))
    ca = build.build_ca(recipe, len(vocab))
    logit_norm = LogitStandardizer() if recipe.loss.logit_norm else None
    net = Net(segmenter, table, logit_norm)
    optimizer, scheduler = build.build_optimizer(recipe, segmenter, table, logit_norm)
    # batches are not prepared: the readers split by rank themselves (accelerate would split the
    # node-split streams again); the scheduler is stepped by hand (a prepared one steps
    # num_processes times per step)
    net, optimizer = accelerator.prepare(net, optimizer)
    ca.to(accelerator.device)
    accelerator.register_for_checkpointing(scheduler, ca)

    tree = build.build_tree(recipe, vocab)  # before vocab.json: its parents use it
    # -- run folder (main process only); trackers: accelerate makes them on the main process
    if main_proc:
        run_dir.mkdir(parents=True, exist_ok=True)
        dump_recipe(recipe, run_dir / "recipe.yaml")
        (run_dir / "git.txt").write_text(git_commit())
        vocab.save(run_dir / "vocab.json")
    accelerator.init_trackers("tb", config=flat_config(recipe))
    if main_proc:  # engine logs through accelerator.log: every tracker gets the scalars
        trackers = [tr.name for tr in accelerator.trackers]
        print(f"run folder {run_dir}: {len(vocab)} classes, sources {[s.name for s in recipe.data]}"
              f", {accelerator.num_processes} process(es), precision {t.precision}, "
              f"trackers {trackers or 'none'}")  # fmt: skip
        for name, ds in readers.items():
            if getattr(ds, "n_skipped", 0):
                print(f"source '{name}': {ds.n_skipped} files without a partner skipped")
    state = TrainState.from_json(state)
    if ckpt is not None:
        accelerator.load_state(str(ckpt))
        if main_proc:
            print(f"resumed from {ckpt} at step {state.step}")

    # batches already drawn by this process: the data streams continue where they stopped
    batches = build.build_batches(
        recipe,
        readers,
        accelerator.process_index,
        accelerator.num_processes,
        start_batch=state.step * t.grad_accum,
    )

    def on_checkpoint(folder: Path, step: int) -> None:
        unwrapped = accelerator.unwrap_model(net)
        export_model(folder, unwrapped.segmenter, unwrapped.table, model_args, vocab, step)

    sources = make_sources(recipe.data, source_rows, len(vocab), recipe.loss, accelerator.device,
                           tree=tree)  # fmt: skip
    state = train(
        accelerator=accelerator, net=net, optimizer=optimizer, scheduler=scheduler,
        batches=batches, sources=sources, ca=ca, loss=recipe.loss, train=t,
        steps=recipe.schedule.steps, grad_clip=recipe.optim.grad_clip, run_dir=run_dir,
        state=state, on_checkpoint=on_checkpoint,
    )  # fmt: skip
    step, bad_steps = state.step, state.bad_steps
    if main_proc:
        if step >= recipe.schedule.steps:
            unwrapped = accelerator.unwrap_model(net)
            export_model(run_dir, unwrapped.segmenter, unwrapped.table, model_args, vocab, step)
            export_backbone(run_dir, unwrapped.segmenter, model_args)
            print(f"done: {run_dir / 'model.pt'}, {run_dir / 'backbone'} "
                  f"({bad_steps} steps skipped for NaN/inf, {state.unreadable} unreadable)")  # fmt: skip
        else:
            print(f"stopped at step {step} of {recipe.schedule.steps}: run again to resume")
    accelerator.wait_for_everyone()
    accelerator.end_training()  # closes the trackers
    return {"accelerator": accelerator, "net": net, "ca": ca, "vocab": vocab, "step": step,
            "bad_steps": bad_steps, "state": state, "precision": t.precision}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """Console entry point: 0 on success; a bad recipe is one line on stderr and status 2, a
    missing dataset, recipe or checkpoint status 1 (no traceback: under `accelerate launch`,
    pass -q too, or accelerate adds its own traceback of the failed child)."""
    try:
        run(argv)
    except RecipeError as err:
        if int(os.environ.get("RANK", "0")) == 0:  # every process fails alike: one line
            print(f"error: {err}", file=sys.stderr)
        return 2
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
