"""Weighted k-NN evaluation of frozen features (the DINO protocol), batched on the device.

* :func:`extract_features` runs an encoder (``ViTModel`` / ``ResNetModel``, a classification model, a CIM model
  or any module with a ``vit`` / ``resnet`` attribute) over a data loader or dataset and returns L2-normalised
  global features (ViT: the CLS token after the final LayerNorm; ResNet: the pooled feature) and labels.
* :func:`knn_accuracy` classifies each test feature by a vote of its ``k`` most cosine-similar training features,
  each weighted by ``exp(similarity / temperature)``.
* :func:`knn_evaluate` does both for a pair of datasets (usable during pre-training);
  :class:`KNNCallback` runs it from a ``Trainer`` at every evaluation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from transformers import TrainerCallback
from transformers.utils import logging


logger = logging.get_logger(__name__)

LABEL_KEYS = ("labels", "label")


def resolve_encoder(model: nn.Module) -> nn.Module:
    """The base encoder inside ``model``: follows ``vit`` / ``resnet`` / ``model`` attributes (wrappers)."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        for attr in ("vit", "resnet", "model"):
            child = getattr(model, attr, None)
            if isinstance(child, nn.Module):
                model = child
                break
        else:
            break
    return model


def _is_vit(encoder: nn.Module) -> bool:
    return getattr(getattr(encoder, "config", None), "model_type", None) == "vit"


def _vit_image_size(encoder: nn.Module) -> tuple[int, int] | None:
    size = getattr(encoder.config, "image_size", None)
    if size is None:
        return None
    return tuple(size) if isinstance(size, (list, tuple)) else (int(size), int(size))


@torch.no_grad()
def encode_global_features(encoder: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """Global features of a batch: ViT CLS token (last LayerNorm applied), else the pooled / mean feature."""
    if _is_vit(encoder):
        interpolate = tuple(pixel_values.shape[-2:]) != _vit_image_size(encoder)
        out = encoder(pixel_values=pixel_values, interpolate_pos_encoding=interpolate)
        return out.last_hidden_state[:, 0]
    out = encoder(pixel_values=pixel_values)
    pooled = getattr(out, "pooler_output", None)
    if pooled is not None:
        return pooled.flatten(1)
    hidden = out.last_hidden_state
    return hidden.mean(dim=(2, 3)) if hidden.ndim == 4 else hidden[:, 0]


def _split_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pixel_values, labels)`` from a dict batch (valid rows only) or an ``(x, y)`` tuple."""
    if isinstance(batch, Mapping):
        pixel_values = torch.as_tensor(batch["pixel_values"])
        label_key = next((k for k in LABEL_KEYS if k in batch), None)
        if label_key is None:
            raise ValueError(f"Batch has no labels (looked for {LABEL_KEYS}); k-NN needs labelled data.")
        labels = torch.as_tensor(batch[label_key])
        if "cim_valid" in batch:
            valid = torch.as_tensor(batch["cim_valid"], dtype=torch.bool)
            pixel_values, labels = pixel_values[valid], labels[valid]
        return pixel_values, labels
    pixel_values, labels = batch[0], batch[1]
    return torch.as_tensor(pixel_values), torch.as_tensor(labels)


def default_collate_rows(rows: list[Any]) -> dict[str, torch.Tensor]:
    """Stack dataset rows (dicts with ``pixel_values`` and ``labels``/``label``), dropping ``cim_valid=False`` rows."""
    if not rows:
        raise ValueError("Empty batch.")
    if not isinstance(rows[0], Mapping):
        xs, ys = zip(*rows)
        return {"pixel_values": torch.stack([torch.as_tensor(x) for x in xs]), "labels": torch.as_tensor(ys)}
    label_key = next((k for k in LABEL_KEYS if k in rows[0]), None)
    if label_key is None:
        raise ValueError(f"Rows have no labels (looked for {LABEL_KEYS}); k-NN needs labelled data.")
    rows = [r for r in rows if bool(r.get("cim_valid", True)) and int(r[label_key]) >= 0]
    if not rows:
        return {"pixel_values": torch.zeros(0, 3, 1, 1), "labels": torch.zeros(0, dtype=torch.long)}
    return {
        "pixel_values": torch.stack([torch.as_tensor(r["pixel_values"], dtype=torch.float32) for r in rows]),
        "labels": torch.tensor([int(r[label_key]) for r in rows], dtype=torch.long),
    }


def _as_loader(data: Any, batch_size: int, collate_fn: Callable | None, num_workers: int) -> Iterable:
    if isinstance(data, DataLoader):
        return data
    return DataLoader(
        data, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=collate_fn or default_collate_rows
    )


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
    tuples) or a map-style / iterable dataset of such rows (batched here with ``batch_size``). Rows flagged
    ``cim_valid=False`` are skipped. Features stay on ``device`` (default: the model's). ``feature_fn(encoder,
    pixel_values)`` overrides the default CLS / pooled feature. The model's train/eval mode is restored afterwards.
    """
    encoder = resolve_encoder(model)
    if device is None:
        device = next(encoder.parameters()).device
    device = torch.device(device)
    feature_fn = feature_fn or encode_global_features
    was_training = encoder.training
    encoder.eval()
    features, labels, count = [], [], 0
    try:
        for batch in _as_loader(dataloader_or_dataset, batch_size, collate_fn, num_workers):
            pixel_values, batch_labels = _split_batch(batch)
            if pixel_values.shape[0] == 0:
                continue
            if max_samples is not None:
                remaining = max_samples - count
                if remaining <= 0:
                    break
                pixel_values, batch_labels = pixel_values[:remaining], batch_labels[:remaining]
            dtype = next(encoder.parameters()).dtype
            feats = feature_fn(encoder, pixel_values.to(device=device, dtype=dtype, non_blocking=True)).float()
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
        raise ValueError(f"Feature shapes do not match: train {tuple(train_feats.shape)}, test {tuple(test_feats.shape)}.")
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

    ``train_ds`` / ``eval_ds`` are labelled datasets (rows with ``pixel_values`` and ``labels`` / ``label``,
    e.g. from :func:`transformers_cim.data.build_classification_transform`) or ``DataLoader`` objects.
    ``encoder`` may be a CIM model (its online encoder is used), a ``ViTModel`` / ``ResNetModel`` or a classifier.
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
    """Runs :func:`knn_evaluate` on the model at each ``Trainer`` evaluation (main process only).

    The result (``eval_knn_top1``) is added to the evaluation metrics returned by ``trainer.evaluate()`` and to
    ``state.log_history``. Set ``on_epoch_end=True`` to also run at the end of every epoch (without evaluation).
    """

    def __init__(
        self,
        train_dataset: Any,
        eval_dataset: Any,
        k: int = 20,
        temperature: float = 0.07,
        batch_size: int = 128,
        num_classes: int | None = None,
        collate_fn: Callable | None = None,
        max_train_samples: int | None = None,
        max_eval_samples: int | None = None,
        on_epoch_end: bool = False,
        metric_key_prefix: str = "eval_knn",
    ):
        self.train_dataset, self.eval_dataset = train_dataset, eval_dataset
        self.kwargs = dict(
            k=k,
            temperature=temperature,
            batch_size=batch_size,
            num_classes=num_classes,
            collate_fn=collate_fn,
            max_train_samples=max_train_samples,
            max_eval_samples=max_eval_samples,
            metric_key_prefix=metric_key_prefix,
        )
        self.run_on_epoch_end = on_epoch_end
        self.last_result: dict[str, float] | None = None

    def _run(self, state, model) -> dict[str, float] | None:
        if model is None or not state.is_world_process_zero:
            return None
        result = knn_evaluate(model, self.train_dataset, self.eval_dataset, **self.kwargs)
        self.last_result = result
        state.log_history.append({**result, "epoch": state.epoch, "step": state.global_step})
        logger.info(f"k-NN evaluation at step {state.global_step}: {result}")
        return result

    def on_evaluate(self, args, state, control, metrics=None, model=None, **kwargs):
        result = self._run(state, model)
        if result is not None and metrics is not None:
            metrics.update(result)

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        if self.run_on_epoch_end:
            self._run(state, model)


__all__ = [
    "KNNCallback",
    "default_collate_rows",
    "encode_global_features",
    "extract_features",
    "knn_accuracy",
    "knn_evaluate",
    "knn_predict",
    "resolve_encoder",
]
