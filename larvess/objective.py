"""The objective: each source's loss terms, weighted and summed (ESS + LarvSeg).

Each source scores against its own rows (``Source.rows``: LarvSeg's ``cls_emb[cls_index]``, or
the whole table with ``loss.negatives: all``), through one rule: ``mu[rows]`` and labels mapped
to local ids by ``Source.index``. Every loss receives that restricted table; the CA-Classifier
also receives ``rows`` to find its memory rings. Pure: nothing here changes state; the CA rows
a micro-batch would push come back in ``StepLosses.pushes``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from larvess.ca_classifier import CAClassifier
from larvess.config import LossConfig, SourceConfig
from larvess.losses import (
    LogitStandardizer,
    image_level_ce,
    knn_sampled_ce,
    label_pairs,
    margin_regularizer,
)
from larvess.model import upsample_embeddings
from larvess.pc2seg import pixel_contrastive_loss
from larvess.tree import VocabTree
from larvess.tree_labels import (
    SourceTree,
    pixel_barred,
    rows_with_covering,
    source_tree,
    tree_pairs,
)

__all__ = ["Source", "make_sources", "prepare_batch", "source_shares", "local_index", "StepLosses",
           "compute_losses", "cat_pushes", "subsample_labels"]  # fmt: skip


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


@dataclass(frozen=True)
class Source:
    """A training source as the step sees it.

    cfg: its recipe section. rows [R]: the vocabulary rows its losses score against (its own
    classes with ``loss.negatives: source``, LarvSeg's ``cls_emb[cls_index]``, plus with the
    tree the rows covering them; every row with ``all``). index [C+1]: vocabulary row -> local
    id into rows (-1 outside; -1 stays -1), on the device, and index_host, the same on the host.
    share: its weight in the total (``source_shares``). tree: the tree in local ids (None =
    flat); pixel_barred: a mask source's (group, mask) of rows never a target's negatives.
    """

    cfg: SourceConfig
    rows: Tensor
    index: Tensor
    share: float
    index_host: Tensor | None = None
    tree: SourceTree | None = None
    pixel_barred: tuple[Tensor, Tensor] | None = None


def make_sources(
    cfgs: list[SourceConfig],
    source_rows: list[Tensor],
    num_classes: int,
    lo: LossConfig,
    device: torch.device | str = "cpu",
    tree: VocabTree | None = None,
) -> list[Source]:
    """One Source per recipe source; source_rows: each source's own vocabulary rows; tree:
    the vocabulary's tree, needed with ``lo.hierarchy == "tree"``."""
    if lo.hierarchy == "tree" and tree is None:
        raise ValueError("loss.hierarchy=tree needs the vocabulary's tree (Vocabulary.tree())")
    shares = source_shares(cfgs, lo.combine)
    out = []
    for cfg, own, share in zip(cfgs, source_rows, shares):
        rows = own if lo.negatives == "source" else torch.arange(num_classes)
        st = pixel = None
        if lo.hierarchy == "tree":
            if cfg.supervision == "image" and lo.negatives == "source":
                rows = rows_with_covering(tree, rows)
            st = source_tree(tree, rows)
            if cfg.supervision == "mask" and st.has_relations():
                group, mask = pixel_barred(st, local_index(rows, num_classes)[own])
                pixel = (group.to(device), mask.to(device))
        index = local_index(rows, num_classes)
        out.append(Source(cfg, rows.to(device), index.to(device), share, index, st, pixel))
    return out


def prepare_batch(src: Source, batch: dict) -> dict:
    """Host side of a source's batch, before it goes to the device: image labels become
    ``pairs``, LabelPairs in the source's local ids (expanded up the tree with it), built from
    the readers' host tensors so the loss path never asks the device for a value."""
    if src.cfg.supervision != "image" or "labels" not in batch:
        return batch
    index = src.index_host if src.index_host is not None else src.index.cpu()
    local = [index[L.reshape(-1).long().cpu()] for L in batch["labels"]]
    pairs = tree_pairs(local, src.tree) if src.tree is not None else label_pairs(local, "cpu")
    return {**batch, "pairs": pairs}


@dataclass
class StepLosses:
    """What the loss phase of one micro-batch hands to the rest of the step: the weighted terms
    ('total' is their sum) and the CA pushes it would make, (slots [P,d], classes [P])."""

    terms: dict[str, Tensor]
    pushes: tuple[Tensor, Tensor] | None = None


def compute_losses(
    xs: list[Tensor],
    mu: Tensor,
    batches: list[dict],
    sources: list[Source],
    lo: LossConfig,
    ca: CAClassifier | None = None,
    views: list[Tensor | None] | None = None,
    margin_nearest: Tensor | None = None,
    logit_norm: LogitStandardizer | None = None,
) -> StepLosses:
    """Weighted loss terms of one micro-batch (pure: nothing is changed, the CA bank included).

    xs: per source x [B,d,h,w] at the feature grid; mu: [C,d] unit rows; batches: per source
    its batch ("label" [B,H,W] rows for masks, "labels" B LongTensors of rows otherwise);
    views: per source the second view's embeddings for the PC2 term (None where absent);
    margin_nearest: the nearest other row of each row from a recent search (None = search
    now); logit_norm: LarvSeg's standardisation of the pixel CE's logits (statistics over the
    source's rows).
    """
    terms: dict[str, Tensor] = {}
    pushes = []
    views = views or [None] * len(sources)
    for x, batch, src, x2 in zip(xs, batches, sources, views):
        cfg, mu_s = src.cfg, mu[src.rows]  # gradients flow back to the gathered rows
        if cfg.supervision == "mask":
            target = src.index[subsample_labels(batch["label"], lo.label_stride)]
            x_up = upsample_embeddings(x, target.shape[-2:])
            grid = x if lo.share_negatives else None
            barred = src.pixel_barred
            seg = knn_sampled_ce(
                x_up, target, mu_s, lo.k, lo.scale, ignore_index=-1,
                grid=grid if barred is None else None, backend=lo.knn_backend,
                logit_norm=logit_norm, barred=barred,
            )  # fmt: skip
            terms[f"seg/{cfg.name}"] = src.share * cfg.seg_weight * seg
            continue
        if "pairs" in batch:  # prepare_batch ran on the host
            pairs = batch["pairs"]
        else:
            pairs = label_pairs(batch["labels"], x.device).to_local(src.index)
        if cfg.cls_weight > 0:
            cls = image_level_ce(x, pairs, mu_s, lo.scale, k=lo.cls_k, backend=lo.knn_backend)
            terms[f"cls/{cfg.name}"] = src.share * cfg.cls_weight * cls
        if cfg.ca_weight > 0 and ca is not None:
            ca_loss = ca.loss(
                x, pairs, mu_s, lo.scale, k=lo.cls_k, bg_threshold=cfg.bg_threshold,
                rows=src.rows, bg_mse_threshold=cfg.bg_mse_threshold,
            )  # fmt: skip
            terms[f"ca/{cfg.name}"] = src.share * cfg.ca_weight * ca_loss
            pushes.append(ca.pending(x, pairs, mu_s, rows=src.rows))
        if lo.pc2_weight > 0 and x2 is not None:
            pc2 = pixel_contrastive_loss(x, x2, num_negatives=lo.pc2_negatives, tau=lo.pc2_tau)
            terms[f"pc2/{cfg.name}"] = src.share * lo.pc2_weight * pc2
    if lo.margin_weight > 0:
        reg = margin_regularizer(mu, lo.margin, lo.knn_backend, nearest=margin_nearest)
        terms["margin"] = lo.margin_weight * reg
    terms["total"] = sum(terms.values())
    return StepLosses(terms, cat_pushes(pushes))


def cat_pushes(pushes: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor] | None:
    if not pushes:
        return None
    return torch.cat([p[0] for p in pushes]), torch.cat([p[1] for p in pushes])


def subsample_labels(label: torch.Tensor, stride: int) -> torch.Tensor:
    """[B,H,W] -> [B,H',W'] with H' = ceil((H - stride // 2) / stride): the label at each
    cell's centre pixel (nearest sampling never mixes classes or ignore into a new value)."""
    if stride == 1:
        return label
    o = stride // 2
    return label[:, o::stride, o::stride]
