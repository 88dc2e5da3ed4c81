"""Train a large-vocabulary segmenter from a recipe.

    accelerate launch scripts/train.py recipes/c171_i21k.yaml [key.sub=value ...]
    python scripts/train.py recipes/toy.yaml schedule.steps=100

Writes runs/<name>/: recipe.yaml (resolved), git.txt, vocab.json, tb/ (TensorBoard),
checkpoints/step_*/ (accelerate state + model.pt), and model.pt at the end. A run whose folder
already holds a checkpoint resumes from the newest one (train.resume=auto, the default).
"""

from __future__ import annotations

import argparse
import subprocess
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.tensorboard import SummaryWriter

from larvess import build
from larvess.checkpoint import export_model
from larvess.config import dump_recipe, load_recipe
from larvess.engine import Net, train
from larvess.losses import LogitStandardizer


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


def main(argv: list[str] | None = None) -> dict:
    """Train; returns what was built (the tests inspect it across processes)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("recipe", help="YAML recipe (a diff over larvess/config.py defaults)")
    ap.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    ap.add_argument("--resume", action="store_true", help="require a checkpoint to resume from")
    args = ap.parse_args(argv)
    recipe = load_recipe(args.recipe, args.overrides)
    t = recipe.train

    bf16 = t.precision == "bf16" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    # cpu=True without CUDA: accelerate then joins a multi-process launch with gloo (MULTI_CPU)
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(), mixed_precision="bf16" if bf16 else "no"
    )
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

    # -- run folder (main process only)
    writer = None
    if main_proc:
        run_dir.mkdir(parents=True, exist_ok=True)
        dump_recipe(recipe, run_dir / "recipe.yaml")
        (run_dir / "git.txt").write_text(git_commit())
        vocab.save(run_dir / "vocab.json")
        writer = SummaryWriter(str(run_dir / "tb"))
        print(f"run folder {run_dir}: {len(vocab)} classes, sources {[s.name for s in recipe.data]}"
              f", {accelerator.num_processes} process(es)")  # fmt: skip
        for name, ds in readers.items():
            if getattr(ds, "n_skipped", 0):
                print(f"source '{name}': {ds.n_skipped} files without a partner skipped")
    start_step, bad_steps = state["step"], state["bad_steps"]
    if ckpt is not None:
        accelerator.load_state(str(ckpt))
        if main_proc:
            print(f"resumed from {ckpt} at step {start_step}")

    # batches already drawn by this process: the data streams continue where they stopped
    batches = build.build_batches(
        recipe,
        readers,
        accelerator.process_index,
        accelerator.num_processes,
        start_batch=start_step * t.grad_accum,
    )

    def on_checkpoint(folder: Path, step: int) -> None:
        unwrapped = accelerator.unwrap_model(net)
        export_model(folder, unwrapped.segmenter, unwrapped.table, model_args, vocab, step)

    step, bad_steps = train(
        accelerator, net, ca, optimizer, scheduler, batches, recipe.data, source_rows,
        recipe.loss, t, recipe.schedule.steps, recipe.optim.grad_clip, run_dir,
        start_step=start_step, bad_steps_total=bad_steps, on_checkpoint=on_checkpoint,
        writer=writer,
    )  # fmt: skip
    if main_proc:
        writer.close()
        if step >= recipe.schedule.steps:
            unwrapped = accelerator.unwrap_model(net)
            export_model(run_dir, unwrapped.segmenter, unwrapped.table, model_args, vocab, step)
            print(f"done: {run_dir / 'model.pt'} ({bad_steps} steps skipped for NaN/inf)")
        else:
            print(f"stopped at step {step} of {recipe.schedule.steps}: run again to resume")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return {"accelerator": accelerator, "net": net, "ca": ca, "vocab": vocab, "step": step,
            "bad_steps": bad_steps}  # fmt: skip


if __name__ == "__main__":
    try:
        main()
    except FileNotFoundError as err:  # a missing dataset, recipe or checkpoint: say which
        raise SystemExit(f"error: {err}") from err
