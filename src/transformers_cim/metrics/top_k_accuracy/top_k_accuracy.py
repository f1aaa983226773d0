"""Top-k accuracy: an offline ``evaluate`` metric module.

Load it by path, no Hub access needed::

    import evaluate
    from transformers_cim.metrics import TOP_K_ACCURACY_PATH
    metric = evaluate.load(TOP_K_ACCURACY_PATH)                    # predictions are class scores
    metric.compute(predictions=logits, references=labels, k=[1, 5])
    # {"accuracy": ..., "top5_accuracy": ...}

    ranked = evaluate.load(TOP_K_ACCURACY_PATH, "ranked")          # predictions are class ids, best first
"""

from __future__ import annotations

import datasets
import evaluate
import numpy as np


_DESCRIPTION = """\
Top-k accuracy: the fraction of examples whose reference label is among the k highest-scoring classes.
Top-1 is reported as `accuracy`, other k as `top{k}_accuracy`. Ties are broken by class index (lower first).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: with the default config, one score vector (logits or probabilities) per example, shape (N, C);
        with the `ranked` config, class ids sorted by decreasing score, shape (N, >= max(k)).
    references: the true class id per example, shape (N,).
    k (`int` or list of `int`, defaults to [1, 5]): the k values to report. A k larger than the number of
        classes (or of ranked ids) is left out of the result.
    normalize (`bool`, defaults to True): return fractions; False returns counts of correct examples.
Returns:
    `accuracy` (top-1) and `top{k}_accuracy` for every other k.
Examples:
    >>> metric = evaluate.load(TOP_K_ACCURACY_PATH)
    >>> metric.compute(predictions=[[0.1, 0.7, 0.2], [0.5, 0.1, 0.4]], references=[1, 2], k=[1, 2])
    {'accuracy': 0.5, 'top2_accuracy': 1.0}
"""

_CITATION = ""

_List = getattr(datasets, "List", None) or datasets.Sequence


def _top_k_from_scores(scores: np.ndarray, k: int) -> np.ndarray:
    # stable sort on the negated scores: ties go to the lower class index, as argmax does
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class TopKAccuracy(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        if self.config_name == "ranked":
            prediction_feature = _List(datasets.Value("int64"))
        else:
            prediction_feature = _List(datasets.Value("float32"))
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": prediction_feature, "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references, k=(1, 5), normalize: bool = True) -> dict[str, float]:
        ks = [int(k)] if np.isscalar(k) else [int(v) for v in k]
        if any(v < 1 for v in ks):
            raise ValueError(f"k must be >= 1, got {ks}.")
        predictions = np.asarray(predictions)
        references = np.asarray(references, dtype=np.int64)
        if predictions.ndim != 2 or predictions.shape[0] != references.shape[0]:
            raise ValueError(
                f"predictions must have shape (N, C) matching references (N,), got {predictions.shape} and "
                f"{references.shape}."
            )
        width = predictions.shape[1]
        ks = [v for v in ks if v <= width]
        if not ks:
            return {}
        if self.config_name == "ranked":
            ranked = predictions.astype(np.int64)
        else:
            ranked = _top_k_from_scores(predictions.astype(np.float64), max(ks))
        hits = ranked[:, : max(ks)] == references[:, None]
        result = {}
        for v in ks:
            correct = float(hits[:, :v].any(axis=1).sum())
            value = correct / max(len(references), 1) if normalize else correct
            result["accuracy" if v == 1 else f"top{v}_accuracy"] = value
        return result
