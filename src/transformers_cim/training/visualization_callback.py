"""Sends the pretext-task figures of :mod:`transformers_cim.visualization` to the run during training: a
``TrainerCallback`` that draws them every so many steps (and at the end) into the output directory and to the
experiment trackers (TensorBoard, Weights & Biases, MLflow) among the Trainer's callbacks."""

from __future__ import annotations

import logging
import math
import os

import numpy as np
import torch
from PIL import Image
from transformers import Trainer, TrainerCallback

from ..visualization import visualize_model
from .trainer import unwrap_cim

logger = logging.getLogger(__name__)

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

    def __init__(
        self,
        pixel_values: torch.Tensor,
        every_steps: int | None = None,
        filename: str = "correlation_maps.png",
        trainer: Trainer | None = None,
    ):
        self.pixel_values = pixel_values
        self.every_steps = every_steps
        self.filename = filename
        self.trainer = trainer
        self._interval = every_steps or 0
        self._final_step: int | None = None

    def _write(self, args, state, model, name: str | None) -> None:
        if not state.is_world_process_zero:
            return
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
            self._write(
                args, state, model, f"correlation_maps_step{state.global_step}.png" if self.every_steps else None
            )
        return control

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self._final_step != state.global_step:  # training ended some other way: the file at least
            self._write(args, state, model, self.filename)
        return control


__all__ = [
    "AUTO_FIGURES_PER_RUN",
    "FIGURE_KEY",
    "VisualizationCallback",
    "integrations_on",
    "log_figure_to_integrations",
]
