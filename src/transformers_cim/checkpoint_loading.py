"""Reading checkpoint directories before and while loading their weights (library side: fine-tuning, export and the
scripts all use it).

- `resolve_checkpoint_path` finds a checkpoint given as a local directory or a Hub model id; `checkpoint_kind`,
  `encoder_config_from_checkpoint` and `image_stats_from_checkpoint` read a CIM pre-training checkpoint, an exported
  encoder or a stock ViT / ResNet checkpoint before any weight is loaded; `quiet_loading` silences
  `from_pretrained`'s report of the weights left out on purpose.
- `load_weights_strictly` loads a `save_pretrained` checkpoint through `from_pretrained`, which converts the legacy
  key format that the Trainer's own `load_state_dict(strict=False)` would skip.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
from collections.abc import Iterator
from typing import Any

from huggingface_hub import constants as hub_constants
from huggingface_hub import snapshot_download
from huggingface_hub.errors import (
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import validate_repo_id
from torch import nn
from transformers import PreTrainedConfig, PreTrainedModel, ResNetConfig, ViTConfig
from transformers.utils import logging

from .errors import UserPathError, UserValueError

logger = logging.get_logger(__name__)

SUPPORTED_ENCODER_TYPES = ("vit", "resnet")


def loads_through_from_pretrained(model: nn.Module, checkpoint: str | None) -> bool:
    """Whether `load_weights_strictly` applies: a `PreTrainedModel` and a checkpoint written by `save_pretrained`."""
    return (
        bool(checkpoint)
        and isinstance(model, PreTrainedModel)
        and os.path.isfile(os.path.join(checkpoint, "config.json"))
    )


def load_weights_strictly(model: PreTrainedModel, checkpoint: str) -> None:
    """Loads a checkpoint's weights into `model` through `from_pretrained`, strictly.

    `Trainer` resumes with `model.load_state_dict(safetensors file, strict=False)`, but in transformers 5.x
    `save_pretrained` writes stock ViT layers in the legacy key format, which only `from_pretrained` converts
    back: the Trainer skips those keys with a warning and training goes on from the weights in memory."""
    loaded = type(model).from_pretrained(checkpoint, config=copy.deepcopy(model.config))
    model.load_state_dict(loaded.state_dict(), strict=True)
    del loaded


def read_config_dict(path: str) -> dict[str, Any]:
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise UserPathError(f"{path!r} has no config.json: it is not a transformers checkpoint directory.")
    with open(config_file, encoding="utf-8") as f:
        return json.load(f)


def _config_from_dict(config_dict: dict[str, Any]) -> PreTrainedConfig:
    model_type = config_dict.get("model_type")
    config_dict = {k: v for k, v in config_dict.items() if k not in ("auto_map", "architectures")}
    if model_type == "vit":
        return ViTConfig.from_dict(config_dict)
    if model_type == "resnet":
        return ResNetConfig.from_dict(config_dict)
    raise UserValueError(
        f"Unsupported encoder model_type {model_type!r}: expected one of {SUPPORTED_ENCODER_TYPES} "
        "(or a CIM checkpoint, model_type 'cim', whose encoder is one of them)."
    )


@contextlib.contextmanager
def quiet_loading(enabled: bool = True) -> Iterator[None]:
    """Silence ``from_pretrained``'s load report (e.g. the expected unused target-encoder / decoder weights)."""
    if not enabled:
        yield
        return
    # A filter, not a higher level: transformers runs extra checks (and warnings) when this logger's level is raised.
    modeling_logger = logging.get_logger("transformers.modeling_utils")

    def drop_load_report(record: Any) -> bool:
        return "LOAD REPORT" not in str(record.getMessage())

    modeling_logger.addFilter(drop_load_report)
    try:
        yield
    finally:
        modeling_logger.removeFilter(drop_load_report)


HUB_FILES = ["*.json", "*.safetensors", "README.md"]  # config, image processor, weights (and shard index), card


def resolve_checkpoint_path(
    name_or_path: str | os.PathLike | None,
    *,
    cache_dir: str | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
) -> str:
    """The checkpoint directory of ``name_or_path``: a local directory as it is, else a Hub model id resolved with
    ``huggingface_hub.snapshot_download`` at ``revision`` (a branch, tag or commit; default the main branch),
    downloaded or served from the local Hub cache, as transformers does (cache only under ``HF_HUB_OFFLINE=1``).
    Raises a clear error when it is neither."""
    if name_or_path is None or str(name_or_path) == "":
        raise UserValueError(
            "No model given: pass --model_name_or_path (a CIM pre-training checkpoint, an exported encoder, or a "
            "ViT/ResNet checkpoint: a local directory or a Hub model id)."
        )
    path = os.fspath(name_or_path)
    if os.path.isdir(path):
        read_config_dict(path)
        return path
    if os.path.exists(path):
        raise UserPathError(f"Checkpoint {path!r} is a file; expected a checkpoint directory with config.json.")
    try:
        validate_repo_id(path)
    except HFValidationError:
        raise UserPathError(f"Checkpoint {path!r} does not exist (and is not a Hub model id).") from None
    offline = hub_constants.HF_HUB_OFFLINE
    kwargs = dict(cache_dir=cache_dir, token=token, local_files_only=offline, revision=revision)
    try:
        folder = snapshot_download(path, allow_patterns=HUB_FILES, **kwargs)
        if not any(name.endswith(".safetensors") for name in os.listdir(folder)):  # an older repo: PyTorch weights
            folder = snapshot_download(path, allow_patterns=["*.json", "*.bin", "README.md"], **kwargs)
    except LocalEntryNotFoundError:
        reason = "HF_HUB_OFFLINE is set" if offline else "the Hub could not be reached"
        at = f" at revision {revision!r}" if revision not in (None, "main") else ""
        raise UserPathError(
            f"Checkpoint {path!r}{at} does not exist locally and is not in the Hub cache ({reason}): download it once "
            f"with `hf download {path}` where the Hub is reachable, or pass a local checkpoint directory."
        ) from None
    except RevisionNotFoundError:
        raise UserPathError(
            f"Checkpoint {path!r} has no revision {revision!r} on the Hub (--model_revision): give a "
            "branch, tag or commit it has."
        ) from None
    except RepositoryNotFoundError:
        raise UserPathError(
            f"Checkpoint {path!r} does not exist: not a local directory, and no Hub model has that id (or it is "
            "private or gated: log in with `hf auth login` or pass --token)."
        ) from None
    read_config_dict(folder)
    return folder


def checkpoint_kind(path: str | os.PathLike) -> tuple[str, str]:
    """Return ``(kind, encoder_type)`` for a checkpoint directory.

    ``kind`` is ``"cim"`` for a CIM pre-training checkpoint and ``"stock"`` for a plain transformers ViT / ResNet
    checkpoint (an exported encoder or a classification model); ``encoder_type`` is ``"vit"`` or ``"resnet"``.
    """
    config_dict = read_config_dict(str(path))
    model_type = config_dict.get("model_type")
    if model_type == "cim":
        encoder = config_dict.get("encoder_config") or {}
        encoder_type = encoder.get("model_type", "vit")
        if encoder_type not in SUPPORTED_ENCODER_TYPES:
            raise UserValueError(f"CIM checkpoint {path!r} has an unsupported encoder type {encoder_type!r}.")
        return "cim", encoder_type
    if model_type in SUPPORTED_ENCODER_TYPES:
        return "stock", model_type
    raise UserValueError(f"Checkpoint {path!r} has model_type {model_type!r}; supported: 'cim', 'vit', 'resnet'.")


def encoder_config_from_checkpoint(path: str | os.PathLike) -> PreTrainedConfig:
    """The stock ``ViTConfig`` / ``ResNetConfig`` of the encoder stored in ``path`` (CIM or stock checkpoint)."""
    config_dict = read_config_dict(str(path))
    if config_dict.get("model_type") == "cim":
        encoder = config_dict.get("encoder_config")
        if not isinstance(encoder, dict):
            raise UserValueError(f"CIM checkpoint {path!r} has no `encoder_config` in its config.json.")
        encoder = dict(encoder)
        encoder.setdefault("model_type", "vit")
        return _config_from_dict(encoder)
    return _config_from_dict(config_dict)


def image_stats_from_checkpoint(path: str | os.PathLike) -> tuple[list[float], list[float]] | None:
    """``(image_mean, image_std)`` of the checkpoint's image processor (else of a CIM config), or None."""
    processor_file = os.path.join(str(path), "preprocessor_config.json")
    if not os.path.isfile(processor_file):
        config_dict = read_config_dict(str(path))
        mean, std = config_dict.get("image_mean"), config_dict.get("image_std")
        if config_dict.get("model_type") == "cim" and mean is not None and std is not None:
            return [float(m) for m in mean], [float(s) for s in std]
        return None
    try:
        from transformers import AutoImageProcessor

        processor = AutoImageProcessor.from_pretrained(str(path))
        mean, std = processor.image_mean, processor.image_std
    except Exception:  # an unknown processor class: read the numbers directly
        with open(processor_file, encoding="utf-8") as f:
            data = json.load(f)
        mean, std = data.get("image_mean"), data.get("image_std")
    if mean is None or std is None:
        return None
    if isinstance(mean, (int, float)):
        mean = [mean] * 3
    if isinstance(std, (int, float)):
        std = [std] * 3
    return [float(m) for m in mean], [float(s) for s in std]


__all__ = [
    "SUPPORTED_ENCODER_TYPES",
    "checkpoint_kind",
    "encoder_config_from_checkpoint",
    "image_stats_from_checkpoint",
    "load_weights_strictly",
    "loads_through_from_pretrained",
    "quiet_loading",
    "read_config_dict",
    "resolve_checkpoint_path",
]
