"""Typed recipe: dataclass defaults in code, a YAML file as a short diff, CLI overrides.

This is the only module that reads a recipe. ``load_recipe`` rejects unknown keys, wrong types and
impossible values with a ``RecipeError`` naming the file, the key and the bad value.

Overrides are ``key.sub=value`` strings; the value is parsed as YAML (``3``, ``1e-3``, ``null``,
``[a, b]``). Entries of the ``data`` list are addressed by index or by source name:
``data.0.batch_size=4`` or ``data.coco.batch_size=4``.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

# Source kind -> supervision. Mask sources feed the kNN-sampled CE; image sources feed the
# image-level CE and the CA-Classifier.
SourceKind = Literal["coco_stuff", "ade150", "ade847", "wa150", "wa847", "imagenet_wds"]
SOURCE_KINDS = {
    "coco_stuff": "mask",
    "ade150": "mask",
    "ade847": "mask",
    "wa150": "image",
    "wa847": "image",
    "imagenet_wds": "image",
}
EvalDataset = Literal["ade150", "ade847"]
Precision = Literal["auto", "bf16", "fp16", "fp32"]
EVAL_DATASETS = typing.get_args(EvalDataset)
PRECISIONS = typing.get_args(Precision)


class RecipeError(ValueError):
    """A recipe or override that cannot be used; the message names file, key and value."""


@dataclass
class ModelConfig:
    backbone: str = "vit_base_patch16_224"
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)
    img_size: int = 512
    dim: int = 64  # embedding size d; ESS used 7-12 for <= 1284 classes, 64 suits 21K
    pretrained_file: str | None = None  # local weights file (README "Weights"); never downloaded
    # online alternative to pretrained_file: timm fetches this hub model's weights, a timm name
    # with its tag whose architecture is `backbone`'s, e.g. vit_base_patch16_224.augreg_in21k
    pretrained_hub: str | None = None
    drop_path: float = 0.1  # stochastic depth of the backbone (LarvSeg 0.1)
    stem: Literal["patch", "conv"] = (
        "patch"  # patch (the ViT's own, for pretrained weights) | conv (from scratch)
    )


@dataclass
class LossConfig:
    k: int = 8  # negatives per labelled pixel (ESS eq. 6)
    scale: float = 40.0  # s = 2 / tau with tau = 0.05
    share_negatives: bool = False  # search at the feature grid, reuse per cell (ESS supp.)
    label_stride: int = 1  # loss resolution = crop / label_stride (labels sampled at centres)
    margin: float = 0.2
    margin_weight: float = 1.0  # 0 disables L_r
    margin_refresh: int = 1  # steps between the O(C^2 d) nearest-row searches of L_r
    # LarvSeg's logit standardisation in the pixel CE: each pixel's logits standardised over the
    # candidate classes (the source's with negatives=source), then gamma * z + beta (learned)
    logit_norm: bool = False
    cls_k: int | None = None  # image-level CE over target + k nearest; None = all classes
    ca_bank_size: int = 20  # M
    ca_topk: int = 20  # K
    ca_warm_up: int = 1
    # LarvSeg scores each dataset against its own classes only (cls_emb[cls_index]); "all"
    # searches negatives in the whole table
    negatives: Literal["source", "all"] = "source"  # source | all
    # batch_mean: each source's loss x its share of the global batch (LarvSeg's DDP average
    # over one-dataset GPU groups); sum: plain sum of the per-source losses
    combine: Literal["batch_mean", "sum"] = "batch_mean"  # batch_mean | sum
    knn_backend: Literal["auto", "torch", "faiss"] = (
        "auto"  # auto | torch | faiss (GPU index when faiss has GPU support)
    )
    pc2_weight: float = 0.0  # PC2Seg pixel-contrastive term on image-labelled sources; 0 = off
    pc2_negatives: int = 200  # sampled negative pixels per anchor (PC2Seg)
    pc2_tau: float = 0.5  # PC2Seg temperature (not stated in the supplementary; see pc2seg.py)
    # flat: every row its own class of one softmax (ESS, LarvSeg). tree: labels expand up the
    # WordNet tree and a target's related rows are never its negatives (tree_labels.py)
    hierarchy: Literal["flat", "tree"] = "flat"


@dataclass
class SourceConfig:
    name: str = ""
    kind: SourceKind = "coco_stuff"
    root: str = ""
    split: str = ""  # empty = the kind's training split
    batch_size: int = 8  # global: train.py divides it over the processes
    crop_size: int = 512
    num_workers: int = 2
    scale_range: list[float] = field(default_factory=lambda: [0.5, 2.0])  # resize ratio jitter
    photometric: bool = True  # mmseg PhotoMetricDistortion (brightness/contrast/saturation/hue)
    seg_weight: float = 1.0  # mask sources
    cls_weight: float = 0.1  # image sources: LarvSeg image-level CE
    ca_weight: float = 0.1  # image sources: CA-Classifier
    bg_threshold: float = 0.2  # CA single-label background: top-5 score threshold (ImageNet 0.35)
    bg_mse_threshold: float = 1.0  # and LarvSeg's MSE filter threshold (ImageNet 2.0)
    names: str | None = None  # names file (ADE-847 table; ImageNet lemmas, default timm's)
    from_json: bool = False  # COCO-Stuff: read the stuff/instances JSONs instead of the PNGs
    skip_missing: bool = False  # images without a label file (or the reverse): skip and count
    label_format: Literal["raw182", "trainid171"] | None = (
        None  # COCO-Stuff PNG ids: raw182 | trainid171 | null = from layout
    )
    base_scale: list[int] | None = None  # resize base (long, short); null = (4 crop, crop)

    @property
    def supervision(self) -> str:
        return SOURCE_KINDS[self.kind]


@dataclass
class VocabConfig:
    alias_file: str | None = None  # hand-made merges across sources
    extra_names: list[str] = field(default_factory=list)  # rows with no training data
    # the hypernym table of loss.hierarchy=tree (wordnet_hypernyms.tsv format); null = shipped
    hierarchy_file: str | None = None


@dataclass
class OptimConfig:
    name: Literal["sgd", "adamw"] = "sgd"  # sgd (LarvSeg) | adamw (small ViTs from scratch)
    lr: float = 1e-3
    momentum: float = 0.9
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.0
    backbone_lr_mult: float = 1.0  # LarvSeg 1; ESS trains the backbone at 0.1
    table_lr_mult: float = 1.0
    table_momentum: float = 0.95  # ESS: class table momentum
    grad_clip: float = 0.0  # 0 = off


@dataclass
class ScheduleConfig:
    steps: int = 80000
    warmup_steps: int = 0
    power: float = 0.9  # poly
    table_power: float = 0.95
    min_lr: float = 1e-5


@dataclass
class TrainConfig:
    seed: int = 0
    # auto: the launcher's / accelerate config's mixed precision (`accelerate launch
    # --mixed_precision bf16`; plain python: fp32); bf16 | fp16 | fp32 win over it. The run's
    # recipe.yaml records the precision used.
    precision: Precision = "auto"
    log_with: list[str] = field(default_factory=lambda: ["tensorboard"])  # accelerate trackers
    grad_accum: int = 1
    log_every: int = 20
    ckpt_every: int = 2000
    keep_ckpts: int = 3
    max_bad_steps: int = 20  # consecutive NaN/inf losses before aborting
    # samples lost to unreadable shard data, as a fraction of all drawn, before the run stops
    max_unreadable: float = 0.01
    resume: str = "auto"  # auto | never | a checkpoint folder
    stop_after: int = 0  # >0: checkpoint and exit after this many steps (time-limited jobs)


@dataclass
class EvalSetConfig:
    dataset: EvalDataset = "ade150"
    root: str = ""
    names: str | None = None


@dataclass
class EvalConfig:
    window: int = 512
    stride: int = 512
    short_side: int = 512
    batch_size: int = 8
    sets: list[EvalSetConfig] = field(default_factory=list)


@dataclass
class Recipe:
    name: str = "run"
    runs_dir: str = "runs"
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    vocab: VocabConfig = field(default_factory=VocabConfig)
    data: list[SourceConfig] = field(default_factory=list)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# ---------------------------------------------------------------------------------------------
# Building dataclasses from plain data, with types checked


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, key: str, src: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(value, inner[0], key, src)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise RecipeError(f"{src}: '{key}' must be a mapping, got {value!r}")
        return _build(tp, value, key, src)
    if origin is list:
        if not isinstance(value, list):
            raise RecipeError(f"{src}: '{key}' must be a list, got {value!r}")
        return [_convert(v, args[0], f"{key}.{i}", src) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"{src}: '{key}' must be a mapping, got {value!r}")
        return dict(value)
    if origin is Literal:  # a string choice: the allowed values are the type
        if value not in args:
            choices = ", ".join(map(str, args))
            raise RecipeError(f"{src}: '{key}' = {value!r} is invalid: one of {choices}")
        return value
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        # PyYAML (YAML 1.1) reads 1e-3 as a string; accept any float literal
        try:
            return float(value)
        except ValueError:
            pass
    # bool is an int subclass: 'steps: true' must not pass as 1
    if not isinstance(value, tp) or (tp is not bool and isinstance(value, bool)):
        raise RecipeError(
            f"{src}: '{key}' must be {_type_name(tp)}, got {value!r} ({type(value).__name__})"
        )
    return value


def _build(cls: type, data: dict, prefix: str, src: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            raise RecipeError(f"{src}: unknown key '{full}' (known: {', '.join(sorted(names))})")
        kwargs[key] = _convert(value, hints[key], full, src)
    return cls(**kwargs)


def _check(cond: bool, src: str, key: str, value: Any, why: str) -> None:
    if not cond:
        raise RecipeError(f"{src}: '{key}' = {value!r} is invalid: {why}")


def validate(recipe: Recipe, src: str = "<recipe>") -> Recipe:
    """Reject impossible values (ranges and rules across fields; string choices are Literal
    types, checked while the recipe is built); returns the recipe so calls can be chained."""
    m, lo, o, s, t, e = (
        recipe.model,
        recipe.loss,
        recipe.optim,
        recipe.schedule,
        recipe.train,
        recipe.eval,
    )
    _check(m.dim >= 1, src, "model.dim", m.dim, "must be >= 1")
    _check(m.img_size >= 16, src, "model.img_size", m.img_size, "must be >= 16")
    _check(lo.k >= 1, src, "loss.k", lo.k, "must be >= 1")
    _check(lo.label_stride >= 1, src, "loss.label_stride", lo.label_stride, "must be >= 1")
    _check(lo.scale > 0, src, "loss.scale", lo.scale, "must be > 0")
    _check(lo.margin >= 0, src, "loss.margin", lo.margin, "must be >= 0")
    _check(lo.margin_weight >= 0, src, "loss.margin_weight", lo.margin_weight, "must be >= 0")
    _check(lo.cls_k is None or lo.cls_k >= 1, src, "loss.cls_k", lo.cls_k, "must be >= 1 or null")
    _check(lo.ca_bank_size >= 1, src, "loss.ca_bank_size", lo.ca_bank_size, "must be >= 1")
    _check(lo.ca_topk >= 1, src, "loss.ca_topk", lo.ca_topk, "must be >= 1")
    _check(lo.ca_warm_up >= 0, src, "loss.ca_warm_up", lo.ca_warm_up, "must be >= 0")
    ok = lo.margin_refresh >= 1
    _check(ok, src, "loss.margin_refresh", lo.margin_refresh, "must be >= 1 (1 = every step)")
    _check(lo.pc2_weight >= 0, src, "loss.pc2_weight", lo.pc2_weight, "must be >= 0")
    _check(lo.pc2_negatives >= 1, src, "loss.pc2_negatives", lo.pc2_negatives, "must be >= 1")
    _check(lo.pc2_tau > 0, src, "loss.pc2_tau", lo.pc2_tau, "must be > 0")
    _check(0 <= m.drop_path < 1, src, "model.drop_path", m.drop_path, "must be in [0, 1)")
    _check(len(recipe.data) >= 1, src, "data", recipe.data, "at least one source is needed")
    seen = set()
    for i, d in enumerate(recipe.data):
        key = f"data.{i}"
        _check(bool(d.name), src, f"{key}.name", d.name, "every source needs a name")
        _check(d.name not in seen, src, f"{key}.name", d.name, "source names must be unique")
        seen.add(d.name)
        _check(bool(d.root), src, f"{key}.root", d.root, "the dataset folder is required")
        _check(d.batch_size >= 1, src, f"{key}.batch_size", d.batch_size, "must be >= 1")
        _check(d.crop_size >= 16, src, f"{key}.crop_size", d.crop_size, "must be >= 16")
        lo_hi = d.scale_range
        ok = len(lo_hi) == 2 and 0 < lo_hi[0] <= lo_hi[1]
        _check(ok, src, f"{key}.scale_range", lo_hi, "two ratios 0 < low <= high")
        ok = d.base_scale is None or (len(d.base_scale) == 2 and min(d.base_scale) >= 1)
        _check(ok, src, f"{key}.base_scale", d.base_scale, "two sizes (long, short) or null")
        _check(d.num_workers >= 0, src, f"{key}.num_workers", d.num_workers, "must be >= 0")
        for w in ("seg_weight", "cls_weight", "ca_weight"):
            _check(getattr(d, w) >= 0, src, f"{key}.{w}", getattr(d, w), "must be >= 0")
    _check(o.lr > 0, src, "optim.lr", o.lr, "must be > 0")
    _check(0 <= o.momentum < 1, src, "optim.momentum", o.momentum, "must be in [0, 1)")
    _check(0 <= o.table_momentum < 1, src, "optim.table_momentum", o.table_momentum, "in [0, 1)")
    _check(len(o.betas) == 2, src, "optim.betas", o.betas, "two values")
    _check(o.weight_decay >= 0, src, "optim.weight_decay", o.weight_decay, "must be >= 0")
    _check(o.backbone_lr_mult >= 0, src, "optim.backbone_lr_mult", o.backbone_lr_mult, ">= 0")
    _check(o.table_lr_mult >= 0, src, "optim.table_lr_mult", o.table_lr_mult, ">= 0")
    _check(o.grad_clip >= 0, src, "optim.grad_clip", o.grad_clip, "must be >= 0 (0 = off)")
    _check(s.steps >= 1, src, "schedule.steps", s.steps, "must be >= 1")
    _check(0 <= s.warmup_steps < s.steps, src, "schedule.warmup_steps", s.warmup_steps, "< steps")
    _check(s.min_lr >= 0, src, "schedule.min_lr", s.min_lr, "must be >= 0")
    _check(s.power > 0 and s.table_power > 0, src, "schedule.power", s.power, "must be > 0")
    hub = m.pretrained_hub
    ok = hub is None or m.pretrained_file is None
    _check(ok, src, "model.pretrained_hub", hub, "set pretrained_file or pretrained_hub, not both")
    ok = hub is None or hub.split(".")[0] == m.backbone.split(".")[0]
    _check(ok, src, "model.pretrained_hub", hub, f"not an architecture of backbone {m.backbone!r}")
    _check(t.grad_accum >= 1, src, "train.grad_accum", t.grad_accum, "must be >= 1")
    _check(t.log_every >= 1, src, "train.log_every", t.log_every, "must be >= 1")
    _check(t.ckpt_every >= 1, src, "train.ckpt_every", t.ckpt_every, "must be >= 1")
    _check(t.keep_ckpts >= 1, src, "train.keep_ckpts", t.keep_ckpts, "must be >= 1")
    _check(t.stop_after >= 0, src, "train.stop_after", t.stop_after, "must be >= 0 (0 = off)")
    _check(t.max_bad_steps >= 1, src, "train.max_bad_steps", t.max_bad_steps, "must be >= 1")
    ok = 0 <= t.max_unreadable <= 1
    _check(ok, src, "train.max_unreadable", t.max_unreadable, "must be a fraction in [0, 1]")
    _check(e.window >= 16 and e.stride >= 1, src, "eval.window", e.window, "window >= 16")
    return recipe


# ---------------------------------------------------------------------------------------------
# Overrides, loading and dumping


def _apply_override(raw: dict, override: str, src: str) -> None:
    if "=" not in override:
        raise RecipeError(f"{src}: override '{override}' must look like key.sub=value")
    path, text = override.split("=", 1)
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise RecipeError(f"{src}: override '{override}': value is not YAML: {err}") from err
    parts = path.strip().split(".")
    node: Any = raw
    for i, part in enumerate(parts[:-1]):
        here = ".".join(parts[: i + 1])
        if isinstance(node, list):
            node = node[_list_index(node, part, here, override, src)]
        else:
            node = node.setdefault(part, {})
        if not isinstance(node, dict | list):
            raise RecipeError(f"{src}: override '{override}': '{here}' is not a section")
    last = parts[-1]
    if isinstance(node, list):
        node[_list_index(node, last, path, override, src)] = value
    else:
        node[last] = value


def _list_index(items: list, part: str, here: str, override: str, src: str) -> int:
    if part.isdigit() and int(part) < len(items):
        return int(part)
    for i, item in enumerate(items):
        if isinstance(item, dict) and item.get("name") == part:
            return i
    raise RecipeError(f"{src}: override '{override}': no entry '{part}' in '{here}'")


def recipe_from_dict(
    raw: dict, overrides: typing.Sequence[str] = (), src: str = "<dict>"
) -> Recipe:
    """Build and validate a Recipe from plain data (a parsed YAML diff) plus overrides."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise RecipeError(f"{src}: a recipe must be a mapping at the top level, got {raw!r}")
    for override in overrides:
        _apply_override(raw, override, src)
    return validate(_build(Recipe, raw, "", src), src)


def load_recipe(path: str | Path, overrides: typing.Sequence[str] = ()) -> Recipe:
    """Read a YAML recipe, apply ``key.sub=value`` overrides, check it; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise RecipeError(f"{path}: not valid YAML: {err}") from err
    return recipe_from_dict(raw, overrides, str(path))


def recipe_to_dict(recipe: Recipe) -> dict:
    return dataclasses.asdict(recipe)


def dump_recipe(recipe: Recipe, path: str | Path | None = None) -> str:
    """The fully resolved recipe as YAML (written to ``path`` when given)."""
    text = yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False)
    if path is not None:
        Path(path).write_text(text)
    return text
