"""Names files: parsers for every class-name format the datasets ship.

Formats: ADE objectInfo150.txt (header "Idx", tab-separated, Name last), the ADE-847 table
(header with "trainId" and "name"), COCO-Stuff labels.txt ("N: name"), "wnid<TAB>lemma, ..."
lines (timm's imagenet_synset_to_lemma.txt), plain one class per line (synonyms after commas).
Each class is a list of names, display name first.
"""

from __future__ import annotations

import re
from pathlib import Path

# labels.txt ids of the real COCO-Stuff file that never occur in the data (PNG value = id - 1)
COCO_STUFF_UNUSED_IDS = (12, 26, 29, 30, 45, 66, 68, 69, 71, 83, 91)
WNID = re.compile(r"^n\d{8}$")  # a WordNet noun synset id: 'n' + the 8-digit offset
_SUFFIXES = (" other", " stuff", " merged")


def normalize_name(name: str) -> str:
    """Matching key of a class name, the one rule every name comparison uses: lower case,
    '_' / '-' -> space, runs of spaces collapsed, trailing " other" / " stuff" / " merged"
    removed repeatedly ("Wall-Other-Merged" -> "wall"; "other" alone stays)."""
    s = " ".join(name.lower().replace("_", " ").replace("-", " ").split())
    stripped = True
    while stripped:
        stripped = False
        for suf in _SUFFIXES:
            if s.endswith(suf) and len(s) > len(suf):
                s, stripped = s[: -len(suf)].rstrip(), True
    return s


def _split_synonyms(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def read_synset_lemmas(path: str | Path) -> dict[str, list[str]]:
    """Read "n01440764<TAB>tench, Tinca tinca" lines -> {wnid: [lemma, ...]} (file order)."""
    out: dict[str, list[str]] = {}
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        wnid, sep, lemmas = line.partition("\t")
        wnid = wnid.strip()
        if not sep or not WNID.match(wnid) or not _split_synonyms(lemmas):
            raise ValueError(f"{path}:{n}: expected 'wnid<TAB>lemma, ...', got {line!r}")
        out[wnid] = _split_synonyms(lemmas)
    return out


def read_coco_stuff_labels(path: str | Path) -> list[tuple[int, str]]:
    """Read a COCO-Stuff labels.txt ("N: name" per line) -> [(id, name), ...] incl. 0."""
    pairs = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        m = re.match(r"^\s*(\d+)\s*:\s*(.+?)\s*$", line)
        if not m:
            raise ValueError(f"{path}:{n}: expected 'id: name', got {line!r}")
        pairs.append((int(m.group(1)), m.group(2)))
    ids = [i for i, _ in pairs]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{path}: duplicate ids in labels file")
    return pairs


def coco_stuff_classes(pairs: list[tuple[int, str]]) -> tuple[list[int], list[str]]:
    """labels.txt (id, name) pairs -> (ids of the classes, names) in class order.

    The real 183-line file (ids 0..182) loses "0: unlabeled" and the 11 unused ids -> 171
    classes; any other file keeps every id except 0 "unlabeled".
    """
    ids = [i for i, _ in pairs]
    drop = {0} | (set(COCO_STUFF_UNUSED_IDS) if ids == list(range(183)) else set())
    kept = [(i, name) for i, name in pairs if i not in drop]
    return [i for i, _ in kept], [name for _, name in kept]


def read_names_file(path: str | Path) -> list[list[str]]:
    """Class names of a names file -> [[display name, synonym, ...], ...] in class order.

    Formats (autodetected): ADE objectInfo150.txt (header "Idx", tab-separated, Name last);
    ADE-847 tsv (header with "trainId" and "name"); COCO-Stuff labels.txt ("N: name");
    "wnid<TAB>lemma, ..." lines; plain one class per line (synonyms after commas).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"names file not found: {path}")
    lines = path.read_text(encoding="utf-8").splitlines()
    body = [(n, ln) for n, ln in enumerate(lines, 1) if ln.strip()]
    if not body:
        raise ValueError(f"{path}: empty names file")
    header = [f.strip() for f in body[0][1].split("\t")]
    if header[0] == "Idx":
        return _read_indexed_tsv(path, body, header, "Idx", "Name", first=1)
    if "trainId" in header:
        return _read_indexed_tsv(path, body, header, "trainId", "name", first=0)
    if re.match(r"^\s*\d+\s*:", body[0][1]):
        return [[name] for name in coco_stuff_classes(read_coco_stuff_labels(path))[1]]
    if re.match(r"^n\d{8}\t", body[0][1]):
        return list(read_synset_lemmas(path).values())
    out = []
    for n, ln in body:
        syn = _split_synonyms(ln)
        if not syn:
            raise ValueError(f"{path}:{n}: no name in {ln!r}")
        out.append(syn)
    return out


def _read_indexed_tsv(
    path: Path,
    body: list[tuple[int, str]],
    header: list[str],
    idx_col: str,
    name_col: str,
    first: int,
) -> list[list[str]]:
    if name_col not in header:
        raise ValueError(f"{path}:{body[0][0]}: header has no {name_col!r} column: {header}")
    i_idx, i_name = header.index(idx_col), header.index(name_col)
    out = []
    for n, ln in body[1:]:
        fields = ln.split("\t")
        if len(fields) <= max(i_idx, i_name):
            raise ValueError(f"{path}:{n}: expected {len(header)} tab-separated fields: {ln!r}")
        try:
            idx = int(fields[i_idx].strip())  # objectInfo150 has "8 " style fields
        except ValueError:
            raise ValueError(f"{path}:{n}: bad {idx_col} {fields[i_idx]!r}") from None
        if idx != first + len(out):
            raise ValueError(f"{path}:{n}: {idx_col} {idx}, expected {first + len(out)}")
        syn = _split_synonyms(fields[i_name])
        if not syn:
            raise ValueError(f"{path}:{n}: empty name")
        out.append(syn)
    return out
