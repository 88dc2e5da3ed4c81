"""ImageNet-21K as downloaded (class tars and/or class folders) -> WebDataset shards for training.

    larvess-shard --root DIR --out DIR [--synsets FILE] [--shard-size N] [--workers N] [--seed S]
        [--max-per-class N] [--name NAME] [--prefer {tar,folder}] [--verify {decode,header}]
        [--reencode] [--num-nodes N --node-rank I] [--check-sha1]
    larvess-shard --out DIR --merge [--check-sha1]

(also `python scripts/shard_imagenet21k.py ...`, the same function.)

--root holds `nXXXXXXXX.tar` (the fall11 / winter21 release, one tar per class; read in place,
nothing is extracted) and/or `nXXXXXXXX/` folders of images. Resumable: re-run the same command
after an interruption; completed shards (size-checked against their manifests) are kept.
On several machines sharing --out, run rank I of N with --num-nodes N --node-rank I; the last
rank to finish writes OUT/info.json (or run --merge once all are done). OUT's top holds only the
shards and info.json (timm's info and wids' shard index in one file); the plan, the manifests and
skipped.txt (every file left out, with the reason) go to OUT/.larvess/. Reading them with timm,
wids, webdataset and HF datasets: shards/README.md.
"""

from __future__ import annotations

import argparse
import sys
import time

from larvess.data.imagenet_shards import merge_shards, read_synsets, write_shards
from larvess.data.shard_format import SKIPPED_FILE, STATE_DIR


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="larvess-shard",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.split("\n")[8:]),
    )
    ap.add_argument("--root", help="folder of nXXXXXXXX.tar class tars and/or nXXXXXXXX/ folders")
    ap.add_argument("--out", required=True, help="output folder for the shards and info.json")
    ap.add_argument("--synsets", help="synset list, one wnid per line (default: all found)")
    ap.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    ap.add_argument("--workers", type=int, default=1, help="listing and writer processes")
    ap.add_argument("--seed", type=int, default=0, help="sample order and per-class subsets")
    ap.add_argument("--max-per-class", type=int, default=None, help="images kept per class")
    ap.add_argument(
        "--name",
        default="imagenet-train",
        help="shard file prefix (<name>-NNNNNN.tar). The split word in it lets HF datasets' "
        "folder forms, load_dataset('webdataset', data_dir=OUT) and load_dataset(OUT), take the "
        "shards as that split and pass over info.json",
    )
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
    # argparse %-formats help strings: a literal percent sign must be written %%
    ap.add_argument(
        "--node-rank", type=int, default=0, help="this machine's rank: writes shards i %% N == I"
    )
    ap.add_argument("--merge", action="store_true", help="only write info.json from manifests")
    ap.add_argument(
        "--check-sha1", action="store_true", help="verify finished shards by sha1, not only size"
    )
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    return ap


def main(argv: list[str] | None = None) -> int:
    """Parse argv (None: sys.argv[1:]), shard or merge; 0 on success, 2 on a setup error."""
    ap = parser()
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
                shard_size=a.shard_size,
                workers=a.workers,
                seed=a.seed,
                max_per_class=a.max_per_class,
                name=a.name,
                reencode=a.reencode,
                verify=a.verify,
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
        f"({info['num_reencoded']} re-encoded, {info['num_skipped']} skipped, listed in "
        f"{a.out}/{STATE_DIR}/{SKIPPED_FILE}; {len(info['missing_synsets'])} synsets without a "
        f"folder or tar; {dt:.1f} s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
