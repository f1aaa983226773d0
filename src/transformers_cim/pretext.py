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


# The constant prior: the mean true map under a config's box distribution, the best map a model can predict
# without looking at the exemplar (`pretext_metrics` scores it; `decoder_prior_bias` starts the decoder at it).
PRIOR_SAMPLES = 8192
PROBABILITY_FLOOR = 1e-4


def correlation_prior(config, num_samples: int = PRIOR_SAMPLES, generator: torch.Generator | None = None,
                      chunk: int = 1024) -> torch.Tensor:
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


def _warp_call(images: torch.Tensor, boxes: torch.Tensor, size: int, supersample: int,
               out: torch.Tensor | None = None) -> torch.Tensor:
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


def _inside_columns(rows: torch.Tensor, columns: torch.Tensor,
                    half: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The columns [start, end) of each row i where |rows[i] + columns[j]| <= half (float sums), for `columns`
    monotone along the last axis. rows, columns (..., m), half (..., 1) -> start, end (..., m), int64."""
    size = columns.shape[-1]
    descending = columns[..., :1] > columns[..., -1:]
    ascending = torch.where(descending, columns.flip(-1), columns)
    # |s| <= half is: not (s < -half) and not (-s < -half), with -s = (-rows[i]) + (-columns[j]) exactly, whose
    # column terms ascend once reversed: one count of sums below -half from the left, one from the right
    values = torch.cat([ascending, -ascending.flip(-1)], dim=-2)
    padding = values.new_full((*values.shape[:-1], (1 << size.bit_length()) - size), math.inf)
    counts = _count_below(torch.cat([rows, -rows], dim=-2), torch.cat([values, padding], dim=-1),
                          torch.cat([-half, -half], dim=-2))
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


def _draw_augmentation(images: torch.Tensor, config, generator: torch.Generator | None,
                       strength: float | torch.Tensor = 1.0) -> _AugmentationDraws:
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


def augment_exemplars(images: torch.Tensor, config, generator: torch.Generator | None = None,
                      strength: float | torch.Tensor = 1.0) -> torch.Tensor:
    """Applies colour jitter, grayscale, blur, solarize and horizontal flip, each with its own probability and
    per-sample parameters, to (N, 3, n, n) images in [0, 1]. Every random number is drawn (so a seeded
    generator gives the same stream whatever the probabilities). In eager mode on a CPU each transform runs on
    the samples drawn for it only; elsewhere on all samples, blended in by mask; the results are identical.
    `strength` (0 to 1) scales the probabilities and the colour-jitter strengths (see `augmentation_ramp`)."""
    return _augment(images, config, generator, in_place=False, strength=strength)


def _augment(images: torch.Tensor, config, generator: torch.Generator | None, in_place: bool = False,
             subset: bool | None = None, strength: float | torch.Tensor = 1.0) -> torch.Tensor:
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
    images = _apply_to_drawn(images, drawn.blur, lambda x, take: gaussian_blur(x, take(drawn.sigma), max_sigma), subset)
    images = _apply_to_drawn(images, drawn.solarize, lambda x, take: _solarize(x), subset)
    return _apply_to_drawn(images, drawn.flip, lambda x, take: x.flip(-1), subset)


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


def sample_pretext(pixel_values: torch.Tensor, config, generator: torch.Generator | None = None,
                   boxes: torch.Tensor | None = None,
                   augmentation_strength: float | torch.Tensor = 1.0) -> PretextBatch:
    """Builds the context, K exemplars, their true maps and boxes for a batch of normalised search views.

    `boxes` (B, K, 5) may be given to fix the geometry; otherwise they are sampled from `config`.
    `augmentation_strength` (0 to 1) scales the exemplar photometric transforms (1: the config's recipe).
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
    "correlation_prior",
    "prior_logits",
    "augment_exemplars",
    "augmentation_ramp",
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
