"""Every checkpoint path rule: save, newest complete, resume state, model export and load.

Layout of a run folder::

    runs/<name>/recipe.yaml, git.txt, vocab.json, tb/
    runs/<name>/checkpoints/step_00001000/   accelerate save_state + model.pt + vocab.json
                                             + trainer_state.json (written last: "complete")
    runs/<name>/model.pt, vocab.json         the final export (larvess: segmenter + class table)
    runs/<name>/backbone/                    the ViT alone for timm: config.json + model.safetensors
                                             (timm.create_model("local-dir:runs/<name>/backbone"))

A checkpoint is written into ``.tmp_step_*`` and renamed when complete, so a killed job never
leaves a half checkpoint that looks finished. ``model.pt`` stores the Segmenter's constructor
arguments, so loading needs no recipe and no download.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from larvess.data.transforms import MEAN, STD
from larvess.model import ClassTable, Segmenter
from larvess.vocab import Vocabulary

MODEL_FILE = "model.pt"
VOCAB_FILE = "vocab.json"
FORMAT = "larvess-model-1"
STATE_FILE = "trainer_state.json"
BACKBONE_DIR = "backbone"
CKPT_DIR = "checkpoints"


def complete_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoint folders of a run (their state file is written last), oldest first."""
    done = [p.parent for p in (Path(run_dir) / CKPT_DIR).glob(f"step_*/{STATE_FILE}")]
    return sorted(done, key=lambda p: int(p.name.split("_")[1]))


def find_resume(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    done = complete_checkpoints(run_dir)
    return done[-1] if done else None


def read_state(ckpt: str | Path) -> dict:
    """Trainer state of a checkpoint: {"step", "bad_steps", ...}; errors name the file."""
    path = Path(ckpt) / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not a complete checkpoint (no {STATE_FILE})")
    return json.loads(path.read_text())


def run_dir_of(model_file: str | Path) -> Path:
    """The run folder of a model.pt: its folder, or the run above checkpoints/step_*/."""
    folder = Path(model_file).resolve().parent
    return folder.parent.parent if folder.parent.name == CKPT_DIR else folder


def save_checkpoint(accelerator, run_dir: Path, step: int, state: dict, keep: int, on_checkpoint):
    """accelerate save_state into a temp folder, renamed when complete; keeps the newest `keep`.

    state: the trainer's counters (engine.TrainState.to_json(): step, bad_steps, unreadable,
    ...), written last as trainer_state.json.

    on_checkpoint(folder, step) adds files (model export, vocabulary) before the folder is
    marked complete. Every process calls this; only the main one writes outside save_state.
    """
    ckpt_root = Path(run_dir) / CKPT_DIR
    final = ckpt_root / f"step_{step:08d}"
    tmp = ckpt_root / f".tmp_step_{step:08d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if on_checkpoint is not None:
            on_checkpoint(tmp, step)
        (tmp / STATE_FILE).write_text(json.dumps(dict(state, step=step)))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in complete_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


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


def export_backbone(run_dir: str | Path, segmenter: Segmenter, model_args: dict) -> Path:
    """Write ``run_dir/backbone/``: the trained ViT in timm's local-dir format.

    ``timm.create_model("local-dir:RUN/backbone", pretrained=True)`` rebuilds it from
    config.json (architecture, model_args) and loads model.safetensors; its pretrained_cfg
    carries the normalisation larvess trains with (MEAN / STD of data/transforms.py, not the
    augreg 0.5 / 0.5) and the model's input size, so ``timm.data.resolve_data_config`` gives
    the right transforms. Its forward_features are larvess's backbone features (before the
    embedding head). A conv-stem backbone has no timm architecture: README.txt says so.
    Written into a temp folder and renamed when complete.
    """
    final = Path(run_dir) / BACKBONE_DIR
    tmp = final.with_name(BACKBONE_DIR + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if model_args.get("stem", "patch") != "patch":
        (tmp / "README.txt").write_text(
            f"No timm export: this run's backbone has a convolutional stem (model.stem = "
            f"{model_args.get('stem')!r}) in place of the ViT's patch projection, which timm's "
            f"{model_args['backbone']!r} cannot build. Load the run with larvess instead: "
            "larvess.Predictor.from_run(RUN), or larvess.checkpoint.load_model(RUN).segmenter.\n"
        )
    else:
        bb = segmenter.backbone
        arch = model_args["backbone"].split(".")[0]  # a hub tag names weights, not the model
        kwargs = dict(model_args.get("backbone_kwargs", {}))
        kwargs.pop("drop_path_rate", None)  # a training regulariser, not the architecture
        size = int(model_args["img_size"])
        config = {
            "architecture": arch,
            "num_classes": 0,
            "num_features": int(bb.num_features),
            "global_pool": getattr(bb, "global_pool", "token") or "token",
            "model_args": {"img_size": size, "dynamic_img_size": True, **kwargs},
            "pretrained_cfg": {
                "architecture": arch,
                "tag": "larvess",
                "input_size": [3, size, size],
                "fixed_input_size": False,
                "interpolation": "bilinear",  # inference.py's resize
                "crop_pct": 1.0,
                "crop_mode": "center",
                "mean": list(MEAN),
                "std": list(STD),
                "num_classes": 0,
                "first_conv": "patch_embed.proj",
                "classifier": "head",
                "custom_load": False,
            },
        }
        state = {k: v.detach().cpu().contiguous() for k, v in bb.state_dict().items()}
        save_file(state, str(tmp / "model.safetensors"))
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return final


def find_model_file(path: str | Path) -> Path:
    """A model.pt itself, a folder holding one, or a run folder (its newest checkpoint)."""
    path = Path(path)
    if path.is_file():
        return path
    if (path / MODEL_FILE).is_file():
        return path / MODEL_FILE
    ckpts = [c for c in complete_checkpoints(path) if (c / MODEL_FILE).is_file()]
    if ckpts:
        return ckpts[-1] / MODEL_FILE
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
