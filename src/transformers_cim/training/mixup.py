"""Mixup / CutMix (batch-wise, the batch reversed as partner) with label-smoothed soft targets, and the soft-target
cross-entropy that trains on them."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .seeding import numpy_rng_from_torch


def smooth_one_hot(labels: torch.Tensor, num_labels: int, label_smoothing: float = 0.0) -> torch.Tensor:
    """One-hot targets with label smoothing: ``1 - eps + eps / C`` on the label, ``eps / C`` elsewhere."""
    off = label_smoothing / num_labels
    targets = torch.full((labels.shape[0], num_labels), off, device=labels.device, dtype=torch.float32)
    targets.scatter_(1, labels.long().view(-1, 1), 1.0 - label_smoothing + off)
    return targets


def _sample_beta(alpha: float, generator: torch.Generator | None) -> float:
    # torch has no generator-aware Beta sampler: a numpy generator keyed by the torch one
    return float(numpy_rng_from_torch(generator).beta(alpha, alpha))


def cutmix_box(
    height: int, width: int, lam: float, generator: torch.Generator | None = None
) -> tuple[int, int, int, int]:
    """A box ``(y0, y1, x0, x1)`` covering about ``1 - lam`` of the image, centred uniformly, clipped to it."""
    cut = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * cut), int(width * cut)
    cy = int(torch.randint(0, height, (1,), generator=generator).item())
    cx = int(torch.randint(0, width, (1,), generator=generator).item())
    y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height)
    x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width)
    return y0, y1, x0, x1


def mixup_cutmix(
    pixel_values: torch.Tensor,
    labels: torch.Tensor,
    num_labels: int,
    mixup_alpha: float = 0.0,
    cutmix_alpha: float = 0.0,
    label_smoothing: float = 0.0,
    generator: torch.Generator | None = None,
    switch_prob: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch-wise Mixup or CutMix with the batch reversed as partner; returns ``(pixel_values, soft_targets)``.

    With both alphas > 0, CutMix is chosen with probability ``switch_prob``. ``lam ~ Beta(alpha, alpha)``; Mixup
    returns ``lam * x + (1 - lam) * x.flip(0)``; CutMix pastes a box of ``x.flip(0)`` and sets ``lam`` to the kept
    area fraction. Targets are ``lam * y + (1 - lam) * y.flip(0)`` of label-smoothed one-hots. With both alphas 0
    the images are returned unchanged with (smoothed) one-hot targets. Random draws (CPU) use ``generator``.
    """
    targets = smooth_one_hot(labels, num_labels, label_smoothing)
    if mixup_alpha <= 0 and cutmix_alpha <= 0:
        return pixel_values, targets
    if cutmix_alpha > 0 and mixup_alpha > 0:
        use_cutmix = bool(torch.rand((), generator=generator).item() < switch_prob)
    else:
        use_cutmix = cutmix_alpha > 0
    lam = _sample_beta(cutmix_alpha if use_cutmix else mixup_alpha, generator)
    partner = pixel_values.flip(0)
    if use_cutmix:
        height, width = pixel_values.shape[-2:]
        y0, y1, x0, x1 = cutmix_box(height, width, lam, generator)
        mixed = pixel_values.clone()
        mixed[..., y0:y1, x0:x1] = partner[..., y0:y1, x0:x1]
        lam = 1.0 - (y1 - y0) * (x1 - x0) / float(height * width)
    else:
        mixed = pixel_values * lam + partner * (1.0 - lam)
    targets = targets * lam + targets.flip(0) * (1.0 - lam)
    return mixed, targets


def soft_target_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy against a probability distribution per sample."""
    loss = torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1)
    if reduction == "sum":
        return loss.sum()
    if reduction == "none":
        return loss
    return loss.mean()


__all__ = [
    "cutmix_box",
    "mixup_cutmix",
    "smooth_one_hot",
    "soft_target_cross_entropy",
]
