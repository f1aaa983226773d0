"""The package's `evaluate` metric modules: they load by path with the Hub switched off (as in CI), and on fixed
predictions give the numbers of the hand computation the scripts used before (top-1 / top-5 over ranked ids; mean IoU
from a confusion matrix, with the ignore index 255 and classes absent from both prediction and label)."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from transformers import EvalPrediction

from transformers_cim.errors import UserValueError
from transformers_cim.training.classification_metrics import classification_metric_functions
from transformers_cim.training.metrics import LOCAL_METRICS, load_metric, local_metric_path
from transformers_cim.training.segmentation_metrics import confusion_counts, segmentation_scores


def hand_topk(ranked: np.ndarray, labels: np.ndarray, ks=(1, 5)) -> dict[str, float]:
    """The scripts' computation before `evaluate` (j-th best == label, any of the first k)."""
    hits = ranked == labels[:, None]
    return {"accuracy" if k == 1 else f"top{k}_accuracy": float(hits[:, :k].any(axis=1).mean()) for k in ks}


@pytest.fixture(scope="module")
def ranked_predictions():
    rng = np.random.default_rng(0)
    logits = torch.from_numpy(rng.normal(size=(97, 10)).astype(np.float32))
    labels = rng.integers(0, 10, size=97)
    labels[:30] = logits[:30].argmax(-1).numpy()  # some right at top-1
    return logits, labels


def test_every_metric_module_loads_offline():
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    code = (
        "from transformers_cim.training.metrics import LOCAL_METRICS, load_metric\n"
        "print(sorted(type(load_metric(n)).__name__ for n in LOCAL_METRICS))"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[-2] == "['Accuracy', 'MeanIoU', 'TopKAccuracy']"


def test_classification_metrics_equal_the_hand_computation(ranked_predictions):
    logits, labels = ranked_predictions
    preprocess, compute = classification_metric_functions(num_labels=10)
    ranked = preprocess(logits, torch.from_numpy(labels))
    assert ranked.shape == (97, 5)
    expected = hand_topk(ranked.numpy(), labels)
    assert compute(EvalPrediction(predictions=ranked.numpy(), label_ids=labels)) == expected
    assert 0 < expected["accuracy"] < expected["top5_accuracy"] < 1


def test_fewer_than_five_classes_report_top1_only():
    preprocess, compute = classification_metric_functions(num_labels=3)
    logits = torch.tensor([[0.1, 0.9, 0.0], [2.0, 0.0, 1.0], [0.0, 0.0, 1.0], [1.0, 0.5, 0.0]])
    labels = np.array([1, 2, 2, 0])
    ranked = preprocess(logits, torch.from_numpy(labels)).numpy()
    assert compute(EvalPrediction(predictions=ranked, label_ids=labels)) == {"accuracy": 0.75}


def test_accuracy_module_weights_and_counts():
    accuracy = load_metric("accuracy")
    assert accuracy.compute(predictions=[0, 1, 1, 2], references=[0, 1, 2, 2], normalize=False) == {"accuracy": 3.0}
    weighted = accuracy.compute(predictions=[0, 1], references=[0, 0], sample_weight=[3.0, 1.0])
    assert weighted == {"accuracy": 0.75}


def test_top_k_refuses_too_few_ranked_ids():
    with pytest.raises(ValueError, match="at least k=5"):
        load_metric("top_k_accuracy").compute(predictions=[[0, 1]], references=[0], k=5)


def segmentation_case():
    """Three 6x7 masks over 6 classes: class 4 in neither prediction nor label, class 5 only predicted, ignore 255
    on a band of pixels, and a predicted id outside the classes on an ignored pixel."""
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 4, size=(3, 6, 7))
    predictions = np.where(rng.random((3, 6, 7)) < 0.7, labels, rng.integers(0, 4, size=(3, 6, 7)))
    predictions[0, 0, :3] = 5  # predicted only
    labels[:, -1, :] = 255  # ignored row
    predictions[1, -1, 0] = 9  # on an ignored pixel: left out
    return predictions, labels


def test_mean_iou_equals_the_confusion_matrix_scores():
    predictions, labels = segmentation_case()
    counts = sum(
        confusion_counts(torch.from_numpy(p), torch.from_numpy(lab), 6, 255) for p, lab in zip(predictions, labels)
    )
    expected = segmentation_scores(counts)
    result = load_metric("mean_iou").compute(
        predictions=list(predictions), references=list(labels), num_labels=6, ignore_index=255
    )
    assert result["mean_iou"] == pytest.approx(expected["mean_iou"], rel=1e-12)
    assert result["mean_accuracy"] == pytest.approx(expected["mean_accuracy"], rel=1e-12)
    assert result["overall_accuracy"] == pytest.approx(expected["overall_accuracy"], rel=1e-12)
    for name, values in (
        ("per_category_iou", expected["per_class_iou"]),
        ("per_category_accuracy", expected["per_class_accuracy"]),
    ):
        np.testing.assert_allclose(result[name], list(values.values()), rtol=1e-12)  # NaN where NaN
    assert math.isnan(result["per_category_iou"][4]) and result["per_category_iou"][5] == 0.0
    assert math.isnan(result["per_category_accuracy"][5])  # predicted, never true


def test_mean_iou_reduce_labels_and_nan_to_num():
    prediction, reference = np.array([[0, 1], [1, 1]]), np.array([[0, 1], [2, 2]])  # reduced: [[255, 0], [1, 1]]
    metric = load_metric("mean_iou")
    result = metric.compute(
        predictions=[prediction],
        references=[reference],
        num_labels=3,
        ignore_index=255,
        reduce_labels=True,
        nan_to_num=-1,
    )
    # labelled pixels (true, predicted): (0, 1), (1, 1), (1, 1); class 2 is absent from both
    np.testing.assert_allclose(result["per_category_iou"], [0.0, 2 / 3, -1])
    assert result["overall_accuracy"] == pytest.approx(2 / 3)


def test_unknown_metric_names_are_user_errors():
    with pytest.raises(UserValueError, match="No metric module"):
        local_metric_path("f1")
    with pytest.raises(UserValueError, match="no evaluate-metric/top_k_accuracy"):
        load_metric("top_k_accuracy", from_hub=True)
    assert set(LOCAL_METRICS) == {"accuracy", "top_k_accuracy", "mean_iou"}
