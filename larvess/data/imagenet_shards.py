"""ImageNet(-21K) download -> WebDataset shards: the resumable, multi-node writer.

Input: `root` holds per-class tars `nXXXXXXXX.tar` (the fall11 / winter21 release), per-class
folders `nXXXXXXXX/`, or a mix (imagenet_plan.py: listing and the plan). Tar members are read in
place with one pread each (offsets from the plan); nothing is extracted.

Output folder (shard_format.py): at its top only the shards `<name>-000000.tar, ...` and
`info.json`; the writer's own files in `OUT/.larvess/`. A sample has `__key__` (no dots), `jpg`
(the original bytes when the file is a valid RGB JPEG, else the image converted to RGB and saved
as JPEG quality 95; jpeg_check.py), `cls` (ascii int: index into the synset list) and `json`
({"wnid", "path", "reencoded"}; path = `<wnid>/<file>` or `<wnid>.tar/<member>`). `info.json`
follows timm's wds reader format (`splits.train.{filenames, shard_lengths, num_samples}`), is a
wids shard index (`wids-shard-index-v1`: `shardlist` of url / nsamples / filesize / md5sum) and
adds the synset list, per-shard sizes and sha1s, and writer statistics.

Writing is resumable and can be split over machines:
- the plan (sample order, shard assignment) is a deterministic function of the arguments and the
  listed names; it is saved first (.larvess/plan.json + plan.npz) and reused by every later run;
- each shard goes to a temp name, is renamed when complete, then its manifest
  `.larvess/manifests/<shard>.json` (sample count, size, sha1, md5, skipped files) is written;
- a re-run keeps every shard whose manifest matches the plan and whose size matches the manifest
  (and sha1, with check_sha1), checked in parallel, and rewrites the others;
- `num_nodes=N, node_rank=I` writes the shards i with i % N == I; whichever rank finds every
  manifest present when it finishes writes `.larvess/skipped.txt` and `info.json` (or
  `merge_shards`). Shards and info.json are byte-identical to a single-machine run with the same
  arguments.
A folder written by an older version (plan and manifests at the top) is moved into this layout
on the next run (shard_format.migrate_old_layout); its shards are kept.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing as mp
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from larvess.data.imagenet_manifests import (
    atomic_write,
    check_shards,
    merge_shards,
    shard_name,
    temp_name,
)
from larvess.data.imagenet_plan import (
    Plan,
    find_sources,
    key_for,
    load_or_make_plan,
    plan_args,
    read_synsets,
)
from larvess.data.jpeg_check import UnreadableImage, prepare_jpeg
from larvess.data.shard_format import (
    CLS,
    JPG,
    JSON,
    MANIFESTS,
    manifest_path,
    migrate_old_layout,
    state_dir,
)
from larvess.names import WNID

log = logging.getLogger(__name__)
__all__ = [
    "UnreadableImage",
    "check_shards",
    "merge_shards",
    "prepare_jpeg",
    "read_synsets",
    "shard_name",
    "write_shards",
]


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


class _Reader:
    """Reads plan items: folder files by path, tar members by pread (LRU of open tars)."""

    def __init__(self, root: Path, plan: Plan, max_open: int = 64) -> None:
        self.root, self.plan, self.max_open = root, plan, max_open
        self.fds: OrderedDict[int, int] = OrderedDict()

    def _fd(self, c: int) -> int:
        if c in self.fds:
            self.fds.move_to_end(c)
            return self.fds[c]
        path = self.root / self.plan.meta["sources"][c]
        want = self.plan.meta["source_sizes"][c]
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as e:
            raise RuntimeError(f"{path}: class tar listed in the plan cannot be opened: {e}") from e
        if (got := os.fstat(fd).st_size) != want:
            os.close(fd)
            raise RuntimeError(
                f"{path}: {got} bytes, but {want} when the plan was made: the data changed; "
                "use a new --out, or delete OUT/.larvess/plan.json to list it again (every shard is then "
                "rewritten)"
            )
        if len(self.fds) >= self.max_open:
            os.close(self.fds.popitem(last=False)[1])
        self.fds[c] = fd
        return fd

    def read(self, c: int, j: int) -> bytes:
        p = self.plan
        off = int(p.data_off[j])
        if off < 0:
            return (self.root / p.meta["sources"][c] / p.name(j)).read_bytes()
        size = int(p.size[j])
        data = os.pread(self._fd(c), size, off)
        if len(data) != size:
            raise UnreadableImage(f"tar member cut short: {len(data)} of {size} bytes")
        return data

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


@dataclass(frozen=True)
class WriterState:
    """What write_shard needs: the plan, the output folder, the data root and (in a pool) the
    shared progress counter (a multiprocessing Value, or None)."""

    plan: Plan
    out: Path
    root: Path
    counter: object | None = None


# A pool worker's WriterState: set once per worker by the pool initializer from its initargs
# (fork: inherited, so the plan's arrays are not pickled per task). Only _write_in_worker reads it.
_WORKER_STATE: WriterState | None = None


def _init_worker(state: WriterState) -> None:
    global _WORKER_STATE
    _WORKER_STATE = state


def _write_in_worker(i: int) -> dict:
    assert _WORKER_STATE is not None, "pool worker started without _init_worker"
    return write_shard(_WORKER_STATE, i)


def write_shard(state: WriterState, i: int) -> dict:
    """Write shard i to a temp name, rename it when complete, then write its manifest."""
    plan, out, root, counter = state.plan, state.out, state.root, state.counter
    args = plan.meta["args"]
    synsets, sources = plan.meta["synsets"], plan.meta["sources"]
    final = out / shard_name(args["name"], i)
    tmp = temp_name(final)
    skipped, n, n_re, size = [], 0, 0, 0
    sha, md5 = hashlib.sha1(), hashlib.md5()  # md5: wids' index field
    reader = _Reader(root, plan)
    idx, cls = plan.shard(i)
    try:
        with open(tmp, "wb") as f:
            for k, (j, c) in enumerate(zip(idx.tolist(), cls.tolist())):
                name = plan.name(j)
                rel = f"{sources[c]}/{name}"
                try:
                    data, re_ = prepare_jpeg(reader.read(c, j), args["reencode"], args["verify"])
                except (OSError, UnreadableImage) as e:
                    skipped.append((rel, str(e)))
                else:
                    key = _key(synsets[c], name, int(plan.dup[j]))
                    meta = json.dumps({"wnid": synsets[c], "path": rel, "reencoded": re_})
                    for ext, b in ((CLS, b"%d" % c), (JPG, data), (JSON, meta.encode())):
                        m = _tar_member(f"{key}.{ext}", b)
                        f.write(m)
                        sha.update(m)
                        md5.update(m)
                        size += len(m)
                    n, n_re = n + 1, n_re + re_
                if counter is not None and (k % 32 == 31 or k == len(idx) - 1):
                    with counter.get_lock():
                        counter.value += k % 32 + 1
            f.write(b"\0" * 1024)  # end-of-archive marker
            sha.update(b"\0" * 1024)
            md5.update(b"\0" * 1024)
            size += 1024
    finally:
        reader.close()
    os.replace(tmp, final)
    rec = {
        "filename": final.name,
        "num_samples": n,
        "num_reencoded": n_re,
        "size": size,
        "sha1": sha.hexdigest(),
        "md5": md5.hexdigest(),
        "plan": plan.meta["plan_id"],
        "skipped": skipped,
    }
    atomic_write(manifest_path(out, final.name), json.dumps(rec))
    return rec


def _key(wnid: str, name: str, dup: int) -> str:
    k = key_for(wnid, name)
    return f"{k}-{dup}" if dup else k


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
    prefer: str | None = None,
    num_nodes: int = 1,
    node_rank: int = 0,
    check_sha1: bool = False,
) -> dict | None:
    """root (class tars and/or folders) -> out/<name>-NNNNNN.tar + info.json; returns info.

    synsets: class list (cls = index); None = every wnid found under root, sorted. Listed
    synsets without a folder or tar are allowed (recorded in info.json as missing_synsets).
    With num_nodes > 1 this writes rank node_rank's shards; returns None while other ranks'
    shards are still missing (the last rank to finish writes info.json).
    """
    root, out = Path(root), Path(out)
    if not root.is_dir():
        raise FileNotFoundError(f"ImageNet root {root} is not a folder")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if num_nodes < 1 or not 0 <= node_rank < num_nodes:
        raise ValueError(f"node rank {node_rank} not in [0, num_nodes={num_nodes})")
    if synsets is None:
        synsets = sorted(find_sources(root, prefer))
        if not synsets:
            raise ValueError(f"no class folders or tars (nXXXXXXXX, nXXXXXXXX.tar) under {root}")
    bad = [w for w in synsets if not WNID.match(w)]
    if bad:
        raise ValueError(f"not WordNet ids (nXXXXXXXX): {bad[:5]}")
    args = plan_args(synsets, shard_size, seed, max_per_class, name, reencode, verify, prefer)
    migrate_old_layout(out)
    plan = load_or_make_plan(out, root, synsets, args, workers, progress)
    meta = plan.meta
    if meta["root"] != str(root.resolve()):
        log.warning("the plan was listed from %s; reading %s", meta["root"], root)
    mdir = state_dir(out) / MANIFESTS
    mdir.mkdir(parents=True, exist_ok=True)
    mine = list(range(node_rank, meta["num_shards"], num_nodes))
    for p in out.glob(f".{name}-*.tar.tmp-*"):  # left by a killed run of this rank
        i = int(p.name[len(name) + 2 :].split(".")[0])
        if i % num_nodes == node_rank:
            p.unlink(missing_ok=True)
    for p in [*out.glob(f"{name}-*.tar"), *mdir.glob(f"{name}-*.json")]:
        i = p.name[len(name) + 1 :].split(".")[0]
        if i.isdigit() and int(i) >= meta["num_shards"]:  # from a plan listed before this one
            log.warning("removing %s: not part of the current plan", p)
            p.unlink(missing_ok=True)
    done = check_shards(out, meta, mine, check_sha1, workers, progress)
    todo = [i for i in mine if i not in done]
    for i in todo:  # a stale manifest must not let another rank merge a damaged shard
        manifest_path(out, shard_name(name, i)).unlink(missing_ok=True)
    n_todo = sum(len(plan.shard(i)[0]) for i in todo)
    bar = tqdm(total=n_todo, desc="sharding", unit="img", disable=not progress)
    if workers == 1 or len(todo) <= 1:
        state = WriterState(plan, out, root)
        for i in todo:
            write_shard(state, i)
            bar.update(len(plan.shard(i)[0]))
    else:
        counter = mp.get_context("fork").Value("q", 0)
        state = WriterState(plan, out, root, counter)
        with mp.get_context("fork").Pool(workers, _init_worker, (state,)) as pool:
            it = pool.imap_unordered(_write_in_worker, todo)
            for _ in todo:
                while True:
                    try:
                        it.next(timeout=0.5)
                        break
                    except mp.TimeoutError:
                        bar.update(counter.value - bar.n)
            bar.update(counter.value - bar.n)
    bar.close()
    return merge_shards(out, check_sha1=False, require_all=False, meta=meta, workers=workers)
