"""Thin wrapper of larvess-train (larvess/commands/train.py): train from a recipe, see --help."""

import sys

from larvess.commands.train import main

if __name__ == "__main__":
    sys.exit(main())
