"""ADE-847 preparation (larvess-prepare-ade847: larvess/commands/prepare_ade847.py, the work in
larvess/data/ade847_prepare.py, OpenCV's resize rules in cv_resize.py) on a small
ADE20K_2021_17_01 fixture in the download's real layout, index_ade20k.pkl with the release's keys,
and an image above 512 px so MaskFormer's default resize runs."""

import io
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from data_fixtures import REFERENCE, make_ade_full_download
from PIL import Image

from larvess.commands.prepare_ade847 import main
from larvess.data import ade847_prepare as prep
from larvess.data.ade import AdeEval, AdeTrain
from larvess.data.cv_resize import nearest_index, resize_linear, resize_nearest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "prepare_ade847.py"


def _table() -> dict[int, int]:
    """ade_full_id -> trainId, read plainly from the shipped table."""
    lines = (REFERENCE / "ade847_categories.tsv").read_text().splitlines()[1:]
    return {int(ln.split("\t")[1]): int(ln.split("\t")[0]) for ln in lines}


TABLE = _table()
WALL, BUILDING, BANNER, ADDING_MACHINE = 2978, 312, 118, 3148  # full-ADE ids in the 847
OUTSIDE = min(set(range(1, 3689)) - set(TABLE))  # a full-ADE class not among the 847


def _classes(h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    tiles = rng.choice(
        [0, WALL, BUILDING, BANNER, ADDING_MACHINE, OUTSIDE], (h // 4 + 1, w // 4 + 1)
    )
    return np.kron(tiles, np.ones((4, 4), np.int64))[:h, :w]


_LUT = np.full(26 * 256, 65535, np.int64)
_LUT[list(TABLE)] = list(TABLE.values())


def _expected(classes: np.ndarray) -> np.ndarray:
    """Full-ADE class map -> trainIds (65535 outside the 847), at full resolution."""
    return _LUT[classes]


def _cv_nearest(full: np.ndarray, w: int, h: int) -> np.ndarray:
    """OpenCV's INTER_NEAREST (resize.cpp resizeNN), written out: src = floor(x * (1 / scale))."""
    fx, fy = w / full.shape[1], h / full.shape[0]
    cols = [min(math.floor(x * (1.0 / fx)), full.shape[1] - 1) for x in range(w)]
    rows = [min(math.floor(y * (1.0 / fy)), full.shape[0] - 1) for y in range(h)]
    return full[np.ix_(rows, cols)]


IMAGES = [  # (split, scene folder, stem, class map), nested as in the download
    ("training", "urban/street", "ADE_train_00000001", _classes(40, 56, 1)),
    ("training", "home_or_hotel/bathroom", "ADE_train_00000002", _classes(48, 36, 2)),
    ("training", "urban/street", "ADE_frame_00000007", _classes(32, 32, 3)),
    ("validation", "cultural/apse__indoor", "ADE_val_00000001", _classes(44, 60, 4)),
]


# shorter side 520 > 512: MaskFormer's script resizes it to 689 x 512 (round(700 / 520 * 512))
BIG = ("training", "urban/street", "ADE_train_00000003", _classes(520, 700, 5))
BIG_SIZE = (689, 512)


@pytest.fixture
def download(tmp_path):
    return make_ade_full_download(tmp_path / "data", [*IMAGES, BIG])


def _tif(out: Path, split: str, stem: str) -> np.ndarray:
    with Image.open(out / "annotations_detectron2" / split / f"{stem}.tif") as im:
        assert im.mode == "I;16"
        return np.asarray(im).astype(np.int64)


def test_fixture_encoding_matches_the_ade_decoder(download):
    """The fixture's _seg.png decodes back with ADE's own R/10*256+G formula."""
    seg = download / "images/ADE/training/urban/street/ADE_train_00000001_seg.png"
    rgb = np.asarray(Image.open(seg))
    cls = (rgb[..., 0] / 10).astype(np.int32) * 256 + rgb[..., 1].astype(np.int32)
    np.testing.assert_array_equal(cls, IMAGES[0][3])
    assert (rgb[..., 0] % 10).any()  # R carries more than the class: the floor matters


def test_round_trip_values_and_readers(download, tmp_path):
    parent = download.parent
    with pytest.raises(FileNotFoundError, match="prepare_ade847.py --root"):
        AdeTrain(parent, full=True)
    info = prep.prepare(parent, progress=False)  # defaults: short side 512, as MaskFormer
    assert (info["written"], info["present"], info["skipped"]) == (5, 0, 0)
    assert info["index_used"] and info["per_split"] == {"training": 4, "validation": 1}
    out = download  # default: inside ADE20K_2021_17_01, as detectron2 expects
    assert info["out"] == str(out)
    everything = [*IMAGES, BIG]
    assert info["unmapped_pixels"] == sum(int((c == OUTSIDE).sum()) for *_, c in everything)
    for split, scene, stem, classes in IMAGES:  # below 512: full size, image bytes kept
        lab = _tif(out, split, stem)
        np.testing.assert_array_equal(lab, _expected(classes))
        src = download / "images" / "ADE" / split / scene / f"{stem}.jpg"
        dst = out / "images_detectron2" / split / f"{stem}.jpg"
        assert os.stat(dst).st_ino == os.stat(src).st_ino  # hard link, the bytes unchanged
    lab = _tif(out, "training", BIG[2])  # above 512: resized as MaskFormer's cv2 calls do
    np.testing.assert_array_equal(lab, _cv_nearest(_expected(BIG[3]), *BIG_SIZE))
    src = download / "images" / "ADE" / "training" / BIG[1] / f"{BIG[2]}.jpg"
    written = out / "images_detectron2" / "training" / f"{BIG[2]}.jpg"
    with Image.open(written) as im:
        assert im.size == BIG_SIZE and im.format == "JPEG"
    # the source resized by OpenCV's bilinear rule (tested below), saved as MaskFormer's
    # Image.save does (PIL's default quality 75)
    buf = io.BytesIO()
    Image.fromarray(resize_linear(np.asarray(Image.open(src).convert("RGB")), BIG_SIZE)).save(
        buf, format="JPEG", quality=75
    )
    assert written.read_bytes() == buf.getvalue()
    with Image.open(out / "annotations_detectron2" / "training" / "ADE_train_00000001.tif") as im:
        assert im.info["compression"] in ("tiff_deflate", "tiff_adobe_deflate")
    lab = _tif(out, "training", "ADE_train_00000001")
    assert {0, 1, 245, 846, 65535} == set(np.unique(lab).tolist())
    # the readers: given the parent of ADE20K_2021_17_01, default names from the package
    tr = AdeTrain(parent, full=True)
    assert tr.root == out and len(tr) == 4 and len(tr.class_names) == 847
    assert tr.class_names[TABLE[WALL]] == ["wall"]
    for k in range(4):
        image, label, key = tr.load(k)
        classes = next(c for _, _, s, c in everything if s == key)
        exp = _expected(classes)
        if key == BIG[2]:
            exp = _cv_nearest(exp, *BIG_SIZE)
        np.testing.assert_array_equal(label, np.where(exp == 65535, -1, exp))
        assert image.shape[:2] == label.shape
    ev = AdeEval(parent, "ade847")
    item = ev[0]
    assert item["key"] == "ADE_val_00000001" and item["image"].shape == (44, 60, 3)
    assert set(np.unique(item["label"]).tolist()) <= {-1, 0, 1, 245, 846}


def test_nearest_is_opencvs_rule_not_the_exact_ratio():
    """Where x * src / dst is an exact integer, OpenCV's floor(x * (1 / (dst / src))) can pick
    the pixel before it; the resize must follow OpenCV (MaskFormer's labels), not the ratio."""
    cases = [(2200, 768), (1467, 512), (22, 18), (33, 27), (36, 28), (700, 689), (520, 512)]
    differ = 0
    for src, dst in cases:
        ref = [min(math.floor(x * (1.0 / (dst / src))), src - 1) for x in range(dst)]
        assert nearest_index(src, dst).tolist() == ref, (src, dst)
        differ += sum(r != x * src // dst for x, r in enumerate(ref))
    assert differ > 0  # the cases do tell the two rules apart
    assert nearest_index(2200, 768)[288] == 824  # 288 * 2200 / 768 = 825 exactly
    a = np.arange(22 * 33).reshape(22, 33)
    np.testing.assert_array_equal(resize_nearest(a, (27, 18)), _cv_nearest(a, 27, 18))


def _cv_linear_float(img: np.ndarray, w: int, h: int) -> np.ndarray:
    """OpenCV's INTER_LINEAR geometry in float64: half-pixel centres, two clamped taps."""

    def taps(src: int, dst: int):
        out = []
        for x in range(dst):
            f = (x + 0.5) * src / dst - 0.5
            i = math.floor(f)
            f -= i
            if i < 0:
                i, f = 0, 0.0
            if i >= src - 1:
                i, f = src - 1, 0.0
            out.append((i, min(i + 1, src - 1), f))
        return out

    a = img.astype(np.float64)
    tx, ty = taps(img.shape[1], w), taps(img.shape[0], h)
    horiz = np.stack([a[:, i] * (1 - f) + a[:, j] * f for i, j, f in tx], axis=1)
    return np.stack([horiz[i] * (1 - f) + horiz[j] * f for i, j, f in ty], axis=0)


@pytest.mark.parametrize(
    "src,dst", [((37, 29), (16, 12)), ((40, 50), (64, 80)), ((33, 22), (27, 18))]
)
def test_linear_resize_follows_opencvs_geometry(src, dst):
    img = np.random.default_rng(0).integers(0, 256, (src[1], src[0], 3), dtype=np.uint8)
    got = resize_linear(img, dst).astype(np.float64)
    assert got.shape == (dst[1], dst[0], 3)
    assert np.abs(got - _cv_linear_float(img, *dst)).max() <= 1  # 11-bit weights, one rounding


def test_against_opencv_itself():
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(1)
    for (sw, sh), (dw, dh) in [((2200, 1467), (768, 512)), ((700, 520), BIG_SIZE)]:
        lab = rng.integers(0, 3000, (sh, sw), dtype=np.int32)
        got = resize_nearest(lab, (dw, dh))
        np.testing.assert_array_equal(
            got, cv2.resize(lab, (dw, dh), interpolation=cv2.INTER_NEAREST)
        )
        img = rng.integers(0, 256, (sh, sw, 3), dtype=np.uint8)
        ref = cv2.resize(img, (dw, dh), interpolation=cv2.INTER_LINEAR).astype(int)
        assert np.abs(resize_linear(img, (dw, dh)).astype(int) - ref).max() <= 1


def test_fixture_index_has_the_release_keys(download):
    import pickle

    with open(download / "index_ade20k.pkl", "rb") as f:
        idx = pickle.load(f)
    assert len(idx) == 16 and set(idx["description"]) == set(idx) - {"description"}
    assert idx["objectPresence"].dtype == np.float64 and idx["objectPresence"].shape == (3688, 5)
    assert idx["scene"][0] == "/street" and idx["filename"][0] == "ADE_train_00000001.jpg"
    # the presence counts agree with the class maps the images were drawn from
    assert idx["objectPresence"][WALL - 1].sum() == sum(
        bool((c == WALL).any()) for *_, c in [*IMAGES, BIG]
    )


def test_resume_repair_and_tree_walk(download, tmp_path):
    out = tmp_path / "out"
    kw = dict(images="copy", use_index=False, progress=False, max_short_side=0)
    first = prep.prepare(download, out, compression="none", **kw)
    assert first["written"] == 5 and not first["index_used"]
    with Image.open(out / "annotations_detectron2" / "training" / "ADE_train_00000002.tif") as im:
        assert im.info["compression"] == "raw"
    again = prep.prepare(download, out, **kw)
    assert (again["written"], again["present"]) == (0, 5)
    tif = out / "annotations_detectron2" / "training" / "ADE_train_00000002.tif"
    tif.write_bytes(tif.read_bytes()[:200])  # truncated by a crash of some other tool
    (out / "images_detectron2" / "validation" / "ADE_val_00000001.jpg").unlink()
    stale = out / "annotations_detectron2" / "training" / ".ADE_train_00000001.tif.99.partial"
    stale.write_bytes(b"half")
    fixed = prep.prepare(download, out, images="copy", workers=2, progress=False, max_short_side=0)
    assert (fixed["written"], fixed["present"], fixed["stale_partials_removed"]) == (2, 3, 1)
    assert not stale.exists()
    np.testing.assert_array_equal(
        _tif(out, "training", "ADE_train_00000002"), _expected(IMAGES[1][3])
    )
    assert len(AdeEval(out, "ade847")) == 1 and len(AdeTrain(out, full=True)) == 4


def test_skipped_files_are_counted_and_reported(download, tmp_path, capsys):
    street = download / "images" / "ADE" / "training" / "urban" / "street"
    (street / "ADE_frame_00000007_seg.png").unlink()
    bad = download / "images/ADE/training/home_or_hotel/bathroom/ADE_train_00000002_seg.png"
    bad.write_bytes(b"not a png")
    (street / "ADE_train_00000099.jpg").write_bytes(
        (street / "ADE_train_00000001.jpg").read_bytes()
    )
    out = tmp_path / "out"
    rc = main(["--root", str(download.parent), "--out", str(out), "--no-progress"])
    printed = capsys.readouterr().out
    assert rc == 1
    assert "3 written, 0 already complete, 2 skipped" in printed
    assert "1 .jpg files under images/ADE are not in the index" in printed
    listed = (out / "prepare_ade847_skipped.txt").read_text()
    assert "training/ADE_frame_00000007.jpg" in listed and "_seg.png missing" in listed
    assert "training/ADE_train_00000002.jpg" in listed and "unreadable" in listed
    assert len(AdeTrain(out, full=True)) == 2  # the readable training images


def test_max_short_side_and_cli(download, tmp_path, capsys):
    out = tmp_path / "small"
    cmd = [sys.executable, str(SCRIPT), "--root", str(download), "--out", str(out)]
    cmd += ["--max-short-side", "16", "--splits", "validation", "--no-progress", "--workers", "1"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "1 written" in res.stdout and "reader root:" in res.stdout
    assert not (out / "images_detectron2" / "training").exists()
    lab = _tif(out, "validation", "ADE_val_00000001")
    assert lab.shape == (16, round(60 / 44 * 16))  # shorter side 16, aspect kept
    # nearest neighbour as OpenCV's INTER_NEAREST, from the full-resolution trainId map
    np.testing.assert_array_equal(lab, _cv_nearest(_expected(IMAGES[3][3]), lab.shape[1], 16))
    with Image.open(out / "images_detectron2" / "validation" / "ADE_val_00000001.jpg") as im:
        assert im.size == (lab.shape[1], 16)
    ev = AdeEval(out, "ade847")
    assert ev[0]["image"].shape[:2] == ev[0]["label"].shape == lab.shape
    assert main(["--root", str(tmp_path / "nothing")]) == 2
    assert "no ADE20K_2021_17_01 download" in capsys.readouterr().err
    with pytest.raises(SystemExit) as ex:
        main(["--help"])
    assert ex.value.code == 0 and "default 512, as MaskFormer" in " ".join(
        capsys.readouterr().out.split()
    )


def test_table_is_checked(tmp_path):
    lut = prep.read_847_table()
    assert int(lut[WALL]) == 0 and int(lut[ADDING_MACHINE]) == 846 and int(lut[0]) == 65535
    assert (lut != 65535).sum() == 847
    bad = tmp_path / "t.tsv"
    bad.write_text("trainId\tade_full_id\tname\n0\t5\ta\n2\t6\tb\n")
    with pytest.raises(ValueError, match="trainId 2, expected 1"):
        prep.read_847_table(bad)
    bad.write_text("trainId\tade_full_id\tname\n0\t5\ta\n1\t5\tb\n")
    with pytest.raises(ValueError, match="ade_full_id 5 out of .* or repeated"):
        prep.read_847_table(bad)
