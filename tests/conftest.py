"""Shared fixtures: a tiny exported model (eval / predict tests) and a tiny toy world with the
overrides that shrink recipes/toy.yaml to a model that steps in ~0.1 s (training tests).

Markers: ``slow`` = multi-process runs (two gloo processes, a killed job, the demo). ``make test``
runs everything; ``pytest -m "not slow"`` is the quick loop.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from exported_model import Model, make_model

from larvess.data.imagenet_shards import write_shards
from larvess.data.toy import make_toy_world

ROOT = Path(__file__).resolve().parents[1]


def pytest_configure(config) -> None:
    config.addinivalue_line(
        "markers", "slow: multi-process or end-to-end runs (seconds to minutes)"
    )


@pytest.fixture(scope="session")
def model(tmp_path_factory) -> Model:
    return make_model(tmp_path_factory.mktemp("run"))


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("toy")
    make_toy_world(out, seed=3, size=64, n_coco=24, n_imagenet_per_class=3, n_ade_train=24,
                   n_ade_val=4, num_base=4, num_novel=4, workers=1, progress=False)  # fmt: skip
    write_shards(out / "imagenet", out / "shards", shard_size=4, workers=1)
    return out


def tiny(world: Path, runs: Path, name: str, steps: int, *extra: str, imagenet=True) -> list[str]:
    """Overrides that shrink recipes/toy.yaml to a model and batches that step in ~0.1 s.

    imagenet=False keeps the map-style sources only, whose data stream resumes exactly."""
    args = [str(ROOT / "recipes" / "toy.yaml"), f"name={name}", f"runs_dir={runs}"]
    names = ["coco", "imagenet", "wa"] if imagenet else ["coco", "wa"]
    if not imagenet:  # the list is replaced first, then its entries are set by name
        args.append(
            "data=[{name: coco, kind: coco_stuff, root: x}, {name: wa, kind: wa150, root: y}]"
        )
    args += [
        "model.backbone_kwargs={depth: 1, embed_dim: 48, num_heads: 3}",
        "model.img_size=64",
        "model.dim=8",
        f"schedule.steps={steps}",
        "schedule.warmup_steps=1",
        "train.log_every=1",
        "loss.ca_bank_size=2",
        "loss.ca_topk=4",
        f"data.coco.root={world / 'coco_stuff'}",
        f"data.wa.root={world / 'ade'}",
        f"vocab.alias_file={world / 'aliases.txt'}",
        f"vocab.hierarchy_file={world / 'hypernyms.tsv'}",
    ]
    if imagenet:
        args += [f"data.imagenet.root={world / 'shards'}",
                 f"data.imagenet.names={world / 'imagenet_lemmas.txt'}"]  # fmt: skip
    for n in names:
        args += [f"data.{n}.batch_size=2", f"data.{n}.crop_size=64", f"data.{n}.num_workers=0"]
    return args + list(extra)
