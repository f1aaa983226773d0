"""Semantic-segmentation training glue: whole-image inference, the evaluation loop, the Trainer, and the figure.

* :func:`predict_logits` runs an UperNet on one whole image of any size: the image is padded (bottom / right) to a
  multiple of the encoder's stride (the ViT's positions are interpolated to the padded grid), and the logits are
  cropped back and resized to the size the scores are computed at.
* :func:`evaluate_segmentation` scores a dataset of (image, mask) rows at the masks' own resolution: confusion
  matrix -> mean IoU, per-class IoU, pixel accuracy (:mod:`transformers_cim.training.segmentation_metrics`).
* :class:`SegmentationTrainer` is :class:`~transformers_cim.training.classification_trainer.ClassificationTrainer`
(layer-decay AdamW,
  skipped-image counting, the package's card kept) whose ``evaluate`` is that whole-image evaluation.
* :func:`render_segmentation_examples` draws image / true mask / predicted mask rows as one PNG.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import nn

from .classification_trainer import ClassificationTrainer
from .segmentation_metrics import ConfusionMatrix, flat_scores, segmentation_scores

logger = logging.getLogger(__name__)

RESNET_STRIDE = 32


def input_multiple(model: nn.Module) -> int:
    """The multiple the input's sides must have: the ViT's patch size, or a ResNet's total stride (32)."""
    backbone_config = getattr(model.config, "backbone_config", None)
    patch = getattr(backbone_config, "patch_size", None)
    if patch is not None:
        return int(patch if isinstance(patch, int) else patch[0])
    return RESNET_STRIDE


def pad_to_multiple(pixel_values: torch.Tensor, multiple: int) -> torch.Tensor:
    """``(..., H, W)`` padded with zeros (the mean colour after normalisation) at the bottom / right to multiples."""
    height, width = pixel_values.shape[-2:]
    pad_h, pad_w = (-height) % multiple, (-width) % multiple
    return F.pad(pixel_values, (0, pad_w, 0, pad_h)) if pad_h or pad_w else pixel_values


@torch.no_grad()
def predict_logits(
    model: nn.Module, pixel_values: torch.Tensor, output_size: Sequence[int] | None = None
) -> torch.Tensor:
    """Logits ``(B, num_labels, h, w)`` of whole images ``(B, 3, H, W)``; ``(h, w)`` is `output_size` (the mask's
    size), else ``(H, W)``. Padding is cropped off before the (bilinear) resize."""
    height, width = pixel_values.shape[-2:]
    logits = model(pixel_values=pad_to_multiple(pixel_values, input_multiple(model))).logits
    logits = logits[..., :height, :width]
    size = tuple(output_size) if output_size is not None else (height, width)
    if tuple(logits.shape[-2:]) != size:
        logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
    return logits


@dataclass
class SegmentationEvaluation:
    """What :func:`evaluate_segmentation` measured: the confusion matrix, the mean cross-entropy per image (over the
    `loss_images` with a labelled pixel), the number of rows skipped, and a few (image, true mask, predicted mask)
    examples for the figure."""

    confusion: ConfusionMatrix
    loss: float
    images: int
    skipped: int
    examples: list[tuple[torch.Tensor, np.ndarray, np.ndarray]] = field(default_factory=list)
    loss_images: int = 0


def _rows_of_process(dataset: Iterable[dict], process_index: int, num_processes: int) -> Iterable[tuple[int, dict]]:
    """``(row index, row)`` of every `num_processes`-th row, starting at `process_index`."""
    if not isinstance(dataset, torch.utils.data.IterableDataset) and hasattr(dataset, "__len__"):
        return ((i, dataset[i]) for i in range(process_index, len(dataset), num_processes))
    return ((i, row) for i, row in enumerate(dataset) if i % num_processes == process_index)


@torch.no_grad()
def evaluate_segmentation(
    model: nn.Module,
    dataset: Iterable[dict],
    num_labels: int,
    ignore_index: int = 255,
    *,
    num_examples: int = 0,
    process_index: int = 0,
    num_processes: int = 1,
    autocast=None,
    on_prediction: Callable[[int, np.ndarray], None] | None = None,
    example_rows: set[int] | None = None,
) -> SegmentationEvaluation:
    """Scores `model` on every row of `dataset` (rows ``{"pixel_values": (3, H, W), "labels": (h, w),
    "cim_valid"}``), one whole image at a time, at the mask's resolution. Rows flagged invalid are counted, not
    scored. Under distributed evaluation each process takes every `num_processes`-th row; the caller sums.
    `on_prediction(row index, predicted ids)` is called for every scored row (e.g. to save the masks). The
    examples are the first `num_examples` scored rows among `example_rows` (any row when None)."""
    parameter = next(model.parameters())
    was_training = model.training
    model.eval()
    confusion = ConfusionMatrix(num_labels, ignore_index)
    loss_sum, loss_images, images, skipped, examples = 0.0, 0, 0, 0, []
    for index, row in _rows_of_process(dataset, process_index, num_processes):
        if not row.get("cim_valid", True):
            skipped += 1
            continue
        pixel_values = torch.as_tensor(row["pixel_values"])[None].to(parameter.device, parameter.dtype)
        labels = torch.as_tensor(row["labels"]).long().to(parameter.device)
        with autocast() if autocast is not None else contextlib.nullcontext():
            logits = predict_logits(model, pixel_values, labels.shape[-2:])[0].float()
        predicted = logits.argmax(0)
        confusion.update(predicted, labels)
        if (labels != ignore_index).any():
            loss_sum += float(F.cross_entropy(logits[None], labels[None], ignore_index=ignore_index))
            loss_images += 1  # an image whose every pixel is ignored has no loss (not a loss of 0)
        images += 1
        if on_prediction is not None:
            on_prediction(index, predicted.cpu().numpy())
        if len(examples) < num_examples and (example_rows is None or index in example_rows):
            examples.append((row["pixel_values"].cpu(), labels.cpu().numpy(), predicted.cpu().numpy()))
    model.train(was_training)
    return SegmentationEvaluation(confusion, loss_sum / max(loss_images, 1), images, skipped, examples, loss_images)


def spread_rows(dataset: Iterable[dict], count: int) -> set[int] | None:
    """`count` row indices spread evenly over a dataset of known length (consecutive video frames look alike), or
    None (any rows) for a stream."""
    if isinstance(dataset, torch.utils.data.IterableDataset) or not hasattr(dataset, "__len__") or count < 1:
        return None
    size, count = len(dataset), min(count, len(dataset))
    return {round(i * (size - 1) / max(count - 1, 1)) for i in range(count)}


class SegmentationTrainer(ClassificationTrainer):
    """`ClassificationTrainer` (layer-decay AdamW, skipped-image counting, the package's card kept) for UperNet:
    training uses the model's own loss (decode head + 0.4 x auxiliary head, the ignore index left out);
    ``evaluate`` scores whole images at the masks' resolution (:func:`evaluate_segmentation`) and logs
    ``<prefix>_mean_iou``, ``<prefix>_overall_accuracy`` (pixel accuracy), ``<prefix>_mean_accuracy``,
    ``<prefix>_iou_<class>``, ``<prefix>_loss`` and ``<prefix>_runtime`` (seconds). Extra keyword arguments:
    ``ignore_index`` and ``num_examples`` (the rows kept in ``last_examples`` for the figure)."""

    def __init__(self, *args: Any, ignore_index: int = 255, num_examples: int = 4, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.ignore_index = int(ignore_index)
        self.figure_examples = int(num_examples)
        self.last_examples: list[tuple[torch.Tensor, np.ndarray, np.ndarray]] = []

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ):
        if model.training and inputs["pixel_values"].shape[0] < 2:
            # the collator dropped all images of this batch but one (or all): UperNet's pooling branch normalises
            # 1x1 maps with BatchNorm, which cannot train on one image; the batch adds a zero loss instead of a crash
            skipped = inputs.get("skipped_images")
            if skipped:
                self.skipped_images.add(skipped)
            logger.warning(
                f"Step {self.state.global_step}: a training batch kept {inputs['pixel_values'].shape[0]} "
                "usable image(s), fewer than the 2 UperNet's BatchNorm needs; it is left out."
            )
            zero = sum(p.sum() for p in model.parameters() if p.requires_grad) * 0.0
            return (zero, None) if return_outputs else zero
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def evaluate(
        self,
        eval_dataset=None,
        ignore_keys=None,
        metric_key_prefix: str = "eval",
        on_prediction: Callable[[int, np.ndarray], None] | None = None,
    ) -> dict[str, float]:
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if dataset is None:
            raise ValueError("SegmentationTrainer.evaluate needs an evaluation dataset.")
        model = self.accelerator.unwrap_model(self.model)
        config = model.config
        start = time.perf_counter()
        result = evaluate_segmentation(
            model,
            dataset,
            config.num_labels,
            self.ignore_index,
            num_examples=self.figure_examples,
            process_index=self.args.process_index,
            num_processes=self.args.world_size,
            autocast=self.autocast_smart_context_manager,
            on_prediction=on_prediction,
            example_rows=spread_rows(dataset, self.figure_examples),
        )
        counts = result.confusion.counts
        totals = torch.tensor(
            [result.loss * result.loss_images, result.loss_images, result.images, result.skipped], dtype=torch.float64
        )
        if self.args.world_size > 1:
            device = self.args.device
            counts = self.accelerator.reduce(counts.to(device), reduction="sum").cpu()
            totals = self.accelerator.reduce(totals.to(device), reduction="sum").cpu()
        scores = flat_scores(segmentation_scores(counts, config.id2label))
        metrics = {
            "loss": float(totals[0] / max(float(totals[1]), 1.0)),
            **scores,
            "images": int(totals[2]),
            "skipped_images": int(totals[3]),
            "runtime": round(time.perf_counter() - start, 2),
        }
        metrics = {f"{metric_key_prefix}_{key}": value for key, value in metrics.items()}
        self.last_examples = result.examples
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics


# ------------------------------------------------------------------------------------------------------------
# Figure
# ------------------------------------------------------------------------------------------------------------
def segmentation_palette(num_labels: int) -> np.ndarray:
    """``(num_labels, 3)`` uint8 colours, distinct and stable (golden-angle hues at two lightness levels)."""
    colours = []
    for i in range(num_labels):
        hue = (i * 0.618033988749895) % 1.0
        light = 0.55 if i % 2 == 0 else 0.4
        colours.append(_hsl_to_rgb(hue, 0.75, light))
    return np.array(colours, dtype=np.uint8).reshape(num_labels, 3)


def _hsl_to_rgb(h: float, s: float, lightness: float) -> tuple[int, int, int]:
    def channel(n: float) -> int:
        k = (n + h * 12) % 12
        a = s * min(lightness, 1 - lightness)
        return int(round(255 * (lightness - a * max(-1, min(k - 3, 9 - k, 1)))))

    return channel(0), channel(8), channel(4)


def colourise(mask: np.ndarray, palette: np.ndarray, ignore_index: int = 255) -> np.ndarray:
    """``(H, W)`` ids -> ``(H, W, 3)`` colours; the ignore index (and any id outside the palette) black."""
    out = np.zeros((*mask.shape, 3), dtype=np.uint8)
    known = (mask >= 0) & (mask < len(palette)) & (mask != ignore_index)
    out[known] = palette[mask[known]]
    return out


def _denormalise(pixel_values: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    mean_t = torch.tensor(list(mean), dtype=torch.float32).view(3, 1, 1)
    std_t = torch.tensor(list(std), dtype=torch.float32).view(3, 1, 1)
    image = (pixel_values.float().cpu() * std_t + mean_t).clamp(0, 1)
    return (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def render_segmentation_examples(
    examples: Sequence[tuple[torch.Tensor, np.ndarray, np.ndarray]],
    class_names: Sequence[str],
    mean: Sequence[float],
    std: Sequence[float],
    ignore_index: int = 255,
    tile_height: int = 160,
) -> Image.Image:
    """One row per example: the image, the true mask, the predicted mask (class colours; ignored pixels black), and
    a legend of the class colours below."""
    palette = segmentation_palette(len(class_names))
    header, titles = 18, ("image", "true mask", "predicted mask")
    rows = []
    for pixel_values, true_mask, predicted in examples:
        height, width = true_mask.shape
        tile_width = max(1, int(round(tile_height * width / height)))
        image = Image.fromarray(_denormalise(pixel_values, mean, std)).resize(
            (tile_width, tile_height), Image.BILINEAR
        )
        true_tile = Image.fromarray(colourise(true_mask, palette, ignore_index)).resize(
            (tile_width, tile_height), Image.NEAREST
        )
        predicted_tile = Image.fromarray(colourise(predicted, palette, ignore_index)).resize(
            (tile_width, tile_height), Image.NEAREST
        )
        rows.append((image, true_tile, predicted_tile))
    width = 3 * max((r[0].width for r in rows), default=tile_height)
    legend_columns = 4
    legend_height = 16 * math.ceil(len(class_names) / legend_columns) + 8
    canvas = Image.new("RGB", (max(width, 480), header + len(rows) * tile_height + legend_height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    column_width = width // 3 if rows else tile_height
    for col, title in enumerate(titles):
        draw.text((col * column_width + 4, 3), title, fill=(0, 0, 0))
    for r, tiles in enumerate(rows):
        for col, tile in enumerate(tiles):
            canvas.paste(tile, (col * column_width, header + r * tile_height))
    top = header + len(rows) * tile_height + 4
    cell = max(canvas.width // legend_columns, 1)
    for i, name in enumerate(class_names):
        x, y = (i % legend_columns) * cell + 4, top + (i // legend_columns) * 16
        draw.rectangle((x, y + 2, x + 10, y + 12), fill=tuple(int(c) for c in palette[i]))
        draw.text((x + 14, y), str(name), fill=(0, 0, 0))
    return canvas


__all__ = [
    "SegmentationEvaluation",
    "SegmentationTrainer",
    "colourise",
    "evaluate_segmentation",
    "input_multiple",
    "pad_to_multiple",
    "predict_logits",
    "render_segmentation_examples",
    "segmentation_palette",
    "spread_rows",
]
