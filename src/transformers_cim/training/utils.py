"""What the pre-training and fine-tuning trainers share, so that neither depends on the other.

- `StepGenerators`: random generators that are a pure function of (seed, step, micro-batch, process), so a resumed
  run draws what the uninterrupted one drew.
- `EpochToDatasetCallback`: tells a seeded map-style training set which pass is starting.
- `fetch_batches_per_process`: every process reads its own batches instead of accelerate's main-process dispatch.
- `SkippedImages`: the training images the data pipeline could not use, each counted once, the first few logged.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.utils import logging

from .seeding import seed_from_key

logger = logging.get_logger(__name__)


class StepGenerators:
    """`torch.Generator`s that are a pure function of (seed, global step, micro-batch of the step, process).

    Random draws made in the training step (CIM's exemplars, Mixup/CutMix) then do not depend on how much the
    global RNG was used before, so a run resumed from a checkpoint draws exactly what the uninterrupted run drew."""

    def __init__(self, seed: int, process_index: int = 0) -> None:
        self.seed, self.process_index = seed, process_index
        self._step, self._micro = -1, 0

    def next_seed(self, global_step: int) -> int:
        """The seed of the next micro-batch of ``global_step`` (what `next` seeds its generator with)."""
        if global_step != self._step:
            self._step, self._micro = global_step, 0
        seed = seed_from_key(self.seed, self._step, self._micro, self.process_index)
        self._micro += 1
        return seed

    def next(self, global_step: int, device: torch.device | str = "cpu") -> torch.Generator:
        return torch.Generator(device=device).manual_seed(self.next_seed(global_step))


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


class SkippedImages:
    """The training images the data pipeline could not use (undecodable, too small, no label), each counted once
    however often it is met (every epoch meets it again): by its file name, row or stream record
    (`SkippingCollator`'s ``skipped_images``); one without any name is counted each time. The first `log_first`
    (per process) are logged at warning level with the reason.

    `add` takes a batch's list and needs no device sync; `total` is collective under distributed training (every
    process calls it: the names met since the last call are exchanged, so an image met by two processes counts once).
    The state travels with each checkpoint (`save` / `load`, one file per process)."""

    LOG_FIRST = 5

    def __init__(self, log_first: int = LOG_FIRST) -> None:
        self.log_first = log_first
        self.own: set[str] = set()  # the names this process met
        self.names: set[str] = set()  # every process's, as of the last `total`, plus this one's since
        self.unnamed = 0  # this process's skips of images without a name
        self._unnamed_others = 0
        self._new: list[str] = []  # this process's names not yet exchanged
        self._logged = 0

    def add(self, skipped: Iterable[tuple[str | None, str]] | None) -> None:
        for name, reason in skipped or ():
            if name is None:
                self.unnamed += 1
            elif name in self.own:
                continue
            else:
                self.own.add(name)
                if name not in self.names:
                    self.names.add(name)
                    self._new.append(name)
            if self._logged < self.log_first:
                self._logged += 1
                more = " (further skipped images are counted, not logged)" if self._logged == self.log_first else ""
                logger.warning(f"Skipped training image {name or '(no file name or row)'}: {reason}{more}")

    @property
    def local_count(self) -> int:
        """Distinct images this process skipped (no communication)."""
        return len(self.own) + self.unnamed

    def total(self, accelerator=None) -> int:
        """Distinct images skipped by all processes together (collective when there are several)."""
        if accelerator is None or accelerator.num_processes == 1:
            return len(self.names) + self.unnamed
        from accelerate.utils import gather_object

        gathered = gather_object([(self._new, self.unnamed)])
        self._new = []
        for names, _ in gathered:
            self.names.update(names)
        self._unnamed_others = sum(unnamed for _, unnamed in gathered) - self.unnamed
        return len(self.names) + self.unnamed + self._unnamed_others

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump({"num_skipped_images": self.local_count, "names": sorted(self.own), "unnamed": self.unnamed}, f)

    def load(self, path: str) -> None:
        """Restores a state saved by `save` (or by an older version, which kept a count only)."""
        self.__init__(self.log_first)
        if not os.path.isfile(path):
            return
        with open(path) as f:
            state = json.load(f)
        if "names" in state:
            self.own, self.names, self.unnamed = set(state["names"]), set(state["names"]), int(state["unnamed"])
            self._new = sorted(self.names)  # exchanged at the next `total` (the other processes load their own)
        else:
            self.unnamed = int(state["num_skipped_images"])


__all__ = ["EpochToDatasetCallback", "SkippedImages", "StepGenerators", "fetch_batches_per_process"]
