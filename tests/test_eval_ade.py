"""scripts/eval_ade.py end to end, on fixtures in the real file formats.

A tiny exported model (ViT depth 1, d = 8; tests/exported_model.py) is evaluated on an ADE-150
folder (JPEG + uint8 PNG, objectInfo150.txt) and an ADE-847 folder (JPEG + uint16 TIFF,
ade847_categories.tsv). The labels are written from the model's own predictions with a few edits,
so the IoUs are neither 0 nor 1, and the script's numbers are checked against a plain loop.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from exported_model import (
    ADE150_NAMES,
    ADE847_NAMES,
    BASE,
    CLI,
    INFER,
    MODEL_ARGS,
    Model,
    read_array,
    run_script,
    smooth_image,
)
from PIL import Image

from larvess.checkpoint import STATE_FILE, export_model, find_resume, load_model
from larvess.commands import eval_ade, predict
from larvess.inference import slide_inference


def evaluated_rows(model: Model, names: list[str]) -> list[int]:
    return [model.row_of[n.split(",")[0]] for n in names]


def make_eval_set(model: Model, root: Path, dataset: str, sizes, seed: int) -> list[tuple]:
    """Write images + labels (from edited predictions) in the real layout; returns (pred, gt)."""
    names = ADE150_NAMES if dataset == "ade150" else ADE847_NAMES
    k = len(names)
    mu = model.mu[evaluated_rows(model, names)]
    if dataset == "ade150":
        base = root / "ADEChallengeData2016"
        img_dir, lab_dir = base / "images/validation", base / "annotations/validation"
        lines = ["Idx\tRatio\tTrain\tVal\tName"]
        for i, n in enumerate(names, 1):  # the real file has "8 " style Idx fields
            lines.append(f"{i}{' ' if i % 2 else ''}\t0.01\t100\t10\t{n}")
        (base / "objectInfo150.txt").parent.mkdir(parents=True)
        (base / "objectInfo150.txt").write_text("\n".join(lines) + "\n")
    else:
        img_dir, lab_dir = (
            root / "images_detectron2/validation",
            root / "annotations_detectron2/validation",
        )
        lines = ["trainId\tade_full_id\tname"] + [
            f"{i}\t{2000 + i}\t{n}" for i, n in enumerate(names)
        ]
        (root / "names.tsv").write_text("\n".join(lines) + "\n")
    img_dir.mkdir(parents=True)
    lab_dir.mkdir(parents=True)
    keys, preds = [], []
    for i, (h, w) in enumerate(sizes):
        key = f"ADE_val_{i:08d}" if dataset == "ade150" else f"frame_{i}"
        Image.fromarray(smooth_image(h, w, seed + i)).save(img_dir / f"{key}.jpg", quality=90)
        image = np.asarray(Image.open(img_dir / f"{key}.jpg").convert("RGB"))
        preds.append(slide_inference(model.segmenter, mu, image, **INFER).numpy())
        keys.append(key)
    counts = np.bincount(np.concatenate([p.ravel() for p in preds]), minlength=k)
    c_gone = int(counts.argmax())  # predicted everywhere, never in the ground truth
    c_missed = int(counts.argmin())  # rarely (or never) predicted, present in a block
    pairs = []
    for key, pred in zip(keys, preds):
        gt = pred.copy()
        gt[pred == c_gone] = (c_gone + 1) % k if (c_gone + 1) % k != c_missed else (c_gone + 2) % k
        gt[:12, :12] = c_missed
        gt[-5:, :] = -1
        gt[:, -3:] = -1
        pairs.append((pred, gt))
        if dataset == "ade150":
            im = Image.fromarray((gt + 1).astype(np.uint8))  # 0 = ignore
            (im.convert("P") if key.endswith("1") else im).save(lab_dir / f"{key}.png")
        else:
            Image.fromarray(np.where(gt < 0, 65535, gt).astype(np.uint16)).save(
                lab_dir / f"{key}.tif"
            )
    return pairs


@pytest.fixture(scope="module")
def ade150(model, tmp_path_factory):
    root = tmp_path_factory.mktemp("ade150")
    return root, make_eval_set(model, root, "ade150", [(70, 90), (64, 64), (90, 70)], seed=10)


@pytest.fixture(scope="module")
def ade847(model, tmp_path_factory):
    root = tmp_path_factory.mktemp("ade847")
    return root, make_eval_set(model, root, "ade847", [(72, 64), (64, 80)], seed=20)


def naive_metrics(pairs, names: list[str]) -> dict:
    """Percent mIoU (mmseg and d2 conventions), base / novel, pAcc, per-class IoU by plain loops."""
    k = len(names)
    tp, fp, fn = np.zeros(k), np.zeros(k), np.zeros(k)
    for pred, gt in pairs:
        valid = gt >= 0
        for c in range(k):
            p, g = (pred == c) & valid, gt == c
            tp[c] += (p & g).sum()
            fp[c] += (p & ~g).sum()
            fn[c] += (g & ~p).sum()
    iou = {c: tp[c] / (tp[c] + fp[c] + fn[c]) for c in range(k) if tp[c] + fp[c] + fn[c] > 0}
    in_gt = [c for c in range(k) if tp[c] + fn[c] > 0]
    is_base = [n.split(",")[0] in BASE for n in names]
    out = {
        "mIoU": np.mean(list(iou.values())),
        "mIoU_d2": np.mean([iou[c] for c in in_gt]),
        "pAcc": tp.sum() / sum(int((gt >= 0).sum()) for _, gt in pairs),
        "iou": iou,
    }
    for subset, want in (("base", True), ("novel", False)):
        out[f"{subset}_mIoU"] = np.mean([v for c, v in iou.items() if is_base[c] == want])
        out[f"{subset}_mIoU_d2"] = np.mean([iou[c] for c in in_gt if is_base[c] == want])
    for key in list(out):
        if key != "iou":
            out[key] *= 100.0
    return out


def check_outputs(out: Path, pairs, names: list[str], keys_with_vis: list[str], tol=1e-3) -> None:
    want = naive_metrics(pairs, names)
    assert want["mIoU"] != pytest.approx(want["mIoU_d2"])  # the fixture tells conventions apart
    assert 2 <= len(want["iou"]) and 0 < want["mIoU"] < 100
    summary = json.loads((out / "results.json").read_text())["summary"]
    for key in "mIoU mIoU_d2 pAcc base_mIoU novel_mIoU base_mIoU_d2 novel_mIoU_d2".split():
        assert summary[key] == pytest.approx(want[key], abs=tol), key
    with open(out / "per_class.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["name"] for r in rows] == [n.split(",")[0] for n in names]
    for c, r in enumerate(rows):
        assert r["subset"] == ("base" if r["name"] in BASE else "novel")
        if c in want["iou"]:
            assert float(r["IoU"]) == pytest.approx(100 * want["iou"][c], abs=tol)
        else:
            assert r["IoU"] == ""
    info = json.loads((out / "eval_info.json").read_text())
    n_base = sum(n.split(",")[0] in BASE for n in names)
    assert (info["base_classes"], info["novel_classes"]) == (n_base, len(names) - n_base)
    assert info["images"] == len(pairs)
    vis = sorted(p.stem for p in (out / "vis").glob("*.png")) if keys_with_vis else []
    assert vis == keys_with_vis
    for key, (pred, _) in zip(keys_with_vis, pairs):
        h, w = pred.shape
        vh, vw = read_array(out / "vis" / f"{key}.png").shape[:2]
        assert vw == 3 * w and vh > h  # image | prediction | ground truth, legend below


def test_eval_ade150(model, ade150, tmp_path):
    root, pairs = ade150
    out = tmp_path / "out"
    args = ["--checkpoint", str(model.run), "--dataset", "ade150", "--root"]
    eval_ade.run(
        args + [str(root / "ADEChallengeData2016"), "--out", str(out), "--save-vis", "2"] + CLI
    )
    check_outputs(out, pairs, ADE150_NAMES, ["ADE_val_00000000", "ADE_val_00000001"])


def test_eval_grid_shows_the_images_with_a_novel_class(model, ade150, tmp_path):
    root, pairs = ade150
    truth = pairs[1][1]
    novel = int(truth[truth >= 0][0])  # a class of the second image
    (tmp_path / "novel.txt").write_text(ADE150_NAMES[novel] + "\n")
    shown = [i for i, (_, t) in enumerate(pairs) if (t == novel).any()]
    out = tmp_path / "out"
    args = ["--checkpoint", str(model.run), "--dataset", "ade150", "--root", str(root)]
    eval_ade.run(args + ["--out", str(out), "--grid", "8", "--novel", str(tmp_path / "novel.txt")]
                  + CLI)  # fmt: skip
    grid = read_array(out / "grid.png")
    h, w = pairs[shown[0]][1].shape
    assert grid.shape[1] == 3 * 2 * w + 16  # image | truth | prediction, magnified 2x
    assert grid.shape[0] > len(shown) * 2 * h


def test_eval_ade847(model, ade847, tmp_path):
    root, pairs = ade847
    out = tmp_path / "out"
    args = ["--checkpoint", str(model.run / "model.pt"), "--dataset", "ade847", "--root", str(root)]
    eval_ade.run(
        args + ["--names", str(root / "names.tsv"), "--out", str(out), "--save-vis", "5"] + CLI
    )
    check_outputs(out, pairs, ADE847_NAMES, ["frame_0", "frame_1"])


def test_eval_ade150_subprocess(model, ade150):
    """The command line as documented; the dataset parent folder as root; default output folder."""
    root, pairs = ade150
    args = ["--checkpoint", str(model.run), "--dataset", "ade150", "--root", str(root)] + CLI
    proc = run_script("eval_ade", args)
    assert proc.returncode == 0, proc.stderr
    assert "mIoU" in proc.stdout and "base" in proc.stdout and "novel" in proc.stdout
    # another process may differ in the last bits of a float: allow a few flipped pixels
    check_outputs(model.run / "eval_ade150", pairs, ADE150_NAMES, [], tol=0.05)


def copy_set(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_eval_missing_label_file(model, ade150, tmp_path):
    root = copy_set(ade150[0], tmp_path / "ade")
    (root / "ADEChallengeData2016/annotations/validation/ADE_val_00000001.png").unlink()
    args = ["--checkpoint", str(model.run), "--dataset", "ade150", "--root", str(root)]
    with pytest.raises(FileNotFoundError, match="ADE_val_00000001.jpg"):
        eval_ade.run(args + ["--out", str(tmp_path / "o")] + CLI)
    proc = run_script("eval_ade", args + ["--out", str(tmp_path / "o")] + CLI)
    assert proc.returncode != 0
    assert "error:" in proc.stderr and "ADE_val_00000001.jpg" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_eval_label_value_out_of_range(model, ade150, ade847, tmp_path):
    root = copy_set(ade150[0], tmp_path / "ade")
    png = root / "ADEChallengeData2016/annotations/validation/ADE_val_00000002.png"
    lab = read_array(png).copy()
    lab[5, 5] = len(ADE150_NAMES) + 1
    Image.fromarray(lab).save(png)
    args = ["--checkpoint", str(model.run), "--dataset", "ade150", "--root", str(root)]
    with pytest.raises(ValueError, match=r"ADE_val_00000002\.png.*\b8\b"):
        eval_ade.run(args + ["--out", str(tmp_path / "o")] + CLI)

    root = copy_set(ade847[0], tmp_path / "ade847")
    tif = root / "annotations_detectron2/validation/frame_1.tif"
    lab = read_array(tif).copy()
    lab[0, 0] = 300
    Image.fromarray(lab).save(tif)
    args = ["--checkpoint", str(model.run), "--dataset", "ade847", "--root", str(root)]
    with pytest.raises(ValueError, match=r"frame_1\.tif.*300"):
        eval_ade.run(
            args + ["--names", str(root / "names.tsv"), "--out", str(tmp_path / "o")] + CLI
        )


def test_eval_names_file_wrong_length(model, ade847, tmp_path):
    root = ade847[0]
    pairs = ade847[1]
    top = max(int(gt.max()) for _, gt in pairs)  # the highest trainId used by the labels
    short = tmp_path / "short.tsv"
    lines = (root / "names.tsv").read_text().splitlines()[: top + 1]  # header + ids 0..top-1
    short.write_text("\n".join(lines) + "\n")
    args = ["--checkpoint", str(model.run), "--dataset", "ade847", "--root", str(root)]
    with pytest.raises(ValueError, match=rf"frame_\d\.tif.*\b{top}\b"):
        eval_ade.run(args + ["--names", str(short), "--out", str(tmp_path / "o")] + CLI)
    # a names file with a gap in its ids: the error names the file and the line
    gap = tmp_path / "gap.tsv"
    gap.write_text("\n".join(lines[:2] + lines[3:]) + "\n")
    with pytest.raises(ValueError, match=r"gap\.tsv:3"):
        eval_ade.run(args + ["--names", str(gap), "--out", str(tmp_path / "o")] + CLI)
    # without --names the package's 847-name table is used: this model has 10 of them
    with pytest.raises(ValueError, match=r"model\.pt: 837 of 847 classes are not in the model"):
        eval_ade.run(args + ["--out", str(tmp_path / "o")] + CLI)


def test_eval_class_not_in_vocabulary(model, ade150, tmp_path):
    root = copy_set(ade150[0], tmp_path / "ade")
    info = root / "ADEChallengeData2016/objectInfo150.txt"
    info.write_text(info.read_text().replace("\tgrass", "\tunicorn"))
    args = ["--checkpoint", str(model.run), "--dataset", "ade150", "--root", str(root)]
    with pytest.raises(ValueError, match=r"model\.pt.*1 of 7.*unicorn"):
        eval_ade.run(args + ["--out", str(tmp_path / "o")] + CLI)


def test_checkpoint_without_model_file(model, ade150, tmp_path):
    empty = tmp_path / "not_a_run"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="not_a_run.*model.pt"):
        eval_ade.run(["--checkpoint", str(empty), "--dataset", "ade150", "--root", str(ade150[0])])
    with pytest.raises(FileNotFoundError, match="not_a_run.*model.pt"):
        predict.run(["--checkpoint", str(empty), str(tmp_path / "x.jpg")])
    proc = run_script("predict", ["--checkpoint", str(empty), str(tmp_path / "x.jpg")])
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "error:" in proc.stderr and "not_a_run" in proc.stderr
    (empty / "model.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match=r"not_a_run/model\.pt"):
        load_model(empty)


def test_checkpoint_run_folder_takes_newest_complete(model, tmp_path):
    loaded = load_model(model.run)
    # one rule for "newest complete" (checkpoint.py): the integer step of folders whose state
    # file exists; 123456789 sorts after 99999999 although its name sorts before it
    for step, complete in (
        (2, True),
        (99_999_999, True),
        (123_456_789, True),
        (200_000_000, False),
    ):
        folder = tmp_path / "run" / "checkpoints" / f"step_{step:08d}"
        export_model(folder, loaded.segmenter, loaded.table, MODEL_ARGS, loaded.vocab, step)
        if complete:
            (folder / STATE_FILE).write_text(json.dumps({"step": step, "bad_steps": 0}))
    newest = load_model(tmp_path / "run")
    assert newest.step == 123_456_789 and newest.path.parent.name == "step_123456789"
    assert find_resume(tmp_path / "run").name == "step_123456789"
    assert newest.vocab.names == model.names
    assert torch.equal(newest.table(), model.mu)
