"""The authors' per-image CPU pipeline, re-written for bench_pretext.py: one box, crop, photometric transform and
mask at a time with PIL and numpy (as their data loader does), and its worker-pool helpers."""

from __future__ import annotations

import math
import os

import numpy as np
import PIL.Image
import PIL.ImageDraw
import PIL.ImageEnhance
import PIL.ImageFilter
import PIL.ImageOps
import torch

MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


class ReferenceSettings:
    """The recipe's pretext settings (the same numbers as CIMConfig's defaults)."""

    def __init__(self, augmentation: bool = True):
        self.num_exemplars, self.exemplar_size, self.context_size = 6, 64, 160
        self.scale, self.aspect, self.max_rotation = (0.05, 0.48), (1 / 3, 3.0), 45.0
        self.augmentation = augmentation
        self.jitter, self.jitter_p = (0.4, 0.4, 0.2, 0.1), 0.8
        self.gray_p, self.blur_p, self.blur_sigma, self.solarize_p, self.flip_p = 0.2, 0.5, (0.1, 2.0), 0.2, 0.5


def normalize(image: PIL.Image.Image) -> np.ndarray:
    arr = np.asarray(image, dtype=np.float32) / 255.0
    return ((arr - MEAN) / STD).transpose(2, 0, 1)


def sample_box(width: int, height: int, s: ReferenceSettings, rng: np.random.Generator):
    """(x0, y0, w, h, theta_degrees): an axis-aligned box in the frame of the view rotated by theta."""
    area = width * height
    for _ in range(10):
        target = area * rng.uniform(*s.scale)
        ratio = math.exp(rng.uniform(math.log(s.aspect[0]), math.log(s.aspect[1])))  # h / w
        w, h = math.sqrt(target / ratio), math.sqrt(target * ratio)
        if w <= width and h <= height:
            break
    else:
        w = h = math.sqrt(area * s.scale[0])
    theta = rng.uniform(-s.max_rotation, s.max_rotation)
    x0, y0 = rng.uniform(0, width - w), rng.uniform(0, height - h)
    return x0, y0, w, h, theta


def _hue_shift(image: PIL.Image.Image, shift: float) -> PIL.Image.Image:
    hsv = np.array(image.convert("HSV"), dtype=np.uint8)
    hsv[..., 0] = (hsv[..., 0].astype(np.int16) + int(round(shift * 255))) % 256
    return PIL.Image.fromarray(hsv, "HSV").convert("RGB")


def photometric(image: PIL.Image.Image, s: ReferenceSettings, rng: np.random.Generator) -> PIL.Image.Image:
    if rng.random() < s.jitter_p:
        b, c, sat, hue = s.jitter
        for op in rng.permutation(4):
            if op == 0:
                image = PIL.ImageEnhance.Brightness(image).enhance(rng.uniform(1 - b, 1 + b))
            elif op == 1:
                image = PIL.ImageEnhance.Contrast(image).enhance(rng.uniform(1 - c, 1 + c))
            elif op == 2:
                image = PIL.ImageEnhance.Color(image).enhance(rng.uniform(1 - sat, 1 + sat))
            else:
                image = _hue_shift(image, rng.uniform(-hue, hue))
    if rng.random() < s.gray_p:
        image = image.convert("L").convert("RGB")
    if rng.random() < s.blur_p:
        image = image.filter(PIL.ImageFilter.GaussianBlur(radius=rng.uniform(*s.blur_sigma)))
    if rng.random() < s.solarize_p:
        image = PIL.ImageOps.solarize(image, threshold=128)
    if rng.random() < s.flip_p:
        image = image.transpose(PIL.Image.Transpose.FLIP_LEFT_RIGHT)
    return image


def mask_pil(box, width: int, height: int, size: int) -> np.ndarray:
    """Draw the box in the rotated frame, rotate it back into the view (PIL), resize to the context grid."""
    x0, y0, w, h, theta = box
    canvas = PIL.Image.new("L", (width, height), 0)
    PIL.ImageDraw.Draw(canvas).rectangle([x0, y0, x0 + w, y0 + h], fill=255)
    back = canvas.rotate(-theta, resample=PIL.Image.Resampling.NEAREST, expand=False)
    back = back.resize((size, size), PIL.Image.Resampling.NEAREST)
    return (np.asarray(back) > 127).astype(np.float32)


def mask_loop(box, width: int, height: int, size: int) -> np.ndarray:
    """A Python loop over the context pixels: map each pixel centre into the rotated frame, test the box."""
    x0, y0, w, h, theta = box
    a = math.radians(theta)
    cos, sin = math.cos(a), math.sin(a)
    cx, cy = width / 2.0, height / 2.0
    sx, sy = width / size, height / size
    out = np.zeros((size, size), dtype=np.float32)
    for i in range(size):
        y = (i + 0.5) * sy - cy
        for j in range(size):
            x = (j + 0.5) * sx - cx
            # PIL's rotate(theta) turns the picture counter-clockwise on screen (y down): a view point (x, y)
            # lands at (x cos + y sin, -x sin + y cos) around the centre
            xr = x * cos + y * sin + cx
            yr = -x * sin + y * cos + cy
            if x0 <= xr <= x0 + w and y0 <= yr <= y0 + h:
                out[i, j] = 1.0
    return out


def reference_pretext(view: np.ndarray, s: ReferenceSettings, rng: np.random.Generator, mask_mode: str):
    """One image -> (context (3, m, m), exemplars (K, 3, n, n), maps (K, m, m)), float32 numpy."""
    image = PIL.Image.fromarray(view)
    width, height = image.size
    context = normalize(image.resize((s.context_size, s.context_size), PIL.Image.Resampling.BICUBIC))
    exemplars, maps = [], []
    make_mask = mask_loop if mask_mode == "loop" else mask_pil
    for _ in range(s.num_exemplars):
        box = sample_box(width, height, s, rng)
        x0, y0, w, h, theta = box
        rotated = image.rotate(theta, resample=PIL.Image.Resampling.BILINEAR, expand=False)
        crop = rotated.crop((int(round(x0)), int(round(y0)), int(round(x0 + w)), int(round(y0 + h))))
        crop = crop.resize((s.exemplar_size, s.exemplar_size), PIL.Image.Resampling.BILINEAR)
        if s.augmentation:
            crop = photometric(crop, s, rng)
        exemplars.append(normalize(crop))
        maps.append(make_mask(box, width, height, s.context_size))
    return context, np.stack(exemplars), np.stack(maps)


def reference_batch(views: list[np.ndarray], s: ReferenceSettings, rng: np.random.Generator, mask_mode: str):
    """Per-image pipeline over a list of views, then collation into batch arrays (as a data loader would)."""
    out = [reference_pretext(v, s, rng, mask_mode) for v in views]
    return tuple(np.stack(parts) for parts in zip(*out))


# worker-process side (one process per core, like data-loader workers)
_WORKER: dict = {}


def _worker_init(views, augmentation, seed):
    torch.set_num_threads(1)
    _WORKER.update(
        views=views, settings=ReferenceSettings(augmentation), rng=np.random.default_rng(seed + os.getpid())
    )


def _worker_run(task):
    start, count, mask_mode = task
    views = _WORKER["views"]
    chunk = [views[(start + i) % len(views)] for i in range(count)]
    context, exemplars, maps = reference_batch(chunk, _WORKER["settings"], _WORKER["rng"], mask_mode)
    return float(context.sum() + exemplars.sum() + maps.sum())  # a checksum only: no transfer charged


def _worker_ready(_):
    return os.getpid()
