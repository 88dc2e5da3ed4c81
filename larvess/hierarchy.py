"""The WordNet noun hierarchy under the vocabulary (larvess/meta/wordnet_hypernyms.tsv).

ImageNet-21K's synsets nest: a golden retriever (n02099601) is a retriever, a sporting dog, a dog
(n02084071), ..., an entity (n00001740). The shipped table holds, for every synset of timm's
imagenet21k_goog_synsets.txt and every WordNet 3.0 noun above one of them, its direct hypernyms
(WordNet's ``@`` and instance ``@i`` pointers; a synset can have several, so the hierarchy is a
DAG with one root, entity). Format: '#' comment lines (provenance), then one line per synset::

    n02099601<TAB>n02099029
    n00001740<TAB>-

``scripts/make_wordnet_hypernyms.py`` regenerates it from a WordNet 3.0 database folder
(``parse_data_noun``: Debian's wordnet-base /usr/share/wordnet, or NLTK's wordnet corpus);
nothing needs WordNet at run time. ``Hierarchy`` answers ancestors / descendants; a wnid absent
from the table, a cycle or a malformed line is an error naming the file and the value.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path

from larvess.meta import META
from larvess.names import WNID

ENTITY = "n00001740"  # WordNet's one noun root
HYPERNYMS_FILE = META / "wordnet_hypernyms.tsv"
_HYPERNYM_POINTERS = ("@", "@i")  # hypernym, instance hypernym


def parse_data_noun(path: str | Path) -> dict[str, list[str]]:
    """Every noun synset of a WordNet data.noun file -> its direct hypernyms (wnids, file order).

    Line format (WordNet's wndb(5)): ``offset lex_filenum ss_type w_cnt word lex_id ...
    p_cnt [pointer_symbol offset pos source/target]... | gloss``; w_cnt is hexadecimal, p_cnt
    decimal; lines starting with a space are the licence header. wnid = 'n' + offset.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "data.noun"
    if not path.is_file():
        raise FileNotFoundError(f"WordNet data.noun not found: {path}")
    out: dict[str, list[str]] = {}
    for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip() or line.startswith(" "):
            continue
        f = line.split(" | ", 1)[0].split()
        try:
            wnid = "n" + f[0]
            w_cnt = int(f[3], 16)
            k = 4 + 2 * w_cnt
            p_cnt = int(f[k])
            ptrs = f[k + 1 : k + 1 + 4 * p_cnt]
            if len(ptrs) != 4 * p_cnt or f[2] not in ("n", "s") or not WNID.match(wnid):
                raise ValueError
        except (IndexError, ValueError):
            raise ValueError(f"{path}:{n}: not a data.noun synset line: {line[:80]!r}") from None
        hyper = [
            "n" + ptrs[i + 1]
            for i in range(0, len(ptrs), 4)
            if ptrs[i] in _HYPERNYM_POINTERS and ptrs[i + 2] == "n"
        ]
        out[wnid] = list(dict.fromkeys(hyper))
    return out


def close_upward(
    parents: dict[str, list[str]], wnids: Iterable[str], source: str = "WordNet"
) -> dict[str, list[str]]:
    """The sub-table of `parents` holding `wnids` and every synset above them (sorted by wnid).

    Raises KeyError naming `source` and the first wnid (or hypernym) it does not have.
    """
    out: dict[str, list[str]] = {}
    stack = list(wnids)
    while stack:
        w = stack.pop()
        if w in out:
            continue
        if w not in parents:
            raise KeyError(f"{source}: no noun synset {w}")
        out[w] = list(parents[w])
        stack.extend(parents[w])
    return dict(sorted(out.items()))


def write_hypernyms(path: str | Path, parents: dict[str, list[str]], comments: list[str]) -> None:
    """Write the table: '# ' + each comment line, then ``wnid<TAB>hypernyms`` ('-' for none)."""
    lines = [f"# {c}".rstrip() for c in comments]
    lines += [f"{w}\t{','.join(p) or '-'}" for w, p in parents.items()]
    Path(path).write_text("\n".join(lines) + "\n", encoding="utf-8")


def read_hypernyms(path: str | Path) -> dict[str, tuple[str, ...]]:
    """The table of `path` -> {wnid: direct hypernyms}, validated (errors name file and line):
    a malformed line or wnid, a repeated wnid, a hypernym with no line of its own, a cycle."""
    out: dict[str, tuple[str, ...]] = {}
    where: dict[str, int] = {}
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        fields = line.split("\t")
        if len(fields) != 2:
            raise ValueError(f"{path}:{n}: expected 'wnid<TAB>hypernyms', got {line!r}")
        w, hyp = fields[0].strip(), fields[1].strip()
        ps = () if hyp == "-" else tuple(p.strip() for p in hyp.split(","))
        for x in (w, *ps):
            if not WNID.match(x):
                raise ValueError(f"{path}:{n}: bad wnid {x!r} (expected n + 8 digits, or '-')")
        if w in out:
            raise ValueError(f"{path}:{n}: {w} repeated (first on line {where[w]})")
        if w in ps:
            raise ValueError(f"{path}:{n}: {w} is its own hypernym")
        out[w], where[w] = ps, n
    for w, ps in out.items():
        for p in ps:
            if p not in out:
                raise ValueError(f"{path}:{where[w]}: hypernym {p} of {w} has no line")
    _check_acyclic(out, path)
    return out


def _check_acyclic(parents: dict[str, tuple[str, ...]], path: str | Path) -> None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    for root in parents:
        if root in state:
            continue
        stack = [(root, iter(parents[root]))]
        state[root] = 1
        while stack:
            w, it = stack[-1]
            p = next(it, None)
            if p is None:
                state[w] = 2
                stack.pop()
            elif state.get(p) == 1:
                cycle = [x for x, _ in stack]
                cycle = cycle[cycle.index(p) :] + [p]
                raise ValueError(f"{path}: hypernym cycle {' -> '.join(cycle)}")
            elif p not in state:
                state[p] = 1
                stack.append((p, iter(parents[p])))


class Hierarchy:
    """A hypernym DAG: direct parents and children, transitive ancestors and descendants.

    Built from a validated table (``read_hypernyms`` or ``Hierarchy.load``); ``source`` names
    it in errors (the table's file).
    """

    def __init__(self, parents: dict[str, tuple[str, ...]], source: str = "hierarchy") -> None:
        self.parents = {w: tuple(p) for w, p in parents.items()}
        self.source = source
        self.children: dict[str, list[str]] = {w: [] for w in self.parents}
        for w, ps in self.parents.items():
            for p in ps:
                self.children[p].append(w)
        self._anc: dict[str, frozenset[str]] = {}

    @classmethod
    def load(cls, path: str | Path | None = None) -> Hierarchy:
        """The table of `path` (default: the shipped WordNet 3.0 table)."""
        path = Path(path) if path is not None else HYPERNYMS_FILE
        return cls(read_hypernyms(path), source=str(path))

    def __contains__(self, wnid: str) -> bool:
        return wnid in self.parents

    def __len__(self) -> int:
        return len(self.parents)

    def _check(self, wnid: str) -> None:
        if wnid not in self.parents:
            raise KeyError(f"{self.source}: {wnid!r} is not in the hierarchy")

    def ancestors(self, wnid: str) -> frozenset[str]:
        """Every synset above `wnid` (not itself); cached."""
        self._check(wnid)
        if wnid not in self._anc:
            # iterative post-order: parents before children, no recursion limit at depth ~20
            stack = [wnid]
            while stack:
                w = stack[-1]
                todo = [p for p in self.parents[w] if p not in self._anc]
                if todo:
                    stack.extend(todo)
                    continue
                stack.pop()
                acc: set[str] = set()
                for p in self.parents[w]:
                    acc.add(p)
                    acc |= self._anc[p]
                self._anc[w] = frozenset(acc)
        return self._anc[wnid]

    def descendants(self, wnid: str) -> set[str]:
        """Every synset below `wnid` (not itself)."""
        self._check(wnid)
        out: set[str] = set()
        stack = list(self.children[wnid])
        while stack:
            w = stack.pop()
            if w not in out:
                out.add(w)
                stack.extend(self.children[w])
        return out

    def subtree(self, wnid: str) -> set[str]:
        """`wnid` and every synset below it."""
        return self.descendants(wnid) | {wnid}

    def depth(self, wnid: str) -> int:
        """Length of the longest hypernym path from `wnid` up to a root (entity: 0)."""
        self._check(wnid)
        return max((1 + self.depth(p) for p in self.parents[wnid]), default=0)


@lru_cache(maxsize=1)
def shipped_hierarchy() -> Hierarchy:
    """The shipped WordNet 3.0 table (read once per process)."""
    return Hierarchy.load()


def build_table(
    wordnet: str | Path, synsets: list[str], synsets_source: str
) -> tuple[dict[str, list[str]], list[str]]:
    """(the table for `synsets` closed upward, its provenance comment lines) from a WordNet
    database folder (or its data.noun file)."""
    data_noun = Path(wordnet)
    data_noun = data_noun / "data.noun" if data_noun.is_dir() else data_noun
    all_parents = parse_data_noun(data_noun)
    table = close_upward(all_parents, synsets, source=str(data_noun))
    roots = sorted(w for w, p in table.items() if not p)
    if roots != [ENTITY]:
        raise ValueError(f"{data_noun}: expected the one root {ENTITY}, got {roots[:5]}")
    stats = table_stats(Hierarchy(table, str(data_noun)), synsets)
    comments = [
        "WordNet 3.0 noun hypernyms (pointers '@' and instance '@i') of the ImageNet-21K synsets,",
        "closed upward to entity (n00001740). Format: wnid<TAB>direct hypernyms (comma-separated,",
        "'-' for none). Regenerate: python scripts/make_wordnet_hypernyms.py --wordnet DIR",
        f"source: {data_noun} ({len(all_parents)} noun synsets)",
        f"synsets: {synsets_source} ({len(set(synsets))} wnids)",
        f"generated: {datetime.date.today().isoformat()}",
        f"lines: {len(table)}; " + "; ".join(f"{k}: {v}" for k, v in stats.items()),
    ]
    return table, comments


def table_stats(h: Hierarchy, synsets: Iterable[str]) -> dict[str, float | int]:
    """How the listed synsets nest: how many have a listed ancestor, how many listed ancestors
    on average (over those) and at most, how many are ancestors of other listed synsets."""
    listed = set(synsets)
    counts = [len(h.ancestors(w) & listed) for w in listed]
    nested = [c for c in counts if c]
    inner = set().union(*(h.ancestors(w) & listed for w in listed)) if listed else set()
    return {
        "with a listed ancestor": len(nested),
        "mean listed ancestors": round(sum(nested) / max(1, len(nested)), 2),
        "max listed ancestors": max(counts, default=0),
        "ancestors of others": len(inner),
    }
