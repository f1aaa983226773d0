"""The evaluation image processor every checkpoint of this package carries: a stock ``ViTImageProcessor`` config
(resize the shorter side, centre-crop, normalise), loadable without custom code by `pipeline()` and
`AutoImageProcessor` for ViT and ResNet models alike. The training side's
:class:`~transformers_cim.training.data.ResizeCenterCrop` computes the same transform on the data pipeline."""

from __future__ import annotations

from collections.abc import Sequence

import PIL.Image
from transformers import ViTImageProcessorPil

from .configuration_cim import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD


def eval_image_processor(
    size: int = 224,
    crop_pct: float = 0.875,
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
) -> ViTImageProcessorPil:
    """Resize the shorter side to ``int(size / crop_pct)`` (bicubic), centre-crop ``size``, normalise with ``mean`` /
    ``std``."""
    if not 0 < crop_pct <= 1:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}.")
    size = int(size)
    return ViTImageProcessorPil(
        do_resize=True,
        size={"shortest_edge": int(size / crop_pct)},
        resample=PIL.Image.Resampling.BICUBIC,
        do_center_crop=True,
        crop_size={"height": size, "width": size},
        image_mean=[float(m) for m in mean],
        image_std=[float(s) for s in std],
    )


__all__ = ["eval_image_processor"]
