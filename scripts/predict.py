"""Thin wrapper of larvess-predict (larvess/commands/predict.py): segment images, see --help."""

import sys

from larvess.commands.predict import main

if __name__ == "__main__":
    sys.exit(main())
