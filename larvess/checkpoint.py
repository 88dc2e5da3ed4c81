"""Self-contained model export that eval and predict load without the recipe.

A training checkpoint folder (accelerate ``save_state``) also holds ``model.pt`` and
``vocab.json``; the run folder holds the final pair. ``model.pt`` stores the Segmenter's
constructor arguments, so loading needs no recipe and no download.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from larvess.model import ClassTable, Segmenter
from larvess.vocab import Vocabulary

MODEL_FILE = "model.pt"
VOCAB_FILE = "vocab.json"
FORMAT = "larvess-model-1"


@dataclass
class LoadedModel:
    segmenter: Segmenter
    table: ClassTable
    vocab: Vocabulary
    step: int
    path: Path


def export_model(
    folder: str | Path,
    segmenter: Segmenter,
    table: ClassTable,
    model_args: dict,
    vocab: Vocabulary,
    step: int,
) -> Path:
    """Write ``folder/model.pt`` and ``folder/vocab.json`` atomically (rename when complete)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": FORMAT,
        "model_args": dict(model_args),
        "num_classes": len(vocab),
        "segmenter": {k: v.detach().cpu() for k, v in segmenter.state_dict().items()},
        "table": {k: v.detach().cpu() for k, v in table.state_dict().items()},
        "step": int(step),
    }
    tmp = folder / (MODEL_FILE + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, folder / MODEL_FILE)
    vocab.save(folder / VOCAB_FILE)
    return folder / MODEL_FILE


def find_model_file(path: str | Path) -> Path:
    """A model.pt itself, a folder holding one, or a run folder (its newest checkpoint)."""
    path = Path(path)
    if path.is_file():
        return path
    if (path / MODEL_FILE).is_file():
        return path / MODEL_FILE
    ckpts = sorted((path / "checkpoints").glob(f"step_*/{MODEL_FILE}"))
    if ckpts:
        return ckpts[-1]
    raise FileNotFoundError(
        f"{path}: no {MODEL_FILE} here, in it, or under its checkpoints/ folder "
        "(pass a run folder, a checkpoint folder or a model.pt file)"
    )


def load_model(path: str | Path, map_location: str | torch.device = "cpu") -> LoadedModel:
    """Rebuild Segmenter, ClassTable and Vocabulary from an export; errors name the file."""
    file = find_model_file(path)
    try:
        payload = torch.load(file, map_location=map_location, weights_only=True)
    except Exception as err:  # a truncated or foreign file: say which one
        raise ValueError(f"{file}: not a readable larvess model file ({err})") from err
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{file}: not a larvess model file (format {FORMAT} expected)")
    vocab_file = file.parent / VOCAB_FILE
    if not vocab_file.is_file():
        raise FileNotFoundError(f"{vocab_file}: the vocabulary saved beside {file.name} is missing")
    vocab = Vocabulary.load(vocab_file)
    segmenter = Segmenter(**payload["model_args"])
    segmenter.load_state_dict(payload["segmenter"])
    table_state = payload["table"]
    num_classes, dim = next(iter(table_state.values())).shape
    table = ClassTable(num_classes, dim)
    table.load_state_dict(table_state)
    if num_classes != len(vocab):
        raise ValueError(f"{file}: {num_classes} table rows but {len(vocab)} vocabulary entries")
    segmenter.eval()
    table.eval()
    return LoadedModel(segmenter, table, vocab, int(payload["step"]), file)
