"""Semantic-segmentation data: image + index-mask pairs, their checks, and the joint image / mask transforms.

* :func:`segmentation_folder_dataset` reads a folder with ``images/`` and ``masks/`` sub-folders (``labels/`` or
  ``annotations/`` also accepted), pairing files by their path without the extension.
* :func:`find_mask_column` picks the mask column of a dataset.
* :func:`decode_mask` turns a stored mask into an ``(H, W)`` index map, or says why it cannot be used. A mask that is
  RGB with three equal channels is read from one channel (a grey PNG saved as RGB); a colour-coded mask is refused.
* :class:`MaskRules` applies ``--reduce_labels`` and refuses labels outside the class list, naming the row or file.
* :class:`SegmentationTrainTransform` (random scale, pad, random crop, flip) and :class:`SegmentationEvalTransform`
  (resize the shorter side, or keep the size) act on the image and the mask *together*, as tensor ops: bilinear for
  the image, nearest for the mask, the same geometry for both.
* :class:`SeededSegmentationDataset` (map-style, each row's draws a function of (seed, epoch, row)) and
  :func:`prepare_segmentation_stream` (streamed) produce rows ``{"pixel_values", "labels", "cim_valid"}``;
  :class:`SegmentationCollator` stacks the usable rows and counts the skipped ones (undecodable images or masks),
  as :class:`~transformers_cim.training.data.collate.SkippingCollator` does for classification.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import datasets
import numpy as np
import PIL.Image
import torch

from ...errors import UserPathError, UserValueError
from ..seeding import torch_generator
from .collate import SeededRows, SkippingCollator, _row_is_valid, without_image_decoding
from .decoding import _exif_transpose, _open_image, decode_image_with_reason, image_name
from .segmentation_transforms import (  # re-exported: this module's public names before the split
    SegmentationEvalTransform,
    SegmentationTrainTransform,
    resize_pair,
    shorter_side_size,
)
from .sources import IMAGE_FILE_EXTENSIONS

MASK_COLUMN_NAMES = (
    "label",
    "labels",
    "mask",
    "masks",
    "annotation",
    "segmentation",
    "semantic_segmentation",
    "segmentation_mask",
    "seg_map",
    "gt",
)
IMAGE_FOLDER_NAMES = ("images", "image", "img", "imgs")
MASK_FOLDER_NAMES = ("masks", "mask", "labels", "label", "annotations", "annotation")


# ------------------------------------------------------------------------------------------------------------
# Sources
# ------------------------------------------------------------------------------------------------------------
def _files_by_stem(folder: str, argument: str) -> dict[str, str]:
    """``{relative path without extension: path}``; two files differing only in extension (``a.jpg``, ``a.png``)
    cannot be paired and are refused (one would silently replace the other)."""
    found = {}
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            stem, ext = os.path.splitext(name)
            if ext.lower() in IMAGE_FILE_EXTENSIONS and not name.startswith("."):
                key = os.path.relpath(os.path.join(root, stem), folder)
                if key in found:
                    raise UserValueError(
                        f"--{argument}: {found[key]} and {os.path.join(root, name)} differ only in their extension, "
                        "so "
                        "the image / mask pairing (by file name without the extension) is ambiguous. Rename or remove "
                        "one."
                    )
                found[key] = os.path.join(root, name)
    return found


def _sub_folder(directory: str, candidates: Sequence[str]) -> str | None:
    return next((os.path.join(directory, c) for c in candidates if os.path.isdir(os.path.join(directory, c))), None)


def segmentation_folder_dataset(
    directory: str, argument: str = "train_dir", *, require_masks: bool = True
) -> datasets.Dataset:
    """A dataset with ``image`` and ``label`` (mask) columns from ``directory/images/...`` and
    ``directory/masks/...`` (or ``labels/``, ``annotations/``), paired by relative path without the extension
    (``images/a/001.jpg`` with ``masks/a/001.png``). `argument` names the flag in error messages. Without
    `require_masks` (prediction), a folder of images alone gives an ``image`` column only."""
    path = os.path.expanduser(directory)
    if not os.path.isdir(path):
        raise UserPathError(
            f"--{argument} {directory!r} is not a folder. Point it at a folder with images/ and masks/."
        )
    image_dir, mask_dir = _sub_folder(path, IMAGE_FOLDER_NAMES), _sub_folder(path, MASK_FOLDER_NAMES)
    if image_dir is None and not require_masks:
        image_dir = path
    if image_dir is None or (mask_dir is None and require_masks):
        raise UserValueError(
            f"--{argument} {directory!r} needs two sub-folders: images/ (the photos) and masks/ (one index-map PNG "
            "per photo, same file name, any extension; labels/ or annotations/ also work). Found: "
            f"{sorted(os.listdir(path))[:10]}."
        )
    images = _files_by_stem(image_dir, argument)
    if not images:
        raise UserValueError(f"--{argument} {directory!r}: {image_dir} holds no image files.")
    if mask_dir is None:
        features = datasets.Features({"image": datasets.Image()})
        return datasets.Dataset.from_dict({"image": [images[k] for k in sorted(images)]}, features=features)
    masks = _files_by_stem(mask_dir, argument)
    unmatched = sorted(set(images) - set(masks))
    if unmatched:
        raise UserValueError(
            f"--{argument} {directory!r}: {len(unmatched)} image(s) have no mask of the same name in {mask_dir}, e.g. "
            f"{unmatched[:3]}. Add their masks (same relative path and file name, any image extension) or remove them."
        )
    keys = sorted(images)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Image()})
    return datasets.Dataset.from_dict(
        {"image": [images[k] for k in keys], "label": [masks[k] for k in keys]}, features=features
    )


def find_mask_column(
    ds: datasets.Dataset | datasets.IterableDataset, image_column: str, requested: str | None = None
) -> str:
    """The mask column: `requested` (checked), else the first common name (``label``, ``mask``, ``annotation``,
    ...), else the only other ``Image`` column."""
    features = ds.features
    names = list(features) if features is not None else list(ds.column_names or [])
    if requested:
        if requested not in names:
            raise UserValueError(f"Mask column {requested!r} (--label_column_name) not found; columns are {names}.")
        return requested
    for name in MASK_COLUMN_NAMES:  # a ClassLabel (an image-level class, e.g. a scene's "label") is never the mask
        if (
            name in names
            and name != image_column
            and not (features is not None and isinstance(features[name], datasets.ClassLabel))
        ):
            return name
    others = [
        n for n in names if n != image_column and features is not None and isinstance(features[n], datasets.Image)
    ]
    if len(others) == 1:
        return others[0]
    raise UserValueError(
        f"No mask column found among {names} (looked for {', '.join(MASK_COLUMN_NAMES[:6])}, ...); "
        "name it with --label_column_name."
    )


# ------------------------------------------------------------------------------------------------------------
# Masks
# ------------------------------------------------------------------------------------------------------------
def _describe(where: str | None, value: Any) -> str:
    name = image_name(value)
    return f"{where} ({name})" if where and name else (name or where or "a row")


def decode_mask(value: Any, where: str | None = None) -> tuple[np.ndarray | None, str | None]:
    """``(mask, None)`` with `mask` an ``(H, W)`` int64 index map, or ``(None, reason)`` for a mask that cannot be
    read (undecodable, missing). An EXIF orientation is applied, as to the image. Pillow modes L, P (the palette
    *indices*: a palette PNG stores class ids), I, I;16 and 1 are index maps; an RGB(A) mask whose three channels
    are equal is read from its first channel. A colour-coded RGB mask raises `UserValueError` naming `where` and the
    fix. Arrays (H, W) are taken as they are."""
    try:
        if isinstance(value, np.ndarray) or isinstance(value, list):
            array = np.asarray(value)
        else:
            image = _open_image(value)
            if image is None:
                return None, "no mask"
            image.load()
            image = _exif_transpose(image)  # as decode_image does to its image (and datasets to both columns)
            # a 1-bit mask holds ids 0 / 1 (convert("L") would make them 0 / 255, the ignore index)
            array = np.asarray(image) if image.mode != "1" else (np.asarray(image.convert("L")) > 0)
    except Exception as err:  # noqa: BLE001 - bad data of any kind is skipped, with the reason
        return None, f"undecodable mask ({type(err).__name__}: {err})"
    if array.ndim == 3 and array.shape[2] in (3, 4):
        rgb = array[:, :, :3]
        if (rgb == rgb[:, :, :1]).all():
            array = rgb[:, :, 0]
        else:
            raise UserValueError(
                f"The mask of {_describe(where, value)} is a colour image (RGB with differing channels), not an index "
                "map of class ids. Convert it to one (a single-channel PNG whose pixel values are the class ids, e.g. "
                "with a colour -> id lookup), or save it as a palette (P mode) PNG."
            )
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim != 2:
        raise UserValueError(f"The mask of {_describe(where, value)} has shape {array.shape}; expected (H, W).")
    return array.astype(np.int64), None


@dataclass(frozen=True)
class MaskRules:
    """How stored mask values become training labels: with `reduce_labels`, 0 becomes the ignore index and every
    other id is lowered by one (ADE20K's 0 is "other"; as transformers' ``do_reduce_labels``). Labels must then be
    ids of the `num_labels` classes or `ignore_index`."""

    num_labels: int
    ignore_index: int = 255
    reduce_labels: bool = False

    def apply(self, mask: np.ndarray, where: str) -> np.ndarray:
        if self.reduce_labels:
            keep = mask == self.ignore_index
            mask = np.where(mask == 0, self.ignore_index, mask - 1)
            mask[keep] = self.ignore_index
        bad = (mask != self.ignore_index) & ((mask < 0) | (mask >= self.num_labels))
        if bad.any():
            values = sorted(int(v) for v in np.unique(mask[bad]))
            reduced = " after --reduce_labels" if self.reduce_labels else ""
            raise UserValueError(
                f"The mask of {where} has label values {values[:10]}{reduced} outside the {self.num_labels} classes "
                f"(0..{self.num_labels - 1}) that are not the ignore index {self.ignore_index}. Fix: give the full "
                "class list (--id2label), set --ignore_index to the 'unlabelled' value, or use --reduce_labels if 0 "
                "means 'unlabelled' and the classes start at 1."
            )
        return mask


# ------------------------------------------------------------------------------------------------------------
# Joint transforms (image and mask together, tensor ops)
# ------------------------------------------------------------------------------------------------------------


# ------------------------------------------------------------------------------------------------------------
# Rows, datasets, collation
# ------------------------------------------------------------------------------------------------------------
def _placeholder_row(transform, ignore_index: int, name: str | None, reason: str) -> dict:
    height, width = transform.size
    return {
        "pixel_values": torch.zeros(3, height, width),
        "labels": torch.full((height, width), ignore_index),
        "cim_valid": False,
        "cim_skipped": (name, reason),
    }


def segmentation_row(
    image_value: Any,
    mask_value: Any,
    transform,
    rules: MaskRules,
    *,
    min_size: int = 16,
    generator: torch.Generator | None = None,
    where: str | None = None,
) -> dict:
    """One row ``{"pixel_values", "labels", "cim_valid": True}`` from a stored image and mask; an image or mask that
    cannot be decoded gives a placeholder flagged ``cim_valid=False`` (skipped and counted by the collator). A mask
    of another size than its image, a colour-coded mask or labels outside the class list raise `UserValueError`
    naming the row / file: those are errors in the data that no amount of skipping fixes."""
    image, reason = decode_image_with_reason(image_value, min_size=min_size)
    name = image_name(image_value) or where
    if image is None:
        return _placeholder_row(transform, rules.ignore_index, name, reason)
    described = _describe(where, image_value)
    mask, reason = decode_mask(mask_value, described)
    if mask is None:
        return _placeholder_row(transform, rules.ignore_index, name, reason)
    if mask.shape != (image.height, image.width):
        raise UserValueError(
            f"The mask of {described} is {mask.shape[1]}x{mask.shape[0]} px, its image {image.width}x{image.height} "
            "px: every mask must have the size of its image (resize the masks with nearest-neighbour interpolation, "
            "never bilinear, or fix the pairing)."
        )
    mask = rules.apply(mask, described)
    pixels = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)
    pixel_values, labels = transform(pixels, torch.from_numpy(mask), generator)
    return {"pixel_values": pixel_values, "labels": labels, "cim_valid": True}


class SeededSegmentationDataset(SeededRows):
    """`SeededRows` of (image, mask) pairs through `transform` (:func:`segmentation_row`), each row's random draws
    from a torch generator keyed by ``(seed, epoch, row)``."""

    def __init__(
        self,
        ds: datasets.Dataset,
        image_column: str,
        mask_column: str,
        transform,
        rules: MaskRules,
        *,
        min_size: int = 16,
        seed: int = 0,
    ):
        super().__init__(ds, [image_column, mask_column], [image_column, mask_column], seed)
        self.image_column, self.mask_column = image_column, mask_column
        self.transform, self.rules, self.min_size = transform, rules, min_size

    def _row(self, values: list[Any], index: int) -> dict:
        image_value, mask_value = values
        return segmentation_row(
            image_value,
            mask_value,
            self.transform,
            self.rules,
            min_size=self.min_size,
            generator=torch_generator(self.seed, self.epoch, index),
            where=f"row {index}",
        )


class SegmentationBatchTransform:
    """Batched ``{image_column, mask_column}`` -> rows of :func:`segmentation_row` as columns (for
    ``IterableDataset.map(batched=True, with_indices=True)``); random draws from torch's global generator, which the
    Trainer seeds (and each data-loader worker differently)."""

    def __init__(self, image_column: str, mask_column: str, transform, rules: MaskRules, min_size: int = 16):
        self.image_column, self.mask_column = image_column, mask_column
        self.transform, self.rules, self.min_size = transform, rules, min_size

    def __call__(self, batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        rows = [
            segmentation_row(image, mask, self.transform, self.rules, min_size=self.min_size, where=f"row {i}")
            for image, mask, i in zip(batch[self.image_column], batch[self.mask_column], indices)
        ]
        return {key: [row.get(key) for row in rows] for key in ("pixel_values", "labels", "cim_valid", "cim_skipped")}


def prepare_segmentation_stream(
    ds: datasets.IterableDataset,
    image_column: str,
    mask_column: str,
    transform,
    rules: MaskRules,
    *,
    min_size: int = 16,
    batch_size: int = 16,
) -> datasets.IterableDataset:
    """A streamed dataset of rows (images and masks decoded lazily by the transform, corrupt ones flagged)."""
    ds = without_image_decoding(without_image_decoding(ds, image_column), mask_column)
    fn = SegmentationBatchTransform(image_column, mask_column, transform, rules, min_size)
    return ds.map(fn, batched=True, with_indices=True, batch_size=batch_size, remove_columns=ds.column_names)


class SegmentationCollator(SkippingCollator):
    """:class:`SkippingCollator` for segmentation rows: the usable rows' images and ``(H, W)`` label maps stacked,
    ``num_skipped`` / ``skipped_images`` for the others."""

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        batch = super().__call__([{k: v for k, v in row.items() if k != "labels"} for row in features])
        valid = [row for row in features if _row_is_valid(row)]  # the rows SkippingCollator stacked
        if valid:
            batch["labels"] = torch.stack([torch.as_tensor(row["labels"], dtype=torch.long) for row in valid])
        else:
            batch["labels"] = torch.zeros((0, *batch["pixel_values"].shape[-2:]), dtype=torch.long)
        return batch


def mask_to_image(mask: np.ndarray) -> PIL.Image.Image:
    """An index map as an 8-bit (or, for ids above 255, 16-bit) single-channel PNG-ready image."""
    if mask.max(initial=0) <= 255:
        return PIL.Image.fromarray(mask.astype(np.uint8), mode="L")
    return PIL.Image.fromarray(mask.astype(np.uint16))


__all__ = [
    "MASK_COLUMN_NAMES",
    "MaskRules",
    "SeededSegmentationDataset",
    "SegmentationBatchTransform",
    "SegmentationCollator",
    "SegmentationEvalTransform",
    "SegmentationTrainTransform",
    "decode_mask",
    "find_mask_column",
    "mask_to_image",
    "prepare_segmentation_stream",
    "resize_pair",
    "segmentation_folder_dataset",
    "segmentation_row",
    "shorter_side_size",
]
