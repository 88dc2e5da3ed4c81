"""larvess/names.py: the one name normaliser and the wnid pattern every module uses."""

import pytest

from larvess import synsets, vocab, wordnet_candidates
from larvess.names import WNID, normalize_name


@pytest.mark.parametrize(
    "name, key",
    [
        ("Wall-Other", "wall"),
        ("grass-merged", "grass"),
        ("wall-other-merged", "wall"),  # suffixes stripped repeatedly
        ("traffic_light", "traffic light"),
        ("  Potted   Plant ", "potted plant"),
        ("other", "other"),  # a suffix alone is a name
        ("mirror-stuff", "mirror"),
    ],
)
def test_normalize_name(name, key):
    assert normalize_name(name) == key


def test_one_normaliser_everywhere():
    # the vocabulary, the mapping lookup and the candidate generator compare names one way
    assert vocab.normalize_name is normalize_name
    assert synsets.normalize_name is normalize_name
    assert wordnet_candidates.normalize_name is normalize_name
    coco = [["wall-other-merged"], ["sky-other-merged"]]
    index = wordnet_candidates.lemma_index({"n04546855": ["wall"]}, {"n04546855"})
    assert wordnet_candidates.class_candidates(coco[0], index) == [("name", "n04546855")]


def test_wnid_pattern():
    assert WNID.match("n02084071") and WNID.match("n00001740")
    for bad in ("n0208407", "n020840711", "02084071", "N02084071", "n0208407x", " n02084071"):
        assert not WNID.match(bad), bad
