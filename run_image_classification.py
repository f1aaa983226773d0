#!/usr/bin/env python
"""Fine-tune or linear-probe a CIM (or any ViT / ResNet) checkpoint for image classification; report top-1/top-5.

The model can be a CIM pre-training checkpoint (its online encoder is used), an encoder exported with
``cim-export-encoder``, or any ViT / ResNet checkpoint, as a local directory or a Hub model id. The result is a stock
``ViTForImageClassification`` (or ``ResNetForImageClassification``) checkpoint with its image processor (which computes
the evaluation transform), loadable with no custom code.

Quick start (offline; the scikit-image sample photos when no dataset is given):

    python run_image_classification.py --model_name_or_path outputs/cim-quickstart --image_size 128 \
        --output_dir outputs/cim-quickstart-ft

Paper recipe (ViT-B/16, ImageNet-1K, 100 epochs; layer decay 0.65, Mixup 0.8, CutMix 1.0, label smoothing 0.1):

    python run_image_classification.py --model_name_or_path outputs/cim-vit-b --dataset_name ILSVRC/imagenet-1k \
        --per_device_train_batch_size 128 --num_train_epochs 100 --bf16 --output_dir outputs/cim-vit-b-ft

Linear probing (frozen encoder, BatchNorm + linear head on the CLS feature): add ``--linear_probe``.
Arguments may also come from one ``.json`` file: ``python run_image_classification.py args.json``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass, field
from typing import Any

import datasets
import numpy as np
import torch
import transformers
from transformers import EvalPrediction, HfArgumentParser, TrainingArguments

from transformers_cim.checkpoints import (
    checkpoint_kind,
    image_stats_from_checkpoint,
    resolve_checkpoint_path,
)
from transformers_cim.data import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    RandomResizedCropFlip,
    ResizeCenterCrop,
    SeededImageDataset,
    SkippingCollator,
    available_splits,
    build_classification_transform,
    check_num_workers,
    count_shards,
    find_image_column,
    find_label_column,
    prepare_dataset,
)
from transformers_cim.finetune import (
    ClassificationTrainer,
    LinearProbeForImageClassification,
    load_encoder_for_classification,
)
from transformers_cim.script_args import DataSourceArguments, ResumableTrainingArguments
from transformers_cim.training_utils import fetch_batches_per_process


logger = logging.getLogger("run_image_classification")

VALIDATION_SPLIT_NAMES = ("validation", "valid", "val", "test")
DEFAULT_DATASET_NAME = "scikit-image sample photos"


@dataclass
class ModelArguments:
    """The checkpoint to start from and the fine-tuning recipe."""

    model_name_or_path: str | None = field(default=None, metadata={
        "help": "Required. A CIM pre-training checkpoint, an exported encoder or a ViT/ResNet checkpoint: a local "
                "directory or a Hub model id (downloaded, or from the Hub cache when HF_HUB_OFFLINE=1)."})
    image_size: int = field(default=224, metadata={
        "help": "Training / evaluation resolution. For ViT, the position embeddings are interpolated (bicubic) "
                "when it differs from the checkpoint's."})
    linear_probe: bool = field(default=False, metadata={
        "help": "Freeze the encoder; train BatchNorm1d(affine=False) + Linear on the CLS (ViT) / pooled (ResNet) "
                "feature (MAE's linear probing). The saved model folds the probe into a stock classifier."})
    layer_decay: float | None = field(default=None, metadata={
        "help": "Layer-wise lr decay (1.0 = off). Default: 0.65 for ViT fine-tuning (paper/MAE ViT-B), else 1.0."})
    mixup: float | None = field(default=None, metadata={
        "help": "Mixup alpha (0 = off). Default: 0.8 for fine-tuning, 0 for linear probing."})
    cutmix: float | None = field(default=None, metadata={
        "help": "CutMix alpha (0 = off). Default: 1.0 for fine-tuning, 0 for linear probing."})
    label_smoothing: float | None = field(default=None, metadata={
        "help": "Label smoothing (training only). Default: 0.1 for fine-tuning, 0 for linear probing."})
    attn_implementation: str | None = field(default="sdpa", metadata={
        "help": "ViT attention: eager, sdpa or flash_attention_2."})
    cache_dir: str | None = field(default=None, metadata={"help": "Where datasets and Hub models are cached."})
    token: str | None = field(default=None, metadata={"help": "Hub token for private datasets and models."})


@dataclass
class DataTrainingArguments(DataSourceArguments):
    """Where the labelled images come from (the shared `DataSourceArguments`: one source; none = the scikit-image
    sample photos) and how they are prepared."""

    label_column_name: str | None = field(default=None, metadata={"help": "Label column; auto-detected if unset."})
    train_val_split: float | None = field(default=0.15, metadata={
        "help": "Fraction of the training set held out for validation when there is no validation split "
                "(0 = no evaluation)."})
    shuffle_buffer_size: int = field(default=10_000, metadata={"help": "Shuffle buffer of a streamed dataset."})
    crop_min_scale: float = field(default=0.08, metadata={"help": "Smallest area fraction of the training crop."})
    crop_pct: float = field(default=0.875, metadata={"help": "Evaluation: resize to image_size/crop_pct, center-crop."})
    min_image_size: int = field(default=16, metadata={"help": "Images with a shorter side are skipped."})


@dataclass
class ClassificationTrainingArguments(ResumableTrainingArguments):
    """`TrainingArguments` with fine-tuning defaults (AdamW, wd 0.05, cosine with 5% warm-up, per-epoch eval)."""

    base_learning_rate: float | None = field(default=None, metadata={
        "help": "lr = base_learning_rate * total batch / 256 unless --learning_rate is given. Default: 5e-4 "
                "(fine-tuning, MAE/BEiT recipe) or 1e-3 (linear probing)."})
    weight_decay: float = field(default=0.05, metadata={"help": "AdamW weight decay (none on norms/biases/tokens)."})
    adam_beta2: float = field(default=0.999, metadata={"help": "AdamW beta2."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "Learning-rate schedule."})
    warmup_steps: float = field(default=0.05, metadata={"help": "Warm-up steps (>= 1) or fraction of training (< 1)."})
    eval_strategy: str = field(default="epoch", metadata={"help": "When to evaluate (no, steps, epoch)."})
    save_strategy: str = field(default="epoch", metadata={"help": "When to save checkpoints."})
    save_total_limit: int | None = field(default=2, metadata={"help": "Checkpoints kept."})
    logging_steps: float = field(default=10, metadata={"help": "Log every N steps."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "Keep False: the collator needs its columns."})
    output_dir: str | None = field(default="outputs/image-classification", metadata={"help": "Where to write."})


def parse_arguments(argv: list[str] | None = None):
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, ClassificationTrainingArguments))
    argv = sys.argv[1:] if argv is None else list(argv)
    if len(argv) == 1 and argv[0].endswith(".json"):
        path = os.path.abspath(argv[0])
        if not os.path.isfile(path):
            raise FileNotFoundError(f"Argument file {argv[0]!r} does not exist.")
        model_args, data_args, training_args = parser.parse_json_file(path)
        with open(path, encoding="utf-8") as f:
            explicit_lr = "learning_rate" in json.load(f)
    else:
        model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
        explicit_lr = any(a.split("=")[0] == "--learning_rate" for a in argv)
    return model_args, data_args, training_args, explicit_lr


# ------------------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------------------
def _load(data_args: DataTrainingArguments, model_args: ModelArguments, split: str):
    return data_args.load_split(split, cache_dir=model_args.cache_dir, token=model_args.token)


def _has_source(data_args: DataTrainingArguments) -> bool:
    return bool(data_args.dataset_name or data_args.train_dir or data_args.validation_dir or data_args.train_files
                or data_args.validation_files)


def validation_split_name(data_args: DataTrainingArguments, model_args: ModelArguments) -> str | None:
    """The split to evaluate on: 'validation' for dirs/files given, the first existing one of a dataset, else None."""
    if not _has_source(data_args):
        logger.warning(f"No dataset given: training and evaluating on the {DEFAULT_DATASET_NAME} (one class per "
                       "photo; evaluation uses center crops of the training photos). Pass a dataset for real use.")
        return "validation"  # the default dataset answers every split
    if data_args.train_dir or data_args.train_files:
        return "validation" if (data_args.validation_dir or data_args.validation_files) else None
    builder = datasets.load_dataset_builder(
        data_args.dataset_name, data_args.dataset_config_name, cache_dir=model_args.cache_dir, token=model_args.token
    )
    splits = available_splits(builder)
    return next((s for s in VALIDATION_SPLIT_NAMES if s in splits), None)


def dataset_display_name(data_args: DataTrainingArguments) -> str:
    if data_args.dataset_name:
        name = data_args.dataset_name.rstrip("/\\")
        return os.path.basename(name) if os.path.isdir(name) else name
    path = data_args.train_dir or (data_args.train_files[0] if data_args.train_files else None)
    if path:
        path = os.path.normpath(os.path.dirname(path) if data_args.train_files else path)
        parts = [p for p in path.split(os.sep) if p]
        generic = {"train", "training", "data", "images"}
        while len(parts) > 1 and parts[-1].lower() in generic:
            parts.pop()
        return parts[-1] if parts else "local images"
    return DEFAULT_DATASET_NAME


def resolve_labels(ds, label_column: str, streaming: bool):
    """``(ds, names)``: class names from a ClassLabel; string labels are class-encoded; ints named by value."""
    feature = ds.features[label_column] if ds.features is not None else None
    if isinstance(feature, datasets.ClassLabel):
        return ds, list(feature.names)
    if streaming:
        raise ValueError(
            f"Label column {label_column!r} is not a ClassLabel ({feature!r}); streaming needs class names in the "
            "dataset features. Drop --streaming or use a dataset with a ClassLabel column."
        )
    if isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string"):
        ds = ds.class_encode_column(label_column)
        return ds, list(ds.features[label_column].names)
    if isinstance(feature, datasets.Value) and ("int" in feature.dtype):
        values = [v for v in ds.unique(label_column) if v is not None]
        if not values:
            raise ValueError(f"Label column {label_column!r} has no labels.")
        if min(values) < 0:
            raise ValueError(f"Label column {label_column!r} has negative labels {sorted(values)[:5]}.")
        return ds, [str(i) for i in range(max(values) + 1)]
    raise ValueError(
        f"Label column {label_column!r} has feature {feature!r}; expected class ids (ClassLabel or int) or strings."
    )


def align_validation_labels(eval_ds, label_column: str, names: list[str]):
    """Make the validation label ids follow the training names (checked by name)."""
    feature = eval_ds.features[label_column] if eval_ds.features is not None else None
    if isinstance(feature, datasets.ClassLabel):
        if list(feature.names) == names:
            return eval_ds
        unknown = sorted(set(feature.names) - set(names))
        if unknown:
            raise ValueError(f"The validation set has classes not in the training set: {unknown[:5]}.")
        mapping = np.array([names.index(n) for n in feature.names], dtype=np.int64)
        new_feature = datasets.ClassLabel(names=names)
        return eval_ds.map(
            lambda batch: {label_column: [int(mapping[v]) if v is not None and v >= 0 else v for v in batch[label_column]]},
            batched=True, features=datasets.Features({**eval_ds.features, label_column: new_feature}),
        )
    if isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string"):
        unknown = sorted(set(eval_ds.unique(label_column)) - set(names))
        if unknown:
            raise ValueError(f"The validation set has classes not in the training set: {unknown[:5]}.")
        return eval_ds.cast_column(label_column, datasets.ClassLabel(names=names))
    return eval_ds


def _subset(ds, n: int | None, seed: int, streaming: bool):
    if n is None:
        return ds
    if streaming:
        return ds.take(n)
    return ds.shuffle(seed=seed).select(range(min(n, len(ds))))


def build_datasets(data_args: DataTrainingArguments, model_args: ModelArguments, training_args: TrainingArguments,
                   train_transform: RandomResizedCropFlip, eval_transform: ResizeCenterCrop):
    """Train / eval datasets (transformed lazily), the class names and the column names."""
    train_raw = _load(data_args, model_args, "train")
    image_column = find_image_column(train_raw, data_args.image_column_name)
    label_column = find_label_column(train_raw, data_args.label_column_name)
    if label_column is None:
        columns = list(train_raw.features) if train_raw.features is not None else train_raw.column_names
        raise ValueError(f"No label column found among {columns}; name it with --label_column_name.")
    train_raw, names = resolve_labels(train_raw, label_column, data_args.streaming)
    if len(names) < 2:
        raise ValueError(f"The training set has a single class ({names}); classification needs at least 2.")

    eval_raw = None
    split = validation_split_name(data_args, model_args)
    if split is not None:
        eval_raw = _load(data_args, model_args, split)
        if label_column not in (eval_raw.features or {}):
            raise ValueError(f"The validation split has no label column {label_column!r}.")
        if not data_args.streaming:
            eval_raw = align_validation_labels(eval_raw, label_column, names)
    elif data_args.train_val_split and data_args.train_val_split > 0:
        if data_args.streaming:
            raise ValueError("--train_val_split needs a map-style dataset; give a validation split when streaming.")
        stratify = label_column if isinstance(train_raw.features[label_column], datasets.ClassLabel) else None
        try:
            parts = train_raw.train_test_split(test_size=data_args.train_val_split, seed=training_args.seed,
                                               stratify_by_column=stratify)
        except ValueError:  # too few images per class to stratify
            parts = train_raw.train_test_split(test_size=data_args.train_val_split, seed=training_args.seed)
        train_raw, eval_raw = parts["train"], parts["test"]
        logger.info(f"No validation split: held out {len(eval_raw)} training images ({data_args.train_val_split:.0%}).")
    else:
        logger.warning("No validation split and --train_val_split 0: no evaluation.")

    if data_args.streaming:
        train_raw = train_raw.shuffle(seed=training_args.seed, buffer_size=data_args.shuffle_buffer_size)
    train_raw = _subset(train_raw, data_args.max_train_samples, training_args.seed, data_args.streaming)
    if eval_raw is not None:
        eval_raw = _subset(eval_raw, data_args.max_eval_samples, training_args.seed, data_args.streaming)

    if data_args.streaming:
        train_ds = prepare_dataset(train_raw, image_column, build_classification_transform(
            image_column, label_column, train_transform, data_args.min_image_size))
    else:  # crops seeded per (seed, epoch, row): a resumed run sees the views the uninterrupted one saw
        train_ds = SeededImageDataset(train_raw, image_column, train_transform, min_size=data_args.min_image_size,
                                      seed=training_args.seed, label_column=label_column)
    eval_ds = None
    if eval_raw is not None:
        eval_ds = prepare_dataset(eval_raw, image_column, build_classification_transform(
            image_column, label_column, eval_transform, data_args.min_image_size))
    return train_ds, eval_ds, names, image_column, label_column


# ------------------------------------------------------------------------------------------------------------
# Metrics and model card
# ------------------------------------------------------------------------------------------------------------
def make_metric_functions(num_labels: int):
    """``(preprocess_logits_for_metrics, compute_metrics)``: top-1 (``accuracy``) and, with 5 classes or more, top-5
    accuracy (``top5_accuracy``). Only the 5 best class ids per image are gathered, not the logits."""
    ks = [1, 5] if num_labels >= 5 else [1]

    def preprocess_logits_for_metrics(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = logits[0] if isinstance(logits, (tuple, list)) else logits
        return logits.topk(max(ks), dim=-1).indices

    def compute_metrics(eval_pred: EvalPrediction) -> dict[str, float]:
        hits = np.asarray(eval_pred.predictions) == np.asarray(eval_pred.label_ids)[:, None]  # j-th best == label
        return {"accuracy" if k == 1 else f"top{k}_accuracy": float(hits[:, :k].any(axis=1).mean()) for k in ks}

    return preprocess_logits_for_metrics, compute_metrics


def write_model_card(trainer: ClassificationTrainer, model_args: ModelArguments, dataset_name: str,
                     eval_metrics: dict[str, float] | None) -> None:
    """Trainer's model card (model-index: image-classification, dataset, top-1) plus top-5 and the recipe."""
    from huggingface_hub import EvalResult, ModelCard

    kwargs = dict(tasks="image-classification", dataset=dataset_name, dataset_tags=dataset_name,
                  tags=["image-classification", "cim", "linear-probe" if model_args.linear_probe else "fine-tuned"])
    if not os.path.isdir(model_args.model_name_or_path):
        kwargs["finetuned_from"] = model_args.model_name_or_path
    trainer.create_model_card(**kwargs)
    if not trainer.is_world_process_zero():
        return
    path = os.path.join(trainer.args.output_dir, "README.md")
    card = ModelCard.load(path)
    top5 = (eval_metrics or {}).get("eval_top5_accuracy")
    results = list(card.data.eval_results or [])
    if top5 is not None:
        for result in [r for r in results if r.metric_type == "accuracy"]:
            results.append(EvalResult(
                task_type=result.task_type, task_name=result.task_name, dataset_type=result.dataset_type,
                dataset_name=result.dataset_name, dataset_config=result.dataset_config,
                dataset_split=result.dataset_split, dataset_args=result.dataset_args,
                metric_type="top_5_accuracy", metric_name="Top 5 Accuracy", metric_value=float(top5)))
        card.data.eval_results = results
    mode = "linear probing (frozen encoder)" if model_args.linear_probe else "end-to-end fine-tuning"
    card.text += (
        f"\n## Recipe\n\n{mode} of `{os.path.basename(os.path.normpath(model_args.model_name_or_path))}` at "
        f"{model_args.image_size} px with `run_image_classification.py` (transformers-cim): AdamW, layer decay "
        f"{trainer.layer_decay}, Mixup {trainer.mixup_alpha}, CutMix {trainer.cutmix_alpha}, label smoothing "
        f"{trainer.label_smoothing}.\n"
    )
    card.save(path)


# ------------------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------------------
def apply_recipe_defaults(model_args: ModelArguments, encoder_type: str) -> None:
    probe = model_args.linear_probe
    if model_args.layer_decay is None:
        model_args.layer_decay = 0.65 if (encoder_type == "vit" and not probe) else 1.0
    if model_args.mixup is None:
        model_args.mixup = 0.0 if probe else 0.8
    if model_args.cutmix is None:
        model_args.cutmix = 0.0 if probe else 1.0
    if model_args.label_smoothing is None:
        model_args.label_smoothing = 0.0 if probe else 0.1
    for name in ("mixup", "cutmix", "label_smoothing"):
        if getattr(model_args, name) < 0:
            raise ValueError(f"--{name} must be >= 0, got {getattr(model_args, name)}.")
    if not 0 < model_args.layer_decay <= 1:
        raise ValueError(f"--layer_decay must be in (0, 1], got {model_args.layer_decay}.")
    if model_args.label_smoothing >= 1:
        raise ValueError(f"--label_smoothing must be < 1, got {model_args.label_smoothing}.")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    model_args, data_args, training_args, explicit_lr = parse_arguments(argv)

    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%m/%d/%Y %H:%M:%S",
                        handlers=[logging.StreamHandler(sys.stdout)])
    log_level = training_args.get_process_log_level()
    logger.setLevel(log_level)
    datasets.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.set_verbosity(log_level)

    path = resolve_checkpoint_path(model_args.model_name_or_path, cache_dir=model_args.cache_dir, token=model_args.token)
    _, encoder_type = checkpoint_kind(path)
    apply_recipe_defaults(model_args, encoder_type)
    if data_args.streaming and training_args.max_steps <= 0:
        raise ValueError("--streaming needs --max_steps (a streamed dataset has no length).")

    total_batch = (training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps
                   * training_args.world_size)
    if not explicit_lr:
        base = training_args.base_learning_rate
        if base is None:
            base = 1e-3 if model_args.linear_probe else 5e-4
        training_args.learning_rate = base * total_batch / 256
    logger.info(f"Learning rate {training_args.learning_rate:.3g} (total batch {total_batch}); "
                f"layer decay {model_args.layer_decay}, mixup {model_args.mixup}, cutmix {model_args.cutmix}, "
                f"label smoothing {model_args.label_smoothing}, linear probe {model_args.linear_probe}.")
    transformers.set_seed(training_args.seed)

    stats = image_stats_from_checkpoint(path)
    mean, std = stats if stats is not None else (list(IMAGENET_DEFAULT_MEAN), list(IMAGENET_DEFAULT_STD))
    train_transform = RandomResizedCropFlip(size=model_args.image_size, scale=(data_args.crop_min_scale, 1.0),
                                            hflip=True, mean=mean, std=std)
    eval_transform = ResizeCenterCrop(size=model_args.image_size, crop_pct=data_args.crop_pct, mean=mean, std=std)
    train_ds, eval_ds, names, _, _ = build_datasets(data_args, model_args, training_args, train_transform,
                                                    eval_transform)
    if data_args.streaming:
        # each process reads its own stream batches (see fetch_batches_per_process); workers must divide the shards
        fetch_batches_per_process(training_args)
        shards = max(1, count_shards(train_ds) // max(1, training_args.world_size))
        training_args.dataloader_num_workers = check_num_workers(training_args.dataloader_num_workers, shards)
    id2label = dict(enumerate(names))
    label2id = {name: i for i, name in id2label.items()}
    if eval_ds is None and training_args.eval_strategy != "no":
        training_args.eval_strategy = transformers.IntervalStrategy.NO
        training_args.do_eval = False

    load_kwargs = {}
    if encoder_type == "vit" and model_args.attn_implementation:
        load_kwargs["attn_implementation"] = model_args.attn_implementation
    model = load_encoder_for_classification(path, len(names), id2label, label2id, model_args.image_size, **load_kwargs)
    if model_args.linear_probe:
        model = LinearProbeForImageClassification(model)
    image_processor = eval_transform.image_processor()  # pipeline() users get the evaluated pixels

    preprocess_logits, compute_metrics = make_metric_functions(len(names))
    trainer = ClassificationTrainer(
        model=model,
        args=training_args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        data_collator=SkippingCollator(),
        processing_class=image_processor,
        compute_metrics=compute_metrics,
        preprocess_logits_for_metrics=preprocess_logits,
        layer_decay=model_args.layer_decay,
        mixup_alpha=model_args.mixup,
        cutmix_alpha=model_args.cutmix,
        label_smoothing=model_args.label_smoothing,
        mix_seed=training_args.seed,
    )

    train_result = trainer.train(resume_from_checkpoint=training_args.checkpoint_to_resume(model))
    train_metrics = dict(train_result.metrics)
    if trainer.num_skipped_images:
        train_metrics["skipped_images"] = trainer.num_skipped_images
    trainer.log_metrics("train", train_metrics)
    trainer.save_metrics("train", train_metrics)
    trainer.save_state()

    results: dict[str, Any] = dict(train_metrics)
    eval_metrics = None
    if eval_ds is not None:
        eval_metrics = trainer.evaluate()
        trainer.log_metrics("eval", eval_metrics)
        trainer.save_metrics("eval", eval_metrics)
        results.update(eval_metrics)

    if model_args.linear_probe:
        # fold BatchNorm + Linear into the stock classifier: the saved model is a plain ViT/ResNet classifier
        final = model.to_classification_model()
        if trainer.is_world_process_zero():
            final.config.architectures = [type(final).__name__]
            final.save_pretrained(training_args.output_dir)
            image_processor.save_pretrained(training_args.output_dir)
    else:
        final = trainer.accelerator.unwrap_model(model)
        final.config.architectures = [type(final).__name__]
        trainer.save_model()  # model + image processor (processing_class)
    write_model_card(trainer, model_args, dataset_display_name(data_args), eval_metrics)
    logger.info(f"Saved the {type(final).__name__} and its image processor to {training_args.output_dir}.")
    return results


if __name__ == "__main__":
    main()
