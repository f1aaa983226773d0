"""Where the images come from: :func:`load_image_dataset` opens one split of a Hub dataset (id or local directory in
Hub layout), an image folder (class sub-folders become labels) or data files (parquet, csv, json, arrow, webdataset
tar, ...), streamed or map-style, and fails *before* training with an error that names the problem and the fix.
:func:`default_image_dataset` is the offline fallback: the real photos shipped inside scikit-image.
"""

from __future__ import annotations

import glob
import importlib.util
import logging
import os
import re
from collections.abc import Sequence

import datasets
from datasets.data_files import EmptyDatasetError
from datasets.exceptions import DataFilesNotFoundError, DatasetNotFoundError
from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder

from ...errors import UserPathError, UserValueError

try:  # extension -> packaged builder table used by datasets itself (private; a fallback keeps us working)
    from datasets.packaged_modules import _EXTENSION_TO_MODULE
except ImportError:  # pragma: no cover
    _EXTENSION_TO_MODULE = {
        ".parquet": ("parquet", {}),
        ".arrow": ("arrow", {}),
        ".csv": ("csv", {}),
        ".tsv": ("csv", {}),
        ".json": ("json", {}),
        ".jsonl": ("json", {}),
        ".tar": ("webdataset", {}),
    }

logger = logging.getLogger(__name__)

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

IMAGE_FILE_EXTENSIONS = frozenset(ext.lower() for ext in ImageFolder.EXTENSIONS)
# data files that can hold images (bytes or paths) in a Hub-layout dataset folder
TABLE_FILE_EXTENSIONS = frozenset({".parquet", ".arrow", ".tar", ".json", ".jsonl", ".ndjson", ".csv", ".tsv"})
_FILE_BUILDERS = frozenset({"imagefolder"} | {m for m, _ in _EXTENSION_TO_MODULE.values()})


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
    test_dir: str | None = None,
    test_files: list[str] | None = None,
) -> datasets.Dataset | datasets.IterableDataset:
    """Open one split of an image dataset from exactly one source.

    Sources (give one): ``dataset_name`` (a Hub id or a local directory in Hub layout); ``train_dir`` /
    ``validation_dir`` (image folders, class sub-folders become labels); ``train_files`` / ``validation_files``
    (parquet, csv, json, arrow, tar or image files; the builder is chosen by extension). ``split="validation"``
    selects the validation source; ``split="test"`` the ``test_dir`` / ``test_files`` (read on their own, so that
    unlabelled test images never add a class to the training labels). With no source, :func:`default_image_dataset` is
    returned (as an
    ``IterableDataset`` when ``streaming``) whatever the split.

    Raises ``FileNotFoundError`` for a missing local path, ``ValueError`` for several sources, an image folder
    without images, unsupported file types or a split that does not exist - all before any data is prepared.
    """
    train_files, validation_files, test_files = _as_list(train_files), _as_list(validation_files), _as_list(test_files)
    _check_single_source(
        dataset_name, train_dir or test_dir, validation_dir, train_files + test_files, validation_files
    )
    if split == "test" and (test_dir or test_files):
        if test_dir:
            _check_image_dir("test_dir", test_dir)
            data_files = {"test": [os.path.join(os.path.abspath(os.path.expanduser(test_dir)), "**")]}
            return _load_split("imagefolder", None, data_files, split, streaming, cache_dir, token)
        data_files = _checked_data_files(test_files, [], names=("test_files", "test"))
        return _load_split(
            _builder_for_files(data_files["test"]), None, data_files, split, streaming, cache_dir, token
        )
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
        raise UserValueError(
            f"More than one data source given ({' and '.join(chosen)}). Give exactly one: dataset_name (Hub id or "
            "local Hub-layout directory), train_dir/validation_dir (image folders) or train_files/validation_files."
        )


def _looks_like_local_path(name: str) -> bool:
    """A Hub id is ``name`` or ``owner/name``; anything else path-like is treated as a local path."""
    if os.path.isabs(name) or name.startswith(("./", "../", "~", ".\\", "..\\")) or name in (".", ".."):
        return True
    return name.count("/") > 1 or "\\" in name


def _check_dataset_name(dataset_name: str) -> None:
    if os.path.isdir(dataset_name):
        _check_local_dataset_dir(dataset_name)
        return
    if "://" in dataset_name or os.path.exists(dataset_name):
        return
    if _looks_like_local_path(dataset_name):
        raise UserPathError(
            f"dataset_name={dataset_name!r} looks like a local path but does not exist. Fix the path, or give a "
            "Hub id such as 'owner/name'."
        )


def _check_local_dataset_dir(dataset_name: str) -> None:
    """A local `dataset_name` folder must hold image files or data files (Hub layout) somewhere below it; otherwise
    the error says which folder, what it holds and what was expected (datasets' own error is a traceback)."""
    data_extensions = IMAGE_FILE_EXTENSIONS | TABLE_FILE_EXTENSIONS
    files, folders = [], 0
    for root, dirs, names in os.walk(dataset_name):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        folders += len(dirs)
        for name in names:
            if name.startswith("."):
                continue
            stem = name[:-3] if name.lower().endswith(".gz") else name
            if os.path.splitext(stem)[1].lower() in data_extensions:
                return
            files.append(os.path.relpath(os.path.join(root, name), dataset_name))
    if files:
        shown = ", ".join(sorted(files)[:5]) + (", ..." if len(files) > 5 else "")
        found = f"{len(files)} file(s) ({shown}) in {folders} sub-folder(s), none of them an image or a data file"
    else:
        found = f"no files ({folders} sub-folder(s))" if folders else "nothing: it is empty"
    raise UserValueError(
        f"dataset_name={dataset_name!r} is a local folder with no images: found {found}. Expected image files "
        "(one sub-folder per class, e.g. cat/001.jpg, or train/ and validation/ folders of them) or the Hub's "
        "parquet layout (e.g. data/train-00000-of-00001.parquet)."
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
        raise UserPathError(f"{arg}={directory!r} does not exist. Point it at a folder of images.")
    if not os.path.isdir(path):
        raise UserPathError(f"{arg}={directory!r} is not a directory; use train_files/validation_files for files.")
    if not _has_image_file(path):
        raise UserValueError(
            f"{arg}={directory!r} contains no image files (looked for {', '.join(sorted(IMAGE_FILE_EXTENSIONS)[:8])}, "
            "...). Put the images there, one sub-folder per class (e.g. train/cat/001.jpg)."
        )


def _has_image_file(directory: str) -> bool:
    for _, _, files in os.walk(directory):
        if any(os.path.splitext(f)[1].lower() in IMAGE_FILE_EXTENSIONS for f in files):
            return True
    return False


def _checked_data_files(
    train_files: list[str], validation_files: list[str], names: tuple[str, str] = ("train_files", "train")
) -> dict[str, list[str]]:
    data_files = {}
    sources = ((*names, train_files), ("validation_files", "validation", validation_files))
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
        raise UserPathError(f"{arg} contains {path!r}, which does not exist (or matches no file). Fix the path.")


def _builder_for_files(files: list[str]) -> str:
    """Packaged ``datasets`` builder for the files' extension (all files must share one builder)."""
    builders = {_builder_for_file(f) for f in files}
    if len(builders) > 1:
        raise UserValueError(f"train_files/validation_files mix formats ({sorted(builders)}); use one file type.")
    return builders.pop()


def _builder_for_file(path: str) -> str:
    name = os.path.basename(path.split("::")[0]).lower()
    ext = os.path.splitext(name[:-3] if name.endswith(".gz") else name)[1]
    if ext in IMAGE_FILE_EXTENSIONS:
        return "imagefolder"
    module = _EXTENSION_TO_MODULE.get(ext)
    if module is None:
        raise UserValueError(
            f"Cannot tell the format of {path!r} (extension {ext or 'none'!r}). Use parquet, arrow, csv, json(l), "
            "tar (webdataset) or image files."
        )
    return module[0]


def _load_split(path, name, data_files, split, streaming, cache_dir, token):
    try:
        builder = datasets.load_dataset_builder(path, name, data_files=data_files, cache_dir=cache_dir, token=token)
    except DatasetNotFoundError as err:
        raise UserPathError(f"Dataset {path!r} could not be opened: {err}") from None
    except (DataFilesNotFoundError, EmptyDatasetError) as err:
        raise UserValueError(f"Dataset {path!r} holds no data files that datasets can read: {err}") from None
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
        raise UserValueError(
            f"Split {missing[0]!r} does not exist in {source!r}; available splits: {available}{hint}."
        )
