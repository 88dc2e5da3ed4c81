"""Training reader of the ImageNet(-21K) WebDataset shards written by imagenet_shards.py.

A sample has `__key__`, `jpg`, `cls` (index into info.json's synset list) and `json`; the reader
yields {"image", "labels": LongTensor([vocabulary row]), "key"} from an infinite resampled stream.
"""

from __future__ import annotations

import io
import json
import logging
import multiprocessing as mp
import random
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from larvess.data.transforms import normalize

log = logging.getLogger(__name__)


def _slot(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """(global slot, number of slots) over (rank, dataloader worker)."""
    if rank is None or world_size is None:
        dist = torch.distributed
        ok = dist.is_available() and dist.is_initialized()
        rank, world_size = (dist.get_rank(), dist.get_world_size()) if ok else (0, 1)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} not in [0, world_size={world_size})")
    wi = get_worker_info()
    w, nw = (wi.id, wi.num_workers) if wi is not None else (0, 1)
    return rank * nw + w, world_size * nw


class ImageNetShards(IterableDataset):
    """Infinite resampled stream of {"image": float32 [3,H,W], "labels": LongTensor([row]), "key"}.

    Shards are split across the (rank, worker) slots first, then resampled within each slot's
    subset, so different processes and workers see disjoint samples. With fewer shards than slots
    every slot reads all shards and keeps sample i of a shard where i % n_slots == slot.
    rows: LongTensor [num_classes] cls -> vocabulary row (None = identity); samples whose row is
    negative (class not in the vocabulary) are dropped. transform(image PIL RGB, None, rng) ->
    (tensor [3,H,W], None); None = normalise at full size. Set `.seed` before iterating to
    reseed (mixing does this for resumption). Undecodable samples are skipped and counted in
    `.num_corrupt` (shared with the loader's workers).
    """

    def __init__(
        self,
        root: str | Path,
        rows: torch.Tensor | None = None,
        transform: Callable | None = None,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        shuffle_buffer: int = 1000,
    ) -> None:
        super().__init__()
        self.root = Path(root)
        path = self.root / "info.json"
        if not path.exists():
            raise FileNotFoundError(
                f"{path} missing: write shards with scripts/shard_imagenet21k.py"
            )
        info = json.loads(path.read_text())
        self.synsets: list[str] = info["synsets"]
        self.names = self.synsets  # local class names in local order (wnids)
        self.num_samples: int = info["num_samples"]
        self.urls = [str(self.root / s["filename"]) for s in info["shards"] if s["num_samples"]]
        if not self.urls:
            raise ValueError(f"{path}: no non-empty shards")
        if rows is not None and (rows.dim() != 1 or len(rows) != len(self.synsets)):
            raise ValueError(
                f"rows must be a LongTensor [{len(self.synsets)}] (one per synset of "
                f"{path}), got shape {tuple(rows.shape)}"
            )
        self.rows = rows
        self.transform = transform
        self.seed = seed
        self.rank, self.world_size = rank, world_size
        self.shuffle_buffer = shuffle_buffer
        self._corrupt = mp.get_context("fork").Value("q", 0)

    def set_seed(self, seed: int) -> None:
        """Reseed the stream (takes effect at the next iter())."""
        self.seed = seed

    @property
    def num_corrupt(self) -> int:
        return int(self._corrupt.value)

    def _samples(self, urls: Iterator[dict], keep: int | None, n_slots: int) -> Iterator[dict]:
        for u in urls:
            stream = wds.tarfile_samples([{"url": u["url"]}], handler=wds.warn_and_continue)
            for i, s in enumerate(stream):
                if keep is None or i % n_slots == keep:
                    yield s

    def __iter__(self) -> Iterator[dict]:
        slot, n_slots = _slot(self.rank, self.world_size)
        if len(self.urls) >= n_slots:
            mine, keep = self.urls[slot::n_slots], None
        else:
            mine, keep = self.urls, slot
        shards = wds.ResampledShards(
            mine, seed=self.seed, worker_seed=lambda: slot, deterministic=True
        )
        rng = np.random.default_rng([self.seed, slot])
        shuffle = wds.shuffle(
            self.shuffle_buffer,
            min(100, self.shuffle_buffer),
            rng=random.Random(int(rng.integers(2**62))),
        )
        for s in shuffle(self._samples(iter(shards), keep, n_slots)):
            try:
                c = int(s["cls"])
                row = c if self.rows is None else int(self.rows[c])
                if row < 0:
                    continue
                with Image.open(io.BytesIO(s["jpg"])) as im:
                    img = im.convert("RGB")
            except (OSError, SyntaxError, ValueError, KeyError, IndexError) as e:
                with self._corrupt.get_lock():
                    self._corrupt.value += 1
                    n = self._corrupt.value
                log.warning(
                    "skipping undecodable sample %s in %s (%s); %d so far",
                    s.get("__key__"),
                    s.get("__url__"),
                    e,
                    n,
                )
                continue
            if self.transform is None:
                x = normalize(np.asarray(img))
            else:
                x, _ = self.transform(img, None, rng)
            yield {"image": x, "labels": torch.tensor([row], dtype=torch.long), "key": s["__key__"]}
