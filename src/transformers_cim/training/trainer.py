"""CIM pre-training with the `transformers` Trainer: `CIMTrainer` and its pretext metrics.

- `CIMTrainer` adds the EMA momentum and augmentation-ramp callbacks (`callbacks.py`, re-exported here).
- `CIMTrainer.compute_loss` drops the images the data pipeline could not decode (counting them), stops on
  a non-finite loss before it can reach the weights, and accumulates the pretext IoU that is logged with the
  loss, the momentum and the augmentation strength every `logging_steps`.
- With a `ResumableImageStream` as training data, every checkpoint also holds where each reader of the stream
  was after the last batch trained on, and resuming continues the stream from there (no replay, no skip).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Iterator

import torch
from accelerate.data_loader import DataLoaderShard
from torch import nn
from transformers import Trainer, TrainerCallback
from transformers.utils import logging

from ..checkpoint_loading import load_weights_strictly, loads_through_from_pretrained
from ..hub_card import has_cim_card
from ..pretext_metrics import correlation_iou, correlation_prior, prior_metrics
from .callbacks import (  # re-exported: the trainer's public API since the first release
    AugmentationRampCallback,
    MomentumCallback,
    SaveOnSignalCallback,
    cosine_momentum,
    unwrap_cim,
)
from .checkpoints import CHECKPOINT_COMPLETE_MARKER, checkpoint_to_resume
from .streaming import STREAM_STATE_KEY, ResumableImageStream, StreamPosition
from .utils import EpochToDatasetCallback, SkippedImages, StepGenerators, fetch_batches_per_process

logger = logging.get_logger(__name__)


class NonFiniteLossError(RuntimeError):
    """Raised when the pre-training loss becomes NaN or infinite."""


class _ResumedStreamEpoch(TrainerCallback):
    """Keeps `state.epoch` of a resumed stream equal to the uninterrupted run's.

    For a stream the Trainer counts `state.epoch` as (loop epoch) + (steps into it) / max_steps. Resuming without its
    batch replay restarts both counts, so the checkpoint's epoch is added back: all of it in the resumed pass, its
    whole passes once the next pass has begun."""

    def __init__(self, checkpoint_epoch: float) -> None:
        self.checkpoint_epoch = checkpoint_epoch
        self.passes_since_resume = -1

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.passes_since_resume += 1
        return control

    def on_step_end(self, args, state, control, **kwargs):
        if self.passes_since_resume == 0:
            state.epoch += self.checkpoint_epoch
        else:
            state.epoch += math.floor(self.checkpoint_epoch)
        return control


PREDICTOR_PARAMETERS = ("decoder.predictor.weight", "decoder.predictor.bias")


def split_predictor_groups(optimizer: torch.optim.Optimizer, model: nn.Module, scale: float) -> None:
    """Moves the decoder predictor's parameters out of each optimizer group into a copy of that group with `scale` x
    its learning rate (and its `lr_scale`) and its weight decay / `scale` (so the decay per step, lr x wd, is
    unchanged)."""
    predictor = {id(p) for name, p in model.named_parameters() if name.endswith(PREDICTOR_PARAMETERS)}
    for group in list(optimizer.param_groups):
        moved = [p for p in group["params"] if id(p) in predictor]
        if not moved:
            continue
        group["params"] = [p for p in group["params"] if id(p) not in predictor]
        settings = {key: value for key, value in group.items() if key != "params"}
        # `lr_scale` too, for loops that set each group's lr from a schedule as lr x lr_scale
        lr_scale = group.get("lr_scale", 1.0) * scale
        settings.update(lr=group["lr"] * scale, weight_decay=group["weight_decay"] / scale, lr_scale=lr_scale)
        optimizer.add_param_group({**settings, "params": moved})


def with_prior_gains(metrics: dict[str, float]) -> dict[str, float]:
    """Adds the gains over the constant prior: `pretext_iou_gain` (IoU minus the prior's IoU) and
    `loss_to_prior` (correlation loss / the prior's loss; under 1 means the model beats the prior)."""
    if "pretext_iou" in metrics and "prior_iou" in metrics:
        metrics["pretext_iou_gain"] = round(metrics["pretext_iou"] - metrics["prior_iou"], 4)
    if metrics.get("prior_loss") and "correlation_loss" in metrics:
        metrics["loss_to_prior"] = round(metrics["correlation_loss"] / metrics["prior_loss"], 4)
    return metrics


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
        training_args = kwargs.get("args", args[1] if len(args) > 1 else None)
        if training_args is not None:
            fetch_batches_per_process(training_args, keep_explicit_choice=True)
        super().__init__(*args, **kwargs)
        for callback in (MomentumCallback, AugmentationRampCallback):
            if not any(isinstance(cb, callback) for cb in self.callback_handler.callbacks):
                self.add_callback(callback())
        self.add_callback(EpochToDatasetCallback(self))
        self.skipped_images = SkippedImages()
        self._train_metrics = _MetricAccumulator()
        self._eval_metrics = _MetricAccumulator()
        self._pretext_generators = StepGenerators(self.args.seed, self.args.process_index)
        self.stream_position = StreamPosition()

    def pretext_generator(self, device: torch.device) -> torch.Generator:
        """The generator of one training micro-batch's exemplar sampling (see `StepGenerators`): the global RNG is
        also drawn by the data pipeline, and the data loader prefetches across a checkpoint."""
        return self._pretext_generators.next(self.state.global_step, device)

    @contextlib.contextmanager
    def compiled_pretext_rng(self, device: torch.device) -> Iterator[None]:
        """Under ``--torch_compile``: dynamo cannot trace a `torch.Generator` argument, so the compiled step samples
        its exemplars from the global RNG, seeded here with the seed `pretext_generator` would use (a pure function
        of seed, step, micro-batch and process: resumes stay exact) and restored afterwards, so that the data
        pipeline's draws are the same as in an eager run."""
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(self._pretext_generators.next_seed(self.state.global_step))
            yield

    def correlation_prior(self, config, device: torch.device) -> torch.Tensor:
        """The best constant map under the run's own box distribution, estimated once (seeded by the run's seed) and
        kept on the device the maps are on."""
        prior = getattr(self, "_correlation_prior", None)
        if prior is None:
            prior = correlation_prior(config, generator=torch.Generator().manual_seed(self.args.seed))
        self._correlation_prior = prior.to(device)
        return self._correlation_prior

    @property
    def num_skipped_images(self) -> int:
        """Distinct training images this process skipped (see `SkippedImages`; `total_skipped_images`: all)."""
        return self.skipped_images.local_count

    def total_skipped_images(self) -> int:
        """Distinct training images skipped by all processes together, each counted once however often it was met.
        Collective: under distributed training every process must call it."""
        return self.skipped_images.total(self.accelerator)

    @property
    def momentum_callback(self) -> MomentumCallback:
        return next(cb for cb in self.callback_handler.callbacks if isinstance(cb, MomentumCallback))

    @property
    def augmentation_callback(self) -> AugmentationRampCallback:
        return next(cb for cb in self.callback_handler.callbacks if isinstance(cb, AugmentationRampCallback))

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        """The Trainer's optimizer, with the decoder's predictor in groups of its own at `decoder_predictor_lr_scale` x
        the learning rate and 1 / that x the weight decay (the authors' two-logit step, see the config)."""
        first = self.optimizer is None
        optimizer = super().create_optimizer(model)
        scale = unwrap_cim(self.model).config.decoder_predictor_lr_scale
        if first and scale != 1.0:
            split_predictor_groups(optimizer, model if model is not None else self.model, scale)
        return optimizer

    def get_decay_parameter_names(self, model: nn.Module) -> list[str]:
        """Weight decay on matrices and conv kernels only: not on norms, biases (the decoder's per-pixel prior bias
        too), CLS/position tokens."""
        return [
            name
            for name, param in model.named_parameters()
            if param.ndim >= 2 and not any(key in name for key in ("cls_token", "position_embeddings", "prior_bias"))
        ]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        inputs.pop("num_skipped", None)
        skipped = inputs.pop("skipped_images", None)
        snapshot = inputs.pop(STREAM_STATE_KEY, None)
        if snapshot is not None and model.training:
            self.stream_position.update(snapshot)
        inputs.pop("labels", None)
        if skipped and model.training:
            self.skipped_images.add(skipped)
        if inputs["pixel_values"].shape[0] == 0:  # every image of this batch was undecodable
            zero = sum(p.sum() for p in model.parameters() if p.requires_grad) * 0.0
            return (zero, None) if return_outputs else zero
        rng_scope = contextlib.nullcontext()
        if model.training and "generator" not in inputs:
            device = inputs["pixel_values"].device
            if self.args.torch_compile:
                rng_scope = self.compiled_pretext_rng(device)
            else:
                inputs["generator"] = self.pretext_generator(device)
        with rng_scope:
            outputs = model(**inputs, return_loss=True)
        loss = outputs.loss
        if model.training:
            self._check_finite(loss)
        metrics = self._train_metrics if model.training else self._eval_metrics
        metrics.add("pretext_iou", correlation_iou(outputs.logits, outputs.correlation_labels))
        metrics.add("correlation_loss", outputs.correlation_loss.detach())
        config = unwrap_cim(model).config
        labels = outputs.correlation_labels
        prior_loss, prior_iou = prior_metrics(self.correlation_prior(config, labels.device), labels, config)
        metrics.add("prior_loss", prior_loss)
        metrics.add("prior_iou", prior_iou)
        if outputs.contrastive_loss is not None:
            metrics.add("contrastive_loss", outputs.contrastive_loss)
        return (loss, outputs) if return_outputs else loss

    def _check_finite(self, loss: torch.Tensor) -> None:
        """Raises NonFiniteLossError on every process as soon as the loss of any process is NaN or infinite (one
        process raising alone would leave the others waiting for it in the gradient all-reduce)."""
        finite = torch.isfinite(loss.detach()).to(torch.int32)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
        if finite.item():
            return
        where = f"{loss.item()}" if not torch.isfinite(loss.detach()) else "non-finite on another process"
        raise NonFiniteLossError(
            f"The loss became {where} at step {self.state.global_step}; training stopped before it could reach the "
            "weights. The last saved checkpoint is intact: lower the learning rate (or use bf16 instead of fp16, or a "
            "smaller max_grad_norm) and resume from it with --resume_from_checkpoint."
        )

    def _skipped_images_file(self, checkpoint: str) -> str:
        return os.path.join(checkpoint, f"cim_skipped_images_{self.args.process_index}.json")

    def _stream_state_file(self, checkpoint: str) -> str:
        return os.path.join(checkpoint, f"cim_stream_state_{self.args.process_index}.json")

    def _save_rng_state(self, output_dir: str) -> None:
        super()._save_rng_state(output_dir)
        # this process's skipped-image count and stream position travel with the checkpoint like its RNG state
        # (before trainer_state.json, which marks a checkpoint complete)
        self.skipped_images.save(self._skipped_images_file(output_dir))
        stream_state = self.stream_position.state_dict()
        if stream_state is not None:
            with open(self._stream_state_file(output_dir), "w") as f:
                json.dump(stream_state, f)

    def get_train_dataloader(self):
        if not isinstance(self.train_dataset, ResumableImageStream):
            return super().get_train_dataloader()
        # Built here rather than by `accelerator.prepare`, which would wrap the stream in an IterableDatasetShard
        # (every process reading everything): the stream already reads only this process's part. Inputs are moved
        # to the device by the Trainer.
        if self.args.dataloader_persistent_workers:
            logger.warning(
                "dataloader_persistent_workers is ignored for a resumable stream: each pass over it "
                "starts new workers so that they see the pass's epoch."
            )
        params = {
            "batch_size": self._train_batch_size,
            "collate_fn": self.data_collator,
            "num_workers": self.args.dataloader_num_workers,
            "pin_memory": self.args.dataloader_pin_memory,
        }
        if self.args.dataloader_num_workers > 0 and self.args.dataloader_prefetch_factor is not None:
            params["prefetch_factor"] = self.args.dataloader_prefetch_factor
        return DataLoaderShard(self.train_dataset, device=None, **params)

    def _restore_stream(self, checkpoint: str) -> None:
        """Continue a resumable stream where the checkpoint left it, instead of the Trainer's replay of the stream
        from its start (which decodes and drops every batch already trained on)."""
        path = self._stream_state_file(checkpoint)
        if not os.path.isfile(path):
            logger.warning(
                "%s holds no stream position (saved by an older version?): the stream is replayed from its "
                "start and the batches already trained on are dropped.",
                checkpoint,
            )
            return
        with open(path) as f:
            self.train_dataset.load_state_dict(json.load(f))
        self.args.ignore_data_skip = True
        with open(os.path.join(checkpoint, CHECKPOINT_COMPLETE_MARKER)) as f:
            checkpoint_epoch = float(json.load(f).get("epoch") or 0.0)
        for callback in [cb for cb in self.callback_handler.callbacks if isinstance(cb, _ResumedStreamEpoch)]:
            self.remove_callback(callback)
        self.add_callback(_ResumedStreamEpoch(checkpoint_epoch))
        logger.info("Resuming the stream where %s left it.", checkpoint)

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        if resume_from_checkpoint is False:
            resume_from_checkpoint = None
        elif resume_from_checkpoint is True:  # `last`, by the scripts' rule: the newest complete checkpoint
            resume_from_checkpoint = checkpoint_to_resume(self.args.output_dir, True, model=unwrap_cim(self.model))
        checkpoint = resume_from_checkpoint
        self.skipped_images = SkippedImages()
        self.stream_position = StreamPosition()
        if checkpoint:
            self.skipped_images.load(self._skipped_images_file(checkpoint))
        if checkpoint and isinstance(self.train_dataset, ResumableImageStream):
            self._restore_stream(checkpoint)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _loads_through_from_pretrained(self, checkpoint: str | None) -> bool:
        return loads_through_from_pretrained(unwrap_cim(self.model), checkpoint) and not (
            self.is_deepspeed_enabled or self.is_fsdp_enabled or getattr(self, "is_fsdp_xla_enabled", False)
        )

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        if not self._loads_through_from_pretrained(resume_from_checkpoint):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        load_weights_strictly(unwrap_cim(model if model is not None else self.model), resume_from_checkpoint)

    def _load_best_model(self) -> None:
        if not self._loads_through_from_pretrained(self.state.best_model_checkpoint):
            return super()._load_best_model()
        load_weights_strictly(unwrap_cim(self.model), self.state.best_model_checkpoint)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def evaluate(self, *args, **kwargs):
        self._eval_metrics.reset()
        return super().evaluate(*args, **kwargs)

    def create_model_card(self, *args, **kwargs):
        """Keeps the CIM model card the pre-training script wrote in the output directory (`push_to_hub` would
        write the Trainer's generic card over it)."""
        if has_cim_card(self.args.output_dir):
            return None
        return super().create_model_card(*args, **kwargs)

    def _train_metric_means(self) -> dict[str, float]:
        """Means since the last log over every process's micro-batches (collective under distributed training; the
        metric names are fixed by the config, so every process reduces the same tensor even after empty batches)."""
        names = ["pretext_iou", "correlation_loss", "prior_loss", "prior_iou"]
        if unwrap_cim(self.model).config.contrastive_loss_weight > 0:
            names += ["contrastive_loss"]
        sums = self._train_metrics.sums
        totals = torch.tensor(
            [[float(sums.get(n, 0.0)), self._train_metrics.counts.get(n, 0)] for n in names],
            dtype=torch.float64,
            device=self.args.device,
        )
        if self.args.world_size > 1:
            totals = self.accelerator.reduce(totals, reduction="sum")
        return {n: float(t[0] / t[1]) for n, t in zip(names, totals) if t[1] > 0}

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # every process logs the training loss at the same step: the reductions are collective
            logs.update(with_prior_gains({k: round(v, 4) for k, v in self._train_metric_means().items()}))
            self._train_metrics.reset()
            if self.momentum_callback.last_momentum is not None and unwrap_cim(self.model).uses_target_encoder:
                logs["momentum"] = round(self.momentum_callback.last_momentum, 6)
            ramp = self.augmentation_callback.last_strength
            if ramp is not None and unwrap_cim(self.model).config.exemplar_augmentation:
                logs["augmentation_strength"] = round(ramp, 4)
            logs["skipped_images"] = self.total_skipped_images()
            if self.stream_position.epoch is not None:
                # a stream's `epoch` is the Trainer's count (steps / max_steps within each pass); this is the pass over
                # the data that the last batch came from (0 = the first)
                logs["stream_epoch"] = self.stream_position.epoch
        if "eval_loss" in logs:
            means = with_prior_gains({k: round(v, 4) for k, v in self._eval_metrics.means().items()})
            logs.update({f"eval_{k}": v for k, v in means.items()})
        super().log(logs, start_time)


__all__ = [
    "AugmentationRampCallback",
    "CIMTrainer",
    "MomentumCallback",
    "NonFiniteLossError",
    "SaveOnSignalCallback",
    "correlation_iou",
    "cosine_momentum",
    "unwrap_cim",
    "with_prior_gains",
]
