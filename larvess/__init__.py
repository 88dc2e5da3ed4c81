"""larvess: large-vocabulary semantic segmentation (ESS + LarvSeg).

``from larvess import Predictor`` is the Python API (larvess/predictor.py); the console commands
are in larvess/commands/ (``python -m larvess`` lists them). ``import larvess`` stays light: the
Predictor (and with it torch) is imported on first use.
"""

from __future__ import annotations

from importlib import metadata
from typing import TYPE_CHECKING, Any

__all__ = ["Predictor", "__version__"]

try:
    __version__ = metadata.version("larvess")
except metadata.PackageNotFoundError:  # a source tree that was never pip-installed
    __version__ = "0.1.0"  # = pyproject.toml's version (tests/test_commands.py checks)

if TYPE_CHECKING:
    from larvess.predictor import Predictor


def __getattr__(name: str) -> Any:
    if name == "Predictor":
        from larvess.predictor import Predictor

        return Predictor
    raise AttributeError(f"module 'larvess' has no attribute {name!r}")
