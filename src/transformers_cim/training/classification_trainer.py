"""The ``Trainer`` of fine-tuning: :class:`ClassificationTrainer` uses the layer-decay optimizer
(:mod:`~transformers_cim.training.layer_decay`) and, during training only, Mixup / CutMix / label smoothing with a
soft-target cross-entropy (:mod:`~transformers_cim.training.mixup`)."""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn
from transformers import Trainer
from transformers.utils import logging

from ..checkpoint_loading import (
    load_weights_strictly,
    loads_through_from_pretrained,
)
from ..hub_card import has_cim_card
from .layer_decay import param_groups_layer_decay
from .mixup import mixup_cutmix, soft_target_cross_entropy
from .utils import EpochToDatasetCallback, SkippedImages, StepGenerators

logger = logging.get_logger(__name__)


class ClassificationTrainer(Trainer):
    """``Trainer`` with a layer-decay AdamW optimizer and training-time Mixup / CutMix / label smoothing.

    Extra keyword arguments: ``layer_decay`` (1.0 = off), ``mixup_alpha``, ``cutmix_alpha`` (0 = off),
    ``label_smoothing`` (default: ``args.label_smoothing_factor``, the Trainer's flag), ``mix_seed`` (Mixup / CutMix
    draws come from
    a generator per (seed, step, micro-batch), so a resumed run mixes as the uninterrupted one did; default: the
    global torch RNG). Evaluation always uses the
    plain cross-entropy of the model. The collator's ``num_skipped`` / ``skipped_images`` entries (images it dropped)
    are removed before the forward pass; the training images among them are counted once each in
    ``self.skipped_images`` (see `SkippedImages`), which travels with the checkpoints.
    """

    def __init__(
        self,
        *args: Any,
        layer_decay: float = 1.0,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        label_smoothing: float | None = None,
        mix_seed: int | None = None,
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        self.layer_decay = float(layer_decay)
        self.mixup_alpha = float(mixup_alpha)
        self.cutmix_alpha = float(cutmix_alpha)
        self.label_smoothing = float(self.args.label_smoothing_factor if label_smoothing is None else label_smoothing)
        # we apply label smoothing ourselves, during training only
        self.label_smoother = None
        # Mixup/CutMix draws per (seed, step, micro-batch): a resumed run mixes as the uninterrupted one did
        self._mix_generators = StepGenerators(mix_seed, self.args.process_index) if mix_seed is not None else None
        self.add_callback(EpochToDatasetCallback(self))
        self.skipped_images = SkippedImages()

    @property
    def num_skipped_images(self) -> int:
        """Distinct training images this process's collator dropped (`total_skipped_images`: all processes')."""
        return self.skipped_images.local_count

    def total_skipped_images(self) -> int:
        """Distinct training images dropped by all processes together (collective under distributed training)."""
        return self.skipped_images.total(self.accelerator)

    def _skipped_images_file(self, checkpoint: str) -> str:
        return os.path.join(checkpoint, f"skipped_images_{self.args.process_index}.json")

    def _save_rng_state(self, output_dir: str) -> None:
        super()._save_rng_state(output_dir)
        self.skipped_images.save(self._skipped_images_file(output_dir))  # before trainer_state.json, like the RNG

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any):
        self.skipped_images = SkippedImages()
        if isinstance(resume_from_checkpoint, str):
            self.skipped_images.load(self._skipped_images_file(resume_from_checkpoint))
        return super().train(resume_from_checkpoint, *args, **kwargs)

    @property
    def uses_soft_targets(self) -> bool:
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0 or self.label_smoothing > 0

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        opt_model = self.model if model is None else model
        if self.optimizer is None:
            groups = param_groups_layer_decay(
                opt_model, self.args.weight_decay, self.layer_decay, self.args.learning_rate
            )
            if self.optimizer_cls_and_kwargs is not None:
                optimizer_cls, optimizer_kwargs = self.optimizer_cls_and_kwargs
            else:
                optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
            optimizer_kwargs = {k: v for k, v in optimizer_kwargs.items() if k not in ("params", "model")}
            self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        model = model if model is not None else self.model
        if (
            not loads_through_from_pretrained(model, resume_from_checkpoint)
            or self.is_deepspeed_enabled
            or self.is_fsdp_enabled
        ):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        load_weights_strictly(model, resume_from_checkpoint)

    def create_model_card(self, *args: Any, **kwargs: Any) -> None:
        """Keeps the card `run_image_classification.py` wrote (what the model was fine-tuned from, the recipe, the
        results): `push_to_hub` would write the Trainer's generic card over it."""
        if has_cim_card(self.args.output_dir):
            return None
        return super().create_model_card(*args, **kwargs)

    def _load_best_model(self) -> None:
        checkpoint = self.state.best_model_checkpoint
        if (
            not loads_through_from_pretrained(self.model, checkpoint)
            or self.is_deepspeed_enabled
            or self.is_fsdp_enabled
        ):
            return super()._load_best_model()
        load_weights_strictly(self.model, checkpoint)

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        inputs = dict(inputs)
        inputs.pop("num_skipped", None)
        skipped = inputs.pop("skipped_images", None)
        if skipped and model.training:
            self.skipped_images.add(skipped)
        inputs.pop("cim_valid", None)
        if not (model.training and self.uses_soft_targets and inputs.get("labels") is not None):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

        labels = inputs.pop("labels")
        num_labels = self.accelerator.unwrap_model(model).config.num_labels
        pixel_values, targets = mixup_cutmix(
            inputs["pixel_values"],
            labels,
            num_labels,
            self.mixup_alpha,
            self.cutmix_alpha,
            self.label_smoothing,
            generator=self._mix_generators.next(self.state.global_step) if self._mix_generators else None,
        )
        inputs["pixel_values"] = pixel_values
        outputs = model(**inputs)
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        if self.model_accepts_loss_kwargs and num_items_in_batch is not None:
            # The Trainer will not divide by the accumulation steps: normalise over the accumulated batch.
            loss = soft_target_cross_entropy(logits, targets, reduction="sum") / num_items_in_batch
            if self.args.average_tokens_across_devices:
                loss = loss * self.accelerator.num_processes
        else:
            loss = soft_target_cross_entropy(logits, targets)
        return (loss, outputs) if return_outputs else loss


__all__ = [
    "ClassificationTrainer",
]
