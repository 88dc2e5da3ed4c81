"""Unified class vocabulary over the sources of a recipe.

Each row has a display name, synonyms, its WordNet ids (from a curated mapping or an ImageNet
synset), the sources it comes from and ``has_masks`` (some source gives it pixel masks: "base";
else "novel").

Two kinds of source: dataset classes (COCO-Stuff, ADE; names, plus the synsets of the shipped
curated mapping larvess/meta/wordnet_*.tsv) and synset classes (ImageNet, ``by_synset=True``).
Merging is by meaning: a synset class joins a row only through a shared WordNet id or a hand-made
alias group, never through a name (COCO "mouse" is the device, ImageNet's "mouse" the rodent);
rows made by synset classes are never matched by name either.

Matching a source class to an existing row (``add_source`` / ``match``), best first:
  0. the same synonym list as a dataset class already added (so re-matching is stable);
  1. a hand-made alias group (below) joins a key of the class and a key of the row;
  2. a shared WordNet id;
  3. display name = display name; 4. display name = a synonym (either way); 5. synonym = synonym
     (dataset classes only).
Names compare after ``normalize_name`` (larvess/names.py: lower case, '_' / '-' -> space,
trailing " other" / " stuff" / " merged" removed: "wall-other" ~ "wall"). Name matches (0, 3-5)
are refused when the synsets say the classes differ: both have synsets and share none, or both
come with a curated mapping (``wnids`` given) and only one has synsets (COCO "cake", curated
"no synset", never joins ADE-847's "patty, cake", the patty synset). A class whose synsets are
unknown (``wnids`` None, e.g. ``predict.py --classes dog``) is matched by name. Two classes of
one source never share a row; the assignment is greedy over all (rank, local id, row)
candidates, so "counter" takes COCO's "counter" before "buffet, counter, sideboard" does.

The tree (larvess/tree.py, ``Vocabulary.tree()``): every row's ancestor / descendant / parent
rows through its wnids in the WordNet hierarchy, and the rows covering / overlapping its meaning;
``save`` writes each entry's ``parents`` (row ids of its nearest ancestor rows).

Alias file (hand-made merges): plain text, one group per line, names (or WordNet ids) separated
by '|', '#' starts a comment::

    rug | carpet
    n04590129 | window-other

A .yaml / .yml file holds the same as a list of lists of strings.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from larvess.names import (  # noqa: F401  (re-exported)
    WNID,
    normalize_name,
    read_names_file,
    read_synset_lemmas,
)
from larvess.tree import VocabTree

if TYPE_CHECKING:
    from larvess.hierarchy import Hierarchy


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
    wnids: list[str] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    has_masks: bool = False
    by_synset: bool = False  # made by a synset-only source (ImageNet): never matched by name
    curated: bool = False  # some class of it came with a curated synset list (maybe empty)


def _as_wnid_lists(wnids, n: int, source: str) -> tuple[list[list[str]], list[bool]]:
    """(per class its wnids, per class whether they are known: None = unknown, [] = none)."""
    if wnids is None:
        return [[] for _ in range(n)], [False] * n
    wnids = list(wnids)
    if len(wnids) != n:
        raise ValueError(f"source {source!r}: {n} names but {len(wnids)} wnid entries")
    out = []
    for w in wnids:
        ws = [] if w is None else [w] if isinstance(w, str) else list(w)
        bad = [x for x in ws if not WNID.match(x)]
        if bad:
            raise ValueError(f"source {source!r}: {bad[0]!r} is not a WordNet id (nXXXXXXXX)")
        out.append(ws)
    return out, [w is not None for w in wnids]


class Vocabulary:
    """Rows of the unified class table; see the module docstring for the matching rules."""

    def __init__(
        self, alias_file: str | Path | None = None, aliases: list[list[str]] | None = None
    ) -> None:
        self.entries: list[Entry] = []
        self.aliases: list[list[str]] = list(aliases or [])
        self.alias_file = str(alias_file) if alias_file is not None else None  # for errors
        self._tree: VocabTree | None = None
        self._own_tree: VocabTree | None = None  # the last tree of a given hierarchy (a run's)
        if alias_file is not None:
            self.aliases += read_aliases(alias_file)
        self._alias: dict[str, str] = {}
        for gi, group in enumerate(self.aliases):
            for s in group:
                k = s if WNID.match(s) else normalize_name(s)
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

    def _keys(self, synonyms: list[str], wnids: list[str], by_synset: bool) -> list[str]:
        names = [normalize_name(s) for s in synonyms]
        if by_synset:  # a synset class reaches a name only through a hand-made alias group
            keys = [self._alias[k] for k in names if k in self._alias]
        else:
            keys = [self._alias.get(k, k) for k in names]
        keys += [self._alias[w] for w in wnids if w in self._alias]
        return list(dict.fromkeys(keys))

    def _index_row(self, r: int) -> None:
        e = self.entries[r]
        for k in self._keys(e.synonyms, e.wnids, e.by_synset):
            rows = self._key_rows.setdefault(k, [])
            if r not in rows:
                rows.append(r)
        for w in e.wnids:
            self._wnid_rows.setdefault(w, r)

    def _resolve(
        self,
        synonyms: list[list[str]],
        wnids: list[list[str]],
        known: list[bool],
        by_synset: bool,
    ) -> list[int]:
        """Row of each class or -1, each row used at most once (greedy by match rank)."""
        cands: list[tuple[int, int, int]] = []  # (rank, local id, row)
        for i, (syn, ws, kn) in enumerate(zip(synonyms, wnids, known)):
            exact = None if by_synset else self._exact.get(tuple(normalize_name(s) for s in syn))
            if exact is not None and _compatible(ws, kn, self.entries[exact]):
                cands.append((0, i, exact))
            for w in ws:
                if w in self._wnid_rows:
                    cands.append((2, i, self._wnid_rows[w]))
            for j, k in enumerate(self._keys(syn, ws, by_synset)):
                for r in self._key_rows.get(k, ()):
                    e = self.entries[r]
                    if k.startswith("alias:"):
                        cands.append((1, i, r))
                        continue
                    # names never join a synset-only row, nor two classes of different synsets
                    if e.by_synset or not _compatible(ws, kn, e):
                        continue
                    row_display = normalize_name(e.synonyms[0])
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
        wnids: list | None = None,
        has_masks: bool = False,
        by_synset: bool = False,
    ) -> torch.Tensor:
        """Add a source's classes; returns LongTensor [n] local id -> row (new rows appended).

        wnids: per class a WordNet id, a list of them (a curated mapping) or None.
        by_synset: the classes are synsets (ImageNet): they join a row only through a shared
        WordNet id or an alias group, never through a name.
        """
        if source in self._sources:
            raise ValueError(f"source {source!r} already added")
        for i, syn in enumerate(synonyms):
            if not syn or not all(isinstance(s, str) and s.strip() for s in syn):
                raise ValueError(f"source {source!r}: class {i} has no name: {syn!r}")
        wnids, known = _as_wnid_lists(wnids, len(synonyms), source)
        rows = self._resolve(synonyms, wnids, known, by_synset)
        self._tree = self._own_tree = None
        for i, (syn, ws) in enumerate(zip(synonyms, wnids)):
            if rows[i] < 0:
                self.entries.append(Entry(syn[0], list(syn), list(ws), by_synset=by_synset))
                rows[i] = len(self.entries) - 1
            e = self.entries[rows[i]]
            e.synonyms += [s for s in syn if s not in e.synonyms]
            e.wnids += [w for w in ws if w not in e.wnids]
            e.by_synset = e.by_synset and by_synset
            e.curated = e.curated or known[i]
            if source not in e.sources:
                e.sources.append(source)
            e.has_masks = e.has_masks or has_masks
            self._index_row(rows[i])
            if not by_synset:
                self._exact.setdefault(tuple(normalize_name(s) for s in syn), rows[i])
        self._sources[source] = {
            "rows": rows,
            "synonyms": [list(s) for s in synonyms],
            "wnids": wnids,
            "known": known,
            "has_masks": has_masks,
            "by_synset": by_synset,
        }
        return torch.tensor(rows, dtype=torch.long)

    def match(self, synonyms: list[list[str]], wnids: list | None = None) -> torch.Tensor:
        """LongTensor [n]: row of each class (a dataset's names, with their curated synsets if
        known), -1 where it is not in the vocabulary."""
        wnids, known = _as_wnid_lists(wnids, len(synonyms), "match")
        return torch.tensor(self._resolve(synonyms, wnids, known, False), dtype=torch.long)

    def tree(self, hierarchy: Hierarchy | None = None, strict: bool = True) -> VocabTree:
        """The rows' tree relations (larvess/tree.py): ``ancestors`` / ``descendants`` /
        ``parents`` by wnid, ``covering`` / ``related`` by meaning, each a CSR ``RowSets``.

        hierarchy: default the shipped WordNet 3.0 table (cached with it until a source is
        added); a given one (a run's ``vocab.hierarchy_file``) is also what ``save`` takes the
        saved ``parents`` from. strict: a wnid missing from the hierarchy or an alias group
        joining a synset with its own ancestor is an error naming the file and the value.
        """
        if hierarchy is not None:
            self._own_tree = VocabTree(self, hierarchy, strict)
            return self._own_tree
        if self._tree is None or self._tree.strict != strict:
            self._tree = VocabTree(self, strict=strict)
        return self._tree

    def is_base(self, rows: torch.Tensor) -> torch.Tensor:
        """BoolTensor like rows: True where the row has pixel masks in training (-1 -> False)."""
        rows = torch.as_tensor(rows, dtype=torch.long)
        has = torch.tensor([e.has_masks for e in self.entries] + [False], dtype=torch.bool)
        if rows.numel() and int(rows.max()) >= len(self):
            raise IndexError(f"row {int(rows.max())} out of range for {len(self)} rows")
        return has[torch.where(rows < 0, len(self), rows)]

    def save(self, path: str | Path) -> None:
        # nearest ancestor rows by the run's hierarchy when one was given (vocab.hierarchy_file),
        # else the shipped WordNet table, where a wnid it lacks stands alone rather than failing
        parents = (self._own_tree or self.tree(strict=False)).parents
        data = {
            "version": 2,
            "aliases": self.aliases,
            "entries": [
                asdict(e) | {"parents": parents[r].tolist()} for r, e in enumerate(self.entries)
            ],
            "sources": self._sources,
        }
        Path(path).write_text(json.dumps(data, indent=1), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> Vocabulary:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        version = data.get("version")
        if version not in (1, 2):
            raise ValueError(f"{path}: unknown vocabulary version {version!r}")
        v = cls(aliases=data["aliases"])
        for e in data["entries"]:
            if version == 1:  # one optional wnid per row
                w = e.pop("wnid", None)
                e["wnids"] = [w] if w else []
            e.pop("parents", None)  # derived from the wnids (older files have none)
            v.entries.append(Entry(**e))
        v._sources = data["sources"]
        for r in range(len(v.entries)):
            v._index_row(r)
        for src in v._sources.values():
            if src.get("by_synset"):
                continue
            for syn, r in zip(src["synonyms"], src["rows"]):
                v._exact.setdefault(tuple(normalize_name(s) for s in syn), r)
        return v


def _compatible(wnids: list[str], known: bool, row: Entry) -> bool:
    """May a name join a class to `row`? Not when their synsets say they differ: both have
    synsets and none in common, or both are curated and only one of them has synsets."""
    if wnids and row.wnids:
        return bool(set(wnids) & set(row.wnids))
    if known and row.curated:
        return not wnids and not row.wnids
    return True
