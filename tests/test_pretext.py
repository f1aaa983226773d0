"""The crop-and-correlate pretext task: box sampling, exemplar warping, true maps, photometric transforms.

Box convention (pretext.py): fractions of the view's side, x right, y down; (cx, cy, w, h, theta) with the
width along e1 = (cos theta, sin theta) and the height along e2 = (-sin theta, cos theta).
"""

from __future__ import annotations

import math

import pytest
import torch

from transformers_cim import CIMConfig, pretext
from transformers_cim._pretext_reference import (
    _augment_exemplars_reference,
    _correlation_maps_reference,
    _sample_pretext_reference,
    _warp_exemplars_reference,
)
from transformers_cim.pretext import (
    _augment,
    augment_exemplars,
    augmentation_ramp,
    correlation_maps,
    exemplar_supersampling,
    gaussian_blur,
    sample_config_boxes,
    sample_enclosing_boxes,
    sample_exemplar_boxes,
    sample_pretext,
    warp_exemplars,
)

pytestmark = pytest.mark.usefixtures("single_thread")


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def box(cx, cy, w, h, theta=0.0) -> torch.Tensor:
    """One box as a (1, 1, 5) tensor."""
    return torch.tensor([[[cx, cy, w, h, theta]]], dtype=torch.float32)


def corners(boxes: torch.Tensor) -> torch.Tensor:
    """(..., 4, 2) corners in order around the rectangle, float64, straight from the convention."""
    cx, cy, w, h, theta = boxes.double().unbind(-1)
    e1 = torch.stack([theta.cos(), theta.sin()], -1)
    e2 = torch.stack([-theta.sin(), theta.cos()], -1)
    c = torch.stack([cx, cy], -1)
    a, b = (w / 2)[..., None], (h / 2)[..., None]
    return torch.stack([c - a * e1 - b * e2, c + a * e1 - b * e2, c + a * e1 + b * e2, c - a * e1 + b * e2], -2)


def brute_force_map(boxes: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Point-in-convex-polygon by edge cross products for every pixel centre; also each centre's distance to
    the polygon's boundary (to excuse float ties). boxes (N, 5) -> (N, size, size) maps and distances."""
    poly = corners(boxes)  # (N, 4, 2)
    centres = (torch.arange(size, dtype=torch.float64) + 0.5) / size
    py, px = torch.meshgrid(centres, centres, indexing="ij")
    p = torch.stack([px, py], -1).reshape(1, 1, -1, 2)  # (1, 1, P, 2)
    start, end = poly[:, :, None, :], poly.roll(-1, dims=1)[:, :, None, :]  # (N, 4, 1, 2)
    edge, rel = end - start, p - start
    cross = edge[..., 0] * rel[..., 1] - edge[..., 1] * rel[..., 0]  # (N, 4, P)
    inside = (cross >= 0).all(1) | (cross <= 0).all(1)
    distance = (cross.abs() / edge.norm(dim=-1)).amin(1)
    return inside.reshape(-1, size, size).double(), distance.reshape(-1, size, size)


def plain_config(tiny_vit_config, **overrides):
    return tiny_vit_config(exemplar_augmentation=False, **overrides)


# ------------------------------------------------------------------------------------------------ geometry


def test_axis_aligned_box_map_and_exemplar_are_exact():
    image = torch.rand(2, 3, 32, 32, generator=gen(0))
    b = box(12 / 32, 12 / 32, 8 / 32, 8 / 32).expand(2, 1, 5)  # pixels 8..15 in both directions
    expected = torch.zeros(32, 32)
    expected[8:16, 8:16] = 1
    maps = correlation_maps(b, 32)
    assert maps.shape == (2, 1, 32, 32) and maps.dtype == torch.float32
    assert torch.equal(maps[0, 0], expected) and torch.equal(maps[1, 0], expected)
    # on a coarser context grid: the same box covers cells 4..7 of 16
    coarse = torch.zeros(16, 16)
    coarse[4:8, 4:8] = 1
    assert torch.equal(correlation_maps(b, 16)[0, 0], coarse)

    exemplars = warp_exemplars(image, b, 8)
    assert exemplars.shape == (2, 1, 3, 8, 8)
    torch.testing.assert_close(exemplars[:, 0], image[..., 8:16, 8:16], rtol=0, atol=1e-6)


def test_axis_aligned_rectangle_distinguishes_x_from_y():
    image = torch.rand(1, 3, 32, 32, generator=gen(1))
    b = box(12 / 32, 12 / 32, 16 / 32, 8 / 32)  # columns 4..19 (width 16), rows 8..15 (height 8)
    expected = torch.zeros(32, 32)
    expected[8:16, 4:20] = 1
    assert torch.equal(correlation_maps(b, 32)[0, 0], expected)
    # an 8x8 exemplar of a 16-wide box reads between column pairs: the mean of each pair
    exemplar = warp_exemplars(image, b, 8)[0, 0]
    crop = image[0, :, 8:16, 4:20]
    torch.testing.assert_close(exemplar, 0.5 * (crop[..., 0::2] + crop[..., 1::2]), rtol=0, atol=1e-6)


def test_rotation_by_90_degrees_gives_the_rotated_crop():
    image = torch.rand(1, 3, 32, 32, generator=gen(2))  # asymmetric
    # the whole view rotated by +90 degrees: exemplar[i, j] = image[j, S-1-i], i.e. rot90(k=1)
    whole = warp_exemplars(image, box(0.5, 0.5, 1.0, 1.0, math.pi / 2), 32)[0, 0]
    torch.testing.assert_close(whole, torch.rot90(image[0], 1, dims=(-2, -1)), rtol=0, atol=1e-5)
    # a square box of pixels rows 8..15, columns 4..11
    square = box(8 / 32, 12 / 32, 8 / 32, 8 / 32, math.pi / 2)
    torch.testing.assert_close(
        warp_exemplars(image, square, 8)[0, 0],
        torch.rot90(image[0, :, 8:16, 4:12], 1, dims=(-2, -1)),
        rtol=0,
        atol=1e-5,
    )
    expected = torch.zeros(32, 32)
    expected[8:16, 4:12] = 1
    assert torch.equal(correlation_maps(square, 32)[0, 0], expected)


def test_rotated_rectangle_direction_matches_the_map():
    """A 16 x 8 box turned by +90 degrees: its width runs down (+y), its height runs left (-x). The map marks
    rows 8..23, columns 12..19, and the exemplar reads exactly those pixels: exemplar[i, j] is the mean of
    image rows 8+2j, 9+2j at column 19-i."""
    image = torch.rand(1, 3, 32, 32, generator=gen(3))
    b = box(0.5, 0.5, 16 / 32, 8 / 32, math.pi / 2)
    expected = torch.zeros(32, 32)
    expected[8:24, 12:20] = 1
    assert torch.equal(correlation_maps(b, 32)[0, 0], expected)
    exemplar = warp_exemplars(image, b, 8)[0, 0]
    i = torch.arange(8).view(8, 1)
    j = torch.arange(8).view(1, 8)
    want = 0.5 * (image[0][:, 8 + 2 * j, 19 - i] + image[0][:, 9 + 2 * j, 19 - i])
    torch.testing.assert_close(exemplar, want, rtol=0, atol=1e-5)
    # the opposite rotation reads the mirrored place: a sign error in either function would show here
    minus = box(0.5, 0.5, 16 / 32, 8 / 32, -math.pi / 2)
    assert torch.equal(correlation_maps(minus, 32)[0, 0], expected)
    assert not torch.allclose(warp_exemplars(image, minus, 8)[0, 0], exemplar, atol=1e-3)


def test_rotated_map_equals_brute_force_point_in_polygon():
    g = gen(4)
    n = 64
    w = 0.05 + 0.5 * torch.rand(n, generator=g)
    h = 0.05 + 0.5 * torch.rand(n, generator=g)
    theta = (torch.rand(n, generator=g) * 2 - 1) * math.pi  # any angle, beyond +-45
    cx = 0.2 + 0.6 * torch.rand(n, generator=g)
    cy = 0.2 + 0.6 * torch.rand(n, generator=g)
    boxes = torch.stack([cx, cy, w, h, theta], -1)
    size = 48
    maps = correlation_maps(boxes.view(4, 16, 5), size).view(n, size, size).double()
    truth, distance = brute_force_map(boxes, size)
    mismatch = maps != truth
    # only a pixel centre lying on an edge (up to float rounding) may be decided either way
    assert (distance[mismatch] < 1e-5).all()
    assert mismatch.sum() <= 2
    assert truth.sum() > 1000  # not vacuous


def test_exemplar_reads_only_pixels_the_map_marks():
    """For any rotation: warp the map itself (as an image) with its own box: all ones. Warp its complement:
    all zeros. So the exemplar pixel at box-local (u, v) comes from where the map marks."""
    g = gen(5)
    n, size, ex = 32, 128, 8
    w = 0.25 + 0.25 * torch.rand(n, generator=g)  # sides >> sqrt(2) pixels * 2n / size: no edge blending
    h = 0.25 + 0.25 * torch.rand(n, generator=g)
    theta = (torch.rand(n, generator=g) * 2 - 1) * math.pi
    cx = 0.4 + 0.2 * torch.rand(n, generator=g)
    cy = 0.4 + 0.2 * torch.rand(n, generator=g)
    boxes = torch.stack([cx, cy, w, h, theta], -1).view(n, 1, 5)
    maps = correlation_maps(boxes, size)  # (n, 1, S, S)
    inside = warp_exemplars(maps, boxes, ex)
    outside = warp_exemplars(1 - maps, boxes, ex)
    torch.testing.assert_close(inside, torch.ones_like(inside), rtol=0, atol=1e-5)
    torch.testing.assert_close(outside, torch.zeros_like(outside), rtol=0, atol=1e-5)


def test_one_grid_samples_all_exemplars_of_each_image():
    image = torch.rand(3, 3, 32, 32, generator=gen(6))
    boxes = sample_exemplar_boxes(3, 4, (0.1, 0.5), (0.5, 2.0), 30.0, generator=gen(7))
    together = warp_exemplars(image, boxes, 8)
    for k in range(4):  # one box at a time gives the same pixels
        torch.testing.assert_close(
            together[:, k], warp_exemplars(image, boxes[:, k : k + 1], 8)[:, 0], rtol=0, atol=1e-6
        )
    # image b's exemplars come from image b only
    swapped = warp_exemplars(image.flip(0), boxes.flip(0), 8)
    torch.testing.assert_close(swapped, together.flip(0), rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------------ sampling

RECIPE = dict(scale=(0.05, 0.48), aspect_ratio=(1 / 3, 3.0), max_rotation_degrees=45.0)


def test_sampled_boxes_respect_the_configured_ranges():
    boxes = sample_exemplar_boxes(256, 6, generator=gen(8), **RECIPE)
    assert boxes.shape == (256, 6, 5) and boxes.dtype == torch.float32
    cx, cy, w, h, theta = boxes.unbind(-1)
    # all four rotated corners lie inside the view
    c = corners(boxes)
    assert c.min() >= -1e-6 and c.max() <= 1 + 1e-6
    # aspect h/w in [1/3, 3] (shrinking keeps it) and spread over both sides of 1
    ratio = h / w
    assert ratio.min() >= 1 / 3 - 1e-5 and ratio.max() <= 3 + 1e-5
    # log-uniform: P(h/w < 1/2) = P(h/w > 2) = ln(1.5) / ln(9) = 18% before the fit-selection (measured ~15%)
    assert (ratio < 0.5).float().mean() > 0.08 and (ratio > 2).float().mean() > 0.08
    # angle in +-45 degrees, spread over the whole range
    assert theta.abs().max() <= math.radians(45) + 1e-6
    assert theta.min() < math.radians(-40) and theta.max() > math.radians(40)
    assert abs(theta.mean().item()) < 0.05
    # area: never above the range; below it only when a box had to be shrunk to fit, which is rare
    area = w * h
    assert area.max() <= 0.48 + 1e-5
    in_range = (area >= 0.05 - 1e-6).float().mean().item()
    assert in_range > 0.9
    # roughly uniform over the range: the mean of U(0.05, 0.48) is 0.265; shrinking pulls it down a bit
    assert 0.2 < area.mean().item() < 0.27


def test_boxes_without_rotation_fill_the_whole_scale_range():
    boxes = sample_exemplar_boxes(64, 8, (0.2, 1.0), (1.0, 1.0), 0.0, generator=gen(9))
    cx, cy, w, h, theta = boxes.unbind(-1)
    assert torch.equal(theta, torch.zeros_like(theta))
    torch.testing.assert_close(w, h)
    area = w * h
    assert area.min() >= 0.2 - 1e-6 and area.max() <= 1.0 + 1e-6  # squares up to the whole view always fit
    assert (cx - w / 2).min() >= -1e-6 and (cx + w / 2).max() <= 1 + 1e-6
    assert (cy - h / 2).min() >= -1e-6 and (cy + h / 2).max() <= 1 + 1e-6


def test_boxes_too_large_to_fit_are_shrunk_into_the_view():
    # 90-100% of the area at up to 45 degrees and aspect up to 3 rarely fits: most boxes need shrinking
    boxes = sample_exemplar_boxes(64, 4, (0.9, 1.0), (1 / 3, 3.0), 45.0, generator=gen(18))
    cx, cy, w, h, theta = boxes.unbind(-1)
    c = corners(boxes)
    assert c.min() >= -1e-6 and c.max() <= 1 + 1e-6
    area = w * h
    assert (area < 0.9).float().mean() > 0.5  # shrunk
    ratio = h / w
    assert ratio.min() >= 1 / 3 - 1e-5 and ratio.max() <= 3 + 1e-5  # aspect kept
    assert theta.abs().max() <= math.radians(45) + 1e-6 and theta.abs().max() > math.radians(30)  # angle kept
    # a shrunk box touches the view on two opposite sides: its rotated extent is the full view along one axis
    extent = torch.maximum(c[..., 0].amax(-1) - c[..., 0].amin(-1), c[..., 1].amax(-1) - c[..., 1].amin(-1))
    torch.testing.assert_close(extent[area < 0.9], torch.ones_like(extent[area < 0.9]), rtol=0, atol=1e-5)


def test_map_mean_is_the_box_area():
    boxes = sample_exemplar_boxes(32, 6, generator=gen(10), **RECIPE)
    size = 160
    maps = correlation_maps(boxes, size)
    area = boxes[..., 2] * boxes[..., 3]
    error = (maps.mean(dim=(-2, -1)) - area).abs()
    # a pixel is misjudged only within ~half a diagonal of the boundary: perimeter * sqrt(2)/2 / size
    bound = 2 * (boxes[..., 2] + boxes[..., 3]) * (math.sqrt(2) / 2) / size
    assert (error <= 0.5 * bound).all()  # measured: at most 0.12 of it
    assert error.mean() < 0.05 * bound.mean()  # errors cancel on average (measured 0.0075)


# ------------------------------------------------------------------------------------------ antialiasing


def test_supersampled_exemplar_still_reads_only_pixels_the_map_marks():
    boxes = torch.tensor([[[0.5, 0.5, 0.5, 0.4, 0.3]], [[0.4, 0.6, 0.3, 0.5, -0.6]]])
    maps = correlation_maps(boxes, 128)
    for supersample in (2, 3, 4):
        # the outermost sub-samples lie within a pixel of the box edge, so bilinear reads there can blend in a
        # sliver of the outside: bounded, and only on border pixels
        inside = warp_exemplars(maps, boxes, 8, supersample)
        outside = warp_exemplars(1 - maps, boxes, 8, supersample)
        # (only the outermost sub-samples of a border pixel can reach outside, and only partly)
        assert inside.min() > 0.9 and outside.max() < 0.1 and inside.mean() > 0.99  # measured: 0.959, 0.997
        torch.testing.assert_close(
            inside[..., 1:-1, 1:-1], torch.ones_like(inside[..., 1:-1, 1:-1]), rtol=0, atol=1e-5
        )


def test_supersampling_removes_aliasing_of_fine_texture():
    """A 1-pixel checkerboard shrunk 4x: single bilinear samples alias into a strong pattern, the 4 x 4 box
    filter gives its mean grey."""
    coords = torch.arange(128)
    board = ((coords.view(-1, 1) + coords.view(1, -1)) % 2).float().view(1, 1, 128, 128)
    b = box(0.5, 0.5, 0.5, 0.5, 0.1)
    aliased = warp_exemplars(board, b, 16, 1)
    smooth = warp_exemplars(board, b, 16, 4)
    assert aliased.std() > 0.1
    assert smooth.std() < 0.5 * aliased.std() and abs(smooth.mean().item() - 0.5) < 0.02


def test_supersampling_follows_the_config(tiny_vit_config):
    assert exemplar_supersampling(tiny_vit_config(exemplar_antialias=False)) == 1
    assert exemplar_supersampling(tiny_vit_config(exemplar_scale=(0.05, 0.1))) == 2  # 20 px sides -> 16 px
    assert exemplar_supersampling(tiny_vit_config(image_size=256, context_size=48)) == 4  # capped


# ------------------------------------------------------------------------------------------ enclosing mode


def enclosing_boxes(batch: int, k: int, seed: int) -> torch.Tensor:
    return sample_enclosing_boxes(batch, k, generator=gen(seed), **RECIPE)


def test_enclosing_boxes_lie_inside_the_view_and_enclose_most_of_the_sampled_box():
    boxes = enclosing_boxes(512, 6, 21)
    c = corners(boxes)
    assert c.min() >= -1e-5 and c.max() <= 1 + 1e-5  # the exemplar holds image pixels only
    theta = boxes[..., 4]
    assert theta.abs().max() <= math.radians(45) + 1e-6 and theta.abs().max() > math.radians(40)
    area = boxes[..., 2] * boxes[..., 3]
    exact_area = sample_exemplar_boxes(512, 6, generator=gen(21), **RECIPE)
    exact_area = exact_area[..., 2] * exact_area[..., 3]
    # the bounding box of a turned box is larger than the box: the median exemplar is larger than the literal box's
    # (measured 0.28 vs 0.24 of the view; the authors' code measures 0.30)
    assert area.median() > exact_area.median() + 0.02
    assert 0.26 < area.median() < 0.31  # the README's figure: measured 0.286 (exact boxes 0.242)
    assert area.max() <= 1.0 + 1e-6


def test_enclosing_boxes_without_rotation_are_the_sampled_boxes():
    boxes = sample_enclosing_boxes(128, 4, (0.05, 0.48), (1 / 3, 3.0), 0.0, generator=gen(22))
    area = boxes[..., 2] * boxes[..., 3]
    assert area.min() >= 0.05 - 1e-5 and area.max() <= 0.48 + 1e-5
    ratio = boxes[..., 3] / boxes[..., 2]
    assert ratio.min() >= 1 / 3 - 1e-4 and ratio.max() <= 3 + 1e-4
    assert torch.equal(boxes[..., 4], torch.zeros_like(boxes[..., 4]))


def test_enclosing_exemplar_reads_only_pixels_the_map_marks():
    """The exactness check of the literal boxes, on boxes of the authors' sampler."""
    boxes = enclosing_boxes(32, 1, 23)
    keep = (boxes[..., 2].amin(-1) > 0.2) & (boxes[..., 3].amin(-1) > 0.2)  # no edge blending on thin slivers
    boxes = boxes[keep]
    assert len(boxes) > 8
    maps = correlation_maps(boxes, 128)
    inside = warp_exemplars(maps, boxes, 8)
    outside = warp_exemplars(1 - maps, boxes, 8)
    torch.testing.assert_close(inside, torch.ones_like(inside), rtol=0, atol=1e-5)
    torch.testing.assert_close(outside, torch.zeros_like(outside), rtol=0, atol=1e-5)


def test_enclosing_map_equals_brute_force_point_in_polygon():
    boxes = enclosing_boxes(8, 4, 24).view(-1, 5)
    fast = correlation_maps(boxes.view(-1, 1, 5), 64).view(-1, 64, 64).double()
    slow, distance = brute_force_map(boxes, 64)
    assert ((fast != slow) & (distance > 1e-6)).sum() == 0


def test_config_picks_the_box_sampler(tiny_vit_config, search_views):
    views = search_views()
    enclosing = sample_pretext(views, plain_config(tiny_vit_config), generator=gen(25))
    exact = sample_pretext(views, plain_config(tiny_vit_config, exemplar_box_mode="exact"), generator=gen(25))
    assert not torch.equal(enclosing.exemplar_boxes, exact.exemplar_boxes)
    with pytest.raises(ValueError, match="exemplar_box_mode"):
        plain_config(tiny_vit_config, exemplar_box_mode="rotated")


def test_same_seed_same_pretext_different_seed_different(tiny_vit_config, search_views):
    config = tiny_vit_config()  # augmentation on: it must be reproducible too
    x = search_views(batch=3)
    a, b, c = (sample_pretext(x, config, generator=gen(s)) for s in (11, 11, 12))
    for field in ("context_pixel_values", "exemplar_pixel_values", "correlation_labels", "exemplar_boxes"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field
    assert not torch.allclose(a.exemplar_boxes, c.exemplar_boxes)
    assert not torch.allclose(a.exemplar_pixel_values, c.exemplar_pixel_values)
    assert not torch.equal(a.correlation_labels, c.correlation_labels)
    assert torch.equal(a.context_pixel_values, c.context_pixel_values)  # the context is never random


def test_sample_pretext_shapes_and_consistency(tiny_vit_config, search_views):
    config = plain_config(tiny_vit_config)
    x = search_views(batch=2)
    out = sample_pretext(x, config, generator=gen(13))
    assert out.context_pixel_values.shape == (2, 3, 48, 48)
    assert out.exemplar_pixel_values.shape == (2, 3, 3, 16, 16)
    assert out.correlation_labels.shape == (2, 3, 48, 48)
    assert out.exemplar_boxes.shape == (2, 3, 5)
    assert set(out.correlation_labels.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(out.correlation_labels, correlation_maps(out.exemplar_boxes, 48))
    # augmentation off: the exemplars are exactly the plain warp of the (un-resized) view
    assert exemplar_supersampling(config) == 3  # boxes of up to 0.48 of a 64 px view: sides up to 44 px -> 16 px
    assert torch.equal(out.exemplar_pixel_values, warp_exemplars(x, out.exemplar_boxes, 16, 3))
    # the context is the whole view, resized
    torch.testing.assert_close(out.context_pixel_values.mean(), x.mean(), rtol=0, atol=1e-2)
    # given boxes fix the geometry
    again = sample_pretext(x, config, boxes=out.exemplar_boxes)
    assert torch.equal(again.exemplar_pixel_values, out.exemplar_pixel_values)
    assert torch.equal(again.correlation_labels, out.correlation_labels)


# ------------------------------------------------------------------------------------------------ photometric


def test_augmentation_changes_exemplars_within_the_valid_range(tiny_vit_config):
    on, off = tiny_vit_config(), plain_config(tiny_vit_config)
    mean = torch.tensor(on.image_mean).view(1, 1, 3, 1, 1)
    std = torch.tensor(on.image_std).view(1, 1, 3, 1, 1)
    raw = torch.rand(8, 3, 64, 64, generator=gen(14))  # a valid [0, 1] image, then normalised
    x = (raw - mean[0]) / std[0]
    a, p = sample_pretext(x, on, generator=gen(15)), sample_pretext(x, off, generator=gen(15))
    # the boxes come first from the generator: same geometry, same maps, same context
    assert torch.equal(a.exemplar_boxes, p.exemplar_boxes)
    assert torch.equal(a.correlation_labels, p.correlation_labels)
    assert torch.equal(a.context_pixel_values, p.context_pixel_values)
    pixels = a.exemplar_pixel_values * std + mean  # before renormalisation
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5
    changed = (a.exemplar_pixel_values - p.exemplar_pixel_values).abs().amax(dim=(2, 3, 4)) > 1e-3
    # P(no transform at all) = 0.2 * 0.8 * 0.5 * 0.8 * 0.5 = 3.2%
    assert changed.float().mean() > 0.8
    # views that leave the valid range when de-normalised (random normal ones): clamped before the transforms
    wild = sample_pretext(torch.randn(8, 3, 64, 64, generator=gen(0)) * 2, on, generator=gen(0))
    pixels = wild.exemplar_pixel_values * std + mean
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5
    # augmentation on but every probability 0: only de-normalise, clamp, re-normalise -> the plain warp
    idle = _only(tiny_vit_config())
    torch.testing.assert_close(
        sample_pretext(x, idle, generator=gen(15)).exemplar_pixel_values, p.exemplar_pixel_values, rtol=0, atol=1e-5
    )


def _only(config, **probabilities):
    names = (
        "exemplar_color_jitter_prob",
        "exemplar_grayscale_prob",
        "exemplar_blur_prob",
        "exemplar_solarize_prob",
        "exemplar_hflip_prob",
    )
    for name in names:
        setattr(config, name, probabilities.get(name, 0.0))
    return config


def test_each_photometric_transform(tiny_vit_config):
    images = torch.rand(6, 3, 16, 16, generator=gen(16))
    config = tiny_vit_config()
    assert torch.equal(augment_exemplars(images, _only(config), gen(0)), images)
    flipped = augment_exemplars(images, _only(config, exemplar_hflip_prob=1.0), gen(0))
    assert torch.equal(flipped, images.flip(-1))
    gray = augment_exemplars(images, _only(config, exemplar_grayscale_prob=1.0), gen(0))
    luma = 0.299 * images[:, 0] + 0.587 * images[:, 1] + 0.114 * images[:, 2]
    for channel in range(3):
        torch.testing.assert_close(gray[:, channel], luma)
    solar = augment_exemplars(images, _only(config, exemplar_solarize_prob=1.0), gen(0))
    assert torch.equal(solar, torch.where(images >= 0.5, 1 - images, images))
    blurred = augment_exemplars(images, _only(config, exemplar_blur_prob=1.0), gen(0))
    assert (blurred.std(dim=(2, 3)) < images.std(dim=(2, 3))).all()
    torch.testing.assert_close(blurred.mean(dim=(2, 3)), images.mean(dim=(2, 3)), rtol=0, atol=0.03)
    jitter = augment_exemplars(images, _only(config, exemplar_color_jitter_prob=1.0), gen(0))
    assert jitter.min() >= 0 and jitter.max() <= 1
    assert (jitter - images).abs().amax(dim=(1, 2, 3)).min() > 1e-3
    # everything on at once, extreme strengths: still a valid image
    config.exemplar_color_jitter = [0.9, 0.9, 0.9, 0.5]
    config.exemplar_blur_sigma = [0.1, 5.0]
    allon = _only(
        config,
        **{
            n: 1.0
            for n in (
                "exemplar_color_jitter_prob",
                "exemplar_grayscale_prob",
                "exemplar_blur_prob",
                "exemplar_solarize_prob",
                "exemplar_hflip_prob",
            )
        },
    )
    out = augment_exemplars(images, allon, gen(1))
    assert out.shape == images.shape and out.min() >= 0 and out.max() <= 1


def test_augmentation_ramp_schedule():
    assert [augmentation_ramp(s, 100, (0.0, 0.5)) for s in (0, 25, 50, 75, 100)] == [0.0, 0.5, 1.0, 1.0, 1.0]
    assert [augmentation_ramp(s, 100, (0.2, 0.6)) for s in (0, 20, 30, 40, 60, 90)] == pytest.approx(
        [0, 0, 0.25, 0.5, 1, 1]
    )
    assert augmentation_ramp(30, 100, (0.3, 0.3)) == 1.0  # a step from off to the recipe at 30 %
    assert augmentation_ramp(29, 100, (0.3, 0.3)) == 0.0
    assert augmentation_ramp(0, 100, (0.0, 0.0)) == 1.0  # no ramp: the recipe from the first step
    assert augmentation_ramp(0, 0, (0.0, 0.5)) == 1.0  # no known horizon: the recipe


def test_augmentation_strength_scales_the_transforms(tiny_vit_config):
    """Strength 1 is the recipe bit for bit, strength 0 the plain warp; in between, fewer exemplars change, and by
    less. The random stream does not depend on the strength: the boxes and maps stay the same."""
    on, off = tiny_vit_config(), plain_config(tiny_vit_config)
    mean = torch.tensor(on.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(on.image_std).view(1, 3, 1, 1)
    x = (torch.rand(64, 3, 64, 64, generator=gen(21)) - mean) / std
    full = sample_pretext(x, on, generator=gen(22))
    assert torch.equal(
        sample_pretext(x, on, generator=gen(22), augmentation_strength=1.0).exemplar_pixel_values,
        full.exemplar_pixel_values,
    )
    plain = sample_pretext(x, off, generator=gen(22)).exemplar_pixel_values
    zero = sample_pretext(x, on, generator=gen(22), augmentation_strength=torch.tensor(0.0))
    torch.testing.assert_close(zero.exemplar_pixel_values, plain, rtol=0, atol=1e-5)
    assert torch.equal(zero.correlation_labels, full.correlation_labels)

    def changed(batch):
        return ((batch.exemplar_pixel_values - plain).abs().amax(dim=(2, 3, 4)) > 1e-3).float().mean().item()

    half = sample_pretext(x, on, generator=gen(22), augmentation_strength=0.5)
    assert changed(zero) == 0.0 < changed(half) < changed(full)
    # P(untouched) = (1 - 0.4)(1 - 0.1)(1 - 0.25)(1 - 0.1)(1 - 0.25) = 27% at half strength, 3.2% at full
    assert 0.6 < changed(half) < 0.85 and changed(full) > 0.9


def test_half_strength_colour_jitter_stays_within_half_the_range(tiny_vit_config):
    images = torch.full((512, 3, 4, 4), 0.5)
    config = _only(tiny_vit_config(exemplar_color_jitter=[0.4, 0.0, 0.0, 0.0]), exemplar_color_jitter_prob=1.0)
    factors = augment_exemplars(images, config, gen(5), strength=0.5)[:, 0, 0, 0] / 0.5  # brightness only
    assert factors.min() >= 0.8 - 1e-6 and factors.max() <= 1.2 + 1e-6
    assert factors.min() < 0.82 and factors.max() > 1.18  # and it does use that range


def test_gaussian_blur_kernel():
    constant = torch.full((2, 3, 16, 16), 0.3)
    torch.testing.assert_close(gaussian_blur(constant, torch.tensor([0.5, 2.0]), 2.0), constant)
    impulse = torch.zeros(1, 1, 15, 15)
    impulse[..., 7, 7] = 1
    out = gaussian_blur(impulse, torch.tensor([1.0]), 2.0)[0, 0]
    assert out.sum().item() == pytest.approx(1.0, abs=1e-5)
    torch.testing.assert_close(out, out.t())  # isotropic
    x = torch.arange(-7, 8, dtype=torch.float32)
    profile = torch.exp(-0.5 * x**2)
    profile = profile[1:-1] / profile[1:-1].sum()  # the kernel radius is ceil(3 * max_sigma) = 6
    torch.testing.assert_close(out[7, 1:-1], profile[:] * profile[6], rtol=0, atol=1e-6)


def test_augmentation_is_reproducible_per_sample(tiny_vit_config):
    images = torch.rand(5, 3, 16, 16, generator=gen(17))
    config = tiny_vit_config()
    a = augment_exemplars(images, config, gen(3))
    b = augment_exemplars(images, config, gen(3))
    c = augment_exemplars(images, config, gen(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


# ------------------------------------------------------------------------------------------- low precision


@pytest.mark.parametrize("mode", ["bf16 inputs", "bf16 autocast"])
def test_pretext_geometry_stays_exact_in_low_precision(mode, tiny_vit_config, search_views):
    """The sampling grid and the maps are computed in fp32 whatever the input dtype or autocast: the maps are
    the fp32 maps bit for bit, and the exemplars are the fp32 exemplars up to bf16 rounding of the pixels."""
    config = plain_config(tiny_vit_config)
    x = search_views(batch=4)
    reference = sample_pretext(x, config, generator=gen(30))
    if mode == "bf16 inputs":
        low = sample_pretext(x.bfloat16(), config, generator=gen(30))
        assert low.exemplar_pixel_values.dtype == torch.bfloat16
    else:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = sample_pretext(x, config, generator=gen(30))
    assert torch.equal(low.correlation_labels, reference.correlation_labels)
    assert torch.equal(low.exemplar_boxes, reference.exemplar_boxes)
    error = (low.exemplar_pixel_values.float() - reference.exemplar_pixel_values).abs()
    # bf16 keeps 8 significant bits: the rounding of the source and output pixels (<= 2 * 2**-8 of the largest
    # value), never a shifted pixel (a 0.9 px shift, what a bf16 grid gives, moves values by ~0.5 here)
    assert error.max() <= 2 * 2**-8 * x.abs().max()
    # and the map still marks exactly the pixels the exemplar reads (the fp32 exactness test, in bf16)
    boxes = reference.exemplar_boxes[:, :1]
    maps = correlation_maps(boxes, 128)
    inside = warp_exemplars(maps.bfloat16(), boxes, 8)
    assert inside.dtype == torch.bfloat16
    wide = (boxes[..., 2] > 0.3) & (boxes[..., 3] > 0.3)
    assert torch.equal(inside[wide], torch.ones_like(inside[wide]))


# ------------------------------------------------------------- the implementation before issue 11, bit for bit


def bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bit patterns (so that equality also sees the sign of a zero)."""
    ints = {torch.float64: torch.int64, torch.float32: torch.int32, torch.bfloat16: torch.int16}
    return t.contiguous().view(ints[t.dtype])


def assert_bitwise_equal(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype
    assert torch.equal(bits(got), bits(want)), f"{(got != want).sum().item()} values differ"


def on_edge_pixels(boxes: torch.Tensor, size: int) -> int:
    """How many (box, pixel) pairs the per-pixel test decides on an exact tie (|coordinate| == half side)."""
    cx, cy, w, h, theta = (t[..., None, None] for t in boxes.unbind(-1))
    centres = (torch.arange(size, dtype=boxes.dtype) + 0.5) / size
    xs, ys = centres.view(1, 1, 1, size), centres.view(1, 1, size, 1)
    along_w = ((xs - cx) * theta.cos()) + ((ys - cy) * theta.sin())
    along_h = ((ys - cy) * theta.cos()) - ((xs - cx) * theta.sin())
    return int(((along_w.abs() == w / 2) | (along_h.abs() == h / 2)).sum())


@pytest.mark.parametrize("mode", ["enclosing", "exact"])
def test_correlation_maps_equal_the_per_pixel_test_on_sampled_boxes(mode, tiny_vit_config):
    config = tiny_vit_config(exemplar_box_mode=mode)
    for seed, size in enumerate((160, 48, 33, 7, 2, 1)):
        boxes = sample_config_boxes(config, 64, 6, generator=gen(40 + seed))
        assert torch.equal(correlation_maps(boxes, size), _correlation_maps_reference(boxes, size)), size


def test_correlation_maps_equal_the_per_pixel_test_at_any_angle_and_place():
    g = gen(41)
    n = 4096
    w, h = torch.rand(n, generator=g) * 1.2, torch.rand(n, generator=g) * 1.2
    cx, cy = torch.rand(n, generator=g) * 1.4 - 0.2, torch.rand(n, generator=g) * 1.4 - 0.2  # some cut by the border
    theta = (torch.rand(n, generator=g) * 2 - 1) * 2 * math.pi  # beyond +-pi too
    boxes = torch.stack([cx, cy, w, h, theta], -1).view(64, 64, 5)
    for size in (64, 31):
        assert torch.equal(correlation_maps(boxes, size), _correlation_maps_reference(boxes, size)), size
    assert torch.equal(correlation_maps(boxes.double(), 32), _correlation_maps_reference(boxes.double(), 32))


def test_correlation_maps_equal_the_per_pixel_test_on_edge_cases():
    """Pixel centres exactly on an edge (boxes on the pixel grid), the right angles (theta = +-90 degrees has a
    cosine of -4e-8 in fp32: a row's coordinates then differ by less than their rounding), boxes touching or
    covering the border, thin and empty boxes: where a full-map formula and the row intervals could round apart."""
    size = 32
    g = gen(42)
    n = 2048
    # centres on pixel centres and whole-pixel half sides: the edges of an unturned or quarter-turned box run
    # exactly through pixel centres
    cx = (torch.randint(-4, size + 4, (n,), generator=g) + 0.5) / size
    cy = (torch.randint(-4, size + 4, (n,), generator=g) + 0.5) / size
    w = torch.randint(0, size + 2, (n,), generator=g) * 2.0 / size
    h = torch.randint(0, size + 2, (n,), generator=g) * 2.0 / size
    angles = torch.tensor(
        [
            0.0,
            math.pi / 2,
            -math.pi / 2,
            math.pi,
            -math.pi,
            math.pi / 4,
            -math.pi / 4,
            3 * math.pi / 2,
            1e-7,
            -1e-30,
            math.atan2(1, 2),
        ]
    )
    theta = angles[torch.randint(0, len(angles), (n,), generator=g)]
    grid_boxes = torch.stack([cx, cy, w, h, theta], -1)
    special = torch.tensor(
        [
            [0.25, 0.5, 0.5, 1.0, 0.0],  # touching the left, top and bottom borders
            [0.5, 0.5, 1.0, 1.0, 0.0],  # the whole view
            [0.5, 0.5, 1.0, 1.0, math.pi / 2],
            [0.5, 0.5, 1e-6, 0.8, 0.3],  # thin: no centre inside
            [12.5 / 32, 0.5, 0.0, 0.5, 0.0],  # zero width through a column of centres
            [12.5 / 32, 12.5 / 32, 0.0, 0.0, 0.0],  # a point on a pixel centre
            [0.5, 0.5, 0.0, 0.0, math.pi / 2],  # an empty box
            [0.5, 0.5, 2.0, 0.1, 0.0],  # wider than the view
        ]
    )
    special = torch.cat([special, special * torch.tensor([1.0, 1.0, 1.0, 1.0, -1.0])])
    # non-finite parameters: NaN anywhere (or theta = inf) marks no pixel, an infinite side a whole band
    undefined = torch.tensor([0.5, 0.45, 0.3, 0.4, 0.2]).repeat(15, 1)
    for row, value in enumerate((math.nan, math.inf, -math.inf) * 5):
        undefined[row, row // 3] = value
    boxes = torch.cat([grid_boxes, special, undefined]).view(1, -1, 5)
    maps = correlation_maps(boxes, size)
    assert torch.equal(maps, _correlation_maps_reference(boxes, size))
    assert on_edge_pixels(boxes, size) > 10_000  # not vacuous: measured 52,269 exact ties (a 1-ulp wider
    # threshold in the per-pixel test flips 3,248 of these pixels; the rounding order x*cos - cx*cos, 94)
    assert maps[0, len(grid_boxes) + 4].sum() == size // 2  # the zero-width box holds the centres on its line


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("supersample", [1, 2, 3, 4])
def test_warp_equals_the_single_call_reference_bit_for_bit(supersample, dtype, monkeypatch):
    """The chunked, planar warp equals one grid_sample call + avg_pool2d, -0.0 pixels and chunk edges included."""
    images = torch.randn(5, 3, 40, 40, generator=gen(43))
    images[1, :, :, :24] = -0.0  # avg_pool2d sums from +0: an all -0.0 neighbourhood averages to +0.0
    images = images.to(dtype)
    boxes = sample_exemplar_boxes(5, 3, generator=gen(44), **RECIPE)
    want = _warp_exemplars_reference(images, boxes, 8, supersample)
    assert_bitwise_equal(warp_exemplars(images, boxes, 8, supersample), want)
    for images_per_call in (1, 2):  # 5 images: a last, smaller call
        monkeypatch.setattr(pretext, "CPU_WARP_CHUNK_BYTES", images_per_call * 3 * 3 * (8 * supersample) ** 2 * 4)
        assert_bitwise_equal(warp_exemplars(images, boxes, 8, supersample), want)


@pytest.mark.parametrize("probabilities", ["configured", "all", "none"])
def test_augmentation_equals_the_masked_reference_bit_for_bit(probabilities, tiny_vit_config):
    """Both ways of applying the transforms (on the drawn samples only, or on all and blended by mask) give the
    reference's exemplars for the same seed and consume the same random stream."""
    config = tiny_vit_config()
    if probabilities != "configured":
        names = (
            "exemplar_color_jitter_prob",
            "exemplar_grayscale_prob",
            "exemplar_blur_prob",
            "exemplar_solarize_prob",
            "exemplar_hflip_prob",
        )
        config = _only(config, **{name: 1.0 if probabilities == "all" else 0.0 for name in names})
    images = torch.rand(48, 3, 16, 16, generator=gen(45))
    before = images.clone()
    for seed in (0, 1, 2):
        want_generator = gen(seed)
        want = _augment_exemplars_reference(images, config, want_generator)
        for subset in (True, False):
            generator = gen(seed)
            assert_bitwise_equal(_augment(images, config, generator, subset=subset), want)
            assert torch.equal(generator.get_state(), want_generator.get_state())  # as many numbers drawn
        assert_bitwise_equal(augment_exemplars(images, config, gen(seed)), want)
    assert torch.equal(images, before)  # the input is left alone


@pytest.mark.parametrize("mode", ["enclosing", "exact"])
@pytest.mark.parametrize("precision", ["fp32", "bf16 inputs", "bf16 autocast"])
def test_sample_pretext_equals_the_reference_bit_for_bit(mode, precision):
    """At the recipe's sizes (224 px views, 6 exemplars of 64 px, 160 px context and maps, augmentation on)."""
    config = CIMConfig(exemplar_box_mode=mode)
    views = torch.randn(4, 3, 224, 224, generator=gen(46))
    if precision == "bf16 inputs":
        views = views.bfloat16()
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16 autocast")
    with autocast:
        got = sample_pretext(views, config, generator=gen(47))
        want = _sample_pretext_reference(views, config, generator=gen(47))
    for field in ("context_pixel_values", "exemplar_pixel_values", "correlation_labels", "exemplar_boxes"):
        assert_bitwise_equal(getattr(got, field), getattr(want, field))
    config.exemplar_augmentation = False
    assert_bitwise_equal(
        sample_pretext(views, config, generator=gen(48)).exemplar_pixel_values,
        _sample_pretext_reference(views, config, generator=gen(48)).exemplar_pixel_values,
    )
