"""The shard writer (imagenet_plan, imagenet_shards, imagenet_manifests, jpeg_check): the release's
per-class tars, class folders and a mix -> shards; the compact plan; odd and damaged inputs;
kill + resume; multi-node sharding, manifests and sha1 resume; the folder layout clients read
(timm, wids, HF datasets' folder scan) and the move from the old layout."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from data_fixtures import image_bytes, make_class_folders, read_tars
from PIL import Image

from larvess.data.imagenet_plan import Plan, assemble, find_sources
from larvess.data.imagenet_shards import (
    UnreadableImage,
    merge_shards,
    prepare_jpeg,
    read_synsets,
    shard_name,
    write_shards,
)
from larvess.data.imagenet_wds import ImageNetShards

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "shard_imagenet21k.py"
WNIDS = ["n01440764", "n01443537", "n01484850", "n01491361"]  # real ones: timm has their lemmas
FAKE_WNIDS = ["n00000001", "n00000002", "n00000003"]
ST = ".larvess"  # the writer's state folder (shard_format.STATE_DIR), spelled out


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
    lines = (tmp_path / "out" / ST / "skipped.txt").read_text().splitlines()
    skipped = dict(ln.split("\t") for ln in lines)
    assert set(skipped) == {f"{w}.tar/{n}" for n in bad} | {f"{w}.tar/._n01443537_100.JPEG"}
    assert "truncated" in skipped[f"{w}.tar/{w}_trunc.JPEG"].lower()
    assert info["num_skipped"] == 4 and info["num_samples"] == 24
    assert info["planned_class_counts"] == [6, 9, 6, 6]
    ds = ImageNetShards(tmp_path / "out")  # real wnids: names from timm's lemma table
    assert ds.wnids == WNIDS and ds.class_names[0][0] == "tench"
    manifests = sorted((tmp_path / "out" / ST / "manifests").glob("*.json"))
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
    skipped = (tmp_path / "out" / ST / "skipped.txt").read_text()
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
    (tmp_path / "out" / ST / "plan.json").unlink()  # list again: old manifests no longer count
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
    cmd = [sys.executable, str(SCRIPT), "--out", str(two), "--name", "imagenet"]
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
    for n in [*names, "info.json", f"{ST}/skipped.txt"]:
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
    (out / ST / "manifests" / "imagenet-000004.json").unlink()  # killed before its manifest
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


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, bytes], set[str]]:
    return make_class_folders(tmp_path_factory.mktemp("tree") / "in", FAKE_WNIDS)


def test_round_trip_and_odd_inputs(tree, tmp_path: Path) -> None:
    root, files, bad = tree
    info = write_shards(root, tmp_path, shard_size=4, seed=1, progress=False)
    samples = read_tars(tmp_path)
    by_path = {json.loads(s["json"])["path"]: s for s in samples.values()}
    assert set(by_path) == set(files) - bad  # every readable input exactly once
    for key, s in samples.items():
        meta = json.loads(s["json"])
        assert "." not in key and meta["wnid"] == meta["path"].split("/")[0]
        assert int(s["cls"].decode("ascii")) == FAKE_WNIDS.index(meta["wnid"])
        im = Image.open(io.BytesIO(s["jpg"]))
        assert im.format == "JPEG" and im.mode == "RGB"
        odd = any(t in meta["path"] for t in ("cmyk", "grey", "png"))
        assert meta["reencoded"] == odd
        if not odd:
            assert s["jpg"] == files[meta["path"]]  # valid JPEGs keep their bytes
    orig = Image.open(io.BytesIO(files[f"{FAKE_WNIDS[1]}/{FAKE_WNIDS[1]}_grey.JPEG"])).convert(
        "RGB"
    )
    grey = Image.open(io.BytesIO(by_path[f"{FAKE_WNIDS[1]}/{FAKE_WNIDS[1]}_grey.JPEG"]["jpg"]))
    diff = np.abs(np.asarray(grey, float) - np.asarray(orig, float)).mean()
    assert diff < 8  # re-encoded at quality 95
    skipped = dict(
        ln.split("\t") for ln in (tmp_path / ST / "skipped.txt").read_text().splitlines()
    )
    assert set(skipped) == bad
    assert info["num_skipped"] == 2 and info["num_reencoded"] == 3
    assert info["synsets"] == FAKE_WNIDS and info["num_samples"] == len(samples) == 18
    assert info["filenames"] == [f"imagenet-{i:06d}.tar" for i in range(5)]
    counts = {n: sum(s["shard"] == n for s in samples.values()) for n in info["filenames"]}
    assert info["shard_lengths"] == [counts[n] for n in info["filenames"]]
    assert info["splits"]["train"]["shard_lengths"] == info["shard_lengths"]


def test_header_verification(tree) -> None:
    root, files, bad = tree
    for rel, data in files.items():
        if rel in bad:
            for verify in ("decode", "header"):  # no end marker: header mode decodes too
                with pytest.raises(UnreadableImage):
                    prepare_jpeg(data, verify=verify)
        elif "_cmyk" not in rel and "_grey" not in rel and "_png" not in rel:
            assert prepare_jpeg(data, verify="header") == (data, False)
    with pytest.raises(ValueError, match="verify"):
        prepare_jpeg(b"", verify="full")


def test_max_per_class_and_synset_list(tree, tmp_path: Path) -> None:
    root, _, _ = tree
    lst = tmp_path / "synsets.txt"
    lst.write_text("n00000003\nn00000009\nn00000001\n")
    a = write_shards(root, tmp_path / "a", read_synsets(lst), max_per_class=2, progress=False)
    b = write_shards(root, tmp_path / "b", read_synsets(lst), max_per_class=2, progress=False)
    c = write_shards(root, tmp_path / "c", read_synsets(lst), 1000, 1, 7, 2, progress=False)
    sa, sb, sc = (read_tars(tmp_path / d) for d in "abc")
    assert sa == sb and a == b and a["missing_synsets"] == ["n00000009"]
    wn = [json.loads(s["json"])["wnid"] for s in sa.values()]
    assert sorted(wn) == ["n00000001"] * 2 + ["n00000003"] * 2  # n00000002 is not listed
    assert all(
        int(s["cls"])
        == [0, 1, 2][["n00000003", "n00000009", "n00000001"].index(json.loads(s["json"])["wnid"])]
        for s in sa.values()
    )
    assert set(sa) != set(sc)  # another seed picks other images (C(5,2)^2 = 100 choices)
    assert a["num_samples"] == c["num_samples"] == 4


def test_bad_arguments(tree, tmp_path: Path) -> None:
    root, _, _ = tree
    write_shards(root, tmp_path, shard_size=4, progress=False)
    with pytest.raises(RuntimeError, match=r"plan\.json.*shard_size"):
        write_shards(root, tmp_path, shard_size=5, progress=False)
    with pytest.raises(ValueError, match="shard size"):
        write_shards(root, tmp_path / "x", shard_size=0, progress=False)
    with pytest.raises(FileNotFoundError, match="nope"):
        write_shards(tmp_path / "nope", tmp_path / "y", progress=False)
    bad = tmp_path / "bad.txt"
    bad.write_text("n00000001\nfish\n")
    with pytest.raises(ValueError, match=r"bad\.txt:2"):
        read_synsets(bad)
    r = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--root",
            str(root),
            "--out",
            str(tmp_path),
            "--shard-size",
            "7",
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "error:" in r.stderr and "plan.json" in r.stderr


def test_killed_run_resumes_to_identical_shards(tmp_path: Path) -> None:
    root = tmp_path / "in"
    rng = np.random.default_rng(1)
    for c in range(4):
        (root / f"n1000000{c}").mkdir(parents=True)
        for i in range(40):
            (root / f"n1000000{c}" / f"{i}.JPEG").write_bytes(image_bytes(rng, size=160))
    cmd = [
        sys.executable,
        str(SCRIPT),
        "--root",
        str(root),
        "--shard-size",
        "4",
        "--seed",
        "3",
        "--reencode",
        "--workers",
        "2",
        "--name",
        "imagenet",  # write_shards' default, for the uninterrupted run below
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    killed = tmp_path / "killed"
    p = subprocess.Popen(
        [*cmd, "--out", str(killed)], env=env, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.time() + 60
    while not list(killed.glob("*.tar")) and time.time() < deadline and p.poll() is None:
        time.sleep(0.005)
    os.killpg(p.pid, signal.SIGKILL)  # the script and its pool workers
    p.wait()
    n_before = len(list(killed.glob("*.tar")))
    assert 1 <= n_before < 40 and not (killed / "info.json").exists()
    subprocess.run([*cmd, "--out", str(killed)], env=env, check=True, capture_output=True)
    full = tmp_path / "full"
    write_shards(root, full, shard_size=4, seed=3, reencode=True, progress=False)
    names = sorted(p.name for p in full.glob("*.tar"))
    assert names == sorted(p.name for p in killed.glob("*.tar")) and len(names) == 40
    for n in names:  # byte-identical shards: no duplicate, no missing sample
        assert (killed / n).read_bytes() == (full / n).read_bytes()
    assert not list(killed.glob(".*tmp*"))
    ik, ifull = (json.loads((d / "info.json").read_text()) for d in (killed, full))
    assert ik == ifull and ik["num_samples"] == 160


def test_resume_rewrites_damaged_shards(tree, tmp_path: Path) -> None:
    root, _, _ = tree
    write_shards(root, tmp_path / "ref", shard_size=4, progress=False)
    out = tmp_path / "o"
    write_shards(root, out, shard_size=4, progress=False)
    (out / "imagenet-000001.tar").unlink()  # lost shard
    with tarfile.open(out / "imagenet-000002.tar") as tf:  # shard with a sample missing
        members = [(m, tf.extractfile(m).read()) for m in tf.getmembers()][:-3]
    with tarfile.open(out / "imagenet-000002.tar", "w") as tf:
        for m, data in members:
            tf.addfile(m, io.BytesIO(data))
    (out / ".imagenet-000003.tar.tmp-1").write_bytes(b"partial")
    write_shards(root, out, shard_size=4, progress=False)
    assert read_tars(out) == read_tars(tmp_path / "ref")
    assert not (out / ".imagenet-000003.tar.tmp-1").exists()


# --- the folder as clients see it ---------------------------------------------------------------


def test_folder_layout_timm_and_wids_index(tree, tmp_path: Path) -> None:
    """OUT's top holds the tars and info.json only (HF datasets' folder scan and glob see the
    shards); info.json is timm's info and a wids-shard-index-v1 matching the tars' bytes."""
    import timm.data

    root, files, bad = tree
    out = tmp_path / "sh"
    info = write_shards(root, out, shard_size=4, progress=False)
    top = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    assert top == sorted([*info["filenames"], "info.json"])
    assert sorted(p.name for p in (out / ST).iterdir()) == [
        "manifests",
        "plan.json",
        "plan.npz",
        "skipped.txt",
    ]
    ds = timm.data.create_dataset("wds/imagenet", root=str(out), split="train")
    want = sorted(FAKE_WNIDS.index(p.split("/")[0]) for p in set(files) - bad)
    assert sorted(t for _, t in ds) == want
    idx = json.loads((out / "info.json").read_text())
    assert idx["__kind__"] == "wids-shard-index-v1" and idx["wids_version"] == 1
    assert [e["url"] for e in idx["shardlist"]] == info["filenames"]  # relative to the folder
    for e in idx["shardlist"]:
        tar = out / e["url"]
        assert e["filesize"] == tar.stat().st_size
        assert e["md5sum"] == hashlib.md5(tar.read_bytes()).hexdigest()
        with tarfile.open(tar) as tf:
            assert e["nsamples"] == len({m.name.split(".")[0] for m in tf})
    assert sum(e["nsamples"] for e in idx["shardlist"]) == info["num_samples"] == 18


def test_wids_reads_the_index(tree, tmp_path: Path) -> None:
    wids = pytest.importorskip("wids")
    root, _, _ = tree
    out = tmp_path / "sh"
    info = write_shards(root, out, shard_size=4, progress=False)
    ds = wids.ShardListDataset(str(out / "info.json"), cache_dir=str(tmp_path / "cache"))
    assert len(ds) == info["num_samples"]
    keys = {ds[i]["__key__"] for i in range(len(ds))}
    assert keys == set(read_tars(out))


def test_old_layout_is_moved_and_resumed(tree, tmp_path: Path) -> None:
    """A folder of the old writer (plan, manifests, skipped.txt at the top) is moved into .larvess/
    and its shards are kept; an old manifest without md5 gives an index entry without md5sum."""
    root, _, _ = tree
    out = tmp_path / "old"
    ref = write_shards(root, out, shard_size=4, progress=False)
    m0 = out / ST / "manifests" / "imagenet-000000.json"
    rec = json.loads(m0.read_text())
    del rec["md5"]
    m0.write_text(json.dumps(rec))
    for n in ("plan.json", "plan.npz", "manifests", "skipped.txt"):
        os.replace(out / ST / n, out / n)
    (out / ST).rmdir()
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    again = write_shards(root, out, shard_size=4, progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")} == mtimes  # none rewritten
    assert not (out / "plan.json").exists() and (out / ST / "plan.json").is_file()
    assert "md5sum" not in again["shardlist"][0] and "md5sum" in again["shardlist"][1]
    assert {k: v for k, v in again.items() if k != "shardlist"} == {
        k: v for k, v in ref.items() if k != "shardlist"
    }
    (out / "manifests").mkdir()  # the same entry at the top and in .larvess/: two runs mixed
    with pytest.raises(RuntimeError, match=r"manifests both at the top and in .*\.larvess"):
        merge_shards(out)


def test_help(capsys) -> None:
    from larvess.commands.shard import main

    with pytest.raises(SystemExit) as ex:
        main(["--help"])
    out = capsys.readouterr().out
    assert ex.value.code == 0 and "--node-rank" in out and "i % N == I" in out


def test_the_commands_shards_carry_a_split_word_for_hf_folder_forms(tree) -> None:
    """HF datasets' folder forms (load_dataset("webdataset", data_dir=OUT), load_dataset(OUT))
    read only the files whose names carry a split word once any does, which leaves info.json
    out; without one they hand info.json to the tar reader. The default names carry "train" as
    HF's split patterns want it: between separators."""
    import re

    from larvess.commands.shard import main

    root, _, _ = tree
    out = root.parent / "cmd_out"
    main(["--root", str(root), "--out", str(out), "--shard-size", "8", "--workers", "1"])
    tars = sorted(p.name for p in out.glob("*.tar"))
    assert tars and all(re.search(r"(^|[-._ 0-9/])train[-._ 0-9]", n) for n in tars), tars
    assert not re.search(r"(^|[-._ 0-9/])train[-._ 0-9]", "info.json")
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == tars + [
        "info.json"
    ]
