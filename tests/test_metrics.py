import csv
import json
import math

import numpy as np
import pytest
import torch
import torch.distributed as dist

from larvess.metrics import (
    SegMetrics,
    format_summary,
    write_per_class_csv,
    write_results_json,
)

K = 6
BASE = [0, 1, 4]
NOVEL = [2, 3, 5]


def make_pairs(seed=0, n=3):
    """Images where class 4 is predicted but never in the gt and class 5 is in neither."""
    rng = np.random.default_rng(seed)
    pairs = []
    for _ in range(n):
        gt = rng.integers(0, 4, size=(9, 11))
        gt[rng.random(gt.shape) < 0.15] = -1
        pred = gt.copy()
        flip = rng.random(gt.shape) < 0.4
        pred[flip] = rng.integers(0, 5, size=int(flip.sum()))
        pred[gt == -1] = rng.integers(0, 5, size=int((gt == -1).sum()))
        pairs.append((pred, gt))
    return pairs


def naive(pairs, subset=None):
    """Plain per-class loops over every pixel."""
    tp, fp, fn, gt_n = [0] * K, [0] * K, [0] * K, [0] * K
    for pred, gt in pairs:
        for p, g in zip(pred.ravel().tolist(), gt.ravel().tolist()):
            if g == -1:
                continue
            gt_n[g] += 1
            if p == g:
                tp[g] += 1
            else:
                fp[p] += 1
                fn[g] += 1
    classes = range(K) if subset is None else subset
    ious_mm, ious_d2, accs, fw = [], [], [], 0.0
    total = sum(gt_n)
    for c in classes:
        union = tp[c] + fp[c] + fn[c]
        if union > 0:
            ious_mm.append(tp[c] / union)
        if gt_n[c] > 0:
            ious_d2.append(tp[c] / union)
            accs.append(tp[c] / gt_n[c])
            fw += gt_n[c] / total * tp[c] / union
    mean = lambda v: sum(v) / len(v) if v else math.nan  # noqa: E731
    return {
        "mIoU_mmseg": mean(ious_mm),
        "mIoU_d2": mean(ious_d2),
        "mAcc": mean(accs),
        "pAcc": sum(tp) / total,
        "fwIoU": fw,
        "n_mm": len(ious_mm),
        "n_d2": len(ious_d2),
    }


def filled(pairs):
    m = SegMetrics(K)
    for i, (pred, gt) in enumerate(pairs):
        # Mix numpy and torch inputs.
        if i % 2:
            m.update(torch.from_numpy(pred), torch.from_numpy(gt))
        else:
            m.update(pred.astype(np.int32), gt)
    return m


def test_against_naive_loops_both_conventions():
    pairs = make_pairs()
    r = filled(pairs).compute(base=BASE, novel=NOVEL)
    ref = naive(pairs)
    for key in ("mIoU_mmseg", "mIoU_d2", "mAcc", "pAcc", "fwIoU"):
        assert r[key] == pytest.approx(ref[key], abs=1e-12), key
    assert r["mIoU"] == r["mIoU_mmseg"]
    # Class 4 is predicted but absent from gt: IoU 0, counted by mmseg only; class 5 nowhere.
    assert r["IoU"][4] == 0.0 and math.isnan(r["Acc"][4])
    assert math.isnan(r["IoU"][5])
    assert ref["n_mm"] == 5 and ref["n_d2"] == 4
    assert r["num_classes_scored"] == 5 and r["num_classes_gt"] == 4
    assert r["mIoU_mmseg"] < r["mIoU_d2"]
    for name, subset in (("base", BASE), ("novel", NOVEL)):
        sub = naive(pairs, subset)
        assert r[f"{name}_mIoU"] == pytest.approx(sub["mIoU_mmseg"], abs=1e-12)
        assert r[f"{name}_mIoU_d2"] == pytest.approx(sub["mIoU_d2"], abs=1e-12)
    assert r["num_pixels"] == sum(int((gt != -1).sum()) for _, gt in pairs)


def test_bool_masks_equal_index_lists_and_empty_subset_is_nan():
    m = filled(make_pairs(1))
    a = m.compute(base=BASE, novel=NOVEL)
    mask = np.zeros(K, dtype=bool)
    mask[BASE] = True
    b = m.compute(base=torch.from_numpy(mask), novel=~mask)
    for key in ("base_mIoU", "base_mIoU_d2", "novel_mIoU", "novel_mIoU_d2"):
        assert a[key] == b[key]
    c = m.compute(novel=[5])  # class 5 is neither in the gt nor predicted
    assert math.isnan(c["novel_mIoU"]) and math.isnan(c["novel_mIoU_d2"])
    assert "base_mIoU" not in c


def test_merge_and_all_reduce_equal_single_pass(tmp_path):
    pairs = make_pairs(2, n=4)
    single = filled(pairs)
    a, b = filled(pairs[:2]), filled(pairs[2:])
    assert torch.equal(a.merge(b).conf, single.conf)
    assert a.compute()["mIoU_d2"] == single.compute()["mIoU_d2"]
    with pytest.raises(ValueError, match="incompatible"):
        a.merge(SegMetrics(K + 1))

    before = single.conf.clone()
    assert torch.equal(single.all_reduce().conf, before)  # not initialised: no-op
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        assert torch.equal(single.all_reduce().conf, before)
    finally:
        dist.destroy_process_group()


def test_bad_values_raise():
    m = SegMetrics(4)
    gt = np.array([[0, 1], [7, -1]])
    with pytest.raises(ValueError, match="ground-truth value 7"):
        m.update(np.zeros((2, 2), dtype=np.int64), gt)
    with pytest.raises(ValueError, match="ground-truth value -3"):
        m.update(np.zeros(2, dtype=np.int64), np.array([-3, 0]))
    with pytest.raises(ValueError, match="predicted value 4"):
        m.update(np.array([4, 0]), np.array([0, 0]))
    with pytest.raises(ValueError, match="predicted value -1"):
        m.update(np.array([-1, 0]), np.array([-1, 0]))
    with pytest.raises(ValueError, match="shape"):
        m.update(np.zeros(3, dtype=np.int64), np.zeros(2, dtype=np.int64))
    with pytest.raises(TypeError, match="integer"):
        m.update(np.zeros(2, dtype=np.float32), np.zeros(2, dtype=np.int64))
    with pytest.raises(ValueError, match="class index 9"):
        m.compute(base=[0, 9])
    assert int(m.conf.sum()) == 0  # failed updates leave no partial counts
    other = SegMetrics(4, ignore_index=255)
    other.update(np.array([1, 2]), np.array([255, 2]))
    assert int(other.conf.sum()) == 1 and int(other.conf[2, 2]) == 1


def test_writers_and_summary(tmp_path):
    pairs = make_pairs(3)
    r = filled(pairs).compute(base=BASE, novel=NOVEL)
    names = [["wall"], ["floor", "flooring"], "sky", "tree", "lamp", "boat"]
    write_per_class_csv(tmp_path / "c.csv", r, names)
    rows = list(csv.DictReader(open(tmp_path / "c.csv", encoding="utf-8")))
    assert [row["name"] for row in rows] == ["wall", "floor", "sky", "tree", "lamp", "boat"]
    assert [row["subset"] for row in rows] == ["base", "base", "novel", "novel", "base", "novel"]
    assert float(rows[0]["IoU"]) == pytest.approx(100 * r["IoU"][0], abs=1e-3)
    assert rows[5]["IoU"] == "" and rows[4]["Acc"] == ""
    write_results_json(tmp_path / "r.json", r, names)
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["summary"]["mIoU_d2"] == pytest.approx(100 * r["mIoU_d2"], abs=1e-3)
    assert data["per_class"][5]["IoU"] is None
    line = format_summary(r, prefix="ade150")
    assert line.startswith("ade150 mIoU ")
    assert f"{100 * r['novel_mIoU']:.2f}" in line
    with pytest.raises(ValueError, match="5 class names for 6"):
        write_per_class_csv(tmp_path / "x.csv", r, names[:5])
