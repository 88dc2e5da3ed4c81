"""Thin wrapper of larvess/commands/demo.py: the whole pipeline on a toy world (`make demo`)."""

import sys

from larvess.commands.demo import main

if __name__ == "__main__":
    sys.exit(main())
