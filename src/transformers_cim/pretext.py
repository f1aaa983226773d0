"""The crop-and-correlate pretext task, batched on the input's device.

Given a batch of "search" views, this module samples K rotated rectangular exemplar boxes per image, warps
all B*K exemplars with `grid_sample` (one grid of shape (B, s*s*K*n, n, 2) reads all K boxes of an image, so the
source image is never copied per exemplar; a CPU takes a few images per call), computes the true correlation
maps analytically on the context pixel grid (point-in-rotated-rectangle, one interval of columns per row), and
applies the exemplar-only photometric transforms with per-sample random parameters. No per-sample Python loop
runs anywhere. `_pretext_reference` keeps the slower first implementation these functions equal bit for bit.

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

from .exemplar_augmentation import (  # augment_exemplars & co. re-exported: the pretext task's API
    _augment,
    _uniform,
    augment_exemplars,
    augmentation_ramp,
    color_jitter,
    gaussian_blur,
)

NUM_SAMPLING_TRIES = 10


@dataclass
class PretextBatch:
    """Everything the pretext task produced for one batch."""

    context_pixel_values: torch.Tensor  # (B, 3, m, m), normalised like the input
    exemplar_pixel_values: torch.Tensor  # (B, K, 3, n, n), normalised like the input
    correlation_labels: torch.Tensor  # (B, K, m, m), 0/1 floats
    exemplar_boxes: torch.Tensor  # (B, K, 5): cx, cy, w, h, theta


def rotated_half_extents(w: torch.Tensor, h: torch.Tensor, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Half width and half height of the axis-aligned bounding box of a rotated w x h rectangle."""
    c, s = theta.cos().abs(), theta.sin().abs()
    return 0.5 * (w * c + h * s), 0.5 * (w * s + h * c)


def _sides_and_angles(
    shape: tuple[int, ...],
    scale: tuple[float, float],
    aspect_ratio: tuple[float, float],
    max_rotation_degrees: float,
    generator: torch.Generator | None,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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
    return (
        torch.where(flat, torch.full_like(a, -math.inf), torch.minimum(a, b)),
        torch.where(flat, torch.full_like(a, math.inf), torch.maximum(a, b)),
    )


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
    along the columns, whichever keeps the larger exemplar (so the exemplar holds image pixels only). Seen from the
    unturned view, that is a rectangle rotated by
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


def sample_config_boxes(
    config,
    batch_size: int,
    num_exemplars: int,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """(B, K, 5) exemplar boxes drawn from `config`'s distribution (`exemplar_box_mode` picks the sampler)."""
    sampler = BOX_SAMPLERS[config.exemplar_box_mode]
    return sampler(
        batch_size,
        num_exemplars,
        config.exemplar_scale,
        config.exemplar_aspect_ratio,
        config.exemplar_max_rotation,
        generator=generator,
        device=device,
    )


def exemplar_sampling_grid(boxes: torch.Tensor, size: int, supersample: int = 1) -> torch.Tensor:
    """The `grid_sample` grid (B, s*s*K*n, n, 2) that reads all K boxes of each image into n x n exemplars,
    with s x s samples per exemplar pixel (`supersample` s).

    Sample (i, j) of output pixel (r, c) of exemplar k reads the view at centre + R(theta) @ (u * w/2, v * h/2),
    with u, v the centres of the fine pixels s*c + j and s*r + i of an (s*n) x (s*n) grid over the box, in
    [-1, 1] (`align_corners=False` convention). The grid rows are ordered (i, j, k, r): each sub-sample offset
    (i, j) is its own n x n plane, so the box filter is a sum of contiguous planes.
    """
    batch_size, num_exemplars = boxes.shape[:2]
    s, fine = supersample, size * supersample
    cx, cy, w, h, theta = (t[:, None, None, :, None, None] for t in boxes.unbind(-1))  # each (B, 1, 1, K, 1, 1)
    steps = (torch.arange(fine, device=boxes.device, dtype=boxes.dtype) * 2 + 1) / fine - 1  # (s*n,)
    steps = steps.view(size, s).t()  # (s, n): the fine pixel s*r + i at [i, r]
    cos, sin = theta.cos(), theta.sin()
    u = steps.view(1, 1, s, 1, 1, size) * w  # (B, 1, j, K, 1, c): half-extent in [-1, 1] units is w
    v = steps.view(1, s, 1, 1, size, 1) * h  # (B, i, 1, K, r, 1)
    x_part, x_rest = (2 * cx - 1) + u * cos, v * sin  # x = x_part - x_rest, y = y_part + y_rest: (B, i, j, K, r, c)
    y_part, y_rest = (2 * cy - 1) + u * sin, v * cos
    if torch.compiler.is_compiling():  # `out=` into a strided view does not trace; the compiler fuses the stack
        grid = torch.stack([x_part - x_rest, y_part + y_rest], dim=-1)
    else:  # x and y written straight into the interleaved grid: no full-size temporaries, no stacking copy
        grid = torch.empty(batch_size, s, s, num_exemplars, size, size, 2, device=boxes.device, dtype=boxes.dtype)
        torch.sub(x_part, x_rest, out=grid[..., 0])
        torch.add(y_part, y_rest, out=grid[..., 1])
    return grid.view(batch_size, s * s * num_exemplars * size, size, 2)


# Largest block of supersampled exemplars (bytes) that one `grid_sample` call produces per CPU thread: the grid
# and the samples of a call then stay in cache and in reused heap memory instead of fresh pages.
CPU_WARP_CHUNK_BYTES = 8 << 20


def _images_per_warp_call(images: torch.Tensor, num_exemplars: int, fine: int) -> int:
    """All images in one call on accelerators and under torch.compile; on a CPU, as many per thread as fit the
    chunk (grid_sample splits a call's images between the threads: an equal share each)."""
    if images.device.type != "cpu" or torch.compiler.is_compiling():
        return images.shape[0]
    per_image = images.shape[1] * num_exemplars * fine * fine * 4  # the fp32 grid_sample output
    return torch.get_num_threads() * max(1, CPU_WARP_CHUNK_BYTES // per_image)


def _warp_call(
    images: torch.Tensor, boxes: torch.Tensor, size: int, supersample: int, out: torch.Tensor | None = None
) -> torch.Tensor:
    """One `grid_sample` call and its box filter: the exemplars (b, C, K, n, n) of b images, written into `out`
    when given."""
    batch_size, num_exemplars = boxes.shape[:2]
    # geometry in fp32 whatever the image dtype: a bf16 grid is off by up to ~1 px against the fp32 true map
    grid = exemplar_sampling_grid(boxes.float(), size, supersample)
    samples = F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    samples = samples.to(images.dtype)  # (b, C, s*s*K*n, n)
    planes = samples.view(batch_size, images.shape[1], supersample**2, num_exemplars, size, size)
    if supersample == 1:
        exemplars = planes[:, :, 0]
    else:
        # the box filter as avg_pool2d computes it, bit for bit: an fp32 sum from +0 over the s*s samples in
        # row-major order, divided by s*s (here the first two summed, then +0 added at the end: the same, -0 too)
        direct = out is not None and out.dtype == torch.float32
        total = torch.add(planes[:, :, 0].float(), planes[:, :, 1].float(), out=out if direct else None)
        for plane in range(2, supersample**2):
            total += planes[:, :, plane].float()
        exemplars = total.div_(supersample**2).add_(0.0).to(images.dtype)
    if out is None:
        return exemplars
    if exemplars is not out:
        out.copy_(exemplars)
    return out


def warp_exemplars(images: torch.Tensor, boxes: torch.Tensor, size: int, supersample: int = 1) -> torch.Tensor:
    """Crops the rotated boxes (B, K, 5) out of `images` (B, C, H, W) as (B, K, C, n, n).

    With `supersample` s > 1 each exemplar pixel is the mean of s x s bilinear samples spread over it: an
    antialiased downscale (box filter) for exemplars that shrink their box by up to about s times.
    One grid per image reads all its K boxes from the uncopied image. A CPU takes the images a few per call
    (`CPU_WARP_CHUNK_BYTES`; the same pixels bit for bit), other devices and torch.compile all in one call.
    """
    batch_size, num_exemplars = boxes.shape[:2]
    step = _images_per_warp_call(images, num_exemplars, size * supersample)
    if step >= batch_size:
        return _warp_call(images, boxes, size, supersample).permute(0, 2, 1, 3, 4)
    out = images.new_empty(batch_size, num_exemplars, images.shape[1], size, size)
    for start in range(0, batch_size, step):
        part = slice(start, start + step)
        _warp_call(images[part], boxes[part], size, supersample, out=out[part].permute(0, 2, 1, 3, 4))
    return out


def exemplar_supersampling(config) -> int:
    """Samples per exemplar pixel side for the config's antialiasing: the largest downscale a box of the
    largest configured area can need (its side / the exemplar side), at most 4; 1 when antialiasing is off."""
    if not config.exemplar_antialias:
        return 1
    largest_side = math.sqrt(config.exemplar_scale[1]) * config.image_size
    return int(min(4, max(1, math.ceil(largest_side / config.exemplar_size))))


def correlation_maps(boxes: torch.Tensor, size: int) -> torch.Tensor:
    """True maps (B, K, m, m): 1 where the context pixel's centre lies inside the rotated box.

    Row by row. Along each box axis a pixel's coordinate is a row term plus a column term (separable broadcast
    sums), monotone along the row, so the inside of the box is one interval of columns per row. Its ends are
    found by bisection on the very float sums a per-pixel test compares (`_inside_columns`): the maps equal
    that test's (`_pretext_reference._correlation_maps_reference`) bit for bit, pixel centres on an edge
    included, and only the final interval compare touches every pixel.
    """
    cx, cy, w, h, theta = (t[..., None, None] for t in boxes.unbind(-1))  # each (B, K, 1, 1)
    centres = (torch.arange(size, device=boxes.device, dtype=boxes.dtype) + 0.5) / size
    xs, ys = centres.view(1, 1, 1, size), centres.view(1, 1, size, 1)
    cos, sin = theta.cos(), theta.sin()
    dx, dy = xs - cx, ys - cy  # (B, K, 1, m), (B, K, m, 1)
    # along_w[i, j] = (dy[i] * sin) + (dx[j] * cos) and along_h[i, j] = (dy[i] * cos) + -(dx[j] * sin), rounded
    # exactly as the per-pixel test rounds them (float addition commutes; x - y is x + -y)
    rows = torch.cat([dy * sin, dy * cos], dim=3).transpose(2, 3)  # (B, K, 2, m): the row terms of both axes
    columns = torch.cat([dx * cos, -(dx * sin)], dim=2)  # (B, K, 2, m): the column terms
    half = torch.cat([w, h], dim=2) / 2  # (B, K, 2, 1)
    start, end = _inside_columns(rows, columns, half)  # (B, K, 2, m) each
    start = torch.maximum(start[:, :, 0], start[:, :, 1])  # inside along both axes: (B, K, m)
    end = torch.minimum(end[:, :, 0], end[:, :, 1])
    # a NaN parameter (theta = inf too) makes every comparison of the per-pixel test false: no pixel is inside
    undefined = torch.cat([boxes[..., :4], cos[..., 0, 0, None], sin[..., 0, 0, None]], dim=-1).isnan().any(-1)
    end = torch.where(undefined.unsqueeze(-1), start, end)
    return _interval_rows(start, end, size, boxes.dtype)


def _inside_columns(
    rows: torch.Tensor, columns: torch.Tensor, half: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The columns [start, end) of each row i where |rows[i] + columns[j]| <= half (float sums), for `columns`
    monotone along the last axis. rows, columns (..., m), half (..., 1) -> start, end (..., m), int64."""
    size = columns.shape[-1]
    descending = columns[..., :1] > columns[..., -1:]
    ascending = torch.where(descending, columns.flip(-1), columns)
    # |s| <= half is: not (s < -half) and not (-s < -half), with -s = (-rows[i]) + (-columns[j]) exactly, whose
    # column terms ascend once reversed: one count of sums below -half from the left, one from the right
    values = torch.cat([ascending, -ascending.flip(-1)], dim=-2)
    padding = values.new_full((*values.shape[:-1], (1 << size.bit_length()) - size), math.inf)
    counts = _count_below(
        torch.cat([rows, -rows], dim=-2), torch.cat([values, padding], dim=-1), torch.cat([-half, -half], dim=-2)
    )
    from_left, from_right = counts.chunk(2, dim=-2)
    low, high = from_left, size - from_right  # the inside, in ascending order
    return torch.where(descending, size - high, low), torch.where(descending, size - low, high)


def _interval_rows(start: torch.Tensor, end: torch.Tensor, size: int, dtype: torch.dtype) -> torch.Tensor:
    """Rows of `size` 0/1 values, ones on the columns [start, end): (...) int64 in [0, size] -> (..., size).

    Each row is one copy out of a small table (every run length, at every offset), not a compare per pixel.
    """
    offsets = torch.arange(2 * size, device=start.device)
    lengths = torch.arange(size + 1, device=start.device).view(-1, 1)
    # row L of the table: size zeros, L ones, size - L zeros; its windows of `size` values place the L ones anywhere
    runs = ((offsets >= size) & (offsets < size + lengths)).to(dtype).view(-1)
    windows = runs.unfold(0, size, 1)  # windows[o] = runs[o : o + size], a view
    length = (end - start).clamp(min=0)
    index = length * (2 * size) + (size - start)  # the window of row `length` whose ones start at column `start`
    return windows.index_select(0, index.view(-1)).view(*index.shape, size)


def _count_below(offsets: torch.Tensor, values: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """#{j : offsets[..., i] + values[..., j] < thresholds} for each i, with `values` (..., L) non-decreasing and
    L a power of two (+inf padding), offsets (..., R), thresholds (..., 1). Bisection: log2(L) gathers, and each
    sum is rounded exactly as in a full (R, L) table of sums."""
    last = torch.full_like(offsets, -1, dtype=torch.long)  # the last column known to be below
    step = values.shape[-1] // 2
    while step:
        probe = last + step
        below = (offsets + values.gather(-1, probe)) < thresholds
        last = torch.where(below, probe, last)
        step //= 2
    return last + 1


def resize_context(images: torch.Tensor, size: int, mode: str = "bicubic") -> torch.Tensor:
    """The context: the search view resized to size x size ("bicubic" or "bilinear", antialiased)."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    # in fp32: the antialiased kernels have no bf16 CPU implementation
    resized = F.interpolate(images.float(), size=(size, size), mode=mode, align_corners=False, antialias=True)
    return resized.to(images.dtype)


def sample_pretext(
    pixel_values: torch.Tensor,
    config,
    generator: torch.Generator | None = None,
    boxes: torch.Tensor | None = None,
    augmentation_strength: float | torch.Tensor = 1.0,
) -> PretextBatch:
    """Builds the context, K exemplars, their true maps and boxes for a batch of normalised search views.

    `boxes` (B, K, 5) may be given to fix the geometry; otherwise they are sampled from `config`.
    `augmentation_strength` (0 to 1) scales the exemplar photometric transforms (1: the config's recipe).
    """
    batch_size = pixel_values.shape[0]
    if boxes is None:
        boxes = sample_config_boxes(
            config, batch_size, config.num_exemplars, generator=generator, device=pixel_values.device
        )
    boxes = boxes.to(device=pixel_values.device, dtype=torch.float32)
    with torch.autocast(pixel_values.device.type, enabled=False):  # exact geometry under autocast too
        exemplars = warp_exemplars(pixel_values, boxes, config.exemplar_size, exemplar_supersampling(config))
        labels = correlation_maps(boxes, config.context_size)
    if config.exemplar_augmentation:
        mean = pixel_values.new_tensor(config.image_mean).view(1, 3, 1, 1)
        std = pixel_values.new_tensor(config.image_std).view(1, 3, 1, 1)
        flat = exemplars.reshape(-1, *exemplars.shape[2:]).float()
        flat = (flat * std.float()).add_(mean.float()).clamp_(0, 1)  # the [0, 1] pixels, in a fresh tensor
        flat = _augment(flat, config, generator, in_place=True, strength=augmentation_strength)
        exemplars = flat.sub_(mean.float()).div_(std.float()).to(pixel_values.dtype).view_as(exemplars)
    return PretextBatch(
        context_pixel_values=resize_context(pixel_values, config.context_size, config.context_resample),
        exemplar_pixel_values=exemplars,
        correlation_labels=labels,
        exemplar_boxes=boxes,
    )


__all__ = [
    "PretextBatch",
    "augment_exemplars",
    "augmentation_ramp",
    "color_jitter",
    "correlation_maps",
    "exemplar_sampling_grid",
    "exemplar_supersampling",
    "gaussian_blur",
    "resize_context",
    "sample_config_boxes",
    "sample_enclosing_boxes",
    "sample_exemplar_boxes",
    "sample_pretext",
    "warp_exemplars",
]
