"""Candidate WordNet synsets for the dataset classes, for a human (or LLM) reviewer.

The logic of scripts/make_wordnet_candidates.py (see its docstring for how the shipped mappings
larvess/meta/wordnet_*.tsv were reviewed): for every class of COCO-Stuff-171, ADE-150 and ADE-847
the ImageNet-21K synsets whose lemmas match one of the class's names (``normalize_name`` on both
sides, also without spaces and in singular / plural form, plus EXTRA_TERMS), each with its lemmas
and timm's definition; ``fill_definitions`` rewrites a reviewed mapping's definition column.
"""

from __future__ import annotations

from pathlib import Path

from larvess.names import normalize_name, read_names_file
from larvess.synsets import (
    DATASETS,
    HEADER,
    names_file,
    read_mapping,
    read_timm_definitions,
    read_timm_lemmas,
    read_timm_synsets,
)

# search terms for classes whose good synset has no literally matching lemma (normalised name ->
# extra terms); candidates from these are judged like all others
EXTRA_TERMS: dict[str, list[str]] = {
    "tv": ["television receiver", "television"],
    "potted plant": ["pot plant", "houseplant"],
    "dining table": ["dining table", "table"],
    "cell phone": ["cellular telephone"],
    "hair drier": ["hair dryer", "blow dryer"],
    "sports ball": ["ball"],
    "remote": ["remote control"],
    "couch": ["sofa"],
    "donut": ["doughnut"],
    "motorcycle": ["motorcycle", "motorbike"],
    "skis": ["ski"],
    "tennis racket": ["tennis racket", "racket"],
    "baseball glove": ["baseball glove", "baseball mitt"],
    "hot dog": ["hotdog", "frank"],
    "teddy bear": ["teddy", "teddy bear"],
    "fire hydrant": ["fireplug"],
    "stop sign": ["street sign"],
    "wine glass": ["wineglass"],
    "playingfield": ["playing field", "athletic field"],
    "waterdrops": ["drop", "raindrop", "dewdrop"],
    "window blind": ["window blind", "blind"],
    "desk": ["desk"],
    "door": ["door"],
    "mirror": ["mirror"],
    "ceiling tile": ["ceiling", "tile"],
    "floor marble": ["floor", "marble"],
    "floor stone": ["floor", "flagstone"],
    "floor tile": ["floor", "tile"],
    "floor wood": ["floor", "parquet", "parquetry"],
    "wall brick": ["wall", "brick"],
    "wall concrete": ["wall", "concrete"],
    "wall panel": ["wall", "panel", "paneling"],
    "wall stone": ["wall", "stone wall"],
    "wall tile": ["wall", "tile"],
    "wall wood": ["wall", "paneling", "wainscot"],
    "railroad": ["railroad track", "railway"],
    "pavement": ["paving", "sidewalk"],
    "building": ["building", "edifice"],
    "person": ["person", "individual"],
    "car": ["car", "automobile"],
    "windowpane": ["window", "windowpane"],
    "fluorescent": ["fluorescent lamp", "fluorescent fixture"],
    "shanties": ["shanty", "hovel"],
    "videos": ["videocassette", "videotape"],
    "cds": ["compact disk", "compact disc"],
    "dvds": ["dvd", "videodisk"],
    "trash bag": ["garbage bag", "bin liner"],
    "washing machines": ["washer", "washing machine"],
    "spectacles": ["spectacles", "glasses"],
}


def variants(key: str) -> set[str]:
    """The key, without spaces, and simple singular / plural forms of its last word."""
    out = {key, key.replace(" ", "")}
    head, _, last = key.rpartition(" ")
    pre = head + " " if head else ""
    forms = {last + "s", last + "es"}
    if last.endswith("ies"):
        forms.add(last[:-3] + "y")
    if last.endswith("ves"):
        forms |= {last[:-3] + "f", last[:-3] + "fe"}
    if last.endswith("es"):
        forms.add(last[:-2])
    if last.endswith("s") and not last.endswith("ss"):
        forms.add(last[:-1])
    out |= {pre + f for f in forms}
    return out


def lemma_index(lemmas: dict[str, list[str]], allowed: set[str]) -> dict[str, list[str]]:
    index: dict[str, list[str]] = {}
    for wnid, lem in lemmas.items():
        if wnid not in allowed:
            continue
        for lm in lem:
            k = normalize_name(lm)
            for key in (k, k.replace(" ", "")):
                wn = index.setdefault(key, [])
                if wnid not in wn:
                    wn.append(wnid)
    return index


def class_candidates(names: list[str], index: dict[str, list[str]]) -> list[tuple[str, str]]:
    """[(how, wnid)] for one class, best first: name, variant, extra, head (last word)."""
    out: dict[str, str] = {}
    keys = [normalize_name(n) for n in names]
    for how, terms in (
        ("name", [{k} for k in keys]),
        ("variant", [variants(k) for k in keys]),
        ("extra", [{normalize_name(t)} for k in keys for t in EXTRA_TERMS.get(k, [])]),
    ):
        for group in terms:
            for t in sorted(group):
                for wnid in index.get(t, []):
                    out.setdefault(wnid, how)
    if not out:
        for k in keys:
            if " " in k:
                for wnid in index.get(k.rpartition(" ")[2], []):
                    out.setdefault(wnid, "head")
    return [(how, wnid) for wnid, how in out.items()]


def write_candidates(out: Path, info: Path | None) -> None:
    order = read_timm_synsets(info)
    allowed = set(order)
    lemmas, defs = read_timm_lemmas(info), read_timm_definitions(info)
    index = lemma_index(lemmas, allowed)
    rows = ["dataset\tindex\tname\tsynonyms\thow\twnid\tlemmas\tdefinition"]
    n_cand = 0
    for ds in DATASETS:
        for i, names in enumerate(read_names_file(names_file(ds))):
            cands = class_candidates(names, index)
            n_cand += len(cands)
            syn = ", ".join(names)
            if not cands:
                rows.append(f"{ds}\t{i}\t{names[0]}\t{syn}\t-\t-\t-\t-")
            for how, wnid in cands:
                lem = ", ".join(lemmas[wnid])
                rows.append(f"{ds}\t{i}\t{names[0]}\t{syn}\t{how}\t{wnid}\t{lem}\t{defs[wnid]}")
    out.write_text("\n".join(rows) + "\n", encoding="utf-8")
    print(f"wrote {out}: {n_cand} candidates for {len(DATASETS)} datasets")


def fill_definitions(path: Path, info: Path | None) -> None:
    """Rewrite the definition column of a reviewed mapping from timm's definitions."""
    defs = read_timm_definitions(info)
    text = path.read_text(encoding="utf-8").splitlines()
    comments = [ln for ln in text if ln.startswith("#")]
    rows = read_mapping(path, allowed=set(read_timm_synsets(info)))
    body = [HEADER]
    for index, name, wnids, definition in rows:
        d = defs[wnids[0]] if wnids else definition
        body.append(f"{index}\t{name}\t{','.join(wnids) or '-'}\t{d}")
    path.write_text("\n".join(comments + body) + "\n", encoding="utf-8")
    print(f"filled {path}: {sum(1 for r in rows if r[2])} of {len(rows)} classes mapped")
