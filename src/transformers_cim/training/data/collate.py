"""Rows and batches: :func:`decoded_row` (one image to a view, or a placeholder flagged ``cim_valid=False`` with
``cim_skipped`` = (file name or row, reason)), the batched functions applied by :func:`prepare_dataset`, the seeded
map-style :class:`SeededImageDataset`, and :class:`SkippingCollator`, which drops the invalid rows while reporting
them to the trainer (``num_skipped`` and ``skipped_images``)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import datasets
import numpy as np
import torch

from ...errors import UserValueError
from ..seeding import numpy_rng
from .decoding import decode_image_with_reason, image_name
from .transforms import RandomResizedCropFlip


def _placeholder(transform: Callable) -> torch.Tensor:
    size = getattr(transform, "size", None)
    if size is None:
        raise TypeError(f"{transform!r} needs a `size` attribute (int or (h, w)) to build placeholders.")
    h, w = (size, size) if isinstance(size, int) else size
    return torch.zeros(3, h, w)


def decoded_row(
    value: Any, transform: Callable, min_size: int, rng: np.random.Generator | None = None, where: str | None = None
) -> dict:
    """``{"pixel_values": view, "cim_valid": True}``, or, for an image that cannot be used, a zero placeholder with
    ``cim_valid=False`` and ``cim_skipped = (name, reason)`` (the collator drops the row and reports it): the name is
    the image's file name when it has one, else `where` (e.g. ``"row 12"``). `rng`, when given, drives the
    transform's draws."""
    image, reason = decode_image_with_reason(value, min_size=min_size)
    if image is None:
        return {
            "pixel_values": _placeholder(transform),
            "cim_valid": False,
            "cim_skipped": (image_name(value) or where, reason),
        }
    return {"pixel_values": transform(image) if rng is None else transform(image, rng=rng), "cim_valid": True}


def _invalid_label(row: dict, label: Any, where: str | None) -> dict:
    """Marks a row with a missing label invalid (as an unusable image is), saying so."""
    if row["cim_valid"]:
        row["cim_valid"], row["cim_skipped"] = False, (where, f"no label ({label!r})")
    return row


def _as_label(value: Any) -> int | None:
    try:
        return None if value is None else int(value)
    except (TypeError, ValueError):
        return None


class PretrainingBatchTransform:
    """Batched ``{image_column: [...]}`` -> ``{"pixel_values": [tensor], "cim_valid": [bool]}`` (picklable)."""

    def __init__(self, image_column: str, transform: Callable, min_size: int):
        self.image_column, self.transform, self.min_size = image_column, transform, min_size

    def __call__(self, batch: dict[str, list], indices: list[int] | None = None) -> dict[str, list]:
        values = batch[self.image_column]
        wheres = [f"row {i}" for i in indices] if indices is not None else [None] * len(values)
        rows = [decoded_row(value, self.transform, self.min_size, where=where) for value, where in zip(values, wheres)]
        return {
            "pixel_values": [r["pixel_values"] for r in rows],
            "cim_valid": [r["cim_valid"] for r in rows],
            "cim_skipped": [r.get("cim_skipped") for r in rows],
        }


class ClassificationBatchTransform(PretrainingBatchTransform):
    """As :class:`PretrainingBatchTransform`, plus integer ``labels`` (a missing label marks the row invalid)."""

    def __init__(self, image_column: str, label_column: str, transform: Callable, min_size: int):
        super().__init__(image_column, transform, min_size)
        self.label_column = label_column

    def __call__(self, batch: dict[str, list], indices: list[int] | None = None) -> dict[str, list]:
        out = super().__call__(batch, indices)
        raw = batch[self.label_column]
        labels = [_as_label(v) for v in raw]
        for i, label in enumerate(labels):
            if label is None and out["cim_valid"][i]:
                where = image_name(batch[self.image_column][i]) or (
                    f"row {indices[i]}" if indices is not None else None
                )
                out["cim_valid"][i], out["cim_skipped"][i] = False, (where, f"no label ({raw[i]!r})")
        out["labels"] = [-100 if label is None else label for label in labels]
        return out


def build_pretraining_transform(
    image_column: str, transform: RandomResizedCropFlip, min_size: int
) -> Callable[[dict], dict]:
    """Batched function for ``Dataset.with_transform`` / ``IterableDataset.map``: pixel_values + cim_valid."""
    return PretrainingBatchTransform(image_column, transform, min_size)


def build_classification_transform(
    image_column: str, label_column: str, transform: Callable, min_size: int
) -> Callable[[dict], dict]:
    """Batched function producing pixel_values, labels and cim_valid."""
    return ClassificationBatchTransform(image_column, label_column, transform, min_size)


def prepare_dataset(
    ds: datasets.Dataset | datasets.IterableDataset,
    image_column: str,
    fn: Callable[[dict], dict],
    *,
    streaming_batch_size: int = 64,
) -> datasets.Dataset | datasets.IterableDataset:
    """Apply a batched transform lazily; images stay encoded until ``fn`` decodes them with :func:`decode_image`.

    An ``Image`` column is cast to ``Image(decode=False)`` so corrupt files reach :func:`decode_image` instead of
    failing inside ``datasets``. Streaming: ``.map(fn, batched=True)`` dropping the original columns (when known).
    Map-style: ``.with_transform(fn)``, so nothing is cached on disk (use ``remove_unused_columns=False``).
    """
    ds = without_image_decoding(ds, image_column)
    if isinstance(ds, datasets.IterableDataset):
        # the package's transforms also take the rows' indices, to name a skipped image that has no file name
        return ds.map(
            fn,
            batched=True,
            with_indices=isinstance(fn, PretrainingBatchTransform),
            batch_size=streaming_batch_size,
            remove_columns=ds.column_names,
        )
    return ds.with_transform(fn)


class SeededRows(torch.utils.data.Dataset):
    """Map-style training rows, each made by `_row` from its values in `columns` with random draws keyed by
    ``(seed, epoch, row index)``: a resumed run, which the Trainer fast-forwards by skipping sampler indices without
    loading them, then gives every later row the view the uninterrupted run gave it, whatever the number of workers.
    The Trainer callback `EpochToDatasetCallback` sets the epoch before each pass (``set_epoch``). The image columns in
    `encoded_columns` stay encoded until a row is fetched, so that an undecodable file is skipped, not fatal."""

    def __init__(self, ds: datasets.Dataset, columns: list[str], encoded_columns: list[str], seed: int = 0):
        for column in encoded_columns:
            ds = without_image_decoding(ds, column)
        self.ds = ds.select_columns(columns)
        self.columns, self.seed, self.epoch = list(columns), seed, 0

    def __len__(self) -> int:
        return len(self.ds)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _row(self, values: list[Any], index: int) -> dict:
        raise NotImplementedError

    def __getitem__(self, index: int) -> dict:
        row = self.ds[int(index)]
        return self._row([row[column] for column in self.columns], int(index))

    def __getitems__(self, indices: list[int]) -> list[dict]:
        rows = self.ds[list(map(int, indices))]  # one Arrow read for the batch
        columns = [rows[column] for column in self.columns]
        return [self._row(list(values), int(index)) for *values, index in zip(*columns, indices)]


class SeededImageDataset(SeededRows):
    """`SeededRows` of search views: ``{"pixel_values": tensor, "cim_valid": bool}`` as with
    :func:`build_pretraining_transform`, with integer ``labels`` too when `label_column` is given; each row's
    crop/flip draws from its own generator."""

    def __init__(
        self,
        ds: datasets.Dataset,
        image_column: str,
        transform: Callable,
        *,
        min_size: int = 32,
        seed: int = 0,
        label_column: str | None = None,
    ):
        super().__init__(ds, [image_column] + ([label_column] if label_column else []), [image_column], seed)
        self.image_column, self.transform, self.min_size = image_column, transform, min_size
        self.label_column = label_column

    def _row(self, values: list[Any], index: int) -> dict:
        value, where = values[0], f"row {index}"
        row = decoded_row(value, self.transform, self.min_size, numpy_rng(self.seed, self.epoch, index), where=where)
        if self.label_column is not None:  # as ClassificationBatchTransform: a missing label marks the row invalid
            label = values[1]
            as_int = _as_label(label)
            if as_int is None:
                _invalid_label(row, label, image_name(value) or where)
            row["labels"] = -100 if as_int is None else as_int
        return row


def without_image_decoding(ds, image_column: str):
    """`ds` with its image column left encoded (checked to exist when the features are known), so that undecodable
    files reach :func:`decode_image` instead of failing inside ``datasets``."""
    features = ds.features
    if features is None:
        return ds
    if image_column not in features:
        raise UserValueError(f"Image column {image_column!r} not in the dataset; columns are {list(features)}.")
    if isinstance(features[image_column], datasets.Image) and features[image_column].decode:
        return ds.cast_column(image_column, datasets.Image(decode=False))
    return ds


# Functions that add entries to every batch collated in this process, registered by the producers of rows that know
# more than their rows (streaming.py registers one giving the position of the stream reader that is running here).
# This keeps the data package ignorant of the stream, which builds on it.
_BATCH_ANNOTATORS: list[Callable[[], Mapping[str, Any]]] = []


def register_batch_annotator(annotate: Callable[[], Mapping[str, Any]]) -> None:
    """Have :class:`SkippingCollator` add ``annotate()`` (a mapping, empty when there is nothing to add) to each batch
    it collates in this process. Registering the same function again does nothing."""
    if annotate not in _BATCH_ANNOTATORS:
        _BATCH_ANNOTATORS.append(annotate)


def _row_is_valid(row: Mapping[str, Any]) -> bool:
    return bool(row.get("cim_valid", True)) and row.get("pixel_values") is not None


class SkippingCollator:
    """Data collator stacking the valid rows only, and reporting ``num_skipped`` (a 0-d long tensor) and, when a row
    was dropped, ``skipped_images``: a ``(name, reason)`` pair per dropped row (name: file name, row or stream record,
    or None when unknown).

    Rows from a :class:`~transformers_cim.training.streaming.ResumableImageStream` also get ``stream_state``: the
    position of
    the reader that produced them, which `CIMTrainer` saves with its checkpoints.

    When every row is invalid, ``pixel_values`` has shape ``(0, 3, H, W)`` (and ``labels`` shape ``(0,)``).
    """

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("SkippingCollator got an empty list of rows.")
        valid = [row for row in features if _row_is_valid(row)]
        batch = {"pixel_values": self._stack_pixels(valid, features)}
        if any("labels" in row for row in features):
            batch["labels"] = torch.tensor([int(row["labels"]) for row in valid], dtype=torch.long)
        batch["num_skipped"] = torch.tensor(len(features) - len(valid), dtype=torch.long)
        if len(valid) < len(features):
            batch["skipped_images"] = [
                tuple(row.get("cim_skipped") or (None, "unusable")) for row in features if not _row_is_valid(row)
            ]
        for annotate in _BATCH_ANNOTATORS:  # e.g. a ResumableImageStream's: where its reader is after this batch
            batch.update(annotate())
        return batch

    @staticmethod
    def _stack_pixels(valid: list[dict], features: list[dict]) -> torch.Tensor:
        if valid:
            return torch.stack([torch.as_tensor(row["pixel_values"], dtype=torch.float32) for row in valid])
        shapes = [torch.as_tensor(r["pixel_values"]).shape for r in features if r.get("pixel_values") is not None]
        return torch.zeros((0, *(shapes[0] if shapes else (3, 0, 0))), dtype=torch.float32)
