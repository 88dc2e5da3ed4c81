"""`python -m larvess`: list the console commands; `python -m larvess NAME ARGS...` runs one.

NAME is the command with or without its ``larvess-`` prefix (``python -m larvess train ...`` is
``larvess-train ...``). The descriptions are the first lines of the commands' module docstrings,
read without importing them (so the listing does not import torch).
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import sys
from pathlib import Path

from larvess.commands import COMMANDS


def summary(module: str) -> str:
    """First line of a module's docstring, from its source (not imported)."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        return "(not installed)"
    doc = ast.get_docstring(ast.parse(Path(spec.origin).read_text(encoding="utf-8")))
    return (doc or "").strip().split("\n")[0]


def listing() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = ["larvess console commands (each also runs as `python -m larvess NAME ...`):"]
    lines += [f"  {name:<{width}}  {summary(module)}" for name, module in COMMANDS.items()]
    lines.append("Run any with --help for its arguments. Python API: from larvess import Predictor")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(listing())
        return 0
    name = argv[0] if argv[0].startswith("larvess-") else f"larvess-{argv[0]}"
    if name not in COMMANDS:
        print(f"error: unknown command {argv[0]!r}\n{listing()}", file=sys.stderr)
        return 2
    command = importlib.import_module(COMMANDS[name])
    return int(command.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
