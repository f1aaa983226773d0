"""The steps of `run_pretraining.py`'s `main`, each a function: the CIM config and model (from a preset, a checkpoint
or a ViT / ResNet encoder), the first images checked before training, the training stream or seeded dataset, the
k-NN monitor's data, the learning rate, the distributed-run rules, the stop after a signal and the model card.
The arguments are the script's dataclasses (``model_args``, ``data_args``, ``cim_args``, ``training_args``)."""

from __future__ import annotations

import json
import logging
import os
import signal
from collections.abc import Mapping, Sequence

import datasets
import torch
import transformers

from ..configuration_cim import CIMConfig
from ..errors import UserPathError, UserValueError
from ..hub_card import write_model_card
from ..modeling_cim import CIMForPreTraining
from .data import (
    RandomResizedCropFlip,
    ResizeCenterCrop,
    SeededImageDataset,
    build_classification_transform,
    decode_image,
    find_label_column,
    prepare_dataset,
)
from .modelcard import build_model_card
from .script_args import (
    set_learning_rate,
)
from .streaming import ResumableImageStream
from .trainer import CIMTrainer
from .utils import fetch_batches_per_process

logger = logging.getLogger("run_pretraining")


def apply_overrides(config: CIMConfig, overrides: str | None) -> None:
    """Applies --config_overrides 'key=value,encoder.key=value' with `PretrainedConfig.update_from_string`, once for
    the CIM config and once for its encoder config (the `encoder.` keys); a value is read as the type of the field."""
    updates = {"cim": [], "encoder": []}
    for item in filter(None, (item.strip() for item in (overrides or "").split(","))):
        key, sep, value = (part.strip() for part in item.partition("="))
        if not sep:
            raise UserValueError(f"--config_overrides item {item!r} is not key=value.")
        updates["encoder" if key.startswith("encoder.") else "cim"].append((key.removeprefix("encoder."), value))
    for target, items in ((config, updates["cim"]), (config.encoder_config, updates["encoder"])):
        for key, _ in items:
            if not hasattr(target, key):
                raise UserValueError(f"--config_overrides: {type(target).__name__} has no field {key!r}.")
        try:
            if items:
                target.update_from_string(",".join(f"{key}={value}" for key, value in items))
        except (ValueError, TypeError) as err:
            raise UserValueError(f"--config_overrides: {type(target).__name__}: {err}") from None


def build_config(
    model_args, cim_args, cli_fields: Sequence[str], quickstart: Mapping[str, Mapping] | None = None
) -> CIMConfig:
    """The CIM config: preset / path / checkpoint (else the quick start's ``{"config": ..., "encoder": ...}``
    settings when given, else ViT-B/16), then the ``cli_fields`` of ``cim_args``, then --config_overrides;
    validated."""
    if model_args.config_name and os.path.exists(model_args.config_name):
        config = CIMConfig.from_pretrained(model_args.config_name)
    elif model_args.config_name:
        try:
            config = CIMConfig.from_preset(model_args.config_name)
        except ValueError as err:
            raise UserValueError(f"--config_name: {err}") from None
    elif model_args.model_name_or_path and is_cim_checkpoint(model_args.model_name_or_path):
        config = CIMConfig.from_pretrained(model_args.model_name_or_path)
    elif quickstart is not None:
        config = CIMConfig.from_preset("vit-tiny-patch16", **quickstart["config"])
        for key, value in quickstart["encoder"].items():
            setattr(config.encoder_config, key, value)
    else:
        config = CIMConfig.from_preset("vit-base-patch16")
    for name in cli_fields:
        value = getattr(cim_args, name)
        if value is not None:
            setattr(config, name, value)
    apply_overrides(config, model_args.config_overrides)
    # rebuild so every value goes through the config's validation (clear error on a bad combination)
    try:
        return CIMConfig.from_dict(config.to_dict())
    except ValueError as err:
        raise UserValueError(f"Invalid CIM configuration: {err}") from None


def is_cim_checkpoint(path: str) -> bool:
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        return False
    with open(config_file) as f:
        return json.load(f).get("model_type") == "cim"


def build_model(model_args, config: CIMConfig) -> CIMForPreTraining:
    """A fresh CIM model, a CIM checkpoint, or a CIM model whose encoder starts from a ViT/ResNet checkpoint."""
    attn = model_args.attn_implementation
    if model_args.model_name_or_path is None:
        config._attn_implementation = attn
        return CIMForPreTraining(config)
    if not os.path.exists(model_args.model_name_or_path) and "/" not in model_args.model_name_or_path:
        raise UserPathError(
            f"--model_name_or_path {model_args.model_name_or_path!r} is neither a local directory nor a Hub id."
        )
    if is_cim_checkpoint(model_args.model_name_or_path):
        return CIMForPreTraining.from_pretrained(
            model_args.model_name_or_path, config=config, attn_implementation=attn
        )
    encoder_cls = transformers.ResNetModel if config.encoder_type == "resnet" else transformers.ViTModel
    encoder = encoder_cls.from_pretrained(model_args.model_name_or_path, cache_dir=model_args.cache_dir)
    config.encoder_config = encoder.config
    config = CIMConfig.from_dict(config.to_dict())
    config._attn_implementation = attn
    model = CIMForPreTraining(config)
    missing, _ = model.encoder.load_state_dict(encoder.state_dict(), strict=False)
    if missing:
        logger.warning("Encoder weights not found in %s: %s", model_args.model_name_or_path, missing)
    model.reset_target()
    return model


def load_split(data_args, model_args, split: str):
    return data_args.load_split(split, cache_dir=model_args.cache_dir, token=model_args.token)


def preflight_images(raw_ds, image_column: str, min_size: int, count: int = 16) -> list:
    """Decodes the first images; raises a clear error before training when none is usable."""
    images, seen = [], 0
    source = (
        raw_ds.cast_column(image_column, datasets.Image(decode=False))
        if isinstance((raw_ds.features or {}).get(image_column), datasets.Image)
        else raw_ds
    )
    for row in source:
        seen += 1
        image = decode_image(row[image_column], min_size=min_size)
        if image is not None:
            images.append(image)
        if seen >= count:
            break
    if seen == 0:
        raise UserValueError("The training data is empty: no rows to pre-train on. Check the data source.")
    if not images:
        raise UserValueError(
            f"None of the first {seen} values of column {image_column!r} is a usable image (undecodable "
            f"or shorter side < --min_image_size={min_size}). Check --image_column_name and the data, or "
            "lower --min_image_size."
        )
    return images


def knn_datasets(
    data_args, model_args, training_args, raw_train, image_column: str, eval_transform: ResizeCenterCrop
) -> tuple:
    """The data of the --knn_eval_steps monitor: a memory bank of labelled training images and queries from the
    labelled validation split, both through the evaluation transform, the first --knn_max_*_samples of each
    (shuffled with --seed when not streamed)."""
    label_column = find_label_column(raw_train, None)
    if label_column is None:
        columns = list(raw_train.features or raw_train.column_names)
        raise UserValueError(
            f"--knn_eval_steps needs labelled images: no label column among {columns} (an image "
            "folder gets one from its class sub-folders)."
        )
    feature = (raw_train.features or {}).get(label_column)
    if not (
        isinstance(feature, datasets.ClassLabel) or (isinstance(feature, datasets.Value) and "int" in feature.dtype)
    ):
        raise UserValueError(f"--knn_eval_steps needs class ids as labels; column {label_column!r} holds {feature}.")
    try:
        raw_eval = load_split(data_args, model_args, "validation")
    except UserValueError as err:
        raise UserValueError(
            f"--knn_eval_steps needs a labelled validation split (--validation_dir, "
            f"--validation_files or a dataset with one): {err}"
        ) from None
    parts = []
    for raw, count in ((raw_train, data_args.knn_max_train_samples), (raw_eval, data_args.knn_max_eval_samples)):
        if label_column not in (raw.features or {label_column: None}):
            raise UserValueError(f"--knn_eval_steps: the validation split has no label column {label_column!r}.")
        raw = (
            raw.take(count)
            if data_args.streaming
            else raw.shuffle(seed=training_args.seed).select(range(min(count, len(raw))))
        )
        parts.append(
            prepare_dataset(
                raw,
                image_column,
                build_classification_transform(image_column, label_column, eval_transform, data_args.min_image_size),
            )
        )
    return tuple(parts)


def preview_batch(images: list, config: CIMConfig, count: int) -> torch.Tensor:
    """Fixed, deterministic search views for the correlation-map figure."""
    transform = ResizeCenterCrop(config.image_size, crop_pct=1.0, mean=config.image_mean, std=config.image_std)
    return torch.stack([transform(image) for image in images[:count]])


def prepare_train_dataset(raw_ds, image_column: str, config: CIMConfig, data_args, training_args):
    """Streamed: a ResumableImageStream (this process's part, shuffled, resumable from a checkpoint); otherwise a
    SeededImageDataset (views seeded per row and epoch, so a resumed run gives the same crops)."""
    transform = RandomResizedCropFlip(
        size=config.image_size, scale=tuple(data_args.view_scale), mean=config.image_mean, std=config.image_std
    )
    if data_args.streaming:
        if data_args.max_train_samples:
            raw_ds = raw_ds.take(data_args.max_train_samples)
        return ResumableImageStream(
            raw_ds,
            image_column,
            transform,
            min_size=data_args.min_image_size,
            buffer_size=data_args.shuffle_buffer_size,
            seed=training_args.seed,
            rank=training_args.process_index,
            world_size=training_args.world_size,
        )
    if data_args.max_train_samples:
        raw_ds = raw_ds.shuffle(seed=training_args.seed).select(range(min(data_args.max_train_samples, len(raw_ds))))
    return SeededImageDataset(
        raw_ds, image_column, transform, min_size=data_args.min_image_size, seed=training_args.seed
    )


def choose_learning_rate(training_args, explicit_lr: bool, quickstart_learning_rate: float | None = None) -> str:
    """Sets the learning rate (given, the quick start's when ``quickstart_learning_rate`` is, or base x total batch /
    256); returns the line saying so."""
    if quickstart_learning_rate is not None and not explicit_lr:
        training_args.learning_rate = quickstart_learning_rate
        return f"lr = {quickstart_learning_rate:.4g} (the quick start's; --learning_rate sets it)"
    return set_learning_rate(training_args, training_args.base_learning_rate, explicit_lr)


def use_shards_per_rank(training_args, num_shards: int) -> None:
    """Every process fetches its own batches from the stream (ResumableImageStream reads this process's whole shards
    when there are at least as many shards as processes, else every world_size-th record), never rank 0 reading
    and dispatching: that cannot carry the variable-size batches left when undecodable images are dropped."""
    fetch_batches_per_process(training_args)
    if training_args.world_size > 1 and num_shards < training_args.world_size:
        logger.warning(
            "The stream has %d shard(s) for %d processes: every rank reads the whole stream and keeps "
            "its share. Re-shard the data into more files so each rank reads only its own.",
            num_shards,
            training_args.world_size,
        )


def refuse_fsdp(training_args) -> None:
    """FSDP is refused with a clear error: see the README's "Multi-GPU and multi-node" section."""
    if training_args.fsdp or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true"):
        raise UserValueError(
            "CIM pre-training does not support FSDP yet: the EMA update (target <- m*target + (1-m)*online) must "
            "run on matching shards of the online and target encoders, and that has not been built or tested "
            "under FSDP. Use DDP (plain `accelerate launch` or `torchrun`), which replicates both encoders."
        )


def stop_after_signal(trainer: CIMTrainer, signum: int) -> None:
    """Ends the run after SaveOnSignalCallback saved a checkpoint: exit status 128 + signal, as if killed by it,
    without the final model, metrics or card of a finished run."""
    checkpoint = os.path.join(trainer.args.output_dir, f"checkpoint-{trainer.state.global_step}")
    logger.warning(
        "Received %s: saved %s and stopped. Run the same command again to resume from it.",
        signal.Signals(signum).name,
        checkpoint,
    )
    end_distributed(trainer)
    raise SystemExit(128 + signum)


def end_distributed(trainer: CIMTrainer) -> None:
    """Waits for every rank, then tears the process group down explicitly: leaving it to interpreter exit lets
    gloo's threads be destroyed while still joinable, which aborts a rank ("terminate called without an active
    exception") after a run that otherwise succeeded."""
    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.end_training()


def final_pretext_metrics(trainer: CIMTrainer, results: dict) -> dict:
    metrics: dict = {}
    for entry in trainer.state.log_history:
        for key in (
            "loss",
            "correlation_loss",
            "prior_loss",
            "loss_to_prior",
            "pretext_iou",
            "prior_iou",
            "pretext_iou_gain",
            "momentum",
            "eval_loss",
            "eval_correlation_loss",
            "eval_prior_loss",
            "eval_loss_to_prior",
            "eval_pretext_iou",
            "eval_prior_iou",
            "eval_pretext_iou_gain",
            "knn_top1",
        ):
            if key in entry:
                metrics[key] = entry[key]
    metrics["skipped_images"] = results.get("skipped_images", 0)
    return metrics


def write_card(trainer: CIMTrainer, config: CIMConfig, data_args, results: dict, license: str | None = None) -> None:
    figure = (
        "correlation_maps.png"
        if os.path.exists(os.path.join(trainer.args.output_dir, "correlation_maps.png"))
        else None
    )
    source = (
        data_args.dataset_name
        or data_args.train_dir
        or ", ".join(data_args.train_files or [])
        or "scikit-image sample photos (embedded default)"
    )
    images = (
        trainer.state.global_step
        * trainer.args.per_device_train_batch_size
        * trainer.args.gradient_accumulation_steps
        * trainer.args.world_size
    )
    card = build_model_card(
        config,
        dataset_name=source,
        max_steps=trainer.state.global_step,
        train_images=images,
        final_metrics=final_pretext_metrics(trainer, results),
        figure=figure,
        repo_id=trainer.args.hub_model_id,
        license=license,
    )
    write_model_card(trainer.args.output_dir, card)


__all__ = [
    "apply_overrides",
    "build_config",
    "build_model",
    "choose_learning_rate",
    "end_distributed",
    "final_pretext_metrics",
    "is_cim_checkpoint",
    "knn_datasets",
    "load_split",
    "preflight_images",
    "prepare_train_dataset",
    "preview_batch",
    "refuse_fsdp",
    "stop_after_signal",
    "use_shards_per_rank",
    "write_card",
]
