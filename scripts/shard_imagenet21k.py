"""ImageNet-21K (or any root/<wnid>/*.JPEG tree) -> WebDataset shards for training.

    python scripts/shard_imagenet21k.py --root DIR --out DIR [--synsets FILE] [--shard-size N]
                                        [--workers N] [--seed S] [--max-per-class N] [--name NAME]

Resumable: re-run the same command after an interruption; completed shards are kept.
Unreadable files are listed in OUT/skipped.txt; OUT/info.json is written last.
"""

from __future__ import annotations

import argparse
import sys
import time

from larvess.data.imagenet_shards import read_synsets, write_shards


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", required=True, help="folder with one sub-folder per wnid")
    ap.add_argument("--out", required=True, help="output folder for the shards and info.json")
    ap.add_argument("--synsets", help="synset list, one wnid per line (default: all folders)")
    ap.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    ap.add_argument("--workers", type=int, default=1, help="writer processes")
    ap.add_argument("--seed", type=int, default=0, help="sample order and per-class subsets")
    ap.add_argument("--max-per-class", type=int, default=None, help="images kept per class")
    ap.add_argument("--name", default="imagenet", help="shard file prefix")
    ap.add_argument("--reencode", action="store_true", help="re-encode even valid RGB JPEGs")
    ap.add_argument(
        "--verify",
        choices=("decode", "header"),
        default="decode",
        help="check valid JPEGs by a 1/8-scale decode, or header + end marker only",
    )
    a = ap.parse_args(argv)
    t0 = time.time()
    try:
        synsets = read_synsets(a.synsets) if a.synsets else None
        info = write_shards(
            a.root,
            a.out,
            synsets,
            a.shard_size,
            a.workers,
            a.seed,
            a.max_per_class,
            a.name,
            a.reencode,
            a.verify,
        )
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    dt = time.time() - t0
    print(
        f"{info['num_samples']} samples in {len(info['filenames'])} shards -> {a.out} "
        f"({info['num_reencoded']} re-encoded, {info['num_skipped']} skipped, "
        f"{len(info['missing_synsets'])} synsets without a folder; {dt:.1f} s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
