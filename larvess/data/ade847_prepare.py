"""ADE20K_2021_17_01 (the full ADE20K download) -> the detectron2 ADE-847 layout the reader uses.

The command line is larvess-prepare-ade847 (scripts/prepare_ade847.py; larvess/commands/). root:
the unzipped ADE20K_2021_17_01 folder, or the folder holding it. --out: where images_detectron2/
and annotations_detectron2/ go (default: the ADE20K_2021_17_01 folder itself, where
detectron2-based code looks for them). Then pass --out (or its parent) as the ADE-847 root.

Input, as the download unpacks: ADE20K_2021_17_01/index_ade20k.pkl (a pickled dict of 16 keys:
'filename' ['ADE_train_00000001.jpg', ...], 'folder'
['ADE20K_2021_17_01/images/ADE/training/<scene category>/<scene>', ...], 'scene', the
object statistics 'objectPresence' [C, N] float counts etc.; only 'folder' and 'filename' are
read) and the image tree images/ADE/{training,validation}/<scene category>/<scene>/
ADE_{train,val,frame}_*.jpg, each image with its <stem>_seg.png beside it: RGB, object class =
R // 10 * 256 + G (0 = unlabeled; B codes the instance), the class index of the full ADE20K
object list.

Output: images_detectron2/<split>/<stem>.jpg and annotations_detectron2/<split>/<stem>.tif,
uint16 TIFF, trainId 0..846 of larvess/meta/ade847_categories.tsv, 65535 for 0 (unlabeled) and
for every class outside the 847. The TIFFs are deflate-compressed (lossless; PIL and libtiff
readers decode them as they are; --compression none writes them uncompressed as MaskFormer does).

As MaskFormer's datasets/prepare_ade20k_full_sem_seg.py (the script behind the detectron2
ADE-847 layout that LarvSeg and its peers evaluate on):
- Class mapping: the decoded value R // 10 * 256 + G is looked up directly in the ade_full_id
  column of ade847_categories.tsv (MaskFormer's "id" of the same trainId), no offset.
- Size: by default (max_short_side=512) an image whose shorter side is above 512 is resized so
  that it is 512, the longer side round(long / short * 512) (Python's round, as there). The
  label is resized with OpenCV's INTER_NEAREST rule and the image with OpenCV's INTER_LINEAR
  rule (cv_resize.py: numpy, no OpenCV needed): labels are pixel-identical to MaskFormer's,
  images within 1 grey level before JPEG coding. Resized images are saved as JPEG quality 75,
  PIL's default, which MaskFormer's Image.save uses. max_short_side=0 keeps the full size.
- Differences: the split comes from the folder (images/ADE/training or validation), MaskFormer
  uses the file name (ADE_val_* -> validation, anything else -> training); they agree on the
  download. Images that are not resized keep their bytes (hard-linked, copied where linking
  fails; --images copy / symlink): MaskFormer re-encodes them at quality 75 too. Grayscale
  JPEGs are written as RGB. Both splits by default (some copies of MaskFormer's script write
  the validation split only).

Image list: index_ade20k.pkl's 'folder' + 'filename' when present (pickle: run this only on a
download you trust; --no-index never opens it), else a walk of images/ADE/{training,validation}
for *.jpg. With the index, .jpg files in the tree that it does not list are counted and reported.

Resumable: each output is written to a hidden temporary file in its folder and renamed into
place, so an interrupted run leaves no partial output (stale temporaries are removed on start).
An output that exists and is complete (TIFF: uint16 of the expected size that decodes to the
end; image: same size in bytes as its source, or for resized images a readable header of
the expected size and a JPEG end marker) is kept, so re-running the same command continues.
Images that cannot be converted (missing or unreadable image or _seg.png, sizes that differ,
duplicate names) are skipped, counted, listed in OUT/prepare_ade847_skipped.txt and the first ones
printed; the exit status is then 1 (2 for a setup error).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import shutil
import sys
import time
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image, features
from tqdm import tqdm

from larvess.data.ade import ADE_FULL_DIR
from larvess.data.cv_resize import resize_linear, resize_nearest
from larvess.meta import ADE847_NAMES

ADE_DIR = ADE_FULL_DIR
TABLE = ADE847_NAMES
IGNORE = 65535
SPLITS = ("training", "validation")
MAX_CLASS = 25 * 256 + 255  # largest R // 10 * 256 + G of an 8-bit RGB mask
SKIPPED_FILE = "prepare_ade847_skipped.txt"
MAX_SHORT_SIDE = 512  # MaskFormer's max_size
JPEG_QUALITY = 75  # PIL's default, what MaskFormer's Image.fromarray(img).save(...) writes

_LUT: np.ndarray | None = None  # per worker: full ADE class -> trainId (IGNORE elsewhere)


def read_847_table(path: str | Path = TABLE) -> np.ndarray:
    """ade847_categories.tsv (trainId, ade_full_id, name) -> uint16 LUT full class -> trainId."""
    path = Path(path)
    lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    header = [f.strip() for f in lines[0].split("\t")]
    if "trainId" not in header or "ade_full_id" not in header:
        raise ValueError(f"{path}: header must name trainId and ade_full_id columns: {header}")
    i_t, i_f = header.index("trainId"), header.index("ade_full_id")
    lut = np.full(MAX_CLASS + 1, IGNORE, np.uint16)
    for n, ln in enumerate(lines[1:], 2):
        fields = ln.split("\t")
        try:
            t, fid = int(fields[i_t]), int(fields[i_f])
        except (ValueError, IndexError):
            raise ValueError(f"{path}:{n}: bad line {ln!r}") from None
        if t != n - 2:
            raise ValueError(f"{path}:{n}: trainId {t}, expected {n - 2}")
        if not 1 <= fid <= MAX_CLASS or lut[fid] != IGNORE:
            raise ValueError(f"{path}:{n}: ade_full_id {fid} out of 1..{MAX_CLASS} or repeated")
        lut[fid] = t
    return lut


def decode_seg(seg: np.ndarray) -> np.ndarray:
    """ADE20K _seg.png pixels uint8 [H, W, 3+] -> int32 [H, W] object class (0 = unlabeled)."""
    r = seg[..., 0].astype(np.int32)
    g = seg[..., 1].astype(np.int32)
    return r // 10 * 256 + g


def find_dataset(root: Path) -> Path:
    """The ADE20K_2021_17_01 folder: root itself or root/ADE20K_2021_17_01."""
    for d in (root, root / ADE_DIR):
        if (d / "index_ade20k.pkl").is_file() or (d / "images" / "ADE").is_dir():
            return d
    raise FileNotFoundError(
        f"no {ADE_DIR} download in {root} (looked for index_ade20k.pkl and images/ADE/ in it "
        f"and in {root / ADE_DIR})"
    )


def _split_of(parts: tuple[str, ...], filename: str) -> str:
    for s in SPLITS:
        if s in parts:
            return s
    return "validation" if filename.split("_")[1:2] == ["val"] else "training"


def list_tree(ds: Path) -> list[tuple[str, Path]]:
    """[(split, jpg)] of images/ADE/{training,validation}/**/*.jpg, sorted."""
    out = []
    for s in SPLITS:
        d = ds / "images" / "ADE" / s
        if d.is_dir():
            out += [(s, p) for p in sorted(d.rglob("*.jpg"))]
    return out


def list_index(ds: Path) -> list[tuple[str, Path]]:
    """[(split, jpg)] in index_ade20k.pkl order ('folder' is relative to the download's parent)."""
    with open(ds / "index_ade20k.pkl", "rb") as f:
        index = pickle.load(f)  # the dataset's own index; see the module docstring
    folders, files = list(index["folder"]), list(index["filename"])
    if len(folders) != len(files):
        raise ValueError(f"{ds / 'index_ade20k.pkl'}: {len(folders)} folders, {len(files)} files")
    out = []
    for folder, name in zip(folders, files):
        parts = PurePosixPath(str(folder).replace("\\", "/")).parts
        if "images" in parts:
            path = ds.joinpath(*parts[parts.index("images") :], str(name))
        else:
            path = ds.parent.joinpath(*parts, str(name))
        out.append((_split_of(parts, str(name)), path))
    return out


def target_size(size: tuple[int, int], max_short: int) -> tuple[int, int]:
    """(w, h) after MaskFormer's resize: shorter side at most max_short (0 = keep); the longer
    side round(long / short * max_short), Python's round as MaskFormer's script."""
    w, h = size
    if max_short <= 0 or min(w, h) <= max_short:
        return w, h
    if w >= h:
        return round(w / h * max_short), max_short
    return max_short, round(h / w * max_short)


def _tmp(dst: Path) -> Path:
    return dst.parent / f".{dst.name}.{os.getpid()}.partial"


def tif_complete(path: Path, size: tuple[int, int]) -> bool:
    """A readable uint16 TIFF of the expected (w, h), decoded to the end."""
    try:
        with Image.open(path) as im:
            if im.format != "TIFF" or not im.mode.startswith("I;16") or im.size != size:
                return False
            im.load()
        return True
    except (OSError, ValueError):
        return False


def image_complete(dst: Path, src: Path, size: tuple[int, int], resized: bool) -> bool:
    try:
        if not resized:
            return dst.stat().st_size == src.stat().st_size
        with Image.open(dst) as im:
            if im.size != size:
                return False
        with open(dst, "rb") as f:
            f.seek(-2, os.SEEK_END)
            return f.read() == b"\xff\xd9"
    except (OSError, ValueError):
        return False


def place_image(src: Path, dst: Path, mode: str) -> str:
    """Link or copy src to dst atomically; returns how ("link", "copy", "symlink")."""
    tmp = _tmp(dst)
    tmp.unlink(missing_ok=True)
    how = mode
    if mode == "link":
        try:
            os.link(src, tmp)
        except OSError:
            how = "copy"
    elif mode == "symlink":
        os.symlink(src.resolve(), tmp)
    if how == "copy":
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)
    return how


def _init(lut: np.ndarray) -> None:
    global _LUT
    _LUT = lut


def convert_one(job: tuple) -> dict:
    """One image -> its outputs; {"status": written|present|skipped, "key", "why", pixel counts}."""
    split, jpg, out, images, max_short, compression = job
    jpg, out = Path(jpg), Path(out)
    rec = {"status": "skipped", "key": f"{split}/{jpg.name}", "src": str(jpg), "why": ""}
    rec.update(split=split, annotated=0, unmapped=0, how="")
    seg = jpg.with_name(jpg.stem + "_seg.png")
    img_dst = out / "images_detectron2" / split / jpg.name
    lab_dst = out / "annotations_detectron2" / split / (jpg.stem + ".tif")
    for p, what in ((jpg, "image"), (seg, "_seg.png")):
        if not p.is_file():
            rec["why"] = f"{what} missing: {p}"
            return rec
    try:
        with Image.open(jpg) as im:
            img_size = im.size
        with Image.open(seg) as sm:
            seg_size, seg_mode = sm.size, sm.mode
    except (OSError, ValueError) as e:
        rec["why"] = f"unreadable: {e}"
        return rec
    if img_size != seg_size:
        rec["why"] = f"image size {img_size} != _seg.png size {seg_size}"
        return rec
    if seg_mode not in ("RGB", "RGBA"):
        rec["why"] = f"{seg.name}: mode {seg_mode}, expected an RGB class/instance mask"
        return rec
    size = target_size(img_size, max_short)
    resized = size != img_size
    lab_ok = tif_complete(lab_dst, size)
    img_ok = image_complete(img_dst, jpg, size, resized)
    if lab_ok and img_ok:
        rec["status"] = "present"
        return rec
    try:
        if not lab_ok:
            with Image.open(seg) as sm:
                cls = decode_seg(np.asarray(sm.convert("RGB")))
            lab = _LUT[cls]
            rec["annotated"] = int((cls > 0).sum())
            rec["unmapped"] = int(((cls > 0) & (lab == IGNORE)).sum())
            if resized:
                lab = resize_nearest(lab, size)
            tmp = _tmp(lab_dst)
            im = Image.fromarray(np.ascontiguousarray(lab, dtype=np.uint16))
            im.save(tmp, format="TIFF", compression=compression)
            os.replace(tmp, lab_dst)
        if not img_ok:
            if resized:
                with Image.open(jpg) as im:
                    small = Image.fromarray(resize_linear(np.asarray(im.convert("RGB")), size))
                tmp = _tmp(img_dst)
                small.save(tmp, format="JPEG", quality=JPEG_QUALITY)
                os.replace(tmp, img_dst)
                rec["how"] = "resized"
            else:
                rec["how"] = place_image(jpg, img_dst, images)
    except (OSError, ValueError) as e:
        rec["why"] = f"unreadable: {e}"
        return rec
    rec["status"] = "written"
    return rec


def prepare(
    root: str | Path,
    out: str | Path | None = None,
    splits: tuple[str, ...] = SPLITS,
    images: str = "link",
    max_short_side: int = MAX_SHORT_SIDE,
    workers: int = 1,
    use_index: bool = True,
    table: str | Path = TABLE,
    progress: bool = True,
    compression: str = "deflate",
) -> dict:
    """Write the detectron2 layout (see the module docstring); returns the summary dict."""
    ds = find_dataset(Path(root))
    out = Path(out) if out else ds
    tiff_compression = {"deflate": "tiff_deflate", "none": None}[compression]
    if tiff_compression and not features.check("libtiff"):
        print("warning: Pillow without libtiff: writing uncompressed TIFFs", file=sys.stderr)
        tiff_compression = None
    lut = read_847_table(table)
    index_used = use_index and (ds / "index_ade20k.pkl").is_file()
    tree = list_tree(ds)
    listed = tree
    if index_used:
        try:
            listed = list_index(ds)
        except Exception as e:  # an index this Python/numpy cannot unpickle: walk the tree
            print(f"warning: cannot read {ds / 'index_ade20k.pkl'} ({e!r}); walking the image "
                  "tree instead", file=sys.stderr)  # fmt: skip
            index_used = False
    if not listed:
        raise FileNotFoundError(f"{ds}: no images (index_ade20k.pkl or images/ADE/<split>/**.jpg)")
    not_in_index = 0
    if index_used:
        known = {p.resolve() for _, p in listed}
        not_in_index = sum(p.resolve() not in known for _, p in tree)
    stale = 0
    for s in splits:
        for sub in ("images_detectron2", "annotations_detectron2"):
            d = out / sub / s
            d.mkdir(parents=True, exist_ok=True)
            for p in d.glob(".*.partial"):
                p.unlink()
                stale += 1
    jobs, recs, seen = [], [], {}
    for split, jpg in listed:
        if split not in splits:
            continue
        key = f"{split}/{jpg.name}"
        if key in seen:
            why = f"duplicate file name (also {seen[key]})"
            recs.append(
                {"status": "skipped", "key": key, "src": str(jpg), "why": why, "split": split}
            )
            continue
        seen[key] = jpg
        jobs.append((split, str(jpg), str(out), images, max_short_side, tiff_compression))
    t0 = time.time()
    bar = tqdm(total=len(jobs), desc="ADE-847", unit="img", disable=not progress, smoothing=0.05)
    if workers > 1:
        with mp.get_context("fork").Pool(workers, _init, (lut,)) as pool:
            for rec in pool.imap_unordered(convert_one, jobs, chunksize=8):
                recs.append(rec)
                bar.update()
    else:
        _init(lut)
        for job in jobs:
            recs.append(convert_one(job))
            bar.update()
    bar.close()
    skipped = sorted((r for r in recs if r["status"] == "skipped"), key=lambda r: r["key"])
    lines = [f"{r['key']}\t{r['src']}\t{r['why']}" for r in skipped]
    (out / SKIPPED_FILE).write_text("".join(ln + "\n" for ln in lines), encoding="utf-8")
    hows = sorted({r.get("how", "") for r in recs})
    count = {st: sum(r["status"] == st for r in recs) for st in ("written", "present", "skipped")}
    return {
        "dataset": str(ds),
        "out": str(out),
        "index_used": index_used,
        **count,
        "per_split": {
            s: sum(r["status"] != "skipped" and r["split"] == s for r in recs) for s in splits
        },
        "images_by": {h: sum(r.get("how") == h for r in recs) for h in hows if h},
        "not_in_index": not_in_index,
        "stale_partials_removed": stale,
        "annotated_pixels": sum(r.get("annotated", 0) for r in recs),
        "unmapped_pixels": sum(r.get("unmapped", 0) for r in recs),
        "skipped_list": lines,
        "seconds": time.time() - t0,
    }
