"""Regenerate larvess/meta/wordnet_hypernyms.tsv (the WordNet 3.0 noun hierarchy) from WordNet.

The table gives every synset of timm's imagenet21k_goog_synsets.txt (21,843 wnids) and every
noun above them their direct hypernyms (``@`` and instance ``@i``), closed upward to entity.
WordNet 3.0's database folder: Debian's ``apt-get install wordnet-base`` (/usr/share/wordnet)
or NLTK's wordnet corpus (the same data.noun). Nothing needs WordNet at run time.

    python scripts/make_wordnet_hypernyms.py --wordnet /usr/share/wordnet
    python scripts/make_wordnet_hypernyms.py --wordnet DIR --synsets list.txt --out table.tsv
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from larvess.hierarchy import HYPERNYMS_FILE, build_table, write_hypernyms
from larvess.synsets import read_synset_list, timm_info_dir


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--wordnet", type=Path, required=True, help="WordNet 3.0 database folder")
    p.add_argument(
        "--synsets", type=Path, default=None,
        help="wnid list (default: timm's imagenet21k_goog_synsets.txt)",
    )  # fmt: skip
    p.add_argument("--out", type=Path, default=HYPERNYMS_FILE, help="default: the shipped table")
    args = p.parse_args(argv)
    synsets_file = args.synsets or timm_info_dir() / "imagenet21k_goog_synsets.txt"
    synsets = read_synset_list(synsets_file)
    source = synsets_file.name if args.synsets is None else str(synsets_file)
    table, comments = build_table(args.wordnet, synsets, source)
    write_hypernyms(args.out, table, comments)
    print(f"wrote {args.out}: {len(table)} synsets")
    print("\n".join(comments[-4:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
