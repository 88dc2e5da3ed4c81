"""Per-source loaders and the mixed stream: one batch of every source per step.

Map-style datasets (with ``get(index, rng)``): a global draw stream g = 0, 1, 2, ...;
epoch e = g // n, index = perm_e[g % n] with perm_e a permutation seeded by (seed, e); process r
takes the draws with g % world_size == r, so processes never overlap within an epoch; batch b
of a process holds its draws b*B .. (b+1)*B - 1 (batches may straddle an epoch boundary, so
every batch is full). Each sample's augmentation RNG is seeded by (seed, g). DataLoader
workers take whole batches round robin (worker w builds batches b with (b - start_batch) %
num_workers == w, and the loader returns them in that order), so the batches are identical for
any worker count, and ``start_batch`` (batches already drawn by this process) resumes exactly.

Iterable datasets (WebDataset) split themselves by node / worker; before the loader starts they
get ``set_seed(s)`` (or attribute ``seed``) with s derived from (seed, rank, start_batch), and
are batched by the DataLoader (``drop_last`` applies here only) and restarted when exhausted.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

log = logging.getLogger(__name__)

_SAMPLE, _PERM, _ITER = 0, 1, 2  # stream tags so the seeds of the three uses never collide


def sample_rng(seed: int, g: int) -> np.random.Generator:
    """Augmentation RNG of global draw g."""
    return np.random.default_rng([seed, _SAMPLE, g])


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    """perm_e: int64 [n] dataset indices of epoch e."""
    return np.random.default_rng([seed, _PERM, epoch]).permutation(n)


def draw_indices(
    n: int,
    seed: int,
    rank: int,
    world_size: int,
    start: int,
    count: int,
    cache: dict[int, np.ndarray] | None = None,
) -> list[tuple[int, int]]:
    """(g, dataset index) of this process's draws start .. start + count - 1.

    cache: {epoch: perm_e} kept by the caller so a permutation is built once per epoch.
    """
    out = []
    cache = {} if cache is None else cache
    for j in range(start, start + count):
        g = rank + world_size * j
        e = g // n
        if e not in cache:
            if len(cache) > 1:
                cache.pop(min(cache))
            cache[e] = epoch_permutation(seed, e, n)
        out.append((g, int(cache[e][g % n])))
    return out


LOST_KEYS = ("lost", "lost_shards")  # set by readers that can lose data (imagenet_wds)


def collate(samples: list[dict]) -> dict:
    """Stack "image" [B, 3, H, W] and "label" [B, H, W]; every other key becomes a list, except
    "lost" (int: samples lost since the previous batch, summed) and "lost_shards" (the shard
    names, concatenated), which every batch carries (0 and [] for sources that lose nothing).

    Labels are checked here, in the loader's workers, so the training step need not: "label"
    and "labels" must be integer tensors of vocabulary rows (>= 0) or -1 (ignore).
    """
    if not samples:
        raise ValueError("collate got no samples")
    batch: dict = {}
    for k in samples[0]:
        if k in LOST_KEYS:
            continue
        vals = [s[k] for s in samples]
        if k in ("label", "labels"):
            _check_labels(k, vals, samples)
        batch[k] = torch.stack(vals) if k in ("image", "label") else vals
    batch["lost"] = sum(int(s.get("lost", 0)) for s in samples)
    batch["lost_shards"] = [n for s in samples for n in s.get("lost_shards", ())]
    return batch


def _check_labels(key: str, vals: list, samples: list[dict]) -> None:
    for v, s in zip(vals, samples):
        if not isinstance(v, torch.Tensor) or v.is_floating_point() or v.is_complex():
            raise ValueError(
                f"sample {s.get('key')!r}: {key!r} must be an integer tensor of vocabulary rows, "
                f"got {type(v).__name__} {getattr(v, 'dtype', '')}"
            )
        if v.numel() and int(v.min()) < -1:
            raise ValueError(
                f"sample {s.get('key')!r}: {key!r} holds {int(v.min())}, below -1 (ignore): "
                "not a vocabulary row"
            )


class _DrawStream(IterableDataset):
    """Infinite stream of collated batches of a map-style dataset (see module docstring)."""

    def __init__(self, dataset, batch_size, seed, rank, world_size, start_batch) -> None:
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.rank, self.world_size, self.start_batch = rank, world_size, start_batch
        self.n = len(dataset)
        self._perms: dict[int, np.ndarray] = {}
        if self.n == 0:
            raise ValueError(f"dataset {type(dataset).__name__} is empty")

    def batch(self, b: int) -> dict:
        B = self.batch_size
        draws = draw_indices(self.n, self.seed, self.rank, self.world_size, b * B, B, self._perms)
        return collate([self.dataset.get(i, sample_rng(self.seed, g)) for g, i in draws])

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        wid, nw = (0, 1) if info is None else (info.id, info.num_workers)
        b = self.start_batch + wid
        while True:
            yield self.batch(b)
            b += nw


class _GetItem:
    """Adapter for a map-style dataset without get(index, rng): its own randomness is used."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def get(self, index: int, rng: np.random.Generator) -> dict:
        return self.dataset[index]


def _iterable_batches(loader: DataLoader) -> Iterator[dict]:
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise RuntimeError(f"iterable dataset {type(loader.dataset).__name__} yielded nothing")


def source_loader(
    dataset,
    batch_size: int,
    num_workers: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    start_batch: int = 0,
    drop_last: bool = True,
    pin_memory: bool = False,
) -> Iterator[dict]:
    """Infinite iterator of collated batches of one source for process ``rank``."""
    if batch_size < 1 or num_workers < 0 or not 0 <= rank < world_size or start_batch < 0:
        raise ValueError(
            f"bad loader arguments: batch_size={batch_size} num_workers={num_workers} "
            f"rank={rank} world_size={world_size} start_batch={start_batch}"
        )
    kw = dict(num_workers=num_workers, persistent_workers=num_workers > 0, pin_memory=pin_memory)
    if isinstance(dataset, IterableDataset):
        s = int(np.random.default_rng([seed, _ITER, rank, start_batch]).integers(2**31))
        if hasattr(dataset, "set_seed"):
            dataset.set_seed(s)
        elif hasattr(dataset, "seed"):
            dataset.seed = s
        else:
            log.warning("%s has no set_seed/seed: its stream is not seeded", type(dataset).__name__)
        loader = DataLoader(
            dataset, batch_size=batch_size, collate_fn=collate, drop_last=drop_last, **kw
        )
        return _iterable_batches(loader)
    if not hasattr(dataset, "get"):
        log.warning("%s has no get(index, rng): augmentation is not reproducible", dataset)
        dataset = _GetItem(dataset)
    stream = _DrawStream(dataset, batch_size, seed, rank, world_size, start_batch)
    return iter(DataLoader(stream, batch_size=None, **kw))


class MixedBatches:
    """Yields {source name: batch} with one batch of every source per step."""

    def __init__(self, loaders: dict[str, Iterable[dict]]) -> None:
        if not loaders:
            raise ValueError("MixedBatches needs at least one source")
        self.loaders = {k: iter(v) for k, v in loaders.items()}

    def __iter__(self) -> Iterator[dict[str, dict]]:
        return self

    def __next__(self) -> dict[str, dict]:
        return {k: next(it) for k, it in self.loaders.items()}
