"""Data pipeline throughput, side by side in one run: shard writer and shard loader vs plain loops.

    python scripts/bench_data.py [--imagenet DIR] [--toy-size 256] [--per-class 50] [--out bench_out]

Writer: images/s of scripts/shard_imagenet21k.py's write_shards with 1 and 2 workers, JPEG
pass-through and forced re-encode, against a plain read + write file-copy loop of the same files.
Loader: images/s of ImageNetShards (tar read -> decode -> augmentation) at 320 and 512 crops,
against a plain PIL decode loop of the same files (the decode bound) and a plain decode +
the same augmentation loop. Without --imagenet a toy ImageNet folder is generated first.
Prints a table and writes OUT/bench_data.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import shutil
import tempfile
import time
from collections import deque
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from larvess.data.imagenet_shards import write_shards
from larvess.data.imagenet_wds import ImageNetShards
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


def _decode_only(img: Image.Image, label: None, rng: np.random.Generator) -> tuple:
    return img, None  # the reader has decoded the image already: no augmentation, no tensor


def _loader(shards: Path, aug, workers: int):
    ds = ImageNetShards(shards, transform=aug, seed=0, rank=0, world_size=1, shuffle_buffer=100)
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
    ap.add_argument("--repeats", type=int, default=3, help="rounds; the best of each is kept")
    ap.add_argument("--out", default="bench_out")
    a = ap.parse_args(argv)
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
        _decode_loop(files[:50], None, None)  # warm the page cache for every variant alike
        v: dict = {"copy loop": lambda k: _copy_loop(files, tmp / f"copy{k}")}

        def writer(workers: int, reencode: bool = False, verify: str = "decode"):
            kw = dict(shard_size=a.shard_size, workers=workers, name="bench", progress=False)
            return lambda k: write_shards(
                root,
                tmp / f"w{workers}{reencode}{verify}{k}",
                reencode=reencode,
                verify=verify,
                **kw,
            )

        for w in (1, 2):
            v[f"writer {w}w pass-through"] = writer(w)
            v[f"writer {w}w re-encode"] = writer(w, reencode=True)
        v["writer 1w pass-through, header check"] = writer(1, verify="header")
        r = run_variants(v, n, a.repeats)
        shards = tmp / "w1Falsedecode0"
        rng = np.random.default_rng(0)
        v = {"PIL decode loop": lambda k: _decode_loop(files, None, rng)}
        it = _loader(shards, _decode_only, a.loader_workers)
        v["loader decode only"] = lambda k, it=it: deque(itertools.islice(it, n), maxlen=0)
        for c in (320, 512):
            aug = TrainAugment(crop_size=c, pad=False)
            v[f"decode+aug loop {c}"] = lambda k, aug=aug: _decode_loop(files, aug, rng)
            it = _loader(shards, aug, a.loader_workers)
            v[f"loader {c}"] = lambda k, it=it: deque(itertools.islice(it, n), maxlen=0)
        r.update(run_variants(v, n, a.repeats))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    ratio_ref = {"writer": "copy loop", "loader": "PIL decode loop"}
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
    res = {
        "files": n,
        "mib": round(mb, 2),
        "toy_size": None if a.imagenet else a.toy_size,
        "loader_workers": a.loader_workers,
        "repeats": a.repeats,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "results": rows,
    }
    (out / "bench_data.json").write_text(json.dumps(res, indent=1) + "\n")
    print(f"-> {out / 'bench_data.json'}")


if __name__ == "__main__":
    main()
