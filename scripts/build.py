"""Recipe -> objects: the one place where a Recipe becomes datasets, model and optimiser.

The library modules take plain arguments; this file reads the recipe fields and passes them on.
Shared by scripts/train.py and the tests that drive training.
"""

from __future__ import annotations

from pathlib import Path

import torch

from larvess.config import Recipe
from larvess.data.ade import AdeTrain
from larvess.data.coco_stuff import CocoStuff
from larvess.data.imagenet_wds import ImageNetShards
from larvess.data.mixing import MixedBatches, source_loader
from larvess.data.transforms import TrainAugment
from larvess.engine import LoopParams, LossParams, SourceLoss, lr_lambda
from larvess.model import ClassTable, Segmenter
from larvess.vocab import Vocabulary, read_names_file, read_synset_lemmas


def timm_lemma_file() -> Path:
    """WordNet lemmas of the ImageNet-21K synsets, as shipped inside timm (no download)."""
    import timm.data

    return Path(timm.data.__file__).parent / "_info" / "imagenet_synset_to_lemma.txt"


def build_data(recipe: Recipe) -> tuple[Vocabulary, dict[str, object], list[SourceLoss]]:
    """Unified vocabulary, one dataset per source (labels as vocabulary rows), loss settings.

    Mask sources join the vocabulary first, so their classes get the low rows and ``has_masks``;
    image-level sources then merge into them by WordNet id or synonym. Each reader is built
    first (it knows its class list) and given its row mapping afterwards.
    """
    datasets = {}
    for s in recipe.data:
        files = {"skip_missing": s.skip_missing} | ({"split": s.split} if s.split else {})
        jitter = dict(ratio_range=tuple(s.scale_range), photometric=s.photometric)
        if s.kind == "coco_stuff":
            aug = TrainAugment(crop_size=s.crop_size, **jitter)
            datasets[s.name] = CocoStuff(s.root, transform=aug, from_json=s.from_json, **files)
        elif s.kind in ("ade150", "ade847", "wa150", "wa847"):
            weak = s.supervision == "image"
            datasets[s.name] = AdeTrain(
                s.root,
                full=s.kind.endswith("847"),
                weak=weak,
                names_file=s.names,
                transform=TrainAugment(crop_size=s.crop_size, pad=not weak, **jitter),
                **files,
            )
        else:  # imagenet_wds: class list = the shards' synsets (info.json)
            aug = TrainAugment(crop_size=s.crop_size, pad=False, **jitter)
            datasets[s.name] = ImageNetShards(
                s.root, transform=aug
            )  # unreadable files: skipped when sharding

    vocab = Vocabulary(alias_file=recipe.vocab.alias_file)
    for s in sorted(recipe.data, key=lambda s: s.supervision != "mask"):
        ds = datasets[s.name]
        if s.kind == "imagenet_wds":
            lemma_file = s.names or timm_lemma_file()
            lemmas = read_synset_lemmas(lemma_file)
            missing = [w for w in ds.synsets if w not in lemmas]
            if missing:
                raise ValueError(
                    f"{lemma_file}: no lemma for {len(missing)} synsets of source "
                    f"'{s.name}' ({s.root}), e.g. {missing[:5]}"
                )
            names = [lemmas[w] for w in ds.synsets]
            ds.rows = vocab.add_source(s.name, names, ds.synsets, has_masks=False)
        else:
            has_masks = s.supervision == "mask"
            ds.rows = vocab.add_source(s.name, ds.class_names, None, has_masks=has_masks)
    for path in recipe.vocab.extra_names:
        vocab.add_source(f"extra:{Path(path).name}", read_names_file(path), None, has_masks=False)

    sources = [
        SourceLoss(
            s.name,
            s.supervision,
            seg_weight=s.seg_weight,
            cls_weight=s.cls_weight if s.supervision == "image" else 0.0,
            ca_weight=s.ca_weight if s.supervision == "image" else 0.0,
            bg_threshold=s.bg_threshold,
        )
        for s in recipe.data
    ]
    return vocab, datasets, sources


def build_batches(
    recipe: Recipe, datasets: dict, rank: int, world_size: int, start_batch: int = 0
) -> MixedBatches:
    """One infinite loader per source, continuing after `start_batch` batches (resume)."""
    loaders = {}
    for i, s in enumerate(recipe.data):
        loaders[s.name] = source_loader(
            datasets[s.name],
            s.batch_size,
            s.num_workers,
            seed=recipe.train.seed * 1000 + i,
            rank=rank,
            world_size=world_size,
            start_batch=start_batch,
        )
    return MixedBatches(loaders)


def model_args(recipe: Recipe) -> dict:
    m = recipe.model
    return dict(
        backbone=m.backbone, dim=m.dim, img_size=m.img_size, backbone_kwargs=dict(m.backbone_kwargs)
    )


def build_model(recipe: Recipe, num_classes: int) -> tuple[Segmenter, ClassTable, dict]:
    """Segmenter (with local pretrained weights if named) and the class table."""
    args = model_args(recipe)
    segmenter = Segmenter(pretrained_file=recipe.model.pretrained_file, **args)
    table = ClassTable(num_classes, recipe.model.dim)
    return segmenter, table, args


def build_optimizer(
    recipe: Recipe, segmenter: Segmenter, table: ClassTable
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """Parameter groups (ESS): backbone at lr x backbone_lr_mult, head at lr, class table with its
    own lr multiplier, momentum and poly power. AdamW skips weight decay on 1-D parameters,
    position/prefix tokens and the class table (its rows are normalised anyway)."""
    o, sch = recipe.optim, recipe.schedule
    decay, no_decay = [], []
    for name, p in segmenter.backbone.named_parameters():
        (no_decay if p.ndim <= 1 or "token" in name or "pos_embed" in name else decay).append(p)
    groups = [
        dict(name="backbone", params=decay, lr=o.lr * o.backbone_lr_mult),
        dict(
            name="backbone_no_decay",
            params=no_decay,
            lr=o.lr * o.backbone_lr_mult,
            weight_decay=0.0,
        ),
        dict(name="head", params=list(segmenter.head.parameters()), lr=o.lr),
        dict(
            name="table",
            params=list(table.parameters()),
            lr=o.lr * o.table_lr_mult,
            weight_decay=0.0,
        ),
    ]
    if o.name == "sgd":
        groups[-1]["momentum"] = o.table_momentum
        optimizer = torch.optim.SGD(
            groups, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay
        )
    else:
        optimizer = torch.optim.AdamW(
            groups, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay
        )
    lambdas = []
    for g in groups:
        power = sch.table_power if g["name"] == "table" else sch.power
        # the floor min_lr applies to the base lr; each group keeps its multiplier
        lambdas.append(lr_lambda(sch.steps, power, sch.warmup_steps, o.lr, sch.min_lr))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)
    return optimizer, scheduler


def loss_params(recipe: Recipe) -> LossParams:
    lo = recipe.loss
    return LossParams(
        lo.k, lo.scale, lo.share_negatives, lo.margin, lo.margin_weight, lo.cls_k, lo.label_stride
    )


def loop_params(recipe: Recipe) -> LoopParams:
    t = recipe.train
    return LoopParams(
        steps=recipe.schedule.steps,
        grad_accum=t.grad_accum,
        grad_clip=recipe.optim.grad_clip,
        log_every=t.log_every,
        ckpt_every=t.ckpt_every,
        keep_ckpts=t.keep_ckpts,
        max_bad_steps=t.max_bad_steps,
        stop_after=t.stop_after,
    )
