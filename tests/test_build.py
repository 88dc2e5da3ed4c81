"""larvess/build.py: the recipe -> objects wiring (parameter groups, schedule, rows, batches)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from conftest import ROOT, tiny

from larvess import build
from larvess.checkpoint import STATE_FILE
from larvess.config import OptimConfig, load_recipe
from larvess.model import ClassTable, Segmenter

TINY = dict(backbone="vit_tiny_patch16_224", dim=8, img_size=32,
            backbone_kwargs=dict(depth=1, embed_dim=48, num_heads=3))  # fmt: skip


def test_param_groups_follow_the_optimiser_section():
    seg, table = Segmenter(**TINY), ClassTable(10, 8)
    o = OptimConfig(lr=0.01, backbone_lr_mult=0.1, table_lr_mult=2.0, table_momentum=0.95)
    groups = {g["name"]: g for g in build.param_groups(seg, table, o)}
    assert groups["backbone"]["lr"] == pytest.approx(1e-3)
    assert groups["backbone_no_decay"]["lr"] == pytest.approx(1e-3)
    assert groups["head"]["lr"] == pytest.approx(0.01)
    assert groups["table"]["lr"] == pytest.approx(0.02)
    assert groups["table"]["momentum"] == 0.95 and "momentum" not in groups["head"]
    assert (
        groups["table"]["weight_decay"] == 0.0 and groups["backbone_no_decay"]["weight_decay"] == 0
    )
    # every parameter in exactly one group; 1-D and token parameters never decayed
    ids = [id(p) for g in groups.values() for p in g["params"]]
    everything = list(seg.parameters()) + list(table.parameters())
    assert sorted(ids) == sorted(id(p) for p in everything)
    assert all(p.ndim >= 2 for p in groups["backbone"]["params"])
    assert any(p.ndim == 1 for p in groups["backbone_no_decay"]["params"])
    # LarvSeg's default: no backbone multiplier
    default = {g["name"]: g["lr"] for g in build.param_groups(seg, table, OptimConfig())}
    assert default["backbone"] == default["head"] == OptimConfig().lr


def test_poly_schedule_reaches_the_same_floor_in_every_group(world, tmp_path):
    recipe = load_recipe(ROOT / "recipes" / "toy.yaml", tiny(world, tmp_path, "s", 10)[1:] + [
        "optim.name=sgd", "optim.lr=0.01", "optim.table_lr_mult=3.0", "schedule.min_lr=1e-4",
        "schedule.warmup_steps=2", "schedule.power=0.9", "schedule.table_power=0.5",
    ])  # fmt: skip
    seg, table, _ = build.build_model(recipe, 12)
    opt, sched = build.build_optimizer(recipe, seg, table)
    lrs = []
    for _ in range(recipe.schedule.steps):
        lrs.append({g["name"]: g["lr"] for g in opt.param_groups})
        opt.step()
        sched.step()
    lrs.append({g["name"]: g["lr"] for g in opt.param_groups})
    assert lrs[0]["head"] == pytest.approx(0.01 / 2) and lrs[1]["head"] == pytest.approx(0.01)
    for name, base in (("head", 0.01), ("table", 0.03)):
        assert lrs[2][name] == pytest.approx(base)  # warm-up over
        assert lrs[-1][name] == pytest.approx(1e-4)  # the floor, whatever the multiplier
    # naive poly: (base - floor) * (1 - t)^power + floor, the table with its own power
    t = (5 - 2) / (10 - 2)
    assert lrs[5]["head"] == pytest.approx((0.01 - 1e-4) * (1 - t) ** 0.9 + 1e-4)
    assert lrs[5]["table"] == pytest.approx((0.03 - 1e-4) * (1 - t) ** 0.5 + 1e-4)


def test_mask_sources_get_the_low_rows_and_readers_their_rows(world, tmp_path):
    recipe = load_recipe(ROOT / "recipes" / "toy.yaml", tiny(world, tmp_path, "r", 2)[1:])
    vocab, readers = build.build_data(recipe)
    coco, wa, imagenet = readers["coco"], readers["wa"], readers["imagenet"]
    n_base = len(coco.class_names)
    assert vocab.rows_of("coco").tolist() == list(range(n_base))
    assert all(vocab.entries[r].has_masks for r in range(n_base))
    assert not any(vocab.entries[r].has_masks for r in range(n_base, len(vocab)))
    for name, ds in readers.items():
        assert torch.equal(ds.rows, vocab.rows_of(name)), name
    # ImageNet synsets joined rows by WordNet id only: their rows carry the wnids
    for w, r in zip(imagenet.wnids, vocab.rows_of("imagenet").tolist()):
        assert w in vocab.entries[r].wnids
    # every class of the toy world has one row: the ADE-format scenes hold all of them, and the
    # ImageNet synsets of classes joined them through the toy world's alias file (its curated
    # mapping); the child synsets of its tree (ImageNet only) are one row each
    wa_rows = set(vocab.rows_of("wa").tolist())
    assert len(wa_rows) == len(wa.class_names)
    children = [r for r in vocab.rows_of("imagenet").tolist() if r not in wa_rows]
    assert children and len(vocab) == len(wa.class_names) + len(children)
    assert all(vocab.entries[r].sources == ["imagenet"] for r in children)


def test_untrained_extra_rows_warn_under_source_negatives(world, tmp_path):
    extra = tmp_path / "extra.txt"
    extra.write_text("zebra plaid\nteal mosaic\n")
    args = tiny(world, tmp_path, "r", 2)[1:] + [f"vocab.extra_names=[{extra}]"]
    with pytest.warns(UserWarning, match=r"2 rows of vocab.extra_names .*'zebra plaid'"):
        vocab, _ = build.build_data(load_recipe(ROOT / "recipes" / "toy.yaml", args))
    assert {"zebra plaid", "teal mosaic"} <= set(vocab.names)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # negatives from all rows push them away: no warning
        build.build_data(load_recipe(ROOT / "recipes" / "toy.yaml", args + ["loss.negatives=all"]))


def test_global_batch_sizes_divide_over_processes(world, tmp_path):
    recipe = load_recipe(ROOT / "recipes" / "toy.yaml", tiny(world, tmp_path, "b", 2)[1:]
                         + ["data.coco.batch_size=6"])  # fmt: skip
    coco = recipe.data[0]
    assert build.per_process_batch(coco, 1) == 6 and build.per_process_batch(coco, 3) == 2
    with pytest.raises(ValueError, match=r"'coco'.*batch_size 6.*4 processes"):
        build.per_process_batch(coco, 4)


def test_resume_resolution(world, tmp_path):
    args = tiny(world, tmp_path, "res", 2)[1:]
    recipe = load_recipe(ROOT / "recipes" / "toy.yaml", args)
    assert build.resolve_resume(recipe) == (None, {"step": 0, "bad_steps": 0})
    with pytest.raises(FileNotFoundError, match="--resume given"):
        build.resolve_resume(recipe, require=True)
    ckpt = Path(tmp_path) / "res" / "checkpoints" / "step_00000004"
    ckpt.mkdir(parents=True)
    (ckpt / STATE_FILE).write_text(json.dumps({"step": 4, "bad_steps": 1}))
    assert build.resolve_resume(recipe) == (ckpt, {"step": 4, "bad_steps": 1})
    never = load_recipe(ROOT / "recipes" / "toy.yaml", args + ["train.resume=never"])
    assert build.resolve_resume(never)[0] is None


def test_real_vocabularies_merge_by_meaning():
    """COCO-Stuff-171 masks + ADE-150 image labels + ImageNet synsets whose lemmas are traps:
    a synset joins a dataset class only through the shipped curated mapping."""
    from larvess.meta import ADE150_NAMES, COCO_STUFF_LABELS
    from larvess.names import read_names_file, read_synset_lemmas
    from larvess.synsets import synsets_for_class_list, timm_info_dir
    from larvess.vocab import Vocabulary

    coco, ade = read_names_file(COCO_STUFF_LABELS), read_names_file(ADE150_NAMES)
    v = Vocabulary()
    v.add_source("coco", coco, synsets_for_class_list(coco), has_masks=True)
    rows_a = v.add_source("wa150", ade, synsets_for_class_list(ade))
    lemmas = read_synset_lemmas(timm_info_dir() / "imagenet_synset_to_lemma.txt")
    traps = {"n02330245": None, "n10085101": None, "n01608432": None,  # rodent, dealer, hawk
             "n03793489": "mouse", "n03327234": "fence", "n02084071": "dog"}  # fmt: skip
    rows_i = v.add_source("in", [lemmas[w] for w in traps], list(traps), by_synset=True)
    coco_row = {c[0]: r for c, r in zip(coco, v.rows_of("coco").tolist())}
    for (w, meant), r in zip(traps.items(), rows_i.tolist()):
        if meant is None:  # a lemma shared with a COCO class, another meaning: its own row
            assert r >= len(coco) and v.entries[r].sources == ["in"], (w, v.entries[r])
        else:
            assert r == coco_row[meant], (w, v.names[r])
    base = v.is_base(rows_a)
    assert 55 <= int(base.sum()) <= 75  # LarvSeg's name-based split: 63
    assert v.names[rows_a[[a[0] for a in ade].index("fence")]] == "fence"


def test_pretrained_hub_reaches_timm(world, tmp_path, monkeypatch):
    """model.pretrained_hub: timm is asked for that hub model's weights (nothing is downloaded
    here: create_model is replaced by a recorder building the same model without weights)."""
    import timm

    real, calls = timm.create_model, []

    def recording(name, **kwargs):
        calls.append((name, kwargs))
        return real(name, **{**kwargs, "pretrained": False})

    monkeypatch.setattr(timm, "create_model", recording)
    hub = "vit_tiny_patch16_224.augreg_in21k"
    recipe_file, *overrides = tiny(world, tmp_path, "hub", 2)
    recipe = load_recipe(recipe_file, overrides + [f"model.pretrained_hub={hub}"])
    _, _, args = build.build_model(recipe, 5)
    ((name, kwargs),) = calls
    assert name == hub and kwargs["pretrained"] is True and kwargs["num_classes"] == 0
    assert "pretrained_cfg_overlay" not in kwargs  # the hub's own weights, not a file
    assert args["backbone"] == "vit_tiny_patch16_224"  # model.pt rebuilds without the hub
    calls.clear()
    build.build_model(load_recipe(recipe_file, overrides), 5)
    assert calls[0][1]["pretrained"] is False  # the default: no weights, nothing fetched


def test_missing_weights_file_says_where_they_come_from(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        Segmenter(pretrained_file=tmp_path / "vit.safetensors", **TINY)
    msg = str(err.value)
    assert "vit.safetensors" in msg and "vit_base_patch16_224.augreg_in21k" in msg
    assert "hf download timm/vit_base_patch16_224.augreg_in21k model.safetensors" in msg
    assert "B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0.npz" in msg
    assert "weights/vit_base_patch16_224.augreg_in21k.safetensors" in msg
