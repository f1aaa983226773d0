"""Top-1 accuracy as an `evaluate` module, readable offline: the fraction of predictions equal to their reference.

The inputs and the result key match the Hub's ``evaluate-metric/accuracy`` (``predictions`` and ``references``: one
class id per example; ``{"accuracy": float}``), so the two are interchangeable.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "Accuracy: the fraction of examples whose predicted class id equals the reference class id."
_INPUTS = """
Args:
    predictions (`list` of `int`): the predicted class id of each example.
    references (`list` of `int`): the true class id of each example.
    normalize (`bool`, defaults to `True`): the fraction of correct predictions; `False` gives their count.
    sample_weight (`list` of `float`, *optional*): a weight per example.
Returns:
    accuracy (`float`): in [0, 1] (or a count when `normalize=False`).
"""


class Accuracy(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_INPUTS,
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references, normalize: bool = True, sample_weight=None) -> dict[str, float]:
        correct = np.asarray(predictions) == np.asarray(references)
        weights = np.ones(correct.shape) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
        total = float((correct * weights).sum())
        return {"accuracy": total / float(weights.sum()) if normalize else total}
