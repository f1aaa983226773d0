"""Linear probing: :class:`LinearProbeForImageClassification` freezes an encoder and trains a
``BatchNorm1d(affine=False)`` + ``Linear`` head on its CLS (ViT) or pooled (ResNet) feature, as in MAE's linear
probing; the trained probe folds back into a stock classification model
(:meth:`~LinearProbeForImageClassification.to_classification_model`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import ResNetForImageClassification, ViTForImageClassification
from transformers.modeling_outputs import ImageClassifierOutput

from ..features import global_feature_size, global_features


class LinearProbeHead(nn.Module):
    """``BatchNorm1d(affine=False)`` followed by a ``Linear`` layer (MAE's linear-probing head)."""

    def __init__(self, in_features: int, num_labels: int, eps: float = 1e-6):
        super().__init__()
        self.norm = nn.BatchNorm1d(in_features, affine=False, eps=eps)
        self.linear = nn.Linear(in_features, num_labels)
        nn.init.trunc_normal_(self.linear.weight, std=0.01)
        nn.init.zeros_(self.linear.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(self.norm(features))

    @torch.no_grad()
    def folded_weight_and_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Weight and bias of one ``Linear`` equal to this head in eval mode (BatchNorm running stats folded in)."""
        std = torch.sqrt(self.norm.running_var + self.norm.eps)
        weight = self.linear.weight / std[None, :]
        bias = self.linear.bias - weight @ self.norm.running_mean
        return weight, bias


class LinearProbeForImageClassification(nn.Module):
    """A frozen stock classification model's encoder + a trainable :class:`LinearProbeHead`.

    The feature is the CLS token after the final LayerNorm (ViT) or the pooled feature (ResNet): the same one
    the stock head reads, so :meth:`to_classification_model` can fold the probe into a plain
    ``ViTForImageClassification`` / ``ResNetForImageClassification``. The encoder stays in eval mode (no dropout,
    frozen BatchNorm statistics) whatever ``train()`` is called with.
    """

    main_input_name = "pixel_values"
    accepts_loss_kwargs = False

    def __init__(self, model: ViTForImageClassification | ResNetForImageClassification, eps: float = 1e-6):
        super().__init__()
        if not isinstance(model, (ViTForImageClassification, ResNetForImageClassification)):
            raise TypeError(f"Expected a ViT/ResNet classification model, got {type(model).__name__}.")
        self.model = model
        self.config = model.config
        self.encoder_type = model.config.model_type
        for param in self.model.parameters():
            param.requires_grad_(False)
        self.head = LinearProbeHead(global_feature_size(model.config), model.config.num_labels, eps=eps)
        self.model.eval()

    def train(self, mode: bool = True) -> LinearProbeForImageClassification:
        super().train(mode)
        self.model.eval()
        return self

    def extract_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return global_features(self.model.base_model, pixel_values)

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None) -> ImageClassifierOutput:
        features = self.extract_features(pixel_values)
        logits = self.head(features.to(self.head.linear.weight.dtype))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.float(), labels.long())
        return ImageClassifierOutput(loss=loss, logits=logits)

    @torch.no_grad()
    def to_classification_model(self) -> ViTForImageClassification | ResNetForImageClassification:
        """The wrapped stock model with the trained probe folded into its classifier (eval-mode equivalent)."""
        weight, bias = self.head.folded_weight_and_bias()
        classifier = self.model.classifier
        linear = classifier if isinstance(classifier, nn.Linear) else classifier[-1]
        linear.weight.copy_(weight.to(linear.weight.dtype))
        linear.bias.copy_(bias.to(linear.bias.dtype))
        for param in self.model.parameters():
            param.requires_grad_(True)
        return self.model


__all__ = [
    "LinearProbeForImageClassification",
    "LinearProbeHead",
]
