from pathlib import Path

import pytest
import yaml

from larvess.config import (
    Recipe,
    RecipeError,
    dump_recipe,
    load_recipe,
    recipe_from_dict,
)

RECIPES = Path(__file__).resolve().parents[1] / "recipes"

GOOD = {
    "name": "t",
    "model": {"backbone": "vit_tiny_patch16_224", "dim": 16, "backbone_kwargs": {"depth": 2}},
    "loss": {"k": 4, "cls_k": None},
    "data": [
        {"name": "coco", "kind": "coco_stuff", "root": "/d/coco", "batch_size": 2},
        {"name": "in", "kind": "imagenet_wds", "root": "/d/shards", "crop_size": 320},
    ],
    "optim": {"name": "adamw", "lr": 5e-4},
}


def write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_defaults_come_from_code(tmp_path):
    r = load_recipe(write(tmp_path, GOOD))
    assert isinstance(r, Recipe)
    assert r.loss.scale == 40.0 and r.loss.k == 4
    assert r.data[0].crop_size == 512 and r.data[1].crop_size == 320
    assert r.data[0].supervision == "mask" and r.data[1].supervision == "image"
    assert r.optim.lr == 5e-4 and isinstance(r.schedule.steps, int)


def test_round_trip_through_dump(tmp_path):
    r = load_recipe(write(tmp_path, GOOD), ["loss.k=7", "data.in.batch_size=3"])
    out = tmp_path / "resolved.yaml"
    dump_recipe(r, out)
    again = load_recipe(out)
    assert again == r
    assert again.loss.k == 7 and again.data[1].batch_size == 3


def test_overrides_by_index_and_name(tmp_path):
    r = load_recipe(
        write(tmp_path, GOOD),
        ["data.0.batch_size=5", "data.coco.crop_size=256", "optim.lr=1e-2", "loss.cls_k=null"],
    )
    assert r.data[0].batch_size == 5 and r.data[0].crop_size == 256
    assert r.optim.lr == 1e-2 and r.loss.cls_k is None


def test_int_accepted_where_float_expected(tmp_path):
    r = load_recipe(write(tmp_path, {**GOOD, "optim": {"lr": 1}}))
    assert r.optim.lr == 1.0 and isinstance(r.optim.lr, float)


@pytest.mark.parametrize(
    "patch, key, bad",
    [
        ({"loss": {"k": 4, "kk": 3}}, "loss.kk", "kk"),
        ({"modle": {}}, "modle", "modle"),
        ({"loss": {"k": "eight"}}, "loss.k", "eight"),
        ({"schedule": {"steps": True}}, "schedule.steps", "True"),
        ({"loss": {"k": 0}}, "loss.k", "0"),
        ({"optim": {"lr": -0.1}}, "optim.lr", "-0.1"),
        ({"data": [{"name": "x", "kind": "pascal", "root": "/d"}]}, "data.0.kind", "pascal"),
        ({"data": [{"name": "x", "kind": "coco_stuff", "root": "/d", "bs": 1}]}, "data.0.bs", "bs"),
        (
            {"data": [{"name": "x", "kind": "coco_stuff", "root": "/d", "batch_size": 0}]},
            "data.0.batch_size",
            "0",
        ),
        ({"data": []}, "data", "[]"),
        ({"train": {"precision": "fp8"}}, "train.precision", "fp8"),
    ],
)
def test_bad_input_names_key_value_and_file(tmp_path, patch, key, bad):
    path = write(tmp_path, {**GOOD, **patch})
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    msg = str(err.value)
    assert str(path) in msg and key in msg and bad in msg


@pytest.mark.parametrize(
    "override, key",
    [
        ("loss.k=-1", "loss.k"),
        ("loss.nope=1", "loss.nope"),
        ("data.zzz.batch_size=1", "zzz"),
        ("optim.lr", "optim.lr"),
    ],
)
def test_bad_override_names_key_and_file(tmp_path, override, key):
    path = write(tmp_path, GOOD)
    with pytest.raises(RecipeError) as err:
        load_recipe(path, [override])
    assert str(path) in str(err.value) and key in str(err.value)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(RecipeError, match="not found"):
        load_recipe(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(RecipeError, match="bad.yaml"):
        load_recipe(bad)


def test_shipped_recipes_load():
    paths = sorted(RECIPES.glob("*.yaml"))
    for path in paths:
        r = load_recipe(path)
        assert r.name and r.data


def test_from_dict_without_file():
    r = recipe_from_dict(GOOD)
    assert r.name == "t"


@pytest.mark.parametrize(
    "override, key",
    [
        ("loss.negatives=everything", "loss.negatives"),
        ("loss.combine=mean", "loss.combine"),
        ("loss.margin_refresh=0", "loss.margin_refresh"),
        ("data.coco.label_format=trainid182", "data.0.label_format"),
        ("data.coco.base_scale=[320]", "data.0.base_scale"),
        ("model.drop_path=1.5", "model.drop_path"),
        ("model.stem=resnet", "model.stem"),
    ],
)
def test_loss_semantics_keys_are_validated(tmp_path, override, key):
    path = write(tmp_path, GOOD)
    with pytest.raises(RecipeError, match=rf"r\.yaml: '{key}' = .* is invalid"):
        load_recipe(path, [override])


def test_larvseg_defaults():
    r = Recipe()
    assert (r.loss.negatives, r.loss.combine) == ("source", "batch_mean")
    assert r.optim.backbone_lr_mult == 1.0 and r.schedule.min_lr == 1e-5
    assert r.model.drop_path == 0.1
    for name in ("c171_wa150_i124", "c171_wa847_i585"):
        image = [s for s in load_recipe(RECIPES / f"{name}.yaml").data if s.supervision == "image"]
        assert {(s.cls_weight, s.ca_weight) for s in image} == {(0.2, 0.1)}, name


def test_precision_trackers_and_weights_options(tmp_path):
    r = load_recipe(write(tmp_path, GOOD))
    assert r.train.precision == "auto" and r.train.log_with == ["tensorboard"]
    assert r.model.pretrained_file is None and r.model.pretrained_hub is None
    for p in ("auto", "bf16", "fp16", "fp32"):
        assert load_recipe(write(tmp_path, GOOD), [f"train.precision={p}"]).train.precision == p
    hub = "vit_tiny_patch16_224.augreg_in21k"
    assert load_recipe(write(tmp_path, GOOD), [f"model.pretrained_hub={hub}"]).model.pretrained_hub
    bad = [
        ([f"model.pretrained_hub={hub}", "model.pretrained_file=w.safetensors"], "not both"),
        (["model.pretrained_hub=vit_base_patch16_224.augreg_in21k"], "vit_tiny_patch16_224"),
        (["train.log_with=tensorboard"], "must be a list"),
    ]
    for overrides, why in bad:
        with pytest.raises(RecipeError, match=why) as err:
            load_recipe(write(tmp_path, GOOD), overrides)
        assert str(tmp_path / "r.yaml") in str(err.value)
    # the shipped real recipes name the in21k weights file the README tells how to fetch
    for name in ("c171_wa150", "c171_wa150_i124", "c171_wa847_i585", "c171_i21k"):
        m = load_recipe(RECIPES / f"{name}.yaml").model
        assert m.pretrained_file == "weights/vit_base_patch16_224.augreg_in21k.safetensors"
