"""The vocabulary as a tree: each row's place in the WordNet hierarchy and its meaning.

Rows join the hierarchy (larvess/hierarchy.py) through their wnids: a dataset class through its
curated synsets, an ImageNet class through its synset, and any class through the wnids of the
alias groups that name it. Two views:

- **by wnid** (``ancestors`` / ``descendants`` / ``parents``): row q is an ancestor of row r when
  one of q's wnids is above one of r's; ``parents`` are r's nearest ancestor rows.
- **by meaning** (``covering`` / ``related``): each row means a set of synsets. An ImageNet
  synset means its whole subtree. A dataset class means its synsets' subtrees minus the subtrees
  of its own dataset's other classes there (the datasets are partitions: COCO food-other is "the
  rest of the food", pizza is not food-other). A merged row means the subtrees of all its
  synsets minus what any of its dataset classes leaves to a sibling class (COCO chair + ADE chair
  + the chair synset exclude ADE's armchair: an armchair image is not the merged chair row's). A
  row with no synset in the hierarchy means only itself. Then ``covering(r)``: the rows whose
  meaning contains r's (label expansion: an image of r is also an image of them);
  ``related(r)``: the rows whose meaning overlaps r's (never r's negatives). Two rows holding
  classes of one dataset source are never related (the dataset keeps its classes apart, even
  where WordNet's multiple inheritance lets two subtrees meet).

Relations are ``RowSets`` (CSR: offsets [C+1] + ids [nnz], LongTensors; r itself excluded),
never a dense [C, C] matrix: at 21K rows the related sets hold ~10 rows on average but thousands
for "animal". The overlap counts come from one sparse product of the [C, synsets] meaning matrix
with its transpose.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

import torch

from larvess.hierarchy import Hierarchy, shipped_hierarchy
from larvess.names import WNID, normalize_name

if TYPE_CHECKING:
    from larvess.vocab import Vocabulary


@dataclass(frozen=True)
class RowSets:
    """One sorted set of rows per row, CSR: row r's set is ids[offsets[r] : offsets[r + 1]].

    offsets: LongTensor [C + 1]; ids: LongTensor [nnz].
    """

    offsets: torch.Tensor
    ids: torch.Tensor

    @classmethod
    def from_sets(cls, sets: list[set[int]]) -> RowSets:
        counts = torch.tensor([len(s) for s in sets], dtype=torch.long)
        offsets = torch.zeros(len(sets) + 1, dtype=torch.long)
        offsets[1:] = counts.cumsum(0)
        ids = [i for s in sets for i in sorted(s)]
        return cls(offsets, torch.tensor(ids, dtype=torch.long))

    @classmethod
    def from_pairs(cls, rows: torch.Tensor, cols: torch.Tensor, n: int) -> RowSets:
        """From (row, member) pairs [nnz] each (any order, no repeats)."""
        order = torch.argsort(rows * n + cols)
        rows, cols = rows[order], cols[order]
        offsets = torch.zeros(n + 1, dtype=torch.long)
        offsets[1:] = torch.bincount(rows, minlength=n).cumsum(0)
        return cls(offsets, cols)

    def __len__(self) -> int:
        return self.offsets.numel() - 1

    def __getitem__(self, row: int) -> torch.Tensor:
        """LongTensor [k]: the set of `row`, sorted."""
        return self.ids[self.offsets[row] : self.offsets[row + 1]]

    def counts(self) -> torch.Tensor:
        """LongTensor [C]: the size of each row's set."""
        return self.offsets[1:] - self.offsets[:-1]

    def to_sets(self) -> list[set[int]]:
        return [set(self[r].tolist()) for r in range(len(self))]


class VocabTree:
    """The tree relations of a Vocabulary's rows (see the module docstring); computed on first use.

    strict: every wnid of the vocabulary must be in `hierarchy` (KeyError naming the table's file,
    the wnid and its row), and no alias group may join a synset with one of its own ancestors
    (ValueError naming the alias file and the group). Not strict: unknown wnids stand alone,
    as roots (what ``Vocabulary.save`` uses for the ``parents`` it writes, so a toy vocabulary of
    made-up wnids still saves).
    """

    def __init__(
        self, vocab: Vocabulary, hierarchy: Hierarchy | None = None, strict: bool = True
    ) -> None:
        self.vocab = vocab
        self.strict = strict
        h = hierarchy if hierarchy is not None else shipped_hierarchy()
        self.n_rows = len(vocab)
        self.members = _members(vocab)  # per row: [(source, local id, tree wnids, is dataset)]
        wnids = [sorted({w for _, _, ws, _ in m for w in ws}) for m in self.members]
        unknown = [(r, w) for r, ws in enumerate(wnids) for w in ws if w not in h]
        if unknown and strict:
            r, w = unknown[0]
            raise KeyError(
                f"{h.source}: {w} (of row {r} {vocab.entries[r].name!r}) is not in the hierarchy"
            )
        if unknown:
            extra = {w: () for _, w in unknown}
            h = Hierarchy({**h.parents, **extra}, source=h.source)
        if strict:
            _check_aliases(vocab, h)
        self.hierarchy = h
        self.wnids: list[list[str]] = wnids  # per row: its wnids in the hierarchy

    # ---- by wnid -------------------------------------------------------------------------
    @cached_property
    def _ancestor_sets(self) -> list[set[int]]:
        by_wnid: dict[str, list[int]] = {}
        for r, ws in enumerate(self.wnids):
            for w in ws:
                by_wnid.setdefault(w, []).append(r)
        out = []
        for r, ws in enumerate(self.wnids):
            above = set().union(*(self.hierarchy.ancestors(w) for w in ws)) if ws else set()
            out.append({q for a in above for q in by_wnid.get(a, ()) if q != r})
        return out

    @cached_property
    def ancestors(self) -> RowSets:
        """Per row, the rows with a wnid above one of its wnids."""
        return RowSets.from_sets(self._ancestor_sets)

    @cached_property
    def descendants(self) -> RowSets:
        """Per row, the rows with a wnid below one of its wnids."""
        below: list[set[int]] = [set() for _ in range(self.n_rows)]
        for r, anc in enumerate(self._ancestor_sets):
            for q in anc:
                below[q].add(r)
        return RowSets.from_sets(below)

    @cached_property
    def parents(self) -> RowSets:
        """Per row, its nearest ancestor rows: no other ancestor row of it lies below them."""
        anc = self._ancestor_sets
        out = []
        for r, a in enumerate(anc):
            farther = set().union(*(anc[q] for q in a)) if a else set()
            out.append(a - farther - {r})
        return RowSets.from_sets(out)

    # ---- by meaning ------------------------------------------------------------------------
    @cached_property
    def meanings(self) -> list[set[str]]:
        """Per row, the synsets it means (a row without synsets: {'row:<r>'}, itself only)."""
        h = self.hierarchy
        classes: dict[str, list[set[str]]] = {}  # dataset source -> per class its tree wnids
        for m in self.members:
            for src, i, ws, is_dataset in m:
                if is_dataset:
                    n = len(self.vocab._sources[src]["rows"])
                    classes.setdefault(src, [set() for _ in range(n)])[i] = set(ws)
        union = {src: set().union(*cs) for src, cs in classes.items()}
        sub: dict[str, set[str]] = {}

        def subtree(w: str) -> set[str]:
            if w not in sub:
                sub[w] = h.subtree(w)
            return sub[w]

        out = []
        for r, m in enumerate(self.members):
            own = set(self.wnids[r])
            # the synsets of the other classes of each dataset this row holds a class of
            others = set()
            for src, i, _, is_dataset in m:
                if is_dataset:
                    others |= union[src] - classes[src][i]
            others -= own
            mean: set[str] = set()
            for s in own:
                above = h.ancestors(s) | {s}
                excl = [x for x in others if x not in above]  # a class above s never takes s
                if not excl:
                    mean |= subtree(s)
                    continue
                excl_set = set(excl)
                # a node is another class's when one of those classes' synsets is at or above it
                mean |= {
                    n for n in subtree(s) if n not in excl_set and not (h.ancestors(n) & excl_set)
                }
            out.append(mean or {f"row:{r}"})
        return out

    @cached_property
    def _overlaps(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(rows [P], cols [P], shared synsets [P]) for every overlapping pair r != q."""
        cols: dict[str, int] = {}
        ri, ci = [], []
        for r, mean in enumerate(self.meanings):
            for n in mean:
                ri.append(r)
                ci.append(cols.setdefault(n, len(cols)))
        c = self.n_rows
        idx = torch.tensor([ri, ci], dtype=torch.long).reshape(2, -1)
        shape = (c, max(1, len(cols)))
        a = torch.sparse_coo_tensor(idx, torch.ones(idx.shape[1]), shape, check_invariants=False)
        with warnings.catch_warnings():  # torch's "sparse CSR is in beta" notice, every call
            warnings.simplefilter("ignore", UserWarning)
            prod = torch.sparse.mm(a.coalesce(), a.t().coalesce()).coalesce()  # [C, C] sparse
        (rows, qs), val = prod.indices(), prod.values().round().long()
        keep = rows != qs
        keep &= ~self._same_dataset(rows, qs)
        return rows[keep], qs[keep], val[keep]

    def _same_dataset(self, rows: torch.Tensor, qs: torch.Tensor) -> torch.Tensor:
        """BoolTensor [P]: the two rows hold classes of one dataset source."""
        srcs = sorted({s for m in self.members for s, _, _, d in m if d})
        if not srcs:
            return torch.zeros_like(rows, dtype=torch.bool)
        member = torch.zeros(self.n_rows, len(srcs), dtype=torch.bool)  # [C, S], S sources
        k = {s: j for j, s in enumerate(srcs)}
        for r, m in enumerate(self.members):
            for s, _, _, d in m:
                if d:
                    member[r, k[s]] = True
        return (member[rows] & member[qs]).any(1)

    @cached_property
    def related(self) -> RowSets:
        """Per row, the rows whose meaning overlaps its own: never its negatives."""
        rows, qs, _ = self._overlaps
        return RowSets.from_pairs(rows, qs, self.n_rows)

    @cached_property
    def covering(self) -> RowSets:
        """Per row, the rows whose meaning contains its own (its label's extra labels)."""
        rows, qs, shared = self._overlaps
        size = torch.tensor([len(m) for m in self.meanings], dtype=torch.long)
        inside = shared == size[rows]
        return RowSets.from_pairs(rows[inside], qs[inside], self.n_rows)


def _members(vocab: Vocabulary) -> list[list[tuple[str, int, list[str], bool]]]:
    """Per row, its source classes: (source, local id, wnids incl. alias wnids, is dataset)."""
    groups = [[w for w in g if WNID.match(w)] for g in vocab.aliases]
    out: list[list[tuple[str, int, list[str], bool]]] = [[] for _ in range(len(vocab))]
    for src, info in vocab._sources.items():
        wnids = info.get("wnids") or [[] for _ in info["rows"]]  # version-1 files: none
        for i, (r, syn, ws) in enumerate(zip(info["rows"], info["synonyms"], wnids)):
            keys = {normalize_name(s) for s in syn} | set(ws)
            tagged = {vocab._alias[k] for k in keys if k in vocab._alias}
            extra = [w for t in tagged for w in groups[int(t.split(":")[1])]]
            tree_wnids = list(dict.fromkeys(list(ws) + extra))
            out[r].append((src, i, tree_wnids, not info.get("by_synset", False)))
    return out


def _check_aliases(vocab: Vocabulary, h: Hierarchy) -> None:
    where = getattr(vocab, "alias_file", None) or "aliases"
    for g in vocab.aliases:
        ws = [w for w in g if WNID.match(w)]
        for a in ws:
            if a not in h:
                raise KeyError(f"{where}: alias group {g}: {a} is not in {h.source}")
            for b in ws:
                if b in h.ancestors(a):
                    raise ValueError(
                        f"{where}: alias group {g} joins {a} with its ancestor {b} "
                        f"({h.source}): one row cannot be both"
                    )
