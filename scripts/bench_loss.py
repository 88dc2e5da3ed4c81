"""Benchmark the segmentation loss: kNN-sampled CE vs full-softmax CE as C grows.

    python scripts/bench_loss.py [--out bench_out] [--classes 171,1284,21841,100000]

Fixed pixel count: 8 images at 128x128 (131,072 labelled pixels), d=64, k=8, s=40. The input is
a stride-16 embedding grid [8,64,8,8] (leaf) and a table [C,64] (leaf); the timed step is
upsample_embeddings -> loss -> backward, including the table normalisation.

Variants:
    knn_shared  knn_sampled_ce with grid= (ESS supplementary: search once per grid cell)
    knn_pixel   knn_sampled_ce searching every pixel (run only where N*C*d <= --pixel-mac)
    full        s * x.mu for every class, F.cross_entropy (skipped when the estimated
                logit memory 3 * N*C*4 bytes - logits, softmax, gradient - exceeds --full-max-gib)

Also, at the real vocabulary (c171_i21k: COCO-171 + 21,841 IN-21K synsets), the image-level CE
and the CA term of the ImageNet source with loss.hierarchy flat vs tree (labels expanded up
WordNet, related rows barred): time, peak memory, pairs, and the share of flat's nearest
negatives that are related rows.

Memory: every case runs in a fresh subprocess; "peak MiB" = ru_maxrss after the first
forward+backward minus ru_maxrss after the inputs were built, i.e. the peak resident memory the
loss step itself added (CPU allocations, including one-time library buffers). Time: best of
the next runs. Also reports the CA-Classifier bank bytes for 21,841 classes.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

N_IMG, HW, GRID, D, K, SCALE = 8, 128, 8, 64, 8, 40.0


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def run_case(variant: str, C: int, repeats: int) -> dict:
    """One case, in this (fresh) process."""
    import torch
    import torch.nn.functional as F

    from larvess.losses import knn_sampled_ce
    from larvess.model import upsample_embeddings

    g = torch.Generator().manual_seed(0)
    grid_raw = torch.randn(N_IMG, D, GRID, GRID, generator=g).requires_grad_(True)
    w = torch.randn(C, D, generator=g).requires_grad_(True)
    target = torch.randint(0, C, (N_IMG, HW, HW), generator=g)

    def step() -> float:
        grid = F.normalize(grid_raw, dim=1)
        mu = F.normalize(w, dim=1)
        x = upsample_embeddings(grid, (HW, HW))
        if variant == "knn_shared":
            loss = knn_sampled_ce(x, target, mu, K, SCALE, grid=grid.detach())
        elif variant == "knn_pixel":
            loss = knn_sampled_ce(x, target, mu, K, SCALE)
        else:
            logits = SCALE * torch.einsum("bdhw,cd->bchw", x, mu)
            loss = F.cross_entropy(logits, target)
        loss.backward()
        grid_raw.grad = w.grad = None
        return float(loss)

    base = _rss_mib()
    t0 = time.perf_counter()
    value = step()
    first = time.perf_counter() - t0
    peak = _rss_mib() - base
    times = [first]
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return dict(variant=variant, C=C, peak_mib=peak, seconds=min(times), loss=value)


B_IMG, GRID_IN, CLS_K = 16, 20, 64  # LarvSeg's global ImageNet batch at 320 px: 20x20 grid


def c171_i21k_vocab():
    """The c171_i21k vocabulary without data: COCO-171 (curated synsets) + the 21,841 IN-21K
    synsets, built as build.build_data does; rows of the ImageNet source."""
    from larvess.meta import COCO_STUFF_LABELS
    from larvess.names import coco_stuff_classes, read_coco_stuff_labels
    from larvess.synsets import read_timm_synsets, synsets_for_class_list
    from larvess.vocab import Vocabulary

    _, names = coco_stuff_classes(read_coco_stuff_labels(COCO_STUFF_LABELS))
    coco = [[n] for n in names]
    v = Vocabulary()
    v.add_source("coco", coco, synsets_for_class_list(coco), has_masks=True)
    wnids = read_timm_synsets()
    v.add_source("in", [[w] for w in wnids], wnids, by_synset=True)
    return v


def tree_case(mode: str, repeats: int) -> dict:
    """Image-level CE + CA on the ImageNet source of c171_i21k, flat vs tree (one process)."""
    import torch
    import torch.nn.functional as F

    from larvess.ca_classifier import CAClassifier
    from larvess.config import LossConfig, SourceConfig
    from larvess.objective import compute_losses, make_sources, prepare_batch

    t0 = time.perf_counter()
    v = c171_i21k_vocab()
    tree = v.tree()
    C = len(v)
    cfgs = [SourceConfig(name="in", kind="imagenet_wds", root="-", batch_size=B_IMG,
                         cls_weight=0.2, ca_weight=0.1, bg_threshold=0.35, bg_mse_threshold=2.0)]  # fmt: skip
    lo = LossConfig(k=K, cls_k=CLS_K, margin_weight=0.0, hierarchy=mode)
    (src,) = make_sources(cfgs, [v.rows_of("in")], C, lo, tree=tree)
    setup_s = time.perf_counter() - t0
    # a table that has learned the hierarchy's similarity: each row the normalised sum of random
    # vectors of its synset and its ancestors (relatives are near, as training makes them)
    g = torch.Generator().manual_seed(0)
    anc = tree.ancestors
    base = torch.randn(C, D, generator=g)
    w = torch.stack([base[r] + base[anc[r]].sum(0) * 0.5 for r in range(C)]).requires_grad_(True)
    in_rows = v.rows_of("in")
    labels = [in_rows[torch.randint(len(in_rows), (1,), generator=g)] for _ in range(B_IMG)]
    ca = CAClassifier(C, D, bank_size=20, topk=20, warm_up=0)
    ca.push(F.normalize(torch.randn(C, D, generator=g), dim=1), torch.arange(C))
    mu0 = F.normalize(w.detach(), dim=1)
    noise = torch.randn(B_IMG, D, GRID_IN, GRID_IN, generator=g)
    x_raw = torch.stack([mu0[L[0]] for L in labels])[:, :, None, None] * 4 + noise
    x_raw = x_raw.requires_grad_(True)

    def step() -> tuple[float, object]:
        batch = prepare_batch(src, {"image": None, "labels": labels})
        x = F.normalize(x_raw, dim=1)
        mu = F.normalize(w, dim=1)
        out = compute_losses([x], mu, [batch], [src], lo, ca=ca)
        out.terms["total"].backward()
        x_raw.grad = w.grad = None
        return float(out.terms["total"]), batch["pairs"]

    base_rss = _rss_mib()
    t1 = time.perf_counter()
    value, pairs = step()
    times = [time.perf_counter() - t1]
    peak = _rss_mib() - base_rss
    for _ in range(repeats):
        t1 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t1)
    # flat's view of the same images: how many of the cls_k nearest negatives are related rows
    rel = tree.related
    pooled = F.normalize(x_raw.detach(), dim=1).mean(dim=(2, 3))
    scores = pooled @ mu0[in_rows].T
    related_share = []
    for b, L in enumerate(labels):
        t = int(L[0])
        local = (in_rows == t).nonzero()[0, 0]
        scores[b, local] = -1e9
        nn = in_rows[scores[b].topk(CLS_K).indices]
        related_share.append(len(set(nn.tolist()) & set(rel[t].tolist())) / CLS_K)
    n_rel = 0 if pairs.related is None else len(pairs.related[0])
    return dict(variant=f"image_{mode}", C=C, source_rows=len(src.rows), pairs=pairs.num,
                related_pairs=n_rel, peak_mib=peak, seconds=min(times), setup_s=setup_s,
                loss=value, flat_negatives_related=sum(related_share) / len(related_share))  # fmt: skip


def ca_bank_bytes(C: int = 21841, M: int = 20, K_px: int = 20, d: int = D) -> dict:
    from larvess.ca_classifier import CAClassifier

    ca = CAClassifier(C, d, bank_size=M, topk=K_px)
    held = sum(b.numel() * b.element_size() for b in ca.buffers())
    every = C * M * K_px * d * 4  # one float32 vector per pushed pixel
    return dict(C=C, M=M, K=K_px, d=d, slot_mean_bytes=held, every_feature_bytes=every)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench_out")
    ap.add_argument("--classes", default="171,1284,21841,100000")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--pixel-mac", type=float, default=2e10)
    ap.add_argument("--full-max-gib", type=float, default=8.0)
    ap.add_argument("--no-tree", action="store_true", help="skip the flat vs tree rows")
    ap.add_argument("--case", nargs=2, metavar=("VARIANT", "C"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.case:  # child process
        if args.case[0].startswith("image_"):
            print(json.dumps(tree_case(args.case[0].split("_", 1)[1], args.repeats)))
        else:
            print(json.dumps(run_case(args.case[0], int(args.case[1]), args.repeats)))
        return

    n_px = N_IMG * HW * HW
    rows = []
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    print(f"N={n_px} pixels (8x128x128), d={D}, k={K}, OMP_NUM_THREADS={env['OMP_NUM_THREADS']}")
    print(f"{'C':>7} {'variant':>11} {'peak MiB':>9} {'seconds':>8}  note")
    for C in [int(c) for c in args.classes.split(",")]:
        for variant in ("knn_shared", "knn_pixel", "full"):
            note = ""
            if variant == "full":
                est_gib = 3 * n_px * C * 4 / 2**30
                note = f"logits est. {3 * n_px * C * 4 / 2**20:.0f} MiB"
                if est_gib > args.full_max_gib:
                    rows.append(dict(variant=variant, C=C, skipped=note + " > limit"))
                    print(f"{C:>7} {variant:>11} {'-':>9} {'-':>8}  skipped: {note}")
                    continue
            if variant == "knn_pixel" and n_px * C * D > args.pixel_mac:
                note = f"per-pixel search {n_px * C * D:.1e} MAC > --pixel-mac"
                rows.append(dict(variant=variant, C=C, skipped=note))
                print(f"{C:>7} {variant:>11} {'-':>9} {'-':>8}  skipped: {note}")
                continue
            cmd = [sys.executable, __file__, "--case", variant, str(C)]
            cmd += ["--repeats", str(args.repeats)]
            res = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if res.returncode != 0:
                raise RuntimeError(f"case {variant} C={C} failed:\n{res.stderr[-2000:]}")
            row = json.loads(res.stdout.strip().splitlines()[-1])
            row["note"] = note
            rows.append(row)
            print(f"{C:>7} {variant:>11} {row['peak_mib']:>9.1f} {row['seconds']:>8.3f}  {note}")

    if not args.no_tree:
        print(f"\nimage-level CE + CA on the ImageNet source of c171_i21k ({B_IMG} images, "
              f"{GRID_IN}x{GRID_IN} grid, cls_k={CLS_K}), loss.hierarchy flat vs tree")  # fmt: skip
        print(f"{'mode':>5} {'rows':>6} {'pairs':>6} {'related':>8} {'peak MiB':>9} "
              f"{'seconds':>8} {'img/s':>6}")  # fmt: skip
        for mode in ("flat", "tree"):
            cmd = [sys.executable, __file__, "--case", f"image_{mode}", "21841"]
            res = subprocess.run(cmd + ["--repeats", str(args.repeats)], capture_output=True,
                                 text=True, env=env)  # fmt: skip
            if res.returncode != 0:
                raise RuntimeError(f"case image_{mode} failed:\n{res.stderr[-2000:]}")
            row = json.loads(res.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(f"{mode:>5} {row['source_rows']:>6} {row['pairs']:>6} {row['related_pairs']:>8} "
                  f"{row['peak_mib']:>9.1f} {row['seconds']:>8.3f} "
                  f"{B_IMG / row['seconds']:>6.1f}")  # fmt: skip
        share = rows[-1]["flat_negatives_related"]
        print(
            f"flat: {100 * share:.1f}% of each image's {CLS_K} nearest negatives are rows "
            "related to its label (a table whose rows sit near their WordNet relatives)"
        )

    def get(v, C, key):
        return next((r[key] for r in rows if r["variant"] == v and r["C"] == C and key in r), None)

    cs = [int(c) for c in args.classes.split(",")]
    summary = {}
    if 171 in cs and 100000 in cs:
        summary["knn_shared_peak_ratio_C100000_over_C171"] = get(
            "knn_shared", 100000, "peak_mib"
        ) / get("knn_shared", 171, "peak_mib")
    if 171 in cs and 21841 in cs:
        summary["knn_shared_time_ratio_C21841_over_C171"] = get(
            "knn_shared", 21841, "seconds"
        ) / get("knn_shared", 171, "seconds")
    ca = ca_bank_bytes()
    summary["ca_bank"] = ca
    for k, v in summary.items():
        print(f"{k}: {v:.2f}" if isinstance(v, float) else f"{k}: {v}")
    print(
        f"CA bank for {ca['C']} classes, M={ca['M']}, K={ca['K']}, d={ca['d']}: "
        f"{ca['slot_mean_bytes'] / 2**20:.1f} MiB (slot means) vs "
        f"{ca['every_feature_bytes'] / 2**20:.1f} MiB (every pushed feature)"
    )

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_loss.json").write_text(json.dumps(dict(rows=rows, summary=summary), indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for v in ("knn_shared", "knn_pixel", "full"):
        pts = [
            (r["C"], r["peak_mib"], r["seconds"])
            for r in rows
            if r["variant"] == v and "peak_mib" in r
        ]
        if pts and v:
            c, m, t = zip(*pts)
            axes[0].plot(c, m, "o-", label=v)
            axes[1].plot(c, t, "o-", label=v)
    for ax, title in zip(axes, ("peak memory added (MiB)", "forward+backward (s)")):
        ax.set_xscale("log")
        ax.set_xlabel("classes C")
        ax.set_title(title)
        ax.legend()
    fig.suptitle("segmentation loss, 8x128x128 pixels, d=64, k=8")
    fig.tight_layout()
    fig.savefig(out / "bench_loss.png", dpi=100)
    print(f"wrote {out / 'bench_loss.json'} and {out / 'bench_loss.png'}")


if __name__ == "__main__":
    main()
