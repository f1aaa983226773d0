"""The constant prior: the mean true map under a config's box distribution.

It is the best map a model can predict without looking at the exemplar (it minimises the expected cross-entropy of a
constant prediction). `pretext_metrics` scores it next to the model's figures; `decoder_prior_bias` starts the
decoder at its logits.
"""

from __future__ import annotations

import torch

from .pretext import correlation_maps, sample_config_boxes

PRIOR_SAMPLES = 8192
PROBABILITY_FLOOR = 1e-4


def correlation_prior(
    config, num_samples: int = PRIOR_SAMPLES, generator: torch.Generator | None = None, chunk: int = 1024
) -> torch.Tensor:
    """The mean true map (m, m) over `num_samples` boxes drawn from `config`'s exemplar distribution."""
    total = torch.zeros(config.context_size, config.context_size, dtype=torch.float64)
    drawn = 0
    while drawn < num_samples:
        count = min(chunk, num_samples - drawn)
        boxes = sample_config_boxes(config, count, 1, generator=generator)
        total += correlation_maps(boxes, config.context_size).sum(dim=(0, 1)).double()
        drawn += count
    return (total / num_samples).float()


def prior_logits(prior: torch.Tensor) -> torch.Tensor:
    """Logits of the constant prior map, clamped away from 0 and 1 so its loss stays finite."""
    probability = prior.clamp(PROBABILITY_FLOOR, 1 - PROBABILITY_FLOOR)
    return probability.log() - (-probability).log1p()


__all__ = ["PRIOR_SAMPLES", "PROBABILITY_FLOOR", "correlation_prior", "prior_logits"]
