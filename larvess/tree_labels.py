"""The tree's training semantics (``loss.hierarchy: tree``) in one source's local ids.

The vocabulary's tree (tree.py) gives every row a meaning, a set of synsets, and two relations:
``covering(r)``, the rows whose meaning contains r's, and ``related(r)``, the rows whose meaning
overlaps r's. Training uses them so that no class is pushed away from its own ancestors and
coarse classes learn from every fine class below them:

- **label expansion**: an image label l (image-level sources) also labels every row covering l:
  an ImageNet golden retriever image is a dog, a canine, an animal image too. Each extra label
  is a pair of its own under the same other-labels-ignored CE, and feeds its CA ring.
- **negatives**: a row is a negative of a target only if their meanings are disjoint. The rows
  related to the target are barred from the pixel kNN CE, the image-level CE, the CA pooled CE
  and the CA background choice. One dataset's classes are never related (the dataset is a
  partition; tree.py), so mask training keeps its exclusivity.
- **CA background**: the other labels of an image that are related to l (its expansion) are not
  its background; a pair whose other labels are all related to l takes the single-label rule,
  among the rows unrelated to l.

Everything here runs on the host, on the labels as the readers give them (before they go to the
device), so the loss path gets plain index tensors and never asks the device for a value.
A source's rows grow by the rows covering them (``rows_with_covering``), so an expanded label is
always one of the source's rows, also under ``loss.negatives: source``.

Memory stays flat in C: the relations are CSR sets (tens of rows on average, thousands for
"animal"); per step only [pairs, R] masks exist (a few hundred pairs), and the pixel loss uses a
[T, R] mask over the T target classes of a mask source (171 for COCO), never [pixels, C].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from larvess.losses import LabelPairs, label_pairs
from larvess.tree import RowSets, VocabTree

__all__ = ["SourceTree", "rows_with_covering", "source_tree", "tree_pairs", "pixel_barred"]


@dataclass(frozen=True)
class SourceTree:
    """The tree restricted to one source's rows, in its local ids (host tensors).

    covering / related: RowSets over local ids (each row's set within the source's rows).
    """

    covering: RowSets
    related: RowSets

    def has_relations(self) -> bool:
        return self.related.ids.numel() > 0


def rows_with_covering(tree: VocabTree, rows: Tensor) -> Tensor:
    """LongTensor: ``rows`` (kept first, in order) then every row covering one of them."""
    own = rows.tolist()
    seen = set(own)
    extra = sorted({int(q) for r in own for q in tree.covering[r].tolist()} - seen)
    return torch.tensor(own + extra, dtype=torch.long)


def _restrict(sets: RowSets, rows: Tensor) -> RowSets:
    """The sets of ``rows`` (global) within ``rows``, as local ids."""
    local = {int(r): i for i, r in enumerate(rows.tolist())}
    out = []
    for r in rows.tolist():
        out.append({local[int(q)] for q in sets[r].tolist() if int(q) in local})
    return RowSets.from_sets(out)


def source_tree(tree: VocabTree, rows: Tensor) -> SourceTree:
    """The tree as the source with vocabulary rows ``rows`` [R] sees it."""
    return SourceTree(_restrict(tree.covering, rows), _restrict(tree.related, rows))


def tree_pairs(labels: list[Tensor], st: SourceTree) -> LabelPairs:
    """Host LabelPairs of B images' local labels, expanded up the tree.

    Each image's label set grows by every row covering one of its labels; each pair carries the
    rows related to its target (``LabelPairs.related``, COO: pair index, local row) and whether
    its image has another label unrelated to it (else it takes the single-label background
    rule: ``LabelPairs.single``).
    """
    expanded, related_p, related_r, single = [], [], [], []
    p = 0
    for L in labels:
        own = [int(x) for x in L.reshape(-1).tolist()]
        full = list(dict.fromkeys(own + sorted({int(q) for x in own for q in st.covering[x]})))
        expanded.append(torch.tensor(full, dtype=torch.long))
        for t in full:
            rel = st.related[t].tolist()
            related_p += [p] * len(rel)
            related_r += rel
            unrelated = set(full) - set(rel) - {t}
            single.append(not unrelated)
            p += 1
    pairs = label_pairs(expanded, "cpu")
    rel = (torch.tensor(related_p, dtype=torch.long), torch.tensor(related_r, dtype=torch.long))
    return LabelPairs(pairs.image, pairs.target, pairs.label_set, pairs.counts, rel, tuple(single))


def pixel_barred(st: SourceTree, targets: Tensor) -> tuple[Tensor, Tensor]:
    """For a mask source: (group [R+1] LongTensor, mask [T, R] BoolTensor).

    targets [T]: the local ids pixels can carry. mask[t, r] bars row r as a negative of target
    targets[t] (its related rows and itself); group maps a local id to its mask row (-1 for rows
    no pixel carries; the last entry serves the ignore label -1)."""
    R = len(st.related)
    group = torch.full((R + 1,), -1, dtype=torch.long)
    group[targets] = torch.arange(len(targets))
    mask = torch.zeros(len(targets), R, dtype=torch.bool)
    for i, t in enumerate(targets.tolist()):
        mask[i, st.related[t]] = True
        mask[i, t] = True
    return group, mask
