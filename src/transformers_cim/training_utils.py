"""What the pre-training and fine-tuning trainers share, so that neither depends on the other.

- `StepGenerators`: random generators that are a pure function of (seed, step, micro-batch, process), so a resumed
  run draws what the uninterrupted one drew.
- `EpochToDatasetCallback`: tells a seeded map-style training set which pass is starting.
- `fetch_batches_per_process`: every process reads its own batches instead of accelerate's main-process dispatch.
"""

from __future__ import annotations

import math

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from .seeding import torch_generator


class StepGenerators:
    """`torch.Generator`s that are a pure function of (seed, global step, micro-batch of the step, process).

    Random draws made in the training step (CIM's exemplars, Mixup/CutMix) then do not depend on how much the
    global RNG was used before, so a run resumed from a checkpoint draws exactly what the uninterrupted run drew."""

    def __init__(self, seed: int, process_index: int = 0) -> None:
        self.seed, self.process_index = seed, process_index
        self._step, self._micro = -1, 0

    def next(self, global_step: int, device: torch.device | str = "cpu") -> torch.Generator:
        if global_step != self._step:
            self._step, self._micro = global_step, 0
        generator = torch_generator(self.seed, self._step, self._micro, self.process_index, device=device)
        self._micro += 1
        return generator


class EpochToDatasetCallback(TrainerCallback):
    """Tells a map-style training set with `set_epoch` (e.g. `SeededImageDataset`) which pass is starting, before
    the pass's data-loader iterator (and its workers) is created. accelerate forwards the epoch to the dataset only
    in some sampler set-ups; a stream counts its own passes and is left alone."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer

    def on_epoch_begin(self, args, state, control, **kwargs):
        dataset = self.trainer.train_dataset
        if hasattr(dataset, "set_epoch") and not isinstance(dataset, torch.utils.data.IterableDataset):
            dataset.set_epoch(int(math.floor(state.epoch or 0)))
        return control


def fetch_batches_per_process(args: TrainingArguments, *, keep_explicit_choice: bool = False) -> None:
    """Sets ``accelerator_config.dispatch_batches = False``: every process fetches its own batches.

    accelerate's default for an IterableDataset (the main process reads each batch and dispatches it) cannot carry
    the variable-size batches `SkippingCollator` makes when it drops undecodable images. With
    `keep_explicit_choice`, a value the user set (True or False) is left as it is; only the default (None) changes."""
    if keep_explicit_choice and args.accelerator_config.dispatch_batches is not None:
        return
    args.accelerator_config.dispatch_batches = False


__all__ = ["EpochToDatasetCallback", "StepGenerators", "fetch_batches_per_process"]
