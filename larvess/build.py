"""Recipe -> objects: the one place (with config.py) that reads a Recipe.

Scripts call these functions; every library module below receives built objects and plain
arguments (or one config section). Floors, top to bottom: ``build_data`` (readers + the unified
vocabulary), ``build_model`` / ``build_optimizer`` / ``build_ca``, ``build_batches``,
``resolve_resume``. A trained run is loaded by ``larvess.predictor.Predictor.from_run``.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from larvess.ca_classifier import CAClassifier
from larvess.checkpoint import find_resume, read_state
from larvess.config import OptimConfig, Recipe, SourceConfig
from larvess.data.ade import AdeTrain
from larvess.data.coco_stuff import CocoStuff
from larvess.data.imagenet_wds import ImageNetShards
from larvess.data.mixing import MixedBatches, source_loader
from larvess.data.transforms import TrainAugment
from larvess.hierarchy import Hierarchy
from larvess.model import ClassTable, Segmenter
from larvess.names import read_names_file
from larvess.synsets import synsets_for_class_list
from larvess.tree import VocabTree
from larvess.vocab import Vocabulary


def build_reader(s: SourceConfig, batch_size: int | None = None):
    """One training reader for a source; it exposes class_names, wnids and set_rows()."""
    files = {"skip_missing": s.skip_missing} | ({"split": s.split} if s.split else {})
    jitter = dict(ratio_range=tuple(s.scale_range), photometric=s.photometric)
    if s.base_scale:
        jitter["base_scale"] = tuple(s.base_scale)
    if s.kind == "coco_stuff":
        aug = TrainAugment(crop_size=s.crop_size, **jitter)
        return CocoStuff(
            s.root, transform=aug, from_json=s.from_json, label_format=s.label_format, **files
        )
    if s.kind in ("ade150", "ade847", "wa150", "wa847"):
        weak = s.supervision == "image"
        return AdeTrain(
            s.root,
            full=s.kind.endswith("847"),
            weak=weak,
            names_file=s.names,
            transform=TrainAugment(crop_size=s.crop_size, pad=not weak, **jitter),
            **files,
        )
    if s.kind == "imagenet_wds":
        # files unreadable at sharding time are listed in OUT/.larvess/skipped.txt; shard data
        # lost while training is counted per batch ("lost", "lost_shards": engine.TrainState)
        aug = TrainAugment(crop_size=s.crop_size, pad=False, **jitter)
        return ImageNetShards(s.root, transform=aug, names_file=s.names)
    raise ValueError(f"source '{s.name}': unknown kind {s.kind!r}")


def build_data(recipe: Recipe) -> tuple[Vocabulary, dict[str, object]]:
    """Unified vocabulary and one reader per source (emitting vocabulary rows).

    Mask sources join the vocabulary first, so their classes get the low rows and
    ``has_masks``. Dataset classes carry the WordNet synsets of the shipped curated mapping
    (larvess/meta/wordnet_*.tsv) when their class list is one of the shipped datasets; an
    ImageNet synset joins a dataset class only through those synsets or the alias file.
    """
    readers = {s.name: build_reader(s) for s in recipe.data}
    vocab = Vocabulary(alias_file=recipe.vocab.alias_file)
    for s in sorted(recipe.data, key=lambda s: s.supervision != "mask"):
        ds = readers[s.name]
        if ds.wnids is not None:  # one synset per class: merges by WordNet id only
            rows = vocab.add_source(s.name, ds.class_names, ds.wnids, by_synset=True)
        else:
            synsets = synsets_for_class_list(ds.class_names)
            rows = vocab.add_source(
                s.name, ds.class_names, synsets, has_masks=s.supervision == "mask"
            )
        ds.set_rows(rows)
    for path in recipe.vocab.extra_names:
        names = read_names_file(path)
        vocab.add_source(f"extra:{Path(path).name}", names, synsets_for_class_list(names))
    trained = {r for s in recipe.data for r in vocab.rows_of(s.name).tolist()}
    untrained = [n for r, n in enumerate(vocab.names) if r not in trained]
    if untrained and recipe.loss.negatives == "source":
        # nobody's negatives: they keep their random init (a toy masks-only run with "source"
        # once predicted its untrained rows almost everywhere: base 0.0; prediction now leaves
        # untrained rows out, and larvess-eval lists their classes as unreached)
        warnings.warn(
            f"{len(untrained)} rows of vocab.extra_names match no training source (e.g. "
            f"{untrained[:5]}); with loss.negatives=source they are never trained nor pushed "
            "away; prediction never uses them and larvess-eval leaves their classes out as "
            "unreached: set loss.negatives=all, or leave them out",
            stacklevel=2,
        )
    return vocab, readers


def per_process_batch(s: SourceConfig, world_size: int) -> int:
    """Recipes give global batch sizes (as the papers state them); each process takes its part."""
    if s.batch_size % world_size:
        raise ValueError(
            f"source '{s.name}': global batch_size {s.batch_size} does not divide over "
            f"{world_size} processes; set data.{s.name}.batch_size to a multiple of {world_size}"
        )
    return s.batch_size // world_size


def build_batches(
    recipe: Recipe, readers: dict, rank: int, world_size: int, start_batch: int = 0
) -> MixedBatches:
    """One infinite loader per source, continuing after `start_batch` batches (resume)."""
    loaders = {}
    for i, s in enumerate(recipe.data):
        loaders[s.name] = source_loader(
            readers[s.name],
            per_process_batch(s, world_size),
            s.num_workers,
            seed=recipe.train.seed * 1000 + i,
            rank=rank,
            world_size=world_size,
            start_batch=start_batch,
            pin_memory=torch.cuda.is_available(),
        )
    return MixedBatches(loaders)


def model_args(recipe: Recipe) -> dict:
    """The Segmenter's constructor arguments (saved into model.pt, so eval needs no recipe)."""
    m = recipe.model
    kwargs = dict(m.backbone_kwargs)
    kwargs.setdefault("drop_path_rate", m.drop_path)
    return dict(
        backbone=m.backbone, dim=m.dim, img_size=m.img_size, backbone_kwargs=kwargs, stem=m.stem
    )


def build_model(recipe: Recipe, num_classes: int) -> tuple[Segmenter, ClassTable, dict]:
    """Segmenter (with the recipe's pretrained weights: a local file, or timm's hub when
    model.pretrained_hub names them) and the class table."""
    args = model_args(recipe)
    m = recipe.model
    segmenter = Segmenter(
        pretrained_file=m.pretrained_file, pretrained_hub=m.pretrained_hub, **args
    )
    return segmenter, ClassTable(num_classes, recipe.model.dim), args


def build_tree(recipe: Recipe, vocab: Vocabulary) -> VocabTree | None:
    """The vocabulary's tree for ``loss.hierarchy: tree`` (None when flat): WordNet 3.0's
    shipped table, or ``vocab.hierarchy_file``; every wnid must be in it (strict)."""
    if recipe.loss.hierarchy != "tree":
        return None
    path = recipe.vocab.hierarchy_file
    if path is None:
        return vocab.tree()
    if not Path(path).is_file():
        raise FileNotFoundError(f"vocab.hierarchy_file: {path} not found")
    return vocab.tree(Hierarchy.load(path))


def build_ca(recipe: Recipe, num_classes: int) -> CAClassifier:
    lo = recipe.loss
    return CAClassifier(
        num_classes, recipe.model.dim, bank_size=lo.ca_bank_size, topk=lo.ca_topk,
        warm_up=lo.ca_warm_up,
    )  # fmt: skip


def param_groups(
    segmenter: Segmenter, table: ClassTable, o: OptimConfig, logit_norm: nn.Module | None = None
) -> list[dict]:
    """Optimiser groups: backbone (x backbone_lr_mult; LarvSeg 1, ESS 0.1), its 1-D / token
    parameters without weight decay, the head (with LarvSeg's gamma / beta of ``logit_norm``,
    undecayed), and the class table (x table_lr_mult, its own momentum and poly power, never
    decayed: its rows are normalised anyway)."""
    decay, no_decay = [], []
    for name, p in segmenter.backbone.named_parameters():
        (no_decay if p.ndim <= 1 or "token" in name or "pos_embed" in name else decay).append(p)
    bb_lr = o.lr * o.backbone_lr_mult
    groups = [
        dict(name="backbone", params=decay, lr=bb_lr),
        dict(name="backbone_no_decay", params=no_decay, lr=bb_lr, weight_decay=0.0),
        dict(name="head", params=list(segmenter.head.parameters()), lr=o.lr),
        dict(name="table", params=list(table.parameters()), lr=o.lr * o.table_lr_mult,
             weight_decay=0.0),
    ]  # fmt: skip
    if o.name == "sgd":
        groups[-1]["momentum"] = o.table_momentum
    if logit_norm is not None:
        params = list(logit_norm.parameters())
        groups.append(dict(name="logit_norm", params=params, lr=o.lr, weight_decay=0.0))
    return groups


def build_optimizer(
    recipe: Recipe, segmenter: Segmenter, table: ClassTable, logit_norm: nn.Module | None = None
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """SGD (LarvSeg) or AdamW over ``param_groups``; poly decay per group to the same floor
    schedule.min_lr (LarvSeg: 1e-5 for every group), table with schedule.table_power."""
    o, sch = recipe.optim, recipe.schedule
    groups = param_groups(segmenter, table, o, logit_norm)
    if o.name == "sgd":
        opt = torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    else:
        opt = torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay)
    lambdas = [
        poly_lambda(
            sch.steps, sch.table_power if g["name"] == "table" else sch.power,
            sch.warmup_steps, g["lr"], sch.min_lr,
        )
        for g in groups
    ]  # fmt: skip
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambdas)


def poly_lambda(total: int, power: float, warmup: int, group_lr: float, min_lr: float):
    """Multiplier on a group's lr: linear warm-up, then poly decay from group_lr to min_lr."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if group_lr <= 0:
            return 0.0
        frac = min(1.0, (step - warmup) / max(1, total - warmup))
        return ((group_lr - min_lr) * (1 - frac) ** power + min_lr) / group_lr

    return factor


def resolve_resume(recipe: Recipe, require: bool = False) -> tuple[Path | None, dict]:
    """(checkpoint to resume from or None, its trainer state) from train.resume."""
    run_dir = Path(recipe.runs_dir) / recipe.name
    t = recipe.train
    ckpt = find_resume(run_dir) if t.resume == "auto" else None
    if t.resume not in ("auto", "never"):
        ckpt = Path(t.resume)
    if require and ckpt is None:
        raise FileNotFoundError(f"{run_dir}: --resume given but no complete checkpoint found")
    return ckpt, read_state(ckpt) if ckpt else {"step": 0, "bad_steps": 0}
