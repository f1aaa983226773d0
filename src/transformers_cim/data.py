"""Image data loading for CIM pre-training and fine-tuning.

The data pipeline only decodes images and makes the CIM "search" view (``pixel_values``); the
crop-and-correlate pretext task itself runs batched on the device inside the model. This module holds:

* **Sources** - :func:`load_image_dataset` opens a Hub dataset (id or local directory in Hub layout), an image
  folder (class sub-folders become labels) or data files (parquet, csv, json, arrow, webdataset tar, ...), streamed
  or map-style, and fails *before* training with an error that names the problem and the fix.
  :func:`default_image_dataset` is the offline fallback: the real photos shipped inside scikit-image.
* **Columns** - :func:`find_image_column` / :func:`find_label_column` pick the image and label columns from the
  features (an ``Image`` / ``ClassLabel`` feature first, then common column names).
* **Decoding** - :func:`decode_image` turns anything image-like (PIL image, ``{"bytes", "path"}`` dict, bytes, path,
  numpy array) into a fully loaded RGB ``PIL.Image`` or ``None``; it never raises on bad data.
* **Transforms** - :class:`RandomResizedCropFlip` (search view) and :class:`ResizeCenterCrop` (evaluation), written
  with Pillow and numpy only (no torchvision).
* **Batching** - :func:`build_pretraining_transform` / :func:`build_classification_transform` make the batched
  functions applied by :func:`prepare_dataset`; undecodable images become zero tensors flagged ``cim_valid=False``,
  which :class:`SkippingCollator` drops while reporting ``num_skipped`` to the trainer.
* **Workers** - :func:`count_shards` and :func:`check_num_workers` keep streaming data-loader workers busy.
"""

from __future__ import annotations

import glob
import importlib.util
import io
import logging
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import datasets
import numpy as np
import PIL.Image
import PIL.ImageOps
import torch
from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder

try:  # extension -> packaged builder table used by datasets itself (private; a fallback keeps us working)
    from datasets.packaged_modules import _EXTENSION_TO_MODULE
except ImportError:  # pragma: no cover
    _EXTENSION_TO_MODULE = {
        ".parquet": ("parquet", {}), ".arrow": ("arrow", {}), ".csv": ("csv", {}), ".tsv": ("csv", {}),
        ".json": ("json", {}), ".jsonl": ("json", {}), ".tar": ("webdataset", {}),
    }

logger = logging.getLogger(__name__)

IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)

# (label name, file name inside scikit-image's ``data`` directory). Only photographs and scans of real scenes;
# synthetic images (chessboard, colour wheel, logo, phantom, silhouettes) are left out on purpose.
SKIMAGE_PHOTOS: tuple[tuple[str, str], ...] = (
    ("astronaut", "astronaut.png"),
    ("brick", "brick.png"),
    ("camera", "camera.png"),
    ("cell", "cell.png"),
    ("chelsea", "chelsea.png"),
    ("clock", "clock_motion.png"),
    ("coffee", "coffee.png"),
    ("coins", "coins.png"),
    ("grass", "grass.png"),
    ("gravel", "gravel.png"),
    ("hubble_deep_field", "hubble_deep_field.jpg"),
    ("immunohistochemistry", "ihc.png"),
    ("microaneurysms", "microaneurysms.png"),
    ("moon", "moon.png"),
    ("motorcycle_left", "motorcycle_left.png"),
    ("motorcycle_right", "motorcycle_right.png"),
    ("page", "page.png"),
    ("retina", "retina.jpg"),
    ("rocket", "rocket.jpg"),
    ("text", "text.png"),
)

IMAGE_COLUMN_NAMES = ("image", "img", "pixel_values", "jpg", "jpeg", "png", "webp")
LABEL_COLUMN_NAMES = ("label", "labels", "cls", "class", "target")
IMAGE_FILE_EXTENSIONS = frozenset(ext.lower() for ext in ImageFolder.EXTENSIONS)
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_FILE_BUILDERS = frozenset({"imagefolder"} | {m for m, _ in _EXTENSION_TO_MODULE.values()})


# --------------------------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------------------------


def skimage_data_dir() -> str:
    """Directory of scikit-image's bundled sample images (found without importing ``skimage.data``)."""
    spec = importlib.util.find_spec("skimage.data")
    if spec is None or spec.origin is None:
        raise RuntimeError("scikit-image is not installed; install it (`pip install scikit-image`) or pass a dataset.")
    return os.path.dirname(spec.origin)


def default_image_dataset() -> datasets.Dataset:
    """The embedded offline default: real photos bundled with scikit-image, one class per photo.

    Only files present in the installed package are used (nothing is downloaded). The encoded file bytes are
    embedded, so the dataset does not depend on the package directory afterwards.
    """
    data_dir = skimage_data_dir()
    found = [(name, os.path.join(data_dir, fname)) for name, fname in SKIMAGE_PHOTOS]
    found = [(name, path) for name, path in found if os.path.isfile(path)]
    if not found:
        raise RuntimeError(f"No sample photos found in {data_dir}; pass dataset_name, train_dir or train_files.")
    names = [name for name, _ in found]
    images = [{"bytes": _read_bytes(path), "path": os.path.basename(path)} for _, path in found]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
    return datasets.Dataset.from_dict({"image": images, "label": list(range(len(names)))}, features=features)


def _read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def load_image_dataset(
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    train_dir: str | None = None,
    train_files: list[str] | None = None,
    validation_dir: str | None = None,
    validation_files: list[str] | None = None,
    split: str = "train",
    streaming: bool = False,
    cache_dir: str | None = None,
    token: str | None = None,
) -> datasets.Dataset | datasets.IterableDataset:
    """Open one split of an image dataset from exactly one source.

    Sources (give one): ``dataset_name`` (a Hub id or a local directory in Hub layout); ``train_dir`` /
    ``validation_dir`` (image folders, class sub-folders become labels); ``train_files`` / ``validation_files``
    (parquet, csv, json, arrow, tar or image files; the builder is chosen by extension). ``split="validation"``
    selects the validation source. With no source, :func:`default_image_dataset` is returned (as an
    ``IterableDataset`` when ``streaming``) whatever the split.

    Raises ``FileNotFoundError`` for a missing local path, ``ValueError`` for several sources, an image folder
    without images, unsupported file types or a split that does not exist - all before any data is prepared.
    """
    train_files, validation_files = _as_list(train_files), _as_list(validation_files)
    _check_single_source(dataset_name, train_dir, validation_dir, train_files, validation_files)
    if dataset_name:
        _check_dataset_name(dataset_name)
        return _load_split(dataset_name, dataset_config_name, None, split, streaming, cache_dir, token)
    if dataset_config_name:
        logger.warning("dataset_config_name=%r is ignored: it only applies to dataset_name.", dataset_config_name)
    if train_dir or validation_dir:
        data_files = _image_dir_data_files(train_dir, validation_dir)
        return _load_split("imagefolder", None, data_files, split, streaming, cache_dir, token)
    if train_files or validation_files:
        data_files = _checked_data_files(train_files, validation_files)
        builder = _builder_for_files([f for files in data_files.values() for f in files])
        return _load_split(builder, None, data_files, split, streaming, cache_dir, token)
    logger.info("No dataset given: using the scikit-image sample photos (default_image_dataset) for split %r.", split)
    ds = default_image_dataset()
    return ds.to_iterable_dataset() if streaming else ds


def _as_list(files: str | Sequence[str] | None) -> list[str]:
    if not files:
        return []
    return [files] if isinstance(files, (str, os.PathLike)) else [str(f) for f in files]


def _check_single_source(dataset_name, train_dir, validation_dir, train_files, validation_files) -> None:
    given = {
        "dataset_name": bool(dataset_name),
        "train_dir/validation_dir": bool(train_dir or validation_dir),
        "train_files/validation_files": bool(train_files or validation_files),
    }
    chosen = [name for name, is_given in given.items() if is_given]
    if len(chosen) > 1:
        raise ValueError(
            f"More than one data source given ({' and '.join(chosen)}). Give exactly one: dataset_name (Hub id or "
            "local Hub-layout directory), train_dir/validation_dir (image folders) or train_files/validation_files."
        )


def _looks_like_local_path(name: str) -> bool:
    """A Hub id is ``name`` or ``owner/name``; anything else path-like is treated as a local path."""
    if os.path.isabs(name) or name.startswith(("./", "../", "~", ".\\", "..\\")) or name in (".", ".."):
        return True
    return name.count("/") > 1 or "\\" in name


def _check_dataset_name(dataset_name: str) -> None:
    if "://" in dataset_name or os.path.exists(dataset_name):
        return
    if _looks_like_local_path(dataset_name):
        raise FileNotFoundError(
            f"dataset_name={dataset_name!r} looks like a local path but does not exist. Fix the path, or give a "
            "Hub id such as 'owner/name'."
        )


def _image_dir_data_files(train_dir: str | None, validation_dir: str | None) -> dict[str, list[str]]:
    data_files = {}
    for arg, split, directory in (("train_dir", "train", train_dir), ("validation_dir", "validation", validation_dir)):
        if directory:
            _check_image_dir(arg, directory)
            data_files[split] = [os.path.join(os.path.abspath(os.path.expanduser(directory)), "**")]
    return data_files


def _check_image_dir(arg: str, directory: str) -> None:
    path = os.path.expanduser(directory)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{arg}={directory!r} does not exist. Point it at a folder of images.")
    if not os.path.isdir(path):
        raise NotADirectoryError(f"{arg}={directory!r} is not a directory; use train_files/validation_files for files.")
    if not _has_image_file(path):
        raise ValueError(
            f"{arg}={directory!r} contains no image files (looked for {', '.join(sorted(IMAGE_FILE_EXTENSIONS)[:8])}, "
            "...). Put the images there, one sub-folder per class (e.g. train/cat/001.jpg)."
        )


def _has_image_file(directory: str) -> bool:
    for _, _, files in os.walk(directory):
        if any(os.path.splitext(f)[1].lower() in IMAGE_FILE_EXTENSIONS for f in files):
            return True
    return False


def _checked_data_files(train_files: list[str], validation_files: list[str]) -> dict[str, list[str]]:
    data_files = {}
    sources = (("train_files", "train", train_files), ("validation_files", "validation", validation_files))
    for arg, split, files in sources:
        if files:
            for f in files:
                _check_file_exists(arg, f)
            data_files[split] = [os.path.expanduser(f) for f in files]
    return data_files


def _check_file_exists(arg: str, path: str) -> None:
    if "://" in path:
        return
    expanded = os.path.expanduser(path)
    exists = bool(glob.glob(expanded, recursive=True)) if glob.has_magic(expanded) else os.path.exists(expanded)
    if not exists:
        raise FileNotFoundError(f"{arg} contains {path!r}, which does not exist (or matches no file). Fix the path.")


def _builder_for_files(files: list[str]) -> str:
    """Packaged ``datasets`` builder for the files' extension (all files must share one builder)."""
    builders = {_builder_for_file(f) for f in files}
    if len(builders) > 1:
        raise ValueError(f"train_files/validation_files mix formats ({sorted(builders)}); use one file type.")
    return builders.pop()


def _builder_for_file(path: str) -> str:
    name = os.path.basename(path.split("::")[0]).lower()
    ext = os.path.splitext(name[:-3] if name.endswith(".gz") else name)[1]
    if ext in IMAGE_FILE_EXTENSIONS:
        return "imagefolder"
    module = _EXTENSION_TO_MODULE.get(ext)
    if module is None:
        raise ValueError(
            f"Cannot tell the format of {path!r} (extension {ext or 'none'!r}). Use parquet, arrow, csv, json(l), "
            "tar (webdataset) or image files."
        )
    return module[0]


def _load_split(path, name, data_files, split, streaming, cache_dir, token):
    builder = datasets.load_dataset_builder(path, name, data_files=data_files, cache_dir=cache_dir, token=token)
    _check_split(builder, split, path)
    if streaming:
        return builder.as_streaming_dataset(split=split)
    builder.download_and_prepare()
    return builder.as_dataset(split=split)


def available_splits(builder: datasets.DatasetBuilder) -> list[str]:
    """Split names a builder knows of before preparing anything (empty when it cannot tell)."""
    if builder.config.data_files:
        return [str(s) for s in builder.config.data_files]
    return [str(s) for s in (builder.info.splits or {})]


def _check_split(builder: datasets.DatasetBuilder, split: str, source: str) -> None:
    available = available_splits(builder)
    wanted = [re.sub(r"\[.*\]$", "", part.strip()) for part in str(split).split("+")]
    missing = [s for s in wanted if available and s not in available]
    if missing:
        hint = " (give validation_dir/validation_files for a validation split)" if source in _FILE_BUILDERS else ""
        raise ValueError(f"Split {missing[0]!r} does not exist in {source!r}; available splits: {available}{hint}.")



# --------------------------------------------------------------------------------------------------------------
# Columns
# --------------------------------------------------------------------------------------------------------------


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
            raise ValueError(f"Image column {requested!r} not found; columns are {names}. Pick one of them.")
        if features is not None and not _is_image_feature(features[requested]):
            raise ValueError(
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
    raise ValueError(f"No image column found among {names}; name it with the image column argument.")


def find_label_column(column_names_or_features, requested: str | None = None) -> str | None:
    """Name of the label column: ``requested`` (checked), else a ``ClassLabel`` feature, else a common name.

    Returns ``None`` when there is no label column and none was requested.
    """
    names, features = _names_and_features(column_names_or_features)
    if requested:
        if requested not in names:
            raise ValueError(f"Label column {requested!r} not found; columns are {names}. Pick one of them.")
        return requested
    if features is not None:
        for name in names:
            if isinstance(features[name], datasets.ClassLabel):
                return name
    return next((c for c in LABEL_COLUMN_NAMES if c in names), None)


# --------------------------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------------------------


def decode_image(value: Any, min_size: int = 16) -> PIL.Image.Image | None:
    """Decode ``value`` into a fully loaded RGB image, or ``None`` when it cannot be used. Never raises on bad data.

    ``value`` may be a PIL image, a ``{"bytes": ..., "path": ...}`` dict (``datasets.Image(decode=False)``), raw
    bytes, a local path or URL, or a numpy array (HW or HWC, uint8 / uint16 / float in [0, 1]). EXIF orientation is
    applied (as ``datasets`` does). Transparent images (RGBA, LA, palette with transparency) are composited on
    **white**: the colour under fully transparent pixels is arbitrary and often black, so a plain convert would
    leak it. 16-bit grayscale is scaled to 8 bits (65535 -> 255); float ("F") images in [0, 1] are scaled by 255,
    others clipped to [0, 255]. Images whose shorter side is below ``min_size`` give ``None``, as do truncated,
    empty or unreadable data and unsupported types.
    """
    try:
        image = _open_image(value)
        if image is None or min(image.size) < min_size:
            return None
        image.load()  # truncated or corrupt files fail here, not later in a worker
        image = to_rgb(_exif_transpose(image))
    except Exception as err:  # noqa: BLE001 - bad data of any kind becomes None
        logger.debug("Undecodable image skipped: %s: %s", type(err).__name__, err)
        return None
    return image if min(image.size) >= min_size else None


def _open_image(value: Any) -> PIL.Image.Image | None:
    if isinstance(value, PIL.Image.Image):
        return value
    if isinstance(value, Mapping):
        data = value.get("bytes")
        return _open_image(data) if data else _open_image(value.get("path"))
    if isinstance(value, (bytes, bytearray, memoryview)):
        return PIL.Image.open(io.BytesIO(bytes(value))) if len(value) else None
    if isinstance(value, (str, os.PathLike)):
        return _open_path(os.fspath(value))
    if isinstance(value, np.ndarray):
        return array_to_image(value)
    return None


def _open_path(path: str) -> PIL.Image.Image | None:
    if os.path.isfile(path):
        return PIL.Image.open(path)
    if "://" in path:  # remote file of a streamed Hub image folder (fsspec URL)
        from datasets.utils.file_utils import xopen

        with xopen(path, "rb") as f:
            return _open_image(f.read())
    return None


def array_to_image(array: np.ndarray) -> PIL.Image.Image | None:
    """HW / HWC / CHW numpy array -> PIL image ("L", "RGB" or "RGBA"), scaled to uint8; None if not image-shaped."""
    arr = np.asarray(array)
    if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[2] not in (1, 3, 4):
        arr = arr.transpose(1, 2, 0)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    modes = {2: "L", 3: "RGB", 4: "RGBA"}
    mode = "L" if arr.ndim == 2 else modes.get(arr.shape[2]) if arr.ndim == 3 else None
    if mode is None or arr.size == 0:
        return None
    return PIL.Image.fromarray(_to_uint8(arr), mode=mode)


def _to_uint8(arr: np.ndarray) -> np.ndarray:
    if arr.dtype == np.uint8:
        return np.ascontiguousarray(arr)
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8) * 255
    if arr.dtype == np.uint16:
        return np.round(arr / 257.0).astype(np.uint8)
    is_float = np.issubdtype(arr.dtype, np.floating)
    arr = arr.astype(np.float64)
    if is_float and np.nanmax(arr, initial=0.0) <= 1.0:
        arr = arr * 255.0
    return np.clip(np.nan_to_num(np.round(arr)), 0, 255).astype(np.uint8)


def _exif_transpose(image: PIL.Image.Image) -> PIL.Image.Image:
    if image.getexif().get(PIL.Image.ExifTags.Base.Orientation, 1) != 1:
        return PIL.ImageOps.exif_transpose(image)
    return image


def to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """Convert any Pillow mode to RGB (see :func:`decode_image` for the transparency and bit-depth rules)."""
    if image.mode == "RGB":
        return image
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in _ALPHA_MODES:
        return _composite_on_white(image)
    if image.mode.startswith("I") or image.mode == "F":
        return _high_depth_to_rgb(image)
    return image.convert("RGB")


def _composite_on_white(image: PIL.Image.Image) -> PIL.Image.Image:
    rgba = image.convert("RGBA")
    background = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return PIL.Image.alpha_composite(background, rgba).convert("RGB")


def _high_depth_to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    arr = np.asarray(image)
    if image.mode.startswith("I;16") or (image.mode == "I" and arr.max(initial=0) > 255):
        arr = np.round(arr.astype(np.float64) / 257.0)
    elif image.mode == "F" and np.nanmax(arr, initial=0.0) <= 1.0:
        arr = arr.astype(np.float64) * 255.0
    gray = np.clip(np.nan_to_num(np.round(arr)), 0, 255).astype(np.uint8)
    return PIL.Image.fromarray(gray, mode="L").convert("RGB")


# --------------------------------------------------------------------------------------------------------------
# Transforms
# --------------------------------------------------------------------------------------------------------------


def to_normalized_tensor(image: PIL.Image.Image, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """RGB PIL image -> float32 (3, H, W) tensor, ``(x / 255 - mean) / std``."""
    arr = np.array(to_rgb(image), dtype=np.uint8)
    tensor = torch.from_numpy(arr).permute(2, 0, 1).float().div_(255.0)
    return tensor.sub_(mean).div_(std).contiguous()


def _stats(values: Sequence[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32).view(3, 1, 1)


def _default_rng() -> np.random.Generator:
    # Drawn from torch's RNG: seeded by Trainer's set_seed and re-seeded per data-loader worker by torch, so
    # workers do not repeat each other's augmentations and runs are reproducible.
    return np.random.default_rng(int(torch.randint(0, 2**62, (1,)).item()))


class RandomResizedCropFlip:
    """The CIM "search view": random-resized crop (bicubic), horizontal flip, normalisation. Pillow/numpy only.

    Crop sampling follows the usual random-resized-crop: up to 10 tries of an area fraction in ``scale`` and a
    log-uniform aspect ratio (w / h) in ``ratio``; if none fits, a central crop with the ratio clamped to ``ratio``.
    Pass a seeded ``numpy.random.Generator`` for exact reproducibility.
    """

    def __init__(
        self,
        size: int = 224,
        scale: tuple[float, float] = (0.2, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        hflip: bool = True,
        mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
        std: Sequence[float] = IMAGENET_DEFAULT_STD,
    ):
        if not (0 < scale[0] <= scale[1]) or not (0 < ratio[0] <= ratio[1]):
            raise ValueError(f"scale and ratio must be increasing positive pairs, got scale={scale}, ratio={ratio}.")
        self.size, self.scale, self.ratio, self.hflip = int(size), tuple(scale), tuple(ratio), hflip
        self.mean, self.std = _stats(mean), _stats(std)

    def get_params(self, width: int, height: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
        """Crop box ``(left, top, crop_width, crop_height)`` for an image of ``width`` x ``height``."""
        area = width * height
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target_area = area * rng.uniform(self.scale[0], self.scale[1])
            aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
            w = int(round(math.sqrt(target_area * aspect)))
            h = int(round(math.sqrt(target_area / aspect)))
            if 0 < w <= width and 0 < h <= height:
                return int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h
        return self._central_fallback(width, height)

    def _central_fallback(self, width: int, height: int) -> tuple[int, int, int, int]:
        in_ratio = width / height
        if in_ratio < self.ratio[0]:
            w, h = width, int(round(width / self.ratio[0]))
        elif in_ratio > self.ratio[1]:
            w, h = int(round(height * self.ratio[1])), height
        else:
            w, h = width, height
        return (width - w) // 2, (height - h) // 2, w, h

    def __call__(self, image: PIL.Image.Image, rng: np.random.Generator | None = None) -> torch.Tensor:
        rng = rng if rng is not None else _default_rng()
        image = to_rgb(image)
        left, top, w, h = self.get_params(image.width, image.height, rng)
        view = image.resize((self.size, self.size), PIL.Image.Resampling.BICUBIC, box=(left, top, left + w, top + h))
        if self.hflip and rng.random() < 0.5:
            view = view.transpose(PIL.Image.Transpose.FLIP_LEFT_RIGHT)
        return to_normalized_tensor(view, self.mean, self.std)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}, scale={self.scale}, ratio={self.ratio}, hflip={self.hflip})"


class ResizeCenterCrop:
    """Evaluation transform: resize the shorter side to ``int(size / crop_pct)`` (bicubic), center-crop ``size``."""

    def __init__(
        self,
        size: int = 224,
        crop_pct: float = 0.875,
        mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
        std: Sequence[float] = IMAGENET_DEFAULT_STD,
    ):
        if not 0 < crop_pct <= 1:
            raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}.")
        self.size, self.crop_pct = int(size), float(crop_pct)
        self.mean, self.std = _stats(mean), _stats(std)

    def resized_shape(self, width: int, height: int) -> tuple[int, int]:
        short = int(self.size / self.crop_pct)
        if width <= height:
            return short, max(short, int(short * height / width))
        return max(short, int(short * width / height)), short

    def __call__(self, image: PIL.Image.Image, rng: np.random.Generator | None = None) -> torch.Tensor:
        image = to_rgb(image)
        new_w, new_h = self.resized_shape(image.width, image.height)
        image = image.resize((new_w, new_h), PIL.Image.Resampling.BICUBIC)
        left, top = int(round((new_w - self.size) / 2.0)), int(round((new_h - self.size) / 2.0))
        image = image.crop((left, top, left + self.size, top + self.size))
        return to_normalized_tensor(image, self.mean, self.std)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}, crop_pct={self.crop_pct})"


# --------------------------------------------------------------------------------------------------------------
# Batched dataset functions and collation
# --------------------------------------------------------------------------------------------------------------


def _placeholder(transform: Callable) -> torch.Tensor:
    size = getattr(transform, "size", None)
    if size is None:
        raise TypeError(f"{transform!r} needs a `size` attribute (int or (h, w)) to build placeholders.")
    h, w = (size, size) if isinstance(size, int) else size
    return torch.zeros(3, h, w)


def decoded_row(value: Any, transform: Callable, min_size: int, rng: np.random.Generator | None = None) -> dict:
    """``{"pixel_values": view, "cim_valid": True}``, or a zero placeholder with ``cim_valid=False`` for an image
    that cannot be used (the collator drops it and counts it). `rng`, when given, drives the transform's draws."""
    image = decode_image(value, min_size=min_size)
    if image is None:
        return {"pixel_values": _placeholder(transform), "cim_valid": False}
    return {"pixel_values": transform(image) if rng is None else transform(image, rng=rng), "cim_valid": True}


def _as_label(value: Any) -> int | None:
    try:
        return None if value is None else int(value)
    except (TypeError, ValueError):
        return None


class PretrainingBatchTransform:
    """Batched ``{image_column: [...]}`` -> ``{"pixel_values": [tensor], "cim_valid": [bool]}`` (picklable)."""

    def __init__(self, image_column: str, transform: Callable, min_size: int):
        self.image_column, self.transform, self.min_size = image_column, transform, min_size

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        rows = [decoded_row(value, self.transform, self.min_size) for value in batch[self.image_column]]
        return {"pixel_values": [r["pixel_values"] for r in rows], "cim_valid": [r["cim_valid"] for r in rows]}


class ClassificationBatchTransform(PretrainingBatchTransform):
    """As :class:`PretrainingBatchTransform`, plus integer ``labels`` (a missing label marks the row invalid)."""

    def __init__(self, image_column: str, label_column: str, transform: Callable, min_size: int):
        super().__init__(image_column, transform, min_size)
        self.label_column = label_column

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        out = super().__call__(batch)
        labels = [_as_label(v) for v in batch[self.label_column]]
        out["cim_valid"] = [ok and label is not None for ok, label in zip(out["cim_valid"], labels)]
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
    ds = _without_image_decoding(ds, image_column)
    if isinstance(ds, datasets.IterableDataset):
        return ds.map(fn, batched=True, batch_size=streaming_batch_size, remove_columns=ds.column_names)
    return ds.with_transform(fn)


class SeededImageDataset(torch.utils.data.Dataset):
    """Map-style training rows whose random view is a pure function of (seed, epoch, row index), with integer
    ``labels`` too when `label_column` is given.

    Each row's crop/flip draws from its own generator, seeded with ``[seed, epoch, index]``, instead of the global
    RNG: a resumed run, which the Trainer fast-forwards by skipping sampler indices without loading them, then gives
    every later row the view the uninterrupted run gave it, whatever the number of workers. `CIMTrainer` sets the
    epoch before each pass (``set_epoch``). Rows are ``{"pixel_values": tensor, "cim_valid": bool}`` as with
    :func:`build_pretraining_transform`; images stay encoded until a row is fetched.
    """

    def __init__(self, ds: datasets.Dataset, image_column: str, transform: Callable, *, min_size: int = 32,
                 seed: int = 0, label_column: str | None = None):
        ds = _without_image_decoding(ds, image_column)
        self.ds = ds.select_columns([image_column] + ([label_column] if label_column else []))
        self.image_column, self.transform, self.min_size, self.seed = image_column, transform, min_size, seed
        self.label_column = label_column
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.ds)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _row(self, value: Any, label: Any, index: int) -> dict:
        row = decoded_row(value, self.transform, self.min_size, np.random.default_rng([self.seed, self.epoch, int(index)]))
        if self.label_column is not None:  # as ClassificationBatchTransform: a missing label marks the row invalid
            label = _as_label(label)
            row["cim_valid"] = row["cim_valid"] and label is not None
            row["labels"] = -100 if label is None else label
        return row

    def __getitem__(self, index: int) -> dict:
        row = self.ds[int(index)]
        return self._row(row[self.image_column], row.get(self.label_column), index)

    def __getitems__(self, indices: list[int]) -> list[dict]:
        rows = self.ds[list(map(int, indices))]  # one Arrow read for the batch
        labels = rows[self.label_column] if self.label_column else [None] * len(indices)
        return [self._row(value, label, index) for value, label, index in zip(rows[self.image_column], labels, indices)]


def _without_image_decoding(ds, image_column: str):
    features = ds.features
    if features is None:
        return ds
    if image_column not in features:
        raise ValueError(f"Image column {image_column!r} not in the dataset; columns are {list(features)}.")
    if isinstance(features[image_column], datasets.Image) and features[image_column].decode:
        return ds.cast_column(image_column, datasets.Image(decode=False))
    return ds


def _row_is_valid(row: Mapping[str, Any]) -> bool:
    return bool(row.get("cim_valid", True)) and row.get("pixel_values") is not None


class SkippingCollator:
    """Data collator stacking the valid rows only, and reporting ``num_skipped`` (a 0-d long tensor).

    Rows from a :class:`~transformers_cim.streaming.ResumableImageStream` also get ``stream_state``: the position of
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
        from .streaming import STREAM_STATE_KEY, current_snapshot  # streaming builds on this module

        snapshot = current_snapshot()
        if snapshot is not None:  # rows from a ResumableImageStream: where its reader is after this batch
            batch[STREAM_STATE_KEY] = snapshot
        return batch

    @staticmethod
    def _stack_pixels(valid: list[dict], features: list[dict]) -> torch.Tensor:
        if valid:
            return torch.stack([torch.as_tensor(row["pixel_values"], dtype=torch.float32) for row in valid])
        shapes = [torch.as_tensor(r["pixel_values"]).shape for r in features if r.get("pixel_values") is not None]
        return torch.zeros((0, *(shapes[0] if shapes else (3, 0, 0))), dtype=torch.float32)


# --------------------------------------------------------------------------------------------------------------
# Workers
# --------------------------------------------------------------------------------------------------------------


def count_shards(ds: Any) -> int:
    """Number of shards of a streaming dataset (``IterableDataset.num_shards``), 1 for anything else."""
    if isinstance(ds, datasets.IterableDataset):
        return max(1, int(getattr(ds, "num_shards", None) or getattr(ds, "n_shards", 1)))
    return 1


def check_num_workers(num_workers: int, num_shards: int) -> int:
    """Largest worker count <= ``num_workers`` that divides ``num_shards`` (warns when lowering).

    A streaming worker without a shard idles and uneven shard counts leave workers idle at the end. Under
    distributed training pass the shards of one rank (``num_shards // world_size``).
    """
    num_shards = max(1, int(num_shards))
    if num_workers <= 0:
        return 0
    workers = next(w for w in range(min(num_workers, num_shards), 0, -1) if num_shards % w == 0)
    if workers != num_workers:
        logger.warning(
            "Lowering dataloader workers from %d to %d: the streamed dataset has %d shard(s) and each worker needs an "
            "equal share (re-shard the data into more files to use more workers).",
            num_workers,
            workers,
            num_shards,
        )
    return workers

