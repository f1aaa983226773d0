"""The pretext sampler as it was before the fast paths of `pretext.py` (issue 11, "lean pretext"), kept unchanged.

These are the specification the fast implementations are tested against bit for bit (tests/test_pretext.py) and
the "before" that `benchmarks/bench_pretext.py --compare_reference` times side by side with them. Nothing else
should call them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .exemplar_augmentation import _grayscale, _rotate_hue, _uniform, gaussian_blur
from .pretext import (
    PretextBatch,
    exemplar_supersampling,
    resize_context,
    sample_config_boxes,
)


def _exemplar_sampling_grid_reference(boxes: torch.Tensor, size: int) -> torch.Tensor:
    """The (B, K*n, n, 2) grid, built as two full coordinate tensors stacked."""
    batch_size, num_exemplars = boxes.shape[:2]
    cx, cy, w, h, theta = boxes.unbind(-1)  # each (B, K)
    steps = (torch.arange(size, device=boxes.device, dtype=boxes.dtype) * 2 + 1) / size - 1  # (n,)
    cos, sin = theta.cos()[..., None, None], theta.sin()[..., None, None]
    u = steps.view(1, 1, 1, size) * w[..., None, None]  # (B, K, 1, n): half-extent in [-1, 1] units is w
    v = steps.view(1, 1, size, 1) * h[..., None, None]  # (B, K, n, 1)
    x = (2 * cx - 1)[..., None, None] + u * cos - v * sin  # (B, K, n, n)
    y = (2 * cy - 1)[..., None, None] + u * sin + v * cos
    grid = torch.stack([x, y], dim=-1)  # (B, K, n, n, 2)
    return grid.reshape(batch_size, num_exemplars * size, size, 2)


def _warp_exemplars_reference(
    images: torch.Tensor, boxes: torch.Tensor, size: int, supersample: int = 1
) -> torch.Tensor:
    """All B*K exemplars in one `grid_sample` call, as a permuted view (B, K, C, n, n)."""
    batch_size, num_exemplars = boxes.shape[:2]
    fine = size * supersample
    grid = _exemplar_sampling_grid_reference(boxes.float(), fine)
    out = F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    out = out.to(images.dtype)
    out = out.view(batch_size, images.shape[1] * num_exemplars, fine, fine)
    if supersample > 1:
        out = F.avg_pool2d(out, supersample)
    out = out.view(batch_size, images.shape[1], num_exemplars, size, size)
    return out.permute(0, 2, 1, 3, 4)


def _correlation_maps_reference(boxes: torch.Tensor, size: int) -> torch.Tensor:
    """True maps (B, K, m, m) by the per-pixel test: each pixel centre projected on both box axes."""
    cx, cy, w, h, theta = (t[..., None, None] for t in boxes.unbind(-1))  # each (B, K, 1, 1)
    centres = (torch.arange(size, device=boxes.device, dtype=boxes.dtype) + 0.5) / size
    xs, ys = centres.view(1, 1, 1, size), centres.view(1, 1, size, 1)
    cos, sin = theta.cos(), theta.sin()
    along_w = ((xs - cx) * cos) + ((ys - cy) * sin)  # (B, K, m, m) via broadcasting (1, m) + (m, 1)
    along_h = ((ys - cy) * cos) - ((xs - cx) * sin)
    inside = (along_w.abs() <= w / 2) & (along_h.abs() <= h / 2)
    return inside.to(boxes.dtype)


def _color_jitter_reference(images: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Brightness, contrast, saturation then hue, each op allocating its result."""
    view = lambda t: t.view(-1, 1, 1, 1)  # noqa: E731
    out = (images * view(factors[:, 0])).clamp(0, 1)
    mean = _grayscale(out).mean(dim=(1, 2, 3), keepdim=True)
    out = (mean + (out - mean) * view(factors[:, 1])).clamp(0, 1)
    gray = _grayscale(out)
    out = (gray + (out - gray) * view(factors[:, 2])).clamp(0, 1)
    return _rotate_hue(out, factors[:, 3]).clamp(0, 1)


def _augment_exemplars_reference(
    images: torch.Tensor, config, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Every transform computed for every sample and blended in by mask."""
    n, device = images.shape[0], images.device
    draw = lambda *shape: _uniform(shape, 0.0, 1.0, generator, device)  # noqa: E731
    mask = lambda p: (draw(n) < p).view(n, 1, 1, 1)  # noqa: E731
    b, c, s, hue = config.exemplar_color_jitter
    low = images.new_tensor([max(0.0, 1 - b), max(0.0, 1 - c), max(0.0, 1 - s), -hue])
    high = images.new_tensor([1 + b, 1 + c, 1 + s, hue])
    factors = low + (high - low) * draw(n, 4)
    images = torch.where(mask(config.exemplar_color_jitter_prob), _color_jitter_reference(images, factors), images)
    images = torch.where(mask(config.exemplar_grayscale_prob), _grayscale(images).expand_as(images), images)
    lo, hi = config.exemplar_blur_sigma
    sigma = lo + (hi - lo) * draw(n)
    images = torch.where(mask(config.exemplar_blur_prob), gaussian_blur(images, sigma, hi), images)
    images = torch.where(mask(config.exemplar_solarize_prob), torch.where(images >= 0.5, 1 - images, images), images)
    images = torch.where(mask(config.exemplar_hflip_prob), images.flip(-1), images)
    return images


def _sample_pretext_reference(
    pixel_values: torch.Tensor, config, generator: torch.Generator | None = None, boxes: torch.Tensor | None = None
) -> PretextBatch:
    """The whole sampler built from the reference pieces above."""
    batch_size = pixel_values.shape[0]
    if boxes is None:
        boxes = sample_config_boxes(
            config, batch_size, config.num_exemplars, generator=generator, device=pixel_values.device
        )
    boxes = boxes.to(device=pixel_values.device, dtype=torch.float32)
    with torch.autocast(pixel_values.device.type, enabled=False):
        exemplars = _warp_exemplars_reference(
            pixel_values, boxes, config.exemplar_size, exemplar_supersampling(config)
        )
        labels = _correlation_maps_reference(boxes, config.context_size)
    if config.exemplar_augmentation:
        mean = pixel_values.new_tensor(config.image_mean).view(1, 3, 1, 1)
        std = pixel_values.new_tensor(config.image_std).view(1, 3, 1, 1)
        flat = exemplars.reshape(-1, *exemplars.shape[2:]).float()
        flat = _augment_exemplars_reference((flat * std.float() + mean.float()).clamp(0, 1), config, generator)
        exemplars = ((flat - mean.float()) / std.float()).to(pixel_values.dtype).view_as(exemplars)
    return PretextBatch(
        context_pixel_values=resize_context(pixel_values, config.context_size, config.context_resample),
        exemplar_pixel_values=exemplars,
        correlation_labels=labels,
        exemplar_boxes=boxes,
    )
