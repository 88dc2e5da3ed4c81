"""Runs larvess-train's run (larvess/commands/train.py) under a launcher and records what this process saw.

Used by tests/test_train.py as `accelerate launch ... tests/train_driver.py OUT RECIPE [overrides]`:
writes OUT/rank<r>.pt with the sample keys drawn per source, the parameters and the CA bank.
"""

import os
import sys
from pathlib import Path

import torch

from larvess import build
from larvess.commands import train

out = Path(sys.argv[1])
seen: dict[str, list[str]] = {}
make_batches = build.build_batches


def recording_batches(*args, **kwargs):
    for step_batch in make_batches(*args, **kwargs):
        for name, batch in step_batch.items():
            seen.setdefault(name, []).extend(batch["key"])
        yield step_batch


build.build_batches = recording_batches
built = train.run(sys.argv[2:])
rank = int(os.environ.get("RANK", 0))  # set by the launcher; the group is gone by now
net = built["accelerator"].unwrap_model(built["net"])
torch.save(
    {
        "keys": seen,
        "params": {k: v.detach().cpu() for k, v in net.state_dict().items()},
        "bank": {k: v.detach().cpu() for k, v in built["ca"].state_dict().items()},
        "step": built["step"],
    },
    out / f"rank{rank}.pt",
)
