"""The manifests of a shard folder: which shards are complete, and info.json from them.

A shard is complete when its manifest (OUT/.larvess/manifests/<shard>.json, written by
imagenet_shards.write_shard after the shard is renamed into place) names the current plan and
the shard's size (and sha1, when asked) matches it. `merge_shards` writes OUT/info.json (timm's
wds format, a wids shard index, the synset list and the writer's statistics) and
OUT/.larvess/skipped.txt once every shard is complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tqdm import tqdm

from larvess.data.shard_format import (
    INFO_FILE,
    PLAN_JSON,
    SKIPPED_FILE,
    WIDS_KIND,
    manifest_path,
    migrate_old_layout,
    state_dir,
)


def shard_name(name: str, i: int) -> str:
    return f"{name}-{i:06d}.tar"


def temp_name(path: Path) -> Path:
    """Hidden, per host and process: where path is written before it is renamed into place."""
    return path.with_name(f".{path.name}.tmp-{socket.gethostname()}-{os.getpid()}")


def atomic_write(path: Path, text: str) -> None:
    """Write to a temp name beside path, then rename: readers never see a partial file."""
    tmp = temp_name(path)
    tmp.write_text(text)
    os.replace(tmp, path)


def _clean(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


def _sha1_file(path: Path) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        while b := f.read(1 << 22):
            h.update(b)
    return h.hexdigest()


def check_shard(out: Path, meta: dict, i: int, check_sha1: bool = False) -> dict | None:
    """The manifest of shard i if the shard is complete (plan, size, optionally sha1), else None."""
    fn = shard_name(meta["args"]["name"], i)
    mp_, tp = manifest_path(out, fn), out / fn
    try:
        rec = json.loads(mp_.read_text())
        if rec.get("plan") != meta["plan_id"] or tp.stat().st_size != rec["size"]:
            return None
        if check_sha1 and _sha1_file(tp) != rec["sha1"]:
            return None
        return rec
    except (OSError, ValueError, KeyError):
        return None


def check_shards(
    out: Path, meta: dict, shards: list[int], check_sha1: bool, workers: int, progress: bool
) -> dict[int, dict]:
    """{i: manifest} of the complete shards among `shards`, checked by a thread pool."""
    what = "sha1" if check_sha1 else "size"
    with ThreadPoolExecutor(max(1, min(32, workers * 4))) as ex:
        recs = list(
            tqdm(
                ex.map(lambda i: check_shard(out, meta, i, check_sha1), shards),
                total=len(shards),
                desc=f"checking shards ({what})",
                unit="shard",
                disable=not progress or not shards,
            )
        )
    return {i: r for i, r in zip(shards, recs) if r is not None}


def merge_shards(
    out: str | Path,
    check_sha1: bool = False,
    require_all: bool = True,
    meta: dict | None = None,
    workers: int = 4,
    progress: bool = False,
) -> dict | None:
    """Write OUT/.larvess/skipped.txt and OUT/info.json from the plan and every shard's manifest.

    A shard without a valid manifest (or whose size, or sha1 with check_sha1, does not match
    it) is an error naming the missing shards when require_all, else returns None.
    """
    out = Path(out)
    if meta is None:
        migrate_old_layout(out)
        pj = state_dir(out) / PLAN_JSON
        if not pj.exists():
            raise FileNotFoundError(f"{pj} missing: no sharding run has started in {out}")
        meta = json.loads(pj.read_text())
    n = meta["num_shards"]
    recs = check_shards(out, meta, list(range(n)), check_sha1, workers, progress)
    if len(recs) < n:
        if not require_all:
            return None
        miss = [shard_name(meta["args"]["name"], i) for i in range(n) if i not in recs]
        raise RuntimeError(
            f"{out}: {len(miss)} of {n} shards missing or incomplete (e.g. {miss[:5]}); "
            "run the remaining ranks (or re-run) before merging"
        )
    recs_l = [recs[i] for i in range(n)]
    skipped = [*meta["listing_skipped"], *(s for r in recs_l for s in r["skipped"])]
    text = "".join(f"{_clean(p)}\t{_clean(w)}\n" for p, w in skipped)
    atomic_write(state_dir(out) / SKIPPED_FILE, text)
    files, counts = [r["filename"] for r in recs_l], [r["num_samples"] for r in recs_l]
    total = sum(counts)
    info = {
        "name": meta["args"]["name"],
        "num_samples": total,
        "filenames": files,
        "shard_lengths": counts,
        "shards": [
            {
                "filename": r["filename"],
                "num_samples": r["num_samples"],
                "size": r["size"],
                "sha1": r["sha1"],
            }
            for r in recs_l
        ],  # fmt: skip
        "splits": {
            "train": {
                "name": "train",
                "num_samples": total,
                "filenames": files,
                "shard_lengths": counts,
            }
        },  # timm's ReaderWds reads this
        "num_classes": len(meta["synsets"]),
        "synsets": meta["synsets"],
        "planned_class_counts": meta["class_counts"],
        "num_skipped": len(skipped),
        "num_reencoded": sum(r["num_reencoded"] for r in recs_l),
        "missing_synsets": meta["missing_synsets"],
        "args": meta["args"],
        # wids reads this file as its shard index (wids.ShardListDataset("OUT/info.json")):
        # urls relative to the folder; md5sum only where the manifest has one (older writers)
        "__kind__": WIDS_KIND,
        "wids_version": 1,
        "shardlist": [
            {"url": r["filename"], "nsamples": r["num_samples"], "filesize": r["size"]}
            | ({"md5sum": r["md5"]} if "md5" in r else {})
            for r in recs_l
        ],
    }
    atomic_write(out / INFO_FILE, json.dumps(info, indent=1))
    return info
