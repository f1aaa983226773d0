"""Pretext metrics: IoU of predicted maps, and the constant prior that every pretext figure is read against.

The best map a model can predict without looking at the exemplar is the same map for every exemplar: the
mean of the true maps under the config's box distribution (it minimises the expected cross-entropy of a
constant prediction). `correlation_prior` estimates it once from the sampler; `prior_metrics` scores it on
real labels with the model's own loss and IoU, so `loss / prior_loss < 1` and `iou > prior_iou` say that a
model locates *this* exemplar rather than where exemplars usually are.
"""

from __future__ import annotations

import torch

from .prior import PRIOR_SAMPLES, PROBABILITY_FLOOR, correlation_prior, prior_logits  # noqa: F401 (re-exported)


def correlation_iou(logits: torch.Tensor, labels: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Mean IoU between predicted maps (sigmoid(logits) > threshold) and true maps, over all B*K maps."""
    predicted = logits.detach().float().sigmoid() > threshold
    truth = labels.detach() > 0.5
    intersection = (predicted & truth).flatten(-2).sum(-1).float()
    union = (predicted | truth).flatten(-2).sum(-1).float()
    return torch.where(union > 0, intersection / union.clamp(min=1), torch.ones_like(union)).mean()


@torch.no_grad()
def prior_metrics(prior: torch.Tensor, labels: torch.Tensor, config) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, IoU at 0.5) of predicting `prior` for every map of `labels` (B, K, m, m), with the model's loss, as
    0-d tensors on the labels' device (no host sync: the trainer accumulates them between logs)."""
    from .modeling_cim import correlation_loss  # the model's own loss, so the two figures compare

    logits = prior_logits(prior.to(labels.device)).expand_as(labels)
    return correlation_loss(logits, labels, config), correlation_iou(logits, labels)


__all__ = ["correlation_iou", "correlation_prior", "prior_logits", "prior_metrics"]
