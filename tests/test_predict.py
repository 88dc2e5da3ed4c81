"""larvess-predict (scripts/predict.py) end to end: every kind of input file, class subsets,
unreadable files; the Python API (larvess.Predictor) on the same code path."""

from __future__ import annotations

import json
import shutil
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
import torch
from exported_model import CLI, INFER, read_array, run_script, smooth_image
from PIL import Image

from larvess.commands import predict
from larvess.config import EvalConfig, Recipe, SourceConfig, dump_recipe
from larvess.inference import slide_inference
from larvess.predictor import Predictor, open_rgb
from larvess.viz import overlay, palette


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> dict[str, tuple[Path, np.ndarray]]:
    """Input files of several kinds -> (path, the RGB uint8 array the model should see)."""
    d = tmp_path_factory.mktemp("photos")
    out = {}

    def decoded(path):
        with Image.open(path) as im:  # no EXIF handling here
            return np.asarray(im.convert("RGB"))

    Image.fromarray(smooth_image(70, 90, 1)).save(d / "rgb.jpg")
    out["rgb"] = (d / "rgb.jpg", decoded(d / "rgb.jpg"))

    gray = smooth_image(64, 80, 2)[:, :, 0]
    Image.fromarray(gray).save(d / "gray.png")
    out["gray"] = (d / "gray.png", np.repeat(gray[:, :, None], 3, axis=2))

    rgb = smooth_image(72, 72, 3)
    alpha = np.where(np.arange(72)[None, :] < 30, 0, 255).repeat(72, axis=0).astype(np.uint8)
    Image.fromarray(np.dstack([rgb, alpha])).save(d / "rgba.png")
    out["rgba"] = (d / "rgba.png", np.where(alpha[:, :, None] == 0, 255, rgb).astype(np.uint8))

    index = (np.arange(64)[:, None] // 8 + np.arange(96)[None, :] // 12) % 16
    colours = np.random.default_rng(4).integers(0, 256, (256, 3), dtype=np.uint8)
    pal = Image.fromarray(index.astype(np.uint8), mode="L").convert("P")
    pal.putpalette(colours.ravel().tolist())
    pal.save(d / "palette.png")
    out["palette"] = (d / "palette.png", colours[index])

    # EXIF orientation 6: stored 96 wide x 64 high, shown rotated 90 degrees clockwise
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(smooth_image(64, 96, 5)).save(d / "exif.jpg", exif=exif)
    out["exif"] = (d / "exif.jpg", np.ascontiguousarray(np.rot90(decoded(d / "exif.jpg"), k=-1)))

    Image.fromarray(smooth_image(900, 1500, 6)).save(d / "large.jpg")
    out["large"] = (d / "large.jpg", decoded(d / "large.jpg"))

    (d / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a JPEG")
    jpeg = (d / "rgb.jpg").read_bytes()
    (d / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    return out


@pytest.fixture(scope="module")
def predicted(model, photos, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pred")
    paths = [str(p) for p, _ in photos.values()]
    assert predict.run(["--checkpoint", str(model.run), "--out", str(out)] + paths + CLI) == 0
    return out


@pytest.mark.parametrize("kind", ["rgb", "gray", "rgba", "palette", "exif", "large"])
def test_predict_full_vocabulary(model, photos, predicted, kind):
    path, image = photos[kind]
    h, w = image.shape[:2]
    if kind == "exif":
        assert (h, w) == (96, 64)  # rotation applied: the stored size swapped
    want = slide_inference(model.segmenter, model.mu, image, **INFER).numpy()
    with Image.open(predicted / f"{path.stem}_label.png") as im:
        assert im.mode.startswith("I")  # 300 classes: 16-bit PNG
        label = np.asarray(im).astype(np.int64)
    assert label.shape == (h, w)
    np.testing.assert_array_equal(label, want)
    shown = read_array(predicted / f"{path.stem}_overlay.png")
    assert shown.shape[1] == w and shown.shape[0] > h  # legend below the overlay
    np.testing.assert_array_equal(shown[:h], overlay(image, want, palette(len(model.mu))))
    assert json.loads((predicted / "classes.json").read_text()) == model.names


def test_predict_class_subset(model, photos, tmp_path):
    out = tmp_path / "out"
    path, image = photos["rgb"]
    code = predict.run(
        ["--checkpoint", str(model.run), "--out", str(out), "--classes", "sky, grass ,wall"]
        + [str(path)]
        + CLI
    )
    assert code == 0
    assert json.loads((out / "classes.json").read_text()) == ["sky", "grass", "wall"]
    mu = model.mu[[model.row_of["sky"], model.row_of["grass"], model.row_of["wall"]]]
    want = slide_inference(model.segmenter, mu, image, **INFER).numpy()
    with Image.open(out / "rgb_label.png") as im:
        assert im.mode == "L"
        np.testing.assert_array_equal(np.asarray(im), want)
    assert len(np.unique(want)) >= 2

    with pytest.raises(ValueError, match="unicorn"):
        predict.run(["--checkpoint", str(model.run), "--classes", "sky,unicorn", str(path)])


def test_predict_unreadable_files(model, photos, tmp_path):
    d = photos["rgb"][0].parent
    out = tmp_path / "out"
    files = [str(d / n) for n in ("rgb.jpg", "broken.jpg", "missing.png", "truncated.jpg")]
    args = ["--checkpoint", str(model.run), "--out", str(out)] + files + [str(d / "gray.png")] + CLI
    assert predict.run(args) == 1
    proc = run_script("predict", args[:3] + [str(out / "sub")] + args[4:])
    assert proc.returncode == 1, proc.stderr
    for name in ("broken.jpg", "missing.png", "truncated.jpg"):
        assert name in proc.stderr
    assert "3 of 5" in proc.stderr
    for o in (out, out / "sub"):
        for stem in ("rgb", "gray"):
            assert (o / f"{stem}_label.png").is_file() and (o / f"{stem}_overlay.png").is_file()
        assert not any((o / f"{s}_label.png").exists() for s in ("broken", "missing", "truncated"))


@pytest.fixture(scope="module")
def run_with_recipe(model, tmp_path_factory) -> Path:
    """The tiny model's export in a run folder whose recipe.yaml has the INFER eval settings."""
    run = tmp_path_factory.mktemp("run_with_recipe")
    for name in ("model.pt", "vocab.json"):
        shutil.copyfile(model.run / name, run / name)
    recipe = Recipe(data=[SourceConfig(name="coco", root="unused")], eval=EvalConfig(**INFER))
    dump_recipe(recipe, run / "recipe.yaml")
    return run


def test_predictor_and_command_agree_pixel_for_pixel(model, photos, run_with_recipe, tmp_path):
    """Predictor.predict and larvess-predict (no window flags: both take the run's recipe)."""
    out = tmp_path / "out"
    paths = [photos[k][0] for k in ("rgb", "exif", "large")]
    args = ["--checkpoint", str(run_with_recipe), "--out", str(out), "--device", "cpu"]
    assert predict.run(args + ["--classes", "sky,grass,wall,tree"] + [str(p) for p in paths]) == 0
    pred = Predictor.from_run(run_with_recipe, classes=["sky", "grass", "wall", "tree"])
    assert pred.eval == EvalConfig(**INFER)
    rows = [model.row_of[n] for n in ("sky", "grass", "wall", "tree")]
    for path in paths:
        labels, names = pred.predict(path)
        assert names == ["sky", "grass", "wall", "tree"]
        assert (
            labels.dtype == np.int64
            and labels.shape == read_array(out / f"{path.stem}_label.png").shape
        )
        np.testing.assert_array_equal(labels, read_array(out / f"{path.stem}_label.png"))
        # = the protocol with the recipe's settings, computed without the Predictor
        want = slide_inference(model.segmenter, model.mu[rows], open_rgb(path), **INFER).numpy()
        np.testing.assert_array_equal(labels, want)
    # the run's settings matter: slide_inference's own defaults (512 windows) predict otherwise
    image = photos["rgb"][1]
    default = slide_inference(model.segmenter, model.mu[rows], image).numpy()
    assert (pred.predict(image)[0] != default).any()


def test_predictor_class_lists(model, photos):
    image = photos["rgb"][1]
    whole = Predictor.from_run(model.run, device="cpu")
    assert whole.names == model.names and whole.device == torch.device("cpu")
    # plain strings are names (not lists of characters); a list is one class's synonyms
    pred = Predictor.from_run(model.run, classes=["sky", ["edifice", "building"], "floor"])
    assert pred.names == ["sky", "edifice", "floor"]
    assert pred.rows.tolist() == [model.row_of[n] for n in ("sky", "building", "floor")]
    assert pred.is_base.tolist() == [True, True, True]
    labels, names = pred.predict(image, **INFER)
    mu = model.mu[pred.rows]
    np.testing.assert_array_equal(labels, slide_inference(model.segmenter, mu, image, **INFER))
    with pytest.raises(TypeError, match="list of class names"):
        Predictor.from_run(model.run, classes="sky")
    with pytest.raises(ValueError, match=r"model\.pt: 1 of 2 classes.*unicorn"):
        Predictor.from_run(model.run, classes=["sky", "unicorn"])


def test_package_exports_predictor_and_version():
    import larvess

    assert larvess.Predictor is Predictor
    assert larvess.__version__ == metadata.version("larvess")
    with pytest.raises(AttributeError, match="nope"):
        larvess.nope  # noqa: B018
