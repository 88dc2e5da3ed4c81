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
    python scripts/make_synset_lists.py --tree                # the lists with descendants

--tree gathers, per class, every ImageNet-21K synset at or below its synsets by the WordNet
hierarchy (larvess/meta/wordnet_hypernyms.tsv), written as larvess/meta/i124_tree_synsets.txt and
i585_tree_synsets.txt: ADE's "tree" takes its 992 kinds of tree, "dog" its breeds.

--available takes a synset list (one wnid per line, e.g. the winter21 release's 19,167) or a
folder of the release (entries named nXXXXXXXX or nXXXXXXXX.tar); a synset missing there is
dropped, and a class whose synsets are all dropped no longer counts as covered. The lists feed
`scripts/shard_imagenet21k.py --synsets FILE`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from larvess.meta import META
from larvess.synsets import read_available, write_synset_lists


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--available", type=Path, help="synset list file or release folder")
    p.add_argument("--out-dir", type=Path, default=META, help="default: larvess/meta")
    p.add_argument("--tree", action="store_true", help="also every synset below each class")
    p.add_argument("--check", action="store_true", help="compare with the files, write nothing")
    args = p.parse_args(argv)
    available = read_available(args.available) if args.available else None
    lines, stale = write_synset_lists(args.out_dir, available, tree=args.tree, check=args.check)
    print("\n".join(lines))
    if stale:
        print("out of date (run scripts/make_synset_lists.py): " + ", ".join(stale))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
