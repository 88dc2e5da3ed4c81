import json
import logging

import numpy as np
import pytest
import torch
from data_fixtures import coco_trainid, write_coco_stuff, write_jpeg, write_png
from PIL import Image
from pycocotools import mask as mask_utils

from larvess.data import coco_stuff
from larvess.data.coco_stuff import CocoStuff
from larvess.data.transforms import TrainAugment
from larvess.names import COCO_STUFF_UNUSED_IDS

# pycocotools' own numpy-2 deprecation when the fixture decodes masks
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

# labels.txt ids used by the fixture: things 1, 3, 90; stuff 92, 150, 182; 12 is unused
THINGS, STUFF = (1, 3, 90), (92, 150, 182)
H, W = 48, 64


def _write_labels(path):
    lines = ["0: unlabeled"] + [f"{i}: name{i}" for i in range(1, 183)]
    lines[92] = "92: banner-merged"
    path.write_text("\n".join(lines) + "\n")


def _local(cid):
    """labels.txt id -> class index, written plainly: position among the kept ids."""
    kept = [i for i in range(1, 183) if i not in COCO_STUFF_UNUSED_IDS]
    return kept.index(cid)


def _rle(mask):
    r = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": r["size"], "counts": r["counts"].decode("ascii")}


def _image_annotations(i):
    """(stuff anns, thing anns, expected label map of local ids) for image i."""
    rng = np.random.default_rng(i)
    stuff_map = np.zeros((H, W), np.int64)
    stuff_map[:, : W // 2] = STUFF[i % 3]
    stuff_map[:, W // 2 :] = STUFF[(i + 1) % 3]
    stuff_map[: H // 4] = 183  # "other": where things are, never painted
    stuff_map[-4:, -4:] = 0  # unannotated
    stuff = [
        {"category_id": int(c), "segmentation": _rle(stuff_map == c)}
        for c in np.unique(stuff_map)
        if c > 0
    ]
    y0 = int(rng.integers(0, 4))
    poly = [[2.0, y0, 20.0, y0, 20.0, 10.0, 2.0, 10.0]]  # a box as a polygon
    box = np.zeros((H, W), bool)
    box2 = np.zeros((H, W), bool)
    box2[2:11, 30:50] = True
    box2[30:36, 40:50] = True  # overlaps stuff: set back to ignore
    things = [
        {"category_id": THINGS[i % 3], "segmentation": poly, "iscrowd": 0},
        {"category_id": THINGS[(i + 1) % 3], "segmentation": _rle(box2), "iscrowd": 1},
    ]
    box[:] = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(poly, H, W))).astype(bool)
    expected = np.full((H, W), -1, np.int64)
    count = np.zeros((H, W), int)
    for c in np.unique(stuff_map):
        if c not in (0, 183):
            expected[stuff_map == c] = _local(int(c))
            count[stuff_map == c] += 1
    for m, c in ((box, THINGS[i % 3]), (box2, THINGS[(i + 1) % 3])):
        expected[m] = _local(c)
        count[m] += 1
    expected[count > 1] = -1
    return stuff, things, expected


@pytest.fixture
def coco_root(tmp_path):
    root = tmp_path / "coco"
    root.mkdir()
    _write_labels(root / "labels.txt")
    split = "train2017"
    images, stuff_anns, thing_anns, expected = [], [], [], {}
    aid = 1
    for i in range(3):
        name = f"{i:012d}"
        write_jpeg(root / "images" / split / f"{name}.jpg", H, W, i)
        stuff, things, exp = _image_annotations(i)
        expected[name] = exp
        png = np.where(exp >= 0, 0, 255)
        kept = [k for k in range(1, 183) if k not in COCO_STUFF_UNUSED_IDS]
        png[exp >= 0] = np.asarray(kept)[exp[exp >= 0]] - 1  # PNG value = id - 1
        write_png(root / "stuffthingmaps" / split / f"{name}.png", png)
        images.append({"id": 100 + i, "file_name": f"{name}.jpg", "height": H, "width": W})
        for a in stuff:
            stuff_anns.append({**a, "id": aid, "image_id": 100 + i, "iscrowd": 0})
            aid += 1
        for a in things:
            thing_anns.append({**a, "id": aid, "image_id": 100 + i})
            aid += 1
    cats_t = [{"id": c, "name": f"name{c}", "supercategory": "t"} for c in THINGS]
    cats_s = [{"id": c, "name": f"name{c}", "supercategory": "s"} for c in STUFF + (183,)]
    ann = root / "annotations"
    ann.mkdir()
    (ann / f"stuff_{split}.json").write_text(
        json.dumps({"images": images, "annotations": stuff_anns, "categories": cats_s})
    )
    (ann / f"instances_{split}.json").write_text(
        json.dumps({"images": images, "annotations": thing_anns, "categories": cats_t})
    )
    return root, expected


def test_png_and_json_paths_agree_with_plain_painting(coco_root):
    root, expected = coco_root
    png = CocoStuff(root)
    js = CocoStuff(root, from_json=True)
    assert len(png) == len(js) == 3 and len(png.class_names) == 171
    assert _local(92) == 80 and png.class_names[80] == ["banner-merged"]  # the 80 things first
    seen = set()
    for k in range(3):
        img_p, lab_p, key_p = png.load(k)
        img_j, lab_j, key_j = js.load(k)
        assert key_p == key_j and img_p.shape == (H, W, 3) and np.array_equal(img_p, img_j)
        exp = expected[key_p]
        np.testing.assert_array_equal(lab_p, exp)
        np.testing.assert_array_equal(lab_j, exp)
        seen |= set(np.unique(exp).tolist())
    assert seen == {-1} | {_local(c) for c in THINGS + STUFF}


def test_json_names_without_labels_file(coco_root):
    root, _ = coco_root
    (root / "labels.txt").unlink()
    js = CocoStuff(root, from_json=True)
    assert js.class_names == [[f"name{c}"] for c in sorted(THINGS + STUFF)]
    _, lab, _ = js.load(0)
    assert set(np.unique(lab)) <= {-1, 0, 1, 2, 3, 4, 5}


def test_sample_rows_and_ignore(coco_root):
    root, expected = coco_root
    rows = torch.arange(171) + 200  # vocabulary rows beyond 255: 255 must not mean ignore
    ds = CocoStuff(root, rows=rows, transform=TrainAugment(crop_size=32))
    s = ds.get(0, np.random.default_rng(0))
    assert s["image"].shape == (3, 32, 32) and s["image"].dtype == torch.float32
    assert s["label"].shape == (32, 32) and s["label"].dtype == torch.int64
    vals = set(s["label"].unique().tolist())
    exp_rows = {v + 200 for v in np.unique(expected[s["key"]]) if v >= 0}
    assert vals <= exp_rows | {-1} and vals & exp_rows
    # identity rows, without augmentation randomness in the comparison: same rng -> same sample
    ident = CocoStuff(root, rows=torch.arange(171), transform=TrainAugment(crop_size=32))
    s2 = ident.get(0, np.random.default_rng(0))
    lab = s2["label"]
    assert torch.equal(torch.where(lab >= 0, lab + 200, lab), s["label"])


def test_missing_files_error_or_skip(coco_root, caplog):
    root, _ = coco_root
    (root / "stuffthingmaps" / "train2017" / "000000000001.png").unlink()
    with pytest.raises(FileNotFoundError, match="000000000001.jpg"):
        CocoStuff(root)
    with caplog.at_level(logging.WARNING):
        ds = CocoStuff(root, skip_missing=True)
    assert len(ds) == 2 and ds.n_skipped == 1 and "skipped 1" in caplog.text
    (root / "images" / "train2017" / "000000000002.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="000000000002.jpg"):
        CocoStuff(root, from_json=True)
    assert CocoStuff(root, from_json=True, skip_missing=True).n_skipped == 1


def test_bad_values_and_sizes_name_the_file(coco_root):
    root, _ = coco_root
    bad = root / "stuffthingmaps" / "train2017" / "000000000000.png"
    write_png(bad, np.full((H, W), 200, np.uint8))
    with pytest.raises(ValueError, match=r"000000000000.png: label value 200"):
        CocoStuff(root).load(0)
    write_png(bad, np.zeros((H, W + 1), np.uint8))
    with pytest.raises(ValueError, match=r"000000000000.jpg: image size"):
        CocoStuff(root).load(0)


def test_non_coco_labels_file_keeps_every_listed_id(tmp_path):
    root = tmp_path / "toy"
    root.mkdir()
    (root / "labels.txt").write_text("0: unlabeled\n1: red\n2: green\n3: blue\n")
    write_jpeg(root / "images" / "train2017" / "a.jpg", 20, 30, 0)
    lab = np.zeros((20, 30), np.uint8)
    lab[:, 10:] = 2
    lab[:5] = 255
    write_png(root / "stuffthingmaps" / "train2017" / "a.png", lab, palette=True)
    ds = CocoStuff(root)
    assert ds.class_names == [["red"], ["green"], ["blue"]]
    _, label, _ = ds.load(0)
    ref = np.where(lab == 255, -1, lab.astype(np.int64))
    np.testing.assert_array_equal(label, ref)
    write_png(root / "stuffthingmaps" / "train2017" / "a.png", np.full((20, 30), 3, np.uint8))
    with pytest.raises(ValueError, match="label value 3"):
        ds.load(0)


def test_read_class_names_without_data(coco_root):
    root, _ = coco_root
    assert CocoStuff.read_class_names(root) == CocoStuff(root, split=None).class_names
    with pytest.raises(FileNotFoundError, match="nolabels.txt"):
        CocoStuff.read_class_names(root, root / "nolabels.txt")


# --- the on-disk layouts, with the package's class names (no labels.txt in any download) ---

GIRAFFE, GRASS, PERSON, WOOD, STOP_SIGN = 25, 124, 1, 182, 13  # labels.txt ids
LAYOUTS = {  # fixture layout -> (detected layout, label format)
    "raw": ("raw", "raw182"),
    "raw_stuffthingmaps": ("raw", "raw182"),
    "mmseg": ("mmseg", "trainid171"),
    "zsseg": ("zsseg", "trainid171"),
    "zsseg_only": ("zsseg", "trainid171"),
    "catseg": ("catseg", "trainid171"),
    "catseg_only": ("catseg", "trainid171"),
}


def _scenes(n=2, h=24, w=32):
    """{stem: labels.txt id map}: mostly giraffe, grass and wood bands, a person, unlabeled."""
    out = {}
    for i in range(n):
        ids = np.full((h, w), GIRAFFE)
        ids[:, : 4 + i] = GRASS
        ids[-3:] = WOOD
        ids[2:6, 20:24] = PERSON
        ids[0, :] = 0
        out[f"{i:012d}"] = ids
    return out


def _expected(ids):
    return np.vectorize(lambda c: -1 if c == 0 else coco_trainid(int(c)))(ids)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_each_layout_detected_and_read_with_the_right_class(tmp_path, layout, capsys):
    root = tmp_path / "coco"
    scenes = _scenes()
    write_coco_stuff(root, layout, scenes)
    ds = CocoStuff(root, transform=TrainAugment(crop_size=16))
    assert (ds.layout, ds.label_format) == LAYOUTS[layout]
    assert "layout " + LAYOUTS[layout][0] in capsys.readouterr().err  # announced once
    CocoStuff(root)
    assert "layout" not in capsys.readouterr().err
    assert len(ds.class_names) == 171 and ds.wnids is None
    assert ds.class_names[coco_trainid(GIRAFFE)] == ["giraffe"] and coco_trainid(GIRAFFE) == 23
    assert ds.class_names[0] == ["person"] and ds.class_names[170] == ["wood"]
    assert len(ds) == 2
    for k in range(2):
        _, label, key = ds.load(k)
        np.testing.assert_array_equal(label, _expected(scenes[key]))
    rows = torch.arange(171) + 1000
    ds.set_rows(rows)
    assert torch.equal(ds.rows, rows)
    s = ds.get(0, np.random.default_rng(0))
    vals = set(s["label"].unique().tolist())
    assert 1000 + 23 in vals  # a giraffe pixel -> the giraffe row
    assert vals <= {-1} | {1000 + coco_trainid(c) for c in (GIRAFFE, GRASS, PERSON, WOOD)}


def test_precedence_and_explicit_override(tmp_path, capsys):
    root = tmp_path / "coco"
    scenes = _scenes()
    write_coco_stuff(root, "zsseg", scenes)  # stuffthingmaps/ (raw) + _detectron2
    write_coco_stuff(root, "mmseg", scenes)  # annotations/: raw + _labelTrainIds
    ds = CocoStuff(root)
    err = capsys.readouterr().err
    assert ds.layout == "zsseg" and ds.label_dir.name == "train2017"
    assert "also present, not used: mmseg" in err and "raw (" in err
    assert ds.items[0][1].parent == root / "images" / "train2017"  # before root/train2017
    raw = CocoStuff(root, label_format="raw182")
    assert raw.layout == "raw" and raw.label_dir == root / "annotations" / "train2017"
    assert all(not p.name.endswith("_labelTrainIds.png") for _, _, p in raw.items)
    assert len(raw) == 2 and raw.items[0][1].parent == root / "images" / "train2017"
    for d in (ds, raw):
        _, label, key = d.load(1)
        np.testing.assert_array_equal(label, _expected(scenes[key]))
    (root / "stuffthingmaps_detectron2").rename(tmp_path / "elsewhere")
    mm = CocoStuff(root)
    assert mm.layout == "mmseg" and mm.items[0][2].name == "000000000000_labelTrainIds.png"
    _, label, key = mm.load(1)
    np.testing.assert_array_equal(label, _expected(scenes[key]))
    with pytest.raises(ValueError, match="label_format must be one of"):
        CocoStuff(root, label_format="raw")


def test_override_reads_a_raw_named_folder_as_trainids(tmp_path, caplog):
    """trainId PNGs converted in place into stuffthingmaps/: read as raw182 they fail on the
    first trainId that is an unused raw value; label_format="trainid171" reads them."""
    root = tmp_path / "coco"
    scenes = _scenes()
    scenes["000000000000"][8:10, 8:10] = STOP_SIGN  # trainId 11 = raw value of unused id 12
    write_coco_stuff(root, "raw_stuffthingmaps", scenes)
    for stem, ids in scenes.items():
        trainid = np.where(ids == 0, 255, _expected(ids))
        write_png(root / "stuffthingmaps" / "train2017" / f"{stem}.png", trainid)
    auto = CocoStuff(root)
    assert auto.label_format == "raw182"
    with pytest.raises(ValueError, match=r"000000000000.png: label value 11 is COCO-Stuff id 12"):
        auto.load(0)
    with caplog.at_level(logging.WARNING):
        ds = CocoStuff(root, label_format="trainid171")
    assert "no trainid171 layout" in caplog.text
    assert (ds.layout, ds.label_format) == ("raw", "trainid171")
    for k in range(2):
        _, label, key = ds.load(k)
        np.testing.assert_array_equal(label, _expected(scenes[key]))


def test_invalid_values_name_file_and_value(tmp_path):
    root = tmp_path / "coco"
    write_coco_stuff(root, "mmseg", _scenes())
    raw_png = root / "annotations" / "train2017" / "000000000001.png"
    tid_png = root / "annotations" / "train2017" / "000000000001_labelTrainIds.png"
    for value in (11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90):
        lab = np.asarray(Image.open(raw_png)).copy()
        lab[5, 5] = value
        write_png(raw_png, lab)
        ds = CocoStuff(root, label_format="raw182")
        with pytest.raises(
            ValueError,
            match=rf"000000000001.png: label value {value} is "
            rf"COCO-Stuff id {value + 1} .*never used",
        ):
            ds.load(1)
    lab[5, 5] = 182  # beyond the 182 ids of labels.txt
    write_png(raw_png, lab)
    with pytest.raises(ValueError, match=r"000000000001.png: label value 182 is not a class"):
        CocoStuff(root, label_format="raw182").load(1)
    for value in (171, 200, 254):
        lab = np.asarray(Image.open(tid_png)).copy()
        lab[3, 3] = value
        write_png(tid_png, lab)
        with pytest.raises(
            ValueError,
            match=rf"000000000001_labelTrainIds.png: label value "
            rf"{value} is not a trainid171 value \(0..170, 255 ignore\)",
        ):
            CocoStuff(root).load(1)
    CocoStuff(root).load(0)  # the other image is fine


def test_set_rows_checks_length_and_names_root(tmp_path):
    root = tmp_path / "coco"
    write_coco_stuff(root, "raw", _scenes(1))
    ds = CocoStuff(root, transform=TrainAugment(crop_size=16))
    assert ds.rows is None
    with pytest.raises(RuntimeError, match=rf"CocoStuff {root}: set_rows\(rows\) was not called"):
        ds.get(0, np.random.default_rng(0))  # local ids must not pass for vocabulary rows
    with pytest.raises(ValueError, match=rf"CocoStuff {root}: rows has shape \(170,\)"):
        ds.set_rows(torch.arange(170))
    with pytest.raises(ValueError, match="one row per class"):
        ds.rows = torch.arange(172)  # the attribute form validates too
    with pytest.raises(ValueError, match=str(root)):
        CocoStuff(root, rows=torch.arange(3))
    ds.rows = torch.arange(171)
    assert ds.rows.dtype == torch.int64


def test_names_file_precedence_and_missing_labels(tmp_path):
    root = tmp_path / "coco"
    write_coco_stuff(root, "raw", _scenes(1))
    assert CocoStuff.read_class_names(root)[23] == ["giraffe"]  # the package's labels.txt
    lines = ["0: unlabeled"] + [f"{i}: my{i}" for i in range(1, 183)]
    (tmp_path / "mine.txt").write_text("\n".join(lines) + "\n")
    assert CocoStuff(root, labels_file=tmp_path / "mine.txt").class_names[23] == ["my25"]
    (root / "labels.txt").write_text("\n".join(lines) + "\n")
    assert CocoStuff.read_class_names(root)[23] == ["my25"]
    with pytest.raises(
        FileNotFoundError,
        match=r"no COCO-Stuff label maps for split 'val2017'; looked for .*annotations_detectron2"
        r"/val2017/\*\.png.*Unzip stuffthingmaps_trainval2017\.zip into",
    ):
        CocoStuff(root, split="val2017")
    with pytest.raises(FileNotFoundError, match="COCO-Stuff root not found"):
        CocoStuff(tmp_path / "nowhere")


def test_announce_goes_through_logging_when_configured(tmp_path, capsys, caplog):
    root = tmp_path / "coco"
    write_coco_stuff(root, "raw", _scenes(1))
    coco_stuff._ANNOUNCED.clear()
    with caplog.at_level(logging.INFO, logger="larvess.data.coco_stuff"):
        CocoStuff(root)
    assert "layout raw" in caplog.text
