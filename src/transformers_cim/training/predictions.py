"""``--do_predict`` of the scripts: the classification script's ``predictions.csv`` (every test row in order: row,
top-1 label, its softmax probability; an empty label and score for an unusable image), and the segmentation script's
predicted masks, one PNG index map per test image (:class:`MaskWriter`)."""

from __future__ import annotations

import csv
import logging
import os

import numpy as np
import torch
from transformers import TrainingArguments, UperNetForSemanticSegmentation

from .data import (
    decode_image_with_reason,
    find_image_column,
    image_name,
    without_image_decoding,
)
from .data.segmentation import (
    SegmentationEvalTransform,
    mask_to_image,
)
from .script_args import (
    DataSourceArguments,
)
from .segmentation import predict_logits

logger = logging.getLogger("run_semantic_segmentation")


def _collate_all_rows(rows: list[dict]) -> dict[str, torch.Tensor]:
    """Every row of a prediction batch, in order, the unusable ones too (flagged by ``cim_valid``)."""
    return {
        "pixel_values": torch.stack([torch.as_tensor(row["pixel_values"]) for row in rows]),
        "cim_valid": torch.tensor([bool(row["cim_valid"]) for row in rows]),
    }


@torch.no_grad()
def write_predictions(model: torch.nn.Module, test_ds, names: list[str], args: TrainingArguments, path: str) -> int:
    """Predicts every test row in order and writes ``row,label,score`` (top-1 class and its softmax probability) to
    `path`; a row whose image could not be used gets an empty label and score. Returns the number of rows."""
    loader = torch.utils.data.DataLoader(
        test_ds,
        batch_size=args.per_device_eval_batch_size,
        num_workers=args.dataloader_num_workers,
        collate_fn=_collate_all_rows,
    )
    parameter = next(model.parameters())
    was_training = model.training
    model.eval()
    count = 0
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["row", "label", "score"])
        for batch in loader:
            pixel_values = batch["pixel_values"].to(device=parameter.device, dtype=parameter.dtype)
            scores, ids = model(pixel_values=pixel_values).logits.float().softmax(-1).max(-1)
            for valid, score, index in zip(batch["cim_valid"].tolist(), scores.tolist(), ids.tolist()):
                writer.writerow([count, names[index], f"{score:.6f}"] if valid else [count, "", ""])
                count += 1
    model.train(was_training)
    return count


class MaskWriter:
    """Saves predicted index maps as PNGs in `folder`, named after the images (or their rows), keeping count."""

    def __init__(self, folder: str, names: list[str] | None):
        self.folder, self.names, self.count = folder, names, 0
        os.makedirs(folder, exist_ok=True)

    def __call__(self, index: int, predicted: np.ndarray) -> None:
        name = self.names[index] if self.names is not None else f"row-{index:06d}"
        mask_to_image(predicted).save(os.path.join(self.folder, f"{name}.png"))
        self.count += 1


@torch.no_grad()
def write_predicted_masks(
    model: UperNetForSemanticSegmentation,
    raw,
    data_args: DataSourceArguments,
    transform: SegmentationEvalTransform,
    writer: MaskWriter,
) -> None:
    """Predicts every image of a split without masks (at its own size) and saves its index map with `writer`.
    Undecodable images are skipped with a warning."""
    column = find_image_column(raw, data_args.image_column_name)
    raw = without_image_decoding(raw, column)
    parameter = next(model.parameters())
    model.eval()
    for index, row in enumerate(raw):
        image, reason = decode_image_with_reason(row[column], min_size=data_args.min_image_size)
        if image is None:
            logger.warning(f"Prediction skipped row {index} ({image_name(row[column]) or 'no file name'}): {reason}")
            continue
        pixels = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)
        pixel_values, _ = transform(pixels, torch.zeros(1, 1))
        logits = predict_logits(
            model, pixel_values[None].to(parameter.device, parameter.dtype), (image.height, image.width)
        )
        writer(index, logits[0].argmax(0).cpu().numpy())


__all__ = [
    "MaskWriter",
    "write_predicted_masks",
    "write_predictions",
]
