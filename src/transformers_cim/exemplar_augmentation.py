"""Photometric augmentation of the exemplars (colour jitter, hue rotation, grayscale, Gaussian blur, solarisation,
flip), batched on [0, 1] images of shape (N, 3, n, n) with per-sample random parameters drawn from an optional
`torch.Generator`, so a seeded call is exact. :func:`~transformers_cim.pretext.sample_pretext` applies it to the
warped exemplars only; the context view is never augmented."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

LUMA_WEIGHTS = (0.299, 0.587, 0.114)


def _uniform(
    shape: tuple[int, ...], low: float, high: float, generator: torch.Generator | None, device: torch.device
) -> torch.Tensor:
    """Uniform samples drawn on the generator's device (so a CPU generator works for any input device)."""
    if generator is None:  # no generator argument at all: torch.compile rejects generator=None with dynamic shapes
        u = torch.rand(shape, device=device, dtype=torch.float32)
    else:
        u = torch.rand(shape, generator=generator, device=generator.device, dtype=torch.float32)
    return (low + (high - low) * u).to(device)


def _grayscale(images: torch.Tensor) -> torch.Tensor:
    weights = images.new_tensor(LUMA_WEIGHTS).view(1, 3, 1, 1)
    return (images * weights).sum(1, keepdim=True)


RGB_TO_YIQ = torch.tensor(
    [[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], dtype=torch.float64
)
YIQ_TO_RGB = torch.linalg.inv(RGB_TO_YIQ)  # exact inverse, so a zero hue shift leaves pixels unchanged


def _rotate_hue(images: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Hue rotation by `shift` turns (fraction of the colour circle) in the YIQ chroma plane."""
    angle = 2 * math.pi * shift.to(torch.float64)
    cos, sin = angle.cos(), angle.sin()
    rotation = torch.zeros(shift.shape[0], 3, 3, dtype=torch.float64, device=shift.device)
    rotation[:, 0, 0] = 1.0
    rotation[:, 1, 1], rotation[:, 1, 2], rotation[:, 2, 1], rotation[:, 2, 2] = cos, -sin, sin, cos
    rgb_to_yiq, yiq_to_rgb = RGB_TO_YIQ.to(shift.device), YIQ_TO_RGB.to(shift.device)
    transform = (yiq_to_rgb @ rotation @ rgb_to_yiq).to(images.dtype)  # (N, 3, 3): one matrix per image
    return torch.einsum("nij,njhw->nihw", transform, images)


def color_jitter(images: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Brightness, contrast, saturation (multiplicative factors) then hue shift; `factors` is (N, 4)."""
    view = lambda t: t.view(-1, 1, 1, 1)  # noqa: E731
    # in place after the first product (a fresh tensor): the same roundings as out-of-place, fewer allocations
    out = (images * view(factors[:, 0])).clamp_(0, 1)
    mean = _grayscale(out).mean(dim=(1, 2, 3), keepdim=True)
    out = out.sub_(mean).mul_(view(factors[:, 1])).add_(mean).clamp_(0, 1)  # mean + (out - mean) * contrast
    gray = _grayscale(out)
    out = out.sub_(gray).mul_(view(factors[:, 2])).add_(gray).clamp_(0, 1)  # gray + (out - gray) * saturation
    return _rotate_hue(out, factors[:, 3]).clamp_(0, 1)


def gaussian_blur(images: torch.Tensor, sigma: torch.Tensor, max_sigma: float) -> torch.Tensor:
    """Separable Gaussian blur with a per-sample sigma (N,), reflect padding, one grouped conv per axis."""
    n, c, hgt, wid = images.shape
    radius = max(1, min(int(math.ceil(3 * max_sigma)), (min(hgt, wid) - 1)))
    offsets = torch.arange(-radius, radius + 1, device=images.device, dtype=images.dtype)
    kernel = torch.exp(-0.5 * (offsets.view(1, -1) / sigma.view(-1, 1)) ** 2)
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, dim=0)  # (N*C, 2r+1)
    flat = images.reshape(1, n * c, hgt, wid)
    flat = F.conv2d(F.pad(flat, (radius, radius, 0, 0), mode="reflect"), kernel.view(n * c, 1, 1, -1), groups=n * c)
    flat = F.conv2d(F.pad(flat, (0, 0, radius, radius), mode="reflect"), kernel.view(n * c, 1, -1, 1), groups=n * c)
    return flat.view(n, c, hgt, wid)


@dataclass
class _AugmentationDraws:
    """The per-sample random parameters of `augment_exemplars`: which transforms apply, and their strengths."""

    factors: torch.Tensor  # (N, 4) colour-jitter factors
    jitter: torch.Tensor  # (N,) bool, and likewise below
    grayscale: torch.Tensor
    sigma: torch.Tensor  # (N,) blur sigma
    blur: torch.Tensor
    solarize: torch.Tensor
    flip: torch.Tensor


def augmentation_ramp(step: float, max_steps: float, ramp: tuple[float, float]) -> float:
    """Strength of the exemplar photometric augmentation at optimizer step `step` of `max_steps`: 0 until the
    fraction `ramp[0]` of training, rising linearly to 1 at `ramp[1]`, then 1 (`(0, 0)`: 1 from the first step)."""
    start, end = ramp
    if end <= 0 or max_steps <= 0:
        return 1.0
    progress = step / max_steps
    if progress >= end:
        return 1.0
    if progress <= start:
        return 0.0
    return min((progress - start) / (end - start), 1.0)


def _draw_augmentation(
    images: torch.Tensor, config, generator: torch.Generator | None, strength: float | torch.Tensor = 1.0
) -> _AugmentationDraws:
    """Every random number of the augmentation, drawn whatever the probabilities and in a fixed order, so a
    seeded generator gives the same stream (and the same exemplars) whichever way the transforms are applied.

    `strength` in [0, 1] scales every probability and the four colour-jitter strengths (0: no transform, 1: the
    config's); the draws themselves do not depend on it, so a ramped run consumes the stream a full one does."""
    n, device = images.shape[0], images.device
    draw = lambda *shape: _uniform(shape, 0.0, 1.0, generator, device)  # noqa: E731
    # in float64 so that strength 1 gives the config's bounds and probabilities exactly as Python floats would
    strength = torch.as_tensor(strength, dtype=torch.float64, device=device)
    jitter_strengths = strength * torch.tensor(config.exemplar_color_jitter, dtype=torch.float64, device=device)
    low = torch.cat([(1 - jitter_strengths[:3]).clamp(min=0.0), -jitter_strengths[3:]]).to(images.dtype)
    high = torch.cat([1 + jitter_strengths[:3], jitter_strengths[3:]]).to(images.dtype)
    chance = lambda p: (strength * p).to(torch.float32)  # noqa: E731
    factors = low + (high - low) * draw(n, 4)
    jitter = draw(n) < chance(config.exemplar_color_jitter_prob)
    grayscale = draw(n) < chance(config.exemplar_grayscale_prob)
    lo, hi = config.exemplar_blur_sigma
    sigma = lo + (hi - lo) * draw(n)
    blur = draw(n) < chance(config.exemplar_blur_prob)
    solarize = draw(n) < chance(config.exemplar_solarize_prob)
    flip = draw(n) < chance(config.exemplar_hflip_prob)
    return _AugmentationDraws(factors, jitter, grayscale, sigma, blur, solarize, flip)


def _apply_to_drawn(images: torch.Tensor, drawn: torch.Tensor, transform, subset: bool) -> torch.Tensor:
    """`transform(samples, take)` applied to the samples where `drawn` (N,) is set; `take(t)` picks their rows of
    a per-sample parameter t. `subset`: transform only those samples and copy them back in place (eager CPU);
    else transform all and blend by mask (static shapes for torch.compile, no host sync on accelerators)."""
    if not subset:
        return torch.where(drawn.view(-1, 1, 1, 1), transform(images, lambda t: t), images)
    index = drawn.nonzero().squeeze(1)
    if index.numel() == 0:
        return images
    take = lambda t: t.index_select(0, index)  # noqa: E731
    # (under bf16 autocast the hue matmul and the blur convolutions return bf16, which torch.where promotes)
    return images.index_copy_(0, index, transform(take(images), take).to(images.dtype))


def _solarize(images: torch.Tensor) -> torch.Tensor:
    return torch.where(images >= 0.5, 1 - images, images)


def augment_exemplars(
    images: torch.Tensor, config, generator: torch.Generator | None = None, strength: float | torch.Tensor = 1.0
) -> torch.Tensor:
    """Applies colour jitter, grayscale, blur, solarize and horizontal flip, each with its own probability and
    per-sample parameters, to (N, 3, n, n) images in [0, 1]. Every random number is drawn (so a seeded
    generator gives the same stream whatever the probabilities). In eager mode on a CPU each transform runs on
    the samples drawn for it only; elsewhere on all samples, blended in by mask; the results are identical.
    `strength` (0 to 1) scales the probabilities and the colour-jitter strengths (see `augmentation_ramp`)."""
    return _augment(images, config, generator, in_place=False, strength=strength)


def _augment(
    images: torch.Tensor,
    config,
    generator: torch.Generator | None,
    in_place: bool = False,
    subset: bool | None = None,
    strength: float | torch.Tensor = 1.0,
) -> torch.Tensor:
    """`augment_exemplars`; `in_place` lets it overwrite `images`; `subset` forces one way of applying the
    transforms (default: on the drawn samples only in eager mode on a CPU, where it is the faster)."""
    drawn = _draw_augmentation(images, config, generator, strength)
    if subset is None:
        subset = images.device.type == "cpu" and not torch.compiler.is_compiling()
    if subset and not in_place:
        images = images.clone()
    max_sigma = config.exemplar_blur_sigma[1]
    images = _apply_to_drawn(images, drawn.jitter, lambda x, take: color_jitter(x, take(drawn.factors)), subset)
    images = _apply_to_drawn(images, drawn.grayscale, lambda x, take: _grayscale(x).expand_as(x), subset)
    images = _apply_to_drawn(
        images, drawn.blur, lambda x, take: gaussian_blur(x, take(drawn.sigma), max_sigma), subset
    )
    images = _apply_to_drawn(images, drawn.solarize, lambda x, take: _solarize(x), subset)
    return _apply_to_drawn(images, drawn.flip, lambda x, take: x.flip(-1), subset)


__all__ = [
    "LUMA_WEIGHTS",
    "augment_exemplars",
    "augmentation_ramp",
    "color_jitter",
    "gaussian_blur",
]
