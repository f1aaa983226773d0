"""Figure-5-style pictures of the pretext task: context with the exemplar's outline, the exemplar, the true
map and the predicted map, one row per (image, exemplar), written as a PNG and sent to the run's experiment
trackers (TensorBoard, Weights & Biases, MLflow)."""

from __future__ import annotations

import logging
import math
import os

import numpy as np
import torch
from PIL import Image, ImageDraw
from transformers import Trainer, TrainerCallback

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


def render_correlation_grid(outputs, mean: list[float], std: list[float], max_rows: int = 8, tile: int = 160) -> Image.Image:
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
def visualize_model(model, pixel_values: torch.Tensor, path: str | None, seed: int = 0,
                    max_rows: int = 8) -> Image.Image:
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


FIGURE_KEY = "pretext/correlation_maps"
AUTO_FIGURES_PER_RUN = 10


def log_figure_to_integrations(callbacks, grid: Image.Image, step: int) -> list[str]:
    """Sends the figure to the experiment trackers among the Trainer's callbacks that take images (TensorBoard,
    Weights & Biases, MLflow); returns their names. A tracker that fails is warned about, never fatal."""
    sent = []
    for callback in callbacks:
        name = type(callback).__name__
        try:
            if getattr(callback, "tb_writer", None) is not None:
                callback.tb_writer.add_image(FIGURE_KEY, np.asarray(grid), step, dataformats="HWC")
                callback.tb_writer.flush()
            elif getattr(callback, "_wandb", None) is not None and getattr(callback, "_initialized", False):
                callback._wandb.log({FIGURE_KEY: callback._wandb.Image(grid), "train/global_step": step})
            elif getattr(callback, "_ml_flow", None) is not None and getattr(callback, "_initialized", False):
                callback._ml_flow.log_image(grid, key=FIGURE_KEY.replace("/", "_"), step=step)
            else:
                continue
        except Exception as err:  # noqa: BLE001 - a figure must never stop a training run
            logger.warning("Could not send the correlation-map figure to %s: %s", name, err)
            continue
        sent.append(name)
    return sent


def integrations_on(args) -> bool:
    """Whether the run reports to any experiment tracker (`--report_to` other than none)."""
    report_to = args.report_to
    if report_to is None:
        return False
    report_to = [report_to] if isinstance(report_to, str) else list(report_to)
    return any(r not in ("none", "") for r in report_to)


class VisualizationCallback(TrainerCallback):
    """The correlation-map figure: `correlation_maps.png` in the output dir at the end of training, and to the
    experiment trackers of `trainer` (TensorBoard, Weights & Biases, MLflow: `--report_to`) at the end and every
    `every_steps` optimizer steps.

    `every_steps` > 0 also writes `correlation_maps_step{N}.png` each time; 0 only the end; None (the default) sends
    the figure to the trackers about `AUTO_FIGURES_PER_RUN` times per run when any is on, writing no extra files.
    The end-of-run figure is made at the last optimizer step, while the trackers are still open (they close in their
    own `on_train_end`). Add the callback with `trainer.add_callback`."""

    def __init__(self, pixel_values: torch.Tensor, every_steps: int | None = None,
                 filename: str = "correlation_maps.png", trainer: Trainer | None = None):
        self.pixel_values = pixel_values
        self.every_steps = every_steps
        self.filename = filename
        self.trainer = trainer
        self._interval = every_steps or 0
        self._final_step: int | None = None

    def _write(self, args, state, model, name: str | None) -> None:
        if not state.is_world_process_zero:
            return
        from .training.trainer import unwrap_cim

        path = os.path.join(args.output_dir, name) if name else None
        grid = visualize_model(unwrap_cim(model), self.pixel_values, path)
        if self.trainer is not None:
            log_figure_to_integrations(self.trainer.callback_handler.callbacks, grid, state.global_step)

    def on_train_begin(self, args, state, control, **kwargs):
        if self.every_steps is None:
            auto = integrations_on(args) and state.max_steps > 0
            self._interval = max(1, math.ceil(state.max_steps / AUTO_FIGURES_PER_RUN)) if auto else 0
        self._final_step = None
        return control

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if control.should_training_stop or state.global_step >= state.max_steps:
            self._write(args, state, model, self.filename)  # the last step: trackers still open
            self._final_step = state.global_step
        elif self._interval > 0 and state.global_step % self._interval == 0:
            self._write(args, state, model, f"correlation_maps_step{state.global_step}.png"
                        if self.every_steps else None)
        return control

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self._final_step != state.global_step:  # training ended some other way: the file at least
            self._write(args, state, model, self.filename)
        return control


__all__ = ["VisualizationCallback", "box_corners", "integrations_on", "log_figure_to_integrations",
           "render_correlation_grid", "visualize_model"]
