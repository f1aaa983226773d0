"""Figure-5-style pictures of the pretext task: context with the exemplar's outline, the exemplar, the true
map and the predicted map, one row per (image, exemplar), written as a PNG. During training,
:class:`~transformers_cim.training.visualization_callback.VisualizationCallback` sends them to the run's experiment
trackers."""

from __future__ import annotations

import logging
import math
import os

import numpy as np
import torch
from PIL import Image, ImageDraw

from ._deprecation import moved_attributes

logger = logging.getLogger(__name__)

OUTLINE_COLOUR = (255, 64, 32)
COLUMN_TITLES = ("context + exemplar box", "exemplar", "true map", "predicted map")


def denormalize(pixel_values: torch.Tensor, mean: list[float], std: list[float]) -> np.ndarray:
    """(3, H, W) normalised tensor -> (H, W, 3) uint8 array."""
    mean_t = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    image = (pixel_values.detach().float().cpu() * std_t + mean_t).clamp(0, 1)
    return (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def box_corners(box: torch.Tensor, size: int) -> list[tuple[float, float]]:
    """Pixel corners of a (cx, cy, w, h, theta) box on a size x size image."""
    cx, cy, w, h, theta = (float(v) for v in box)
    cos, sin = math.cos(theta), math.sin(theta)
    corners = []
    for du, dv in ((-1, -1), (1, -1), (1, 1), (-1, 1)):
        x = cx + du * w / 2 * cos - dv * h / 2 * sin
        y = cy + du * w / 2 * sin + dv * h / 2 * cos
        corners.append((x * size, y * size))
    return corners


def _map_image(values: torch.Tensor, size: int) -> Image.Image:
    array = (values.detach().float().cpu().clamp(0, 1).numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(array, mode="L").convert("RGB").resize((size, size), Image.NEAREST)


def render_correlation_grid(
    outputs, mean: list[float], std: list[float], max_rows: int = 8, tile: int = 160
) -> Image.Image:
    """A grid image from a `CIMForPreTrainingOutput` (needs exemplar_boxes for the outline)."""
    contexts, exemplars = outputs.context_pixel_values, outputs.exemplar_pixel_values
    labels, probs, boxes = outputs.correlation_labels, outputs.logits.float().sigmoid(), outputs.exemplar_boxes
    batch, num_exemplars = exemplars.shape[:2]
    # a few exemplars of each image, so that the rows show whether the predicted map moves with the exemplar
    per_image = max(1, min(num_exemplars, math.ceil(max_rows / batch), 3))
    pairs = [(b, k) for b in range(batch) for k in range(per_image)][:max_rows]
    header = 18
    grid = Image.new("RGB", (4 * tile, header + len(pairs) * tile), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for col, title in enumerate(COLUMN_TITLES):
        draw.text((col * tile + 4, 3), title, fill=(0, 0, 0))
    for row, (b, k) in enumerate(pairs):
        top = header + row * tile
        context = Image.fromarray(denormalize(contexts[b], mean, std)).resize((tile, tile), Image.BILINEAR)
        if boxes is not None:
            ImageDraw.Draw(context).polygon(box_corners(boxes[b, k], tile), outline=OUTLINE_COLOUR, width=2)
        exemplar = Image.fromarray(denormalize(exemplars[b, k], mean, std)).resize((tile, tile), Image.BILINEAR)
        tiles = [context, exemplar, _map_image(labels[b, k], tile), _map_image(probs[b, k], tile)]
        for col, image in enumerate(tiles):
            grid.paste(image, (col * tile, top))
    return grid


@torch.no_grad()
def visualize_model(
    model, pixel_values: torch.Tensor, path: str | None, seed: int = 0, max_rows: int = 8
) -> Image.Image:
    """Runs the model on fixed views with a seeded generator; returns the grid and writes it as a PNG to `path`
    (unless None)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    generator = torch.Generator(device="cpu").manual_seed(seed)
    outputs = model(pixel_values.to(device), generator=generator, return_loss=False)
    if was_training:
        model.train()
    grid = render_correlation_grid(outputs, model.config.image_mean, model.config.image_std, max_rows=max_rows)
    if path is not None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        grid.save(path)
    return grid


# The training callback and its helpers moved to the training side; their old names here work for one release.
__getattr__ = moved_attributes(
    __name__,
    dict.fromkeys(
        (
            "VisualizationCallback",
            "integrations_on",
            "log_figure_to_integrations",
            "FIGURE_KEY",
            "AUTO_FIGURES_PER_RUN",
        ),
        "transformers_cim.training.visualization_callback",
    ),
)

__all__ = [
    "box_corners",
    "denormalize",
    "render_correlation_grid",
    "visualize_model",
]
