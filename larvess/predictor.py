"""The Python API: a trained run as a predictor, ``Predictor.from_run(path).predict(image)``.

    from larvess import Predictor
    pred = Predictor.from_run("runs/c171_i21k", classes=["sky", "tree", "person"])
    labels, names = pred.predict("photo.jpg")  # int64 [H, W] indexing names

``larvess-predict`` / scripts/predict.py and ``larvess-eval`` / scripts/eval_ade.py go through the
same ``from_run`` and ``predict``, so a notebook and the commands agree pixel for pixel. The
sliding-window settings (window, stride, short side, windows per forward) are the run's own
(the ``eval:`` section of its recipe.yaml; the EvalConfig defaults for a model.pt without one).

Roll-up (larvess/rollup.py): with ``classes``, each class scores as the best trained row inside
its meaning (a 21K model's breed rows vote for "dog"), on by default when the tree puts any
trained row inside an asked class other than its own (``rollup=False``: only the class's own
row). Over the whole vocabulary (``classes=None``) ``rollup=True`` reports each pixel as the
top-level row above its best row (rows no other trained row covers). Untrained rows (those of
``vocab.extra_names`` only) never take a pixel; a class nothing trained reaches is in
``unreached`` and never predicted.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from larvess.checkpoint import load_model, run_dir_of
from larvess.config import EvalConfig, load_recipe
from larvess.inference import classify_embeddings, embed_image
from larvess.model import Segmenter
from larvess.rollup import (
    Votes,
    class_votes,
    plain_votes,
    run_tree,
    top_level,
    trained_rows,
    with_classes,
)
from larvess.synsets import synsets_for_class_list

Image.MAX_IMAGE_PIXELS = None  # large photos are fine; inference resizes to the short side first

ClassSpec = str | Sequence[str]  # a class name, or its synonyms (the first one is displayed)


def open_rgb(path: str | os.PathLike) -> np.ndarray:
    """RGB uint8 [H, W, 3] with EXIF rotation applied and transparency over white.

    Raises ValueError naming the file when it cannot be read as an image.
    """
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            if im.mode in ("RGBA", "LA", "P"):
                im = im.convert("RGBA")
                bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
                im = Image.alpha_composite(bg, im)
            return np.asarray(im.convert("RGB"))
    except (OSError, SyntaxError, ValueError) as err:
        raise ValueError(f"{path}: cannot read as an image ({err})") from err


def _synonym_lists(classes: Sequence[ClassSpec]) -> list[list[str]]:
    """Each entry a plain name or a list of synonyms -> a list of synonym lists."""
    if isinstance(classes, str):
        raise TypeError(
            f"classes must be a list of class names, got the string {classes!r} "
            f"(write [{classes!r}] for one class)"
        )
    out = []
    for i, c in enumerate(classes):
        syn = [c] if isinstance(c, str) else list(c)
        if not syn or not all(isinstance(s, str) and s.strip() for s in syn):
            raise ValueError(f"classes[{i}] = {c!r}: expected a class name or a list of names")
        out.append([s.strip() for s in syn])
    return out


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass
class Predictor:
    """A trained model ready for inference over a chosen set of classes (K of them)."""

    segmenter: Segmenter
    mu: torch.Tensor  # [K, d] unit rows of the chosen classes, on `device`
    rows: torch.Tensor  # [K] their vocabulary rows
    names: list[str]  # display name of each chosen class
    is_base: torch.Tensor  # [K] bool: had pixel masks in training
    eval: EvalConfig  # window / stride / short side of the run's recipe (defaults without one)
    step: int  # training step of the loaded export
    path: Path  # the model.pt loaded
    device: torch.device
    votes: dict[str, Votes]  # protocol ("plain", "rollup") -> which rows vote for which class
    vote_mu: dict[str, torch.Tensor]  # protocol -> [M, d] its distinct voting rows, on `device`
    vote_label: dict[str, torch.Tensor]  # protocol -> [M] the class each of them labels
    protocol: str  # the protocol ``predict`` uses
    unreached: torch.Tensor  # [K] bool: no trained row reaches the class; never predicted
    notes: list[str]  # what the tree could not place, worth printing

    @classmethod
    def from_run(
        cls,
        path: str | os.PathLike,
        classes: Sequence[ClassSpec] | None = None,
        device: str | torch.device | None = None,
        rollup: bool | None = None,
    ) -> Predictor:
        """Load a run folder, a checkpoint folder or a model.pt.

        Args:
            path: run folder (its final model.pt, else its newest checkpoint), checkpoint
                folder or model.pt file.
            classes: the classes to choose from, each a name (``"sky"``) or a list of synonyms
                (``["window", "windowpane"]``), matched to the model's vocabulary by name and
                curated WordNet synset; None = the whole trained vocabulary.
            device: where the model runs; None = CUDA when available, else the CPU.
            rollup: None = on with ``classes`` when some trained row lies inside an asked
                class other than its own, off over the whole vocabulary; True = roll up (the
                whole vocabulary: to its top-level rows); False = each class's own row only.
        Raises:
            ValueError naming the model file and the classes it has no row for.
        """
        dev = torch.device(device) if device is not None else _default_device()
        loaded = load_model(path)
        vocab = loaded.vocab
        recipe_file = run_dir_of(loaded.path) / "recipe.yaml"
        recipe = load_recipe(recipe_file) if recipe_file.is_file() else None
        ev = recipe.eval if recipe is not None else EvalConfig()
        hierarchy_file = recipe.vocab.hierarchy_file if recipe is not None else None
        notes: list[str] = []
        trained_tree = None  # the run's tree, when training expanded labels along it
        if recipe is not None and recipe.loss.hierarchy == "tree":
            trained_tree, notes = run_tree(vocab, hierarchy_file, str(recipe_file))
        trained = trained_rows(vocab, trained_tree)
        votes: dict[str, Votes] = {}
        if classes is None and rollup:
            tree = trained_tree
            if tree is None:
                tree, notes = run_tree(vocab, hierarchy_file, str(recipe_file))
            rows, votes["rollup"] = top_level(tree, trained)
            names = [vocab.names[r] for r in rows.tolist()]
            unreached = ~votes["rollup"].reached()  # none: every top-level row votes for itself
        elif classes is None:
            rows = torch.arange(len(vocab))
            names = list(vocab.names)
            votes["plain"] = plain_votes(rows, trained)
            unreached = ~trained
        else:
            wanted = _synonym_lists(classes)
            curated = synsets_for_class_list(wanted)
            rows = vocab.match(wanted, curated)
            missing = [wanted[i][0] for i in torch.nonzero(rows < 0).flatten().tolist()]
            if missing:
                raise ValueError(
                    f"{loaded.path}: {len(missing)} of {len(rows)} classes are not in the model's "
                    f"vocabulary (e.g. {missing[:8]}); train with their names file in "
                    "vocab.extra_names (with loss.negatives=all) so they get rows"
                )
            names = [c[0] for c in wanted]
            # the asked classes are one more dataset: a partition, so residual classes mean
            # "the rest" (rollup.py)
            tree, tree_notes = run_tree(
                with_classes(vocab, rows, wanted, curated), hierarchy_file, str(recipe_file)
            )
            notes = list(dict.fromkeys(notes + tree_notes))
            votes["plain"] = plain_votes(rows, trained)
            rolled = class_votes(tree, rows, trained)
            if rollup or (rollup is None and rolled.rolls_up(rows)):
                votes["rollup"] = rolled
            elif rollup is None:
                notes.append("roll-up: no trained row lies inside an asked class but its own")
            unreached = ~rolled.reached()
        if bool(unreached.any()):
            shown = [names[i] for i in torch.nonzero(unreached).flatten().tolist()]
            notes.append(
                f"{len(shown)} classes no training source reaches (no masks, no image label, no "
                f"trained row inside them), never predicted: {shown[:20]}"
            )
        seg = loaded.segmenter.to(dev)
        with torch.no_grad():
            table = loaded.table().to(dev)
        mu = table[rows.to(dev)]
        picks = {k: v.argmax_rows() for k, v in votes.items()}
        vote_mu = {k: table[r.to(dev)] for k, (r, _) in picks.items()}
        vote_label = {k: lab for k, (_, lab) in picks.items()}
        protocol = "rollup" if "rollup" in votes else "plain"
        is_base = vocab.is_base(rows)
        return cls(seg, mu, rows, names, is_base, ev, loaded.step, loaded.path, dev, votes,
                   vote_mu, vote_label, protocol, unreached, notes)  # fmt: skip

    def predict(
        self,
        image: np.ndarray | Image.Image | str | os.PathLike,
        *,
        window: int | None = None,
        stride: int | None = None,
        short_side: int | None = None,
        batch_size: int | None = None,
        progress: bool = False,
    ) -> tuple[np.ndarray, list[str]]:
        """Segment one image with the run's sliding-window settings (keywords override them).

        Args:
            image: uint8 RGB [H, W, 3] array, a PIL image, or an image file path (EXIF rotation
                applied, transparency over white).
        Returns:
            (labels, names): int64 [H, W] indices into ``names`` (this predictor's classes),
            under ``self.protocol``.
        """
        got = self.predict_protocols(
            image, window=window, stride=stride, short_side=short_side,
            batch_size=batch_size, progress=progress, protocols=(self.protocol,),
        )  # fmt: skip
        return got[self.protocol], list(self.names)

    def predict_protocols(
        self,
        image: np.ndarray | Image.Image | str | os.PathLike,
        *,
        window: int | None = None,
        stride: int | None = None,
        short_side: int | None = None,
        batch_size: int | None = None,
        progress: bool = False,
        protocols: Sequence[str] | None = None,
    ) -> dict[str, np.ndarray]:
        """One segmenter pass, labelled under each protocol (default: all of ``self.votes``):
        protocol -> int64 [H, W] indices into ``names``."""
        if isinstance(image, str | os.PathLike):
            image = open_rgb(image)
        ev = self.eval
        x, out_size = embed_image(
            self.segmenter,
            image,
            window=window or ev.window,
            stride=stride or ev.stride,
            short_side=short_side or ev.short_side,
            batch_size=batch_size or ev.batch_size,
            device=self.device,
            amp=self.device.type == "cuda",
            progress=progress,
        )
        out = {}
        for name in protocols or list(self.votes):
            label = self.vote_label[name]
            # every class votes with its own row: the plain argmax, as before roll-up existed
            identity = len(label) == len(self.names) and bool(
                (label == torch.arange(len(label))).all()
            )
            labels = classify_embeddings(
                x, self.vote_mu[name], out_size, classes=None if identity else label
            )
            out[name] = labels.cpu().numpy()
        return out
