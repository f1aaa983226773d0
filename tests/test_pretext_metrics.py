"""The constant prior: the best map a model can predict without looking at the exemplar, and its scores."""

from __future__ import annotations

import pytest
import torch

from transformers_cim.modeling_cim import correlation_loss
from transformers_cim.pretext import correlation_maps, sample_config_boxes
from transformers_cim.pretext_metrics import correlation_iou, correlation_prior, prior_logits, prior_metrics

pytestmark = pytest.mark.usefixtures("single_thread")


def labels_from(config, batch: int, seed: int) -> torch.Tensor:
    boxes = sample_config_boxes(config, batch, config.num_exemplars, generator=torch.Generator().manual_seed(seed))
    return correlation_maps(boxes, config.context_size)


@pytest.mark.parametrize("mode", ["enclosing", "exact"])
def test_prior_is_the_mean_true_map(mode, tiny_vit_config):
    config = tiny_vit_config(exemplar_box_mode=mode)
    prior = correlation_prior(config, num_samples=4096, generator=torch.Generator().manual_seed(0))
    assert prior.shape == (config.context_size, config.context_size)
    mean_map = labels_from(config, 4096, seed=1).mean(dim=(0, 1))
    assert (prior - mean_map).abs().max() < 0.04  # two independent 4k-sample estimates of the same mean
    # more likely in the centre than in a corner: boxes lie inside the view
    centre = config.context_size // 2
    assert prior[centre, centre] > 2 * prior[0, 0]


def test_prior_beats_other_constant_maps(tiny_vit_config):
    """The mean map minimises the expected cross-entropy among constant predictions: a flat map at the same
    mean, a sharpened or a flattened prior all score worse on fresh labels."""
    config = tiny_vit_config()
    prior = correlation_prior(config, num_samples=4096, generator=torch.Generator().manual_seed(2))
    labels = labels_from(config, 1024, seed=3)
    best, _ = prior_metrics(prior, labels, config)
    flat = torch.full_like(prior, float(prior.mean()))
    for other in (flat, prior.sqrt(), prior**2):
        assert prior_metrics(other, labels, config)[0] > best + 1e-3


def test_prior_metrics_use_the_models_loss_and_iou(tiny_vit_config):
    config = tiny_vit_config()
    prior = correlation_prior(config, num_samples=1024, generator=torch.Generator().manual_seed(4))
    labels = labels_from(config, 16, seed=5)
    loss, iou = (float(v) for v in prior_metrics(prior, labels, config))
    logits = prior_logits(prior).expand_as(labels)
    assert loss == pytest.approx(float(correlation_loss(logits, labels, config)))
    assert iou == pytest.approx(float(correlation_iou(logits, labels)))
    # a model that predicts the true maps (large logits of the right sign) beats it on both
    perfect = (labels * 2 - 1) * 20
    assert float(correlation_loss(perfect, labels, config)) < 0.01 * loss
    assert float(correlation_iou(perfect, labels)) == 1.0 > iou


def test_prior_is_seeded(tiny_vit_config):
    config = tiny_vit_config()
    a = correlation_prior(config, num_samples=512, generator=torch.Generator().manual_seed(6))
    b = correlation_prior(config, num_samples=512, generator=torch.Generator().manual_seed(6))
    c = correlation_prior(config, num_samples=512, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b) and not torch.equal(a, c)
