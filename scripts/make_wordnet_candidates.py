"""Candidate WordNet synsets for the dataset classes, for a human (or LLM) reviewer.

For every class of COCO-Stuff-171, ADE-150 and ADE-847 (names files in larvess/meta) this lists
the ImageNet-21K synsets (timm's imagenet22k_synsets.txt, 21,841 wnids) whose lemmas match one of
the class's names, each with its lemmas and timm's definition, so a reviewer can judge the sense:

- names are normalised (lower case, '-' / '_' -> space, the suffixes "-other", "-stuff",
  "-merged" stripped: "wall-other" -> "wall") and compared with the lemmas normalised the same
  way, also without spaces ("wine glass" ~ "wineglass") and in singular / plural form
  ("leaves" ~ "leaf", "skis" ~ "ski");
- EXTRA_TERMS adds search terms for classes whose good synset has no literally matching lemma
  ("tv" -> "television receiver", "potted plant" -> "pot plant");
- a multi-word name with no match at all falls back to its last word ("head" candidates).

The shipped mappings larvess/meta/wordnet_{coco171,ade150,ade847}.tsv are the REVIEWED output of
this script: each candidate's definition was read against the dataset's meaning of the class
(COCO: the object categories of COCO and the stuff categories of COCO-Stuff; ADE: scene parsing
of indoor / outdoor scenes), the wrong senses dropped (COCO "mouse" is the computer mouse, not
the rodent; "fence" is the barrier, not a dealer in stolen property), good synsets without a
literal lemma match added by hand, and classes without an ImageNet-21K synset of the dataset's
meaning written as "-" with a reason. A wrong merge is worse than a missing one.

    python scripts/make_wordnet_candidates.py --out candidates.tsv
    python scripts/make_wordnet_candidates.py --fill larvess/meta/wordnet_ade150.tsv

--fill rewrites the definition column of reviewed mapping files from timm's definitions (the
first mapped synset's definition; the reason is kept for "-" lines), after the reviewer edited
the wnids column.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from larvess.wordnet_candidates import fill_definitions, write_candidates


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("wordnet_candidates.tsv"))
    p.add_argument(
        "--timm-info", type=Path, default=None, help="timm/data/_info (default: installed)"
    )
    p.add_argument("--fill", type=Path, nargs="*", default=None, help="reviewed mapping files")
    args = p.parse_args(argv)
    if args.fill:
        for path in args.fill:
            fill_definitions(path, args.timm_info)
        return
    write_candidates(args.out, args.timm_info)


if __name__ == "__main__":
    main()
