"""Thin wrapper of larvess-eval (larvess/commands/eval_ade.py): ADE-150 / 847 mIoU, see --help."""

import sys

from larvess.commands.eval_ade import main

if __name__ == "__main__":
    sys.exit(main())
