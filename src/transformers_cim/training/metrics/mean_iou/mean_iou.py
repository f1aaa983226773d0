"""Mean intersection-over-union of semantic segmentation masks as an `evaluate` module, readable offline.

The inputs and result keys match the Hub's ``evaluate-metric/mean_iou`` (masks of class ids; ``num_labels``,
``ignore_index``, ``reduce_labels``; ``mean_iou``, ``mean_accuracy``, ``overall_accuracy``, ``per_category_iou``,
``per_category_accuracy``). Areas are summed over all the masks before any ratio is taken. A class that no pixel
has, in the references or the predictions, has an empty union: its IoU is NaN and it is left out of the mean.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "Mean IoU: per class, intersection / union of the predicted and true pixels, averaged over classes."
_INPUTS = """
Args:
    predictions (`list` of 2-D `int` arrays): predicted class ids per pixel.
    references (`list` of 2-D `int` arrays): true class ids per pixel, `ignore_index` where unlabelled.
    num_labels (`int`): the number of classes.
    ignore_index (`int`): the reference value of pixels left out (255 in ADE20K).
    nan_to_num (`int`, *optional*): replaces NaN (undefined) values in the result.
    label_map (`dict`, *optional*): old reference id -> new id, applied first.
    reduce_labels (`bool`, defaults to `False`): reference 0 becomes the ignore index and every other id drops by 1.
Returns:
    mean_iou, mean_accuracy, overall_accuracy (`float`); per_category_iou, per_category_accuracy (`ndarray`).
"""


def _areas(
    prediction: np.ndarray,
    reference: np.ndarray,
    num_labels: int,
    ignore_index: int,
    label_map: dict | None,
    reduce_labels: bool,
) -> tuple[np.ndarray, ...]:
    """Per class: the pixels where prediction and reference agree, the predicted pixels and the reference pixels."""
    reference = reference.astype(np.int64)
    prediction = prediction.astype(np.int64)
    if label_map:
        mapped = reference.copy()
        for old, new in label_map.items():
            mapped[reference == old] = new
        reference = mapped
    if reduce_labels:
        reference = np.where(reference == 0, 255, reference - 1)
        reference[reference == 254] = 255
    labelled = reference != ignore_index
    prediction, reference = prediction[labelled], reference[labelled]
    if reference.size and (reference.min() < 0 or reference.max() >= num_labels):
        raise ValueError(f"Reference ids outside [0, {num_labels}) that are not the ignore index {ignore_index}.")
    prediction = np.clip(prediction, 0, num_labels - 1)
    intersect = np.bincount(reference[prediction == reference], minlength=num_labels)
    return intersect, np.bincount(prediction, minlength=num_labels), np.bincount(reference, minlength=num_labels)


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(denominator > 0, numerator / np.maximum(denominator, 1), np.nan)


def _nanmean(values: np.ndarray) -> float:
    defined = values[~np.isnan(values)]
    return float(defined.mean()) if defined.size else float("nan")


class MeanIoU(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        mask = datasets.Sequence(datasets.Sequence(datasets.Value("int64")))
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_INPUTS,
            features=datasets.Features({"predictions": mask, "references": mask}),
        )

    def _compute(
        self,
        predictions,
        references,
        num_labels: int,
        ignore_index: int,
        nan_to_num: int | None = None,
        label_map: dict | None = None,
        reduce_labels: bool = False,
    ) -> dict:
        intersect = np.zeros(num_labels, dtype=np.int64)
        predicted = np.zeros(num_labels, dtype=np.int64)
        labelled = np.zeros(num_labels, dtype=np.int64)
        for prediction, reference in zip(predictions, references):
            areas = _areas(
                np.asarray(prediction), np.asarray(reference), num_labels, ignore_index, label_map, reduce_labels
            )
            intersect, predicted, labelled = intersect + areas[0], predicted + areas[1], labelled + areas[2]
        per_category_iou = _ratio(intersect, predicted + labelled - intersect)
        per_category_accuracy = _ratio(intersect, labelled)
        result = {
            "mean_iou": _nanmean(per_category_iou),
            "mean_accuracy": _nanmean(per_category_accuracy),
            "overall_accuracy": float(intersect.sum() / labelled.sum()) if labelled.sum() else float("nan"),
            "per_category_iou": per_category_iou,
            "per_category_accuracy": per_category_accuracy,
        }
        if nan_to_num is not None:
            result = {key: np.nan_to_num(value, nan=nan_to_num) for key, value in result.items()}
        return result
