"""Loading an encoder checkpoint as a stock classification model: :func:`load_encoder_for_classification` turns a CIM
pre-training checkpoint, an exported encoder (see :mod:`transformers_cim.export`) or a stock ViT / ResNet checkpoint
into a ``ViTForImageClassification`` / ``ResNetForImageClassification`` with a fresh head (optionally the CIM
checkpoint's EMA target encoder, optionally at a new image size)."""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from torch import nn
from transformers import ResNetForImageClassification, ViTForImageClassification
from transformers.utils import logging

from .checkpoint_loading import (
    checkpoint_kind,
    encoder_config_from_checkpoint,
    quiet_loading,
    resolve_checkpoint_path,
)
from .errors import UserValueError

logger = logging.get_logger(__name__)

# Which encoder of a CIM checkpoint to fine-tune: the online one, or the EMA target ("ema").
ENCODER_WEIGHTS = ("online", "ema")
TARGET_PREFIX = "target_encoder."
EMBEDDING_PREFIXES = ("embeddings.", "embedder.")  # ViT / ResNet: what --use_ema_encoder keeps from the online side


def resize_vit_position_embeddings(model: nn.Module, image_size: int) -> bool:
    """Permanently resize a ViT's position embeddings to ``image_size`` (square input).

    Uses the model's own ``ViTEmbeddings.interpolate_pos_encoding`` (bicubic), i.e. exactly what the forward pass
    computes with ``interpolate_pos_encoding=True`` at that size, and updates ``config.image_size`` so the model
    saves as a plain checkpoint at the new resolution. Returns True if anything changed.
    """
    vit = getattr(model, "vit", model)
    embeddings = vit.embeddings
    patch = embeddings.patch_embeddings
    old = patch.image_size if isinstance(patch.image_size, (tuple, list)) else (patch.image_size, patch.image_size)
    if tuple(old) == (image_size, image_size):
        return False
    patch_size = patch.patch_size if isinstance(patch.patch_size, (tuple, list)) else (patch.patch_size,) * 2
    if image_size % patch_size[0] or image_size % patch_size[1]:
        raise UserValueError(f"image_size {image_size} is not a multiple of the patch size {tuple(patch_size)}.")
    num_patches = (image_size // patch_size[0]) * (image_size // patch_size[1])
    pos = embeddings.position_embeddings
    dummy = pos.new_zeros(1, num_patches + 1, pos.shape[-1])
    with torch.no_grad():
        new_pos = embeddings.interpolate_pos_encoding(dummy, image_size, image_size).detach().clone()
    embeddings.position_embeddings = nn.Parameter(new_pos, requires_grad=pos.requires_grad)
    patch.image_size = (image_size, image_size)
    patch.num_patches = num_patches
    if hasattr(embeddings, "image_size"):
        embeddings.image_size = (image_size, image_size)
    vit.config.image_size = image_size
    if model is not vit:
        model.config.image_size = image_size
    return True


def load_encoder_for_classification(
    path: str | os.PathLike,
    num_labels: int,
    id2label: dict[int, str] | None = None,
    label2id: dict[str, int] | None = None,
    image_size: int | None = None,
    ignore_mismatched_sizes: bool = False,
    encoder_weights: str = "online",
    **from_pretrained_kwargs: Any,
) -> ViTForImageClassification | ResNetForImageClassification:
    """Load an encoder checkpoint as a stock classification model with a freshly initialised head.

    ``path`` (a directory or a Hub model id) may be a CIM pre-training checkpoint (the online encoder under ``vit.`` /
    ``resnet.`` is used, the target encoder and decoder are ignored), an exported encoder (``ViTModel`` /
    ``ResNetModel``), or a stock classification checkpoint (its head is replaced when the label count differs). For
    ViT, ``image_size`` different from the checkpoint's resizes the position embeddings (bicubic interpolation).
    Encoder weights whose shapes do not fit the checkpoint's config are refused, unless ``ignore_mismatched_sizes``
    (then they are re-initialised, with a warning). ``encoder_weights="ema"`` takes a CIM checkpoint's EMA target
    encoder instead of its online encoder (the authors' ``--use_ema`` fine-tuning option).
    """
    if encoder_weights not in ENCODER_WEIGHTS:
        raise UserValueError(f"encoder_weights must be one of {ENCODER_WEIGHTS}, got {encoder_weights!r}.")
    path = resolve_checkpoint_path(path)
    if num_labels < 2:
        raise UserValueError(f"Classification needs at least 2 classes, got num_labels={num_labels}.")
    kind, encoder_type = checkpoint_kind(path)
    config = encoder_config_from_checkpoint(path)
    if id2label is None:
        id2label = {i: f"LABEL_{i}" for i in range(num_labels)}
    id2label = {int(k): str(v) for k, v in id2label.items()}
    if len(id2label) != num_labels:
        raise ValueError(f"id2label has {len(id2label)} entries but num_labels={num_labels}.")
    config.id2label = id2label
    config.label2id = dict(label2id) if label2id is not None else {v: k for k, v in id2label.items()}
    config.architectures = None
    if hasattr(config, "auto_map"):
        config.auto_map = None
    cls = ViTForImageClassification if encoder_type == "vit" else ResNetForImageClassification
    prefix = cls.base_model_prefix
    # A CIM checkpoint also holds target_encoder.* and decoder.*, an exported encoder its pooler, and neither has a
    # classifier: all expected (the head is new by design), so keep the load report quiet for them.
    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
        saved_architectures = json.load(f).get("architectures") or []
    bare_encoder = any(a in ("ViTModel", "ResNetModel") for a in saved_architectures)
    with quiet_loading(kind == "cim" or bare_encoder):
        model, info = cls.from_pretrained(
            path, config=config, ignore_mismatched_sizes=True, output_loading_info=True, **from_pretrained_kwargs
        )
    missing = sorted(k for k in info["missing_keys"] if not k.startswith("classifier"))
    if missing:
        raise UserValueError(
            f"{path!r} ({kind} checkpoint) is missing {len(missing)} encoder weights, e.g. {missing[:3]}: "
            f"expected the encoder under the prefix {prefix!r} or at the top level."
        )
    mismatched = [
        k
        for k in info["mismatched_keys"]
        if not (k[0] if isinstance(k, (tuple, list)) else str(k)).startswith("classifier")
    ]
    if mismatched and not ignore_mismatched_sizes:
        raise UserValueError(
            f"{path!r} has encoder weights of the wrong shape: {mismatched[:3]}; "
            "--ignore_mismatched_sizes re-initialises them instead."
        )
    if mismatched:
        logger.warning(
            f"Re-initialised {len(mismatched)} encoder weight(s) of {path} whose shapes did not fit "
            f"(--ignore_mismatched_sizes): {mismatched[:5]}"
        )
    if encoder_weights == "ema":
        if kind != "cim":
            raise UserValueError(
                f"{path!r} is a {kind} checkpoint: the EMA encoder (--use_ema_encoder) exists only in "
                "a CIM pre-training checkpoint."
            )
        load_target_encoder_(getattr(model, prefix), path)
    if encoder_type == "vit" and image_size is not None:
        if resize_vit_position_embeddings(model, int(image_size)):
            logger.info(f"Interpolated the position embeddings of {path} to {image_size} px.")
    return model


def load_target_encoder_(encoder: nn.Module, path: str) -> None:
    """Overwrite the blocks and final norm of ``encoder`` (a ``ViTModel``; a ``ResNetModel``'s stages) with those of
    the EMA target encoder of the CIM checkpoint in ``path``, keeping the online embeddings (patch projection, CLS
    token, positions; ResNet stem) as the authors' ``--use_ema`` does. Loaded through ``from_pretrained``, which
    also reads the legacy weight names saved checkpoints use."""
    from .modeling_cim import CIMForPreTraining

    with quiet_loading():
        cim, info = CIMForPreTraining.from_pretrained(path, output_loading_info=True)
    if not cim.uses_target_encoder or any(k.startswith(TARGET_PREFIX) for k in info.get("missing_keys", [])):
        raise UserValueError(
            f"{path!r} has no EMA target encoder (target_encoder_mode={cim.config.target_encoder_mode!r}"
            " or no target weights saved); fine-tune its online encoder instead."
        )
    # as the authors' --use_ema: the target's blocks and final norm (ResNet: its stages), the online embeddings
    target_state = {k: v for k, v in cim.target_encoder.state_dict().items() if not k.startswith(EMBEDDING_PREFIXES)}
    missing, unexpected = encoder.load_state_dict(target_state, strict=False)
    missing = [k for k in missing if not k.startswith(("pooler.", *EMBEDDING_PREFIXES))]
    if missing or unexpected:
        raise UserValueError(
            f"The EMA encoder of {path!r} does not fit the classifier's encoder: missing "
            f"{missing[:3]}, unexpected {unexpected[:3]}."
        )


__all__ = [
    "ENCODER_WEIGHTS",
    "load_encoder_for_classification",
    "load_target_encoder_",
    "resize_vit_position_embeddings",
]
