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
