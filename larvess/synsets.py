"""Curated dataset class -> ImageNet-21K WordNet synset mappings (larvess/meta/wordnet_*.tsv).

Classes merge across sources by meaning, never by a name alone: COCO "mouse" is the computer
mouse (n03793489), not the rodent; ADE "fence" is the barrier, not a dealer in stolen property.
Each shipped file maps every class of one dataset (local class index 0..n-1) to the wnids of
timm's imagenet22k_synsets.txt that have the dataset's meaning of the class, or to none ("-").
The files are the reviewed output of scripts/make_wordnet_candidates.py; their "#" header says
how they were made. Format (tab-separated, one header line, then one line per class)::

    index   name            wnids                   definition
    60      dining table    n03201208,n04379964     a table at which meals are served
    64      mouse           n03793489               a hand-operated electronic device that ...
    114     ground-other    -                       no synset: ImageNet-21K's "ground, earth" is ...
"""

from __future__ import annotations

from collections.abc import Iterable
from importlib import resources
from pathlib import Path

from larvess.hierarchy import Hierarchy, shipped_hierarchy
from larvess.meta import META
from larvess.names import WNID, normalize_name, read_names_file, read_synset_lemmas

HEADER = "index\tname\twnids\tdefinition"
DATASETS = ("coco_stuff171", "ade150", "ade847")
_MAPPING = {
    "coco_stuff171": "wordnet_coco171.tsv",
    "ade150": "wordnet_ade150.tsv",
    "ade847": "wordnet_ade847.tsv",
}
_NAMES = {
    "coco_stuff171": "cocostuff_labels.txt",
    "ade150": "objectInfo150.txt",
    "ade847": "ade847_categories.tsv",
}
# the I124 / I585-style lists: the ImageNet-21K synsets of the ADE-150 / ADE-847 classes
SYNSET_LISTS = {"ade150": "i124_synsets.txt", "ade847": "i585_synsets.txt"}
# the same with every ImageNet-21K synset below a class's synsets (WordNet hypernyms)
TREE_SYNSET_LISTS = {"ade150": "i124_tree_synsets.txt", "ade847": "i585_tree_synsets.txt"}
LARVSEG_COVERED = {"ade150": (124, 150), "ade847": (585, 847)}  # classes covered / total (paper)


def _check_dataset(dataset: str) -> None:
    if dataset not in _MAPPING:
        raise KeyError(f"unknown dataset {dataset!r}; known: {', '.join(DATASETS)}")


def mapping_file(dataset: str) -> Path:
    _check_dataset(dataset)
    return META / _MAPPING[dataset]


def names_file(dataset: str) -> Path:
    _check_dataset(dataset)
    return META / _NAMES[dataset]


def timm_info_dir() -> Path:
    """timm's data/_info folder (synset lists, lemmas and definitions) of the installed timm."""
    return Path(str(resources.files("timm.data") / "_info"))


def read_synset_list(path: str | Path) -> list[str]:
    """One wnid per line (first field; blank and '#' lines skipped), e.g. a winter21 list."""
    out = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        if not WNID.match(fields[0]):
            raise ValueError(f"{path}:{n}: expected a wnid like n01440764, got {line!r}")
        out.append(fields[0])
    return out


def read_timm_synsets(info: str | Path | None = None) -> list[str]:
    """The 21,841 ImageNet-21K (fall11) wnids in timm's order."""
    return read_synset_list(Path(info or timm_info_dir()) / "imagenet22k_synsets.txt")


def read_timm_lemmas(info: str | Path | None = None) -> dict[str, list[str]]:
    return read_synset_lemmas(Path(info or timm_info_dir()) / "imagenet_synset_to_lemma.txt")


def read_timm_definitions(info: str | Path | None = None) -> dict[str, str]:
    path = Path(info or timm_info_dir()) / "imagenet_synset_to_definition.txt"
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        wnid, _, definition = line.partition("\t")
        if wnid.strip():
            out[wnid.strip()] = definition.strip()
    return out


def read_mapping(
    path: str | Path, allowed: set[str] | None = None
) -> list[tuple[int, str, list[str], str]]:
    """Rows (index, name, wnids, definition) of a mapping file, validated.

    Errors name the file and line: a wrong header, indices not 0, 1, 2, ..., a malformed or
    repeated wnid, a wnid mapped from two classes, an empty definition, a wnid not in `allowed`.
    """
    rows: list[tuple[int, str, list[str], str]] = []
    owner: dict[str, int] = {}
    header_seen = False
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        where = f"{path}:{n}"
        if not header_seen:
            if line != HEADER:
                raise ValueError(f"{where}: expected the header {HEADER!r}, got {line!r}")
            header_seen = True
            continue
        fields = line.split("\t")
        if len(fields) != 4:
            raise ValueError(f"{where}: expected 4 tab-separated fields, got {len(fields)}")
        idx, name, wn, definition = (f.strip() for f in fields)
        if idx != str(len(rows)):
            raise ValueError(f"{where}: index {idx!r}, expected {len(rows)}")
        if not name or not definition:
            raise ValueError(f"{where}: empty name or definition")
        wnids = [] if wn == "-" else [w.strip() for w in wn.split(",")]
        for w in wnids:
            if not WNID.match(w):
                raise ValueError(f"{where}: bad wnid {w!r} (expected n + 8 digits, or '-')")
            if allowed is not None and w not in allowed:
                raise ValueError(f"{where}: {w} is not an ImageNet-21K synset")
            if w in owner:
                raise ValueError(f"{where}: {w} is already mapped from class {owner[w]}")
            owner[w] = len(rows)
        rows.append((len(rows), name, wnids, definition))
    if not header_seen:
        raise ValueError(f"{path}: no header line {HEADER!r}")
    return rows


def load_class_synsets(dataset: str) -> list[list[str]]:
    """Per local class of `dataset` ("coco_stuff171", "ade150", "ade847") its wnids ([] = none)."""
    path = mapping_file(dataset)
    rows = read_mapping(path)
    names = read_names_file(names_file(dataset))
    if len(rows) != len(names):
        raise ValueError(f"{path}: {len(rows)} classes, but {names_file(dataset)} has {len(names)}")
    for (i, name, _, _), syn in zip(rows, names):
        if name != syn[0]:
            raise ValueError(f"{path}: class {i} is {name!r}, but the names file says {syn[0]!r}")
    return [wnids for _, _, wnids, _ in rows]


def imagenet_synset_lists(
    dataset: str,
    order: list[str] | None = None,
    available: Iterable[str] | None = None,
    tree: bool = False,
    hierarchy: Hierarchy | None = None,
) -> tuple[list[str], int]:
    """(the ImageNet-21K wnids of the dataset's classes, in `order`; how many classes have one).

    `order` defaults to timm's imagenet22k_synsets.txt; `available` restricts to the synsets
    that have images in a given release (e.g. a winter21 synset list). `tree`: a class also
    gathers every synset of `order` below its synsets in `hierarchy` (default: the shipped
    WordNet table), so ADE's "tree" takes its 992 kinds of tree, not one synset's images.
    """
    order = read_timm_synsets() if order is None else order
    keep = set(order) if available is None else set(order) & set(available)
    per_class = load_class_synsets(dataset)
    if tree:
        h = hierarchy or shipped_hierarchy()
        per_class = [sorted(set().union(*(h.subtree(w) for w in ws))) for ws in per_class]
    per_class = [[w for w in wnids if w in keep] for wnids in per_class]
    mapped = {w for wnids in per_class for w in wnids}
    return [w for w in order if w in mapped], sum(1 for wnids in per_class if wnids)


def read_available(path: str | Path) -> set[str]:
    """The synsets of a release: a synset list file, or a folder of nXXXXXXXX[.tar] entries."""
    path = Path(path)
    if path.is_dir():
        names = (p.name.split(".")[0] for p in path.iterdir())
        return {n for n in names if WNID.match(n)}
    return set(read_synset_list(path))


def write_synset_lists(
    out_dir: str | Path,
    available: set[str] | None = None,
    tree: bool = False,
    check: bool = False,
) -> tuple[list[str], list[str]]:
    """Write (or with `check` only compare) the I124 / I585-style lists in `out_dir`.

    Returns (one report line per list, the paths that differ from what would be written).
    """
    lines, stale = [], []
    for dataset, fname in (TREE_SYNSET_LISTS if tree else SYNSET_LISTS).items():
        wnids, covered = imagenet_synset_lists(dataset, available=available, tree=tree)
        paper, total = LARVSEG_COVERED[dataset]
        path = Path(out_dir) / fname
        text = "".join(w + "\n" for w in wnids)
        lines.append(
            f"{fname}: {len(wnids)} synsets covering {covered} of {total} {dataset} classes "
            f"(LarvSeg: {paper} of {total})"
        )
        if check:
            if not path.is_file() or path.read_text(encoding="utf-8") != text:
                stale.append(str(path))
        else:
            path.write_text(text, encoding="utf-8")
    return lines, stale


def larvseg_ade150_novel() -> list[str]:
    """LarvSeg's 87 novel ADE-150 classes (display names; meta/ade150_novel_larvseg.txt)."""
    path = META / "ade150_novel_larvseg.txt"
    known = {syn[0] for syn in read_names_file(names_file("ade150"))}
    lines = path.read_text(encoding="utf-8").splitlines()
    out = [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]
    bad = [n for n in out if n not in known]
    if bad or len(set(out)) != len(out):
        raise ValueError(f"{path}: unknown or repeated ADE-150 names: {bad or out}")
    return out


def synsets_for_class_list(class_names: list[list[str]]) -> list[list[str]] | None:
    """The shipped mapping of a class list that is one of DATASETS (display names compared
    after normalisation, in order), else None (no curated synsets for that list)."""
    keys = [normalize_name(syn[0]) for syn in class_names]
    for ds in DATASETS:
        names = read_names_file(names_file(ds))
        if len(names) == len(keys) and all(normalize_name(s[0]) == k for s, k in zip(names, keys)):
            return load_class_synsets(ds)
    return None
