"""Layer-wise learning-rate decay (BEiT / MAE recipe): :func:`param_groups_layer_decay` builds AdamW parameter groups,
one learning-rate scale per block (ViT) or stage (ResNet), and no weight decay on norms, biases, position embeddings
and the CLS token."""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from ..checkpoint_loading import (
    SUPPORTED_ENCODER_TYPES,
)

# Parameter-name fragments that never get weight decay (in addition to every parameter with ndim <= 1).
NO_WEIGHT_DECAY_NAMES = ("position_embeddings", "cls_token", "mask_token", "pos_embed", "prior_bias")

_VIT_BLOCK = re.compile(r"(?:^|\.)(?:layers|encoder\.layer)\.(\d+)\.")
_RESNET_STAGE = re.compile(r"(?:^|\.)encoder\.stages\.(\d+)\.")


def _encoder_type_of(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type in SUPPORTED_ENCODER_TYPES:
        return model_type
    if model_type == "cim":
        return getattr(getattr(config, "encoder_config", None), "model_type", "vit")
    names = [n for n, _ in model.named_parameters()]
    if any(_RESNET_STAGE.search(n) for n in names):
        return "resnet"
    return "vit"


def num_layers_for_decay(model: nn.Module) -> int:
    """Number of decay levels L (blocks for ViT, stages for ResNet); ids run 0 (embeddings) .. L + 1 (head)."""
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) == "cim":
        config = config.encoder_config
    if _encoder_type_of(model) == "resnet":
        if config is not None and getattr(config, "depths", None) is not None:
            return len(config.depths)
        return 1 + max(int(m.group(1)) for n, _ in model.named_parameters() if (m := _RESNET_STAGE.search(n)))
    if config is not None and getattr(config, "num_hidden_layers", None) is not None:
        return int(config.num_hidden_layers)
    return 1 + max(int(m.group(1)) for n, _ in model.named_parameters() if (m := _VIT_BLOCK.search(n)))


def layer_id_for_parameter(name: str, encoder_type: str, num_layers: int) -> int:
    """Layer id of a parameter: 0 for the embeddings / stem, i + 1 for block (stage) i, L + 1 for the rest."""
    if encoder_type == "resnet":
        if re.search(r"(?:^|\.)embedder\.", name):
            return 0
        match = _RESNET_STAGE.search(name)
    else:
        if re.search(r"(?:^|\.)embeddings\.", name):
            return 0
        match = _VIT_BLOCK.search(name)
    if match:
        return int(match.group(1)) + 1
    return num_layers + 1


def is_no_weight_decay(name: str, param: torch.Tensor) -> bool:
    """Norm weights, biases (every tensor with ndim <= 1), position embeddings and class tokens."""
    return param.ndim <= 1 or any(key in name for key in NO_WEIGHT_DECAY_NAMES)


def param_groups_layer_decay(
    model: nn.Module,
    weight_decay: float,
    layer_decay: float,
    base_lr: float,
    num_layers: int | None = None,
) -> list[dict[str, Any]]:
    """AdamW parameter groups with layer-wise lr decay.

    Layer ids: embeddings (ViT) / stem (ResNet) 0, transformer block (ResNet stage) i gets i + 1, everything after
    the last block (final norm, head) gets L + 1. A parameter with layer id ``l`` gets
    ``lr = base_lr * layer_decay ** (L + 1 - l)`` (the head trains at ``base_lr``; ``layer_decay=1`` is off) and
    weight decay ``weight_decay`` unless it is a norm / bias / position embedding / class token (then 0).
    Frozen parameters (``requires_grad=False``) are left out. Each group also carries ``layer_id`` and
    ``lr_scale``; the Trainer's schedulers multiply each group's own ``lr``.
    """
    if layer_decay <= 0:
        raise ValueError(f"layer_decay must be > 0, got {layer_decay}.")
    encoder_type = _encoder_type_of(model)
    if num_layers is None:
        num_layers = num_layers_for_decay(model)
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        layer_id = layer_id_for_parameter(name, encoder_type, num_layers)
        no_decay = is_no_weight_decay(name, param)
        key = (layer_id, no_decay)
        if key not in groups:
            scale = float(layer_decay) ** (num_layers + 1 - layer_id)
            groups[key] = {
                "params": [],
                "weight_decay": 0.0 if no_decay else float(weight_decay),
                "lr": float(base_lr) * scale,
                "lr_scale": scale,
                "layer_id": layer_id,
            }
        groups[key]["params"].append(param)
    return [groups[key] for key in sorted(groups)]


__all__ = [
    "NO_WEIGHT_DECAY_NAMES",
    "is_no_weight_decay",
    "layer_id_for_parameter",
    "num_layers_for_decay",
    "param_groups_layer_decay",
]
