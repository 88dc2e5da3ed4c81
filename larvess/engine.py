"""The train loop: one batch per source per step; the loss composition is objective.py.

Everything arrives built (accelerator, model, optimiser, batches, CA bank, sources) with the
recipe's loss and train sections; nothing here reads a whole recipe. Checkpoints:
checkpoint.py.

One step, in phases:
1. data + forward + backward, per micro-batch. The losses are pure; the CA rows this step would
   push are collected, not pushed.
2. decide: one all-reduced flag says whether every loss, gradient norm and pending push is
   finite. Every process agrees, so DDP's collectives stay matched.
3. state: on an applied step the optimiser steps, the schedule steps and the CA bank takes the
   step's pushes (all micro-batches, in order). A skipped step restores the buffers the forward
   touched (BatchNorm statistics) and changes nothing else: it is counted, and its data is
   consumed.
4. logging and checkpoints.

Under gradient accumulation every micro-batch scores against the bank of the step's start: a
micro-batch never sees another one's pushes, so the step's loss does not depend on how it is
split. The host never waits on the device in phases 1 and 3 (apart from the bank's ring
arithmetic, a few calls a step): the one wait is phase 2's flag.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
from torch import Tensor
from tqdm import tqdm

from larvess.ca_classifier import CAClassifier
from larvess.checkpoint import save_checkpoint
from larvess.config import LossConfig, TrainConfig
from larvess.data.transforms import photometric_view
from larvess.losses import LabelPairs, LogitStandardizer, nearest_rows
from larvess.model import ClassTable, Segmenter
from larvess.objective import Source, cat_pushes, compute_losses, prepare_batch


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


class TooManyBadSteps(RuntimeError):
    pass


class TooMuchUnreadable(RuntimeError):
    pass


@dataclass
class TrainState:
    """What the loop counts, saved in every checkpoint's trainer_state.json."""

    step: int = 0
    bad_steps: int = 0  # steps skipped for a NaN/inf loss, gradient or CA push
    unreadable: int = 0  # samples (or unreadable shard remainders) the readers lost
    samples: int = 0  # samples drawn, all processes
    unreadable_shards: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return dict(self.__dict__, unreadable_shards=self.unreadable_shards[:100])

    @classmethod
    def from_json(cls, d: dict) -> TrainState:
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        return cls(**known)


def train(
    *,
    accelerator,
    net: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    batches: Iterator[dict[str, dict]],
    sources: list[Source],
    ca: CAClassifier | None,
    loss: LossConfig,
    train: TrainConfig,
    steps: int,
    grad_clip: float,
    run_dir: Path,
    state: TrainState | None = None,
    on_checkpoint: Callable[[Path, int], None] | None = None,
) -> TrainState:
    """Run optimiser steps state.step..steps-1 (fewer with train.stop_after); returns the
    state reached. Scalars go to ``accelerator.log`` (its trackers, main process only).

    on_checkpoint(folder, step) lets the caller add files (model export, vocabulary) to a
    checkpoint before it is marked complete.
    """
    lo, tc = loss, train
    state = state or TrainState()
    device, main = accelerator.device, accelerator.is_main_process
    start = state.step
    bar = tqdm(total=steps, initial=start, disable=not main, desc="train", unit="step")
    consecutive_bad, t_last, seen = 0, time.time(), 0
    t_start, eta_at = time.time(), start + min(20, max(1, (steps - start) // 10))
    pc2 = [lo.pc2_weight > 0 and s.cfg.supervision == "image" for s in sources]
    nearest = None  # L_r's nearest rows, searched every lo.margin_refresh steps
    model = accelerator.unwrap_model(net)
    touched = [b for m in model.modules() if _tracks_stats(m) for b in m.buffers()]
    net.train()
    end = steps if tc.stop_after <= 0 else min(steps, start + tc.stop_after)
    for step in range(start, end):
        optimizer.zero_grad(set_to_none=True)
        if lo.margin_weight > 0 and (nearest is None or step % lo.margin_refresh == 0):
            with torch.no_grad():
                nearest = nearest_rows(model.table(), lo.knn_backend)
        saved = [b.clone() for b in touched]
        finite, pushes, totals, lost = [], [], [], 0
        # -- phase 1: data, forward, backward per micro-batch (pure losses)
        for micro in range(tc.grad_accum):
            step_batch = next(batches)
            # host side first (labels -> pairs, the tree's expansion), then to the device
            batch_list = [
                _to_device(prepare_batch(s, step_batch[s.cfg.name]), device) for s in sources
            ]
            n_img = sum(b["image"].shape[0] for b in batch_list)
            seen += n_img
            state.samples += n_img * accelerator.num_processes
            lost += _lost_in(state, step_batch)
            images = [b["image"] for b in batch_list]
            images += [photometric_view(b["image"]) for b, on in zip(batch_list, pc2) if on]
            ctx = accelerator.no_sync(net) if micro < tc.grad_accum - 1 else nullcontext()
            with ctx, accelerator.autocast():  # the loss math itself runs in fp32
                xs, mu = net(images)
                it = iter(xs[len(sources) :])
                views = [next(it).float() if on else None for on in pc2]
                out = compute_losses(
                    [x.float() for x in xs[: len(sources)]], mu.float(), batch_list, sources,
                    lo, ca=ca, views=views, margin_nearest=nearest, logit_norm=model.logit_norm,
                )  # fmt: skip
            with ctx:
                accelerator.backward(out.terms["total"] / tc.grad_accum)
            totals.append(out.terms["total"].detach())
            if out.pushes is not None:
                pushes.append(out.pushes)
                finite.append(torch.isfinite(out.pushes[0]).all())
        # -- phase 2: decide, on every process alike
        max_norm = grad_clip if grad_clip > 0 else float("inf")
        norm = accelerator.clip_grad_norm_(net.parameters(), max_norm)
        finite += [torch.isfinite(torch.stack(totals)).all(), torch.isfinite(norm)]
        ok, lost = _decide(accelerator, torch.stack(finite), lost)
        state.unreadable += lost  # every process's losses: all decide the same below
        # -- phase 3: state changes, on applied steps only
        if ok:
            consecutive_bad = 0
            optimizer.step()
            scheduler.step()
            if ca is not None:  # a collective: every process pushes (maybe nothing) each step
                ca.push(*(cat_pushes(pushes) or _no_push(ca.dim, device)))
        else:
            optimizer.zero_grad(set_to_none=True)
            for b, old in zip(touched, saved):
                b.copy_(old)
            consecutive_bad += 1
            state.bad_steps += 1
            if main:
                accelerator.log({"train/bad_steps": state.bad_steps}, step=step + 1)
            if consecutive_bad >= tc.max_bad_steps:
                raise TooManyBadSteps(
                    f"{consecutive_bad} consecutive steps had a NaN/inf loss or gradient "
                    f"(last at step {step}); lower optim.lr or enable optim.grad_clip"
                )
        state.step = done = step + 1
        bar.update(1)
        _check_unreadable(state, tc.max_unreadable)
        if main and done == eta_at and done < steps:  # one early line, for logs without the bar
            per_step = (time.time() - t_start) / (done - start)
            bar.write(f"step {done}/{steps}: {per_step:.2f} s/step, about "
                      f"{per_step * (steps - done) / 60:.1f} min of training left")  # fmt: skip
        # -- phase 4: logging (main process only) and checkpoints
        if main and (done % tc.log_every == 0 or done == steps):
            rate = seen * accelerator.num_processes / max(1e-9, time.time() - t_last)
            t_last, seen = time.time(), 0
            names = list(out.terms) if ok else []
            values = torch.stack([out.terms[k].detach() for k in names]).tolist() if ok else []
            logs = {f"loss/{k}": v for k, v in zip(names, values)}
            lr = optimizer.param_groups[0]["lr"]
            bar.set_postfix(loss=f"{logs.get('loss/total', float('nan')):.3f}", lr=f"{lr:.2e}",
                            img_s=f"{rate:.0f}")  # fmt: skip
            logs |= {
                f"lr/{g.get('name', i)}": g["lr"] for i, g in enumerate(optimizer.param_groups)
            }
            logs |= {"speed/images_per_s": rate, "memory/gb": _memory_gb(device),
                     "data/unreadable": state.unreadable}  # fmt: skip
            accelerator.log(logs, step=done)
        if done % tc.ckpt_every == 0 or done == end:
            save_checkpoint(accelerator, run_dir, done, state.to_json(), tc.keep_ckpts,
                            on_checkpoint)  # fmt: skip
    bar.close()
    return state


def _tracks_stats(m: nn.Module) -> bool:
    """Modules whose forward changes buffers (BatchNorm's running statistics)."""
    return isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats


def _no_push(dim: int, device) -> tuple[Tensor, Tensor]:
    return torch.zeros(0, dim, device=device), torch.zeros(0, dtype=torch.long, device=device)


def _lost_in(state: TrainState, step_batch: dict[str, dict]) -> int:
    """Samples this process's readers report lost since their last batch (host ints from
    collate); their shard names join the state (this process's only)."""
    lost = 0
    for batch in step_batch.values():
        lost += int(batch.get("lost", 0))
        for name in batch.get("lost_shards", ()):
            if name not in state.unreadable_shards:
                state.unreadable_shards.append(name)
    return lost


def _check_unreadable(state: TrainState, max_fraction: float) -> None:
    total = state.samples + state.unreadable
    if state.unreadable and state.unreadable > max_fraction * total:
        shards = ", ".join(state.unreadable_shards[:10]) or "unknown shards"
        raise TooMuchUnreadable(
            f"{state.unreadable} of {total} samples were unreadable (more than "
            f"train.max_unreadable = {max_fraction:g} of them), in: {shards}; re-shard or "
            "replace those files, or raise train.max_unreadable"
        )


def _decide(accelerator, flags: Tensor, lost: int) -> tuple[bool, int]:
    """(whether every flag is true on every process, the samples lost on all processes this
    step): one reduce, the step's one wait on the device."""
    lost_t = torch.tensor(float(lost), device=flags.device)
    both = torch.stack([(~flags.bool()).sum().float(), lost_t])
    bad, lost_all = accelerator.reduce(both, reduction="sum").tolist()
    return bad == 0, int(lost_all)


def _to_device(batch: dict, device) -> dict:
    out = {}
    for k, v in batch.items():
        if torch.is_tensor(v):
            out[k] = v.to(device, non_blocking=True)
        elif isinstance(v, LabelPairs):
            out[k] = v.to(device)
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
