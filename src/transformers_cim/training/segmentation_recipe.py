"""The recipe of `run_semantic_segmentation.py`: its checks, the checkpoint it starts from, the UperNet (from an
encoder checkpoint, a trained UperNet or a random init), the normalisation and the image processor saved with it, and
the model card (the recipe as run, the scores per split). The arguments are the script's dataclasses
(``model_args``, ``data_args``, ``training_args``)."""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import PIL.Image
from transformers import BeitImageProcessorPil, PreTrainedConfig, UperNetForSemanticSegmentation

from ..checkpoint_loading import (
    checkpoint_kind,
    encoder_config_from_checkpoint,
    image_stats_from_checkpoint,
    resolve_checkpoint_path,
)
from ..configuration_cim import PRESET_NAMES, preset_encoder_config
from ..errors import UserValueError
from ..hub_card import card_license, write_model_card
from ..transfer import upernet_for_semantic_segmentation
from .data import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
)
from .data.segmentation import (
    shorter_side_size,
)
from .modelcard import build_segmentation_card
from .script_args import (
    DataSourceArguments,
    ResumableTrainingArguments,
)
from .segmentation import SegmentationTrainer
from .segmentation_data import dataset_display_name

logger = logging.getLogger("run_semantic_segmentation")


def check_recipe(
    model_args, data_args: DataSourceArguments, training_args: ResumableTrainingArguments
) -> tuple[int, int]:
    """The checks of the recipe's values, before any data is read; returns the training crop (height, width)."""
    if not 0 < model_args.layer_decay <= 1:
        raise UserValueError(f"--layer_decay must be in (0, 1], got {model_args.layer_decay}.")
    if len(data_args.crop_size) not in (1, 2) or min(data_args.crop_size) < 1:
        raise UserValueError(f"--crop_size takes one size or height width, got {data_args.crop_size}.")
    if len(data_args.scale_range) != 2:
        raise UserValueError(f"--scale_range takes two factors (min max), got {data_args.scale_range}.")
    crop = (data_args.crop_size[0], data_args.crop_size[-1])
    if training_args.do_train and training_args.per_device_train_batch_size < 2:
        raise UserValueError(
            "--per_device_train_batch_size must be at least 2: UperNet's pooling branch normalises "
            "1x1 maps with BatchNorm, which needs two images (use --gradient_accumulation_steps for "
            "a larger total batch)."
        )
    if data_args.streaming and training_args.do_train and training_args.max_steps <= 0:
        raise UserValueError("--streaming needs --max_steps (a streamed dataset has no length).")
    return crop


def resolve_start_checkpoint(model_args, training_args: ResumableTrainingArguments) -> str | None:
    """The local folder of --model_name_or_path (downloaded when a Hub id), checked: an encoder checkpoint or a
    trained UperNet (which evaluating or predicting without --do_train needs); None for a random init."""
    path = None
    if model_args.model_name_or_path:
        path = resolve_checkpoint_path(
            model_args.model_name_or_path,
            cache_dir=model_args.cache_dir,
            token=model_args.token,
            revision=model_args.model_revision,
        )
        if not is_upernet_checkpoint(path):
            checkpoint_kind(path)  # a clear error for anything that is not an encoder checkpoint
        elif model_args.encoder_config:
            raise UserValueError("--encoder_config is for random init; --model_name_or_path is already a UperNet.")
    if not training_args.do_train and (path is None or not is_upernet_checkpoint(path)):
        raise UserValueError(
            "Evaluating or predicting without --do_train needs a trained UperNet checkpoint as "
            "--model_name_or_path (its heads would otherwise be random)."
        )
    return path


def write_segmentation_card(
    trainer: SegmentationTrainer,
    model_args,
    data_args: DataSourceArguments,
    results: dict[str, Any],
    id2label: dict[int, str],
    crop: tuple[int, int],
    path: str | None,
    eval_split: str | None,
    figure: str | None,
) -> None:
    """The trained UperNet's card: the start, the data, the recipe as run and the scores of each evaluated split."""
    split_results = {
        name: split_scores(results, prefix)
        for name, prefix in ((eval_split, "eval"), (data_args.test_split_name, "test"))
        if f"{prefix}_mean_iou" in results
    }
    encoder_config = trainer.accelerator.unwrap_model(trainer.model).config.backbone_config
    card = build_segmentation_card(
        model_name=os.path.basename(os.path.normpath(trainer.args.output_dir)),
        base=model_args.model_name_or_path,
        encoder_config=encoder_config,
        dataset_name=dataset_display_name(data_args),
        num_labels=len(id2label),
        recipe=recipe_rows(trainer, model_args, data_args, crop),
        split_results=split_results,
        license=model_args.license or card_license(path),
        figure=figure,
    )
    write_model_card(trainer.args.output_dir, card)


def is_upernet_checkpoint(path: str) -> bool:
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        return False
    with open(config_file, encoding="utf-8") as f:
        return json.load(f).get("model_type") == "upernet"


def random_encoder_config(model_args) -> PreTrainedConfig:
    """The encoder architecture for random init: a preset or a checkpoint's, with the overrides applied."""
    name = model_args.encoder_config
    if name in PRESET_NAMES:
        config = preset_encoder_config(name)
    elif os.path.isdir(os.path.expanduser(name)):
        config = encoder_config_from_checkpoint(os.path.expanduser(name))
    else:
        raise UserValueError(
            f"--encoder_config {name!r} is neither a preset ({', '.join(PRESET_NAMES)}) nor a checkpoint folder."
        )
    if model_args.patch_size is not None:
        config.patch_size = model_args.patch_size
    if model_args.num_layers is not None:
        config.num_hidden_layers = model_args.num_layers
    return config


def image_statistics(model_args, path: str | None) -> tuple[list[float], list[float]]:
    """The encoder's normalisation: its checkpoint's processor (or, for random init, --encoder_config's folder's),
    else ImageNet's."""
    source = path or (
        model_args.encoder_config
        if model_args.encoder_config and os.path.isdir(os.path.expanduser(model_args.encoder_config))
        else None
    )
    stats = image_stats_from_checkpoint(source) if source else None
    return stats if stats is not None else (list(IMAGENET_DEFAULT_MEAN), list(IMAGENET_DEFAULT_STD))


def build_upernet(
    model_args, path: str | None, id2label: dict[int, str], crop: tuple[int, int], ignore_index: int
) -> UperNetForSemanticSegmentation:
    """A trained UperNet as it is (same classes), else UperNet over the checkpoint's encoder or a random one."""
    if path is not None and is_upernet_checkpoint(path):
        model = UperNetForSemanticSegmentation.from_pretrained(path)
        if {int(k): v for k, v in model.config.id2label.items()} != id2label:
            raise UserValueError(
                f"{model_args.model_name_or_path} segments the classes "
                f"{list(model.config.id2label.values())[:8]}, the dataset has "
                f"{list(id2label.values())[:8]}: use the same classes, or start from its encoder."
            )
        model.config.loss_ignore_index = ignore_index
        return model
    if path is None and model_args.encoder_config is None:
        raise UserValueError(
            "Give --model_name_or_path (a CIM checkpoint, an encoder) or, for random init, "
            "--encoder_config (a preset or a checkpoint folder to copy the architecture of)."
        )
    return upernet_for_semantic_segmentation(
        path,
        len(id2label),
        id2label=id2label,
        encoder_config=random_encoder_config(model_args) if path is None else None,
        image_size=max(crop),
        out_indices=model_args.out_indices,
        drop_path_rate=model_args.drop_path_rate,
        hidden_size=model_args.decoder_hidden_size,
        auxiliary_channels=model_args.auxiliary_channels or max(1, model_args.decoder_hidden_size // 2),
        auxiliary_loss_weight=model_args.auxiliary_loss_weight,
        ignore_index=ignore_index,
    )


def image_processor_for(
    size: tuple[int, int], mean: list[float], std: list[float], reduce_labels: bool
) -> BeitImageProcessorPil:
    """The stock processor `pipeline("image-segmentation")` uses: resize to the evaluation size (bilinear),
    normalise with the encoder's statistics; ``do_reduce_labels`` as the training masks were read."""
    return BeitImageProcessorPil(
        do_resize=True,
        size={"height": int(size[0]), "width": int(size[1])},
        resample=PIL.Image.Resampling.BILINEAR,
        do_center_crop=False,
        do_rescale=True,
        do_normalize=True,
        image_mean=list(mean),
        image_std=list(std),
        do_reduce_labels=reduce_labels,
    )


def processor_size(
    image_size: tuple[int, int] | None, base_size: int | None, crop: tuple[int, int], multiple: int
) -> tuple[int, int]:
    """The evaluation size of the split's first image (after the --base_size resize), rounded to the encoder's
    input multiple; the crop size when unknown."""
    if image_size is None:
        return crop
    height, width = shorter_side_size(*image_size, base_size) if base_size else image_size
    return (
        max(multiple, int(round(height / multiple)) * multiple),
        max(multiple, int(round(width / multiple)) * multiple),
    )


def recipe_rows(
    trainer: SegmentationTrainer, model_args, data_args: DataSourceArguments, crop: tuple[int, int]
) -> dict[str, object]:
    args = trainer.args
    total_batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    return {
        "head": f"UperNet, width {model_args.decoder_hidden_size}, auxiliary FCN head "
        f"x{model_args.auxiliary_loss_weight}",
        "optimizer steps (epochs)": f"{trainer.state.global_step} ({trainer.state.epoch or 0:g})",
        "total batch": total_batch,
        "training crop": f"{crop[0]}x{crop[1]} px after a random rescale x{data_args.scale_range} of shorter side "
        f"{data_args.base_size or min(crop)}; flip {data_args.hflip}",
        "evaluation": "whole image, "
        + (f"shorter side {data_args.base_size} px" if data_args.base_size else "at its own size")
        + ", scored at the masks' resolution",
        "peak learning rate": f"{args.learning_rate:.4g}, "
        f"{getattr(args.lr_scheduler_type, 'value', args.lr_scheduler_type)} "
        f"schedule, warm-up {args.warmup_steps:g}",
        "optimizer": f"AdamW (betas {args.adam_beta1}, {args.adam_beta2}), weight decay {args.weight_decay}",
        "layer decay / drop path": f"{model_args.layer_decay} / {model_args.drop_path_rate}",
        "labels": f"ignore index {data_args.ignore_index}, reduce_labels {data_args.reduce_labels}",
        "seed": args.seed,
    }


def split_scores(results: dict[str, Any], prefix: str) -> dict[str, float]:
    """The scores of one split (``<prefix>_mean_iou``, ... ``<prefix>_iou_<class>``), without the prefix."""
    headline = ("mean_iou", "overall_accuracy", "mean_accuracy")
    scores = {key[len(prefix) + 1 :]: float(value) for key, value in results.items() if key.startswith(f"{prefix}_")}
    return {key: value for key, value in scores.items() if key in headline or key.startswith("iou_")}


__all__ = [
    "build_upernet",
    "check_recipe",
    "image_processor_for",
    "image_statistics",
    "is_upernet_checkpoint",
    "processor_size",
    "random_encoder_config",
    "recipe_rows",
    "resolve_start_checkpoint",
    "split_scores",
    "write_segmentation_card",
]
