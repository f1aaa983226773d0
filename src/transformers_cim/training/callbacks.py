"""The callbacks of CIM pre-training, each a pure function of the optimizer step so a resumed run continues exactly.

- `MomentumCallback` updates the target encoder after every optimizer step (never per micro-batch) with a cosine
  momentum of `global_step / max_steps`.
- `AugmentationRampCallback` sets the exemplar photometric augmentation's strength before every optimizer step.
- `SaveOnSignalCallback` turns SIGTERM (what schedulers and `kill` send before a hard kill) into a checkpoint at the
  end of the current optimizer step, then a clean stop.
"""

from __future__ import annotations

import math
import signal
import threading

import torch
from torch import nn
from transformers import TrainerCallback

from ..modeling_cim import CIMForPreTraining
from ..pretext import augmentation_ramp


def cosine_momentum(step: int, max_steps: int, start: float, end: float) -> float:
    """EMA momentum after `step` of `max_steps` optimizer steps: start at step 0, end at max_steps (cosine)."""
    progress = min(max(step / max(max_steps, 1), 0.0), 1.0)
    return end - (end - start) * (math.cos(math.pi * progress) + 1.0) / 2.0


def unwrap_cim(model: nn.Module) -> CIMForPreTraining:
    """The CIM model inside DDP / compile wrappers."""
    while not isinstance(model, CIMForPreTraining):
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            raise TypeError(f"Expected a CIMForPreTraining model, got {type(model).__name__}.")
        model = inner
    return model


class MomentumCallback(TrainerCallback):
    """target <- m * target + (1 - m) * online after each optimizer step, m = cosine(global_step / max_steps)."""

    def __init__(self) -> None:
        self.last_momentum: float | None = None

    def momentum_at(self, step: int, max_steps: int, model: CIMForPreTraining) -> float:
        return cosine_momentum(step, max_steps, model.config.momentum_start, model.config.momentum_end)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        cim = unwrap_cim(model)
        # global_step was just incremented: the update after optimizer step s uses m(s - 1)
        self.last_momentum = self.momentum_at(state.global_step - 1, state.max_steps, cim)
        cim.momentum_update(self.last_momentum)
        return control


class AugmentationRampCallback(TrainerCallback):
    """Sets the exemplar photometric augmentation's strength before every optimizer step: a linear ramp from off to
    the recipe's between the fractions `exemplar_augmentation_ramp` of `max_steps` (`augmentation_ramp`), a pure
    function of the step so that a resumed run continues exactly; the full recipe again once training ends."""

    def __init__(self) -> None:
        self.last_strength: float | None = None

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        cim = unwrap_cim(model)
        self.last_strength = augmentation_ramp(
            state.global_step, state.max_steps, cim.config.exemplar_augmentation_ramp
        )
        cim.augmentation_strength.fill_(self.last_strength)
        return control

    def on_train_end(self, args, state, control, model=None, **kwargs):
        unwrap_cim(model).augmentation_strength.fill_(1.0)
        return control


class SaveOnSignalCallback(TrainerCallback):
    """Saves a checkpoint after the current optimizer step and stops training when the process receives one of
    `signals` (SIGTERM by default). Under distributed training every rank stops at the same step as soon as any
    rank got the signal (one small all-reduce per step), so no rank waits forever for the others."""

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM,)) -> None:
        self.signals = signals
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def on_train_begin(self, args, state, control, **kwargs):
        if threading.current_thread() is threading.main_thread():  # Python only lets the main thread set handlers
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return control

    def on_train_end(self, args, state, control, **kwargs):
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}
        return control

    def _any_rank_received(self, args) -> bool:
        received = self.received is not None
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            flag = torch.tensor([int(received)], device=args.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            received = bool(flag.item())
        return received

    def on_step_end(self, args, state, control, **kwargs):
        if self._any_rank_received(args):
            if self.received is None:
                self.received = signal.SIGTERM  # another rank got it
            control.should_save = True
            control.should_training_stop = True
        return control


__all__ = ["AugmentationRampCallback", "MomentumCallback", "SaveOnSignalCallback", "cosine_momentum", "unwrap_cim"]
