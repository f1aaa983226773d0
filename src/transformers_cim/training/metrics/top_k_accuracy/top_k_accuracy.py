"""Top-k accuracy as an `evaluate` module, readable offline: the fraction of examples whose reference is among the
k best-ranked predicted class ids.

``predictions`` holds, per example, class ids ranked best first (at least k of them, e.g. ``logits.topk(k).indices``):
the Trainer then gathers k ids per image rather than every logit.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "Top-k accuracy: the fraction of examples whose true class is among the k best-ranked predictions."
_INPUTS = """
Args:
    predictions (`list` of `list` of `int`): per example, predicted class ids ranked best first.
    references (`list` of `int`): the true class id of each example.
    k (`int`, defaults to 5): how many of the best-ranked ids count.
Returns:
    top_k_accuracy (`float`): in [0, 1].
"""


class TopKAccuracy(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_INPUTS,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Value("int64")),
                    "references": datasets.Value("int64"),
                }
            ),
        )

    def _compute(self, predictions, references, k: int = 5) -> dict[str, float]:
        ranked = np.asarray(predictions)
        if ranked.ndim != 2 or ranked.shape[1] < k:
            raise ValueError(f"top_k_accuracy needs at least k={k} ranked ids per example, got shape {ranked.shape}.")
        hits = ranked[:, :k] == np.asarray(references)[:, None]
        return {"top_k_accuracy": float(hits.any(axis=1).mean())}
