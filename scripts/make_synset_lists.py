"""Regenerate the I124 / I585-style ImageNet-21K synset lists from the curated class mappings.

LarvSeg's I124 (I585) is ImageNet-21K restricted to the categories it shares with ADE-150
(ADE-847): 124 of 150 (585 of 847) classes. Here the lists are the ImageNet-21K synsets of the
ADE-150 / ADE-847 classes according to larvess/meta/wordnet_ade{150,847}.tsv (every wnid there is
in timm's imagenet22k_synsets.txt, i.e. has fall11 images), one wnid per line in timm's order:

    larvess/meta/i124_synsets.txt   (ADE-150)
    larvess/meta/i585_synsets.txt   (ADE-847)

    python scripts/make_synset_lists.py                       # rewrite both, print the counts
    python scripts/make_synset_lists.py --available w21.txt   # keep synsets with images there
    python scripts/make_synset_lists.py --check               # exit 1 if the shipped files differ

--available takes a synset list (one wnid per line, e.g. the winter21 release's 19,167) or a
folder of the release (entries named nXXXXXXXX or nXXXXXXXX.tar); a synset missing there is
dropped, and a class whose synsets are all dropped no longer counts as covered. The lists feed
`scripts/shard_imagenet21k.py --synsets FILE`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from larvess.names import WNID  # noqa: E402
from larvess.synsets import META, SYNSET_LISTS, imagenet_synset_lists, read_synset_list  # noqa: E402

LARVSEG = {"ade150": (124, 150), "ade847": (585, 847)}  # classes covered / total in the paper


def read_available(path: Path) -> set[str]:
    if path.is_dir():
        names = (p.name.split(".")[0] for p in path.iterdir())
        return {n for n in names if WNID.match(n)}
    return set(read_synset_list(path))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--available", type=Path, help="synset list file or release folder")
    p.add_argument("--out-dir", type=Path, default=META, help="default: larvess/meta")
    p.add_argument("--check", action="store_true", help="compare with the files, write nothing")
    args = p.parse_args(argv)
    available = read_available(args.available) if args.available else None
    stale = []
    for dataset, fname in SYNSET_LISTS.items():
        wnids, covered = imagenet_synset_lists(dataset, available=available)
        paper, total = LARVSEG[dataset]
        path = args.out_dir / fname
        text = "".join(w + "\n" for w in wnids)
        print(
            f"{fname}: {len(wnids)} synsets covering {covered} of {total} {dataset} classes "
            f"(LarvSeg: {paper} of {total})"
        )
        if args.check:
            if not path.is_file() or path.read_text(encoding="utf-8") != text:
                stale.append(str(path))
        else:
            path.write_text(text, encoding="utf-8")
    if stale:
        print("out of date (run scripts/make_synset_lists.py): " + ", ".join(stale))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
