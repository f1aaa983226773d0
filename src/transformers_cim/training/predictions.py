"""``--do_predict`` of the classification script: every test row predicted in order and written as
``predictions.csv`` (row, top-1 label, its softmax probability; an empty label and score for an unusable image)."""

from __future__ import annotations

import csv

import torch
from transformers import TrainingArguments


def _collate_all_rows(rows: list[dict]) -> dict[str, torch.Tensor]:
    """Every row of a prediction batch, in order, the unusable ones too (flagged by ``cim_valid``)."""
    return {"pixel_values": torch.stack([torch.as_tensor(row["pixel_values"]) for row in rows]),
            "cim_valid": torch.tensor([bool(row["cim_valid"]) for row in rows])}

@torch.no_grad()
def write_predictions(model: torch.nn.Module, test_ds, names: list[str], args: TrainingArguments,
                      path: str) -> int:
    """Predicts every test row in order and writes ``row,label,score`` (top-1 class and its softmax probability) to
    `path`; a row whose image could not be used gets an empty label and score. Returns the number of rows."""
    loader = torch.utils.data.DataLoader(test_ds, batch_size=args.per_device_eval_batch_size,
                                         num_workers=args.dataloader_num_workers, collate_fn=_collate_all_rows)
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

__all__ = [
    "write_predictions",
]
