"""ImageNet WebDataset shards: round trip, odd inputs, kill + resume, timm, disjoint readers,
shards from pipe: commands and URLs, the reader protocol (class_names, wnids, set_rows)."""

from __future__ import annotations

import io
import itertools
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from data_fixtures import read_tars
from PIL import Image

from larvess.data.imagenet_shards import UnreadableImage, prepare_jpeg, read_synsets, write_shards
from larvess.data.imagenet_wds import ImageNetShards

REPO = Path(__file__).resolve().parents[1]
WNIDS = ["n00000001", "n00000002", "n00000003"]


def _jpeg(rng: np.random.Generator, size: int = 24, mode: str = "RGB", **kw) -> bytes:
    a = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    im = Image.fromarray(a).convert(mode)
    buf = io.BytesIO()
    im.save(buf, format="JPEG" if mode != "RGBA" else "PNG", **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, bytes], set[str]]:
    """root/<wnid>/*: 5 valid RGB JPEGs per class (one progressive) + odd files in class 2."""
    root = tmp_path_factory.mktemp("tree") / "in"
    rng = np.random.default_rng(0)
    files: dict[str, bytes] = {}
    for w in WNIDS:
        (root / w).mkdir(parents=True)
        for i in range(5):
            files[f"{w}/{w}_{i}.JPEG"] = _jpeg(rng, progressive=(i == 0))
    odd = WNIDS[1]
    files[f"{odd}/{odd}_cmyk.JPEG"] = _jpeg(rng, mode="CMYK")
    files[f"{odd}/{odd}_grey.JPEG"] = _jpeg(rng, mode="L")
    files[f"{odd}/{odd}_png.JPEG"] = _jpeg(rng, mode="RGBA")  # PNG bytes under a .JPEG name
    files[f"{odd}/{odd}_trunc.JPEG"] = _jpeg(rng, size=64)[:400]
    files[f"{odd}/{odd}_text.JPEG"] = b"not an image\n"
    for rel, data in files.items():
        (root / rel).write_bytes(data)
    bad = {f"{odd}/{odd}_trunc.JPEG", f"{odd}/{odd}_text.JPEG"}
    return root, files, bad


def test_round_trip_and_odd_inputs(tree, tmp_path: Path) -> None:
    root, files, bad = tree
    info = write_shards(root, tmp_path, shard_size=4, seed=1, progress=False)
    samples = read_tars(tmp_path)
    by_path = {json.loads(s["json"])["path"]: s for s in samples.values()}
    assert set(by_path) == set(files) - bad  # every readable input exactly once
    for key, s in samples.items():
        meta = json.loads(s["json"])
        assert "." not in key and meta["wnid"] == meta["path"].split("/")[0]
        assert int(s["cls"].decode("ascii")) == WNIDS.index(meta["wnid"])
        im = Image.open(io.BytesIO(s["jpg"]))
        assert im.format == "JPEG" and im.mode == "RGB"
        odd = any(t in meta["path"] for t in ("cmyk", "grey", "png"))
        assert meta["reencoded"] == odd
        if not odd:
            assert s["jpg"] == files[meta["path"]]  # valid JPEGs keep their bytes
    orig = Image.open(io.BytesIO(files[f"{WNIDS[1]}/{WNIDS[1]}_grey.JPEG"])).convert("RGB")
    grey = Image.open(io.BytesIO(by_path[f"{WNIDS[1]}/{WNIDS[1]}_grey.JPEG"]["jpg"]))
    diff = np.abs(np.asarray(grey, float) - np.asarray(orig, float)).mean()
    assert diff < 8  # re-encoded at quality 95
    skipped = dict(ln.split("\t") for ln in (tmp_path / "skipped.txt").read_text().splitlines())
    assert set(skipped) == bad
    assert info["num_skipped"] == 2 and info["num_reencoded"] == 3
    assert info["synsets"] == WNIDS and info["num_samples"] == len(samples) == 18
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


def test_timm_reads_shards(tree, tmp_path: Path) -> None:
    import timm.data

    root, files, bad = tree
    write_shards(root, tmp_path, shard_size=4, progress=False)
    ds = timm.data.create_dataset("wds/imagenet", root=str(tmp_path), split="train")
    got = sorted(t for _, t in ds)
    want = sorted(WNIDS.index(p.split("/")[0]) for p in set(files) - bad)
    assert got == want


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
            str(REPO / "scripts" / "shard_imagenet21k.py"),
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
            (root / f"n1000000{c}" / f"{i}.JPEG").write_bytes(_jpeg(rng, size=160))
    cmd = [
        sys.executable,
        str(REPO / "scripts" / "shard_imagenet21k.py"),
        "--root",
        str(root),
        "--shard-size",
        "4",
        "--seed",
        "3",
        "--reencode",
        "--workers",
        "2",
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


def _keys_by_shard(out: Path) -> dict[str, list[str]]:
    return {
        t.name: list(dict.fromkeys(m.name.split(".")[0] for m in tarfile.open(t)))
        for t in sorted(out.glob("*.tar"))
    }


def _draw(out: Path, rank: int, n: int, workers: int, **kw) -> list[str]:
    ds = ImageNetShards(out, rank=rank, world_size=2, seed=5, **kw)
    dl = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers)
    return [s["key"] for s in itertools.islice(dl, n)]


@pytest.mark.parametrize("shard_size", [2, 9])  # 9 shards >= 4 slots; 2 shards < 4 slots
def test_two_ranks_two_workers_disjoint(tree, tmp_path: Path, shard_size: int) -> None:
    root, _, _ = tree
    write_shards(root, tmp_path, shard_size=shard_size, progress=False)
    by_shard = _keys_by_shard(tmp_path)
    shards = list(by_shard)
    slot_keys = [set() for _ in range(4)]  # naive expectation per slot = rank * 2 + worker
    for s in range(4):
        if len(shards) >= 4:
            slot_keys[s] = {k for n in shards[s::4] for k in by_shard[n]}
        else:
            slot_keys[s] = {k for n in shards for k in by_shard[n][s::4]}
    seen = [set(_draw(tmp_path, r, 60, 2)) for r in (0, 1)]
    assert not seen[0] & seen[1]
    for r in (0, 1):
        assert seen[r] <= slot_keys[2 * r] | slot_keys[2 * r + 1]
        assert seen[r] & slot_keys[2 * r] and seen[r] & slot_keys[2 * r + 1]  # both workers


def test_reader_rows_transform_and_corrupt(tmp_path: Path) -> None:
    import webdataset as wds

    rng = np.random.default_rng(2)
    with wds.TarWriter(str(tmp_path / "x-000000.tar"), encoder=False) as tw:
        for i in range(6):
            data = _jpeg(rng) if i != 3 else _jpeg(rng)[:60]  # sample 3 is undecodable
            tw.write({"__key__": f"k{i}", "jpg": data, "cls": str(i % 3).encode()})
    info = {
        "synsets": WNIDS,
        "num_samples": 6,
        "shards": [{"filename": "x-000000.tar", "num_samples": 6}],
    }
    (tmp_path / "info.json").write_text(json.dumps(info))
    calls = []

    def transform(img, label, g):
        calls.append((img.mode, label, type(g).__name__))
        return torch.zeros(3, 4, 4), None

    rows = torch.tensor([7, -1, 9])  # class 1 is not in the vocabulary: dropped
    ds = ImageNetShards(tmp_path, rows=rows, transform=transform, rank=0, world_size=1)
    got = list(itertools.islice(iter(ds), 60))
    assert {s["key"] for s in got} == {"k0", "k2", "k5"}  # k3 (class 0) corrupt, k1/k4 dropped
    assert all(s["labels"].tolist() == [{"k0": 7, "k2": 9, "k5": 9}[s["key"]]] for s in got)
    assert ds.num_corrupt >= 1 and calls[0] == ("RGB", None, "Generator")
    with pytest.raises(ValueError, match="rows"):
        ImageNetShards(tmp_path, rows=torch.arange(4))


def _all_keys(ds: ImageNetShards, n: int) -> set[str]:
    return {s["key"] for s in itertools.islice(iter(ds), n)}


def test_shards_from_pipe_and_file_url(tree, tmp_path: Path) -> None:
    root, files, bad = tree
    out = tmp_path / "sh"
    info = write_shards(root, out, shard_size=4, progress=False)
    by_shard = _keys_by_shard(out)
    keys = set().union(*by_shard.values())
    kw = dict(rank=0, world_size=1, shuffle_buffer=10)
    local = ImageNetShards(out, **kw)
    assert _all_keys(local, 200) == keys and local.num_samples == info["num_samples"]
    piped = ImageNetShards(f"pipe:cat {out}/imagenet-{{000000..000004}}.tar", **kw)
    assert piped.info_url == f"pipe:cat {out}/info.json"  # the same command, for info.json
    assert piped.urls[1] == f"pipe:cat {out}/imagenet-000001.tar"
    assert _all_keys(piped, 200) == keys and piped.synsets == WNIDS
    url = ImageNetShards(f"file://{out}", **kw)
    assert url.info_url == f"file://{out}/info.json" and _all_keys(url, 200) == keys
    sub = ImageNetShards(
        f"file://{out}/imagenet-{{000001..000002}}.tar", info=str(out / "info.json"), **kw
    )
    assert _all_keys(sub, 100) == {
        *by_shard["imagenet-000001.tar"],
        *by_shard["imagenet-000002.tar"],
    }
    assert sub.num_samples == sum(info["shard_lengths"][1:3])
    with pytest.raises(ValueError, match="no shard pattern"):
        ImageNetShards(f"pipe:cat {out}/imagenet-000000.tar")
    with pytest.raises(FileNotFoundError, match=r"cannot read pipe:cat .*nowhere/info\.json"):
        ImageNetShards(f"pipe:cat {tmp_path}/nowhere/imagenet-{{000000..000004}}.tar")
    with pytest.raises(ValueError, match="names none of the 5 shards"):
        ImageNetShards(f"pipe:cat {out}/other-{{000000..000001}}.tar", info=out / "info.json")
    with pytest.raises(FileNotFoundError, match="not found"):
        ImageNetShards(tmp_path / "missing")


def test_reader_protocol(tree, tmp_path: Path) -> None:
    root, _, _ = tree
    write_shards(root, tmp_path / "sh", shard_size=4, progress=False)
    lemmas = tmp_path / "lemmas.txt"
    lemmas.write_text("n00000001\tcat, true cat\nn00000002\tdog\nn00000003\tbird\n")
    ds = ImageNetShards(tmp_path / "sh", names_file=lemmas)
    assert ds.wnids == WNIDS and ds.class_names == [["cat", "true cat"], ["dog"], ["bird"]]
    ds.set_rows(torch.tensor([4, 5, 6]))
    assert ds.rows.tolist() == [4, 5, 6] and ds.rows.dtype == torch.long
    with pytest.raises(ValueError, match=r"rows must be a LongTensor \[3\].*sh/info\.json"):
        ds.set_rows(torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="rows"):
        ds.rows = torch.zeros(3)  # float: not a row mapping
    lemmas.write_text("n00000001\tcat\n")
    with pytest.raises(ValueError, match=r"lemmas\.txt: no lemma for 2 of the 3.*n00000002"):
        ImageNetShards(tmp_path / "sh", names_file=lemmas)
    lazy = ImageNetShards(tmp_path / "sh")  # timm's table, read at first use: no fake wnids
    with pytest.raises(ValueError, match=r"imagenet_synset_to_lemma\.txt: no lemma for 3"):
        _ = lazy.class_names
