"""The train loop and the loss composition: one batch per source per step, ESS + LarvSeg terms.

Everything arrives built (accelerator, model, optimiser, batches, CA bank) with the recipe's
loss and train sections; nothing here reads a whole recipe. Checkpoint files: checkpoint.py.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn as nn
from torch import Tensor
from tqdm import tqdm

from larvess.ca_classifier import CAClassifier
from larvess.checkpoint import save_checkpoint
from larvess.config import LossConfig, SourceConfig, TrainConfig
from larvess.data.transforms import photometric_view
from larvess.losses import (
    LogitStandardizer,
    image_level_ce,
    knn_sampled_ce,
    margin_regularizer,
    nearest_rows,
)
from larvess.model import ClassTable, Segmenter, upsample_embeddings
from larvess.pc2seg import pixel_contrastive_loss


class Net(nn.Module):
    """Segmenter + class table (+ LarvSeg's logit standardiser, when used) as one module, so
    DDP sees a single forward per step and syncs every trained parameter.

    DDP forbids two forwards before one backward, so every source's forward happens inside this
    one call. Sources of one crop size share a single backbone call: larger matrix products (the
    toy's 8 + 4 + 4 images at 96 px: fwd+bwd 150 ms instead of 205 ms on 2 cores, one launch
    per kernel on a GPU). The conv stem's BatchNorm then normalises over that whole group.
    """

    def __init__(
        self, segmenter: Segmenter, table: ClassTable, logit_norm: LogitStandardizer | None = None
    ):
        super().__init__()
        self.segmenter = segmenter
        self.table = table
        self.logit_norm = logit_norm

    def forward(self, images: list[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
        """images: list of [B_i,3,H_i,W_i] -> (list of x [B_i,d,h_i,w_i], mu [C,d])."""
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, im in enumerate(images):
            groups.setdefault(tuple(im.shape[1:]), []).append(i)
        xs: list = [None] * len(images)
        for members in groups.values():
            sizes = [images[i].shape[0] for i in members]
            x = self.segmenter(torch.cat([images[i] for i in members]))
            for i, part in zip(members, x.split(sizes)):
                xs[i] = part
        return xs, self.table()


def source_shares(sources: list[SourceConfig], combine: str) -> list[float]:
    """Weight of each source's loss in the total.

    "batch_mean" is LarvSeg's objective: one dataset per GPU group and DDP's gradient average
    weigh each dataset's loss by its share of the GPUs = its share of the global batch (C171 :
    WA : IN on 3 : 3 : 2 GPUs -> 3/8 : 3/8 : 2/8). "sum" adds the per-source losses.
    """
    if combine == "sum":
        return [1.0] * len(sources)
    total = sum(s.batch_size for s in sources)
    return [s.batch_size / total for s in sources]


def local_index(rows: Tensor, num_classes: int) -> Tensor:
    """LongTensor [num_classes + 1]: vocabulary row -> its index into ``rows`` (a source's own
    label space), -1 for rows outside it; the last entry is -1, so label -1 maps to -1."""
    index = torch.full((num_classes + 1,), -1, dtype=torch.long, device=rows.device)
    index[rows] = torch.arange(len(rows), device=rows.device)
    return index


def to_local(index: Tensor, labels: Tensor) -> Tensor:
    """Vocabulary rows (-1 = ignore) -> local ids (-1 stays -1) with a ``local_index``."""
    return index[labels]


def compute_losses(
    xs: list[Tensor],
    mu: Tensor,
    batches: list[dict],
    sources: list[SourceConfig],
    source_rows: list[Tensor],
    ca: CAClassifier | None,
    lo: LossConfig,
    views: list[Tensor | None] | None = None,
    margin_nearest: Tensor | None = None,
    logit_norm: LogitStandardizer | None = None,
) -> dict[str, Tensor]:
    """Weighted loss terms of one step; 'total' is their sum.

    xs: per source x [B,d,h,w] at the feature grid; mu: [C,d] unit rows; source_rows: per
    source LongTensor of its vocabulary rows (negatives come from them with
    lo.negatives == "source", LarvSeg's ``cls_emb[cls_index]``); views: per source the second
    view's embeddings for the PC2 term (None where absent); margin_nearest: the nearest other
    row of each row from a recent search (None = search now); logit_norm: LarvSeg's
    standardisation of the pixel CE's logits (statistics over the candidate rows mu_s).
    """
    terms: dict[str, Tensor] = {}
    shares = source_shares(sources, lo.combine)
    views = views or [None] * len(sources)
    own = lo.negatives == "source"
    for x, batch, src, rows, share, x2 in zip(xs, batches, sources, source_rows, shares, views):
        mu_s = mu[rows] if own else mu  # gradients flow back to the gathered rows
        index = local_index(rows, mu.shape[0]) if own else None
        if src.supervision == "mask":
            target = subsample_labels(batch["label"], lo.label_stride)
            target = to_local(index, target) if own else target
            x_up = upsample_embeddings(x, target.shape[-2:])
            grid = x if lo.share_negatives else None
            seg = knn_sampled_ce(
                x_up, target, mu_s, lo.k, lo.scale, ignore_index=-1, grid=grid,
                backend=lo.knn_backend, logit_norm=logit_norm,
            )  # fmt: skip
            terms[f"seg/{src.name}"] = share * src.seg_weight * seg
            continue
        labels = batch["labels"]
        if src.cls_weight > 0:
            local = [to_local(index, L) for L in labels] if own else labels
            cls = image_level_ce(x, local, mu_s, lo.scale, k=lo.cls_k, backend=lo.knn_backend)
            terms[f"cls/{src.name}"] = share * src.cls_weight * cls
        if src.ca_weight > 0 and ca is not None:
            ca_loss = ca.loss(
                x, labels, mu, lo.scale, k=lo.cls_k, bg_threshold=src.bg_threshold,
                bg_mse_threshold=src.bg_mse_threshold, candidates=rows if own else None,
            )  # fmt: skip
            terms[f"ca/{src.name}"] = share * src.ca_weight * ca_loss
        if lo.pc2_weight > 0 and x2 is not None:
            pc2 = pixel_contrastive_loss(x, x2, num_negatives=lo.pc2_negatives, tau=lo.pc2_tau)
            terms[f"pc2/{src.name}"] = share * lo.pc2_weight * pc2
    if lo.margin_weight > 0:
        reg = margin_regularizer(mu, lo.margin, lo.knn_backend, nearest=margin_nearest)
        terms["margin"] = lo.margin_weight * reg
    terms["total"] = sum(terms.values())
    return terms


def subsample_labels(label: torch.Tensor, stride: int) -> torch.Tensor:
    """[B,H,W] -> [B,H',W'] with H' = ceil((H - stride // 2) / stride): the label at each
    cell's centre pixel (nearest sampling never mixes classes or ignore into a new value)."""
    if stride == 1:
        return label
    o = stride // 2
    return label[:, o::stride, o::stride]


class TooManyBadSteps(RuntimeError):
    pass


def train(
    accelerator,
    net: nn.Module,
    ca: CAClassifier | None,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    batches: Iterator[dict[str, dict]],
    sources: list[SourceConfig],
    source_rows: list[Tensor],
    lo: LossConfig,
    tc: TrainConfig,
    steps: int,
    grad_clip: float,
    run_dir: Path,
    start_step: int = 0,
    bad_steps_total: int = 0,
    on_checkpoint=None,
    writer=None,
) -> tuple[int, int]:
    """Run optimiser steps start_step..steps-1 (fewer with tc.stop_after); returns (the step
    reached, the number of steps skipped for a NaN/inf loss so far).

    on_checkpoint(folder, step) lets the caller add files (model export, vocabulary) to a
    checkpoint before it is marked complete.
    """
    device = accelerator.device
    main = accelerator.is_main_process
    bar = tqdm(total=steps, initial=start_step, disable=not main, desc="train", unit="step")
    consecutive_bad, t_last, seen = 0, time.time(), 0
    t_start, eta_at = time.time(), start_step + min(20, max(1, (steps - start_step) // 10))
    rows = [r.to(device) for r in source_rows]
    pc2 = [lo.pc2_weight > 0 and s.supervision == "image" for s in sources]
    nearest = None  # L_r's nearest rows, searched every lo.margin_refresh steps
    logit_norm = accelerator.unwrap_model(net).logit_norm
    net.train()
    end = steps if tc.stop_after <= 0 else min(steps, start_step + tc.stop_after)
    for step in range(start_step, end):
        optimizer.zero_grad(set_to_none=True)
        bad = False
        if lo.margin_weight > 0 and (nearest is None or step % lo.margin_refresh == 0):
            with torch.no_grad():
                nearest = nearest_rows(accelerator.unwrap_model(net).table(), lo.knn_backend)
        for micro in range(tc.grad_accum):
            # -- data: one batch of every source; PC2 adds a photometric second view
            step_batch = next(batches)
            batch_list = [_to_device(step_batch[s.name], device) for s in sources]
            seen += sum(b["image"].shape[0] for b in batch_list)
            images = [b["image"] for b in batch_list]
            images += [photometric_view(b["image"]) for b, on in zip(batch_list, pc2) if on]
            last = micro == tc.grad_accum - 1
            ctx = accelerator.no_sync(net) if not last else nullcontext()
            # -- forward under autocast; the loss math itself runs in fp32 (losses.py)
            with ctx, accelerator.autocast():
                xs, mu = net(images)
                it = iter(xs[len(sources) :])
                views = [next(it).float() if on else None for on in pc2]
                terms = compute_losses(
                    [x.float() for x in xs[: len(sources)]], mu.float(), batch_list, sources,
                    rows, ca, lo, views, nearest, logit_norm,
                )  # fmt: skip
            # -- every process must agree to skip, or DDP's gradient all-reduce would hang
            if not _all_finite(accelerator, terms["total"]):
                bad = True
                break
            with ctx:
                accelerator.backward(terms["total"] / tc.grad_accum)
        # -- optimiser step (or a counted skip)
        if not bad:
            max_norm = grad_clip if grad_clip > 0 else float("inf")
            norm = accelerator.clip_grad_norm_(net.parameters(), max_norm)
            bad = not _all_finite(accelerator, torch.as_tensor(norm, device=device))
        if bad:
            optimizer.zero_grad(set_to_none=True)
            consecutive_bad += 1
            bad_steps_total += 1
            if main and writer is not None:
                writer.add_scalar("train/bad_steps", bad_steps_total, step)
            if consecutive_bad >= tc.max_bad_steps:
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
        if main and done == eta_at and done < steps:  # one early line, for logs without the bar
            per_step = (time.time() - t_start) / (done - start_step)
            bar.write(f"step {done}/{steps}: {per_step:.2f} s/step, about "
                      f"{per_step * (steps - done) / 60:.1f} min of training left")  # fmt: skip
        # -- logging (main process only)
        if main and (done % tc.log_every == 0 or done == steps):
            rate = seen * accelerator.num_processes / max(1e-9, time.time() - t_last)
            t_last, seen = time.time(), 0
            logs = {k: float(v.detach()) for k, v in terms.items()} if not bad else {}
            lr = optimizer.param_groups[0]["lr"]
            bar.set_postfix(loss=f"{logs.get('total', float('nan')):.3f}", lr=f"{lr:.2e}",
                            img_s=f"{rate:.0f}")  # fmt: skip
            if writer is not None:
                for k, v in logs.items():
                    writer.add_scalar(f"loss/{k}", v, done)
                for i, g in enumerate(optimizer.param_groups):
                    writer.add_scalar(f"lr/{g.get('name', i)}", g["lr"], done)
                writer.add_scalar("speed/images_per_s", rate, done)
                writer.add_scalar("memory/gb", _memory_gb(device), done)
        # -- checkpoint (every process takes part in save_state)
        if done % tc.ckpt_every == 0 or done == end:
            save_checkpoint(
                accelerator, run_dir, done, bad_steps_total, tc.keep_ckpts, on_checkpoint
            )
    bar.close()
    return max(start_step, end), bad_steps_total


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
