"""The crop-and-correlate pretext task, batched on the input's device.

Given a batch of "search" views, this module samples K rotated rectangular exemplar boxes per image, warps
all B*K exemplars with one `grid_sample` call (one grid of shape (B, K*n, n, 2), so the source image is
never copied per exemplar), computes the true correlation maps analytically on the context pixel grid
(point-in-rotated-rectangle, as separable broadcast sums), and applies the exemplar-only photometric
transforms with per-sample random parameters. No per-sample Python loop runs anywhere.

Box convention: coordinates are fractions of the search view's side, (0, 0) is the top-left corner,
x grows to the right and y downwards. A box is (cx, cy, w, h, theta): centre, side lengths along its own
axes, and rotation in radians; its axes are e1 = (cos theta, sin theta) for the width and
e2 = (-sin theta, cos theta) for the height. A pixel belongs to the box when its centre does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

NUM_SAMPLING_TRIES = 10
LUMA_WEIGHTS = (0.299, 0.587, 0.114)


@dataclass
class PretextBatch:
    """Everything the pretext task produced for one batch."""

    context_pixel_values: torch.Tensor  # (B, 3, m, m), normalised like the input
    exemplar_pixel_values: torch.Tensor  # (B, K, 3, n, n), normalised like the input
    correlation_labels: torch.Tensor  # (B, K, m, m), 0/1 floats
    exemplar_boxes: torch.Tensor  # (B, K, 5): cx, cy, w, h, theta


def _uniform(shape: tuple[int, ...], low: float, high: float, generator: torch.Generator | None,
             device: torch.device) -> torch.Tensor:
    """Uniform samples drawn on the generator's device (so a CPU generator works for any input device)."""
    if generator is None:  # no generator argument at all: torch.compile rejects generator=None with dynamic shapes
        u = torch.rand(shape, device=device, dtype=torch.float32)
    else:
        u = torch.rand(shape, generator=generator, device=generator.device, dtype=torch.float32)
    return (low + (high - low) * u).to(device)


def rotated_half_extents(w: torch.Tensor, h: torch.Tensor, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Half width and half height of the axis-aligned bounding box of a rotated w x h rectangle."""
    c, s = theta.cos().abs(), theta.sin().abs()
    return 0.5 * (w * c + h * s), 0.5 * (w * s + h * c)


def _sides_and_angles(shape: tuple[int, ...], scale: tuple[float, float], aspect_ratio: tuple[float, float],
                      max_rotation_degrees: float, generator: torch.Generator | None,
                      device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Box sides and angles: area fraction ~ U(scale), h/w log-uniform in `aspect_ratio`, theta ~ U(+-max)."""
    area = _uniform(shape, scale[0], scale[1], generator, device)
    log_ratio = _uniform(shape, math.log(aspect_ratio[0]), math.log(aspect_ratio[1]), generator, device)
    max_rot = math.radians(max_rotation_degrees)
    theta = _uniform(shape, -max_rot, max_rot, generator, device)
    ratio = log_ratio.exp()
    return (area / ratio).sqrt(), (area * ratio).sqrt(), theta


def sample_exemplar_boxes(
    batch_size: int,
    num_exemplars: int,
    scale: tuple[float, float],
    aspect_ratio: tuple[float, float],
    max_rotation_degrees: float,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Samples (B, K, 5) boxes (cx, cy, w, h, theta) that lie inside the view.

    Area fraction ~ U(scale), h/w log-uniform in `aspect_ratio`, theta ~ U(+-max_rotation). Like a
    random-resized-crop, each box takes the first of `NUM_SAMPLING_TRIES` candidates whose rotated bounding
    box fits in the view; when none fits, the first candidate is shrunk (aspect and angle kept) until it does.
    The centre is then uniform over the positions where the rotated box stays inside the view.
    """
    device = torch.device(device)
    shape = (NUM_SAMPLING_TRIES, batch_size, num_exemplars)
    w, h, theta = _sides_and_angles(shape, scale, aspect_ratio, max_rotation_degrees, generator, device)
    half_x, half_y = rotated_half_extents(w, h, theta)
    fits = (half_x <= 0.5) & (half_y <= 0.5)
    # index of the first try that fits (0 when none fits; that one is shrunk below)
    first = torch.where(fits.any(0), fits.float().argmax(0), torch.zeros_like(fits[0], dtype=torch.long))
    pick = lambda t: t.gather(0, first.unsqueeze(0)).squeeze(0)  # noqa: E731
    w, h, theta, half_x, half_y = pick(w), pick(h), pick(theta), pick(half_x), pick(half_y)
    shrink = (0.5 / torch.maximum(half_x, half_y)).clamp(max=1.0)
    w, h, half_x, half_y = w * shrink, h * shrink, half_x * shrink, half_y * shrink
    cx = half_x + (1.0 - 2.0 * half_x) * _uniform((batch_size, num_exemplars), 0.0, 1.0, generator, device)
    cy = half_y + (1.0 - 2.0 * half_y) * _uniform((batch_size, num_exemplars), 0.0, 1.0, generator, device)
    return torch.stack([cx, cy, w, h, theta], dim=-1)


def _interval(low: torch.Tensor, high: torch.Tensor, slope: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The t with low <= slope * t <= high (unbounded where the slope is 0)."""
    safe = torch.where(slope.abs() < 1e-6, torch.ones_like(slope), slope)
    a, b = low / safe, high / safe
    flat = slope.abs() < 1e-6
    return (torch.where(flat, torch.full_like(a, -math.inf), torch.minimum(a, b)),
            torch.where(flat, torch.full_like(a, math.inf), torch.maximum(a, b)))


def _view_row_interval(row: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Where the row `row` of the view turned by theta crosses the (unturned) view: x range, turned frame."""
    dy = row - 0.5
    lo_x, hi_x = _interval(-0.5 + dy * sin, 0.5 + dy * sin, cos)  # 0 <= x-coordinate in the view <= 1
    lo_y, hi_y = _interval(-0.5 - dy * cos, 0.5 - dy * cos, sin)  # 0 <= y-coordinate in the view <= 1
    return 0.5 + torch.maximum(lo_x, lo_y), 0.5 + torch.minimum(hi_x, hi_y)


def sample_enclosing_boxes(
    batch_size: int,
    num_exemplars: int,
    scale: tuple[float, float],
    aspect_ratio: tuple[float, float],
    max_rotation_degrees: float,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Samples (B, K, 5) boxes the way the authors' code cuts exemplars (`exemplar_box_mode="enclosing"`).

    An axis-aligned w x h box (area ~ U(scale), h/w log-uniform) is placed uniformly inside the view; the
    view is turned by theta about its centre; the exemplar is the axis-aligned bounding box of the sampled box
    in the turned view, with the corners that fall outside the image pulled in to its edge along the rows or
    along the columns, whichever keeps the larger exemplar (so the exemplar holds image pixels only). Seen from the unturned view, that is a rectangle rotated by
    theta that encloses most of the sampled box and is larger and squarer than it.
    """
    device = torch.device(device)
    shape = (batch_size, num_exemplars)
    w, h, theta = _sides_and_angles(shape, scale, aspect_ratio, max_rotation_degrees, generator, device)
    w, h = w.clamp(max=1.0), h.clamp(max=1.0)
    px = w / 2 + (1.0 - w) * _uniform(shape, 0.0, 1.0, generator, device)
    py = h / 2 + (1.0 - h) * _uniform(shape, 0.0, 1.0, generator, device)
    cos, sin = theta.cos(), theta.sin()
    # the sampled box's centre in the turned view (a turned-frame point q is the view point c + R(theta)(q - c))
    rx = 0.5 + (px - 0.5) * cos + (py - 0.5) * sin
    ry = 0.5 - (px - 0.5) * sin + (py - 0.5) * cos
    half_x, half_y = rotated_half_extents(w, h, theta)
    # pull the corners outside the image in along the rows, or along the columns (the view is symmetric under
    # the transpose with theta -> -theta); keep whichever leaves the larger exemplar
    row_box = _pull_along_rows(rx, ry, half_x, half_y, cos, sin)
    col_box = _pull_along_rows(ry, rx, half_y, half_x, cos, -sin)
    col_box = (col_box[1], col_box[0], col_box[3], col_box[2])
    use_rows = row_box[2] * row_box[3] >= col_box[2] * col_box[3]
    qx, qy, width, height = (torch.where(use_rows, a, b) for a, b in zip(row_box, col_box))
    cx = 0.5 + (qx - 0.5) * cos - (qy - 0.5) * sin
    cy = 0.5 + (qx - 0.5) * sin + (qy - 0.5) * cos
    return torch.stack([cx, cy, width, height, theta], dim=-1)


def _pull_along_rows(rx, ry, half_x, half_y, cos, sin):
    """The rectangle centred (rx, ry) with half sides (half_x, half_y) in the turned frame, its left and right
    sides moved in so that its four corners lie in the image: (centre x, centre y, width, height)."""
    top, bottom = ry - half_y, ry + half_y
    top_lo, top_hi = _view_row_interval(top, cos, sin)
    bottom_lo, bottom_hi = _view_row_interval(bottom, cos, sin)
    left = torch.maximum(rx - half_x, torch.maximum(top_lo, bottom_lo))
    right = torch.minimum(rx + half_x, torch.minimum(top_hi, bottom_hi))
    right = torch.maximum(right, left + 1e-3)  # never empty (only a degenerate sliver could get here)
    return (left + right) / 2, ry, right - left, bottom - top


BOX_SAMPLERS = {"enclosing": sample_enclosing_boxes, "exact": sample_exemplar_boxes}


def sample_config_boxes(config, batch_size: int, num_exemplars: int, generator: torch.Generator | None = None,
                        device: torch.device | str = "cpu") -> torch.Tensor:
    """(B, K, 5) exemplar boxes drawn from `config`'s distribution (`exemplar_box_mode` picks the sampler)."""
    sampler = BOX_SAMPLERS[config.exemplar_box_mode]
    return sampler(batch_size, num_exemplars, config.exemplar_scale, config.exemplar_aspect_ratio,
                   config.exemplar_max_rotation, generator=generator, device=device)


def exemplar_sampling_grid(boxes: torch.Tensor, size: int) -> torch.Tensor:
    """The `grid_sample` grid (B, K*n, n, 2) that reads all K boxes of each image into n x n exemplars.

    Output pixel (i, j) of exemplar k reads the view at centre + R(theta) @ ((u_j * w/2), (v_i * h/2)), with
    u, v the pixel centres in [-1, 1] (`align_corners=False` convention), written in [-1, 1] coordinates.
    """
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


def warp_exemplars(images: torch.Tensor, boxes: torch.Tensor, size: int, supersample: int = 1) -> torch.Tensor:
    """Crops the rotated boxes (B, K, 5) out of `images` (B, C, H, W) as (B, K, C, n, n) in one call.

    With `supersample` s > 1 each exemplar pixel is the mean of s x s bilinear samples spread over it: an
    antialiased downscale (box filter) for exemplars that shrink their box by up to about s times.
    """
    batch_size, num_exemplars = boxes.shape[:2]
    fine = size * supersample
    # geometry in fp32 whatever the image dtype: a bf16 grid is off by up to ~1 px against the fp32 true map
    grid = exemplar_sampling_grid(boxes.float(), fine)
    out = F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    out = out.to(images.dtype)
    out = out.view(batch_size, images.shape[1] * num_exemplars, fine, fine)
    if supersample > 1:
        out = F.avg_pool2d(out, supersample)
    out = out.view(batch_size, images.shape[1], num_exemplars, size, size)
    return out.permute(0, 2, 1, 3, 4)


def exemplar_supersampling(config) -> int:
    """Samples per exemplar pixel side for the config's antialiasing: the largest downscale a box of the
    largest configured area can need (its side / the exemplar side), at most 4; 1 when antialiasing is off."""
    if not config.exemplar_antialias:
        return 1
    largest_side = math.sqrt(config.exemplar_scale[1]) * config.image_size
    return int(min(4, max(1, math.ceil(largest_side / config.exemplar_size))))


def correlation_maps(boxes: torch.Tensor, size: int) -> torch.Tensor:
    """True maps (B, K, m, m): 1 where the context pixel's centre lies inside the rotated box.

    Uses separable broadcast sums: the projection of pixel (i, j) on a box axis is a[j] + b[i].
    """
    cx, cy, w, h, theta = (t[..., None, None] for t in boxes.unbind(-1))  # each (B, K, 1, 1)
    centres = (torch.arange(size, device=boxes.device, dtype=boxes.dtype) + 0.5) / size
    xs, ys = centres.view(1, 1, 1, size), centres.view(1, 1, size, 1)
    cos, sin = theta.cos(), theta.sin()
    along_w = ((xs - cx) * cos) + ((ys - cy) * sin)  # (B, K, m, m) via broadcasting (1, m) + (m, 1)
    along_h = ((ys - cy) * cos) - ((xs - cx) * sin)
    inside = (along_w.abs() <= w / 2) & (along_h.abs() <= h / 2)
    return inside.to(boxes.dtype)


def resize_context(images: torch.Tensor, size: int, mode: str = "bicubic") -> torch.Tensor:
    """The context: the search view resized to size x size ("bicubic" or "bilinear", antialiased)."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    # in fp32: the antialiased kernels have no bf16 CPU implementation
    resized = F.interpolate(images.float(), size=(size, size), mode=mode, align_corners=False, antialias=True)
    return resized.to(images.dtype)


# ----------------------------------------------------------------------------------------------------------
# Photometric transforms for the exemplars, on [0, 1] images of shape (N, 3, n, n), per-sample parameters.
# ----------------------------------------------------------------------------------------------------------


def _grayscale(images: torch.Tensor) -> torch.Tensor:
    weights = images.new_tensor(LUMA_WEIGHTS).view(1, 3, 1, 1)
    return (images * weights).sum(1, keepdim=True)


RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]],
                          dtype=torch.float64)
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
    out = (images * view(factors[:, 0])).clamp(0, 1)
    mean = _grayscale(out).mean(dim=(1, 2, 3), keepdim=True)
    out = (mean + (out - mean) * view(factors[:, 1])).clamp(0, 1)
    gray = _grayscale(out)
    out = (gray + (out - gray) * view(factors[:, 2])).clamp(0, 1)
    return _rotate_hue(out, factors[:, 3]).clamp(0, 1)


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


def augment_exemplars(images: torch.Tensor, config, generator: torch.Generator | None = None) -> torch.Tensor:
    """Applies colour jitter, grayscale, blur, solarize and horizontal flip, each with its own probability and
    per-sample parameters, to (N, 3, n, n) images in [0, 1]. Every random number is drawn (so a seeded
    generator gives the same stream whatever the probabilities) and each transform is blended in by mask."""
    n, device = images.shape[0], images.device
    draw = lambda *shape: _uniform(shape, 0.0, 1.0, generator, device)  # noqa: E731
    mask = lambda p: (draw(n) < p).view(n, 1, 1, 1)  # noqa: E731
    b, c, s, hue = config.exemplar_color_jitter
    low = images.new_tensor([max(0.0, 1 - b), max(0.0, 1 - c), max(0.0, 1 - s), -hue])
    high = images.new_tensor([1 + b, 1 + c, 1 + s, hue])
    factors = low + (high - low) * draw(n, 4)
    images = torch.where(mask(config.exemplar_color_jitter_prob), color_jitter(images, factors), images)
    images = torch.where(mask(config.exemplar_grayscale_prob), _grayscale(images).expand_as(images), images)
    lo, hi = config.exemplar_blur_sigma
    sigma = lo + (hi - lo) * draw(n)
    images = torch.where(mask(config.exemplar_blur_prob), gaussian_blur(images, sigma, hi), images)
    images = torch.where(mask(config.exemplar_solarize_prob), torch.where(images >= 0.5, 1 - images, images), images)
    images = torch.where(mask(config.exemplar_hflip_prob), images.flip(-1), images)
    return images


def sample_pretext(pixel_values: torch.Tensor, config, generator: torch.Generator | None = None,
                   boxes: torch.Tensor | None = None) -> PretextBatch:
    """Builds the context, K exemplars, their true maps and boxes for a batch of normalised search views.

    `boxes` (B, K, 5) may be given to fix the geometry; otherwise they are sampled from `config`.
    """
    batch_size = pixel_values.shape[0]
    if boxes is None:
        boxes = sample_config_boxes(config, batch_size, config.num_exemplars, generator=generator,
                                    device=pixel_values.device)
    boxes = boxes.to(device=pixel_values.device, dtype=torch.float32)
    with torch.autocast(pixel_values.device.type, enabled=False):  # exact geometry under autocast too
        exemplars = warp_exemplars(pixel_values, boxes, config.exemplar_size, exemplar_supersampling(config))
        labels = correlation_maps(boxes, config.context_size)
    if config.exemplar_augmentation:
        mean = pixel_values.new_tensor(config.image_mean).view(1, 3, 1, 1)
        std = pixel_values.new_tensor(config.image_std).view(1, 3, 1, 1)
        flat = exemplars.reshape(-1, *exemplars.shape[2:]).float()
        flat = augment_exemplars((flat * std.float() + mean.float()).clamp(0, 1), config, generator)
        exemplars = ((flat - mean.float()) / std.float()).to(pixel_values.dtype).view_as(exemplars)
    return PretextBatch(
        context_pixel_values=resize_context(pixel_values, config.context_size, config.context_resample),
        exemplar_pixel_values=exemplars,
        correlation_labels=labels,
        exemplar_boxes=boxes,
    )


__all__ = [
    "PretextBatch",
    "augment_exemplars",
    "correlation_maps",
    "exemplar_sampling_grid",
    "exemplar_supersampling",
    "resize_context",
    "sample_config_boxes",
    "sample_enclosing_boxes",
    "sample_exemplar_boxes",
    "sample_pretext",
    "warp_exemplars",
]
