"""Count the places where project code makes the host wait on the device.

On a GPU each of these drains the queue: the host cannot run ahead and launch the next kernels
while it waits for a value. On the CPU nothing waits, but the same calls are the ones that would,
so counting them here tells a GPU run's story before it runs:

- reading a value: ``.item()``, ``.tolist()``, ``bool(t)`` / ``if t``, ``int(t)``, ``float(t)``,
  ``t.__index__()``;
- a shape that depends on values: ``nonzero``, boolean-mask indexing ``t[mask]``,
  ``torch.unique`` / ``unique_consecutive``, ``masked_select``, ``repeat_interleave`` with a
  tensor of repeats.

Only calls made directly from files under ``root`` count (default the larvess package, less its
data readers, which run on the host by design). On CUDA, ``torch.cuda.set_sync_debug_mode`` is
the device's own view; this counter works on any device.

    with count_syncs() as counts:
        run_a_step()
    print(sum(counts.values()), counts.most_common(5))   # "file:line" -> calls
"""

from __future__ import annotations

import contextlib
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import torch

__all__ = ["count_syncs"]

PACKAGE = Path(__file__).resolve().parent
_METHODS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero")
_FUNCTIONS = ("nonzero", "unique", "unique_consecutive", "masked_select")


def _is_mask(index: object) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(torch.is_tensor(i) and i.dtype == torch.bool for i in items)


@contextlib.contextmanager
def count_syncs(
    root: str | Path = PACKAGE, exclude: tuple[str, ...] = ("data",)
) -> Iterator[Counter]:
    """Counter of sync-like calls by "path:line" (relative to root) while the block runs."""
    root = Path(root).resolve()
    skip = tuple(str(root / e) for e in exclude) + (__file__,)
    counts: Counter = Counter()

    def site(depth: int = 2) -> str | None:
        f = sys._getframe(depth).f_code.co_filename
        if f.startswith(str(root)) and not f.startswith(skip):
            return f"{Path(f).relative_to(root)}:{sys._getframe(depth).f_lineno}"
        return None

    def wrap(orig, check=None):
        def wrapper(*args, **kwargs):
            if check is None or check(*args, **kwargs):
                where = site()
                if where is not None:
                    counts[where] += 1
            return orig(*args, **kwargs)

        return wrapper

    patched: list[tuple[object, str, object]] = []

    def patch(owner: object, name: str, check=None) -> None:
        orig = getattr(owner, name)
        patched.append((owner, name, orig))
        setattr(owner, name, wrap(orig, check))

    for name in _METHODS:
        patch(torch.Tensor, name)
    patch(torch.Tensor, "__getitem__", lambda t, index: _is_mask(index))
    for name in _FUNCTIONS:
        patch(torch, name)
    patch(torch, "repeat_interleave", lambda x, repeats=None, *a, **k: torch.is_tensor(repeats))
    try:
        yield counts
    finally:
        for owner, name, orig in reversed(patched):
            setattr(owner, name, orig)
