"""Semantic segmentation metrics from a confusion matrix (docs/method.md section 7).

The confusion matrix ``conf[g, p]`` counts pixels with ground truth ``g`` predicted as ``p`` over
the K evaluated classes (int64, K x K; memory 8 K^2 bytes, so it is meant for evaluated
vocabularies such as ADE-150/847, not for a 21K training vocabulary).

Per class: TP = conf[c, c], FN = row sum - TP, FP = column sum - TP, IoU = TP / (TP + FP + FN),
Acc = TP / (TP + FN). Two mIoU conventions are reported because papers mix them:

- ``mmseg``: mean over classes with TP + FP + FN > 0, so a class predicted but absent from the
  ground truth counts as IoU 0; classes neither in the ground truth nor predicted are left out.
- ``d2`` (detectron2): mean over classes present in the ground truth only.

Values are fractions in [0, 1]; ``format_summary`` prints percentages.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

ArrayLike = torch.Tensor | np.ndarray


def _as_long_tensor(x: ArrayLike, what: str) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        if not np.issubdtype(x.dtype, np.integer):
            raise TypeError(f"SegMetrics.update: {what} must be an integer array, got {x.dtype}")
        return torch.from_numpy(x.astype(np.int64, copy=False))
    if isinstance(x, torch.Tensor):
        if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
            raise TypeError(f"SegMetrics.update: {what} must be an integer tensor, got {x.dtype}")
        return x.long()
    raise TypeError(f"SegMetrics.update: {what} must be a torch tensor or numpy array")


class SegMetrics:
    """Accumulates a K x K confusion matrix over images and derives IoU / accuracy metrics.

    Args:
        num_classes: K, the number of evaluated classes; labels are 0..K-1.
        ignore_index: ground-truth value whose pixels are skipped.
    """

    def __init__(self, num_classes: int, ignore_index: int = -1) -> None:
        if num_classes <= 0:
            raise ValueError(f"SegMetrics: num_classes must be positive, got {num_classes}")
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.conf = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64)

    def reset(self) -> None:
        self.conf.zero_()

    def update(self, pred: ArrayLike, gt: ArrayLike) -> None:
        """Add one image (or a batch) to the confusion matrix.

        Args:
            pred: int [...] predicted class indices in [0, K) (any shape, torch or numpy).
            gt: int [...] same shape, ground-truth indices in [0, K) or ``ignore_index``.
        """
        pred_t = _as_long_tensor(pred, "pred")
        gt_t = _as_long_tensor(gt, "gt").to(pred_t.device)
        if pred_t.shape != gt_t.shape:
            raise ValueError(
                f"SegMetrics.update: pred shape {tuple(pred_t.shape)} != gt shape "
                f"{tuple(gt_t.shape)}"
            )
        pred_t, gt_t = pred_t.reshape(-1), gt_t.reshape(-1)
        k = self.num_classes
        valid = gt_t != self.ignore_index
        gt_v, pred_v = gt_t[valid], pred_t[valid]
        bad_gt = (gt_v < 0) | (gt_v >= k)
        if bool(bad_gt.any()):
            value = int(gt_v[bad_gt][0])
            raise ValueError(
                f"SegMetrics.update: ground-truth value {value} is outside [0, {k}) and is not "
                f"the ignore index {self.ignore_index}"
            )
        # Predictions are checked everywhere: an out-of-range prediction is a bug upstream even
        # on an ignored pixel.
        bad_pred = (pred_t < 0) | (pred_t >= k)
        if bool(bad_pred.any()):
            value = int(pred_t[bad_pred][0])
            raise ValueError(f"SegMetrics.update: predicted value {value} is outside [0, {k})")
        counts = torch.bincount(gt_v * k + pred_v, minlength=k * k)
        self.conf += counts.reshape(k, k).to(device="cpu", dtype=torch.int64)

    def merge(self, other: SegMetrics) -> SegMetrics:
        """Add another accumulator's counts into this one (returns self)."""
        if other.num_classes != self.num_classes or other.ignore_index != self.ignore_index:
            raise ValueError(
                f"SegMetrics.merge: incompatible accumulators (num_classes {self.num_classes} vs "
                f"{other.num_classes}, ignore_index {self.ignore_index} vs {other.ignore_index})"
            )
        self.conf += other.conf
        return self

    def all_reduce(self) -> SegMetrics:
        """Sum the confusion matrix over all processes when torch.distributed is initialised.

        A no-op in a single process. Returns self.
        """
        if not (dist.is_available() and dist.is_initialized()):
            return self
        device = torch.device("cpu")
        if dist.get_backend() == "nccl":
            device = torch.device("cuda", torch.cuda.current_device())
        conf = self.conf.to(device)
        dist.all_reduce(conf, op=dist.ReduceOp.SUM)
        self.conf = conf.cpu()
        return self

    def compute(
        self,
        base: Sequence[int] | ArrayLike | None = None,
        novel: Sequence[int] | ArrayLike | None = None,
        exclude: Sequence[int] | ArrayLike | None = None,
    ) -> dict:
        """Metrics from the accumulated confusion matrix.

        Args:
            base, novel: class subsets as index lists or bool masks of length K; each given subset
                gets its own mIoU pair (``base_mIoU``, ``base_mIoU_d2``, ...). They are independent:
                passing only ``base`` does not imply ``novel`` = the rest.
            exclude: classes left out of every figure, e.g. classes no training source
                reaches (listed as ``excluded_classes``; IoU / Acc NaN): their ground-truth
                pixels count as ignored (no other class is charged a false positive for them)
                and predictions of them are dropped; no mean, subset or pixel figure has them.

        Returns a dict with numpy float64 arrays ``IoU`` [K] (NaN where the class is neither in the
        ground truth nor predicted), ``Acc`` [K] (NaN where absent from the ground truth), int64
        arrays ``tp``, ``gt_pixels``, ``pred_pixels`` [K], and floats ``mIoU`` (= ``mIoU_mmseg``),
        ``mIoU_d2``, ``pAcc``, ``mAcc``, ``fwIoU``, plus ``num_pixels``, ``num_classes``,
        ``num_classes_gt`` (present in the ground truth), ``num_classes_scored`` (in gt or
        predicted), ``excluded_classes`` (index array) / ``num_classes_excluded`` and, per subset, ``{name}_classes`` (index array) and ``{name}_num_classes_gt``.
        """
        conf = self.conf.numpy()
        excluded = (
            np.zeros(self.num_classes, dtype=bool)
            if exclude is None
            else self._subset_mask(exclude, "exclude")
        )
        if excluded.any():
            conf = conf.copy()
            conf[excluded, :] = 0  # their ground truth is out of the evaluation
            conf[:, excluded] = 0  # predictions of them (none, when kept out of the argmax)
        tp = np.diag(conf).astype(np.int64)
        gt_pixels = conf.sum(axis=1)
        pred_pixels = conf.sum(axis=0)
        union = gt_pixels + pred_pixels - tp
        in_gt = gt_pixels > 0
        scored = union > 0
        iou = np.full(self.num_classes, np.nan)
        iou[scored] = tp[scored] / union[scored]
        acc = np.full(self.num_classes, np.nan)
        acc[in_gt] = tp[in_gt] / gt_pixels[in_gt]
        num_pixels = int(gt_pixels.sum())
        freq = gt_pixels / max(num_pixels, 1)
        out: dict = {
            "IoU": iou,
            "Acc": acc,
            "tp": tp,
            "gt_pixels": gt_pixels,
            "pred_pixels": pred_pixels,
            "mIoU_mmseg": _mean(iou[scored]),
            "mIoU_d2": _mean(iou[in_gt]),
            "pAcc": float(tp.sum() / num_pixels) if num_pixels else math.nan,
            "mAcc": _mean(acc[in_gt]),
            "fwIoU": float((freq[in_gt] * iou[in_gt]).sum()) if num_pixels else math.nan,
            "num_pixels": num_pixels,
            "num_classes": self.num_classes,
            "num_classes_gt": int(in_gt.sum()),
            "num_classes_scored": int(scored.sum()),
            "excluded_classes": np.flatnonzero(excluded),
            "num_classes_excluded": int(excluded.sum()),
        }
        out["mIoU"] = out["mIoU_mmseg"]
        for name, subset in (("base", base), ("novel", novel)):
            if subset is None:
                continue
            mask = self._subset_mask(subset, name) & ~excluded
            out[f"{name}_classes"] = np.flatnonzero(mask)
            out[f"{name}_mIoU"] = _mean(iou[mask & scored])
            out[f"{name}_mIoU_mmseg"] = out[f"{name}_mIoU"]
            out[f"{name}_mIoU_d2"] = _mean(iou[mask & in_gt])
            out[f"{name}_num_classes_gt"] = int((mask & in_gt).sum())
        return out

    def _subset_mask(self, subset: Sequence[int] | ArrayLike, name: str) -> np.ndarray:
        arr = subset.cpu().numpy() if isinstance(subset, torch.Tensor) else np.asarray(subset)
        k = self.num_classes
        if arr.dtype == bool:
            if arr.shape != (k,):
                raise ValueError(
                    f"SegMetrics.compute: {name} bool mask has shape {arr.shape}, expected ({k},)"
                )
            return arr
        if arr.size and not np.issubdtype(arr.dtype, np.integer):
            raise TypeError(f"SegMetrics.compute: {name} must be indices or a bool mask")
        arr = arr.astype(np.int64).reshape(-1)
        bad = (arr < 0) | (arr >= k)
        if bad.any():
            raise ValueError(
                f"SegMetrics.compute: {name} class index {arr[bad][0]} outside [0, {k})"
            )
        mask = np.zeros(k, dtype=bool)
        mask[arr] = True
        return mask


def _mean(values: np.ndarray) -> float:
    # An empty subset has no mean; NaN rather than a numpy warning.
    return float(values.mean()) if values.size else math.nan


def _pct(value: float) -> str:
    return "nan" if math.isnan(value) else f"{100.0 * value:.2f}"


def format_summary(results: dict, prefix: str = "") -> str:
    """One line: mIoU (mmseg / d2), pAcc, mAcc, fwIoU and base / novel mIoU, in percent."""
    parts = [
        f"mIoU {_pct(results['mIoU_mmseg'])} (d2 {_pct(results['mIoU_d2'])})",
        f"pAcc {_pct(results['pAcc'])}",
        f"mAcc {_pct(results['mAcc'])}",
        f"fwIoU {_pct(results['fwIoU'])}",
    ]
    for name in ("base", "novel"):
        if f"{name}_mIoU" in results:
            parts.append(
                f"{name} {_pct(results[f'{name}_mIoU'])} (d2 {_pct(results[f'{name}_mIoU_d2'])})"
            )
    parts.append(f"classes in gt {results['num_classes_gt']}/{results['num_classes']}")
    if results.get("num_classes_excluded"):
        parts[-1] += f" ({results['num_classes_excluded']} left out)"
    return (f"{prefix} " if prefix else "") + " | ".join(parts)


def _display_name(name: str | Sequence[str]) -> str:
    return name if isinstance(name, str) else str(name[0])


def per_class_rows(results: dict, class_names: Sequence[str | Sequence[str]]) -> list[dict]:
    """One dict per class: index, name, subset, IoU and Acc in percent (None = undefined), counts.

    ``class_names`` are display names or vocabulary entries ``[name, synonym, ...]``.
    """
    k = results["num_classes"]
    if len(class_names) != k:
        raise ValueError(f"per_class_rows: {len(class_names)} class names for {k} classes")
    subset = np.full(k, "", dtype=object)
    for name in ("base", "novel"):
        if f"{name}_classes" in results:
            subset[results[f"{name}_classes"]] = name
    if "excluded_classes" in results:
        subset[results["excluded_classes"]] = "excluded"
    rows = []
    for c in range(k):
        iou, acc = float(results["IoU"][c]), float(results["Acc"][c])
        rows.append(
            {
                "index": c,
                "name": _display_name(class_names[c]),
                "subset": subset[c],
                "IoU": None if math.isnan(iou) else round(100.0 * iou, 4),
                "Acc": None if math.isnan(acc) else round(100.0 * acc, 4),
                "gt_pixels": int(results["gt_pixels"][c]),
                "pred_pixels": int(results["pred_pixels"][c]),
                "tp": int(results["tp"][c]),
            }
        )
    return rows


def summary_dict(results: dict) -> dict:
    """The scalar entries of ``results`` as JSON-ready values (percent for metrics, NaN -> None)."""
    out = {}
    for key, value in results.items():
        if isinstance(value, np.ndarray):
            continue
        if isinstance(value, float):
            out[key] = None if math.isnan(value) else round(100.0 * value, 4)
        else:
            out[key] = value
    return out


def write_per_class_csv(
    path: str | Path,
    results: dict,
    class_names: Sequence,
    beside: dict | None = None,
    prefix: str = "",
) -> None:
    """Per-class table as CSV (empty cells where IoU / Acc are undefined).

    beside: a second protocol's results over the same classes (eval_ade's roll-up): its IoU,
    Acc, pred_pixels and tp follow as ``{prefix}IoU`` ... columns.
    """
    rows = per_class_rows(results, class_names)
    if beside is not None:
        for row, other in zip(rows, per_class_rows(beside, class_names)):
            row |= {f"{prefix}{k}": other[k] for k in ("IoU", "Acc", "pred_pixels", "tp")}
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def write_results_json(
    path: str | Path, results: dict, class_names: Sequence, extra: dict | None = None
) -> None:
    """``{"summary": summary_dict(results), "per_class": per_class_rows(...)}`` as JSON, plus
    the JSON-ready sections of ``extra`` (e.g. eval_ade's ``rollup`` and ``unreached``)."""
    payload = {"summary": summary_dict(results), "per_class": per_class_rows(results, class_names)}
    payload |= extra or {}
    Path(path).write_text(json.dumps(payload, indent=1), encoding="utf-8")
