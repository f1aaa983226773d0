"""Image data loading for CIM pre-training and fine-tuning.

The data pipeline only decodes images and makes the CIM "search" view (``pixel_values``); the
crop-and-correlate pretext task itself runs batched on the device inside the model. One concern per module:

* ``sources`` - :func:`load_image_dataset` opens a Hub dataset (id or local directory in Hub layout), an image
  folder (class sub-folders become labels) or data files (parquet, csv, json, arrow, webdataset tar, ...), streamed
  or map-style, and fails *before* training with an error that names the problem and the fix.
  :func:`default_image_dataset` is the offline fallback: the real photos shipped inside scikit-image.
* ``columns`` - :func:`find_image_column` / :func:`find_label_column` pick the image and label columns from the
  features (an ``Image`` / ``ClassLabel`` feature first, then common column names).
* ``decoding`` - :func:`decode_image` turns anything image-like (PIL image, ``{"bytes", "path"}`` dict, bytes, path,
  numpy array) into a fully loaded RGB ``PIL.Image`` or ``None`` (:func:`decode_image_with_reason` also says why);
  it never raises on bad data.
* ``transforms`` - :class:`RandomResizedCropFlip` (search view) and :class:`ResizeCenterCrop` (evaluation), written
  with Pillow and numpy only (no torchvision), and the ImageNet mean / std.
* ``collate`` - :func:`build_pretraining_transform` / :func:`build_classification_transform` make the batched
  functions applied by :func:`prepare_dataset`, and :class:`SeededImageDataset` seeds each row's view; undecodable
  images become zero tensors flagged ``cim_valid=False``, which :class:`SkippingCollator` drops while reporting
  ``num_skipped`` to the trainer.
* ``workers`` - :func:`count_shards` and :func:`check_num_workers` keep streaming data-loader workers busy.

Everything public is importable from ``transformers_cim.training.data`` directly.
"""

from .collate import (
    ClassificationBatchTransform,
    PretrainingBatchTransform,
    SeededImageDataset,
    SkippingCollator,
    build_classification_transform,
    build_pretraining_transform,
    decoded_row,
    prepare_dataset,
    register_batch_annotator,
    without_image_decoding,
)
from .columns import IMAGE_COLUMN_NAMES, LABEL_COLUMN_NAMES, find_image_column, find_label_column
from .decoding import array_to_image, decode_image, decode_image_with_reason, image_name, to_rgb
from .sources import (
    IMAGE_FILE_EXTENSIONS,
    SKIMAGE_PHOTOS,
    available_splits,
    default_image_dataset,
    load_image_dataset,
    skimage_data_dir,
)
from .transforms import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    RandomResizedCropFlip,
    ResizeCenterCrop,
    to_normalized_tensor,
)
from .workers import check_num_workers, count_shards

__all__ = [
    "IMAGENET_DEFAULT_MEAN",
    "IMAGENET_DEFAULT_STD",
    "IMAGE_COLUMN_NAMES",
    "IMAGE_FILE_EXTENSIONS",
    "LABEL_COLUMN_NAMES",
    "SKIMAGE_PHOTOS",
    "ClassificationBatchTransform",
    "PretrainingBatchTransform",
    "RandomResizedCropFlip",
    "ResizeCenterCrop",
    "SeededImageDataset",
    "SkippingCollator",
    "array_to_image",
    "available_splits",
    "build_classification_transform",
    "build_pretraining_transform",
    "check_num_workers",
    "count_shards",
    "decode_image",
    "decode_image_with_reason",
    "decoded_row",
    "default_image_dataset",
    "find_image_column",
    "find_label_column",
    "image_name",
    "load_image_dataset",
    "prepare_dataset",
    "register_batch_annotator",
    "skimage_data_dir",
    "to_normalized_tensor",
    "to_rgb",
    "without_image_decoding",
]
