"""ImageNet(-21K) folder tree -> WebDataset shards: the resumable writer (reader: imagenet_wds).

Shards are `<name>-000000.tar, ...`; a sample has `__key__` (no dots), `jpg` (the original bytes
when the file is a valid RGB JPEG, else the image converted to RGB and saved as JPEG quality 95),
`cls` (ascii int: index into the synset list) and `json` ({"wnid", "path", "reencoded"}).
`info.json` follows timm's wds reader format (`splits.train.{filenames, shard_lengths,
num_samples}`) and adds the synset list and writer statistics.

Writing is resumable: the plan (sample order, shard assignment) is a deterministic function of the
arguments and is saved first (plan.json + plan.tsv.gz); each shard goes to a temp name and is
renamed when complete, with a record in .progress/; a re-run with the same arguments keeps the
verified shards and writes the missing ones.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import logging
import multiprocessing as mp
import os
import re
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

log = logging.getLogger(__name__)
PLAN_VERSION = 1
REENCODE_QUALITY = 95
_WNID = re.compile(r"^n\d{8}$")


class UnreadableImage(ValueError):
    pass


def prepare_jpeg(data: bytes, reencode: bool = False, verify: str = "decode") -> tuple[bytes, bool]:
    """Return (JPEG bytes, re-encoded?) for an image file's bytes; UnreadableImage if undecodable.

    A valid RGB JPEG keeps its bytes. verify="decode" checks it with a 1/8-scale draft decode:
    libjpeg still reads every entropy-coded segment (so truncation raises) at a fraction of the
    cost of a full decode. verify="header" trusts a JPEG whose header parses and whose bytes end
    with the EOI marker (no truncation) and decodes only the others; damage inside the
    entropy-coded data then reaches the reader, which skips and counts such samples.
    """
    if verify not in ("decode", "header"):
        raise ValueError(f"verify must be 'decode' or 'header', got {verify!r}")
    try:
        im = Image.open(io.BytesIO(data))
        if im.format == "JPEG" and im.mode == "RGB" and not reencode:
            if verify == "header" and data.rstrip(b"\0\r\n ").endswith(b"\xff\xd9"):
                return data, False
            im.draft("RGB", (max(1, im.width // 8), max(1, im.height // 8)))
            im.load()
            return data, False
        im.load()
        if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
            rgba = im.convert("RGBA")
            rgb = Image.new("RGB", rgba.size, (255, 255, 255))
            rgb.paste(rgba, mask=rgba.getchannel("A"))  # composite on white, not on black
        else:
            rgb = im.convert("RGB")
        buf = io.BytesIO()
        rgb.save(buf, format="JPEG", quality=REENCODE_QUALITY)
        return buf.getvalue(), True
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise UnreadableImage(f"{type(e).__name__}: {e}") from e


def read_synsets(path: str | Path) -> list[str]:
    """One wnid per line (blank lines ignored); errors name the file and line."""
    wnids: list[str] = []
    for i, line in enumerate(Path(path).read_text().splitlines(), 1):
        w = line.strip().split("\t")[0].strip()
        if not w:
            continue
        if not _WNID.match(w):
            raise ValueError(f"{path}:{i}: not a WordNet id (nXXXXXXXX): {line!r}")
        if w in wnids:
            raise ValueError(f"{path}:{i}: duplicate synset {w}")
        wnids.append(w)
    if not wnids:
        raise ValueError(f"{path}: no synsets")
    return wnids


def _key(wnid: str, stem: str) -> str:
    k = stem if stem.startswith(wnid + "_") else f"{wnid}_{stem}"
    k = re.sub(r"[^A-Za-z0-9_-]", "_", k)  # webdataset splits the key at the first dot
    if len(k) > 90:  # ustar names have 100 bytes: key + ".json"
        k = f"{k[:70]}_{hashlib.sha1(k.encode()).hexdigest()[:12]}"
    return k


def plan_args(
    root: str | Path,
    synsets: list[str],
    shard_size: int,
    seed: int,
    max_per_class: int | None,
    name: str,
    reencode: bool,
    verify: str = "decode",
) -> dict:
    """The arguments that determine the shards' contents (the worker count does not)."""
    if verify not in ("decode", "header"):
        raise ValueError(f"verify must be 'decode' or 'header', got {verify!r}")
    if shard_size < 1:
        raise ValueError(f"shard size must be >= 1, got {shard_size}")
    if max_per_class is not None and max_per_class < 1:
        raise ValueError(f"max images per class must be >= 1, got {max_per_class}")
    if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
        raise ValueError(f"shard name must be letters, digits, '_' or '-', got {name!r}")
    return {
        "root": str(Path(root).resolve()),
        "synsets_sha256": hashlib.sha256("\n".join(synsets).encode()).hexdigest(),
        "num_synsets": len(synsets),
        "shard_size": shard_size,
        "seed": seed,
        "max_per_class": max_per_class,
        "name": name,
        "reencode": reencode,
        "verify": verify,
        "version": PLAN_VERSION,
    }


def make_plan(
    root: Path, synsets: list[str], args: dict, progress: bool = True
) -> tuple[list[tuple[int, str, str]], dict]:
    """List the tree and fix the sample order: [(cls, key, path relative to root)], meta."""
    items: list[tuple[int, str, str]] = []
    missing, keys = [], set()
    for c, wnid in enumerate(
        tqdm(synsets, "listing", unit="synset", leave=False, disable=not progress)
    ):
        d = root / wnid
        if not d.is_dir():
            missing.append(wnid)
            continue
        files = sorted(e.name for e in os.scandir(d) if e.is_file() and not e.name.startswith("."))
        files = [f for f in files if "\t" not in f and "\n" not in f]
        m = args["max_per_class"]
        if m is not None and len(files) > m:
            pick = np.random.default_rng([args["seed"], c]).choice(len(files), m, replace=False)
            files = [files[i] for i in np.sort(pick)]
        for f in files:
            k = base = _key(wnid, f.split(".")[0])
            n = 1
            while k in keys:  # e.g. x.JPEG and x.png in one folder
                k, n = f"{base}-{n}", n + 1
            keys.add(k)
            items.append((c, k, f"{wnid}/{f}"))
    perm = np.random.default_rng(args["seed"]).permutation(len(items))
    items = [items[i] for i in perm]
    n_shards = (len(items) + args["shard_size"] - 1) // args["shard_size"]
    return items, {"num_planned": len(items), "num_shards": n_shards, "missing_synsets": missing}


def load_or_make_plan(
    out: Path, synsets: list[str], args: dict, progress: bool = True
) -> tuple[list, dict]:
    """Reuse out/plan.json (+ plan.tsv.gz) when made with the same args; else error or create."""
    digest = hashlib.sha256(json.dumps(args, sort_keys=True).encode()).hexdigest()[:16]
    pj, pt = out / "plan.json", out / "plan.tsv.gz"
    if pj.exists():
        old = json.loads(pj.read_text())
        if old.get("args_hash") != digest:
            diff = {k: (old["args"].get(k), v) for k, v in args.items() if old["args"].get(k) != v}
            raise RuntimeError(
                f"{pj} was written with other arguments (old, new): {diff}; "
                "use another --out or delete the folder"
            )
        with gzip.open(pt, "rt") as f:
            rows = [ln.rstrip("\n").split("\t") for ln in f]
        return [(int(c), k, p) for c, k, p in rows], old
    items, meta = make_plan(Path(args["root"]), synsets, args, progress)
    if not items:
        raise RuntimeError(f"no image files under {args['root']} for the {len(synsets)} synsets")
    out.mkdir(parents=True, exist_ok=True)
    with gzip.open(out / "plan.tsv.gz.tmp", "wt") as f:
        f.writelines(f"{c}\t{k}\t{p}\n" for c, k, p in items)
    os.replace(out / "plan.tsv.gz.tmp", pt)
    plan = {"args": args, "args_hash": digest, "synsets": synsets, **meta}
    (out / "plan.json.tmp").write_text(json.dumps(plan))
    os.replace(out / "plan.json.tmp", pj)  # last: a plan.json implies a complete plan.tsv.gz
    return items, plan


def shard_name(name: str, i: int) -> str:
    return f"{name}-{i:06d}.tar"


def count_tar_samples(path: Path) -> int:
    """Number of distinct keys in a shard (reads tar headers only)."""
    with tarfile.open(path) as tf:
        return len({m.name.split("/")[-1].split(".")[0] for m in tf.getmembers() if m.isfile()})


def _tar_member(name: str, data: bytes) -> bytes:
    """One ustar member (header + data padded to 512 bytes), fixed owner and mtime 0 so shards
    are byte-identical across runs; ~10x cheaper per member than tarfile's TarInfo.tobuf."""
    h = bytearray(512)
    for off, width, val in ((0, 100, name.encode()), (100, 8, b"0000444\0"),
                            (108, 8, b"0000000\0"), (116, 8, b"0000000\0"),
                            (124, 12, b"%011o\0" % len(data)), (136, 12, b"00000000000\0"),
                            (148, 8, b" " * 8), (156, 1, b"0"), (257, 8, b"ustar\x0000"),
                            (265, 32, b"bigdata"), (297, 32, b"bigdata")):  # fmt: skip
        h[off : off + len(val)] = val[:width]
    h[148:156] = b"%06o\0 " % sum(h)
    return bytes(h) + data + b"\0" * (-len(data) % 512)


_counter = None  # images done, shared with the pool's workers for the progress bar


def _init_worker(counter) -> None:
    global _counter
    _counter = counter


def write_shard(job: tuple) -> dict:
    """Write one shard to a temp name, rename it when complete, then write its record."""
    out, root, name, index, items, synsets, reencode, verify = job
    out, root = Path(out), Path(root)
    final = out / shard_name(name, index)
    tmp = out / f".{final.name}.tmp-{os.getpid()}"
    skipped, n, n_re = [], 0, 0
    with open(tmp, "wb") as f:
        for i, (c, key, rel) in enumerate(items):
            try:
                data, re_ = prepare_jpeg((root / rel).read_bytes(), reencode, verify)
            except (OSError, UnreadableImage) as e:
                skipped.append((rel, str(e).replace("\t", " ").replace("\n", " ")))
            else:
                meta = json.dumps({"wnid": synsets[c], "path": rel, "reencoded": re_})
                for ext, b in (("cls", str(c).encode()), ("jpg", data), ("json", meta.encode())):
                    f.write(_tar_member(f"{key}.{ext}", b))
                n, n_re = n + 1, n_re + re_
            if _counter is not None and (i % 32 == 31 or i == len(items) - 1):
                with _counter.get_lock():
                    _counter.value += i % 32 + 1
        f.write(b"\0" * 1024)  # end-of-archive marker
    os.replace(tmp, final)
    rec = {"filename": final.name, "num_samples": n, "num_reencoded": n_re, "skipped": skipped}
    prog = out / ".progress"
    (prog / f"{final.name}.json.tmp").write_text(json.dumps(rec))
    os.replace(prog / f"{final.name}.json.tmp", prog / f"{final.name}.json")
    return rec


def _done_record(out: Path, name: str, i: int) -> dict | None:
    """The record of a completed shard whose tar still holds the recorded sample count."""
    rp, tp = out / ".progress" / f"{shard_name(name, i)}.json", out / shard_name(name, i)
    if not (rp.exists() and tp.exists()):
        return None
    try:
        rec = json.loads(rp.read_text())
        return rec if count_tar_samples(tp) == rec["num_samples"] else None
    except (OSError, ValueError, tarfile.TarError):
        return None


def write_shards(
    root: str | Path,
    out: str | Path,
    synsets: list[str] | None = None,
    shard_size: int = 1000,
    workers: int = 1,
    seed: int = 0,
    max_per_class: int | None = None,
    name: str = "imagenet",
    reencode: bool = False,
    verify: str = "decode",
    progress: bool = True,
) -> dict:
    """Folder tree root/<wnid>/* -> out/<name>-NNNNNN.tar + info.json; returns the info dict.

    synsets: class list (cls = index); None = every wnid folder of root, sorted. Listed synsets
    without a folder are allowed (recorded in info.json as missing_synsets).
    """
    root, out = Path(root), Path(out)
    if not root.is_dir():
        raise FileNotFoundError(f"ImageNet root {root} is not a folder")
    if synsets is None:
        synsets = sorted(d.name for d in root.iterdir() if d.is_dir() and _WNID.match(d.name))
        if not synsets:
            raise ValueError(f"no wnid folders (nXXXXXXXX) under {root}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    args = plan_args(root, synsets, shard_size, seed, max_per_class, name, reencode, verify)
    items, plan = load_or_make_plan(out, synsets, args, progress)
    (out / ".progress").mkdir(exist_ok=True)
    for p in out.glob(".*.tar.tmp-*"):  # left by a killed run (one writer per folder)
        p.unlink()
    n_shards = plan["num_shards"]
    records: dict[int, dict] = {}
    for i in range(n_shards):
        if (rec := _done_record(out, name, i)) is not None:
            records[i] = rec
    todo = [i for i in range(n_shards) if i not in records]
    shard = [items[i * shard_size : (i + 1) * shard_size] for i in range(n_shards)]
    jobs = [(str(out), str(root), name, i, shard[i], synsets, reencode, verify) for i in todo]
    done = sum(len(shard[i]) for i in records)
    bar = tqdm(total=len(items), initial=done, desc="sharding", unit="img", disable=not progress)
    if workers == 1 or len(jobs) <= 1:
        for job in jobs:
            records[job[3]] = write_shard(job)
            bar.update(len(job[4]))
    else:
        counter = mp.get_context("fork").Value("q", 0)
        with mp.get_context("fork").Pool(workers, _init_worker, (counter,)) as pool:
            it = pool.imap_unordered(write_shard, jobs)
            for _ in jobs:
                while True:
                    try:
                        rec = it.next(timeout=0.5)
                        break
                    except mp.TimeoutError:
                        bar.update(done + counter.value - bar.n)
                records[int(rec["filename"].rsplit("-", 1)[1].split(".")[0])] = rec
            bar.update(done + counter.value - bar.n)
    bar.close()
    return _write_info(out, synsets, [records[i] for i in range(n_shards)], plan)


def _write_info(out: Path, synsets: list[str], recs: list[dict], plan: dict) -> dict:
    skipped = [s for r in recs for s in r["skipped"]]
    (out / "skipped.txt").write_text("".join(f"{p}\t{why}\n" for p, why in skipped))
    files, counts = [r["filename"] for r in recs], [r["num_samples"] for r in recs]
    total = sum(counts)
    info = {
        "name": plan["args"]["name"],
        "num_samples": total,
        "filenames": files,
        "shard_lengths": counts,
        "shards": [{"filename": f, "num_samples": n} for f, n in zip(files, counts)],
        "splits": {
            "train": {
                "name": "train",
                "num_samples": total,
                "filenames": files,
                "shard_lengths": counts,
            }
        },  # timm's ReaderWds reads this
        "num_classes": len(synsets),
        "synsets": synsets,
        "num_skipped": len(skipped),
        "num_reencoded": sum(r["num_reencoded"] for r in recs),
        "missing_synsets": plan["missing_synsets"],
        "args": plan["args"],
    }
    (out / "info.json.tmp").write_text(json.dumps(info, indent=1))
    os.replace(out / "info.json.tmp", out / "info.json")
    return info
