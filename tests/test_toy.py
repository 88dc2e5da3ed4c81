"""Toy world: determinism, real-format files, classes that a simple classifier separates, and the
tree (internal nodes labelled at their children, a masked parent, a residual class)."""

from __future__ import annotations

import hashlib
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from larvess.data.toy import ROOT_WNID, TREE, make_toy_world, render_texture, toy_classes
from larvess.hierarchy import Hierarchy

SMALL = dict(size=64, n_coco=6, n_imagenet_per_class=2, n_ade_train=5, n_ade_val=4, progress=False)


def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("toy") / "w"
    make_toy_world(out, seed=3, workers=1, **SMALL)
    return out


def test_same_seed_same_bytes_any_worker_count(world: Path, tmp_path: Path) -> None:
    make_toy_world(tmp_path / "b", seed=3, workers=2, **SMALL)
    make_toy_world(tmp_path / "c", seed=4, workers=1, **SMALL)
    a, b, c = _digest(world), _digest(tmp_path / "b"), _digest(tmp_path / "c")
    n_parents = sum(base for base, _ in TREE)  # base classes with ImageNet-labelled children
    # images + masks (COCO, ADE), 2 ImageNet images per novel class and base parent, 7 metadata
    assert len(a) == 2 * 6 + (12 + n_parents) * 2 + 2 * 5 + 2 * 4 + 7
    assert a == b
    assert a.keys() == c.keys()
    jpgs = [k for k in a if k.endswith((".jpg", ".JPEG"))]
    assert all(a[k] != c[k] for k in jpgs)


def test_coco_stuff_format_base_only(world: Path) -> None:
    root = world / "coco_stuff"
    lines = (root / "labels.txt").read_text().splitlines()
    assert lines[0] == "0: unlabeled"
    ids = [int(s.split(":")[0]) for s in lines[1:]]
    names = [s.split(": ", 1)[1] for s in lines[1:]]
    table = toy_classes()
    assert ids == list(range(1, 13))
    assert names == [c.name for c in table if c.base]
    pngs = sorted((root / "stuffthingmaps" / "train2017").glob("*.png"))
    jpgs = sorted((root / "images" / "train2017").glob("*.jpg"))
    assert [p.stem for p in pngs] == [p.stem for p in jpgs] and len(pngs) == 6
    seen = set()
    for p, j in zip(pngs, jpgs):
        m = Image.open(p)
        assert m.mode == "L" and m.size == (64, 64) and Image.open(j).size == (64, 64)
        v = np.unique(np.asarray(m))
        # PNG value v = labels.txt id - 1; only base ids (0..11) or 255 ignore, never a novel class
        assert set(v.tolist()) <= set(range(12)) | {255}
        seen |= set(v.tolist())
    assert 255 in seen and len(seen - {255}) >= 4


def _manifest(world: Path) -> dict:
    return json.loads((world / "toy_world.json").read_text())


def test_imagenet_folder_novel_and_base_parents(world: Path) -> None:
    table = toy_classes()
    novel = [c for c in table if not c.base]
    assert [c.wnid for c in novel] == [f"n{90000001 + k}" for k in range(12)]
    synsets = (world / "imagenet_synsets.txt").read_text().split()
    assert synsets == sorted(synsets) and len(set(synsets)) == len(synsets)
    lemmas = dict(s.split("\t") for s in (world / "imagenet_lemmas.txt").read_text().splitlines())
    assert list(lemmas) == synsets
    tree = {s["wnid"]: s for s in _manifest(world)["synsets"]}
    parents = {s["parent"] for s in tree.values()}
    # listed: every novel class, the base classes with children, and all children; never a
    # base leaf (its masks are its only supervision) nor the root
    expect = {c.wnid for c in novel} | {c.wnid for c in table if c.base and c.wnid in parents}
    expect |= {w for w, s in tree.items() if s["cls"] is None and s["parent"]}
    assert set(synsets) == expect
    for c in table:
        if c.wnid in lemmas:
            assert lemmas[c.wnid] == c.name
    folders = sorted(p.name for p in (world / "imagenet").iterdir())
    assert folders == sorted(w for w in synsets if tree[w]["images"])  # an empty node: listed only
    for w in folders:
        files = sorted((world / "imagenet" / w).glob("*.JPEG"))
        assert len(files) == tree[w]["images"]
        im = Image.open(files[0])
        assert im.format == "JPEG" and im.mode == "RGB"
    # every class with images has 2 of them (SMALL), at its node or spread over its children
    for c in table:
        n = tree[c.wnid]["images"]
        n += sum(s["images"] for s in tree.values() if s["parent"] == c.wnid and s["cls"] is None)
        assert n == (2 if c.wnid in lemmas else 0), c.name


def test_ade_format(world: Path) -> None:
    root = world / "ade" / "ADEChallengeData2016"
    rows = [s.split("\t") for s in (root / "objectInfo150.txt").read_text().splitlines()]
    assert rows[0] == ["Idx", "Ratio", "Train", "Val", "Name"]
    table = toy_classes()
    assert [int(r[0]) for r in rows[1:]] == list(range(1, 25))
    assert [r[4] for r in rows[1:]] == [c.name for c in table]
    for split, n, col in (("training", 5, 2), ("validation", 4, 3)):
        imgs = sorted((root / "images" / split).glob("*.jpg"))
        anns = sorted((root / "annotations" / split).glob("*.png"))
        assert len(imgs) == n and [p.stem for p in imgs] == [p.stem for p in anns]
        present = np.zeros(25, int)
        for a in anns:
            v = np.unique(np.asarray(Image.open(a)))
            assert v.max() <= 24  # 0 = ignore, i = objectInfo150 Idx i
            present[v] += 1
        # the Train / Val columns count the images that contain each class
        assert [int(r[col]) for r in rows[1:]] == present[1:].tolist()
    manifest = _manifest(world)
    n_parents = sum(base for base, _ in TREE)
    assert manifest["seed"] == 3 and manifest["counts"]["imagenet"] == 2 * (12 + n_parents)
    assert manifest["base"] == [c.name for c in table if c.base]


def _features(img: np.ndarray) -> np.ndarray:
    """Mean colour (3) + magnitude-weighted gradient-orientation histogram (8) + mean |grad|."""
    g = img.mean(-1)
    gy, gx = np.gradient(g)
    mag = np.hypot(gx, gy)
    ang = np.mod(np.arctan2(gy, gx), np.pi)
    bins = (ang / np.pi * 8).astype(int).clip(0, 7).ravel()
    h = np.bincount(bins, weights=mag.ravel(), minlength=8)
    return np.concatenate([img.reshape(-1, 3).mean(0), h / (h.sum() + 1e-8), [mag.mean()]])


def _nearest_mean_accuracy(x: np.ndarray, n_train: int) -> float:
    """x [C, n, f]: class means from the first n_train samples, accuracy on the rest."""
    mu = x[:, :n_train].mean(1)
    test = x[:, n_train:]
    pred = ((test[:, :, None] - mu[None, None]) ** 2).sum(-1).argmin(-1)
    return float((pred == np.arange(len(x))[:, None]).mean())


def test_classes_distinguishable_but_not_by_colour_alone() -> None:
    table = toy_classes()
    rng = np.random.default_rng(0)
    x = np.array([[_features(render_texture(c, 48, 48, rng)) for _ in range(8)] for c in table])
    full = _nearest_mean_accuracy(x, 4)
    colour = _nearest_mean_accuracy(x[..., :3], 4)
    assert full > 0.5  # chance is 1/24; measured ~0.75
    assert colour < full - 0.2  # 4 classes per hue: colour alone confuses them (~0.3)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="num_base"):
        toy_classes(0, 12)
    with pytest.raises(ValueError, match="num_novel"):
        toy_classes(12, 25)
    with pytest.raises(ValueError, match="size"):
        make_toy_world("/nonexistent", size=8)
    assert len(toy_classes(3, 2)) == 5 and len({c.name for c in toy_classes(24, 24)}) == 48
    assert len({c.wnid for c in toy_classes(24, 24)}) == 48


@pytest.fixture(scope="module")
def shards(world: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The world's ImageNet part sharded over its synset list (empty nodes are classes too)."""
    from larvess.data.imagenet_shards import write_shards

    out = tmp_path_factory.mktemp("shards")
    synsets = (world / "imagenet_synsets.txt").read_text().split()
    write_shards(world / "imagenet", out, synsets=synsets, shard_size=8, progress=False)
    return out


def _vocabulary(world: Path):
    """The demo's vocabulary from the real readers: (vocab, coco rows, ADE rows, ImageNet rows)."""
    from larvess.vocab import Vocabulary, read_names_file, read_synset_lemmas

    ade_root = world / "ade" / "ADEChallengeData2016"
    lemmas = read_synset_lemmas(world / "imagenet_lemmas.txt")
    synsets = (world / "imagenet_synsets.txt").read_text().split()
    vocab = Vocabulary(alias_file=world / "aliases.txt")  # the toy synsets' curated mapping
    r_coco = vocab.add_source(
        "coco", read_names_file(world / "coco_stuff" / "labels.txt"), None, True
    )
    r_ade = vocab.add_source("ade", read_names_file(ade_root / "objectInfo150.txt"))
    r_in = vocab.add_source("in", [lemmas[w] for w in synsets], synsets, by_synset=True)
    return vocab, r_coco, r_ade, r_in


def test_project_readers_and_vocabulary_read_the_toy_world(world: Path, shards: Path) -> None:
    """The toy files go through the real readers: the 24 classes agree by name and alias, and
    each child synset is a row of its own; an ImageNet image carries its folder's synset only."""
    from larvess.data.ade import AdeEval, AdeTrain
    from larvess.data.coco_stuff import CocoStuff
    from larvess.data.imagenet_wds import ImageNetShards

    coco = CocoStuff(world / "coco_stuff")
    vocab, r_coco, r_ade, r_in = _vocabulary(world)
    synsets = (world / "imagenet_synsets.txt").read_text().split()
    tree = {s["wnid"]: s for s in _manifest(world)["synsets"]}
    children = [w for w in synsets if tree[w]["cls"] is None]
    assert len(vocab) == 24 + len(children) and len(coco.class_names) == 12 and len(coco) == 6
    assert r_coco.tolist() == r_ade[:12].tolist() == list(range(12))
    ade_row = {c.name: int(r) for c, r in zip(toy_classes(), r_ade)}
    for w, r in zip(synsets, r_in.tolist()):  # a class's synset joins its class's row (alias)
        assert r == ade_row[tree[w]["cls"]] if tree[w]["cls"] else r >= 24, w
    ade_root = world / "ade" / "ADEChallengeData2016"
    assert len(AdeTrain(ade_root, weak=True)) == 5 and len(AdeEval(world / "ade")) == 4
    item = AdeEval(world / "ade")[0]
    assert item["label"].shape == (64, 64) and item["label"].min() >= -1
    ds = ImageNetShards(shards, rows=r_in, rank=0, world_size=1)
    n = _manifest(world)["counts"]["imagenet"]
    wnids = set()
    for s in itertools.islice(ds, n):  # the reader repeats forever: one epoch's worth
        wnid = s["key"].split("_")[0]
        assert s["image"].shape == (3, 64, 64)
        assert s["labels"].tolist() == [int(r_in[synsets.index(wnid)])]  # one label, its own
        wnids.add(wnid)
    assert any(tree[w]["cls"] is None for w in wnids)  # children's images among them


def test_hypernym_table_and_the_tree_of_the_vocabulary(world: Path) -> None:
    """hypernyms.tsv loads, closed upward to one root; each internal node covers its children
    (their images are its images too), the residual class neither covers nor overlaps the class
    of its dataset nested below it, and a child's image label expands to its parent only."""
    from larvess.tree_labels import rows_with_covering, source_tree, tree_pairs

    h = Hierarchy.load(world / "hypernyms.tsv")
    assert [w for w in h.parents if not h.parents[w]] == [ROOT_WNID]
    synsets = (world / "imagenet_synsets.txt").read_text().split()
    aliases = [ln.split(" | ") for ln in (world / "aliases.txt").read_text().splitlines()[1:]]
    assert sorted(w for w, _ in aliases) == sorted(c.wnid for c in toy_classes())
    assert all(w in h for w in synsets) and all(w in h for w, _ in aliases)
    m = _manifest(world)
    wnid = {c.name: c.wnid for c in toy_classes()}
    assert m["internal"] == [n for n in wnid if h.children[wnid[n]]]
    assert set(m["internal"]) | set(m["leaves"]) == set(wnid) and len(m["internal"]) == 7
    internal_base = [n for n in m["internal"] if n in m["base"]]
    assert len(internal_base) == sum(base for base, _ in TREE)

    vocab, _, r_ade, r_in = _vocabulary(world)
    t = vocab.tree(h)  # strict: every wnid of the vocabulary is in the table
    row = {c.name: int(r) for c, r in zip(toy_classes(), r_ade)}
    by_wnid = dict(zip(synsets, r_in.tolist()))
    for name in m["internal"]:
        kids = [
            by_wnid[w] for w in h.children[wnid[name]] if w in by_wnid and w not in wnid.values()
        ]
        assert len(kids) in (2, 3), name
        for k in kids:
            assert t.covering[k].tolist() == [row[name]]  # the parent, nothing else
        assert set(kids) <= set(t.related[row[name]].tolist())
        assert set(t.covering[row[name]].tolist()) == set()  # the root is no row
    for name in m["leaves"]:
        if name not in [r["nested"] for r in m["residual"]]:
            assert t.related[row[name]].numel() == 0, name
    (res,) = m["residual"]
    r_res, r_nest = row[res["class"]], row[res["nested"]]
    assert wnid[res["class"]] in h.ancestors(wnid[res["nested"]])  # nested by the tree ...
    assert r_res not in t.covering[r_nest].tolist()  # ... but food-other is not pizza
    assert r_res not in t.related[r_nest].tolist() and r_nest not in t.related[r_res].tolist()
    assert vocab.entries[row[internal_base[0]]].has_masks

    # the ImageNet source under the tree: a child's image label l expands to [l, its parent]
    rows = rows_with_covering(t, r_in)
    st = source_tree(t, rows)
    local = {int(r): i for i, r in enumerate(rows.tolist())}
    cls_of = {x["wnid"]: x["cls"] for x in m["synsets"]}
    for w, r in by_wnid.items():
        pairs = tree_pairs([torch.tensor([local[r]])], st)
        got = [int(rows[i]) for i in pairs.target.tolist()]
        is_child = cls_of[w] is None
        assert got == [r] + ([row[cls_of[h.parents[w][0]]]] if is_child else []), w


def test_flat_world_has_no_tree(tmp_path: Path) -> None:
    small = SMALL | dict(n_coco=1, n_ade_train=1, n_ade_val=1)
    m = make_toy_world(tmp_path / "flat", seed=0, workers=1, tree=False, **small)
    h = Hierarchy.load(tmp_path / "flat" / "hypernyms.tsv")
    assert m["internal"] == [] and m["residual"] == [] and m["counts"]["imagenet"] == 2 * 12
    assert all(h.parents[c.wnid] == (ROOT_WNID,) for c in toy_classes())
    synsets = (tmp_path / "flat" / "imagenet_synsets.txt").read_text().split()
    assert synsets == [c.wnid for c in toy_classes() if not c.base]


def test_toy_recipe_trains_on_the_world_tree(world: Path, shards: Path) -> None:
    """recipes/toy.yaml reads the tree beside the aliases (the demo's toy_world/), and
    build_tree on a world's files gives the strict tree the trainer uses."""
    import yaml

    from larvess import build
    from larvess.config import load_recipe

    recipe_file = Path(__file__).resolve().parents[1] / "recipes" / "toy.yaml"
    vocab_cfg = yaml.safe_load(recipe_file.read_text())["vocab"]
    assert Path(vocab_cfg["hierarchy_file"]).parent == Path(vocab_cfg["alias_file"]).parent
    recipe = load_recipe(recipe_file, [
        "loss.hierarchy=tree",
        f"vocab.alias_file={world / 'aliases.txt'}",
        f"vocab.hierarchy_file={world / 'hypernyms.tsv'}",
        f"data.coco.root={world / 'coco_stuff'}",
        f"data.imagenet.root={shards}",
        f"data.imagenet.names={world / 'imagenet_lemmas.txt'}",
        f"data.wa.root={world / 'ade'}",
    ])  # fmt: skip
    vocab, _ = build.build_data(recipe)
    t = build.build_tree(recipe, vocab)
    parent_of = {int(r): [int(q) for q in t.parents[r]] for r in range(len(vocab))}
    m = _manifest(world)
    internal = {vocab.names.index(n) for n in m["internal"]}
    assert {q for qs in parent_of.values() for q in qs} == internal
    with pytest.raises(FileNotFoundError, match="nowhere.tsv"):
        build.build_tree(
            load_recipe(recipe_file, ["loss.hierarchy=tree", "vocab.hierarchy_file=nowhere.tsv"]),
            vocab,
        )
