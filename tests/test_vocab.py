import json

import pytest
import torch
from data_fixtures import REFERENCE, write_object_info

from larvess.vocab import (
    Vocabulary,
    normalize_name,
    read_aliases,
    read_names_file,
    read_synset_lemmas,
)


def test_real_reference_files_parse():
    ade = read_names_file(REFERENCE / "objectInfo150.txt")
    assert len(ade) == 150
    assert ade[0] == ["wall"] and ade[1] == ["building", "edifice"]
    assert ade[7] == ["bed"]  # "bed " with a trailing space
    assert ade[-1] == ["flag"]
    coco = read_names_file(REFERENCE / "cocostuff_labels.txt")
    assert len(coco) == 171
    flat = [n[0] for n in coco]
    assert flat[0] == "person" and flat[-1] == "wood"
    for unused in ("street sign", "hat", "shoe", "eye glasses", "plate", "window", "hair brush"):
        assert unused not in flat
    assert "window-other" in flat and "mirror-stuff" in flat
    full = read_names_file(REFERENCE / "ade847_categories.tsv")
    assert len(full) == 847
    assert full[0] == ["wall"] and full[-1] == ["adding machine", "totalizer", "totaliser"]


def test_ade150_base_novel_split_against_coco_stuff():
    v = Vocabulary()
    coco = read_names_file(REFERENCE / "cocostuff_labels.txt")
    rows_c = v.add_source("coco_stuff", coco, has_masks=True)
    assert rows_c.tolist() == list(range(171))  # no two COCO classes merged
    ade = read_names_file(REFERENCE / "objectInfo150.txt")
    rows = v.match(ade)
    base = v.is_base(rows)
    n_base = int(base.sum())
    print(f"\nADE-150 vs COCO-Stuff-171: {n_base} base / {150 - n_base} novel (LarvSeg: 63 / 87)")
    assert 40 <= n_base <= 90
    assert bool(base[(rows >= 0)].all()) and not bool(base[rows < 0].any())
    named = {a[0]: v.names[r] for a, r in zip(ade, rows.tolist()) if r >= 0}
    assert named["wall"] == "wall-other" and named["sofa"] == "couch"
    assert named["earth"] == "ground-other" and "land" not in named  # one row per class
    assert named["counter"] == "counter" and "buffet" not in named  # display name beats synonym
    # adding WA150 as an image-level source: matched classes stay base, the rest are novel
    rows_w = v.add_source("wa150", ade, has_masks=False)
    assert torch.equal(rows_w[rows >= 0], rows[rows >= 0])
    assert len(v) == 171 + (150 - n_base)
    assert torch.equal(v.is_base(rows_w), base)
    assert set(v.entries[rows_w[0]].sources) == {"coco_stuff", "wa150"}


def test_normalisation_and_name_matching():
    assert normalize_name("Wall-Other") == "wall"
    assert normalize_name("grass-merged") == "grass"
    assert normalize_name("wall-other-merged") == "wall"
    assert normalize_name("traffic_light") == "traffic light"
    assert normalize_name("other") == "other"
    v = Vocabulary()
    v.add_source("a", [["wall-other"], ["Traffic_Light"], ["sky"]], has_masks=True)
    rows = v.match([["wall"], ["tree"], ["traffic light", "stoplight"]])
    assert rows.tolist() == [0, -1, 1]
    assert v.is_base(torch.tensor([0, -1, 2])).tolist() == [True, False, True]


def test_synset_classes_merge_by_wordnet_id_only():
    v = Vocabulary()
    # dataset classes with curated synsets (COCO: "mouse" is the device, n03793489)
    v.add_source("coco", [["mouse"], ["dog"], ["sky-other"]],
                 wnids=[["n03793489"], ["n02084071"], []], has_masks=True)  # fmt: skip
    # ImageNet synsets: the rodent "mouse" shares a lemma but not the synset -> its own row
    rows = v.add_source(
        "in", [["mouse"], ["dog", "domestic dog"], ["computer mouse", "mouse"], ["sky"]],
        ["n02330245", "n02084071", "n03793489", "n09436708"], by_synset=True,
    )  # fmt: skip
    assert rows.tolist() == [3, 1, 0, 4]
    assert v.entries[0].wnids == ["n03793489"] and v.entries[3].wnids == ["n02330245"]
    assert v.entries[3].by_synset and not v.entries[0].by_synset
    # a later dataset class never joins a synset-only row by name ("sky" row 4 is ImageNet's)
    assert v.add_source("ade", [["sky"], ["mouse"]]).tolist() == [2, 0]
    # two dataset classes whose synsets differ never merge by name
    assert v.add_source("x", [["dog"]], wnids=[["n99999999"]]).tolist() == [5]
    # unknown synsets on one side: the name decides
    assert v.add_source("z", [["dog"]]).tolist() == [1]
    with pytest.raises(ValueError, match="not a WordNet id"):
        v.add_source("bad", [["cat"]], wnids=["cat"])


def test_alias_file_merges(tmp_path):
    f = tmp_path / "aliases.txt"
    f.write_text("# hand-made\nrug | carpet\nn04590129 | window-other  # wnid to name\n")
    assert read_aliases(f) == [["rug", "carpet"], ["n04590129", "window-other"]]
    y = tmp_path / "aliases.yaml"
    y.write_text("- [rug, carpet]\n- [n04590129, window-other]\n")
    assert read_aliases(y) == read_aliases(f)
    for path in (f, y):
        v = Vocabulary(alias_file=path)
        v.add_source("coco", [["carpet"], ["window-other"]], has_masks=True)
        rows = v.add_source("ade", [["rug"], ["windowpane"]], wnids=[None, "n04590129"])
        assert rows.tolist() == [0, 1]
        assert Vocabulary().add_source("ade", [["rug"]]).tolist() == [0]
    bad = tmp_path / "bad.txt"
    bad.write_text("rug\n")
    with pytest.raises(ValueError, match=r"bad.txt:1"):
        read_aliases(bad)


def test_one_source_never_shares_a_row():
    v = Vocabulary()
    rows = v.add_source("ade", [["screen door", "screen"], ["screen", "silver screen"]])
    assert rows.tolist() == [0, 1]
    assert v.match([["screen"]]).tolist() == [1]  # display name "screen" is row 1


def test_json_round_trip(tmp_path):
    v = Vocabulary(aliases=[["rug", "carpet"]])
    v.add_source("coco", [["carpet"], ["wall-other"]], has_masks=True)
    v.add_source("in", [["tench", "Tinca tinca"], ["wall"]], wnids=["n01440764", None])
    v.save(tmp_path / "v.json")
    w = Vocabulary.load(tmp_path / "v.json")
    assert w.names == v.names and len(w) == 3
    assert [e.__dict__ for e in w.entries] == [e.__dict__ for e in v.entries]
    assert torch.equal(w.rows_of("in"), v.rows_of("in")) and w.sources == ["coco", "in"]
    q = [["rug"], ["Tinca tinca"], ["nothing"]]
    assert torch.equal(w.match(q), v.match(q)) and w.match(q).tolist() == [0, 2, -1]
    assert torch.equal(w.is_base(torch.arange(3)), torch.tensor([True, True, False]))
    assert w.add_source("more", [["carpet"]]).tolist() == [0]
    # version-1 files (one optional "wnid" per row) still load
    data = json.loads((tmp_path / "v.json").read_text())
    data["version"] = 1
    for e in data["entries"]:
        ws = e.pop("wnids")
        e.pop("by_synset")
        e["wnid"] = ws[0] if ws else None
    (tmp_path / "v1.json").write_text(json.dumps(data))
    old = Vocabulary.load(tmp_path / "v1.json")
    assert [e.wnids for e in old.entries] == [e.wnids for e in v.entries]


def test_names_file_formats_and_errors(tmp_path):
    lem = tmp_path / "lemmas.txt"
    lem.write_text("n01440764\ttench, Tinca tinca\nn01443537\tgoldfish, Carassius auratus\n")
    assert read_synset_lemmas(lem) == {
        "n01440764": ["tench", "Tinca tinca"],
        "n01443537": ["goldfish", "Carassius auratus"],
    }
    assert read_names_file(lem) == [["tench", "Tinca tinca"], ["goldfish", "Carassius auratus"]]
    plain = tmp_path / "plain.txt"
    plain.write_text("cat\n\ndog, doggy\n")
    assert read_names_file(plain) == [["cat"], ["dog", "doggy"]]
    toy = tmp_path / "labels.txt"
    toy.write_text("0: unlabeled\n1: red\n2: blue-other\n")
    assert read_names_file(toy) == [["red"], ["blue-other"]]
    info = tmp_path / "objectInfo150.txt"
    write_object_info(info, ["a, b", "c", "d"])
    assert read_names_file(info) == [["a", "b"], ["c"], ["d"]]
    info.write_text(info.read_text().replace("\n2\t", "\n5\t"))
    with pytest.raises(ValueError, match=r"objectInfo150.txt:3: Idx 5, expected 2"):
        read_names_file(info)
    tsv = tmp_path / "cats.tsv"
    tsv.write_text("trainId\tade_full_id\tname\n0\t1\twall\nx\t2\tfloor\n")
    with pytest.raises(ValueError, match=r"cats.tsv:3: bad trainId 'x'"):
        read_names_file(tsv)
    lem.write_text("n01440764 tench\n")
    with pytest.raises(ValueError, match=r"lemmas.txt:1"):
        read_synset_lemmas(lem)
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        read_names_file(tmp_path / "missing.txt")
    v = Vocabulary()
    with pytest.raises(ValueError, match="2 names but 1 wnid entries"):
        v.add_source("s", [["a"], ["b"]], wnids=["n01440764"])


# ---- the tree (larvess/tree.py) ---------------------------------------------------------------
# entity > food > {pizza, dish > pizza (two parents)}, furniture > {seat > {chair > {armchair,
# swivel chair}, sofa}, table}, animal > dog > retriever > golden retriever
TREE = {
    "entity": [], "food": ["entity"], "dish": ["food"], "pizza": ["food", "dish"],
    "furniture": ["entity"], "seat": ["furniture"], "chair": ["seat"], "armchair": ["chair"],
    "swivel": ["chair"], "sofa": ["seat"], "table": ["furniture"], "animal": ["entity"],
    "dog": ["animal"], "retriever": ["dog"], "golden": ["retriever"],
}  # fmt: skip
W = {name: f"n{i:08d}" for i, name in enumerate(TREE, 1)}
SOURCES = [  # (name, classes [(names, synsets or None)], dataset?)
    ("coco", [(["food-other"], ["food"]), (["pizza"], ["pizza"]), (["furniture-other"],
              ["furniture"]), (["chair"], ["chair"]), (["sky-other"], []), (["dog"], ["dog"])], True),
    ("ade", [(["seat"], ["seat"]), (["chair"], ["chair"]), (["armchair"], ["armchair"]),
             (["sky"], []), (["table"], ["table"])], True),
    ("x", [(["office chair"], None)], True),  # in the tree only through the alias file
    ("in", [([n], [n]) for n in ("food", "pizza", "dish", "furniture", "seat", "chair",
                                 "armchair", "sofa", "animal", "dog", "retriever", "golden")], False),
]  # fmt: skip
ALIASES = [[W["swivel"], "office chair"]]


def _tree_vocab():
    from larvess.hierarchy import Hierarchy

    h = Hierarchy({W[k]: tuple(W[p] for p in ps) for k, ps in TREE.items()}, source="test-tree")
    v = Vocabulary(aliases=ALIASES)
    for src, classes, dataset in SOURCES:
        names = [c[0] for c in classes]
        wn = [None if s is None else [W[x] for x in s] for _, s in classes]
        if dataset:
            v.add_source(src, names, wn, has_masks=src == "coco")
        else:
            v.add_source(src, names, [w[0] for w in wn], by_synset=True)
    return v, h


def _naive_relations(v):
    """Dense [C, C] related / covering from the rule written out with plain sets."""
    children = {k: [c for c, ps in TREE.items() if k in ps] for k in TREE}

    def sub(k):
        return {k}.union(*(sub(c) for c in children[k]))

    def anc(k):
        return set().union(*({p} | anc(p) for p in TREE[k])) if TREE[k] else set()

    alias = {"office chair": "swivel"}
    members = [[] for _ in range(len(v))]  # per row: (source, dataset?, own synsets, others)
    for src, classes, dataset in SOURCES:
        own = [set(s or []) | ({alias[n[0]]} if n[0] in alias else set()) for n, s in classes]
        for i, r in enumerate(v.rows_of(src).tolist()):
            others = set().union(*(own[j] for j in range(len(own)) if j != i))
            members[r].append((src, dataset, own[i], others if dataset else set()))
    mean = []
    for r, m in enumerate(members):
        pos = set().union(*(o for _, _, o, _ in m))
        neg = set().union(*(x for _, _, _, x in m)) - pos
        rm = set()
        for s in pos:
            ex = [x for x in neg if x != s and x not in anc(s)]
            rm |= sub(s) - set().union(*(sub(x) for x in ex))
        mean.append(rm or {("row", r)})
    ds = [{src for src, d, _, _ in m if d} for m in members]
    c = len(v)
    rel = torch.zeros(c, c, dtype=torch.bool)
    cov = torch.zeros(c, c, dtype=torch.bool)
    for r in range(c):
        for q in range(c):
            if r != q and not ds[r] & ds[q]:
                rel[r, q] = bool(mean[r] & mean[q])
                cov[r, q] = mean[r] <= mean[q]
    return rel, cov


def _dense(sets, c):
    out = torch.zeros(c, c, dtype=torch.bool)
    for r in range(c):
        out[r, sets[r]] = True
    return out


def test_tree_relations_match_a_naive_reference():
    v, h = _tree_vocab()
    t = v.tree(hierarchy=h)
    rel, cov = _naive_relations(v)
    assert torch.equal(_dense(t.related, len(v)), rel)
    assert torch.equal(_dense(t.covering, len(v)), cov)
    assert t.related.offsets.shape == (len(v) + 1,) and t.related.ids.dtype == torch.long
    row = {name: v.match([[name]]).item() for name in ("pizza", "chair", "armchair", "sky")}
    row |= {n: v.rows_of("in")[i].item() for i, n in enumerate(
        ["food", "pizza", "dish", "furniture", "seat", "chair", "armchair", "sofa", "animal",
         "dog", "retriever", "golden"])}  # fmt: skip
    row["office"] = v.rows_of("x")[0].item()
    cover = lambda k: {v.names[q] for q in t.covering[row[k]].tolist()}  # noqa: E731
    # a golden retriever image also labels its ImageNet ancestors and COCO's dog
    assert cover("golden") == {"retriever", "dog", "animal"}
    # pizza: dish covers it (second parent), COCO food-other ("the rest of the food") does not
    assert cover("pizza") == {"dish"} and row["food"] not in t.related[row["pizza"]]
    # the merged chair row (COCO + ADE + synset) leaves ADE's armchair out
    assert v.names[row["chair"]] == "chair" and row["armchair"] not in t.related[row["chair"]]
    assert cover("office") == {"chair"}  # through the alias group's wnid
    # sofa: ADE's seat and COCO's furniture-other (no COCO sofa here) both take it; armchair
    # is neither's (each dataset's chair is below them) nor the merged chair row's
    assert cover("sofa") == {"seat", "furniture-other"} and cover("armchair") == set()
    assert t.related[row["sky"]].numel() == 0  # no synset: related to nothing
    # classes of one dataset stay each other's negatives
    coco = set(v.rows_of("coco").tolist())
    assert all(not set(t.related[r].tolist()) & (coco - {r}) for r in coco)


def test_tree_ancestors_parents_and_saved_parents(tmp_path):
    v, h = _tree_vocab()
    t = v.tree(hierarchy=h)
    rows_in = dict(zip([c[0][0] for c in SOURCES[3][1]], v.rows_of("in").tolist()))
    name = lambda rs: {v.names[r] for r in rs.tolist()}  # noqa: E731
    assert name(t.parents[rows_in["golden"]]) == {"retriever"}
    assert name(t.ancestors[rows_in["golden"]]) == {"retriever", "dog", "animal"}
    assert name(t.parents[rows_in["pizza"]]) == {"dish"}  # food is above dish
    assert name(t.parents[v.rows_of("x")[0].item()]) == {"chair"}
    assert rows_in["golden"] in t.descendants[rows_in["animal"]].tolist()
    # naive: descendants are the transpose of ancestors
    anc = _dense(t.ancestors, len(v))
    assert torch.equal(_dense(t.descendants, len(v)), anc.t())
    # vocab.json carries the parents (of the hierarchy the tree was asked with, the run's), and
    # loads without them
    v.save(tmp_path / "v.json")
    data = json.loads((tmp_path / "v.json").read_text())
    assert [e["parents"] for e in data["entries"]] == [t.parents[r].tolist() for r in range(len(v))]
    for e in data["entries"]:
        del e["parents"]
    (tmp_path / "old.json").write_text(json.dumps(data))
    assert Vocabulary.load(tmp_path / "old.json").names == v.names


def test_saved_parents_by_wordnet(tmp_path):
    v = Vocabulary()
    v.add_source("coco", [["dog"], ["mouse"]], [["n02084071"], ["n03793489"]], has_masks=True)
    v.add_source(
        "in", [["golden retriever"], ["mouse"]], ["n02099601", "n02330245"], by_synset=True
    )
    v.save(tmp_path / "v.json")
    parents = [e["parents"] for e in json.loads((tmp_path / "v.json").read_text())["entries"]]
    assert parents == [[], [], [0], []]  # the breed under COCO dog, the rodent under nothing
    assert Vocabulary.load(tmp_path / "v.json").tree().parents[2].tolist() == [0]


def test_tree_errors_name_the_file_and_value(tmp_path):
    from larvess.hierarchy import HYPERNYMS_FILE

    v = Vocabulary()
    v.add_source("in", [["nothing"]], ["n99999999"], by_synset=True)
    with pytest.raises(KeyError, match=rf"{HYPERNYMS_FILE}: n99999999 .*'nothing'"):
        v.tree()
    f = tmp_path / "aliases.txt"
    f.write_text("n02099601 | n02084071\n")  # golden retriever | dog: one row cannot be both
    w = Vocabulary(alias_file=f)
    w.add_source("coco", [["dog"]], [["n02084071"]])
    with pytest.raises(ValueError, match=rf"{f}: alias group .* n02099601 with its ancestor"):
        w.tree()


def test_curated_classes_never_name_merge_when_synsets_differ():
    v = Vocabulary()
    # COCO "cake": curated, no synset; ADE-847 "patty, cake": the patty synset
    v.add_source("coco", [["cake"], ["sky-other"]], [[], []], has_masks=True)
    rows = v.add_source("ade847", [["patty", "cake"], ["sky"]], [["n07663899"], []])
    assert rows.tolist() == [2, 1]  # patty its own row; both "no synset" skies merge
    assert v.entries[0].wnids == []
    # a class whose synsets are unknown (a user's --classes list) still matches by name
    assert v.match([["cake"], ["patty"]]).tolist() == [0, 2]
    assert v.add_source("user", [["cake"]]).tolist() == [0]


def test_one_datasets_classes_never_related_even_when_an_alias_overlaps_them():
    from larvess.hierarchy import Hierarchy

    h = Hierarchy({W[k]: tuple(W[p] for p in ps) for k, ps in TREE.items()}, source="test-tree")
    v = Vocabulary(aliases=[[W["chair"], "stool"]])  # a hand-made alias: ADE stool ~ chair
    v.add_source("ade", [["chair"], ["stool"], ["seat"]], [[W["chair"]], [], [W["seat"]]])
    v.add_source("in", [["chair"], ["armchair"]], [W["chair"], W["armchair"]], by_synset=True)
    t = v.tree(hierarchy=h)
    chair, stool, seat, armchair = range(4)  # ImageNet chair joins ADE chair by its synset
    assert v.rows_of("ade").tolist() == [chair, stool, seat]
    assert stool not in t.related[chair] and chair not in t.related[stool]  # same dataset
    assert set(t.related[armchair].tolist()) == {chair, stool}  # both mean the armchair too
    assert set(t.covering[armchair].tolist()) == {chair, stool}


def test_saved_parents_follow_the_runs_own_hierarchy(tmp_path):
    """A run with vocab.hierarchy_file (the toy world's made-up synsets) saves the parents of
    that table, not of the shipped WordNet table (where its wnids stand alone)."""
    v, h = _tree_vocab()
    v.save(tmp_path / "shipped.json")
    shipped = [e["parents"] for e in json.loads((tmp_path / "shipped.json").read_text())["entries"]]
    own = v.tree(h).parents
    v.save(tmp_path / "own.json")
    saved = [e["parents"] for e in json.loads((tmp_path / "own.json").read_text())["entries"]]
    assert saved == [own[r].tolist() for r in range(len(v))]
    assert any(saved) and not any(shipped)  # the test tree's wnids are not WordNet's
