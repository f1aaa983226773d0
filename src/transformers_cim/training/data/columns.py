"""Which columns hold the images and the labels: an ``Image`` / ``ClassLabel`` feature first, then common names."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import datasets

from ...errors import UserValueError

IMAGE_COLUMN_NAMES = ("image", "img", "pixel_values", "jpg", "jpeg", "png", "webp")
LABEL_COLUMN_NAMES = ("label", "labels", "cls", "class", "target")


def _names_and_features(column_names_or_features) -> tuple[list[str], Mapping[str, Any] | None]:
    """Accept a ``Features`` mapping, a list of names, or a dataset (its features, else its column names)."""
    obj = column_names_or_features
    if isinstance(obj, (datasets.Dataset, datasets.IterableDataset)):
        obj = obj.features if obj.features is not None else (obj.column_names or [])
    if isinstance(obj, Mapping):
        return list(obj), obj
    return [str(c) for c in obj], None


def _is_image_feature(feature: Any) -> bool:
    if isinstance(feature, datasets.Image):
        return True
    if isinstance(feature, datasets.Value):
        return feature.dtype in ("binary", "large_binary")
    if isinstance(feature, (datasets.Array2D, datasets.Array3D)):
        return True
    if isinstance(feature, (dict, datasets.Features)):
        return "bytes" in feature
    if isinstance(feature, (list, datasets.Sequence, datasets.List, datasets.LargeList)):
        return True  # nested lists of pixel values
    return False


def find_image_column(column_names_or_features, requested: str | None = None) -> str:
    """Name of the image column: ``requested`` (checked), else an ``Image`` feature, else a common name."""
    names, features = _names_and_features(column_names_or_features)
    if requested:
        if requested not in names:
            raise UserValueError(f"Image column {requested!r} not found; columns are {names}. Pick one of them.")
        if features is not None and not _is_image_feature(features[requested]):
            raise UserValueError(
                f"Column {requested!r} is not an image column (feature {features[requested]!r}); columns are {names}."
            )
        return requested
    if features is not None:
        for name in names:
            if isinstance(features[name], datasets.Image):
                return name
    for candidate in IMAGE_COLUMN_NAMES:
        if candidate in names and (features is None or _is_image_feature(features[candidate])):
            return candidate
    raise UserValueError(f"No image column found among {names}; name it with the image column argument.")


def find_label_column(column_names_or_features, requested: str | None = None) -> str | None:
    """Name of the label column: ``requested`` (checked), else a ``ClassLabel`` feature, else a common name.

    Returns ``None`` when there is no label column and none was requested.
    """
    names, features = _names_and_features(column_names_or_features)
    if requested:
        if requested not in names:
            raise UserValueError(f"Label column {requested!r} not found; columns are {names}. Pick one of them.")
        return requested
    if features is not None:
        for name in names:
            if isinstance(features[name], datasets.ClassLabel):
                return name
    return next((c for c in LABEL_COLUMN_NAMES if c in names), None)
