"""The train loop: one batch per source per step, weighted ESS + LarvSeg losses, checkpoints.

Everything arrives built (accelerator, model, optimiser, batches); nothing here reads a recipe.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from tqdm import tqdm

from larvess.ca_classifier import CAClassifier
from larvess.losses import image_level_ce, knn_sampled_ce, margin_regularizer
from larvess.model import ClassTable, Segmenter, upsample_embeddings

STATE_FILE = "trainer_state.json"


class Net(nn.Module):
    """Segmenter + class table as one module, so DDP sees a single forward per step.

    DDP forbids two forwards before one backward; each source has its own crop size, so the
    per-source forwards happen inside this one call.
    """

    def __init__(self, segmenter: Segmenter, table: ClassTable):
        super().__init__()
        self.segmenter = segmenter
        self.table = table

    def forward(self, images: list[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
        """images: list of [B_i,3,H_i,W_i] -> (list of x [B_i,d,h_i,w_i], mu [C,d])."""
        return [self.segmenter(im) for im in images], self.table()


@dataclass
class SourceLoss:
    """How one source's batch becomes loss terms (weights 0 switch a term off)."""

    name: str
    supervision: str  # "mask" | "image"
    seg_weight: float = 1.0
    cls_weight: float = 0.0
    ca_weight: float = 0.0
    bg_threshold: float = 0.2


@dataclass
class LossParams:
    k: int = 8
    scale: float = 40.0
    share_negatives: bool = False
    margin: float = 0.2
    margin_weight: float = 1.0
    cls_k: int | None = None
    label_stride: int = 1


def compute_losses(
    xs: list[torch.Tensor],
    mu: torch.Tensor,
    batches: list[dict],
    sources: list[SourceLoss],
    ca: CAClassifier | None,
    p: LossParams,
) -> dict[str, torch.Tensor]:
    """Weighted loss terms of one step; 'total' is their sum.

    xs: per source [B,d,h,w] embeddings at the feature grid; mu: [C,d] normalised rows.
    """
    terms: dict[str, torch.Tensor] = {}
    for x, batch, src in zip(xs, batches, sources):
        if src.supervision == "mask":
            target = subsample_labels(batch["label"], p.label_stride)
            x_up = upsample_embeddings(x, target.shape[-2:])
            grid = x if p.share_negatives else None
            seg = knn_sampled_ce(x_up, target, mu, p.k, p.scale, ignore_index=-1, grid=grid)
            terms[f"seg/{src.name}"] = src.seg_weight * seg
        else:
            labels = batch["labels"]
            if src.cls_weight > 0:
                cls = image_level_ce(x, labels, mu, p.scale, k=p.cls_k)
                terms[f"cls/{src.name}"] = src.cls_weight * cls
            if src.ca_weight > 0 and ca is not None:
                ca_loss = ca.loss(x, labels, mu, p.scale, bg_threshold=src.bg_threshold)
                terms[f"ca/{src.name}"] = src.ca_weight * ca_loss
    if p.margin_weight > 0:
        terms["margin"] = p.margin_weight * margin_regularizer(mu, p.margin)
    terms["total"] = sum(terms.values())
    return terms


def subsample_labels(label: torch.Tensor, stride: int) -> torch.Tensor:
    """[B,H,W] -> [B,H',W'] with H' = ceil((H - stride // 2) / stride): the label at each
    cell's centre pixel (nearest sampling never mixes classes or ignore into a new value)."""
    if stride == 1:
        return label
    o = stride // 2
    return label[:, o::stride, o::stride]


def poly_factor(step: int, total: int, power: float, warmup: int, base_lr: float, min_lr: float):
    """Multiplier on base_lr: linear warm-up, then poly decay to the floor min_lr."""
    if step < warmup:
        return (step + 1) / warmup
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    lr = (base_lr - min_lr) * (1 - frac) ** power + min_lr
    return lr / base_lr


def find_resume(run_dir: Path) -> Path | None:
    """Newest complete checkpoint (its state file is written last) or None."""
    done = [p.parent for p in (run_dir / "checkpoints").glob(f"step_*/{STATE_FILE}")]
    return max(done, key=lambda p: int(p.name.split("_")[1])) if done else None


def read_state(ckpt: Path) -> dict:
    return json.loads((ckpt / STATE_FILE).read_text())


@dataclass
class LoopParams:
    steps: int
    grad_accum: int = 1
    grad_clip: float = 0.0
    log_every: int = 20
    ckpt_every: int = 2000
    keep_ckpts: int = 3
    max_bad_steps: int = 20
    stop_after: int = 0  # >0: stop (with a checkpoint) after this many steps of this call


class TooManyBadSteps(RuntimeError):
    pass


def train(
    accelerator,
    net: nn.Module,
    ca: CAClassifier | None,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    batches: Iterator[dict[str, dict]],
    sources: list[SourceLoss],
    loss_params: LossParams,
    loop: LoopParams,
    run_dir: Path,
    start_step: int = 0,
    bad_steps_total: int = 0,
    on_checkpoint=None,
    writer=None,
) -> tuple[int, int]:
    """Run optimiser steps start_step..loop.steps-1 (fewer with stop_after); returns (the step
    reached, the number of steps skipped for a NaN/inf loss so far).

    on_checkpoint(folder, step) lets the caller add files (model export, vocabulary) to a
    checkpoint before it is marked complete.
    """
    device = accelerator.device
    main = accelerator.is_main_process
    bar = tqdm(total=loop.steps, initial=start_step, disable=not main, desc="train", unit="step")
    consecutive_bad, t_last, seen = 0, time.time(), 0
    net.train()
    end = loop.steps if loop.stop_after <= 0 else min(loop.steps, start_step + loop.stop_after)
    for step in range(start_step, end):
        optimizer.zero_grad(set_to_none=True)
        bad = False
        for micro in range(loop.grad_accum):
            step_batch = next(batches)
            batch_list = [_to_device(step_batch[s.name], device) for s in sources]
            seen += sum(b["image"].shape[0] for b in batch_list)
            last = micro == loop.grad_accum - 1
            ctx = accelerator.no_sync(net) if not last else nullcontext()
            with ctx, accelerator.autocast():
                xs, mu = net([b["image"] for b in batch_list])
                terms = compute_losses(
                    [x.float() for x in xs], mu.float(), batch_list, sources, ca, loss_params
                )
            # Every process must agree to skip, or DDP's gradient all-reduce would hang.
            if not _all_finite(accelerator, terms["total"]):
                bad = True
                break
            with ctx:
                accelerator.backward(terms["total"] / loop.grad_accum)
        if not bad:
            max_norm = loop.grad_clip if loop.grad_clip > 0 else float("inf")
            norm = accelerator.clip_grad_norm_(net.parameters(), max_norm)
            bad = not _all_finite(accelerator, torch.as_tensor(norm, device=device))
        if bad:
            optimizer.zero_grad(set_to_none=True)
            consecutive_bad += 1
            bad_steps_total += 1
            if main and writer is not None:
                writer.add_scalar("train/bad_steps", bad_steps_total, step)
            if consecutive_bad >= loop.max_bad_steps:
                raise TooManyBadSteps(
                    f"{consecutive_bad} consecutive steps had a NaN/inf loss or gradient "
                    f"(last at step {step}); lower optim.lr or enable optim.grad_clip"
                )
        else:
            consecutive_bad = 0
            optimizer.step()
        scheduler.step()
        done = step + 1
        bar.update(1)
        if main and (done % loop.log_every == 0 or done == loop.steps):
            rate = seen * accelerator.num_processes / max(1e-9, time.time() - t_last)
            t_last, seen = time.time(), 0
            logs = {k: float(v.detach()) for k, v in terms.items()} if not bad else {}
            lr = optimizer.param_groups[0]["lr"]
            bar.set_postfix(loss=f"{logs.get('total', float('nan')):.3f}", lr=f"{lr:.2e}")
            if writer is not None:
                for k, v in logs.items():
                    writer.add_scalar(f"loss/{k}", v, done)
                for i, g in enumerate(optimizer.param_groups):
                    writer.add_scalar(f"lr/{g.get('name', i)}", g["lr"], done)
                writer.add_scalar("speed/images_per_s", rate, done)
                writer.add_scalar("memory/gb", _memory_gb(device), done)
        if done % loop.ckpt_every == 0 or done == end:
            save_checkpoint(
                accelerator, run_dir, done, bad_steps_total, loop.keep_ckpts, on_checkpoint
            )
    bar.close()
    return max(start_step, end), bad_steps_total


def save_checkpoint(
    accelerator, run_dir: Path, step: int, bad_steps: int, keep: int, on_checkpoint
):
    """accelerate save_state into a temp folder, renamed when complete; keeps the newest `keep`."""
    ckpt_root = run_dir / "checkpoints"
    final = ckpt_root / f"step_{step:08d}"
    tmp = ckpt_root / f".tmp_step_{step:08d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if on_checkpoint is not None:
            on_checkpoint(tmp, step)
        (tmp / STATE_FILE).write_text(json.dumps({"step": step, "bad_steps": bad_steps}))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        done = sorted(p for p in ckpt_root.glob("step_*") if (p / STATE_FILE).is_file())
        for old in done[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def _all_finite(accelerator, value: torch.Tensor) -> bool:
    flag = torch.tensor([0.0 if torch.isfinite(value.detach()).all() else 1.0], device=value.device)
    return float(accelerator.reduce(flag, reduction="sum")) == 0


def _to_device(batch: dict, device) -> dict:
    out = {}
    for k, v in batch.items():
        if torch.is_tensor(v):
            out[k] = v.to(device, non_blocking=True)
        elif isinstance(v, list) and v and torch.is_tensor(v[0]):
            out[k] = [t.to(device, non_blocking=True) for t in v]
        else:
            out[k] = v
    return out


def _memory_gb(device) -> float:
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def lr_lambda(total: int, power: float, warmup: int, base_lr: float, min_lr: float):
    return lambda step: poly_factor(step, total, power, warmup, base_lr, min_lr)
