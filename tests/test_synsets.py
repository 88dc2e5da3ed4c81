"""The curated class -> ImageNet-21K synset mappings (larvess/meta/wordnet_*.tsv) and lists."""

from __future__ import annotations

import pytest

from larvess.hierarchy import Hierarchy, shipped_hierarchy
from larvess.meta import META
from larvess.names import read_names_file
from larvess.synsets import (
    DATASETS,
    SYNSET_LISTS,
    TREE_SYNSET_LISTS,
    imagenet_synset_lists,
    larvseg_ade150_novel,
    load_class_synsets,
    mapping_file,
    names_file,
    read_mapping,
    read_synset_list,
    read_timm_definitions,
    read_timm_synsets,
    synsets_for_class_list,
    write_synset_lists,
)
from larvess.wordnet_candidates import class_candidates, lemma_index

SIZES = {"coco_stuff171": 171, "ade150": 150, "ade847": 847}

# senses a name match would merge but that are never the dataset's meaning
WRONG_SENSES = {
    "n10085101": "fence: a dealer in stolen property",
    "n04433377": "tie: tie beam",
    "n04433585": "tie: railroad tie",
    "n02330245": "mouse: the rodent",
    "n01608432": "kite: the hawk",
    "n02998563": "sink: cesspool",
    "n09435739": "sink: sinkhole",
    "n03366464": "floor: the legislative hall",
    "n03188531": "napkin: diaper",
    "n04966941": "straw: a colour",
    "n03384167": "fork: the farm tool",
    "n13914265": "fork: crotch of branches",
    "n03580615": "net: the internet",
    "n03462747": "ground, earth: the electrical ground",
    "n04597066": "wood: a golf club",
    "n04598582": "wood: a woodwind",
    "n14564779": "wall: a difficult situation",
    "n08659446": "field: an oil or gas field",
    "n00442115": "swimming pool: the act of swimming",
    "n09859684": "bleachers: a worker who bleaches",
    "n04446276": "toilet: the room",
}


@pytest.fixture(scope="module")
def timm_wnids() -> list[str]:
    return read_timm_synsets()


@pytest.fixture(scope="module")
def maps() -> dict[str, list[list[str]]]:
    return {ds: load_class_synsets(ds) for ds in DATASETS}


def _cls(dataset: str, name: str) -> int:
    names = [syn[0] for syn in read_names_file(names_file(dataset))]
    return names.index(name)


def test_one_line_per_class_in_order(maps):
    for ds in DATASETS:
        names = read_names_file(names_file(ds))
        rows = read_mapping(mapping_file(ds))
        assert len(maps[ds]) == len(rows) == len(names) == SIZES[ds]
        assert [r[0] for r in rows] == list(range(SIZES[ds]))
        assert [r[1] for r in rows] == [syn[0] for syn in names]


def test_wnids_are_imagenet21k_and_definitions_are_timms(timm_wnids):
    allowed, defs = set(timm_wnids), read_timm_definitions()
    for ds in DATASETS:
        for i, name, wnids, definition in read_mapping(mapping_file(ds), allowed=allowed):
            if wnids:
                assert definition == defs[wnids[0]], (ds, i, name)
            else:
                assert definition and definition[0] != "?", (ds, i, name)


def test_no_wnid_from_two_classes_of_one_dataset(maps):
    for ds, per_class in maps.items():
        flat = [w for wnids in per_class for w in wnids]
        assert len(flat) == len(set(flat)), ds
        assert all(len(w) == len(set(w)) for w in per_class)


def test_wrong_senses_are_mapped_nowhere(maps):
    for ds, per_class in maps.items():
        for i, wnids in enumerate(per_class):
            bad = [WRONG_SENSES[w] for w in wnids if w in WRONG_SENSES]
            assert not bad, (ds, i, bad)


@pytest.mark.parametrize(
    "name, want",
    [
        ("mouse", ["n03793489"]),  # computer mouse, not the rodent
        ("fence", ["n03327234"]),  # the barrier
        ("tie", ["n03815615"]),  # necktie
        ("kite", []),  # only the hawk is in ImageNet-21K, the toy is not
        ("sink", ["n04553703"]),  # washbasin
        ("floor-other", ["n03365592"]),  # flooring
        ("napkin", ["n03201895"]),  # dinner napkin
        ("fork", ["n04380255"]),  # table fork
        ("ground-other", []),  # ImageNet-21K's "ground" is electrical
        ("wood", []),  # golf club / woodwind only
        ("straw", []),  # a colour only
        ("tv", ["n04405907"]),
        ("cell phone", ["n02992529"]),
        ("dining table", ["n03201208", "n04379964"]),
        ("potted plant", ["n13083023"]),
        ("sports ball", ["n02778669"]),
        ("person", ["n00007846"]),
    ],
)
def test_coco_traps(maps, name, want):
    assert maps["coco_stuff171"][_cls("coco_stuff171", name)] == want


def test_coco_net_is_the_sports_net(maps):
    net = maps["coco_stuff171"][_cls("coco_stuff171", "net")]
    assert "n03820154" in net  # tennis / badminton net
    assert "n03580615" not in net and "n03819994" not in net  # internet, trap net


@pytest.mark.parametrize(
    "dataset, name, want",
    [
        ("ade150", "person", ["n00007846"]),
        ("ade150", "car", ["n02958343"]),
        ("ade150", "fence", ["n03327234"]),
        ("ade150", "earth", []),
        ("ade150", "field", ["n09393605"]),  # open land, not an oil field
        ("ade150", "wall", ["n04546855"]),
        ("ade847", "mouse", ["n03793489"]),
        ("ade847", "tie", ["n03815615"]),
        ("ade847", "fork", ["n04380255"]),
        ("ade847", "straw", []),
    ],
)
def test_ade_traps(maps, dataset, name, want):
    assert maps[dataset][_cls(dataset, name)] == want


def test_ade150_agrees_with_ade847_on_shared_classes(maps):
    a847 = {tuple(s): i for i, s in enumerate(read_names_file(names_file("ade847")))}
    for i, syn in enumerate(read_names_file(names_file("ade150"))):
        j = a847.get(tuple(syn))
        if j is not None and syn[0] != "bag":  # ADE-847 splits bags into three classes
            assert maps["ade150"][i] == maps["ade847"][j], syn[0]


def test_synset_lists_equal_the_regenerated_ones(timm_wnids):
    order = {w: k for k, w in enumerate(timm_wnids)}
    for ds, fname in SYNSET_LISTS.items():
        wnids, covered = imagenet_synset_lists(ds, order=timm_wnids)
        assert read_synset_list(META / fname) == wnids
        assert (META / fname).read_text() == "".join(w + "\n" for w in wnids)
        assert [order[w] for w in wnids] == sorted(order[w] for w in wnids)
        assert covered == sum(1 for w in load_class_synsets(ds) if w)
    for tree in (False, True):
        assert write_synset_lists(META, tree=tree, check=True)[1] == []


def test_tree_lists_gather_every_synset_below_a_class(timm_wnids):
    h = shipped_hierarchy()
    in21k = set(timm_wnids)
    for ds, fname in TREE_SYNSET_LISTS.items():
        tree = read_synset_list(META / fname)
        flat = set(read_synset_list(META / SYNSET_LISTS[ds]))
        assert flat <= set(tree) and len(tree) == len(set(tree))
        # naive reference: every listed synset is at or below a class synset, and every
        # ImageNet-21K synset below a class synset is listed
        own = {w for ws in load_class_synsets(ds) for w in ws}
        assert all(w in own or h.ancestors(w) & own for w in tree)
        below = {w for w in in21k if h.ancestors(w) & own}
        assert below | own == set(tree)
    tree_150 = set(read_synset_list(META / TREE_SYNSET_LISTS["ade150"]))
    assert "n02099601" in tree_150  # golden retriever, through ADE's dog
    assert "n03793489" not in tree_150  # the computer mouse is no ADE-150 class's kind


def test_tree_lists_with_a_small_hierarchy():
    # ADE-150 person (n00007846) with two kinds below it, one of them not in the release
    h = Hierarchy({"n00001740": (), "n00007846": ("n00001740",), "n10000001": ("n00007846",),
                   "n10000002": ("n00007846",)})  # fmt: skip
    h.parents.update({w: ("n00001740",) for ws in load_class_synsets("ade150") for w in ws
                      if w not in h.parents})  # fmt: skip
    h = Hierarchy(h.parents)
    order = ["n10000002", "n00007846", "n10000001", "n02958343"]
    wnids, covered = imagenet_synset_lists(
        "ade150", order=order, available=set(order) - {"n10000001"}, tree=True, hierarchy=h
    )
    assert wnids == ["n10000002", "n00007846", "n02958343"] and covered == 2


def test_synset_lists_restrict_to_available():
    wnids, covered = imagenet_synset_lists("ade150", available=["n00007846", "n02958343"])
    assert wnids == ["n00007846", "n02958343"] and covered == 2


def test_larvseg_split():
    novel = larvseg_ade150_novel()
    names = [s[0] for s in read_names_file(names_file("ade150"))]
    assert len(novel) == 87 and len(names) - len(novel) == 63
    assert {"sofa", "lamp", "plate"} <= set(novel) and not {"wall", "person"} & set(novel)


def test_synsets_for_class_list():
    coco = read_names_file(names_file("coco_stuff171"))
    assert synsets_for_class_list(coco) == load_class_synsets("coco_stuff171")
    stripped = [[s[0].replace("-other", "")] for s in coco]  # "wall-other" ~ "wall"
    assert synsets_for_class_list(stripped) == load_class_synsets("coco_stuff171")
    assert synsets_for_class_list([["wall"], ["sky"]]) is None
    with pytest.raises(KeyError, match="unknown dataset"):
        load_class_synsets("coco80")


HEADER = "index\tname\twnids\tdefinition\n"


@pytest.mark.parametrize(
    "body, line, msg",
    [
        ("# c\nindex\tname\n", 2, "header"),
        (HEADER + "0\ta\tn1234567\tdef\n", 2, "bad wnid"),
        (HEADER + "1\ta\t-\tno synset\n", 2, "index"),
        (HEADER + "0\ta\tn00007846\td\n1\tb\tn02958343,n00007846\td\n", 3, "already mapped"),
        (HEADER + "0\ta\tn00007846\n", 2, "4 tab-separated"),
        (HEADER + "0\ta\tn99999999\td\n", 2, "not an ImageNet-21K"),
        (HEADER + "0\ta\t-\t\n", 2, "empty"),
    ],
)
def test_read_mapping_errors_name_file_and_line(tmp_path, body, line, msg):
    path = tmp_path / "m.tsv"
    path.write_text(body)
    with pytest.raises(ValueError, match=msg) as err:
        read_mapping(path, allowed={"n00007846", "n02958343"})
    assert f"{path}:{line}" in str(err.value)


def test_candidate_generation_matches_normalised_names():
    lemmas = {
        "n04546855": ["wall"],
        "n03793489": ["mouse", "computer mouse"],
        "n02330245": ["mouse"],
        "n04228054": ["ski"],
        "n04592099": ["wineglass"],
        "n04405907": ["television receiver", "tv"],
        "n09999999": ["not allowed"],
    }
    index = lemma_index(lemmas, allowed=set(lemmas) - {"n09999999"})
    cand = lambda names: [w for _, w in class_candidates(names, index)]  # noqa: E731
    assert cand(["wall-other"]) == ["n04546855"]
    assert cand(["mouse"]) == ["n03793489", "n02330245"]  # both senses, for the reviewer
    assert cand(["skis"]) == ["n04228054"]
    assert cand(["wine glass"]) == ["n04592099"]
    assert cand(["tv"]) == ["n04405907"]
    assert cand(["not allowed"]) == []


@pytest.mark.parametrize(
    "dataset, name, want",
    [
        ("ade150", "stairs", ["n04314914"]),  # step, stair: the flights of steps
        ("ade150", "step", []),
        ("ade847", "stairs", ["n04314914"]),
        ("ade847", "step", []),
        ("coco_stuff171", "cat", ["n02121620", "n02121808"]),  # + domestic cat
        ("coco_stuff171", "laptop", ["n03642806", "n03832673"]),  # + notebook computer
        ("coco_stuff171", "carpet", ["n02904233"]),  # broadloom
        ("ade150", "ottoman", ["n03858418", "n03380724"]),  # + footstool
        ("ade847", "hanger", ["n03057920", "n03490884"]),
        ("ade847", "steel industry", ["n04311595"]),  # steel mill
        ("ade847", "star", ["n13881644"]),  # the plane figure
    ],
)
def test_audited_mappings(maps, dataset, name, want):
    assert maps[dataset][_cls(dataset, name)] == want


def test_audited_pipe_tube(maps):
    names = read_names_file(names_file("ade847"))
    i = names.index(["pipe", "tube"])
    assert maps["ade847"][i] == ["n13901321"]
    assert maps["ade847"][names.index(["pipe", "pipage", "piping"])] == []
