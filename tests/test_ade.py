import numpy as np
import pytest
import torch
from data_fixtures import make_ade150, make_ade847, write_png, write_tiff16
from PIL import Image

from larvess.data.ade import AdeEval, AdeTrain
from larvess.data.transforms import TrainAugment


def _raw(path):
    return np.asarray(Image.open(path)).astype(np.int64)


def test_ade150_mask_reader_maps_zero_to_ignore(tmp_path):
    d = make_ade150(tmp_path, n_images=3, n_classes=5)
    for root in (d, tmp_path):  # the dataset folder or its parent
        ds = AdeTrain(root)
        assert len(ds) == 3 and ds.class_names[2] == ["class2", "syn2"] and len(ds.class_names) == 5
    for k in range(3):
        image, label, key = ds.load(k)
        raw = _raw(d / "annotations" / "training" / f"{key}.png")
        np.testing.assert_array_equal(label, np.where(raw == 0, -1, raw - 1))
        assert image.dtype == np.uint8 and image.shape == (*label.shape, 3)
        assert (label == -1).any() and label.max() == 4
    rows = torch.tensor([300, 10, 255, 7, 0])
    s = AdeTrain(d, rows=rows, transform=TrainAugment(crop_size=40)).get(
        1, np.random.default_rng(3)
    )
    assert s["image"].shape == (3, 40, 40) and s["label"].shape == (40, 40)
    assert set(s["label"].unique().tolist()) <= {-1, 300, 10, 255, 7, 0}


def test_ade847_tiff_keeps_65535_as_ignore(tmp_path):
    root = make_ade847(tmp_path, n_images=2, n_classes=300)
    names = root / "names.tsv"
    ds = AdeTrain(root, full=True, names_file=names)
    assert len(ds.class_names) == 300 and ds.class_names[299] == ["thing299", "alt299"]
    for k in range(2):
        _, label, key = ds.load(k)
        raw = _raw(root / "annotations_detectron2" / "training" / f"{key}.tif")
        assert (raw == 65535).any() and (raw == 299).any()  # PIL reads uint16 intact
        np.testing.assert_array_equal(label, np.where(raw == 65535, -1, raw))
    ds.set_rows(torch.arange(300))
    s = ds.get(0, np.random.default_rng(0))
    vals = set(s["label"].unique().tolist())
    assert vals <= {-1, 0, 7, 255, 256, 299} and len(vals) > 1
    default = AdeTrain(root, full=True)  # the package's ade847_categories.tsv
    assert len(default.class_names) == 847 and default.class_names[0] == ["wall"]
    assert default.class_names[2] == ["sky"] and default.wnids is None
    assert default.root == root


def test_weak_labels_are_those_of_the_crop(tmp_path):
    d = make_ade150(tmp_path, n_images=2, n_classes=5)
    rows = torch.tensor([10, 20, 30, 40, 50])
    aug = TrainAugment(crop_size=24, base_scale=(256, 64), pad=False)
    mask_ds = AdeTrain(d, rows=rows, transform=aug)
    weak_ds = AdeTrain(d, weak=True, rows=rows, transform=aug)
    assert AdeTrain(d, weak=True).transform.pad is False
    smaller = 0
    for seed in range(10):
        for k in range(2):
            m = mask_ds.get(k, np.random.default_rng(seed))
            w = weak_ds.get(k, np.random.default_rng(seed))
            assert set(w) == {"image", "labels", "key"} and torch.equal(w["image"], m["image"])
            crop = m["label"]
            ref = sorted({int(v) for v in crop.flatten() if v >= 0})
            assert w["labels"].tolist() == ref and w["labels"].dtype == torch.int64
            _, full, _ = mask_ds.load(k)
            whole = {int(rows[v]) for v in np.unique(full) if v >= 0}
            assert set(ref) <= whole
            smaller += set(ref) < whole
    assert smaller > 0  # the crop really restricts the label set


def test_out_of_range_values_name_file_and_value(tmp_path):
    d = make_ade150(tmp_path, n_images=2, n_classes=5)
    bad = d / "annotations" / "training" / "ADE_training_00000001.png"
    lab = _raw(bad)
    lab[3, 3] = 6
    write_png(bad, lab)
    ds = AdeTrain(d)
    with pytest.raises(ValueError, match=r"ADE_training_00000001.png: label value 6 out of range"):
        ds.load(1)
    root = make_ade847(tmp_path / "full", n_images=1, n_classes=300)
    tif = root / "annotations_detectron2" / "validation" / "img0.tif"
    lab = _raw(tif)
    lab[0, 0] = 300
    write_tiff16(tif, lab)
    ev = AdeEval(root, "ade847", names_file=root / "names.tsv")
    with pytest.raises(ValueError, match=r"img0.tif: label value 300 out of range"):
        ev[0]


def test_missing_and_mismatched_files(tmp_path):
    d = make_ade150(tmp_path, n_images=3, n_classes=5)
    (d / "images" / "training" / "ADE_training_00000002.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="ADE_training_00000002.png"):
        AdeTrain(d)
    ds = AdeTrain(d, skip_missing=True)
    assert len(ds) == 2 and ds.n_skipped == 1
    write_png(d / "annotations" / "training" / "ADE_training_00000000.png", np.ones((5, 5)))
    with pytest.raises(ValueError, match="ADE_training_00000000.jpg: image size"):
        ds.load(0)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        AdeEval(tmp_path / "nowhere")


def test_eval_reader_full_resolution(tmp_path):
    d = make_ade150(tmp_path, n_images=2, n_classes=5)
    ev = AdeEval(tmp_path)
    assert len(ev) == 2 and len(ev.class_names) == 5
    item = ev[1]
    raw = _raw(d / "annotations" / "validation" / f"{item['key']}.png")
    assert item["image"].dtype == np.uint8 and item["image"].shape == (*raw.shape, 3)
    assert item["label"].dtype == np.int64
    np.testing.assert_array_equal(item["label"], raw - 1)
    jpg = np.asarray(Image.open(d / "images" / "validation" / f"{item['key']}.jpg"))
    np.testing.assert_array_equal(item["image"], jpg)
    root = make_ade847(tmp_path / "full", n_images=2, n_classes=300)
    ev847 = AdeEval(root, "ade847", names_file=root / "names.tsv")
    lab = ev847[0]["label"]
    assert lab.min() == -1 and lab.max() == 299


def test_read_class_names_without_data(tmp_path):
    d = make_ade150(tmp_path, n_images=1, n_classes=5)
    assert AdeTrain.read_class_names(tmp_path) == AdeTrain(d).class_names
    root = make_ade847(tmp_path / "full", n_images=1, n_classes=300)
    names = AdeTrain.read_class_names(root, full=True, names_file=root / "names.tsv")
    assert names == AdeTrain(root, full=True, names_file=root / "names.tsv").class_names
    assert AdeTrain.read_class_names(root, full=True) == AdeTrain(root, full=True).class_names
    assert len(AdeTrain.read_class_names(None, full=True)) == 847
    (d / "objectInfo150.txt").unlink()  # not in the folder: the package's copy
    names = AdeTrain.read_class_names(tmp_path)
    assert len(names) == 150 and names[0] == ["wall"] and len(AdeTrain(d).class_names) == 150


def test_ade847_root_found_below_and_bare_download_names_the_command(tmp_path):
    data = tmp_path / "datasets"
    root = make_ade847(data / "ADE20K_2021_17_01", n_images=1, n_classes=300)
    (data / "ADEChallengeData2016" / "annotations_detectron2" / "validation").mkdir(parents=True)
    for given in (root, data, tmp_path):  # the folder, its parent, two levels up
        ev = AdeEval(given, "ade847")
        assert ev.root == root and len(ev) == 1 and len(ev.class_names) == 847
    other = make_ade847(tmp_path / "copy" / "ADE20K_2021_17_01", n_images=1)
    with pytest.raises(FileNotFoundError, match="several prepared ADE-847 folders"):
        AdeEval(tmp_path, "ade847")
    assert AdeEval(other.parent, "ade847").root == other
    bare = tmp_path / "bare"
    (bare / "ADE20K_2021_17_01" / "images" / "ADE" / "training").mkdir(parents=True)
    (bare / "ADE20K_2021_17_01" / "index_ade20k.pkl").write_bytes(b"")
    for given in (bare, bare / "ADE20K_2021_17_01"):
        with pytest.raises(FileNotFoundError, match=r"python scripts/prepare_ade847.py --root "):
            AdeTrain(given, full=True)
    with pytest.raises(FileNotFoundError, match="no ADE-847 layout"):
        AdeTrain(tmp_path / "copy" / "ADE20K_2021_17_01" / "images_detectron2", full=True)


def test_set_rows_protocol(tmp_path):
    d = make_ade150(tmp_path, n_images=1, n_classes=5)
    ds = AdeTrain(tmp_path, weak=True)
    assert ds.rows is None and ds.wnids is None and ds.root == d
    with pytest.raises(RuntimeError, match=rf"AdeTrain {d}: set_rows\(rows\) was not called"):
        ds.get(0, np.random.default_rng(0))  # local ids must not pass for vocabulary rows
    ds.set_rows(torch.tensor([4, 3, 2, 1, 0]))
    assert ds.rows.tolist() == [4, 3, 2, 1, 0]
    with pytest.raises(ValueError, match=rf"AdeTrain {d}: rows has shape \(4,\)"):
        ds.set_rows(torch.arange(4))
    with pytest.raises(ValueError, match="one row per class"):
        ds.rows = torch.arange(6)


def test_ade150_detectron2_only_tree_and_a_tree_without_labels(tmp_path):
    """detectron2's / CAT-Seg's conversion (uint8 v - 1, so 0 -> 255) with annotations/ gone reads
    the same local ids as the zip's PNGs; with neither, the error says what is there."""
    zip_tree = make_ade150(tmp_path / "zip", n_images=2, n_classes=5)
    d2 = make_ade150(tmp_path / "d2", n_images=2, n_classes=5)
    for split in ("training", "validation"):
        src = d2 / "annotations" / split
        for png in sorted(src.glob("*.png")):
            raw = np.asarray(Image.open(png))
            write_png(d2 / "annotations_detectron2" / split / png.name, raw - np.uint8(1))
            png.unlink()
        src.rmdir()
    a, b = AdeTrain(zip_tree), AdeTrain(d2)
    assert (a.label_kind, b.label_kind) == ("ade150", "ade150_detectron2")
    for k in range(2):
        np.testing.assert_array_equal(a.load(k)[1], b.load(k)[1])
    ev = AdeEval(d2)
    assert ev.label_kind == "ade150_detectron2"
    np.testing.assert_array_equal(ev[0]["label"], AdeEval(zip_tree)[0]["label"])
    bad = d2 / "annotations_detectron2" / "validation" / "ADE_validation_00000000.png"
    write_png(bad, np.full((60, 90), 7))  # 7: not a class of 5 (0..4, 255 ignore)
    with pytest.raises(ValueError, match=r"ADE_validation_00000000.png: label value 7 out of"):
        _ = AdeEval(d2)[0]
    empty = make_ade150(tmp_path / "e", n_images=1, n_classes=5)
    for png in (empty / "annotations" / "training").glob("*.png"):
        png.unlink()
    with pytest.raises(FileNotFoundError, match=r"no label PNGs for split 'training'.*present:"):
        AdeTrain(empty)
