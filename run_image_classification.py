#!/usr/bin/env python
"""Fine-tune or linear-probe a CIM (or any ViT / ResNet) checkpoint for image classification; report top-1/top-5.

The model can be a CIM pre-training checkpoint (its online encoder is used, or its EMA target encoder with
``--use_ema_encoder``), an encoder exported with ``cim-export-encoder``, or any ViT / ResNet checkpoint, as a local
directory or a Hub model id. The result is a stock checkpoint with its image processor (which computes the evaluation
transform), loadable with no custom code: for a ViT fine-tuned with the CIM authors' head (``--pooling mean``, the
default: mean of the patch tokens + LayerNorm, drop-path) a ``BeitForImageClassification`` that is exactly the ViT
(see ``transformers_cim.transfer``); with ``--pooling cls`` or for a linear probe a ``ViTForImageClassification``; for
a ResNet a ``ResNetForImageClassification``.

Quick start (offline; the scikit-image sample photos when no dataset is given):

    python run_image_classification.py --model_name_or_path outputs/cim-quickstart --image_size 128 \
        --output_dir outputs/cim-quickstart-ft

The authors' recipe (the defaults; ViT-B/16, ImageNet-1K, 100 epochs): mean pooling + LayerNorm, base lr 1.2e-3 x
batch / 256, layer decay 0.8, drop-path 0.1, random erasing 0.25, Mixup 0.8, CutMix 1.0, label smoothing 0.1:

    python run_image_classification.py --model_name_or_path outputs/cim-vit-b --dataset_name ILSVRC/imagenet-1k \
        --per_device_train_batch_size 128 --num_train_epochs 100 --bf16 --output_dir outputs/cim-vit-b-ft

Linear probing (frozen encoder, BatchNorm + linear head on the CLS feature): add ``--linear_probe``.
Stages, as in transformers' example scripts: ``--do_train``, ``--do_eval`` (alone: score a fine-tuned classifier as
it is), ``--do_predict`` (``predictions.csv``: row, label, score for ``--test_dir`` / ``--test_files`` or a dataset's
test split); with none of them given, the script trains and evaluates.
Arguments may also come from one ``.json`` file: ``python run_image_classification.py args.json``.
User errors (a missing path, a bad value, an empty dataset, a checkpoint of the wrong kind) end in one line on stderr
and exit status 2.
"""

from __future__ import annotations

import csv
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
from transformers import BeitForImageClassification, EvalPrediction, TrainingArguments

from transformers_cim.checkpoint_loading import checkpoint_kind, encoder_config_from_checkpoint, image_stats_from_checkpoint, resolve_checkpoint_path
from transformers_cim.training.data import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    RandomResizedCropFlip,
    ResizeCenterCrop,
    SeededImageDataset,
    SkippingCollator,
    available_splits,
    build_classification_transform,
    build_pretraining_transform,
    check_num_workers,
    count_shards,
    find_image_column,
    find_label_column,
    prepare_dataset,
)
from transformers_cim.errors import UserPathError, UserValueError, exit_on_user_error
from transformers_cim.encoder_loading import load_encoder_for_classification
from transformers_cim.training.classification_trainer import ClassificationTrainer
from transformers_cim.training.linear_probe import LinearProbeForImageClassification
from transformers_cim.training.modelcard import build_classification_card, card_license, write_model_card as write_card_file
from transformers_cim.training.script_args import (
    DataSourceArguments,
    ResumableTrainingArguments,
    ScriptArgumentParser,
    choose_stages,
    parse_with_given,
    set_learning_rate,
)
from transformers_cim.training.utils import fetch_batches_per_process
from transformers_cim.transfer import beit_for_image_classification


logger = logging.getLogger("run_image_classification")

VALIDATION_SPLIT_NAMES = ("validation", "valid", "val", "test")
DEFAULT_DATASET_NAME = "scikit-image sample photos"


@dataclass
class ModelArguments:
    """The checkpoint to start from and the fine-tuning recipe."""

    _argument_group_name = "model and fine-tuning recipe"

    model_name_or_path: str | None = field(default=None, metadata={
        "help": "Required. A CIM pre-training checkpoint, an exported encoder or a ViT/ResNet checkpoint: a local "
                "directory or a Hub model id (downloaded, or from the Hub cache when HF_HUB_OFFLINE=1)."})
    model_revision: str = field(default="main", metadata={
        "help": "The Hub revision (branch, tag or commit) of --model_name_or_path and --image_processor_name."})
    image_processor_name: str | None = field(default=None, metadata={
        "help": "An image processor (local folder or Hub id) whose mean / std normalise the images instead of the "
                "checkpoint's; resizing stays --image_size with the bicubic resize + centre crop of the saved processor."})
    ignore_mismatched_sizes: bool = field(default=False, metadata={
        "help": "Re-initialise encoder weights whose shapes do not fit the checkpoint's config instead of stopping. "
                "The classification head is always new when the label count differs."})
    trust_remote_code: bool = field(default=False, metadata={
        "help": "Allow custom code from the Hub for --image_processor_name. (The model is always a stock ViT / ResNet "
                "loaded without custom code, and datasets runs no dataset scripts.)"})
    license: str | None = field(default=None, metadata={
        "help": "Licence stated in the model card (a Hub licence id, e.g. apache-2.0, mit, cc-by-nc-4.0). Default: "
                "the base checkpoint card's licence, else none stated."})
    image_size: int = field(default=224, metadata={
        "help": "Training / evaluation resolution. For ViT, the position embeddings are interpolated (bicubic) "
                "when it differs from the checkpoint's."})
    pooling: str | None = field(default=None, metadata={
        "help": "ViT fine-tuning head: 'mean' (mean of the patch tokens + a new LayerNorm, the CIM authors' default; "
                "saved as a stock BeitForImageClassification that computes exactly the ViT) or 'cls' (the CLS token "
                "after the final LayerNorm; a ViTForImageClassification). Default: mean, or cls for --linear_probe.",
        "choices": ["mean", "cls"]})
    drop_path_rate: float | None = field(default=None, metadata={
        "help": "Stochastic depth of the ViT blocks (needs --pooling mean: ViTForImageClassification has none). "
                "Default: 0.1 (the authors' recipe) with mean pooling, else 0."})
    random_erasing: float | None = field(default=None, metadata={
        "help": "Probability of random erasing (one rectangle of per-pixel noise) of a training view. Default: 0.25 "
                "for fine-tuning (the authors' recipe), 0 for linear probing."})
    use_ema_encoder: bool = field(default=False, metadata={
        "help": "Fine-tune the EMA target encoder of a CIM pre-training checkpoint instead of its online encoder "
                "(the authors' --use_ema option)."})
    linear_probe: bool = field(default=False, metadata={
        "help": "Freeze the encoder; train BatchNorm1d(affine=False) + Linear on the CLS (ViT) / pooled (ResNet) "
                "feature (MAE's linear probing). The saved model folds the probe into a stock classifier."})
    layer_decay: float | None = field(default=None, metadata={
        "help": "Layer-wise lr decay (1.0 = off). Default: 0.8 for ViT fine-tuning (the CIM authors' recipe; MAE's "
                "ViT-B recipe uses 0.65), else 1.0."})
    mixup: float | None = field(default=None, metadata={
        "help": "Mixup alpha (0 = off). Default: 0.8 for fine-tuning, 0 for linear probing."})
    cutmix: float | None = field(default=None, metadata={
        "help": "CutMix alpha (0 = off). Default: 1.0 for fine-tuning, 0 for linear probing."})
    label_smoothing: float | None = field(default=None, metadata={
        "help": "Deprecated alias of --label_smoothing_factor (the Trainer's flag), with a warning."})
    attn_implementation: str | None = field(default="sdpa", metadata={
        "help": "ViT attention: eager, sdpa or flash_attention_2."})
    cache_dir: str | None = field(default=None, metadata={"help": "Where datasets and Hub models are cached."})
    token: str | None = field(default=None, metadata={"help": "Hub token for private datasets and models."})


@dataclass
class DataTrainingArguments(DataSourceArguments):
    """Where the labelled images come from (the shared `DataSourceArguments`: one source; none = the scikit-image
    sample photos) and how they are prepared."""

    _argument_group_name = "data"

    test_dir: str | None = field(default=None, metadata={
        "help": "A folder of images to predict with --do_predict (no labels needed). Default: a dataset's test split."})
    test_files: list[str] | None = field(default=None, metadata={"help": "Data files to predict with --do_predict."})
    label_column_name: str | None = field(default=None, metadata={"help": "Label column; auto-detected if unset."})
    train_val_split: float | None = field(default=0.15, metadata={
        "help": "Fraction of the training set held out for validation when there is no validation split "
                "(0 = no evaluation)."})
    shuffle_buffer_size: int = field(default=10_000, metadata={"help": "Shuffle buffer of a streamed dataset."})
    crop_min_scale: float = field(default=0.08, metadata={"help": "Smallest area fraction of the training crop."})
    crop_pct: float | None = field(default=None, metadata={
        "help": "Evaluation: resize to image_size/crop_pct, center-crop. Default: the CIM authors' 0.95 up to 224 px, "
                "1.0 above (MAE's is 0.875)."})
    min_image_size: int = field(default=16, metadata={"help": "Images with a shorter side are skipped."})


@dataclass
class ClassificationTrainingArguments(ResumableTrainingArguments):
    """`TrainingArguments` with fine-tuning defaults (AdamW, wd 0.05, cosine with 5% warm-up, per-epoch eval)."""

    _argument_group_name = "training (the fine-tuning recipe's defaults)"

    base_learning_rate: float | None = field(default=None, metadata={
        "help": "lr = base_learning_rate * total batch / 256 unless --learning_rate is given. Default: 1.2e-3 "
                "(ViT fine-tuning, the CIM authors' recipe), 5e-4 (ResNet fine-tuning) or 1e-3 (linear probing)."})
    label_smoothing_factor: float | None = field(default=None, metadata={
        "help": "Label smoothing (training only; with Mixup / CutMix, of the mixed targets). Default: 0.1 for "
                "fine-tuning, 0 for linear probing."})
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

    def __post_init__(self):
        self.do_eval_as_given = self.do_eval  # TrainingArguments turns do_eval on whenever eval_strategy is not "no"
        super().__post_init__()


def parse_arguments(argv: list[str] | None = None):
    """The three argument dataclasses and the names of the arguments given explicitly (command line or ``.json``)."""
    parser = ScriptArgumentParser((ModelArguments, DataTrainingArguments, ClassificationTrainingArguments))
    (model_args, data_args, training_args), given = parse_with_given(parser, argv)
    return model_args, data_args, training_args, given


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
        raise UserValueError(
            f"Label column {label_column!r} is not a ClassLabel ({feature!r}); streaming needs class names in the "
            "dataset features. Drop --streaming or use a dataset with a ClassLabel column."
        )
    if isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string"):
        ds = ds.class_encode_column(label_column)
        return ds, list(ds.features[label_column].names)
    if isinstance(feature, datasets.Value) and ("int" in feature.dtype):
        values = [v for v in ds.unique(label_column) if v is not None]
        if not values:
            raise UserValueError(f"Label column {label_column!r} has no labels.")
        if min(values) < 0:
            raise UserValueError(f"Label column {label_column!r} has negative labels {sorted(values)[:5]}.")
        return ds, [str(i) for i in range(max(values) + 1)]
    raise UserValueError(
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
            raise UserValueError(f"The validation set has classes not in the training set: {unknown[:5]}.")
        mapping = np.array([names.index(n) for n in feature.names], dtype=np.int64)
        new_feature = datasets.ClassLabel(names=names)
        return eval_ds.map(
            lambda batch: {label_column: [int(mapping[v]) if v is not None and v >= 0 else v for v in batch[label_column]]},
            batched=True, features=datasets.Features({**eval_ds.features, label_column: new_feature}),
        )
    if isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string"):
        unknown = sorted(set(eval_ds.unique(label_column)) - set(names))
        if unknown:
            raise UserValueError(f"The validation set has classes not in the training set: {unknown[:5]}.")
        return eval_ds.cast_column(label_column, datasets.ClassLabel(names=names))
    return eval_ds


def _subset(ds, n: int | None, seed: int, streaming: bool):
    if n is None:
        return ds
    if streaming:
        return ds.take(n)
    return ds.shuffle(seed=seed).select(range(min(n, len(ds))))


def build_datasets(data_args: DataTrainingArguments, model_args: ModelArguments, training_args: TrainingArguments,
                   train_transform: RandomResizedCropFlip, eval_transform: ResizeCenterCrop,
                   class_names: list[str] | None = None):
    """Train / eval datasets (transformed lazily), the class names, the column names and which images the eval set
    is (a split name, or the share of the training set held out). `class_names` (those of a fine-tuned classifier
    being evaluated) fixes the label ids; the dataset must have exactly these classes."""
    train_raw = _load(data_args, model_args, "train")
    image_column = find_image_column(train_raw, data_args.image_column_name)
    label_column = find_label_column(train_raw, data_args.label_column_name)
    if label_column is None:
        columns = list(train_raw.features) if train_raw.features is not None else train_raw.column_names
        raise UserValueError(f"No label column found among {columns}; name it with --label_column_name.")
    train_raw, names = resolve_labels(train_raw, label_column, data_args.streaming)
    if len(names) < 2:
        raise UserValueError(f"The training set has a single class ({names}); classification needs at least 2.")
    if class_names is not None and set(class_names) != set(names):
        raise UserValueError(f"The checkpoint's classifier knows the classes {sorted(class_names)[:10]}, the dataset "
                             f"has {sorted(names)[:10]}: evaluating it needs the same classes (or add --do_train).")
    if class_names is not None and list(class_names) != names:
        train_raw = align_validation_labels(train_raw, label_column, list(class_names))
        names = list(class_names)

    eval_raw = None
    split = validation_split_name(data_args, model_args)
    if split is not None:
        eval_raw = _load(data_args, model_args, split)
        if label_column not in (eval_raw.features or {}):
            raise UserValueError(f"The validation split has no label column {label_column!r}.")
        if not data_args.streaming:
            eval_raw = align_validation_labels(eval_raw, label_column, names)
    elif data_args.train_val_split and data_args.train_val_split > 0:
        if data_args.streaming:
            raise UserValueError("--train_val_split needs a map-style dataset; give a validation split when streaming.")
        stratify = label_column if isinstance(train_raw.features[label_column], datasets.ClassLabel) else None
        try:
            parts = train_raw.train_test_split(test_size=data_args.train_val_split, seed=training_args.seed,
                                               stratify_by_column=stratify)
        except ValueError:  # too few images per class to stratify
            parts = train_raw.train_test_split(test_size=data_args.train_val_split, seed=training_args.seed)
        train_raw, eval_raw = parts["train"], parts["test"]
        split = f"{data_args.train_val_split:.0%} of train, held out"
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
    return train_ds, eval_ds, names, image_column, label_column, split


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


def write_model_card(trainer: ClassificationTrainer, model_args: ModelArguments, data_args: DataTrainingArguments,
                     checkpoint_dir: str, num_labels: int, eval_split: str | None, results: dict[str, Any]) -> None:
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
        "head": {"mean": "mean of the patch tokens + LayerNorm (the CIM authors' fine-tuning head; a "
                         "BeitForImageClassification that computes exactly the ViT)",
                 "cls": "CLS token after the final LayerNorm", None: "global average pooling"}[model_args.pooling],
        "encoder weights": "the EMA target encoder" if model_args.use_ema_encoder else "the online encoder",
        "drop-path": model_args.drop_path_rate,
        "random erasing": model_args.random_erasing,
        "layer decay": trainer.layer_decay,
        "Mixup / CutMix": f"{trainer.mixup_alpha} / {trainer.cutmix_alpha}",
        "label smoothing (--label_smoothing_factor)": trainer.label_smoothing,
        "seed": args.seed,
    }
    card = build_classification_card(
        model_name=os.path.basename(os.path.normpath(args.output_dir)), base=model_args.model_name_or_path,
        base_is_hub_id=not os.path.isdir(model_args.model_name_or_path), encoder_config=encoder_config_from_checkpoint(
            checkpoint_dir), linear_probe=model_args.linear_probe, dataset_name=dataset_display_name(data_args),
        eval_split=eval_split, num_labels=num_labels, recipe=recipe, results=results,
        license=model_args.license or card_license(checkpoint_dir))
    write_card_file(args.output_dir, card)


# ------------------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------------------
def apply_recipe_defaults(model_args: ModelArguments, training_args: ClassificationTrainingArguments,
                          encoder_type: str) -> None:
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
            raise UserValueError(f"--label_smoothing {model_args.label_smoothing} and --label_smoothing_factor {factor} "
                                 "disagree; give --label_smoothing_factor only.")
        logger.warning("--label_smoothing is deprecated: use --label_smoothing_factor (the Trainer's flag), which "
                       "is what the run uses and the model card reports.")
        training_args.label_smoothing_factor = model_args.label_smoothing
    if training_args.label_smoothing_factor is None:
        training_args.label_smoothing_factor = 0.0 if probe else 0.1
    for name, value in (("mixup", model_args.mixup), ("cutmix", model_args.cutmix),
                        ("label_smoothing_factor", training_args.label_smoothing_factor)):
        if value < 0:
            raise UserValueError(f"--{name} must be >= 0, got {value}.")
    if not 0 < model_args.layer_decay <= 1:
        raise UserValueError(f"--layer_decay must be in (0, 1], got {model_args.layer_decay}.")
    if training_args.label_smoothing_factor >= 1:
        raise UserValueError(f"--label_smoothing_factor must be < 1, got {training_args.label_smoothing_factor}.")


def choose_head(model_args: ModelArguments, encoder_type: str) -> None:
    """--pooling and --drop_path_rate: the authors' mean-pool head with drop-path 0.1 for ViT fine-tuning, the CLS
    token for a linear probe; ResNet pools globally whatever is asked, and neither stock class has drop-path."""
    if encoder_type != "vit":
        if model_args.pooling == "mean" or (model_args.drop_path_rate or 0) > 0:
            raise UserValueError("--pooling mean and --drop_path_rate apply to ViT encoders; a ResNet classifier "
                                 "always pools globally and has no drop-path. Leave them unset.")
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
        raise UserValueError("--drop_path_rate needs --pooling mean: the CLS-token model, a stock "
                             "ViTForImageClassification, has no drop-path.")


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


def image_statistics(model_args: ModelArguments, checkpoint_dir: str) -> tuple[list[float], list[float]]:
    """Normalisation mean / std: --image_processor_name's, else the checkpoint's, else ImageNet's."""
    if model_args.image_processor_name:
        from transformers import AutoImageProcessor

        try:
            processor = AutoImageProcessor.from_pretrained(
                model_args.image_processor_name, revision=model_args.model_revision, cache_dir=model_args.cache_dir,
                token=model_args.token, trust_remote_code=model_args.trust_remote_code)
        except OSError as err:
            raise UserPathError(f"--image_processor_name {model_args.image_processor_name!r}: {err}") from None
        mean, std = getattr(processor, "image_mean", None), getattr(processor, "image_std", None)
        if mean is None or std is None:
            raise UserValueError(f"--image_processor_name {model_args.image_processor_name!r} has no image_mean / "
                                 "image_std to normalise with.")
        logger.info(f"Normalising with the mean {mean} and std {std} of {model_args.image_processor_name}.")
        return list(mean), list(std)
    stats = image_stats_from_checkpoint(checkpoint_dir)
    return stats if stats is not None else (list(IMAGENET_DEFAULT_MEAN), list(IMAGENET_DEFAULT_STD))


def _collate_all_rows(rows: list[dict]) -> dict[str, torch.Tensor]:
    """Every row of a prediction batch, in order, the unusable ones too (flagged by ``cim_valid``)."""
    return {"pixel_values": torch.stack([torch.as_tensor(row["pixel_values"]) for row in rows]),
            "cim_valid": torch.tensor([bool(row["cim_valid"]) for row in rows])}


@torch.no_grad()
def write_predictions(model: torch.nn.Module, test_ds, names: list[str], args: ClassificationTrainingArguments,
                      path: str) -> int:
    """Predicts every test row in order and writes ``row,label,score`` (top-1 class and its softmax probability) to
    `path`; a row whose image could not be used gets an empty label and score. Returns the number of rows."""
    loader = torch.utils.data.DataLoader(test_ds, batch_size=args.per_device_eval_batch_size,
                                         num_workers=args.dataloader_num_workers, collate_fn=_collate_all_rows)
    parameter = next(model.parameters())
    was_training = model.training
    model.eval()
    count = 0
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["row", "label", "score"])
        for batch in loader:
            pixel_values = batch["pixel_values"].to(device=parameter.device, dtype=parameter.dtype)
            scores, ids = model(pixel_values=pixel_values).logits.float().softmax(-1).max(-1)
            for valid, score, index in zip(batch["cim_valid"].tolist(), scores.tolist(), ids.tolist()):
                writer.writerow([count, names[index], f"{score:.6f}"] if valid else [count, "", ""])
                count += 1
    model.train(was_training)
    return count


def main(argv: list[str] | None = None) -> dict[str, Any]:
    model_args, data_args, training_args, given = parse_arguments(argv)

    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%m/%d/%Y %H:%M:%S",
                        handlers=[logging.StreamHandler(sys.stdout)])
    log_level = training_args.get_process_log_level()
    logger.setLevel(logging.INFO if training_args.should_log else log_level)  # this script's lines on the main process
    datasets.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.set_verbosity(log_level)

    if choose_stages(training_args, given):
        logger.info("No --do_train / --do_eval / --do_predict given: training and evaluating (--do_train --do_eval).")
    path = resolve_checkpoint_path(model_args.model_name_or_path, cache_dir=model_args.cache_dir, token=model_args.token,
                                   revision=model_args.model_revision)
    fine_tuned_beit = saved_model_type(path) == "beit"
    if fine_tuned_beit:
        if training_args.do_train:
            raise UserValueError(f"{model_args.model_name_or_path} is a fine-tuned (BEiT-class) classifier; fine-tune "
                                 "from the pre-training checkpoint or the exported encoder instead. --do_eval / "
                                 "--do_predict score it as it is.")
        encoder_type = "vit"
    else:
        _, encoder_type = checkpoint_kind(path)
    apply_recipe_defaults(model_args, training_args, encoder_type)
    if data_args.streaming and training_args.max_steps <= 0 and training_args.do_train:
        raise UserValueError("--streaming needs --max_steps (a streamed dataset has no length).")
    class_names = None
    if not training_args.do_train:  # evaluate / predict the checkpoint as it is: its head must be trained
        class_names = fine_tuned_class_names(path)
        if class_names is None:
            raise UserValueError(f"{model_args.model_name_or_path} is not a fine-tuned classifier (its classification "
                                 "head would be new, hence random): evaluating or predicting with it needs --do_train.")
        if model_args.linear_probe:
            logger.warning("--linear_probe is ignored without --do_train: the checkpoint is evaluated as it is.")
            model_args.linear_probe = False

    base = training_args.base_learning_rate
    if base is None:
        base = 1e-3 if model_args.linear_probe else (1.2e-3 if encoder_type == "vit" else 5e-4)
    if training_args.do_train:
        logger.info(set_learning_rate(training_args, base, "learning_rate" in given))
        logger.info(f"Layer decay {model_args.layer_decay}, mixup {model_args.mixup}, cutmix {model_args.cutmix}, "
                    f"label smoothing {training_args.label_smoothing_factor}, random erasing "
                    f"{model_args.random_erasing}, pooling {model_args.pooling}, drop-path {model_args.drop_path_rate}, "
                    f"linear probe {model_args.linear_probe}.")
    transformers.set_seed(training_args.seed)

    if data_args.crop_pct is None:
        data_args.crop_pct = 0.95 if model_args.image_size <= 224 else 1.0
    mean, std = image_statistics(model_args, path)
    train_transform = RandomResizedCropFlip(size=model_args.image_size, scale=(data_args.crop_min_scale, 1.0),
                                            hflip=True, mean=mean, std=std, random_erasing=model_args.random_erasing)
    eval_transform = ResizeCenterCrop(size=model_args.image_size, crop_pct=data_args.crop_pct, mean=mean, std=std)
    train_ds, eval_ds, names, _, _, eval_split = build_datasets(
        data_args, model_args, training_args, train_transform, eval_transform, class_names)
    test_ds = None
    if training_args.do_predict:  # opened now: a missing test split fails before training
        test_raw = _load(data_args, model_args, "test")
        test_column = find_image_column(test_raw, data_args.image_column_name)
        test_ds = prepare_dataset(test_raw, test_column, build_pretraining_transform(test_column, eval_transform,
                                                                                     data_args.min_image_size))
    if not training_args.do_train:
        train_ds = None
    if data_args.streaming and train_ds is not None:
        # each process reads its own stream batches (see fetch_batches_per_process); workers must divide the shards
        fetch_batches_per_process(training_args)
        shards = max(1, count_shards(train_ds) // max(1, training_args.world_size))
        training_args.dataloader_num_workers = check_num_workers(training_args.dataloader_num_workers, shards)
    id2label = dict(enumerate(names))
    label2id = {name: i for i, name in id2label.items()}
    if eval_ds is None and training_args.do_eval:
        logger.warning("No evaluation set (no validation split and --train_val_split 0): --do_eval is ignored.")
        training_args.do_eval = False
        training_args.eval_strategy = transformers.IntervalStrategy.NO
    if not training_args.do_eval:
        eval_ds = None

    load_kwargs = {}
    if encoder_type == "vit" and model_args.attn_implementation:
        load_kwargs["attn_implementation"] = model_args.attn_implementation
    encoder_weights = "ema" if model_args.use_ema_encoder else "online"
    if fine_tuned_beit:  # evaluated / predicted as it is
        model = BeitForImageClassification.from_pretrained(path)
    elif encoder_type == "vit" and model_args.pooling == "mean" and training_args.do_train:
        model = beit_for_image_classification(
            path, len(names), id2label=id2label, label2id=label2id, drop_path_rate=model_args.drop_path_rate,
            image_size=model_args.image_size, seed=training_args.seed, encoder_weights=encoder_weights)
    else:
        model = load_encoder_for_classification(path, len(names), id2label, label2id, model_args.image_size,
                                                ignore_mismatched_sizes=model_args.ignore_mismatched_sizes,
                                                encoder_weights=encoder_weights, **load_kwargs)
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
        mix_seed=training_args.seed,
    )

    results: dict[str, Any] = {}
    if training_args.do_train:
        train_result = trainer.train(resume_from_checkpoint=training_args.checkpoint_to_resume(model))
        train_metrics = dict(train_result.metrics)
        train_metrics["skipped_images"] = trainer.total_skipped_images()  # distinct images, all processes
        trainer.log_metrics("train", train_metrics)
        trainer.save_metrics("train", train_metrics)
        trainer.save_state()
        results.update(train_metrics)

    if training_args.do_eval:
        eval_metrics = trainer.evaluate()
        trainer.log_metrics("eval", eval_metrics)
        trainer.save_metrics("eval", eval_metrics)
        results.update(eval_metrics)

    final = trainer.accelerator.unwrap_model(model)
    if model_args.linear_probe:
        # fold BatchNorm + Linear into the stock classifier: the saved model is a plain ViT/ResNet classifier
        final = model.to_classification_model()
    if training_args.do_train:
        final.config.architectures = [type(final).__name__]
        if model_args.linear_probe:
            if trainer.is_world_process_zero():
                final.save_pretrained(training_args.output_dir)
                image_processor.save_pretrained(training_args.output_dir)
        else:
            trainer.save_model()  # model + image processor (processing_class)
        write_model_card(trainer, model_args, data_args, path, len(names), eval_split if training_args.do_eval
                         else None, results)
        logger.info(f"Saved the {type(final).__name__} and its image processor to {training_args.output_dir}.")

    if training_args.do_predict and trainer.is_world_process_zero():
        os.makedirs(training_args.output_dir, exist_ok=True)
        predictions = os.path.join(training_args.output_dir, "predictions.csv")
        count = write_predictions(final, test_ds, names, training_args, predictions)
        logger.info(f"Wrote {count} predictions (row, label, score) to {predictions}.")
        results["predictions_file"] = predictions
    if training_args.push_to_hub and training_args.do_train:
        trainer.push_to_hub(commit_message="Fine-tuned classifier, image processor and model card")
    return results


if __name__ == "__main__":
    exit_on_user_error(main)
