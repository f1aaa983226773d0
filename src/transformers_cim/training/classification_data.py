"""The data of `run_image_classification.py`: the labelled training and evaluation sets (class names from a
``ClassLabel``, string labels class-encoded, the validation labels aligned to the training names by name, a held-out
share of the training set when there is no validation split), transformed lazily or seeded per row and epoch. The
arguments are the script's dataclasses (``data_args``, ``model_args``, ``training_args``)."""

from __future__ import annotations

import logging
import os

import datasets
import numpy as np
from transformers import TrainingArguments

from ..errors import UserValueError
from .data import (
    RandomResizedCropFlip,
    ResizeCenterCrop,
    SeededImageDataset,
    available_splits,
    build_classification_transform,
    find_image_column,
    find_label_column,
    prepare_dataset,
)
from .script_args import DataSourceArguments

logger = logging.getLogger("run_image_classification")

VALIDATION_SPLIT_NAMES = ("validation", "valid", "val", "test")

DEFAULT_DATASET_NAME = "scikit-image sample photos"


def load_split(data_args: DataSourceArguments, model_args, split: str):
    return data_args.load_split(split, cache_dir=model_args.cache_dir, token=model_args.token)


def has_source(data_args: DataSourceArguments) -> bool:
    return bool(
        data_args.dataset_name
        or data_args.train_dir
        or data_args.validation_dir
        or data_args.train_files
        or data_args.validation_files
    )


def validation_split_name(data_args: DataSourceArguments, model_args) -> str | None:
    """The split to evaluate on: 'validation' for dirs/files given, the first existing one of a dataset, else None."""
    if not has_source(data_args):
        logger.warning(
            f"No dataset given: training and evaluating on the {DEFAULT_DATASET_NAME} (one class per "
            "photo; evaluation uses center crops of the training photos). Pass a dataset for real use."
        )
        return "validation"  # the default dataset answers every split
    if data_args.train_dir or data_args.train_files:
        return "validation" if (data_args.validation_dir or data_args.validation_files) else None
    builder = datasets.load_dataset_builder(
        data_args.dataset_name, data_args.dataset_config_name, cache_dir=model_args.cache_dir, token=model_args.token
    )
    splits = available_splits(builder)
    return next((s for s in VALIDATION_SPLIT_NAMES if s in splits), None)


def dataset_display_name(data_args: DataSourceArguments) -> str:
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
            lambda batch: {
                label_column: [int(mapping[v]) if v is not None and v >= 0 else v for v in batch[label_column]]
            },
            batched=True,
            features=datasets.Features({**eval_ds.features, label_column: new_feature}),
        )
    if isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string"):
        unknown = sorted(set(eval_ds.unique(label_column)) - set(names))
        if unknown:
            raise UserValueError(f"The validation set has classes not in the training set: {unknown[:5]}.")
        return eval_ds.cast_column(label_column, datasets.ClassLabel(names=names))
    return eval_ds


def subset(ds, n: int | None, seed: int, streaming: bool):
    if n is None:
        return ds
    if streaming:
        return ds.take(n)
    return ds.shuffle(seed=seed).select(range(min(n, len(ds))))


def build_datasets(
    data_args: DataSourceArguments,
    model_args,
    training_args: TrainingArguments,
    train_transform: RandomResizedCropFlip,
    eval_transform: ResizeCenterCrop,
    class_names: list[str] | None = None,
):
    """Train / eval datasets (transformed lazily), the class names, the column names and which images the eval set
    is (a split name, or the share of the training set held out). `class_names` (those of a fine-tuned classifier
    being evaluated) fixes the label ids; the dataset must have exactly these classes."""
    train_raw = load_split(data_args, model_args, "train")
    image_column = find_image_column(train_raw, data_args.image_column_name)
    label_column = find_label_column(train_raw, data_args.label_column_name)
    if label_column is None:
        columns = list(train_raw.features) if train_raw.features is not None else train_raw.column_names
        raise UserValueError(f"No label column found among {columns}; name it with --label_column_name.")
    train_raw, names = resolve_labels(train_raw, label_column, data_args.streaming)
    if len(names) < 2:
        raise UserValueError(f"The training set has a single class ({names}); classification needs at least 2.")
    if class_names is not None and set(class_names) != set(names):
        raise UserValueError(
            f"The checkpoint's classifier knows the classes {sorted(class_names)[:10]}, the dataset "
            f"has {sorted(names)[:10]}: evaluating it needs the same classes (or add --do_train)."
        )
    if class_names is not None and list(class_names) != names:
        train_raw = align_validation_labels(train_raw, label_column, list(class_names))
        names = list(class_names)

    eval_raw = None
    split = validation_split_name(data_args, model_args)
    if split is not None:
        eval_raw = load_split(data_args, model_args, split)
        if label_column not in (eval_raw.features or {}):
            raise UserValueError(f"The validation split has no label column {label_column!r}.")
        if not data_args.streaming:
            eval_raw = align_validation_labels(eval_raw, label_column, names)
    elif data_args.train_val_split and data_args.train_val_split > 0:
        if data_args.streaming:
            raise UserValueError(
                "--train_val_split needs a map-style dataset; give a validation split when streaming."
            )
        stratify = label_column if isinstance(train_raw.features[label_column], datasets.ClassLabel) else None
        try:
            parts = train_raw.train_test_split(
                test_size=data_args.train_val_split, seed=training_args.seed, stratify_by_column=stratify
            )
        except ValueError:  # too few images per class to stratify
            parts = train_raw.train_test_split(test_size=data_args.train_val_split, seed=training_args.seed)
        train_raw, eval_raw = parts["train"], parts["test"]
        split = f"{data_args.train_val_split:.0%} of train, held out"
        logger.info(
            f"No validation split: held out {len(eval_raw)} training images ({data_args.train_val_split:.0%})."
        )
    else:
        logger.warning("No validation split and --train_val_split 0: no evaluation.")

    if data_args.streaming:
        train_raw = train_raw.shuffle(seed=training_args.seed, buffer_size=data_args.shuffle_buffer_size)
    train_raw = subset(train_raw, data_args.max_train_samples, training_args.seed, data_args.streaming)
    if eval_raw is not None:
        eval_raw = subset(eval_raw, data_args.max_eval_samples, training_args.seed, data_args.streaming)

    if data_args.streaming:
        train_ds = prepare_dataset(
            train_raw,
            image_column,
            build_classification_transform(image_column, label_column, train_transform, data_args.min_image_size),
        )
    else:  # crops seeded per (seed, epoch, row): a resumed run sees the views the uninterrupted one saw
        train_ds = SeededImageDataset(
            train_raw,
            image_column,
            train_transform,
            min_size=data_args.min_image_size,
            seed=training_args.seed,
            label_column=label_column,
        )
    eval_ds = None
    if eval_raw is not None:
        eval_ds = prepare_dataset(
            eval_raw,
            image_column,
            build_classification_transform(image_column, label_column, eval_transform, data_args.min_image_size),
        )
    return train_ds, eval_ds, names, image_column, label_column, split


__all__ = [
    "DEFAULT_DATASET_NAME",
    "VALIDATION_SPLIT_NAMES",
    "align_validation_labels",
    "build_datasets",
    "dataset_display_name",
    "has_source",
    "load_split",
    "resolve_labels",
    "subset",
    "validation_split_name",
]
