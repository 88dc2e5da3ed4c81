"""A tiny exported model and the helpers the eval / predict script tests share."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from larvess.checkpoint import export_model
from larvess.model import ClassTable, Segmenter
from larvess.vocab import Vocabulary

ROOT = Path(__file__).resolve().parents[1]
INFER = dict(window=64, stride=48, short_side=64)
CLI = ["--window", "64", "--stride", "48", "--short-side", "64", "--device", "cpu"]
MODEL_ARGS = dict(
    backbone="vit_tiny_patch16_224",
    dim=8,
    img_size=64,
    backbone_kwargs=dict(depth=1, embed_dim=48, num_heads=3),
)
MASK_CLASSES = [["wall"], ["building", "edifice"], ["sky"], ["floor", "flooring"], ["tree"]]
# 290 extra image-level classes: the full vocabulary has 300 rows (> 256: 16-bit label PNGs)
IMAGE_CLASSES = [["bed"], ["window", "windowpane"], ["grass"], ["cabinet"], ["person"]] + [
    [f"extra thing {i}"] for i in range(290)
]
BASE = {syn[0] for syn in MASK_CLASSES}
ADE150_NAMES = ["bed", "wall", "window, windowpane", "sky", "grass", "building, edifice", "tree"]
ADE847_NAMES = ["floor, flooring", "person", "cabinet", "wall", "tree"]


def run_script(name: str, args: list[str]) -> subprocess.CompletedProcess:
    """scripts/<name>.py in a subprocess, as a user runs it (the package is pip-installed)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, str(ROOT / "scripts" / f"{name}.py"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)


def smooth_image(h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (h // 10 + 2, w // 10 + 2, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((w, h), Image.BILINEAR))


def read_array(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im)


@dataclass
class Model:
    run: Path
    segmenter: Segmenter
    mu: torch.Tensor  # [300, d] normalised rows
    row_of: dict[str, int]  # display name -> vocabulary row
    names: list[str]  # display name of every row


def make_model(run: Path) -> Model:
    """A tiny exported model (ViT depth 1, d = 8, 300 rows) in the run folder `run`."""
    torch.manual_seed(0)
    segmenter = Segmenter(**MODEL_ARGS)
    vocab = Vocabulary()
    rows = vocab.add_source("coco", MASK_CLASSES, has_masks=True).tolist()
    rows += vocab.add_source("in21k", IMAGE_CLASSES, has_masks=False).tolist()
    row_of = {syn[0]: int(r) for syn, r in zip(MASK_CLASSES + IMAGE_CLASSES, rows)}
    # Rows of the 10 named classes = embeddings of 10 different cells of an image, so that the
    # random model predicts several classes on other images too.
    img = torch.tensor(smooth_image(64, 64, 99)).permute(2, 0, 1).float() / 255.0
    with torch.no_grad():
        cells = segmenter.eval()((img[None] - 0.45) / 0.25)[0].flatten(1).T  # [16, d]
    init = F.normalize(
        torch.randn(len(vocab), 8, generator=torch.Generator().manual_seed(1)), dim=1
    )
    init[:10] = cells[torch.randperm(16, generator=torch.Generator().manual_seed(2))[:10]]
    table = ClassTable(len(vocab), 8, init=init)
    export_model(run, segmenter, table, MODEL_ARGS, vocab, step=7)
    with torch.no_grad():
        mu = table()
    return Model(run, segmenter, mu, row_of, vocab.names)


# A 21K-style vocabulary in miniature, real WordNet 3.0 synsets (the shipped table): COCO-like
# mask classes (dog with its synset), ImageNet-like image classes (a breed below dog, a cat below
# animal) and two rows of vocab.extra_names only (untrained): animal, horse.
TREE_MASK = [(["wall"], []), (["sky"], []), (["dog"], ["n02084071"])]
TREE_IMAGE = [(["golden retriever"], "n02099601"), (["tabby", "tabby cat"], "n02123045")]
TREE_EXTRA = [(["animal"], ["n00015388"]), (["horse"], ["n02374451"])]
# evaluated: dog gets the breed's votes, animal only the cat's (never the breed's: the evaluated
# dog is its sibling class), horse nothing (unreached). Animal before dog: a breed vote leaking
# into animal would win the tie and show.
TREE_EVAL_NAMES = ["wall", "sky", "animal", "dog", "horse"]


def make_tree_model(run: Path) -> Model:
    """A tiny exported model (as make_model) over the TREE_* vocabulary (7 rows)."""
    torch.manual_seed(0)
    segmenter = Segmenter(**MODEL_ARGS)
    vocab = Vocabulary()
    rows = vocab.add_source(
        "coco", [c for c, _ in TREE_MASK], [w for _, w in TREE_MASK], has_masks=True
    ).tolist()
    rows += vocab.add_source(
        "in21k", [c for c, _ in TREE_IMAGE], [w for _, w in TREE_IMAGE], by_synset=True
    ).tolist()
    rows += vocab.add_source(
        "extra:names.txt", [c for c, _ in TREE_EXTRA], [w for _, w in TREE_EXTRA]
    ).tolist()
    names = [c[0] for c, _ in TREE_MASK + TREE_IMAGE + TREE_EXTRA]
    row_of = dict(zip(names, rows))
    img = torch.tensor(smooth_image(64, 64, 98)).permute(2, 0, 1).float() / 255.0
    with torch.no_grad():
        cells = segmenter.eval()((img[None] - 0.45) / 0.25)[0].flatten(1).T  # [16, d]
    init = cells[torch.randperm(16, generator=torch.Generator().manual_seed(3))[: len(vocab)]]
    table = ClassTable(len(vocab), 8, init=init)
    export_model(run, segmenter, table, MODEL_ARGS, vocab, step=3)
    with torch.no_grad():
        mu = table()
    return Model(run, segmenter, mu, row_of, vocab.names)
