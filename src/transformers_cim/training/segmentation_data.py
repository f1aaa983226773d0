"""The data of `run_semantic_segmentation.py`: the splits of an image / mask folder pair or a dataset, the class
names (a dataset's ClassLabel, an ``id2label.json`` or the encoder's), the rows with their masks transformed (seeded
per
row and epoch, or streamed), and the names the predicted masks are saved under. The arguments are the script's
dataclasses (``data_args``, ``model_args``)."""

from __future__ import annotations

import collections
import json
import logging
import os

import datasets

from ..errors import UserPathError, UserValueError
from .data import (
    available_splits,
    decode_image,
    find_image_column,
    image_name,
    without_image_decoding,
)
from .data.segmentation import (
    MaskRules,
    SeededSegmentationDataset,
    find_mask_column,
    prepare_segmentation_stream,
    segmentation_folder_dataset,
)
from .script_args import (
    DataSourceArguments,
)

logger = logging.getLogger("run_semantic_segmentation")

VALIDATION_SPLIT_NAMES = ("validation", "valid", "val")


def has_folders(data_args: DataSourceArguments) -> bool:
    return bool(data_args.train_dir or data_args.validation_dir or data_args.test_dir)


def load_split(data_args: DataSourceArguments, model_args, split: str):
    """One split: image/mask folders (``train`` / ``validation`` / ``test`` from the three --*_dir), else the
    dataset or files through the package's loader."""
    if has_folders(data_args):
        if data_args.dataset_name or data_args.train_files or data_args.validation_files:
            raise UserValueError(
                "Give one data source: --dataset_name, --train_files/--validation_files, or "
                "--train_dir/--validation_dir/--test_dir."
            )
        directory = {
            "train": data_args.train_dir,
            "validation": data_args.validation_dir,
            "test": data_args.test_dir,
        }.get(split)
        if directory is None:
            raise UserValueError(f"No --{split}_dir given for the {split} images.")
        ds = segmentation_folder_dataset(directory, f"{split}_dir", require_masks=split != "test")
        return ds.to_iterable_dataset() if data_args.streaming else ds
    if not (data_args.dataset_name or data_args.train_files or data_args.validation_files):
        raise UserValueError(
            "No data: give --dataset_name (Hub id or local folder), --train_files, or --train_dir "
            "(a folder with images/ and masks/)."
        )
    return data_args.load_split(split, cache_dir=model_args.cache_dir, token=model_args.token)


def split_names(data_args: DataSourceArguments, model_args) -> list[str]:
    """The splits the source has."""
    if has_folders(data_args):
        return [
            s
            for s, d in (
                ("train", data_args.train_dir),
                ("validation", data_args.validation_dir),
                ("test", data_args.test_dir),
            )
            if d
        ]
    if data_args.train_files or data_args.validation_files:
        return ["train"] + (["validation"] if data_args.validation_files else [])
    builder = datasets.load_dataset_builder(
        data_args.dataset_name, data_args.dataset_config_name, cache_dir=model_args.cache_dir, token=model_args.token
    )
    return available_splits(builder)


def read_id2label_file(path: str) -> dict[int, str]:
    """``{id: name}`` from a JSON object ``{"0": "sky", ...}`` or a list of names."""
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise UserValueError(f"Cannot read the class names in {path!r}: {err}.") from None
    pairs = enumerate(raw) if isinstance(raw, list) else raw.items() if isinstance(raw, dict) else None
    try:
        id2label = {int(k): str(v) for k, v in pairs}
    except (TypeError, ValueError):
        raise UserValueError(f"{path!r} must hold {{id: name}} with integer ids, or a list of names.") from None
    if sorted(id2label) != list(range(len(id2label))) or not id2label:
        raise UserValueError(f"The class ids in {path!r} must be 0..N-1 without gaps, got {sorted(id2label)[:10]}.")
    return id2label


def find_id2label(data_args: DataSourceArguments, model_args) -> dict[int, str]:
    """The class names: --id2label, else id2label.json of the dataset folder / Hub dataset / image folder."""
    if data_args.id2label:
        if not os.path.isfile(data_args.id2label):
            raise UserPathError(f"--id2label {data_args.id2label!r} does not exist.")
        return read_id2label_file(data_args.id2label)
    candidates = []
    if data_args.dataset_name and os.path.isdir(data_args.dataset_name):
        candidates.append(os.path.join(data_args.dataset_name, "id2label.json"))
    for directory in (data_args.train_dir, data_args.validation_dir):
        if directory:
            candidates += [
                os.path.join(directory, "id2label.json"),
                os.path.join(os.path.dirname(os.path.normpath(directory)), "id2label.json"),
            ]
    for path in candidates:
        if os.path.isfile(path):
            return read_id2label_file(path)
    if data_args.dataset_name and not os.path.isdir(data_args.dataset_name):
        try:
            from huggingface_hub import hf_hub_download

            path = hf_hub_download(
                data_args.dataset_name,
                "id2label.json",
                repo_type="dataset",
                cache_dir=model_args.cache_dir,
                token=model_args.token,
            )
            return read_id2label_file(path)
        except Exception as err:  # noqa: BLE001 - offline, missing file: say what to do instead
            logger.info(f"No id2label.json in the Hub dataset {data_args.dataset_name}: {err}")
    raise UserValueError(
        "No class names: the dataset has no id2label.json. Give --id2label FILE (a JSON object "
        '{"0": "road", ...} of the classes after --reduce_labels).'
    )


def dataset_display_name(data_args: DataSourceArguments) -> str:
    name = data_args.dataset_name or data_args.train_dir or (data_args.train_files or ["local files"])[0]
    name = name.rstrip("/\\")
    return os.path.basename(name) if os.path.exists(name) else name


def subset(ds, n: int | None, streaming: bool, seed: int):
    if n is None:
        return ds
    return ds.take(n) if streaming else ds.shuffle(seed=seed).select(range(min(n, len(ds))))


def prepare_rows(raw, data_args: DataSourceArguments, transform, rules: MaskRules, seed: int, *, split: str):
    """Rows ``{"pixel_values", "labels", "cim_valid"}`` of a split: map-style and seeded, or streamed."""
    image_column = find_image_column(raw, data_args.image_column_name)
    mask_column = find_mask_column(raw, image_column, data_args.label_column_name)
    if data_args.label_column_name is None:
        logger.info(f"{split}: images in column {image_column!r}, masks in {mask_column!r}.")
    if data_args.streaming:
        return prepare_segmentation_stream(
            raw, image_column, mask_column, transform, rules, min_size=data_args.min_image_size
        )
    return SeededSegmentationDataset(
        raw, image_column, mask_column, transform, rules, min_size=data_args.min_image_size, seed=seed
    )


def has_mask_column(raw, data_args: DataSourceArguments) -> bool:
    try:
        find_mask_column(raw, find_image_column(raw, data_args.image_column_name), data_args.label_column_name)
    except UserValueError:
        return False
    return True


def first_image_size(raw, data_args: DataSourceArguments) -> tuple[int, int] | None:
    """``(height, width)`` of the split's first image (the size the saved image processor resizes to)."""
    column = find_image_column(raw, data_args.image_column_name)
    row = next(iter(without_image_decoding(raw, column)), None)
    image = decode_image(row[column]) if row is not None else None
    return (image.height, image.width) if image is not None else None


def row_names(raw, data_args: DataSourceArguments) -> list[str] | None:
    """The file-name stem of every image of a map-style split (``row-000012`` where it has none), with ``-row-<i>``
    added where stems repeat (``images/a/001.jpg`` and ``images/b/001.jpg``) so no mask overwrites another; None if
    streamed."""
    if isinstance(raw, datasets.IterableDataset):
        return None
    column = find_image_column(raw, data_args.image_column_name)
    raw = without_image_decoding(raw, column)
    values = raw.select_columns([column])[column]
    names = [os.path.splitext(os.path.basename(image_name(v) or f"row-{i:06d}"))[0] for i, v in enumerate(values)]
    repeated = {name for name, count in collections.Counter(names).items() if count > 1}
    return [f"{name}-row-{i:06d}" if name in repeated else name for i, name in enumerate(names)]


__all__ = [
    "VALIDATION_SPLIT_NAMES",
    "dataset_display_name",
    "find_id2label",
    "first_image_size",
    "has_folders",
    "has_mask_column",
    "load_split",
    "prepare_rows",
    "read_id2label_file",
    "row_names",
    "split_names",
    "subset",
]
