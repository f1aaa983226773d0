"""Weighted k-NN evaluation of frozen features (the DINO protocol), batched on the device.

:func:`extract_features` gives L2-normalised global features (:func:`~transformers_cim.features.global_features`: ViT
CLS token, ResNet pooled feature) and labels of a dataset; :func:`knn_predict` / :func:`knn_accuracy` classify each
test feature by a vote of its ``k`` most cosine-similar training features weighted by ``exp(similarity / T)``;
:func:`knn_evaluate` does both for a pair of datasets and :class:`KNNCallback` runs it at every ``Trainer`` evaluation.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from transformers import TrainerCallback
from transformers.utils import logging

from ..features import global_features
from .data import SkippingCollator

logger = logging.get_logger(__name__)


def resolve_encoder(model: nn.Module) -> nn.Module:
    """The ``ViTModel`` / ``ResNetModel`` inside a classifier, a CIM model or a wrapper (``vit`` / ``resnet`` /
    ``model`` / ``module`` / ``_orig_mod`` attributes)."""
    for attr in ("vit", "resnet", "model", "module", "_orig_mod"):  # ..., DDP and torch.compile wrappers
        child = getattr(model, attr, None)
        if isinstance(child, nn.Module) and child is not model:
            return resolve_encoder(child)
    return model


@torch.no_grad()
def extract_features(
    model: nn.Module,
    dataloader_or_dataset: Any,
    batch_size: int = 128,
    device: torch.device | str | None = None,
    collate_fn: Callable | None = None,
    num_workers: int = 0,
    max_samples: int | None = None,
    normalize: bool = True,
    feature_fn: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Global features ``(N, D)`` (float32, L2-normalised when ``normalize``) and labels ``(N,)`` of a dataset.

    ``dataloader_or_dataset`` is a ``DataLoader`` (dict batches with ``pixel_values`` and ``labels``, or ``(x, y)``
    tuples) or a dataset of rows with ``pixel_values`` and ``labels`` (batched here by a ``SkippingCollator``, which
    drops the rows flagged ``cim_valid=False``). Features stay on ``device`` (default: the model's).
    ``feature_fn(encoder, pixel_values)`` replaces the global feature. The model's train/eval mode is restored.
    """
    encoder = resolve_encoder(model)
    parameter = next(encoder.parameters())
    device = torch.device(device) if device is not None else parameter.device
    loader = dataloader_or_dataset
    if not isinstance(loader, DataLoader):
        loader = DataLoader(loader, batch_size, num_workers=num_workers, collate_fn=collate_fn or SkippingCollator())
    feature_fn = feature_fn or global_features
    was_training = encoder.training
    encoder.eval()
    features, labels, count = [], [], 0
    try:
        for batch in loader:
            if isinstance(batch, Mapping):
                pixel_values, batch_labels = torch.as_tensor(batch["pixel_values"]), torch.as_tensor(batch["labels"])
                if "cim_valid" in batch:
                    valid = torch.as_tensor(batch["cim_valid"], dtype=torch.bool)
                    pixel_values, batch_labels = pixel_values[valid], batch_labels[valid]
            else:
                pixel_values, batch_labels = torch.as_tensor(batch[0]), torch.as_tensor(batch[1])
            if max_samples is not None:
                pixel_values, batch_labels = pixel_values[: max_samples - count], batch_labels[: max_samples - count]
            if pixel_values.shape[0] == 0:
                if max_samples is not None and count >= max_samples:
                    break
                continue
            feats = feature_fn(encoder, pixel_values.to(device=device, dtype=parameter.dtype)).float()
            features.append(F.normalize(feats, dim=-1) if normalize else feats)
            labels.append(batch_labels.to(device=device, dtype=torch.long))
            count += pixel_values.shape[0]
    finally:
        encoder.train(was_training)
    if not features:
        raise ValueError("No valid examples to extract features from.")
    return torch.cat(features), torch.cat(labels)


@torch.no_grad()
def knn_predict(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
    batch_size: int = 1024,
) -> torch.Tensor:
    """Class scores ``(N_test, C)`` of the weighted k-NN vote (features are L2-normalised here)."""
    if train_feats.ndim != 2 or test_feats.ndim != 2 or train_feats.shape[1] != test_feats.shape[1]:
        raise ValueError(
            f"Feature shapes do not match: train {tuple(train_feats.shape)}, test {tuple(test_feats.shape)}."
        )
    if train_feats.shape[0] != train_labels.shape[0]:
        raise ValueError("train_feats and train_labels have different lengths.")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")
    train_labels = train_labels.to(train_feats.device).long()
    if num_classes is None:
        num_classes = int(train_labels.max().item()) + 1
    k = max(1, min(int(k), train_feats.shape[0]))
    train_feats = F.normalize(train_feats.float(), dim=-1)
    test_feats = F.normalize(test_feats.float().to(train_feats.device), dim=-1)
    scores = []
    for start in range(0, test_feats.shape[0], batch_size):
        similarity = test_feats[start : start + batch_size] @ train_feats.T  # (b, N_train)
        top_sim, top_idx = similarity.topk(k, dim=1)
        weights = (top_sim / temperature).exp()
        votes = torch.zeros(similarity.shape[0], num_classes, device=similarity.device)
        votes.scatter_add_(1, train_labels[top_idx], weights)
        scores.append(votes)
    return torch.cat(scores)


@torch.no_grad()
def knn_accuracy(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    test_labels: torch.Tensor,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
    batch_size: int = 1024,
) -> float:
    """Top-1 accuracy of the weighted k-NN classifier (cosine similarity, weights ``exp(sim / T)``, DINO).

    Each test feature takes its ``k`` most similar training features (``k`` capped at the training set size);
    class scores are the sums of their weights; the prediction is the highest score (ties: lowest class id).
    Test features are processed ``batch_size`` at a time (memory ``batch_size x N_train``).
    """
    test_labels = test_labels.long()
    if num_classes is None:
        num_classes = int(max(train_labels.max().item(), test_labels.max().item())) + 1
    scores = knn_predict(train_feats, train_labels, test_feats, k, temperature, num_classes, batch_size)
    predictions = scores.argmax(dim=1)
    return float((predictions == test_labels.to(predictions.device)).float().mean().item())


def knn_evaluate(
    encoder: nn.Module,
    train_ds: Any,
    eval_ds: Any,
    k: int = 20,
    temperature: float = 0.07,
    batch_size: int = 128,
    num_classes: int | None = None,
    device: torch.device | str | None = None,
    collate_fn: Callable | None = None,
    num_workers: int = 0,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
    metric_key_prefix: str = "knn",
) -> dict[str, float]:
    """k-NN top-1 accuracy of ``encoder``'s frozen features: ``{f"{prefix}_top1": acc}``.

    ``train_ds`` / ``eval_ds`` are labelled datasets (rows with ``pixel_values`` and ``labels``, e.g. from
    :func:`transformers_cim.training.data.build_classification_transform`) or ``DataLoader`` objects. ``encoder`` may
    be a
    CIM model (its online encoder is used), a ``ViTModel`` / ``ResNetModel`` or a classifier.
    """
    train_feats, train_labels = extract_features(
        encoder, train_ds, batch_size, device, collate_fn, num_workers, max_samples=max_train_samples
    )
    test_feats, test_labels = extract_features(
        encoder, eval_ds, batch_size, device, collate_fn, num_workers, max_samples=max_eval_samples
    )
    accuracy = knn_accuracy(train_feats, train_labels, test_feats, test_labels, k, temperature, num_classes)
    return {f"{metric_key_prefix}_top1": accuracy}


class KNNCallback(TrainerCallback):
    """Runs :func:`knn_evaluate` on the model during training (main process only); ``knn_kwargs`` go to it (``k``,
    ``temperature``, ``batch_size``, ``max_train_samples``, ...).

    By default it runs at each ``Trainer`` evaluation, adding ``eval_knn_top1`` to the metrics ``trainer.evaluate()``
    returns. ``every_steps=N`` also runs it every N optimizer steps and at the last one (a monitor of a
    self-supervised run: ``on_evaluate=False, metric_key_prefix="knn"`` gives ``knn_top1`` every N steps); with
    ``trainer`` given, those results are logged through ``trainer.log`` (progress bar, trackers, log history), else
    appended to ``state.log_history``. ``on_epoch_end=True`` also runs it at the end of every epoch.
    """

    def __init__(
        self,
        train_dataset: Any,
        eval_dataset: Any,
        on_epoch_end: bool = False,
        metric_key_prefix: str = "eval_knn",
        every_steps: int = 0,
        on_evaluate: bool = True,
        trainer: Any = None,
        **knn_kwargs: Any,
    ):
        self.train_dataset, self.eval_dataset = train_dataset, eval_dataset
        self.kwargs = dict(knn_kwargs, metric_key_prefix=metric_key_prefix)
        self.run_on_epoch_end, self.run_on_evaluate, self.every_steps = on_epoch_end, on_evaluate, every_steps
        self.trainer = trainer
        self.last_result: dict[str, float] | None = None

    def _run(self, state, model, log: bool = True) -> dict[str, float] | None:
        if model is None or not state.is_world_process_zero:
            return None
        self.last_result = knn_evaluate(model, self.train_dataset, self.eval_dataset, **self.kwargs)
        logger.info(f"k-NN evaluation at step {state.global_step}: {self.last_result}")
        if log and self.trainer is not None:
            self.trainer.log(dict(self.last_result))
        elif log:
            state.log_history.append({**self.last_result, "epoch": state.epoch, "step": state.global_step})
        return self.last_result

    def on_evaluate(self, args, state, control, metrics=None, model=None, **kwargs):
        if not self.run_on_evaluate:
            return
        result = self._run(state, model, log=self.trainer is None)  # the Trainer logs the evaluation metrics itself
        if result is not None and metrics is not None:
            metrics.update(result)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.every_steps > 0 and (
            state.global_step % self.every_steps == 0 or state.global_step >= state.max_steps
        ):
            self._run(state, model)

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        if self.run_on_epoch_end:
            self._run(state, model)


__all__ = [
    "KNNCallback",
    "extract_features",
    "knn_accuracy",
    "knn_evaluate",
    "knn_predict",
    "resolve_encoder",
]
