"""What the classification Trainer reports when it evaluates: top-1 accuracy (``accuracy``) and, with 5 classes or
more, top-5 accuracy (``top5_accuracy``), computed by the `evaluate` modules of :mod:`.metrics` (offline; the
Hub's ``evaluate-metric/accuracy`` for top-1 when asked). Only the 5 best class ids per image are gathered across
processes, never the logits."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from transformers import EvalPrediction

from .metrics import load_metric

TOP_K = 5


def classification_metric_functions(
    num_labels: int, hub_metrics: bool = False
) -> tuple[Callable[[torch.Tensor, torch.Tensor], torch.Tensor], Callable[[EvalPrediction], dict[str, float]]]:
    """``(preprocess_logits_for_metrics, compute_metrics)`` for a ``Trainer``: the first keeps the `k` best class ids
    per image (k = 5, or 1 with fewer than 5 classes), the second scores them with the `evaluate` modules."""
    k = TOP_K if num_labels >= TOP_K else 1
    accuracy = load_metric("accuracy", from_hub=hub_metrics, keep_in_memory=True)
    top_k = load_metric("top_k_accuracy", keep_in_memory=True) if k > 1 else None

    def preprocess_logits_for_metrics(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = logits[0] if isinstance(logits, (tuple, list)) else logits
        return logits.topk(k, dim=-1).indices

    def compute_metrics(eval_pred: EvalPrediction) -> dict[str, float]:
        ranked, labels = np.asarray(eval_pred.predictions), np.asarray(eval_pred.label_ids)
        metrics = {"accuracy": float(accuracy.compute(predictions=ranked[:, 0], references=labels)["accuracy"])}
        if top_k is not None:
            scores = top_k.compute(predictions=ranked, references=labels, k=k)
            metrics[f"top{k}_accuracy"] = float(scores["top_k_accuracy"])
        return metrics

    return preprocess_logits_for_metrics, compute_metrics


__all__ = ["TOP_K", "classification_metric_functions"]
