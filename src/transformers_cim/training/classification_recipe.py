"""The fine-tuning recipe of `run_image_classification.py`: the authors' defaults filled in per encoder and mode
(layer decay, head and drop-path, random erasing, Mixup / CutMix, checked), what a checkpoint is (a fine-tuned
classifier and its class names, or an encoder to fine-tune), the normalisation statistics, and the model card of
the run. The arguments are the script's dataclasses (``model_args``, ``data_args``, ``training_args``)."""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from torch import nn
from transformers import BeitForImageClassification

from ..checkpoint_loading import (
    checkpoint_kind,
    encoder_config_from_checkpoint,
    image_stats_from_checkpoint,
)
from ..encoder_loading import load_encoder_for_classification
from ..errors import UserPathError, UserValueError
from ..hub_card import card_license, write_model_card
from ..transfer import beit_for_image_classification
from .classification_data import dataset_display_name
from .classification_trainer import ClassificationTrainer
from .data import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
)
from .linear_probe import LinearProbeForImageClassification
from .modelcard import build_classification_card
from .script_args import DataSourceArguments, ResumableTrainingArguments

logger = logging.getLogger("run_image_classification")


def apply_recipe_defaults(model_args, training_args: ResumableTrainingArguments, encoder_type: str) -> None:
    probe = model_args.linear_probe
    if model_args.layer_decay is None:
        model_args.layer_decay = 0.8 if (encoder_type == "vit" and not probe) else 1.0
    choose_head(model_args, encoder_type)
    if model_args.random_erasing is None:
        model_args.random_erasing = 0.0 if probe else 0.25
    if not 0 <= model_args.random_erasing <= 1:
        raise UserValueError(f"--random_erasing is a probability in [0, 1], got {model_args.random_erasing}.")
    if model_args.mixup is None:
        model_args.mixup = 0.0 if probe else 0.8
    if model_args.cutmix is None:
        model_args.cutmix = 0.0 if probe else 1.0
    if model_args.label_smoothing is not None:  # the deprecated alias of the Trainer's flag
        factor = training_args.label_smoothing_factor
        if factor is not None and factor != model_args.label_smoothing:
            raise UserValueError(
                f"--label_smoothing {model_args.label_smoothing} and --label_smoothing_factor {factor} "
                "disagree; give --label_smoothing_factor only."
            )
        logger.warning(
            "--label_smoothing is deprecated: use --label_smoothing_factor (the Trainer's flag), which "
            "is what the run uses and the model card reports."
        )
        training_args.label_smoothing_factor = model_args.label_smoothing
    if training_args.label_smoothing_factor is None:
        training_args.label_smoothing_factor = 0.0 if probe else 0.1
    for name, value in (
        ("mixup", model_args.mixup),
        ("cutmix", model_args.cutmix),
        ("label_smoothing_factor", training_args.label_smoothing_factor),
    ):
        if value < 0:
            raise UserValueError(f"--{name} must be >= 0, got {value}.")
    if not 0 < model_args.layer_decay <= 1:
        raise UserValueError(f"--layer_decay must be in (0, 1], got {model_args.layer_decay}.")
    if training_args.label_smoothing_factor >= 1:
        raise UserValueError(f"--label_smoothing_factor must be < 1, got {training_args.label_smoothing_factor}.")


def choose_head(model_args, encoder_type: str) -> None:
    """--pooling and --drop_path_rate: the authors' mean-pool head with drop-path 0.1 for ViT fine-tuning, the CLS
    token for a linear probe; ResNet pools globally whatever is asked, and neither stock class has drop-path."""
    if encoder_type != "vit":
        if model_args.pooling == "mean" or (model_args.drop_path_rate or 0) > 0:
            raise UserValueError(
                "--pooling mean and --drop_path_rate apply to ViT encoders; a ResNet classifier "
                "always pools globally and has no drop-path. Leave them unset."
            )
        model_args.pooling, model_args.drop_path_rate = None, 0.0
        return
    if model_args.pooling is None:
        model_args.pooling = "cls" if model_args.linear_probe else "mean"
    if model_args.linear_probe and model_args.pooling != "cls":
        raise UserValueError("--linear_probe reads the CLS token (MAE's probe); --pooling mean is for fine-tuning.")
    if model_args.drop_path_rate is None:
        model_args.drop_path_rate = 0.1 if model_args.pooling == "mean" else 0.0
    if not 0 <= model_args.drop_path_rate < 1:
        raise UserValueError(f"--drop_path_rate must be in [0, 1), got {model_args.drop_path_rate}.")
    if model_args.pooling == "cls" and model_args.drop_path_rate > 0:
        raise UserValueError(
            "--drop_path_rate needs --pooling mean: the CLS-token model, a stock "
            "ViTForImageClassification, has no drop-path."
        )


def saved_model_type(path: str) -> str | None:
    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
        return json.load(f).get("model_type")


def fine_tuned_class_names(path: str) -> list[str] | None:
    """The class names, in label-id order, of a fine-tuned classifier checkpoint (a stock `...ForImageClassification`),
    or None for any other checkpoint (a CIM pre-training checkpoint or an encoder: its head would be new)."""
    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    if not any(a.endswith("ForImageClassification") for a in config.get("architectures") or []):
        return None
    id2label = config.get("id2label") or {}
    return [str(id2label[key]) for key in sorted(id2label, key=int)] or None


def image_statistics(model_args, checkpoint_dir: str) -> tuple[list[float], list[float]]:
    """Normalisation mean / std: --image_processor_name's, else the checkpoint's, else ImageNet's."""
    if model_args.image_processor_name:
        from transformers import AutoImageProcessor

        try:
            processor = AutoImageProcessor.from_pretrained(
                model_args.image_processor_name,
                revision=model_args.model_revision,
                cache_dir=model_args.cache_dir,
                token=model_args.token,
                trust_remote_code=model_args.trust_remote_code,
            )
        except OSError as err:
            raise UserPathError(f"--image_processor_name {model_args.image_processor_name!r}: {err}") from None
        mean, std = getattr(processor, "image_mean", None), getattr(processor, "image_std", None)
        if mean is None or std is None:
            raise UserValueError(
                f"--image_processor_name {model_args.image_processor_name!r} has no image_mean / "
                "image_std to normalise with."
            )
        logger.info(f"Normalising with the mean {mean} and std {std} of {model_args.image_processor_name}.")
        return list(mean), list(std)
    stats = image_stats_from_checkpoint(checkpoint_dir)
    return stats if stats is not None else (list(IMAGENET_DEFAULT_MEAN), list(IMAGENET_DEFAULT_STD))


def write_classification_card(
    trainer: ClassificationTrainer,
    model_args,
    data_args: DataSourceArguments,
    checkpoint_dir: str,
    num_labels: int,
    eval_split: str | None,
    results: dict[str, Any],
) -> None:
    """The fine-tuned model's card: the checkpoint (path or Hub id, `base_model` when a Hub id) it was fine-tuned
    from, the data, the recipe as run and the results; the licence given, else the base checkpoint's, else none."""
    if not trainer.is_world_process_zero():
        return
    args = trainer.args
    total_batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    warmup, scheduler = args.warmup_steps, args.lr_scheduler_type
    recipe = {
        "mode": "linear probe (frozen encoder)" if model_args.linear_probe else "end-to-end fine-tuning",
        "image size": f"{model_args.image_size} px; evaluation: shorter side to "
        f"{round(model_args.image_size / data_args.crop_pct)} px (bicubic), centre crop",
        "optimizer steps (epochs)": f"{trainer.state.global_step} ({trainer.state.epoch or 0:g})",
        "total batch": total_batch,
        "peak learning rate": f"{args.learning_rate:.4g}, {getattr(scheduler, 'value', scheduler)} schedule, warm-up "
        f"{warmup:g}{' of the run' if 0 < warmup < 1 else ' steps'}",
        "optimizer": f"AdamW (betas {args.adam_beta1}, {args.adam_beta2}), weight decay {args.weight_decay} "
        "(none on norms, biases, tokens)",
        "head": {
            "mean": "mean of the patch tokens + LayerNorm (the CIM authors' fine-tuning head; a "
            "BeitForImageClassification that computes exactly the ViT)",
            "cls": "CLS token after the final LayerNorm",
            None: "global average pooling",
        }[model_args.pooling],
        "encoder weights": "the EMA target encoder" if model_args.use_ema_encoder else "the online encoder",
        "drop-path": model_args.drop_path_rate,
        "random erasing": model_args.random_erasing,
        "layer decay": trainer.layer_decay,
        "Mixup / CutMix": f"{trainer.mixup_alpha} / {trainer.cutmix_alpha}",
        "label smoothing (--label_smoothing_factor)": trainer.label_smoothing,
        "seed": args.seed,
    }
    card = build_classification_card(
        model_name=os.path.basename(os.path.normpath(args.output_dir)),
        base=model_args.model_name_or_path,
        base_is_hub_id=not os.path.isdir(model_args.model_name_or_path),
        encoder_config=encoder_config_from_checkpoint(checkpoint_dir),
        linear_probe=model_args.linear_probe,
        dataset_name=dataset_display_name(data_args),
        eval_split=eval_split,
        num_labels=num_labels,
        recipe=recipe,
        results=results,
        license=model_args.license or card_license(checkpoint_dir),
    )
    write_model_card(args.output_dir, card)


def checkpoint_encoder_type(path: str, model_args, training_args: ResumableTrainingArguments) -> tuple[str, bool]:
    """``(encoder type, is a fine-tuned BEiT-class classifier)`` of the checkpoint in `path`; a fine-tuned BEiT is
    scored as it is, never fine-tuned again."""
    fine_tuned_beit = saved_model_type(path) == "beit"
    if fine_tuned_beit:
        if training_args.do_train:
            raise UserValueError(
                f"{model_args.model_name_or_path} is a fine-tuned (BEiT-class) classifier; fine-tune "
                "from the pre-training checkpoint or the exported encoder instead. --do_eval / "
                "--do_predict score it as it is."
            )
        encoder_type = "vit"
    else:
        _, encoder_type = checkpoint_kind(path)
    return encoder_type, fine_tuned_beit


def trained_class_names(path: str, model_args) -> list[str]:
    """The class names of a fine-tuned classifier evaluated or predicted as it is (without --do_train); any other
    checkpoint's head would be new, hence random, and is refused. A linear probe is then ignored."""
    class_names = fine_tuned_class_names(path)
    if class_names is None:
        raise UserValueError(
            f"{model_args.model_name_or_path} is not a fine-tuned classifier (its classification "
            "head would be new, hence random): evaluating or predicting with it needs --do_train."
        )
    if model_args.linear_probe:
        logger.warning("--linear_probe is ignored without --do_train: the checkpoint is evaluated as it is.")
        model_args.linear_probe = False
    return class_names


def load_classifier(
    path: str,
    model_args,
    training_args: ResumableTrainingArguments,
    encoder_type: str,
    fine_tuned_beit: bool,
    id2label: dict[int, str],
) -> nn.Module:
    """The model to train or score: a fine-tuned BEiT as it is, the authors' mean-pool head (a BEiT that is exactly
    the ViT) for ViT fine-tuning, else a stock ViT / ResNet classifier with a new head; a linear probe wraps it."""
    names = list(id2label.values())
    label2id = {name: i for i, name in id2label.items()}
    load_kwargs = {}
    if encoder_type == "vit" and model_args.attn_implementation:
        load_kwargs["attn_implementation"] = model_args.attn_implementation
    encoder_weights = "ema" if model_args.use_ema_encoder else "online"
    if fine_tuned_beit:  # evaluated / predicted as it is
        model = BeitForImageClassification.from_pretrained(path)
    elif encoder_type == "vit" and model_args.pooling == "mean" and training_args.do_train:
        model = beit_for_image_classification(
            path,
            len(names),
            id2label=id2label,
            label2id=label2id,
            drop_path_rate=model_args.drop_path_rate,
            image_size=model_args.image_size,
            seed=training_args.seed,
            encoder_weights=encoder_weights,
        )
    else:
        model = load_encoder_for_classification(
            path,
            len(names),
            id2label,
            label2id,
            model_args.image_size,
            ignore_mismatched_sizes=model_args.ignore_mismatched_sizes,
            encoder_weights=encoder_weights,
            **load_kwargs,
        )
    if model_args.linear_probe:
        model = LinearProbeForImageClassification(model)
    return model


__all__ = [
    "checkpoint_encoder_type",
    "load_classifier",
    "trained_class_names",
    "apply_recipe_defaults",
    "choose_head",
    "fine_tuned_class_names",
    "image_statistics",
    "saved_model_type",
    "write_classification_card",
]
