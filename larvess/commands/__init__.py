"""Command-line entry points: each module's main(argv) is a console command and a script."""

from __future__ import annotations

# console command -> its module (pyproject.toml's [project.scripts] point at MODULE:main; a test
# checks both agree). `python -m larvess` lists them, `python -m larvess NAME ...` runs one.
COMMANDS = {
    "larvess-train": "larvess.commands.train",
    "larvess-shard": "larvess.commands.shard",
    "larvess-eval": "larvess.commands.eval_ade",
    "larvess-predict": "larvess.commands.predict",
    "larvess-prepare-ade847": "larvess.commands.prepare_ade847",
}
