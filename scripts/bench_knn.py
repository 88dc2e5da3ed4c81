"""Benchmark exact kNN search: torch vs faiss vs auto, side by side.

    python scripts/bench_knn.py [--out bench_out] [--device cpu] [--mac-budget 2e10]

Queries are random unit vectors (d=64) against a random unit table of C rows, k=9 (k=8
negatives + 1 for the dropped target). N = 8*8*8 (one batch of 8 images at the stride-16 grid
of 128 px) and N = 8*128*128 (every pixel). Large N*C cases are timed on the first N' queries
(N'*C*d <= --mac-budget) and scaled linearly to N: the search is a matmul plus a per-query top-k,
linear in N once N' is in the thousands. The table prints which cases were scaled.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from larvess import knn


def _time(fn, repeats: int) -> float:
    """Best of at least ``repeats`` runs, repeating until 0.3 s were spent: the machine is
    shared, so the minimum is the least noisy estimate of the cost."""
    best, spent, n = float("inf"), 0.0, 0
    while n < repeats or spent < 0.3:
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        best, spent, n = min(best, dt), spent + dt, n + 1
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench_out")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--classes", default="171,1284,21841,100000")
    ap.add_argument("--queries", default=f"{8 * 8 * 8},{8 * 128 * 128}")
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--k", type=int, default=9)
    ap.add_argument("--mac-budget", type=float, default=2e10)
    args = ap.parse_args()
    dev = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    rows = []
    backends = knn.available_backends() + ["auto"]
    print(
        f"device={dev} torch_threads={torch.get_num_threads()} "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')} d={args.dim} k={args.k}"
    )
    head = f"{'C':>7} {'N':>7} {'N_timed':>7} " + " ".join(f"{b + ' s':>10}" for b in backends)
    print(head + f" {'auto->':>7} {'auto/best':>9}")
    for C in [int(c) for c in args.classes.split(",")]:
        table = F.normalize(torch.randn(C, args.dim, generator=g), dim=1).to(dev)
        for N in [int(n) for n in args.queries.split(",")]:
            n_t = int(min(N, max(512, args.mac_budget // (C * args.dim))))
            q = F.normalize(torch.randn(n_t, args.dim, generator=g), dim=1).to(dev)
            repeats = 5 if n_t * C * args.dim < 2e9 else 1
            times = {}
            for b in backends:
                knn.search(q[:64], table, args.k, backend=b)  # warm-up (faiss/BLAS init)
                sec = _time(lambda b=b, q=q, t=table: knn.search(q, t, args.k, backend=b), repeats)
                times[b] = sec * N / n_t
            chosen = knn._pick_backend(N, C, dev)
            best = min(times[b] for b in backends if b != "auto")
            row = dict(
                C=C,
                N=N,
                N_timed=n_t,
                seconds=times,
                auto_choice=chosen,
                auto_over_best=times["auto"] / best,
            )
            rows.append(row)
            print(
                f"{C:>7} {N:>7} {n_t:>7} "
                + " ".join(f"{times[b]:>10.4f}" for b in backends)
                + f" {chosen:>7} {row['auto_over_best']:>9.2f}"
            )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(
        device=str(dev),
        threads=torch.get_num_threads(),
        dim=args.dim,
        k=args.k,
        note="seconds scaled to N when N_timed < N",
    )
    (out / "bench_knn.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    print(f"wrote {out / 'bench_knn.json'}")


if __name__ == "__main__":
    main()
