"""The on-disk format of a shard folder, shared by the writer (imagenet_shards.py) and the reader
(imagenet_wds.py): sample member names, the files at the top, the writer's state folder.

Top of the folder: the shards `<name>-NNNNNN.tar` and `info.json` only, so that tools scanning the
folder see the tars: timm's wds reader (`info.json`), HF datasets (`load_dataset(OUT)` infers the
webdataset builder from the extensions it finds), wids (`info.json` is also a
`wids-shard-index-v1` index: `__kind__`, `wids_version`, `shardlist` of `url` / `nsamples` /
`filesize` / `md5sum`, urls relative to the folder). The writer's own files (plan, manifests,
skipped.txt) live in the hidden `STATE_DIR` below it: HF's data-file scan skips hidden
folders, glob("*.tar") does not see it.

A folder written before STATE_DIR existed (plan.json, plan.npz, manifests/, skipped.txt at the
top) is moved into the new layout by `migrate_old_layout` on the next write or merge.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

# sample members: <key>.cls, <key>.jpg, <key>.json (written in this order)
CLS, JPG, JSON = "cls", "jpg", "json"
MEMBERS = (CLS, JPG, JSON)

INFO_FILE = "info.json"
STATE_DIR = ".larvess"  # hidden: HF datasets' folder scan and glob("*") skip it
PLAN_JSON, PLAN_NPZ = "plan.json", "plan.npz"
MANIFESTS = "manifests"
SKIPPED_FILE = "skipped.txt"
WIDS_KIND = "wids-shard-index-v1"
_OLD_TOP = (PLAN_JSON, PLAN_NPZ, MANIFESTS, SKIPPED_FILE)  # where the writer used to put them


def state_dir(out: str | Path) -> Path:
    """OUT/.larvess: plan, manifests and skipped.txt of the writer."""
    return Path(out) / STATE_DIR


def manifest_path(out: str | Path, shard_file: str) -> Path:
    """OUT/.larvess/manifests/<shard stem>.json."""
    return state_dir(out) / MANIFESTS / f"{Path(shard_file).stem}.json"


def migrate_old_layout(out: str | Path) -> list[str]:
    """Move plan.json, plan.npz, manifests/ and skipped.txt from OUT's top into OUT/.larvess/.

    Returns the names moved (none for a new or already migrated folder). Safe when several
    ranks of a multi-node run do it at once: a name another rank moved first is skipped. An
    entry present in both places is an error naming both (the folder mixes two runs).
    """
    out = Path(out)
    old = [n for n in _OLD_TOP if (out / n).exists()]
    if not old:
        return []
    st = state_dir(out)
    both = [n for n in old if (st / n).exists()]
    if both:
        raise RuntimeError(
            f"{out}: {', '.join(both)} both at the top and in {st}: the folder mixes an old and "
            f"a new sharding run; remove the copies at the top (the writer uses {st})"
        )
    st.mkdir(parents=True, exist_ok=True)
    moved = []
    for n in old:
        try:
            os.replace(out / n, st / n)
            moved.append(n)
        except FileNotFoundError:  # another rank moved it first
            pass
    if moved:
        log.warning("%s: moved %s into %s (the current layout)", out, ", ".join(moved), st)
    return moved
