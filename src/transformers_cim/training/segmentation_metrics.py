"""Semantic-segmentation scores from a confusion matrix, accumulated image by image and summed across processes.

A :class:`ConfusionMatrix` accumulates ``counts[true, predicted]`` over the pixels of any number of images, the ignore
index left out; :func:`segmentation_scores` turns it into mean IoU, per-class IoU, per-class and mean accuracy, and
pixel accuracy. A class that no pixel belongs to, in the ground truth or the prediction, has no IoU (its union is
empty) and is left out of the mean, as mmsegmentation and `evaluate`'s ``mean_iou`` do.

The evaluation keeps counts rather than the masks an `evaluate` module would store (gigabytes for a full ADE20K
validation set, and per node); this package's `evaluate` module ``mean_iou`` (:mod:`.metrics`) computes the same
scores from masks, and tests check that the two agree.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch


def confusion_counts(
    predicted: torch.Tensor, target: torch.Tensor, num_labels: int, ignore_index: int | None = 255
) -> torch.Tensor:
    """``(num_labels, num_labels)`` int64 counts, row = true class, column = predicted class, over the pixels whose
    true label is not `ignore_index`. `predicted` and `target` are integer tensors of one shape; a target outside
    ``[0, num_labels)`` (other than the ignore index) is an error."""
    if predicted.shape != target.shape:
        raise ValueError(f"Prediction shape {tuple(predicted.shape)} differs from the target's {tuple(target.shape)}.")
    predicted, target = predicted.reshape(-1).long(), target.reshape(-1).long()
    if ignore_index is not None:
        keep = target != ignore_index
        predicted, target = predicted[keep], target[keep]
    if target.numel() and (target.min() < 0 or target.max() >= num_labels):
        bad = sorted(set(target[(target < 0) | (target >= num_labels)].unique().tolist()))
        raise ValueError(
            f"Target labels {bad[:10]} are outside [0, {num_labels}) and are not the ignore index {ignore_index}."
        )
    flat = target * num_labels + predicted.clamp(0, num_labels - 1)
    return torch.bincount(flat, minlength=num_labels * num_labels).reshape(num_labels, num_labels).cpu()


class ConfusionMatrix:
    """Accumulated `confusion_counts` of a whole evaluation set (``update`` per batch or image)."""

    def __init__(self, num_labels: int, ignore_index: int | None = 255):
        self.num_labels, self.ignore_index = int(num_labels), ignore_index
        self.counts = torch.zeros(self.num_labels, self.num_labels, dtype=torch.long)

    def update(self, predicted: torch.Tensor, target: torch.Tensor) -> None:
        self.counts += confusion_counts(predicted, target, self.num_labels, self.ignore_index)


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator > 0 else math.nan


def segmentation_scores(
    counts: torch.Tensor, class_names: Sequence[str] | Mapping[int, str] | None = None
) -> dict[str, float | dict[str, float]]:
    """Scores of a confusion matrix (rows true, columns predicted):

    - ``mean_iou``: the mean over classes of TP / (TP + FP + FN), classes with an empty union left out;
    - ``overall_accuracy`` (pixel accuracy): correct pixels / labelled pixels;
    - ``mean_accuracy``: the mean over classes present in the ground truth of TP / (TP + FN);
    - ``per_class_iou`` / ``per_class_accuracy``: ``{class name: value}``, NaN where undefined.
    """
    counts = counts.double()
    true_positive = counts.diag()
    per_true, per_predicted = counts.sum(1), counts.sum(0)
    union = per_true + per_predicted - true_positive
    n = counts.shape[0]
    if class_names is None:
        names = [str(i) for i in range(n)]
    elif isinstance(class_names, Mapping):
        names = [str(class_names[i]) for i in range(n)]
    else:
        names = [str(name) for name in class_names]
    iou = [_ratio(float(true_positive[i]), float(union[i])) for i in range(n)]
    accuracy = [_ratio(float(true_positive[i]), float(per_true[i])) for i in range(n)]
    defined_iou = [v for v in iou if not math.isnan(v)]
    defined_accuracy = [v for v in accuracy if not math.isnan(v)]
    return {
        "mean_iou": sum(defined_iou) / len(defined_iou) if defined_iou else math.nan,
        "overall_accuracy": _ratio(float(true_positive.sum()), float(counts.sum())),
        "mean_accuracy": sum(defined_accuracy) / len(defined_accuracy) if defined_accuracy else math.nan,
        "per_class_iou": dict(zip(names, iou)),
        "per_class_accuracy": dict(zip(names, accuracy)),
    }


def flat_scores(scores: Mapping[str, float | Mapping[str, float]]) -> dict[str, float]:
    """`segmentation_scores` as flat, JSON-safe metrics for the Trainer's log and ``all_results.json``:
    ``mean_iou``, ``overall_accuracy``, ``mean_accuracy`` and ``iou_<class>`` per class; undefined values (NaN: a
    class absent from both the ground truth and the prediction) are left out."""
    flat = {key: float(scores[key]) for key in ("mean_iou", "overall_accuracy", "mean_accuracy")}
    flat.update({f"iou_{name}": float(value) for name, value in scores["per_class_iou"].items()})
    return {key: value for key, value in flat.items() if not math.isnan(value)}


__all__ = ["ConfusionMatrix", "confusion_counts", "flat_scores", "segmentation_scores"]
