"""Unified class vocabulary over the sources of a recipe.

Each row has a display name, synonyms, an optional WordNet id, the sources it comes from and
``has_masks`` (some source gives it pixel masks: "base"; else "novel").

Matching a source class to an existing row (``add_source`` / ``match``), best first:
  0. the same synonym list as a class already added (so re-matching a source is stable),
     unless both WordNet ids are known and differ;
  1. a hand-made alias group (below) joins a key of the class and a key of the row;
  2. equal WordNet ids;
  3. display name = display name; 4. display name = a synonym (either way); 5. synonym = synonym.
Names compare after ``normalize_name`` (lower case, '_' / '-' -> space, trailing
" other" / " stuff" / " merged" removed: "wall-other" ~ "wall"). Name matches (3-5) are refused
when both WordNet ids are known and differ. Two classes of one source never share a row; the
assignment is greedy over all (rank, local id, row) candidates, so "counter" takes COCO's
"counter" before "buffet, counter, sideboard" does.

Alias file (hand-made merges): plain text, one group per line, names (or WordNet ids) separated
by '|', '#' starts a comment::

    rug | carpet
    n04590129 | window-other

A .yaml / .yml file holds the same as a list of lists of strings.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

# labels.txt ids of the real COCO-Stuff file that never occur in the data (PNG value = id - 1)
COCO_STUFF_UNUSED_IDS = (12, 26, 29, 30, 45, 66, 68, 69, 71, 83, 91)
_SUFFIXES = (" other", " stuff", " merged")
_WNID = re.compile(r"^n\d{8}$")


def normalize_name(name: str) -> str:
    """Matching key of a name: lower case, '_' / '-' -> space, suffixes stripped."""
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
        if not sep or not _WNID.match(wnid) or not _split_synonyms(lemmas):
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


def read_aliases(path: str | Path) -> list[list[str]]:
    """Alias groups from a text ('a | b' per line) or YAML (list of lists) file."""
    path = Path(path)
    if path.suffix in (".yaml", ".yml"):
        import yaml

        groups = yaml.safe_load(path.read_text(encoding="utf-8")) or []
        if not isinstance(groups, list) or not all(
            isinstance(g, list) and all(isinstance(s, str) for s in g) for g in groups
        ):
            raise ValueError(f"{path}: expected a list of lists of names")
        return [list(g) for g in groups]
    groups = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        g = [s.strip() for s in line.split("|") if s.strip()]
        if len(g) < 2:
            raise ValueError(f"{path}:{n}: an alias group needs two or more names: {line!r}")
        groups.append(g)
    return groups


@dataclass
class Entry:
    """One vocabulary row."""

    name: str
    synonyms: list[str]
    wnid: str | None = None
    sources: list[str] = field(default_factory=list)
    has_masks: bool = False


class Vocabulary:
    """Rows of the unified class table; see the module docstring for the matching rules."""

    def __init__(
        self, alias_file: str | Path | None = None, aliases: list[list[str]] | None = None
    ) -> None:
        self.entries: list[Entry] = []
        self.aliases: list[list[str]] = list(aliases or [])
        if alias_file is not None:
            self.aliases += read_aliases(alias_file)
        self._alias: dict[str, str] = {}
        for gi, group in enumerate(self.aliases):
            for s in group:
                k = s if _WNID.match(s) else normalize_name(s)
                self._alias[k] = f"alias:{gi}"
        self._sources: dict[str, dict] = {}
        self._exact: dict[tuple[str, ...], int] = {}
        self._key_rows: dict[str, list[int]] = {}
        self._wnid_rows: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def names(self) -> list[str]:
        return [e.name for e in self.entries]

    @property
    def sources(self) -> list[str]:
        return list(self._sources)

    def rows_of(self, source: str) -> torch.Tensor:
        """LongTensor [n] local id -> row of a source already added."""
        if source not in self._sources:
            raise KeyError(f"unknown source {source!r}; known: {self.sources}")
        return torch.tensor(self._sources[source]["rows"], dtype=torch.long)

    def _keys(self, synonyms: list[str], wnid: str | None) -> list[str]:
        keys = [self._alias.get(normalize_name(s), normalize_name(s)) for s in synonyms]
        if wnid is not None and wnid in self._alias:
            keys.append(self._alias[wnid])
        return list(dict.fromkeys(keys))

    def _index_row(self, r: int, synonyms: list[str], wnid: str | None) -> None:
        for k in self._keys(synonyms, wnid):
            rows = self._key_rows.setdefault(k, [])
            if r not in rows:
                rows.append(r)
        if wnid is not None:
            self._wnid_rows.setdefault(wnid, r)

    def _resolve(self, synonyms: list[list[str]], wnids: list[str | None]) -> list[int]:
        """Row of each class or -1, each row used at most once (greedy by match rank)."""
        cands: list[tuple[int, int, int]] = []  # (rank, local id, row)
        for i, (syn, wnid) in enumerate(zip(synonyms, wnids)):
            exact = self._exact.get(tuple(normalize_name(s) for s in syn))
            if exact is not None and wnid in (None, self.entries[exact].wnid or wnid):
                cands.append((0, i, exact))
            if wnid is not None and wnid in self._wnid_rows:
                cands.append((2, i, self._wnid_rows[wnid]))
            keys = self._keys(syn, wnid)
            for j, k in enumerate(keys):
                for r in self._key_rows.get(k, ()):
                    e = self.entries[r]
                    if k.startswith("alias:"):
                        cands.append((1, i, r))
                        continue
                    if wnid is not None and e.wnid is not None and wnid != e.wnid:
                        continue
                    row_display = self._keys(e.synonyms[:1], None)[0]
                    rank = 5 - (j == 0) - (k == row_display)
                    cands.append((rank, i, r))
        out = [-1] * len(synonyms)
        used: set[int] = set()
        for _, i, r in sorted(cands):
            if out[i] < 0 and r not in used:
                out[i] = r
                used.add(r)
        return out

    def add_source(
        self,
        source: str,
        synonyms: list[list[str]],
        wnids: list[str | None] | None = None,
        has_masks: bool = False,
    ) -> torch.Tensor:
        """Add a source's classes; returns LongTensor [n] local id -> row (new rows appended)."""
        if source in self._sources:
            raise ValueError(f"source {source!r} already added")
        wnids = list(wnids) if wnids is not None else [None] * len(synonyms)
        if len(wnids) != len(synonyms):
            raise ValueError(f"source {source!r}: {len(synonyms)} names but {len(wnids)} wnids")
        for i, syn in enumerate(synonyms):
            if not syn or not all(isinstance(s, str) and s.strip() for s in syn):
                raise ValueError(f"source {source!r}: class {i} has no name: {syn!r}")
        rows = self._resolve(synonyms, wnids)
        for i, (syn, wnid) in enumerate(zip(synonyms, wnids)):
            if rows[i] < 0:
                self.entries.append(Entry(syn[0], list(syn), wnid))
                rows[i] = len(self.entries) - 1
            e = self.entries[rows[i]]
            e.synonyms += [s for s in syn if s not in e.synonyms]
            if e.wnid is None and wnid is not None:
                e.wnid = wnid
            if source not in e.sources:
                e.sources.append(source)
            e.has_masks = e.has_masks or has_masks
            self._index_row(rows[i], syn, wnid)
            self._exact.setdefault(tuple(normalize_name(s) for s in syn), rows[i])
        self._sources[source] = {
            "rows": rows,
            "synonyms": [list(s) for s in synonyms],
            "wnids": wnids,
            "has_masks": has_masks,
        }
        return torch.tensor(rows, dtype=torch.long)

    def match(
        self, synonyms: list[list[str]], wnids: list[str | None] | None = None
    ) -> torch.Tensor:
        """LongTensor [n]: row of each class, -1 where it is not in the vocabulary."""
        wnids = list(wnids) if wnids is not None else [None] * len(synonyms)
        return torch.tensor(self._resolve(synonyms, wnids), dtype=torch.long)

    def is_base(self, rows: torch.Tensor) -> torch.Tensor:
        """BoolTensor like rows: True where the row has pixel masks in training (-1 -> False)."""
        rows = torch.as_tensor(rows, dtype=torch.long)
        has = torch.tensor([e.has_masks for e in self.entries] + [False], dtype=torch.bool)
        if rows.numel() and int(rows.max()) >= len(self):
            raise IndexError(f"row {int(rows.max())} out of range for {len(self)} rows")
        return has[torch.where(rows < 0, len(self), rows)]

    def split(self, synonyms: list[list[str]]) -> tuple[torch.Tensor, torch.Tensor]:
        """For an evaluation set: (rows [n] with -1 = absent, base [n] bool)."""
        rows = self.match(synonyms)
        return rows, self.is_base(rows)

    def save(self, path: str | Path) -> None:
        data = {
            "version": 1,
            "aliases": self.aliases,
            "entries": [asdict(e) for e in self.entries],
            "sources": self._sources,
        }
        Path(path).write_text(json.dumps(data, indent=1), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> Vocabulary:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        if data.get("version") != 1:
            raise ValueError(f"{path}: unknown vocabulary version {data.get('version')!r}")
        v = cls(aliases=data["aliases"])
        v.entries = [Entry(**e) for e in data["entries"]]
        v._sources = data["sources"]
        for r, e in enumerate(v.entries):
            v._index_row(r, e.synonyms, e.wnid)
        for src in v._sources.values():
            for syn, r in zip(src["synonyms"], src["rows"]):
                v._exact.setdefault(tuple(normalize_name(s) for s in syn), r)
        return v
