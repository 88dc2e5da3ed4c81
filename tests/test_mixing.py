import itertools

import numpy as np
import pytest
import torch
from data_fixtures import make_ade150
from torch.utils.data import IterableDataset

from larvess.data.ade import AdeTrain
from larvess.data.mixing import MixedBatches, collate, source_loader
from larvess.data.transforms import TrainAugment


class Numbers:
    """Map-style dataset: image = [index, a random draw of the sample's rng]."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def get(self, index, rng):
        r = int(rng.integers(1 << 30))
        return {
            "image": torch.tensor([index, r]),
            "labels": torch.tensor([index % 3]),
            "key": str(index),
        }


def take(it, k):
    return list(itertools.islice(it, k))


def indices(batches):
    return [int(i) for b in batches for i in b["image"][:, 0]]


@pytest.mark.parametrize("workers", [0, 2])
def test_ranks_are_disjoint_and_cover_each_epoch(workers):
    n, bs, ws = 24, 3, 2
    per_rank_epoch = n // ws // bs  # 4 batches of 3 per rank per epoch
    got = {}
    for r in range(ws):
        got[r] = take(
            source_loader(Numbers(n), bs, workers, seed=7, rank=r, world_size=ws),
            2 * per_rank_epoch,
        )
    for e in range(2):
        sl = slice(e * per_rank_epoch, (e + 1) * per_rank_epoch)
        a, b = indices(got[0][sl]), indices(got[1][sl])
        assert not set(a) & set(b) and sorted(a + b) == list(range(n))
    # the two epochs use different permutations
    assert indices(got[0][:per_rank_epoch]) != indices(got[0][per_rank_epoch:])


def test_batches_identical_for_any_worker_count_and_on_resume():
    ds = Numbers(10)  # batches of 4 straddle epoch boundaries
    ref = take(source_loader(ds, 4, 0, seed=3, rank=1, world_size=2), 7)
    w2 = take(source_loader(ds, 4, 2, seed=3, rank=1, world_size=2), 7)
    for a, b in zip(ref, w2):
        assert torch.equal(a["image"], b["image"]) and a["key"] == b["key"]
    assert all(len(b["key"]) == 4 for b in ref)
    for workers in (0, 2):
        resumed = take(
            source_loader(ds, 4, workers, seed=3, rank=1, world_size=2, start_batch=4), 3
        )
        for a, b in zip(ref[4:], resumed):
            assert torch.equal(a["image"], b["image"])
    other_seed = take(source_loader(ds, 4, 0, seed=4, rank=1, world_size=2), 1)[0]
    assert not torch.equal(other_seed["image"], ref[0]["image"])


def test_real_reader_through_loader_and_mixing(tmp_path):
    d = make_ade150(tmp_path, n_images=3, n_classes=5)
    weak = AdeTrain(d, weak=True, transform=TrainAugment(crop_size=32, pad=False))
    masks = AdeTrain(d, transform=TrainAugment(crop_size=32))
    for ds in (weak, masks):
        ds.set_rows(torch.arange(5))
    a = take(source_loader(weak, 2, 0, seed=1), 2)
    b = take(source_loader(weak, 2, 2, seed=1), 2)
    for x, y in zip(a, b):
        assert torch.equal(x["image"], y["image"]) and x["image"].shape == (2, 3, 32, 32)
        assert isinstance(x["labels"], list) and len(x["labels"]) == 2
        assert all(torch.equal(p, q) for p, q in zip(x["labels"], y["labels"]))
    mixed = MixedBatches(
        {"c": source_loader(masks, 2, 0, seed=1), "w": source_loader(weak, 3, 0, seed=2)}
    )
    steps = take(mixed, 2)
    assert [set(s) for s in steps] == [{"c", "w"}] * 2
    assert steps[0]["c"]["label"].shape == (2, 32, 32) and len(steps[0]["w"]["labels"]) == 3


class Stream(IterableDataset):
    def __init__(self):
        self.seed = None

    def set_seed(self, s):
        self.seed = s

    def __iter__(self):
        rng = np.random.default_rng(self.seed)
        for _ in range(5):
            yield {"image": torch.tensor([int(rng.integers(1000))])}


def test_iterable_datasets_are_seeded_batched_and_restarted():
    ds = Stream()
    batches = take(source_loader(ds, 2, 0, seed=5, rank=0, world_size=2, drop_last=True), 5)
    assert all(b["image"].shape == (2, 1) for b in batches)  # 5 samples -> 2 full batches per pass
    s0 = ds.seed
    source_loader(ds, 2, 0, seed=5, rank=1, world_size=2)
    s1 = ds.seed
    source_loader(ds, 2, 0, seed=5, rank=0, world_size=2, start_batch=10)
    assert len({s0, s1, ds.seed}) == 3
    partial = take(source_loader(Stream(), 2, 0, seed=5, drop_last=False), 3)
    assert [b["image"].shape[0] for b in partial] == [2, 2, 1]


def test_collate_and_bad_arguments():
    samples = [
        {
            "image": torch.zeros(3, 4, 4),
            "label": torch.full((4, 4), -1),
            "labels": torch.tensor([i]),
            "key": str(i),
        }
        for i in range(2)
    ]
    b = collate(samples)
    assert b["image"].shape == (2, 3, 4, 4) and b["label"].shape == (2, 4, 4)
    assert b["key"] == ["0", "1"] and [t.tolist() for t in b["labels"]] == [[0], [1]]
    assert b["lost"] == 0 and b["lost_shards"] == []  # a source that loses nothing
    samples[0] |= {"lost": 3, "lost_shards": ["a.tar", "b.tar"]}
    samples[1] |= {"lost": 2, "lost_shards": ["c.tar"]}
    b = collate(samples)
    assert b["lost"] == 5 and b["lost_shards"] == ["a.tar", "b.tar", "c.tar"]
    samples[1]["labels"] = torch.tensor([-2])
    with pytest.raises(ValueError, match=r"sample '1': 'labels' holds -2, below -1"):
        collate(samples)
    samples[1]["labels"], samples[0]["label"] = torch.tensor([1]), torch.zeros(4, 4)
    with pytest.raises(ValueError, match=r"sample '0': 'label' must be an integer tensor"):
        collate(samples)
    with pytest.raises(ValueError, match="rank=2 world_size=2"):
        source_loader(Numbers(4), 2, 0, seed=0, rank=2, world_size=2)
    with pytest.raises(ValueError, match="batch_size=0"):
        source_loader(Numbers(4), 0, 0, seed=0)
    with pytest.raises(ValueError, match="is empty"):
        source_loader(Numbers(0), 2, 0, seed=0)
    with pytest.raises(ValueError, match="at least one source"):
        MixedBatches({})
