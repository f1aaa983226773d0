"""The package's own `evaluate` metric modules, loaded by path so that they work offline (with ``HF_HUB_OFFLINE=1``
and ``HF_DATASETS_OFFLINE=1`` set, as CI does): ``accuracy``, ``top_k_accuracy`` and ``mean_iou``, one folder
each, in `evaluate`'s module format. The Hub's ``evaluate-metric/*`` versions are used only when asked for
(``from_hub=True``, which needs a connection); ``accuracy`` and ``mean_iou`` take the same inputs and give the same
keys there.
"""

from __future__ import annotations

from pathlib import Path

import evaluate

from ...errors import UserValueError

METRICS_DIR = Path(__file__).resolve().parent
LOCAL_METRICS = ("accuracy", "top_k_accuracy", "mean_iou")
HUB_METRICS = {"accuracy": "evaluate-metric/accuracy", "mean_iou": "evaluate-metric/mean_iou"}


def local_metric_path(name: str) -> str:
    """The folder of one of this package's metric modules (what `evaluate.load` takes)."""
    if name not in LOCAL_METRICS:
        raise UserValueError(f"No metric module {name!r} in this package; it has {LOCAL_METRICS}.")
    return str(METRICS_DIR / name)


def load_metric(name: str, *, from_hub: bool = False, **kwargs) -> evaluate.EvaluationModule:
    """`evaluate.load` of this package's module `name` (offline), or of the Hub's ``evaluate-metric/<name>``
    when `from_hub`. Keyword arguments go to `evaluate.load` (e.g. ``keep_in_memory=True``)."""
    if not from_hub:
        return evaluate.load(local_metric_path(name), **kwargs)
    if name not in HUB_METRICS:
        raise UserValueError(f"The Hub has no evaluate-metric/{name} with this package's inputs; use the local one.")
    return evaluate.load(HUB_METRICS[name], **kwargs)


__all__ = ["HUB_METRICS", "LOCAL_METRICS", "METRICS_DIR", "load_metric", "local_metric_path"]
