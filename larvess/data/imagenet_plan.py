"""The sharding plan of an ImageNet(-21K) download: find the classes, list them, fix the order.

Sources under `root` (either kind, or a mix):

- `root/nXXXXXXXX.tar`: the official fall11 / winter21 release, one uncompressed tar per class
  with members named like `n01440764_10026.JPEG`. Only the tar headers are read when listing;
  the plan records each member's data offset and size, so the writer reads it with one `pread`.
- `root/nXXXXXXXX/`: a folder per class (ImageNet-21K-P style, or tars unpacked by hand).

A class present both as a folder and as a tar is an error naming both, unless `prefer` says which
one to read ("tar" or "folder"; the other is then ignored). A class's files are sorted by name
(bytes), `max_per_class` keeps a random subset drawn with seed [seed, class index], and the whole
list is shuffled with `seed`: the plan is a function of the arguments and the listed names, not of
the listing order, the worker count or the machine.

Memory: one `Plan` holds per-item numpy arrays only (name offset int64, data offset int64, size
int64, key suffix uint16, order int32) plus the names' bytes, ~50 bytes per image; per-class data
(source, tar size) lives in plan.json (in OUT/.larvess/, shard_format.py). Listing builds Python objects for one class at a time.
Files that cannot be listed (hidden files, links inside tars, a tar cut short or with a damaged
header) are recorded with a reason and end up in skipped.txt.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import re
import socket
import tarfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from tqdm import tqdm

from larvess.data.jpeg_check import VERIFY_MODES
from larvess.data.shard_format import PLAN_JSON, PLAN_NPZ, state_dir
from larvess.names import WNID

PLAN_VERSION = 2
_TAR = re.compile(r"^(n\d{8})\.tar$")
ARRAYS = ("class_start", "name_off", "names", "data_off", "size", "dup", "order")


def read_synsets(path: str | Path) -> list[str]:
    """One wnid per line (blank lines ignored); errors name the file and line."""
    wnids: list[str] = []
    seen: set[str] = set()
    for i, line in enumerate(Path(path).read_text().splitlines(), 1):
        w = line.strip().split("\t")[0].strip()
        if not w:
            continue
        if not WNID.match(w):
            raise ValueError(f"{path}:{i}: not a WordNet id (nXXXXXXXX): {line!r}")
        if w in seen:
            raise ValueError(f"{path}:{i}: duplicate synset {w}")
        wnids.append(w)
        seen.add(w)
    if not wnids:
        raise ValueError(f"{path}: no synsets")
    return wnids


def find_sources(
    root: str | Path, prefer: str | None = None, wanted: set[str] | None = None
) -> dict[str, str]:
    """{wnid: source} for root's class folders `nXXXXXXXX/` and class tars `nXXXXXXXX.tar`.

    A class both a folder and a tar is an error unless prefer ("tar" / "folder") picks one;
    with `wanted`, only those classes are returned (and checked)."""
    if prefer not in (None, "tar", "folder"):
        raise ValueError(f"prefer must be 'tar', 'folder' or None, got {prefer!r}")
    folders: dict[str, str] = {}
    tars: dict[str, str] = {}
    with os.scandir(root) as it:
        for e in it:
            if WNID.match(e.name) and e.is_dir():
                folders[e.name] = e.name
            elif (m := _TAR.match(e.name)) and e.is_file():
                tars[m.group(1)] = e.name
    if wanted is not None:
        folders = {w: s for w, s in folders.items() if w in wanted}
        tars = {w: s for w, s in tars.items() if w in wanted}
    both = sorted(set(folders) & set(tars))
    if both and prefer is None:
        eg = ", ".join(f"{Path(root) / w}/ and {Path(root) / tars[w]}" for w in both[:3])
        raise ValueError(
            f"{len(both)} classes under {root} are both a folder and a tar ({eg}"
            f"{', ...' if len(both) > 3 else ''}): remove one of each pair, or pass "
            "--prefer tar / --prefer folder to read only that one"
        )
    first, second = (tars, folders) if prefer == "tar" else (folders, tars)
    return {w: first.get(w) or second[w] for w in sorted(set(folders) | set(tars))}


def key_for(wnid: str, name: str) -> str:
    """Sample key of a file name: wnid-prefixed stem, only [A-Za-z0-9_-], at most 90 chars."""
    stem = name.rsplit("/", 1)[-1].split(".")[0]
    k = stem if stem.startswith(wnid + "_") else f"{wnid}_{stem}"
    k = re.sub(r"[^A-Za-z0-9_-]", "_", k)  # webdataset splits the key at the first dot
    if len(k) > 90:  # ustar names have 100 bytes: key + ".json"
        k = f"{k[:70]}_{hashlib.sha1(k.encode()).hexdigest()[:12]}"
    return k


def _list_tar(path: str, source: str, skipped: list) -> tuple[list, list, list, int]:
    """Member names, data offsets and sizes of one class tar (headers only, no data read)."""
    names, offs, sizes = [], [], []
    total, seen = os.path.getsize(path), 0
    try:
        with tarfile.open(path, "r:") as tf:
            while (m := tf.next()) is not None:
                seen += 1
                base = m.name.rsplit("/", 1)[-1]
                if m.isdir():
                    continue
                if not m.isfile():
                    skipped.append((f"{source}/{m.name}", "tar member is not a regular file"))
                elif base.startswith("."):
                    skipped.append((f"{source}/{m.name}", "hidden file, not read"))
                elif m.offset_data + m.size > total:
                    skipped.append((f"{source}/{m.name}", "tar cut short inside this member"))
                else:
                    names.append(m.name)
                    offs.append(m.offset_data)
                    sizes.append(m.size)
            end = tf.offset
        with open(path, "rb") as f:  # tarfile stops silently at a damaged header
            f.seek(end)
            if f.read(512).strip(b"\0"):
                skipped.append((source, f"damaged tar header at byte {end}; members after it lost"))
    except (tarfile.TarError, OSError) as e:
        skipped.append((source, f"unreadable tar after {seen} members: {e}"))
    return names, offs, sizes, total


def list_class(job: tuple) -> tuple:
    """List one class (runs in a pool worker): its sorted, subsampled files in compact form."""
    root, c, wnid, source, seed, max_per_class = job
    skipped: list[tuple[str, str]] = []
    path = os.path.join(root, source)
    if source.endswith(".tar"):
        names, offs, sizes, src_size = _list_tar(path, source, skipped)
    else:
        names, offs, sizes, src_size = [], None, None, -1
        with os.scandir(path) as it:
            for e in it:
                if e.name.startswith("."):
                    skipped.append((f"{source}/{e.name}", "hidden file, not read"))
                elif e.is_file():
                    names.append(e.name)
                else:
                    skipped.append((f"{source}/{e.name}", "not a regular file, not read"))
    enc = [os.fsencode(n) for n in names]
    pick = sorted(range(len(enc)), key=enc.__getitem__)  # stable: repeated names keep tar order
    if max_per_class is not None and len(pick) > max_per_class:
        sub = np.random.default_rng([seed, c]).choice(len(pick), max_per_class, replace=False)
        pick = [pick[i] for i in np.sort(sub)]
    keys: set[str] = set()
    dup = np.zeros(len(pick), np.uint16)
    for j, i in enumerate(pick):
        k = base = key_for(wnid, names[i])
        while k in keys:  # e.g. x.JPEG and x.png in one folder
            dup[j] += 1
            k = f"{base}-{dup[j]}"
        keys.add(k)
    blob = b"".join(enc[i] for i in pick)
    lens = np.array([len(enc[i]) for i in pick], np.int32)
    if offs is not None:
        offs = np.array(offs, np.int64)[pick] if pick else np.zeros(0, np.int64)
        sizes = np.array(sizes, np.int64)[pick] if pick else np.zeros(0, np.int64)
    return c, blob, lens, offs, sizes, dup, skipped, src_size


class Plan:
    """The compact plan: items in class order, `order` = the sample order (shard i = a slice).

    meta: plan.json's dict (args, synsets, per-class `sources` / `source_sizes`, counts, ...).
    arrays: class_start int64 [C+1] (items of class c are class_start[c]:class_start[c+1]),
    name_off int64 [N+1] into names uint8 [B] (file or tar member name, utf-8/surrogateescape),
    data_off / size int64 [N] (tar member data; -1 for a file in a folder), dup uint16 [N] (key
    suffix -dup when two names give one key), order int32 or int64 [N].
    """

    def __init__(self, meta: dict, arrays: dict[str, np.ndarray]) -> None:
        self.meta = meta
        for k in ARRAYS:
            setattr(self, k, arrays[k])

    @property
    def num_items(self) -> int:
        return len(self.order)

    @property
    def nbytes(self) -> int:
        return sum(getattr(self, k).nbytes for k in ARRAYS)

    def shard(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(item indices, class indices) of shard i, in sample order."""
        s = self.meta["args"]["shard_size"]
        idx = np.asarray(self.order[i * s : (i + 1) * s], np.int64)
        return idx, np.searchsorted(self.class_start, idx, side="right") - 1

    def name(self, j: int) -> str:
        return os.fsdecode(self.names[self.name_off[j] : self.name_off[j + 1]].tobytes())

    def fingerprint(self) -> str:
        """sha1 of the arrays and the per-class sources: what the shards' bytes depend on."""
        h = hashlib.sha1(self.meta["args_hash"].encode())
        for k in ARRAYS:
            h.update(np.ascontiguousarray(getattr(self, k)).view(np.uint8).data)
        extra = [self.meta[k] for k in ("sources", "source_sizes", "listing_skipped")]
        h.update(json.dumps(extra).encode())
        return h.hexdigest()[:20]

    def save(self, path: Path) -> None:
        tmp = path.with_name(f".{path.name}.tmp-{socket.gethostname()}-{os.getpid()}")
        with open(tmp, "wb") as f:
            np.savez(f, **{k: getattr(self, k) for k in ARRAYS})
        os.replace(tmp, path)

    @staticmethod
    def load_arrays(path: Path) -> dict[str, np.ndarray]:
        with np.load(path) as z:
            return {k: z[k] for k in ARRAYS}


def assemble(listings: Iterable[tuple], num_classes: int, seed: int) -> tuple[dict, dict]:
    """Per-class listings (in class order, as list_class returns them) -> (arrays, class meta).

    Keeps per-class pieces only until each field is concatenated: the peak is about the final
    arrays plus one field plus the int64 permutation (bytes per item measured by bench_data).
    """
    parts: dict[str, list] = {k: [] for k in ("blob", "lens", "offs", "sizes", "dup")}
    counts = np.zeros(num_classes, np.int64)
    src_sizes = np.full(num_classes, -1, np.int64)
    skipped: list = []
    expect = 0
    for c, blob, lens, offs, sizes, dup, skip, src_size in listings:
        if c != expect:
            raise RuntimeError(f"listing out of order: class {c}, expected {expect}")
        expect += 1
        n = len(lens)
        counts[c], src_sizes[c] = n, src_size
        parts["blob"].append(blob)
        parts["lens"].append(lens)
        parts["offs"].append(offs if offs is not None else np.full(n, -1, np.int64))
        parts["sizes"].append(sizes if sizes is not None else np.full(n, -1, np.int64))
        parts["dup"].append(dup)
        skipped.extend(skip)
    if expect != num_classes:
        raise RuntimeError(f"listing ended after {expect} of {num_classes} classes")

    def cat(k: str, dtype) -> np.ndarray:
        a = np.concatenate(parts.pop(k)) if num_classes else np.zeros(0, dtype)
        return a.astype(dtype, copy=False)

    blob = b"".join(parts.pop("blob"))
    names = np.frombuffer(blob, np.uint8) if blob else np.zeros(0, np.uint8)
    lens = cat("lens", np.int32)
    name_off = np.zeros(len(lens) + 1, np.int64)
    np.cumsum(lens, out=name_off[1:])
    del lens
    n = len(name_off) - 1
    perm = np.random.default_rng(seed).permutation(n)
    arrays = {
        "class_start": np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
        "name_off": name_off,
        "names": names,
        "data_off": cat("offs", np.int64),
        "size": cat("sizes", np.int64),
        "dup": cat("dup", np.uint16),
        "order": perm.astype(np.int32) if n < 2**31 else perm,
    }
    meta = {"class_counts": counts.tolist(), "source_sizes": src_sizes.tolist()}
    return arrays, {**meta, "listing_skipped": skipped}


def plan_args(
    synsets: list[str],
    shard_size: int,
    seed: int,
    max_per_class: int | None,
    name: str,
    reencode: bool,
    verify: str = "decode",
    prefer: str | None = None,
) -> dict:
    """The arguments that fix the shards' bytes (not the root path, workers or node split)."""
    if verify not in VERIFY_MODES:
        raise ValueError(f"verify must be one of {VERIFY_MODES}, got {verify!r}")
    if shard_size < 1:
        raise ValueError(f"shard size must be >= 1, got {shard_size}")
    if max_per_class is not None and max_per_class < 1:
        raise ValueError(f"max images per class must be >= 1, got {max_per_class}")
    if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
        raise ValueError(f"shard name must be letters, digits, '_' or '-', got {name!r}")
    if prefer not in (None, "tar", "folder"):
        raise ValueError(f"prefer must be 'tar' or 'folder', got {prefer!r}")
    return {
        "synsets_sha256": hashlib.sha256("\n".join(synsets).encode()).hexdigest(),
        "num_synsets": len(synsets),
        "shard_size": shard_size,
        "seed": seed,
        "max_per_class": max_per_class,
        "name": name,
        "reencode": reencode,
        "verify": verify,
        "prefer": prefer,
        "version": PLAN_VERSION,
    }


def args_hash(args: dict) -> str:
    return hashlib.sha256(json.dumps(args, sort_keys=True).encode()).hexdigest()[:16]


def make_plan(
    root: Path, synsets: list[str], args: dict, workers: int = 1, progress: bool = True
) -> Plan:
    """List every class (in parallel: `workers` processes) and fix the sample order."""
    found = find_sources(root, args["prefer"], set(synsets))
    sources = [found.get(w) for w in synsets]
    jobs = [
        (str(root), c, w, s, args["seed"], args["max_per_class"])
        for c, (w, s) in enumerate(zip(synsets, sources))
    ]
    bar = tqdm(total=len(jobs), desc="listing", unit="class", disable=not progress)

    def listings() -> Iterable[tuple]:
        empty = (b"", np.zeros(0, np.int32), None, None, np.zeros(0, np.uint16), [], -1)
        todo = [j for j in jobs if j[3] is not None]
        if workers > 1 and len(todo) > 1:
            pool = mp.get_context("fork").Pool(workers)
            it = pool.imap(list_class, todo, chunksize=max(1, min(16, len(todo) // workers // 8)))
        else:
            pool, it = None, map(list_class, todo)
        try:
            for job in jobs:
                yield next(it) if job[3] is not None else (job[1], *empty)
                bar.update()
        finally:
            if pool is not None:
                pool.terminate()
            bar.close()

    arrays, cmeta = assemble(listings(), len(synsets), args["seed"])
    n = len(arrays["order"])
    meta: dict = {
        "args": args,
        "args_hash": args_hash(args),
        "root": str(Path(root).resolve()),
        "synsets": synsets,
        "sources": sources,
        **cmeta,
        "num_planned": n,
        "num_shards": (n + args["shard_size"] - 1) // args["shard_size"],
        "missing_synsets": [w for w, s in zip(synsets, sources) if s is None],
    }
    plan = Plan(meta, arrays)
    meta["plan_id"] = plan.fingerprint()  # manifests name it: a re-listed plan redoes shards
    return plan


def load_or_make_plan(
    out: Path, root: Path, synsets: list[str], args: dict, workers: int = 1, progress: bool = True
) -> Plan:
    """Reuse OUT/.larvess/plan.json + plan.npz when made with the same args; else error or
    create them.

    Both files go to temp names and are renamed into place, plan.npz first: a plan.json means a
    complete plan. Ranks of a multi-node run that list at the same time write identical files.
    """
    st = state_dir(out)
    pj, pz = st / PLAN_JSON, st / PLAN_NPZ
    digest = args_hash(args)
    if pj.exists():
        meta = json.loads(pj.read_text())
        if meta.get("args_hash") != digest:
            old = meta.get("args", {})
            diff = {k: (old.get(k), v) for k, v in args.items() if old.get(k) != v}
            raise RuntimeError(
                f"{pj} was written with other arguments (old, new): {diff}; "
                "use another --out or delete the folder"
            )
        return Plan(meta, Plan.load_arrays(pz))
    plan = make_plan(root, synsets, args, workers, progress)
    if plan.num_items == 0:
        raise RuntimeError(f"no image files under {root} for the {len(synsets)} synsets")
    st.mkdir(parents=True, exist_ok=True)
    plan.save(pz)
    tmp = st / f".plan.json.tmp-{socket.gethostname()}-{os.getpid()}"
    tmp.write_text(json.dumps(plan.meta))
    os.replace(tmp, pj)
    return plan
