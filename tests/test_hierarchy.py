"""The shipped WordNet hierarchy (larvess/meta/wordnet_hypernyms.tsv) and its generator."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from larvess.hierarchy import (
    ENTITY,
    HYPERNYMS_FILE,
    Hierarchy,
    build_table,
    close_upward,
    parse_data_noun,
    read_hypernyms,
    shipped_hierarchy,
    table_stats,
    write_hypernyms,
)
from larvess.synsets import read_synset_list, timm_info_dir

ROOT = Path(__file__).resolve().parents[1]

# a tiny WordNet in data.noun's format: entity > object > {animal > dog > retriever, device >
# mouse (the device)}, animal > rodent > mouse (the rodent); Rex is an instance of dog; pointers
# of other kinds (~ hyponym, + derivation, a verb target) must be ignored
DATA_NOUN = """\
  1 This software and database is being provided to you, the LICENSEE, by
  2 Princeton University under the following license.
00001740 03 n 01 entity 0 001 ~ 00002684 n 0000 | that which is perceived
00002684 03 n 02 object 0 physical_object 0 002 @ 00001740 n 0000 ~ 00015388 n 0000 | a thing
00015388 05 n 01 animal 0 002 @ 00002684 n 0000 + 01234567 v 0101 | a living organism
02084071 05 n 02 dog 0 domestic_dog 0 001 @ 00015388 n 0000 | a member of the genus Canis
02099601 05 n 01 golden_retriever 0 001 @ 02084071 n 0000 | an English breed
02329401 05 n 01 rodent 0 001 @ 00015388 n 0000 | relatively small placental mammals
02330245 05 n 01 mouse 0 001 @ 02329401 n 0000 | any of numerous small rodents
03183080 06 n 01 device 0 001 @ 00002684 n 0000 | an instrumentality
03793489 06 n 02 mouse 0 computer_mouse 0 001 @ 03183080 n 0000 | a hand-operated device
10000001 18 n 01 Rex 0 002 @i 02084071 n 0000 @ 03183080 v 0000 | a famous dog
10000002 18 n 01 orphan 0 000 | a synset nobody lists
"""


def _fixture(tmp_path: Path) -> Path:
    d = tmp_path / "wordnet"
    d.mkdir()
    (d / "data.noun").write_text(DATA_NOUN)
    return d


def test_parse_data_noun_takes_hypernym_and_instance_pointers(tmp_path):
    parents = parse_data_noun(_fixture(tmp_path))
    assert parents["n00001740"] == []
    assert parents["n02099601"] == ["n02084071"]
    assert parents["n10000001"] == ["n02084071"]  # @i kept, the verb-target @ ignored
    assert parents["n00015388"] == ["n00002684"]  # '+' derivation ignored
    assert len(parents) == 11


def test_generator_script_on_a_fixture(tmp_path):
    wn = _fixture(tmp_path)
    synsets = tmp_path / "synsets.txt"
    synsets.write_text("n02099601\nn03793489\nn10000001\n")
    out = tmp_path / "table.tsv"
    cmd = [sys.executable, str(ROOT / "scripts/make_wordnet_hypernyms.py"), "--wordnet", str(wn)]
    cmd += ["--synsets", str(synsets), "--out", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    table = read_hypernyms(out)
    # closed upward: the listed synsets and everything above them, nothing else
    want = {"n02099601", "n03793489", "n10000001", "n02084071", "n00015388", "n03183080"}
    assert set(table) == want | {"n00002684", ENTITY}
    assert table["n10000001"] == ("n02084071",) and table[ENTITY] == ()
    comments = [ln for ln in out.read_text().splitlines() if ln.startswith("#")]
    assert any("WordNet 3.0" in c for c in comments) and any(
        "11 noun synsets" in c for c in comments
    )
    # the same table through the package functions
    parents, _ = build_table(wn, read_synset_list(synsets), "synsets.txt")
    assert {w: tuple(p) for w, p in parents.items()} == table


def test_table_stats_against_a_naive_count(tmp_path):
    h = Hierarchy(read_hypernyms_from(parse_data_noun(_fixture(tmp_path)), tmp_path))
    listed = ["n00015388", "n02084071", "n02099601", "n10000001", "n03793489"]
    stats = table_stats(h, listed)

    def above(w):  # naive: walk every path up
        out, todo = set(), list(h.parents[w])
        while todo:
            p = todo.pop()
            out.add(p)
            todo += h.parents[p]
        return out

    counts = {w: len(above(w) & set(listed)) for w in listed}
    nested = [c for c in counts.values() if c]
    assert stats["with a listed ancestor"] == len(nested) == 3
    assert stats["max listed ancestors"] == max(counts.values()) == 2
    assert stats["mean listed ancestors"] == round(sum(nested) / len(nested), 2)
    assert stats["ancestors of others"] == 2  # animal, dog


def read_hypernyms_from(parents: dict[str, list[str]], tmp_path: Path) -> dict:
    path = tmp_path / "t.tsv"
    write_hypernyms(path, parents, ["test"])
    return read_hypernyms(path)


def test_shipped_table_chains():
    h = shipped_hierarchy()
    dog, rodent = "n02084071", "n02329401"
    assert dog in h.ancestors("n02099601")  # golden retriever is a dog
    assert "n02099029" in h.ancestors("n02099601")  # ... a retriever on the way
    assert rodent not in h.ancestors("n03793489")  # the computer mouse is no rodent
    assert rodent in h.ancestors("n02330245")  # the rodent mouse is
    assert "n02099601" in h.descendants(dog) and "n03793489" not in h.descendants(rodent)
    assert h.depth(ENTITY) == 0 and h.depth("n02099601") == h.depth(dog) + 4 == 17


def test_shipped_table_covers_imagenet21k_and_closes_to_entity():
    h = shipped_hierarchy()
    goog = read_synset_list(timm_info_dir() / "imagenet21k_goog_synsets.txt")
    assert len(goog) == 21843 and all(w in h for w in goog)
    assert [w for w, p in h.parents.items() if not p] == [ENTITY]
    assert all(ENTITY in h.ancestors(w) for w in h.parents if w != ENTITY)
    # closed upward and no more: every line is a listed synset or above one
    above = set(goog).union(*(h.ancestors(w) for w in goog))
    assert above == set(h.parents)
    header = [ln for ln in HYPERNYMS_FILE.read_text().splitlines() if ln.startswith("#")]
    assert any("WordNet 3.0" in ln for ln in header)
    assert any(f"lines: {len(h)};" in ln for ln in header)


@pytest.mark.parametrize(
    "body, line, msg",
    [
        ("n00001740\t-\nn00002684 n00001740\n", 2, "expected 'wnid<TAB>hypernyms'"),
        ("n00001740\t-\nn0000268\tn00001740\n", 2, "bad wnid 'n0000268'"),
        ("n00001740\t-\nn00002684\tn00001740\nn00002684\t-\n", 3, "repeated"),
        ("n00001740\t-\nn00002684\tn00009999\n", 2, "hypernym n00009999 of n00002684 has no line"),
        ("n00001740\tn00001740\n", 1, "its own hypernym"),
    ],
)
def test_read_hypernyms_errors_name_file_and_line(tmp_path, body, line, msg):
    path = tmp_path / "h.tsv"
    path.write_text("# comment\n" + body)
    with pytest.raises(ValueError, match=msg) as err:
        read_hypernyms(path)
    assert f"{path}:{line + 1}" in str(err.value)


def test_cycle_and_unknown_wnid_errors(tmp_path):
    path = tmp_path / "h.tsv"
    path.write_text("n00000001\tn00000003\nn00000002\tn00000001\nn00000003\tn00000002\n")
    with pytest.raises(ValueError, match="cycle n0000000. -> .* -> n0000000") as err:
        read_hypernyms(path)
    assert str(path) in str(err.value)
    path.write_text("n00001740\t-\nn00002684\tn00001740\n")
    h = Hierarchy.load(path)
    with pytest.raises(KeyError, match=rf"{path}.*'n09999999' is not in the hierarchy"):
        h.ancestors("n09999999")
    with pytest.raises(KeyError, match="no noun synset n09999999"):
        close_upward({"n00001740": []}, ["n09999999"], source="data.noun")


def test_data_noun_errors(tmp_path):
    d = _fixture(tmp_path)
    (d / "data.noun").write_text(DATA_NOUN + "02084072 05 n 01 dog 0 003 @ 00015388 n | x\n")
    with pytest.raises(ValueError, match=r"data.noun:14: not a data.noun synset line"):
        parse_data_noun(d)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        parse_data_noun(tmp_path / "nowhere")
    (d / "data.noun").write_text(DATA_NOUN.replace("@ 00001740", "~ 00001740"))  # two roots
    with pytest.raises(ValueError, match="one root n00001740"):
        build_table(d, ["n02099601"], "list")
