"""Hierarchy roll-up at evaluation and prediction: a class scores as the best row inside it.

A 21K model trained on ImageNet breeds has a row per breed; ADE's "dog" has one row. Under the
plain LarvSeg protocol a dog pixel is scored only against the dog row. Under **roll-up** an
evaluated class c (vocabulary row r_c) scores, per pixel, as the max over its voting rows

    S_c = {r_c} u {r : r_c in covering(r)}        (the rows whose meaning lies inside c's)

and the pixel takes the argmax over the evaluated classes of those rolled-up scores. Meanings
come from larvess/tree.py, computed on the run's vocabulary **plus the evaluated classes as one
more dataset source** (``with_classes``): the evaluated dataset is a partition, so a residual
class (COCO food-other, ADE-847 structure) means "the rest" and never receives the rows inside
one of its sibling classes (pizza rows vote for pizza, never for food-other), even when the
evaluated dataset was no training source. Two evaluated classes never vote for each other (one
dataset's classes are never related, tree.py). A row inside two evaluated classes that do not
nest (WordNet's multiple inheritance) votes for both.

**Trained rows** (``trained_rows``): a row of some training source (vocab.json's ``sources``;
rows added only through ``vocab.extra_names``, source ``extra:*``, have none), and with
``loss.hierarchy: tree`` also every row covering a row of an image-level source (training
labelled it through label expansion). Only trained rows vote: an untrained row's random
embedding never takes a pixel, in either protocol. A class is **unreached** when it has no vote:
its own row is untrained and no trained row lies inside it. The plain protocol votes with the
own row only where it is trained.

Votes are pairs (``Votes``): rows [P] (vocabulary rows, a row may repeat) and classes [P] (the
class each pair votes for). The rolled-up scores of N pixels are a segment max: s = x @ mu[rows].T,
[N, P], then ``scatter_reduce`` amax into [N, K], -inf for a class without votes
(``rollup_scores``). Labelling needs less: the argmax over classes of max-over-votes is the class
of the best vote (max_c max_{r in S_c} s_r = max over all votes), so prediction is an argmax over
the M distinct voting rows relabelled by the class each votes for (``Votes.argmax_rows``; a row
voting for several classes takes the lowest, as argmax breaks ties): memory [N, M] per block of
inference.py's strips (or its kNN search when M is large), never [pixels, C] nor [N, K] scores,
and a class without votes is never predicted. At c171_i21k scale on ADE-150, 150 classes have
13,238 votes (animal 3,822, person 2,836, plant 2,181), so roll-up costs ~90x the plain scoring.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from larvess.hierarchy import Hierarchy, shipped_hierarchy
from larvess.tree import VocabTree
from larvess.vocab import Vocabulary

EXTRA_PREFIX = "extra:"  # build.build_data's source name for vocab.extra_names files
EVAL_SOURCE = "eval:classes"  # the evaluated classes, added as one dataset source


@dataclass(frozen=True)
class Votes:
    """Which vocabulary rows vote for which of K classes.

    rows: LongTensor [P] vocabulary rows; classes: LongTensor [P] in [0, K).
    """

    rows: Tensor
    classes: Tensor
    num_classes: int

    def reached(self) -> Tensor:
        """BoolTensor [K]: the class has at least one vote."""
        out = torch.zeros(self.num_classes, dtype=torch.bool)
        out[self.classes] = True
        return out

    def argmax_rows(self) -> tuple[Tensor, Tensor]:
        """(rows [M] distinct voting rows, sorted; label [M] the lowest class each votes for):
        the pixel's rolled-up class is the label of its best row among ``rows``. Votes without a
        repeated row come back as they are (the plain protocol keeps its class order)."""
        if torch.unique(self.rows).numel() == self.rows.numel():
            return self.rows, self.classes
        rows, inv = torch.unique(self.rows, return_inverse=True)
        label = torch.full((len(rows),), self.num_classes, dtype=torch.long)
        label = label.scatter_reduce(0, inv, self.classes, reduce="amin")
        return rows, label

    def rolls_up(self, own: Tensor) -> bool:
        """Some vote comes from a row other than the class's own row (own: LongTensor [K])."""
        return bool((self.rows != own[self.classes]).any())


def rollup_scores(scores: Tensor, classes: Tensor, num_classes: int) -> Tensor:
    """Segment max: scores [N, P] (one column per vote) -> [N, K], -inf for voteless classes."""
    out = scores.new_full((scores.shape[0], num_classes), float("-inf"))
    index = classes.to(scores.device).expand(scores.shape[0], -1)
    return out.scatter_reduce(1, index, scores, reduce="amax", include_self=True)


def trained_rows(vocab: Vocabulary, tree: VocabTree | None = None) -> Tensor:
    """BoolTensor [C]: rows some training source labels (see the module docstring).

    tree: the run's tree when it trained with ``loss.hierarchy: tree`` (rows covering an
    image-level source's row were labelled too); None for flat training.
    """
    out = torch.zeros(len(vocab), dtype=torch.bool)
    image_rows = []
    for name in vocab.sources:
        if name.startswith(EXTRA_PREFIX) or name == EVAL_SOURCE:
            continue
        rows = vocab.rows_of(name)
        out[rows] = True
        if not vocab._sources[name].get("has_masks"):
            image_rows.append(rows)
    if tree is not None and image_rows:
        cov = tree.covering
        for r in torch.cat(image_rows).unique().tolist():
            out[cov[r]] = True
    return out


def with_classes(
    vocab: Vocabulary, rows: Tensor, synonyms: list[list[str]], wnids: list | None
) -> Vocabulary:
    """A shallow copy of ``vocab`` with the evaluated classes as one more dataset source.

    rows [K]: their matched rows (``Vocabulary.match``); wnids: their curated synsets (None:
    unknown, then each class takes its row's wnids, so that the partition still applies).
    The entries are shared, not changed: only the tree reads the new source.
    """
    if wnids is None:
        wnids = [list(vocab.entries[r].wnids) for r in rows.tolist()]
    v = copy.copy(vocab)
    v._sources = dict(vocab._sources)
    v._sources[EVAL_SOURCE] = {
        "rows": rows.tolist(),
        "synonyms": [list(s) for s in synonyms],
        "wnids": [list(w) for w in wnids],
        "known": [True] * len(synonyms),
        "has_masks": False,
        "by_synset": False,
    }
    v._tree = None
    return v


def class_votes(tree: VocabTree, rows: Tensor, trained: Tensor) -> Votes:
    """Roll-up votes of K classes with rows [K] (the tree of ``with_classes``'s vocabulary):
    each trained row of S_c = {r_c} u {r : r_c in covering(r)} votes for c."""
    cov = tree.covering
    member = torch.repeat_interleave(torch.arange(len(cov)), cov.counts())  # [nnz] r
    k_of = torch.full((len(cov),), -1, dtype=torch.long)
    k_of[rows] = torch.arange(len(rows))
    cls = k_of[cov.ids]  # class of each covering row, -1 if none
    keep = (cls >= 0) & trained[member]
    own = trained[rows]
    vr = torch.cat([rows[own], member[keep]])
    vc = torch.cat([torch.arange(len(rows))[own], cls[keep]])
    return Votes(vr, vc, len(rows))


def plain_votes(rows: Tensor, trained: Tensor) -> Votes:
    """The plain protocol: each class votes with its own row, where that row is trained."""
    own = trained[rows]
    return Votes(rows[own], torch.arange(len(rows))[own], len(rows))


def top_level(tree: VocabTree, trained: Tensor) -> tuple[Tensor, Votes]:
    """The whole vocabulary rolled up to its top-level rows: (tops [K], votes).

    tops: the trained rows with no trained row covering them (sorted); each trained row votes
    for every top-level row covering it, a top-level row for itself.
    """
    cov = tree.covering
    member = torch.repeat_interleave(torch.arange(len(cov)), cov.counts())
    covered = torch.zeros(len(cov), dtype=torch.bool)
    covered[member[trained[cov.ids]]] = True
    is_top = trained & ~covered
    tops = torch.nonzero(is_top).flatten()
    k_of = torch.full((len(cov),), -1, dtype=torch.long)
    k_of[tops] = torch.arange(len(tops))
    keep = trained[member] & is_top[cov.ids]
    vr = torch.cat([tops, member[keep]])
    vc = torch.cat([torch.arange(len(tops)), k_of[cov.ids[keep]]])
    return tops, Votes(vr, vc, len(tops))


def run_tree(
    vocab: Vocabulary, hierarchy_file: str | None, where: str
) -> tuple[VocabTree, list[str]]:
    """The vocabulary's tree for roll-up, never failing on a toy vocabulary: (tree, notes).

    Non-strict (tree.py): a wnid the table lacks stands alone, as a root; notes say so.
    hierarchy_file: the run's ``vocab.hierarchy_file`` (None: the shipped WordNet table); a file
    that is missing here falls back to the shipped table, with a note naming ``where``.
    """
    notes = []
    h = None
    if hierarchy_file is not None:
        if Path(hierarchy_file).is_file():
            h = Hierarchy.load(hierarchy_file)
        else:
            notes.append(
                f"{where}: vocab.hierarchy_file {hierarchy_file} not found here; "
                "using the shipped WordNet table"
            )
    tree = VocabTree(vocab, h, strict=False)
    table = h if h is not None else shipped_hierarchy()
    unknown = sorted({w for ws in tree.wnids for w in ws if w not in table})
    if unknown:
        notes.append(
            f"{len(unknown)} wnids of the vocabulary are not in {table.source} "
            f"(e.g. {unknown[:3]}): they stand alone in the roll-up"
        )
    return tree, notes
