"""CIM pre-training with the `transformers` Trainer: `CIMTrainer`, the EMA momentum callback and metrics.

- `MomentumCallback` updates the target encoder after every optimizer step (never per micro-batch) with a
  cosine momentum that is a pure function of `global_step / max_steps`, so a resumed run continues exactly.
- `CIMTrainer.compute_loss` drops the images the data pipeline could not decode (counting them), stops on
  a non-finite loss before it can reach the weights, and accumulates the pretext IoU that is logged with the
  loss and the momentum every `logging_steps`.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import Trainer, TrainerCallback

from .modeling_cim import CIMForPreTraining


class NonFiniteLossError(RuntimeError):
    """Raised when the pre-training loss becomes NaN or infinite."""


def cosine_momentum(step: int, max_steps: int, start: float, end: float) -> float:
    """EMA momentum after `step` of `max_steps` optimizer steps: start at step 0, end at max_steps (cosine)."""
    progress = min(max(step / max(max_steps, 1), 0.0), 1.0)
    return end - (end - start) * (math.cos(math.pi * progress) + 1.0) / 2.0


def correlation_iou(logits: torch.Tensor, labels: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Mean IoU between predicted maps (sigmoid(logits) > threshold) and true maps, over all B*K maps."""
    predicted = logits.detach().float().sigmoid() > threshold
    truth = labels.detach() > 0.5
    intersection = (predicted & truth).flatten(-2).sum(-1).float()
    union = (predicted | truth).flatten(-2).sum(-1).float()
    return torch.where(union > 0, intersection / union.clamp(min=1), torch.ones_like(union)).mean()


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


class _MetricAccumulator:
    """Running sums of a few scalars between two log events (kept on device to avoid syncs)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, torch.Tensor | float] = {}
        self.counts: dict[str, int] = {}

    def add(self, name: str, value: torch.Tensor | float) -> None:
        value = value.detach() if isinstance(value, torch.Tensor) else value
        self.sums[name] = self.sums.get(name, 0.0) + value
        self.counts[name] = self.counts.get(name, 0) + 1

    def means(self) -> dict[str, float]:
        return {k: float(v) / self.counts[k] for k, v in self.sums.items()}


class CIMTrainer(Trainer):
    """`Trainer` for `CIMForPreTraining`: momentum updates, skipped-image counting, pretext metrics."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not any(isinstance(cb, MomentumCallback) for cb in self.callback_handler.callbacks):
            self.add_callback(MomentumCallback())
        self.num_skipped_images = 0
        self._train_metrics = _MetricAccumulator()
        self._eval_metrics = _MetricAccumulator()

    @property
    def momentum_callback(self) -> MomentumCallback:
        return next(cb for cb in self.callback_handler.callbacks if isinstance(cb, MomentumCallback))

    def get_decay_parameter_names(self, model: nn.Module) -> list[str]:
        """Weight decay on matrices and conv kernels only: not on norms, biases, CLS/position tokens."""
        return [
            name for name, param in model.named_parameters()
            if param.ndim >= 2 and "cls_token" not in name and "position_embeddings" not in name
        ]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        skipped = inputs.pop("num_skipped", None)
        inputs.pop("labels", None)
        if skipped is not None and model.training:
            self.num_skipped_images += int(skipped.sum()) if isinstance(skipped, torch.Tensor) else int(skipped)
        if inputs["pixel_values"].shape[0] == 0:  # every image of this batch was undecodable
            zero = sum(p.sum() for p in model.parameters() if p.requires_grad) * 0.0
            return (zero, None) if return_outputs else zero
        outputs = model(**inputs, return_loss=True)
        loss = outputs.loss
        if model.training and not torch.isfinite(loss.detach()).item():
            raise NonFiniteLossError(
                f"The loss became {loss.item()} at step {self.state.global_step}; training stopped before it could "
                "reach the weights. The last saved checkpoint is intact: lower the learning rate (or use bf16 "
                "instead of fp16, or a smaller max_grad_norm) and resume from it with --resume_from_checkpoint."
            )
        metrics = self._train_metrics if model.training else self._eval_metrics
        metrics.add("pretext_iou", correlation_iou(outputs.logits, outputs.correlation_labels))
        if outputs.contrastive_loss is not None:
            metrics.add("correlation_loss", outputs.correlation_loss)
            metrics.add("contrastive_loss", outputs.contrastive_loss)
        return (loss, outputs) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def evaluate(self, *args, **kwargs):
        self._eval_metrics.reset()
        return super().evaluate(*args, **kwargs)

    def create_model_card(self, *args, **kwargs):
        """Keeps the CIM model card written by the pre-training script instead of the generic one."""
        if getattr(self, "model_card_written", False):
            return None
        return super().create_model_card(*args, **kwargs)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            logs.update({k: round(v, 4) for k, v in self._train_metrics.means().items()})
            self._train_metrics.reset()
            if self.momentum_callback.last_momentum is not None:
                logs["momentum"] = round(self.momentum_callback.last_momentum, 6)
            logs["skipped_images"] = self.num_skipped_images
        if "eval_loss" in logs:
            logs.update({f"eval_{k}": round(v, 4) for k, v in self._eval_metrics.means().items()})
        super().log(logs, start_time)


__all__ = ["CIMTrainer", "MomentumCallback", "NonFiniteLossError", "correlation_iou", "cosine_momentum"]
