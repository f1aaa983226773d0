"""The global image feature of a stock encoder, the one its classification head reads: the CLS token after the final
LayerNorm for a ViT, the pooled feature for a ResNet. Linear probing, k-NN evaluation and the exported encoder's card
use it from here."""

from __future__ import annotations

import torch
from torch import nn

# How the feature is read from a model's output, for documentation (model cards).
GLOBAL_FEATURE_DESCRIPTIONS = {
    "vit": "the CLS token of `last_hidden_state`, which is also `pooler_output` exactly (the exported pooler is the "
    "identity on it)",
    "resnet": "`pooler_output` (global average pooling)",
}


def global_feature_size(config) -> int:
    """Width of the global feature of a ViT / ResNet config."""
    return config.hidden_sizes[-1] if config.model_type == "resnet" else config.hidden_size


def global_features(encoder: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """``(N, D)`` global features of a ``ViTModel`` / ``ResNetModel``; a ViT interpolates its position embeddings
    when the images are not its configured size."""
    if encoder.config.model_type == "resnet":
        return encoder(pixel_values=pixel_values).pooler_output.flatten(1)
    size = encoder.config.image_size
    size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
    interpolate = tuple(pixel_values.shape[-2:]) != size
    return encoder(pixel_values=pixel_values, interpolate_pos_encoding=interpolate).last_hidden_state[:, 0]


__all__ = ["GLOBAL_FEATURE_DESCRIPTIONS", "global_feature_size", "global_features"]
