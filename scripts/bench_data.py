"""Data pipeline throughput, side by side in one run: shard writer and shard loader vs plain loops.

    python scripts/bench_data.py [--imagenet DIR] [--toy-size 256] [--per-class 30] [--out bench_out]
        [--plan-items 1000000] [--plan-shards 1000]

Writer: images/s of scripts/shard_imagenet21k.py's write_shards with 1 and 2 workers, JPEG
pass-through (with the 1/8-scale draft-decode check) and forced re-encode, from class folders
and from class tars (the release layout), against a plain read + write file-copy loop of the
same files; the draft-decode check alone and a full decode alone, for the check's cost.
Loader: images/s of ImageNetShards (tar read -> decode -> augmentation) at 320 and 512 crops,
against a plain PIL decode loop of the same files (the decode bound) and a plain decode +
the same augmentation loop (on the first --loader-files files). Without --imagenet a toy ImageNet folder is generated first.
Plan scale: a synthetic plan of --plan-items images (1,000 per class, release-style names and
tar offsets) built in a fresh subprocess: build time, arrays' bytes per image and the peak
memory rise (ru_maxrss after the build minus before, so the listing pieces count too), save and
load time; and the resume check of --plan-shards synthetic small shards + manifests, by size
and by sha1, with the thread pool the writer uses.
Prints tables and writes OUT/bench_data.json.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import deque
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from larvess.data.imagenet_plan import PLAN_VERSION, Plan, assemble
from larvess.data.imagenet_shards import check_shards, shard_name, write_shards
from larvess.data.imagenet_wds import ImageNetShards
from larvess.data.jpeg_check import prepare_jpeg
from larvess.data.shard_format import manifest_path
from larvess.data.toy import make_toy_world
from larvess.data.transforms import TrainAugment


def _files(root: Path) -> list[Path]:
    return sorted(p for d in sorted(root.iterdir()) if d.is_dir() for p in d.iterdir())


def _copy_loop(files: list[Path], dst: Path) -> None:
    dst.mkdir()
    for i, f in enumerate(files):
        (dst / f"{i}.jpg").write_bytes(f.read_bytes())


def _decode_loop(files: list[Path], aug: TrainAugment | None, rng: np.random.Generator) -> None:
    for f in files:
        with Image.open(f) as im:
            img = im.convert("RGB")
        if aug is not None:
            aug(img, None, rng)


def _check_loop(files: list[Path]) -> None:
    for f in files:
        prepare_jpeg(f.read_bytes())  # the writer's 1/8-scale draft-decode check


def _full_decode_loop(files: list[Path]) -> None:
    for f in files:
        with Image.open(f) as im:
            im.load()


def _to_class_tars(root: Path, dst: Path) -> None:
    """root/<wnid>/* -> dst/<wnid>.tar, as the fall11 / winter21 release ships them."""
    dst.mkdir()
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        with tarfile.open(dst / f"{d.name}.tar", "w") as tf:
            for f in sorted(d.iterdir()):
                tf.add(f, arcname=f.name)


def _synthetic_listings(n_classes: int, per_class: int):
    """What listing release tars of n_classes x per_class members yields, class by class."""
    for c in range(n_classes):
        names = [b"n%08d_%d.JPEG" % (c + 1440764, i + 10000) for i in range(per_class)]
        offs = 512 + np.arange(per_class, dtype=np.int64) * 111_104
        lens = np.array([len(x) for x in names], np.int32)
        sizes = np.full(per_class, 110_000, np.int64)
        dup = np.zeros(per_class, np.uint16)
        yield c, b"".join(names), lens, offs, sizes, dup, [], int(offs[-1]) + 111_104


def plan_child(n_items: int, tmp: str) -> None:
    """Run in a fresh interpreter: build, save and load a synthetic plan; print JSON."""
    per_class = 1000
    n_classes = max(1, n_items // per_class)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    t0 = time.perf_counter()
    arrays, _ = assemble(_synthetic_listings(n_classes, per_class), n_classes, seed=0)
    t_build = time.perf_counter() - t0
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    plan = Plan({"args": {"shard_size": 1000}}, arrays)
    n = plan.num_items
    t0 = time.perf_counter()
    plan.save(Path(tmp) / "plan.npz")
    t_save = time.perf_counter() - t0
    del plan, arrays
    t0 = time.perf_counter()
    loaded = Plan({"args": {"shard_size": 1000}}, Plan.load_arrays(Path(tmp) / "plan.npz"))
    t_load = time.perf_counter() - t0
    res = {
        "items": n,
        "build_s": t_build,
        "arrays_bytes_per_item": loaded.nbytes / n,
        "peak_rise_bytes_per_item": (rss1 - rss0) * 1024 / n,
        "save_s": t_save,
        "load_s": t_load,
        "file_bytes_per_item": (Path(tmp) / "plan.npz").stat().st_size / n,
    }
    print(json.dumps(res))


def plan_scale(n_items: int, n_shards: int, tmp: Path) -> dict:
    """Plan build in a subprocess (a fresh peak RSS) + resume check of n_shards small shards."""
    tmp.mkdir()
    r = subprocess.run(
        [sys.executable, __file__, "--plan-child", str(n_items), "--out", str(tmp)],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    res = json.loads(r.stdout.strip().splitlines()[-1])
    out = tmp / "shards"
    manifest_path(out, "x.tar").parent.mkdir(parents=True)
    args = {"name": "bench", "shard_size": 1000, "version": PLAN_VERSION}
    meta = {"args": args, "plan_id": "0123456789abcdef", "num_shards": n_shards}
    rng = np.random.default_rng(0)
    for i in range(n_shards):  # 20 KiB stand-ins: the check reads manifests and stats shards
        data = rng.integers(0, 256, 20 * 1024, dtype=np.uint8).tobytes()
        fn = shard_name("bench", i)
        (out / fn).write_bytes(data)
        rec = {"filename": fn, "num_samples": 1000, "size": len(data), "plan": meta["plan_id"],
               "sha1": hashlib.sha1(data).hexdigest(), "num_reencoded": 0, "skipped": []}  # fmt: skip
        manifest_path(out, fn).write_text(json.dumps(rec))
    for check_sha1 in (False, True):
        t0 = time.perf_counter()
        ok = check_shards(out, meta, list(range(n_shards)), check_sha1, 2, progress=False)
        assert len(ok) == n_shards
        res[f"resume_check_{'sha1' if check_sha1 else 'size'}_s"] = time.perf_counter() - t0
    res["resume_shards"] = n_shards
    return res


def _decode_only(img: Image.Image, label: None, rng: np.random.Generator) -> tuple:
    return img, None  # the reader has decoded the image already: no augmentation, no tensor


def _loader(shards: Path, aug, workers: int):
    ds = ImageNetShards(shards, transform=aug, seed=0, rank=0, world_size=1, shuffle_buffer=100)
    ds.set_rows(torch.arange(len(ds.synsets)))  # the shards' own class ids
    it = iter(torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers))
    next(it)  # worker start-up and the first shard open are not throughput
    return it


def run_variants(variants: dict, n: int, repeats: int) -> dict[str, float]:
    """Best images/s of each variant over `repeats` rounds; rounds interleave the variants so
    that load from other processes on a shared machine hits them alike."""
    best: dict[str, float] = {}
    for rep in range(repeats):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            fn(rep)
            best[name] = max(best.get(name, 0.0), n / (time.perf_counter() - t0))
    return best


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--imagenet", help="an ImageNet-format folder (default: generate a toy one)")
    ap.add_argument("--toy-size", type=int, default=256, help="toy image side (pixels)")
    ap.add_argument("--per-class", type=int, default=30, help="toy images per class")
    ap.add_argument("--shard-size", type=int, default=100)
    ap.add_argument("--loader-workers", type=int, default=0, help="DataLoader workers")
    ap.add_argument(
        "--loader-files", type=int, default=120, help="images per loader round (0 = all files)"
    )
    ap.add_argument("--repeats", type=int, default=3, help="rounds; the best of each is kept")
    ap.add_argument("--out", default="bench_out")
    ap.add_argument("--plan-items", type=int, default=1_000_000, help="synthetic plan size")
    ap.add_argument("--plan-shards", type=int, default=1000, help="shards for the resume check")
    ap.add_argument("--plan-child", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.plan_child:
        return plan_child(a.plan_child, a.out)
    torch.set_num_threads(1)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="bench_data_"))
    try:
        if a.imagenet:
            root = Path(a.imagenet)
        else:
            make_toy_world(
                tmp / "toy",
                seed=0,
                size=a.toy_size,
                n_coco=0,
                n_imagenet_per_class=a.per_class,
                n_ade_train=0,
                n_ade_val=0,
                progress=False,
            )
            root = tmp / "toy" / "imagenet"
        files = _files(root)
        n = len(files)
        mb = sum(f.stat().st_size for f in files) / 2**20
        print(f"{n} files, {mb:.1f} MiB, from {root}")
        _decode_loop(files, None, None)  # warm the page cache for every variant alike
        tars = tmp / "tars"
        _to_class_tars(root, tars)
        v: dict = {"copy loop": lambda k: _copy_loop(files, tmp / f"copy{k}")}
        v["check loop (draft decode)"] = lambda k: _check_loop(files)
        v["check loop (full decode)"] = lambda k: _full_decode_loop(files)

        def writer(workers: int, reencode: bool = False, verify: str = "decode", src=root):
            kw = dict(shard_size=a.shard_size, workers=workers, name="bench", progress=False)
            tag = f"{workers}{reencode}{verify}{src.name}"
            return lambda k: write_shards(
                src, tmp / f"w{tag}{k}", reencode=reencode, verify=verify, **kw
            )

        for w in (1, 2):
            v[f"writer {w}w pass-through"] = writer(w)
            v[f"writer {w}w pass-through, class tars"] = writer(w, src=tars)
            v[f"writer {w}w re-encode"] = writer(w, reencode=True)
        v["writer 1w pass-through, header check"] = writer(1, verify="header")
        r = run_variants(v, n, a.repeats)
        shards = tmp / f"w1Falsedecode{root.name}0"
        nl = min(n, a.loader_files) if a.loader_files > 0 else n
        lf = files[:nl]
        rng = np.random.default_rng(0)
        v = {"PIL decode loop": lambda k: _decode_loop(lf, None, rng)}
        it = _loader(shards, _decode_only, a.loader_workers)
        v["loader decode only"] = lambda k, it=it: deque(itertools.islice(it, nl), maxlen=0)
        for c in (320, 512):
            aug = TrainAugment(crop_size=c, pad=False)
            v[f"decode+aug loop {c}"] = lambda k, aug=aug: _decode_loop(lf, aug, rng)
            it = _loader(shards, aug, a.loader_workers)
            v[f"loader {c}"] = lambda k, it=it: deque(itertools.islice(it, nl), maxlen=0)
        r.update(run_variants(v, nl, a.repeats))
        scale = plan_scale(a.plan_items, a.plan_shards, tmp / "plan") if a.plan_items else None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    ratio_ref = {"writer": "copy loop", "check": "copy loop", "loader": "PIL decode loop"}
    rows = []
    for k, v in r.items():
        ref = next((ratio_ref[p] for p in ratio_ref if k.startswith(p)), None)
        if k.startswith("loader") and k[-1].isdigit():
            c = k.split()[-1]
            note = (
                f"{r[ref] / v:.2f}x the decode-bound time; "
                f"{r[f'decode+aug loop {c}'] / v:.2f}x vs decode+aug loop"
            )
        elif ref:
            note = f"{r[ref] / v:.2f}x the time of the {ref}"
        else:
            note = ""
        rows.append({"variant": k, "images_per_s": round(v, 1), "note": note})
    print(f"\n{'variant':38s} {'img/s':>9s}  note")
    for row in rows:
        print(f"{row['variant']:38s} {row['images_per_s']:9.1f}  {row['note']}")
    if scale:
        s = scale
        plan_rows = [
            ("plan build", f"{s['build_s']:.2f} s", f"{s['items']:,} images, synthetic listing"),
            ("plan arrays", f"{s['arrays_bytes_per_item']:.1f} B/img", "in memory after build"),
            ("plan build peak", f"{s['peak_rise_bytes_per_item']:.1f} B/img",
             "ru_maxrss rise in a fresh process"),
            ("plan save / load", f"{s['save_s']:.2f} / {s['load_s']:.2f} s",
             f"plan.npz {s['file_bytes_per_item']:.1f} B/img"),
            ("resume check, size", f"{s['resume_check_size_s']:.3f} s",
             f"{s['resume_shards']} shards + manifests, 8 threads"),
            ("resume check, sha1", f"{s['resume_check_sha1_s']:.3f} s",
             f"{s['resume_shards']} shards of 20 KiB"),
        ]  # fmt: skip
        print(f"\n{'plan scale':38s} {'value':>14s}  note")
        for name, val, note in plan_rows:
            print(f"{name:38s} {val:>14s}  {note}")
        scale = {k: round(v, 4) if isinstance(v, float) else v for k, v in scale.items()}
    res = {
        "files": n,
        "mib": round(mb, 2),
        "toy_size": None if a.imagenet else a.toy_size,
        "loader_workers": a.loader_workers,
        "loader_files": nl,
        "repeats": a.repeats,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "results": rows,
        "plan_scale": scale,
    }
    (out / "bench_data.json").write_text(json.dumps(res, indent=1) + "\n")
    print(f"-> {out / 'bench_data.json'}")


if __name__ == "__main__":
    main()
