"""The image transforms, written with Pillow and numpy only (no torchvision): :class:`RandomResizedCropFlip` (the
search view) and :class:`ResizeCenterCrop` (evaluation, and the image processor saved with every checkpoint, which
reproduces it), and the ImageNet mean / std every default in this package uses."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import PIL.Image
import torch
from transformers import ViTImageProcessorPil

from ...configuration_cim import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from ...image_processing import eval_image_processor
from ..seeding import numpy_rng_from_torch
from .decoding import to_rgb


def to_normalized_tensor(image: PIL.Image.Image, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """RGB PIL image -> float32 (3, H, W) tensor, ``(x / 255 - mean) / std``."""
    arr = np.array(to_rgb(image), dtype=np.uint8)
    tensor = torch.from_numpy(arr).permute(2, 0, 1).float().div_(255.0)
    return tensor.sub_(mean).div_(std).contiguous()


def _stats(values: Sequence[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32).view(3, 1, 1)


def random_erase_(
    tensor: torch.Tensor,
    rng: np.random.Generator,
    probability: float,
    area: tuple[float, float] = (0.02, 1 / 3),
    aspect: tuple[float, float] = (0.3, 10 / 3),
) -> torch.Tensor:
    """Random erasing of a normalised (C, H, W) image, in place: with ``probability``, one rectangle (area fraction
    in ``area``, log-uniform aspect h / w in ``aspect``, up to 10 tries to fit) becomes per-pixel standard-normal
    noise, the "pixel" mode of the fine-tuning recipes of MAE and CIM (timm's `RandomErasing`, count 1)."""
    if probability <= 0 or rng.random() >= probability:
        return tensor
    channels, height, width = tensor.shape
    log_aspect = (math.log(aspect[0]), math.log(aspect[1]))
    for _ in range(10):
        target = height * width * rng.uniform(area[0], area[1])
        ratio = math.exp(rng.uniform(log_aspect[0], log_aspect[1]))
        h, w = int(round(math.sqrt(target * ratio))), int(round(math.sqrt(target / ratio)))
        if 0 < h < height and 0 < w < width:
            top, left = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
            noise = rng.standard_normal((channels, h, w), dtype=np.float32)
            tensor[:, top : top + h, left : left + w] = torch.from_numpy(noise)
            break
    return tensor


class RandomResizedCropFlip:
    """The CIM "search view": random-resized crop (bicubic), horizontal flip, normalisation. Pillow/numpy only.

    Crop sampling follows the usual random-resized-crop: up to 10 tries of an area fraction in ``scale`` and a
    log-uniform aspect ratio (w / h) in ``ratio``; if none fits, a central crop with the ratio clamped to ``ratio``.
    Pass a seeded ``numpy.random.Generator`` for exact reproducibility.
    """

    def __init__(
        self,
        size: int = 224,
        scale: tuple[float, float] = (0.2, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        hflip: bool = True,
        mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
        std: Sequence[float] = IMAGENET_DEFAULT_STD,
        random_erasing: float = 0.0,
    ):
        if not (0 < scale[0] <= scale[1]) or not (0 < ratio[0] <= ratio[1]):
            raise ValueError(f"scale and ratio must be increasing positive pairs, got scale={scale}, ratio={ratio}.")
        if not 0.0 <= random_erasing <= 1.0:
            raise ValueError(f"random_erasing is a probability in [0, 1], got {random_erasing}.")
        self.size, self.scale, self.ratio, self.hflip = int(size), tuple(scale), tuple(ratio), hflip
        self.random_erasing = float(random_erasing)
        self.mean, self.std = _stats(mean), _stats(std)

    def get_params(self, width: int, height: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
        """Crop box ``(left, top, crop_width, crop_height)`` for an image of ``width`` x ``height``."""
        area = width * height
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target_area = area * rng.uniform(self.scale[0], self.scale[1])
            aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
            w = int(round(math.sqrt(target_area * aspect)))
            h = int(round(math.sqrt(target_area / aspect)))
            if 0 < w <= width and 0 < h <= height:
                return int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h
        return self._central_fallback(width, height)

    def _central_fallback(self, width: int, height: int) -> tuple[int, int, int, int]:
        in_ratio = width / height
        if in_ratio < self.ratio[0]:
            w, h = width, int(round(width / self.ratio[0]))
        elif in_ratio > self.ratio[1]:
            w, h = int(round(height * self.ratio[1])), height
        else:
            w, h = width, height
        return (width - w) // 2, (height - h) // 2, w, h

    def __call__(self, image: PIL.Image.Image, rng: np.random.Generator | None = None) -> torch.Tensor:
        # default: keyed by torch's RNG, seeded by the Trainer and per data-loader worker (workers differ, runs repeat)
        rng = rng if rng is not None else numpy_rng_from_torch()
        image = to_rgb(image)
        left, top, w, h = self.get_params(image.width, image.height, rng)
        view = image.resize((self.size, self.size), PIL.Image.Resampling.BICUBIC, box=(left, top, left + w, top + h))
        if self.hflip and rng.random() < 0.5:
            view = view.transpose(PIL.Image.Transpose.FLIP_LEFT_RIGHT)
        tensor = to_normalized_tensor(view, self.mean, self.std)
        if self.random_erasing > 0:  # no draw at all when off: the views of existing seeds stay as they were
            random_erase_(tensor, rng, self.random_erasing)
        return tensor

    def __repr__(self) -> str:
        erasing = f", random_erasing={self.random_erasing}" if self.random_erasing else ""
        return (
            f"{type(self).__name__}(size={self.size}, scale={self.scale}, ratio={self.ratio}, "
            f"hflip={self.hflip}{erasing})"
        )


class ResizeCenterCrop:
    """Evaluation transform: resize the shorter side to ``int(size / crop_pct)`` (bicubic), center-crop ``size``."""

    def __init__(
        self,
        size: int = 224,
        crop_pct: float = 0.875,
        mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
        std: Sequence[float] = IMAGENET_DEFAULT_STD,
    ):
        if not 0 < crop_pct <= 1:
            raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}.")
        self.size, self.crop_pct = int(size), float(crop_pct)
        self.mean, self.std = _stats(mean), _stats(std)

    def resized_shape(self, width: int, height: int) -> tuple[int, int]:
        short = int(self.size / self.crop_pct)
        if width <= height:
            return short, max(short, int(short * height / width))
        return max(short, int(short * width / height)), short

    def __call__(self, image: PIL.Image.Image, rng: np.random.Generator | None = None) -> torch.Tensor:
        image = to_rgb(image)
        new_w, new_h = self.resized_shape(image.width, image.height)
        image = image.resize((new_w, new_h), PIL.Image.Resampling.BICUBIC)
        left, top = (new_w - self.size) // 2, (new_h - self.size) // 2  # as the image processor's centre crop
        image = image.crop((left, top, left + self.size, top + self.size))
        return to_normalized_tensor(image, self.mean, self.std)

    def image_processor(self) -> ViTImageProcessorPil:
        """The stock image processor that computes this transform (see
        :func:`transformers_cim.image_processing.eval_image_processor`)."""
        return eval_image_processor(
            self.size, self.crop_pct, self.mean.flatten().tolist(), self.std.flatten().tolist()
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}, crop_pct={self.crop_pct})"
