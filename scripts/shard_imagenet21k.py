"""ImageNet-21K as downloaded (class tars and/or class folders) -> WebDataset shards for training.

    python scripts/shard_imagenet21k.py --root DIR --out DIR [--synsets FILE] [--shard-size N]
        [--workers N] [--seed S] [--max-per-class N] [--name NAME] [--prefer {tar,folder}]
        [--verify {decode,header}] [--reencode] [--num-nodes N --node-rank I] [--check-sha1]
    python scripts/shard_imagenet21k.py --out DIR --merge [--check-sha1]

--root holds `nXXXXXXXX.tar` (the fall11 / winter21 release, one tar per class; read in place,
nothing is extracted) and/or `nXXXXXXXX/` folders of images. Resumable: re-run the same command
after an interruption; completed shards (size-checked against their manifests) are kept.
On several machines sharing --out, run rank I of N with --num-nodes N --node-rank I; the last
rank to finish writes OUT/info.json (or run --merge once all are done). Unreadable files are
listed in OUT/skipped.txt; OUT/info.json is written last.
"""

from __future__ import annotations

import argparse
import sys
import time

from larvess.data.imagenet_shards import merge_shards, read_synsets, write_shards


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", help="folder of nXXXXXXXX.tar class tars and/or nXXXXXXXX/ folders")
    ap.add_argument("--out", required=True, help="output folder for the shards and info.json")
    ap.add_argument("--synsets", help="synset list, one wnid per line (default: all found)")
    ap.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    ap.add_argument("--workers", type=int, default=1, help="listing and writer processes")
    ap.add_argument("--seed", type=int, default=0, help="sample order and per-class subsets")
    ap.add_argument("--max-per-class", type=int, default=None, help="images kept per class")
    ap.add_argument("--name", default="imagenet", help="shard file prefix")
    ap.add_argument(
        "--prefer",
        choices=("tar", "folder"),
        help="read this one when a class is both a folder and a tar (default: error)",
    )
    ap.add_argument("--reencode", action="store_true", help="re-encode even valid RGB JPEGs")
    ap.add_argument(
        "--verify",
        choices=("decode", "header"),
        default="decode",
        help="check valid JPEGs by a 1/8-scale draft decode, or header + end marker only",
    )
    ap.add_argument("--num-nodes", type=int, default=1, help="machines sharing the work")
    ap.add_argument("--node-rank", type=int, default=0, help="this machine's rank: shards i % N")
    ap.add_argument("--merge", action="store_true", help="only write info.json from manifests")
    ap.add_argument(
        "--check-sha1", action="store_true", help="verify finished shards by sha1, not only size"
    )
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    a = ap.parse_args(argv)
    t0 = time.time()
    try:
        if a.merge:
            info = merge_shards(a.out, check_sha1=a.check_sha1, progress=not a.quiet)
        else:
            if not a.root:
                ap.error("--root is required (except with --merge)")
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
                progress=not a.quiet,
                prefer=a.prefer,
                num_nodes=a.num_nodes,
                node_rank=a.node_rank,
                check_sha1=a.check_sha1,
            )
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    dt = time.time() - t0
    if info is None:
        print(
            f"rank {a.node_rank} of {a.num_nodes}: its shards are done ({dt:.1f} s); other "
            f"ranks' shards are missing: the last rank writes {a.out}/info.json, or run --merge"
        )
        return 0
    print(
        f"{info['num_samples']} samples in {len(info['filenames'])} shards -> {a.out} "
        f"({info['num_reencoded']} re-encoded, {info['num_skipped']} skipped, "
        f"{len(info['missing_synsets'])} synsets without a folder or tar; {dt:.1f} s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
