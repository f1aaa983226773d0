"""Gradient (activation) checkpointing for the stages of a stock transformers `ResNetModel`, which has none.

:func:`make_stages_checkpointable` gives each stage of a ResNet encoder the `gradient_checkpointing` flag that
`PreTrainedModel.gradient_checkpointing_enable` sets, by switching the stage to a subclass of `ResNetStage` with the
same parameters and weight names (checkpoints load and save unchanged). A flagged stage in training mode runs under
`torch.utils.checkpoint`: its activations are dropped after the forward pass and recomputed in the backward pass.

The recomputation runs the stage's BatchNorm layers a second time in training mode. They normalise with the same
batch statistics, so outputs and gradients are unchanged, but they would also update their running statistics (and
`num_batches_tracked`) a second time; the recomputation therefore puts them back as it found them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from transformers import ResNetModel
from transformers.models.resnet.modeling_resnet import ResNetStage


@contextlib.contextmanager
def running_stats_kept(module: nn.Module) -> Iterator[None]:
    """On leaving the block, the BatchNorm buffers of `module` (running mean and variance, batch count) hold the
    values they had on entering it, whatever the forward passes inside did to them."""
    buffers = [
        buffer
        for norm in module.modules()
        if isinstance(norm, nn.modules.batchnorm._BatchNorm)
        for buffer in norm.buffers()
    ]
    saved = [buffer.clone() for buffer in buffers]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in zip(buffers, saved):
                buffer.copy_(value)


class CheckpointedResNetStage(ResNetStage):
    """A `ResNetStage` that runs under the model's checkpointing function when its `gradient_checkpointing` is on."""

    gradient_checkpointing = False

    def _contexts(self) -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
        return contextlib.nullcontext(), running_stats_kept(self)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return self._gradient_checkpointing_func(super().forward, input, context_fn=self._contexts)
        return super().forward(input)


def make_stages_checkpointable(encoder: ResNetModel) -> None:
    """Switch every stage of `encoder` to `CheckpointedResNetStage` (in place; weights and names unchanged)."""
    for stage in encoder.encoder.stages:
        if type(stage) is ResNetStage:
            stage.__class__ = CheckpointedResNetStage


__all__ = ["CheckpointedResNetStage", "make_stages_checkpointable", "running_stats_kept"]
