"""The shard reader (imagenet_wds.ImageNetShards): disjoint ranks and workers, rows and
transforms, undecodable samples, unreadable shards counted as lost, shards from pipe: commands and
URLs, the reader protocol (class_names, wnids, set_rows). The writer: test_imagenet_shards.py."""

from __future__ import annotations

import itertools
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from data_fixtures import image_bytes, make_class_folders

from larvess.data.imagenet_shards import write_shards
from larvess.data.imagenet_wds import ImageNetShards

REPO = Path(__file__).resolve().parents[1]
WNIDS = ["n00000001", "n00000002", "n00000003"]


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, bytes], set[str]]:
    return make_class_folders(tmp_path_factory.mktemp("tree") / "in", WNIDS)


def _keys_by_shard(out: Path) -> dict[str, list[str]]:
    return {
        t.name: list(dict.fromkeys(m.name.split(".")[0] for m in tarfile.open(t)))
        for t in sorted(out.glob("*.tar"))
    }


def _draw(out: Path, rank: int, n: int, workers: int, **kw) -> list[str]:
    ds = ImageNetShards(out, rows=torch.arange(3), rank=rank, world_size=2, seed=5, **kw)
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
            data = image_bytes(rng) if i != 3 else image_bytes(rng)[:60]  # sample 3 is undecodable
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
    kw = dict(rows=torch.arange(3), rank=0, world_size=1, shuffle_buffer=10)
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


# --- lost data, label checks, rows before iterating -------------------------------------------


def _small_shards(out: Path, cls: list[int] | None = None, n_shards: int = 3, per: int = 8):
    """out/x-00000k.tar, k < n_shards, of `per` samples s<k>_<i> + info.json (3 synsets)."""
    import webdataset as wds

    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(2)
    shards = []
    for k in range(n_shards):
        fn = f"x-{k:06d}.tar"
        with wds.TarWriter(str(out / fn), encoder=False) as tw:
            for i in range(per):
                c = cls[i] if cls else i % 3
                tw.write({"__key__": f"s{k}_{i}", "cls": str(c).encode(), "jpg": image_bytes(rng)})
        shards.append({"filename": fn, "num_samples": per})
    (out / "info.json").write_text(json.dumps({"synsets": WNIDS, "shards": shards}))
    return out


def _cut(tar: Path, sample: str, where: str) -> None:
    """Truncate tar inside the data of `sample`'s first member, or at its header's start."""
    with tarfile.open(tar) as tf:
        m = next(m for m in tf.getmembers() if m.name.startswith(sample + "."))
    at = m.offset_data + m.size // 2 if where == "data" else m.offset
    tar.write_bytes(tar.read_bytes()[:at])


@pytest.mark.parametrize("where", ["data", "boundary"])  # webdataset error / tarfile quiet end
def test_truncated_shard_counts_lost_samples_and_goes_on(tmp_path: Path, where: str) -> None:
    out = _small_shards(tmp_path)
    _cut(out / "x-000001.tar", "s1_4", where)
    ds = ImageNetShards(out, rows=torch.arange(3), rank=0, world_size=1, shuffle_buffer=1)
    got = list(itertools.islice(iter(ds), 80))
    keys = [s["key"] for s in got]
    assert {k for k in keys if k.startswith("s1_")} == {f"s1_{i}" for i in range(4)}
    assert {k[:2] for k in keys} == {"s0", "s1", "s2"}  # the other shards are still read
    events = [(s["lost"], s["lost_shards"]) for s in got if s["lost"] or s["lost_shards"]]
    assert events and all(e == (4, ["x-000001.tar"]) for e in events)  # 8 planned - 4 read
    passes = keys.count("s1_0")  # each pass over shard 1 loses 4; the last may be unfinished
    assert passes >= 2 and passes - 1 <= len(events) <= passes
    assert ds.num_corrupt == 0  # nothing undecodable: the samples before the cut are whole


def test_lost_counts_travel_through_loader_workers(tmp_path: Path) -> None:
    from larvess.data.mixing import source_loader

    out = _small_shards(tmp_path)
    _cut(out / "x-000002.tar", "s2_6", "data")
    ds = ImageNetShards(out, rows=torch.arange(3), shuffle_buffer=1)
    batches = list(itertools.islice(source_loader(ds, 4, 2, seed=0), 30))
    lost = [b["lost"] for b in batches]
    assert all(isinstance(n, int) for n in lost) and sum(lost) > 0 and sum(lost) % 2 == 0
    names = [n for b in batches for n in b["lost_shards"]]
    assert set(names) == {"x-000002.tar"} and len(names) * 2 == sum(lost)


def test_every_shard_unreadable_is_an_error(tmp_path: Path) -> None:
    out = _small_shards(tmp_path)
    for k in range(3):
        _cut(out / f"x-00000{k}.tar", f"s{k}_0", "data")
    ds = ImageNetShards(out, rows=torch.arange(3), rank=0, world_size=1)
    with pytest.raises(RuntimeError, match=r"every shard of this stream failed.*x-00000"):
        next(iter(ds))


def test_rows_must_be_set_and_cls_in_range(tmp_path: Path) -> None:
    out = _small_shards(tmp_path / "ok")
    ds = ImageNetShards(out, rank=0, world_size=1)
    with pytest.raises(RuntimeError, match=r"info\.json: set_rows\(rows\) was not called"):
        next(iter(ds))
    for bad in (3, -1):  # 3 synsets: 0..2; -1 would silently index the last row
        d = tmp_path / f"bad{bad}"
        _small_shards(d, cls=[0, 1, bad, 2, 0, 1, 2, 0], n_shards=1)
        ds = ImageNetShards(d, rows=torch.arange(3), rank=0, world_size=1, shuffle_buffer=1)
        with pytest.raises(ValueError, match=rf"x-000000\.tar: sample s0_2 has cls {bad}, outside"):
            list(itertools.islice(iter(ds), 20))
