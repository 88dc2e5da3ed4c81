"""ImageNet-21K as released: per-class tars (and folders, and a mix) -> shards; the compact plan,
corruption caught by the draft-decode check, multi-node sharding, manifests and sha1 resume."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from data_fixtures import read_tars
from PIL import Image

from larvess.data.imagenet_plan import Plan, assemble, find_sources
from larvess.data.imagenet_shards import (
    UnreadableImage,
    merge_shards,
    prepare_jpeg,
    shard_name,
    write_shards,
)
from larvess.data.imagenet_wds import ImageNetShards

REPO = Path(__file__).resolve().parents[1]
WNIDS = ["n01440764", "n01443537", "n01484850", "n01491361"]


def _jpeg(rng: np.random.Generator, size: int = 32, progressive: bool = False) -> bytes:
    small = rng.integers(0, 256, (size // 8 + 1, size // 8 + 1, 3), dtype=np.uint8)
    im = Image.fromarray(small).resize((size, size), Image.BILINEAR)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=90, progressive=progressive)
    return buf.getvalue()


def _corrupt_middle(data: bytes, rng: np.random.Generator) -> bytes:
    """Overwrite 64 bytes in the middle of the entropy-coded data with random bytes that
    include 0xFF marker prefixes (as a damaged disk block or a bad download would)."""
    mid = len(data) // 2 + 100
    junk = bytearray(rng.integers(0, 256, 64, dtype=np.uint8).tobytes())
    junk[10], junk[11], junk[40], junk[41] = 0xFF, 0x12, 0xFF, 0x9A
    return data[:mid] + bytes(junk) + data[mid + 64 :]


def _write_tar(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tf:
        for name, data in members.items():
            ti = tarfile.TarInfo(name)
            ti.size, ti.mtime = len(data), 1318000000
            tf.addfile(ti, io.BytesIO(data))


def _make_release(root: Path, seed: int = 0, n: int = 6, folders: tuple[str, ...] = ()) -> dict:
    """root/<wnid>.tar per class, members <wnid>_<i>.JPEG (as in fall11 / winter21); classes in
    `folders` are written as root/<wnid>/ instead. Returns {wnid: {name: bytes}}."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    data = {}
    for w in WNIDS:
        members = {
            f"{w}_{100 + i}.JPEG": _jpeg(rng, 64 if i == 0 else 32, i == 1) for i in range(n)
        }
        data[w] = members
        if w in folders:
            (root / w).mkdir()
            for name, b in members.items():
                (root / w / name).write_bytes(b)
        else:
            _write_tar(root / f"{w}.tar", members)
    return data


def test_draft_decode_catches_mid_file_damage() -> None:
    rng = np.random.default_rng(5)
    for progressive in (False, True):
        good = _jpeg(rng, 96, progressive)
        assert prepare_jpeg(good) == (good, False)
        with pytest.raises(UnreadableImage, match="truncated"):
            prepare_jpeg(good[: len(good) // 2])  # cut in the middle of the scan data
        with pytest.raises(UnreadableImage):
            prepare_jpeg(_corrupt_middle(good, rng))


def test_release_tars_round_trip_and_skipped(tmp_path: Path) -> None:
    root = tmp_path / "fall11"
    data = _make_release(root, folders=(WNIDS[3],))  # a mix: three tars and one folder
    rng = np.random.default_rng(9)
    w = WNIDS[1]
    bad = {
        f"{w}_trunc.JPEG": _jpeg(rng, 64)[:500],
        f"{w}_junk.JPEG": _corrupt_middle(_jpeg(rng, 64), rng),
        f"{w}_text.JPEG": b"<html>404 not found</html>\n",
    }
    extra = {**data[w], **bad, "._n01443537_100.JPEG": b"AppleDouble"}
    _write_tar(root / f"{w}.tar", extra)
    info = write_shards(root, tmp_path / "out", shard_size=5, workers=2, progress=False)
    samples = read_tars(tmp_path / "out")
    want = {
        f"{x}.tar/{n}" if x != WNIDS[3] else f"{x}/{n}": b
        for x in WNIDS
        for n, b in data[x].items()
    }
    got = {json.loads(s["json"])["path"]: s for s in samples.values()}
    assert set(got) == set(want)  # every valid image exactly once, read in place from the tars
    for path, s in got.items():
        assert s["jpg"] == want[path] and not json.loads(s["json"])["reencoded"]
        assert int(s["cls"]) == WNIDS.index(path[:9])
    assert {k.split("_")[0] for k in samples} == set(WNIDS)
    lines = (tmp_path / "out" / "skipped.txt").read_text().splitlines()
    skipped = dict(ln.split("\t") for ln in lines)
    assert set(skipped) == {f"{w}.tar/{n}" for n in bad} | {f"{w}.tar/._n01443537_100.JPEG"}
    assert "truncated" in skipped[f"{w}.tar/{w}_trunc.JPEG"].lower()
    assert info["num_skipped"] == 4 and info["num_samples"] == 24
    assert info["planned_class_counts"] == [6, 9, 6, 6]
    ds = ImageNetShards(tmp_path / "out")  # real wnids: names from timm's lemma table
    assert ds.wnids == WNIDS and ds.class_names[0][0] == "tench"
    manifests = sorted((tmp_path / "out" / "manifests").glob("*.json"))
    assert [m.stem for m in manifests] == [f"imagenet-{i:06d}" for i in range(6)]
    for m, sh in zip(manifests, info["shards"]):
        rec = json.loads(m.read_text())
        tar = tmp_path / "out" / rec["filename"]
        assert rec["size"] == tar.stat().st_size == sh["size"] and rec["sha1"] == sh["sha1"]


def test_tar_and_folder_give_the_same_samples(tmp_path: Path) -> None:
    _make_release(tmp_path / "tars", seed=3)
    _make_release(tmp_path / "dirs", seed=3, folders=tuple(WNIDS))
    a = write_shards(tmp_path / "tars", tmp_path / "a", shard_size=7, seed=4, progress=False)
    b = write_shards(tmp_path / "dirs", tmp_path / "b", shard_size=7, seed=4, progress=False)
    sa, sb = read_tars(tmp_path / "a"), read_tars(tmp_path / "b")
    assert list(sa) == list(sb)  # same keys in the same shards and order: the plan sorts names
    assert all(sa[k]["jpg"] == sb[k]["jpg"] and sa[k]["cls"] == sb[k]["cls"] for k in sa)
    assert a["shard_lengths"] == b["shard_lengths"]


def test_class_both_folder_and_tar(tmp_path: Path) -> None:
    root = tmp_path / "in"
    data = _make_release(root)
    (root / WNIDS[2]).mkdir()
    (root / WNIDS[2] / "only_in_folder.JPEG").write_bytes(data[WNIDS[2]][f"{WNIDS[2]}_100.JPEG"])
    with pytest.raises(ValueError, match=rf"{WNIDS[2]}/ and .*{WNIDS[2]}\.tar.*--prefer"):
        write_shards(root, tmp_path / "x", progress=False)
    assert find_sources(root, "folder")[WNIDS[2]] == WNIDS[2]
    info = write_shards(root, tmp_path / "one", synsets=WNIDS[:2], progress=False)
    assert info["num_samples"] == 12  # the conflict is in a class not asked for
    info = write_shards(root, tmp_path / "t", prefer="tar", progress=False)
    assert info["num_samples"] == 24 and info["args"]["prefer"] == "tar"
    info = write_shards(root, tmp_path / "f", prefer="folder", progress=False)
    assert info["num_samples"] == 19 and info["planned_class_counts"][2] == 1


def test_damaged_and_changed_tars(tmp_path: Path) -> None:
    root = tmp_path / "in"
    _make_release(root)
    t = root / f"{WNIDS[0]}.tar"
    raw = t.read_bytes()
    with tarfile.open(t) as tf:
        m3 = tf.getmembers()[3]
    t.write_bytes(raw[: m3.offset_data + 100])  # download cut inside the 4th member
    t2 = root / f"{WNIDS[2]}.tar"
    raw2 = bytearray(t2.read_bytes())
    with tarfile.open(t2) as tf:
        m2 = tf.getmembers()[2]
    raw2[m2.offset : m2.offset + 512] = b"\x17" * 512  # a damaged header: tarfile stops quietly
    t2.write_bytes(bytes(raw2))
    info = write_shards(root, tmp_path / "out", shard_size=4, progress=False)
    skipped = (tmp_path / "out" / "skipped.txt").read_text()
    assert f"{WNIDS[0]}.tar/{WNIDS[0]}_103.JPEG\ttar cut short" in skipped
    assert f"{WNIDS[0]}.tar\tunreadable tar after 4 members" in skipped
    assert f"{WNIDS[2]}.tar\tdamaged tar header at byte {m2.offset}" in skipped
    assert info["planned_class_counts"] == [3, 6, 2, 6] and info["num_samples"] == 17
    (tmp_path / "out" / shard_name("imagenet", 1)).unlink()
    with open(root / f"{WNIDS[1]}.tar", "ab") as f:  # the data changed after planning
        f.write(b"\0" * 512)
    with pytest.raises(RuntimeError, match=rf"{WNIDS[1]}\.tar.*changed"):
        write_shards(root, tmp_path / "out", shard_size=4, progress=False)
    _write_tar(root / f"{WNIDS[1]}.tar", {"n01443537_1.JPEG": _jpeg(np.random.default_rng(1))})
    (tmp_path / "out" / "plan.json").unlink()  # list again: old manifests no longer count
    info = write_shards(root, tmp_path / "out", shard_size=4, progress=False)
    fresh = write_shards(root, tmp_path / "fresh", shard_size=4, progress=False)
    assert info == fresh and info["num_samples"] == 12
    assert sorted(p.name for p in (tmp_path / "out").glob("*.tar")) == info["filenames"]
    for n in info["filenames"]:
        assert (tmp_path / "out" / n).read_bytes() == (tmp_path / "fresh" / n).read_bytes()


def test_two_nodes_and_merge_match_one_machine(tmp_path: Path) -> None:
    root = tmp_path / "in"
    _make_release(root, n=9, folders=(WNIDS[0],))
    kw = dict(shard_size=4, seed=2, progress=False)
    one = write_shards(root, tmp_path / "one", **kw)
    two = tmp_path / "two"
    cmd = [sys.executable, str(REPO / "scripts" / "shard_imagenet21k.py"), "--out", str(two)]
    r = subprocess.run(
        [*cmd, "--root", str(root), "--shard-size", "4", "--seed", "2", "--quiet"]
        + ["--num-nodes", "2", "--node-rank", "1"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0 and "rank 1 of 2" in r.stdout, r.stderr
    assert not (two / "info.json").exists()
    assert sorted(p.name for p in two.glob("*.tar")) == [
        shard_name("imagenet", i) for i in (1, 3, 5, 7)
    ]
    with pytest.raises(RuntimeError, match="5 of 9 shards missing.*imagenet-000000"):
        merge_shards(two)
    info = write_shards(root, two, num_nodes=2, node_rank=0, **kw)  # last rank merges
    assert info == one
    names = sorted(p.name for p in (tmp_path / "one").glob("*.tar"))
    assert names == sorted(p.name for p in two.glob("*.tar")) and len(names) == 9
    for n in [*names, "info.json", "skipped.txt"]:
        assert (two / n).read_bytes() == (tmp_path / "one" / n).read_bytes(), n
    (two / "info.json").unlink()
    r = subprocess.run([*cmd, "--merge", "--check-sha1"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (two / "info.json").read_bytes() == (tmp_path / "one" / "info.json").read_bytes()
    with pytest.raises(ValueError, match="node rank 2"):
        write_shards(root, two, num_nodes=2, node_rank=2, **kw)


def test_resume_checks_size_and_sha1(tmp_path: Path) -> None:
    root = tmp_path / "in"
    _make_release(root)
    ref = tmp_path / "ref"
    write_shards(root, ref, shard_size=5, progress=False)
    out = tmp_path / "out"
    write_shards(root, out, shard_size=5, progress=False)
    t = out / shard_name("imagenet", 2)
    raw = bytearray(t.read_bytes())
    raw[700] ^= 0xFF  # same size, other bytes
    t.write_bytes(bytes(raw))
    (out / shard_name("imagenet", 3)).write_bytes(b"x")  # wrong size
    (out / "manifests" / "imagenet-000004.json").unlink()  # killed before its manifest
    write_shards(root, out, shard_size=5, progress=False)  # size check: keeps shard 2
    assert t.read_bytes() != (ref / t.name).read_bytes()
    for i in (3, 4):
        n = shard_name("imagenet", i)
        assert (out / n).read_bytes() == (ref / n).read_bytes()
    with pytest.raises(RuntimeError, match="imagenet-000002"):
        merge_shards(out, check_sha1=True)
    write_shards(root, out, shard_size=5, check_sha1=True, progress=False)
    assert t.read_bytes() == (ref / t.name).read_bytes()
    assert (out / "info.json").read_bytes() == (ref / "info.json").read_bytes()


def _synthetic_listings(n_classes: int, per_class: int):
    """What list_class returns for release tars of n_classes x per_class members."""
    for c in range(n_classes):
        names = [f"n{c + 1440764:08d}_{i + 10000}.JPEG".encode() for i in range(per_class)]
        offs = 512 + np.arange(per_class, dtype=np.int64) * 111_104
        yield (
            c,
            b"".join(names),
            np.array([len(x) for x in names], np.int32),
            offs,
            np.full(per_class, 110_000, np.int64),
            np.zeros(per_class, np.uint16),
            [],
            int(offs[-1]) + 111_104,
        )


def test_plan_bytes_per_image() -> None:
    n_classes, per_class = 200, 1000
    tracemalloc.start()
    arrays, _ = assemble(_synthetic_listings(n_classes, per_class), n_classes, seed=0)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    n = n_classes * per_class
    plan = Plan({"args": {"shard_size": 1000}}, arrays)
    assert plan.num_items == n and plan.nbytes / n < 60  # ~54 bytes: 20 of name + 34 of arrays
    assert peak / n < 100  # building it, listing pieces included
    assert sorted(plan.order[:1000].tolist()) != list(range(1000))  # shuffled
    idx, cls = plan.shard(3)
    assert len(idx) == 1000 and (cls == idx // per_class).all()
    j = int(idx[0])
    assert plan.name(j) == f"n{cls[0] + 1440764:08d}_{j % per_class + 10000}.JPEG"
    assert plan.data_off[j] == 512 + (j % per_class) * 111_104
