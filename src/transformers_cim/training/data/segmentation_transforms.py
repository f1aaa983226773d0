"""The image-and-mask transforms of semantic segmentation, with Pillow and numpy (no torchvision):
:class:`SegmentationTrainTransform` (random scale, crop and flip of the pair, the mask padded with the ignore index)
and :class:`SegmentationEvalTransform` (the shorter side resized, the mask kept at its own resolution)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ...errors import UserValueError
from .transforms import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _stats(values: Sequence[float]) -> torch.Tensor:
    return torch.tensor(list(values), dtype=torch.float32).view(3, 1, 1)


def resize_pair(
    image: torch.Tensor, mask: torch.Tensor | None, height: int, width: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Image ``(3, H, W)`` float resized bilinearly (antialiased when shrinking), mask ``(H, W)`` by nearest
    neighbour, to ``height x width``."""
    if tuple(image.shape[-2:]) == (height, width):
        return image, mask
    shrink = height < image.shape[-2] or width < image.shape[-1]
    image = F.interpolate(image[None], size=(height, width), mode="bilinear", align_corners=False, antialias=shrink)[0]
    if mask is not None:
        mask = F.interpolate(mask[None, None].float(), size=(height, width), mode="nearest-exact")[0, 0].long()
    return image, mask


def shorter_side_size(height: int, width: int, shorter: float) -> tuple[int, int]:
    """``(h, w)`` with the shorter side `shorter`, the aspect ratio kept."""
    scale = shorter / min(height, width)
    return max(1, int(round(height * scale))), max(1, int(round(width * scale)))


class SegmentationTrainTransform:
    """Training view of an (image, mask) pair, mmsegmentation's recipe as tensor ops: rescale so the shorter side is
    ``base_size x r``, r uniform in `scale_range` (default 0.5-2.0); pad to `crop_size` (image with the mean colour,
    i.e. 0 after normalisation; mask with the ignore index); a random `crop_size` crop; a horizontal flip with
    probability 0.5; normalise. `base_size` defaults to the crop's shorter side. The image and the mask always get
    the same geometry (bilinear for the image, nearest for the mask)."""

    def __init__(
        self,
        crop_size: int | Sequence[int],
        *,
        base_size: int | None = None,
        scale_range: tuple[float, float] = (0.5, 2.0),
        hflip: bool = True,
        mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
        std: Sequence[float] = IMAGENET_DEFAULT_STD,
        ignore_index: int = 255,
    ):
        if not 0 < scale_range[0] <= scale_range[1]:
            raise UserValueError(f"The scale range must be increasing and positive, got {scale_range}.")
        self.size = _pair(crop_size)  # `size` as the other transforms: the placeholder of a skipped row
        self.base_size = int(base_size) if base_size else min(self.size)
        self.scale_range, self.hflip, self.ignore_index = tuple(scale_range), hflip, int(ignore_index)
        self.mean, self.std = _stats(mean), _stats(std)

    def __call__(
        self, image: torch.Tensor, mask: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`image` (3, H, W) uint8 or float in [0, 255], `mask` (H, W) int -> normalised (3, h, w) float32 view and
        (h, w) int64 labels, (h, w) = the crop size."""
        low, high = self.scale_range
        ratio = low + (high - low) * float(torch.rand((), generator=generator))
        height, width = shorter_side_size(image.shape[-2], image.shape[-1], self.base_size * ratio)
        image, mask = resize_pair(image.float(), mask.long(), height, width)
        image = (image / 255.0 - self.mean) / self.std
        crop_h, crop_w = self.size
        pad_h, pad_w = max(0, crop_h - height), max(0, crop_w - width)
        if pad_h or pad_w:
            image = F.pad(image, (0, pad_w, 0, pad_h), value=0.0)
            mask = F.pad(mask, (0, pad_w, 0, pad_h), value=self.ignore_index)
        top = int(torch.randint(0, image.shape[-2] - crop_h + 1, (), generator=generator))
        left = int(torch.randint(0, image.shape[-1] - crop_w + 1, (), generator=generator))
        image, mask = (
            image[:, top : top + crop_h, left : left + crop_w],
            mask[top : top + crop_h, left : left + crop_w],
        )
        if self.hflip and float(torch.rand((), generator=generator)) < 0.5:
            image, mask = image.flip(-1), mask.flip(-1)
        return image.contiguous(), mask.contiguous()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(crop_size={self.size}, base_size={self.base_size}, "
            f"scale_range={self.scale_range}, hflip={self.hflip})"
        )


class SegmentationEvalTransform:
    """Evaluation input of an (image, mask) pair: the image resized so its shorter side is `base_size` (kept as it is
    when None) and normalised; the mask kept at the original size, so that the scores are computed on the original
    pixels (the prediction is resized back to the mask)."""

    def __init__(
        self,
        base_size: int | None = None,
        *,
        mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
        std: Sequence[float] = IMAGENET_DEFAULT_STD,
    ):
        self.base_size = int(base_size) if base_size else None
        self.size = (self.base_size or 1, self.base_size or 1)  # placeholder size of a skipped row
        self.mean, self.std = _stats(mean), _stats(std)

    def __call__(
        self, image: torch.Tensor, mask: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        image = image.float()
        if self.base_size is not None:
            height, width = shorter_side_size(image.shape[-2], image.shape[-1], self.base_size)
            image, _ = resize_pair(image, None, height, width)
        return ((image / 255.0 - self.mean) / self.std).contiguous(), mask.long().contiguous()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base_size={self.base_size})"


__all__ = ["SegmentationEvalTransform", "SegmentationTrainTransform", "resize_pair", "shorter_side_size"]
