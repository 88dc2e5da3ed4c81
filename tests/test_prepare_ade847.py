"""scripts/prepare_ade847.py on a small ADE20K_2021_17_01 fixture in the download's real layout."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from data_fixtures import REFERENCE, make_ade_full_download
from PIL import Image

from larvess.data.ade import AdeEval, AdeTrain

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "prepare_ade847.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("_prepare_ade847", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # worker processes find convert_one by module name
    spec.loader.exec_module(mod)
    return mod


prep = _load_script()


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


def _expected(classes: np.ndarray) -> np.ndarray:
    return np.vectorize(lambda c: TABLE.get(int(c), 65535))(classes)


IMAGES = [  # (split, scene folder, stem, class map), nested as in the download
    ("training", "urban/street", "ADE_train_00000001", _classes(40, 56, 1)),
    ("training", "home_or_hotel/bathroom", "ADE_train_00000002", _classes(48, 36, 2)),
    ("training", "urban/street", "ADE_frame_00000007", _classes(32, 32, 3)),
    ("validation", "cultural/apse__indoor", "ADE_val_00000001", _classes(44, 60, 4)),
]


@pytest.fixture
def download(tmp_path):
    return make_ade_full_download(tmp_path / "data", IMAGES)


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
    info = prep.prepare(parent, progress=False)
    assert (info["written"], info["present"], info["skipped"]) == (4, 0, 0)
    assert info["index_used"] and info["per_split"] == {"training": 3, "validation": 1}
    out = download  # default: inside ADE20K_2021_17_01, as detectron2 expects
    assert info["out"] == str(out)
    assert info["unmapped_pixels"] == sum(int((c == OUTSIDE).sum()) for *_, c in IMAGES)
    for split, scene, stem, classes in IMAGES:
        lab = _tif(out, split, stem)
        np.testing.assert_array_equal(lab, _expected(classes))
        src = download / "images" / "ADE" / split / scene / f"{stem}.jpg"
        dst = out / "images_detectron2" / split / f"{stem}.jpg"
        assert os.stat(dst).st_ino == os.stat(src).st_ino  # hard link, the bytes unchanged
    with Image.open(out / "annotations_detectron2" / "training" / "ADE_train_00000001.tif") as im:
        assert im.info["compression"] in ("tiff_deflate", "tiff_adobe_deflate")
    lab = _tif(out, "training", "ADE_train_00000001")
    assert {0, 1, 245, 846, 65535} == set(np.unique(lab).tolist())
    # the readers: given the parent of ADE20K_2021_17_01, default names from the package
    tr = AdeTrain(parent, full=True)
    assert tr.root == out and len(tr) == 3 and len(tr.class_names) == 847
    assert tr.class_names[TABLE[WALL]] == ["wall"]
    for k in range(3):
        _, label, key = tr.load(k)
        classes = next(c for _, _, s, c in IMAGES if s == key)
        exp = _expected(classes)
        np.testing.assert_array_equal(label, np.where(exp == 65535, -1, exp))
    ev = AdeEval(parent, "ade847")
    item = ev[0]
    assert item["key"] == "ADE_val_00000001" and item["image"].shape == (44, 60, 3)
    assert set(np.unique(item["label"]).tolist()) <= {-1, 0, 1, 245, 846}


def test_resume_repair_and_tree_walk(download, tmp_path):
    out = tmp_path / "out"
    first = prep.prepare(
        download, out, images="copy", use_index=False, progress=False, compression="none"
    )
    assert first["written"] == 4 and not first["index_used"]
    with Image.open(out / "annotations_detectron2" / "training" / "ADE_train_00000002.tif") as im:
        assert im.info["compression"] == "raw"
    again = prep.prepare(download, out, images="copy", use_index=False, progress=False)
    assert (again["written"], again["present"]) == (0, 4)
    tif = out / "annotations_detectron2" / "training" / "ADE_train_00000002.tif"
    tif.write_bytes(tif.read_bytes()[:200])  # truncated by a crash of some other tool
    (out / "images_detectron2" / "validation" / "ADE_val_00000001.jpg").unlink()
    stale = out / "annotations_detectron2" / "training" / ".ADE_train_00000001.tif.99.partial"
    stale.write_bytes(b"half")
    fixed = prep.prepare(download, out, images="copy", workers=2, progress=False)
    assert (fixed["written"], fixed["present"], fixed["stale_partials_removed"]) == (2, 2, 1)
    assert not stale.exists()
    np.testing.assert_array_equal(
        _tif(out, "training", "ADE_train_00000002"), _expected(IMAGES[1][3])
    )
    assert len(AdeEval(out, "ade847")) == 1 and len(AdeTrain(out, full=True)) == 3


def test_skipped_files_are_counted_and_reported(download, tmp_path, capsys):
    street = download / "images" / "ADE" / "training" / "urban" / "street"
    (street / "ADE_frame_00000007_seg.png").unlink()
    bad = download / "images/ADE/training/home_or_hotel/bathroom/ADE_train_00000002_seg.png"
    bad.write_bytes(b"not a png")
    (street / "ADE_train_00000099.jpg").write_bytes(
        (street / "ADE_train_00000001.jpg").read_bytes()
    )
    out = tmp_path / "out"
    rc = prep.main(["--root", str(download.parent), "--out", str(out), "--no-progress"])
    printed = capsys.readouterr().out
    assert rc == 1
    assert "2 written, 0 already complete, 2 skipped" in printed
    assert "1 .jpg files under images/ADE are not in the index" in printed
    listed = (out / "prepare_ade847_skipped.txt").read_text()
    assert "training/ADE_frame_00000007.jpg" in listed and "_seg.png missing" in listed
    assert "training/ADE_train_00000002.jpg" in listed and "unreadable" in listed
    assert len(AdeTrain(out, full=True)) == 1  # the readable training image


def test_max_short_side_and_cli(download, tmp_path):
    out = tmp_path / "small"
    cmd = [sys.executable, str(SCRIPT), "--root", str(download), "--out", str(out)]
    cmd += ["--max-short-side", "16", "--splits", "validation", "--no-progress", "--workers", "1"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "1 written" in res.stdout and "reader root:" in res.stdout
    assert not (out / "images_detectron2" / "training").exists()
    lab = _tif(out, "validation", "ADE_val_00000001")
    assert lab.shape == (16, round(60 / 44 * 16))  # shorter side 16, aspect kept
    # nearest neighbour: source pixel floor(x * scale) of the full-resolution trainId map
    full = _expected(IMAGES[3][3])
    rows = (np.arange(16) * (44 / 16)).astype(int)
    cols = (np.arange(lab.shape[1]) * (60 / lab.shape[1])).astype(int)
    np.testing.assert_array_equal(lab, full[rows[:, None], cols[None, :]])
    with Image.open(out / "images_detectron2" / "validation" / "ADE_val_00000001.jpg") as im:
        assert im.size == (lab.shape[1], 16)
    ev = AdeEval(out, "ade847")
    assert ev[0]["image"].shape[:2] == ev[0]["label"].shape == lab.shape
    res = subprocess.run(cmd[:3] + [str(tmp_path / "nothing")], capture_output=True, text=True)
    assert res.returncode == 2 and "no ADE20K_2021_17_01 download" in res.stderr


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
