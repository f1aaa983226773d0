"""Fine-tuning and linear probing of CIM (or any ViT / ResNet) encoders for image classification.

The pieces here are used by ``run_image_classification.py`` and are usable on their own:

* :func:`load_encoder_for_classification` turns a CIM pre-training checkpoint, an exported encoder
  (see :mod:`transformers_cim.export`) or a stock ViT / ResNet checkpoint into a stock
  ``ViTForImageClassification`` / ``ResNetForImageClassification`` with a fresh head.
* :func:`param_groups_layer_decay` builds AdamW parameter groups with layer-wise learning-rate decay
  (BEiT / MAE recipe) and no weight decay on norms, biases, position embeddings and the CLS token.
* :func:`mixup_cutmix` mixes a batch (Mixup or CutMix, batch-wise) and returns soft targets.
* :class:`LinearProbeForImageClassification` freezes an encoder and trains a ``BatchNorm1d(affine=False)``
  + ``Linear`` head on its CLS (ViT) or pooled (ResNet) feature, as in MAE's linear probing; the trained
  probe folds back into a stock classification model (:meth:`~LinearProbeForImageClassification.to_classification_model`).
* :class:`ClassificationTrainer` is a ``Trainer`` that uses the layer-decay optimizer and, during training
  only, Mixup / CutMix / label smoothing with a soft-target cross-entropy.
"""

from __future__ import annotations

import json
import math
import os
import re
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import ResNetForImageClassification, Trainer, ViTForImageClassification
from transformers.modeling_outputs import ImageClassifierOutput
from transformers.utils import logging

from .checkpoints import (
    SUPPORTED_ENCODER_TYPES,
    checkpoint_kind,
    encoder_config_from_checkpoint,
    load_weights_strictly,
    loads_through_from_pretrained,
    quiet_loading,
    resolve_checkpoint_path,
)
from ..errors import UserValueError
from ..features import global_feature_size, global_features
from .modelcard import has_cim_card
from .seeding import numpy_rng_from_torch
from .utils import EpochToDatasetCallback, SkippedImages, StepGenerators


logger = logging.get_logger(__name__)

# Parameter-name fragments that never get weight decay (in addition to every parameter with ndim <= 1).
NO_WEIGHT_DECAY_NAMES = ("position_embeddings", "cls_token", "mask_token", "pos_embed")

_VIT_BLOCK = re.compile(r"(?:^|\.)(?:layers|encoder\.layer)\.(\d+)\.")
_RESNET_STAGE = re.compile(r"(?:^|\.)encoder\.stages\.(\d+)\.")

# Which encoder of a CIM checkpoint to fine-tune: the online one, or the EMA target ("ema").
ENCODER_WEIGHTS = ("online", "ema")
TARGET_PREFIX = "target_encoder."
EMBEDDING_PREFIXES = ("embeddings.", "embedder.")  # ViT / ResNet: what --use_ema_encoder keeps from the online side


# --------------------------------------------------------------------------------------------------
# Loading an encoder for classification
# --------------------------------------------------------------------------------------------------
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
    mismatched = [k for k in info["mismatched_keys"]
                  if not (k[0] if isinstance(k, (tuple, list)) else str(k)).startswith("classifier")]
    if mismatched and not ignore_mismatched_sizes:
        raise UserValueError(f"{path!r} has encoder weights of the wrong shape: {mismatched[:3]}; "
                             "--ignore_mismatched_sizes re-initialises them instead.")
    if mismatched:
        logger.warning(f"Re-initialised {len(mismatched)} encoder weight(s) of {path} whose shapes did not fit "
                       f"(--ignore_mismatched_sizes): {mismatched[:5]}")
    if encoder_weights == "ema":
        if kind != "cim":
            raise UserValueError(f"{path!r} is a {kind} checkpoint: the EMA encoder (--use_ema_encoder) exists only in "
                                 "a CIM pre-training checkpoint.")
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
    from ..modeling_cim import CIMForPreTraining

    with quiet_loading():
        cim, info = CIMForPreTraining.from_pretrained(path, output_loading_info=True)
    if not cim.uses_target_encoder or any(k.startswith(TARGET_PREFIX) for k in info.get("missing_keys", [])):
        raise UserValueError(f"{path!r} has no EMA target encoder (target_encoder_mode={cim.config.target_encoder_mode!r}"
                             " or no target weights saved); fine-tune its online encoder instead.")
    # as the authors' --use_ema: the target's blocks and final norm (ResNet: its stages), the online embeddings
    target_state = {k: v for k, v in cim.target_encoder.state_dict().items() if not k.startswith(EMBEDDING_PREFIXES)}
    missing, unexpected = encoder.load_state_dict(target_state, strict=False)
    missing = [k for k in missing if not k.startswith(("pooler.", *EMBEDDING_PREFIXES))]
    if missing or unexpected:
        raise UserValueError(f"The EMA encoder of {path!r} does not fit the classifier's encoder: missing "
                             f"{missing[:3]}, unexpected {unexpected[:3]}.")


# --------------------------------------------------------------------------------------------------
# Layer-wise learning-rate decay
# --------------------------------------------------------------------------------------------------
def _encoder_type_of(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type in SUPPORTED_ENCODER_TYPES:
        return model_type
    if model_type == "cim":
        return getattr(getattr(config, "encoder_config", None), "model_type", "vit")
    names = [n for n, _ in model.named_parameters()]
    if any(_RESNET_STAGE.search(n) for n in names):
        return "resnet"
    return "vit"


def num_layers_for_decay(model: nn.Module) -> int:
    """Number of decay levels L (blocks for ViT, stages for ResNet); ids run 0 (embeddings) .. L + 1 (head)."""
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) == "cim":
        config = config.encoder_config
    if _encoder_type_of(model) == "resnet":
        if config is not None and getattr(config, "depths", None) is not None:
            return len(config.depths)
        return 1 + max(int(m.group(1)) for n, _ in model.named_parameters() if (m := _RESNET_STAGE.search(n)))
    if config is not None and getattr(config, "num_hidden_layers", None) is not None:
        return int(config.num_hidden_layers)
    return 1 + max(int(m.group(1)) for n, _ in model.named_parameters() if (m := _VIT_BLOCK.search(n)))


def layer_id_for_parameter(name: str, encoder_type: str, num_layers: int) -> int:
    """Layer id of a parameter: 0 for the embeddings / stem, i + 1 for block (stage) i, L + 1 for the rest."""
    if encoder_type == "resnet":
        if re.search(r"(?:^|\.)embedder\.", name):
            return 0
        match = _RESNET_STAGE.search(name)
    else:
        if re.search(r"(?:^|\.)embeddings\.", name):
            return 0
        match = _VIT_BLOCK.search(name)
    if match:
        return int(match.group(1)) + 1
    return num_layers + 1


def is_no_weight_decay(name: str, param: torch.Tensor) -> bool:
    """Norm weights, biases (every tensor with ndim <= 1), position embeddings and class tokens."""
    return param.ndim <= 1 or any(key in name for key in NO_WEIGHT_DECAY_NAMES)


def param_groups_layer_decay(
    model: nn.Module,
    weight_decay: float,
    layer_decay: float,
    base_lr: float,
    num_layers: int | None = None,
) -> list[dict[str, Any]]:
    """AdamW parameter groups with layer-wise lr decay.

    Layer ids: embeddings (ViT) / stem (ResNet) 0, transformer block (ResNet stage) i gets i + 1, everything after
    the last block (final norm, head) gets L + 1. A parameter with layer id ``l`` gets
    ``lr = base_lr * layer_decay ** (L + 1 - l)`` (the head trains at ``base_lr``; ``layer_decay=1`` is off) and
    weight decay ``weight_decay`` unless it is a norm / bias / position embedding / class token (then 0).
    Frozen parameters (``requires_grad=False``) are left out. Each group also carries ``layer_id`` and
    ``lr_scale``; the Trainer's schedulers multiply each group's own ``lr``.
    """
    if layer_decay <= 0:
        raise ValueError(f"layer_decay must be > 0, got {layer_decay}.")
    encoder_type = _encoder_type_of(model)
    if num_layers is None:
        num_layers = num_layers_for_decay(model)
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        layer_id = layer_id_for_parameter(name, encoder_type, num_layers)
        no_decay = is_no_weight_decay(name, param)
        key = (layer_id, no_decay)
        if key not in groups:
            scale = float(layer_decay) ** (num_layers + 1 - layer_id)
            groups[key] = {
                "params": [],
                "weight_decay": 0.0 if no_decay else float(weight_decay),
                "lr": float(base_lr) * scale,
                "lr_scale": scale,
                "layer_id": layer_id,
            }
        groups[key]["params"].append(param)
    return [groups[key] for key in sorted(groups)]


# --------------------------------------------------------------------------------------------------
# Linear probing
# --------------------------------------------------------------------------------------------------
class LinearProbeHead(nn.Module):
    """``BatchNorm1d(affine=False)`` followed by a ``Linear`` layer (MAE's linear-probing head)."""

    def __init__(self, in_features: int, num_labels: int, eps: float = 1e-6):
        super().__init__()
        self.norm = nn.BatchNorm1d(in_features, affine=False, eps=eps)
        self.linear = nn.Linear(in_features, num_labels)
        nn.init.trunc_normal_(self.linear.weight, std=0.01)
        nn.init.zeros_(self.linear.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(self.norm(features))

    @torch.no_grad()
    def folded_weight_and_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Weight and bias of one ``Linear`` equal to this head in eval mode (BatchNorm running stats folded in)."""
        std = torch.sqrt(self.norm.running_var + self.norm.eps)
        weight = self.linear.weight / std[None, :]
        bias = self.linear.bias - weight @ self.norm.running_mean
        return weight, bias


class LinearProbeForImageClassification(nn.Module):
    """A frozen stock classification model's encoder + a trainable :class:`LinearProbeHead`.

    The feature is the CLS token after the final LayerNorm (ViT) or the pooled feature (ResNet): the same one
    the stock head reads, so :meth:`to_classification_model` can fold the probe into a plain
    ``ViTForImageClassification`` / ``ResNetForImageClassification``. The encoder stays in eval mode (no dropout,
    frozen BatchNorm statistics) whatever ``train()`` is called with.
    """

    main_input_name = "pixel_values"
    accepts_loss_kwargs = False

    def __init__(self, model: ViTForImageClassification | ResNetForImageClassification, eps: float = 1e-6):
        super().__init__()
        if not isinstance(model, (ViTForImageClassification, ResNetForImageClassification)):
            raise TypeError(f"Expected a ViT/ResNet classification model, got {type(model).__name__}.")
        self.model = model
        self.config = model.config
        self.encoder_type = model.config.model_type
        for param in self.model.parameters():
            param.requires_grad_(False)
        self.head = LinearProbeHead(global_feature_size(model.config), model.config.num_labels, eps=eps)
        self.model.eval()

    def train(self, mode: bool = True) -> LinearProbeForImageClassification:
        super().train(mode)
        self.model.eval()
        return self

    def extract_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return global_features(self.model.base_model, pixel_values)

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None) -> ImageClassifierOutput:
        features = self.extract_features(pixel_values)
        logits = self.head(features.to(self.head.linear.weight.dtype))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.float(), labels.long())
        return ImageClassifierOutput(loss=loss, logits=logits)

    @torch.no_grad()
    def to_classification_model(self) -> ViTForImageClassification | ResNetForImageClassification:
        """The wrapped stock model with the trained probe folded into its classifier (eval-mode equivalent)."""
        weight, bias = self.head.folded_weight_and_bias()
        classifier = self.model.classifier
        linear = classifier if isinstance(classifier, nn.Linear) else classifier[-1]
        linear.weight.copy_(weight.to(linear.weight.dtype))
        linear.bias.copy_(bias.to(linear.bias.dtype))
        for param in self.model.parameters():
            param.requires_grad_(True)
        return self.model


# --------------------------------------------------------------------------------------------------
# Mixup / CutMix
# --------------------------------------------------------------------------------------------------
def smooth_one_hot(labels: torch.Tensor, num_labels: int, label_smoothing: float = 0.0) -> torch.Tensor:
    """One-hot targets with label smoothing: ``1 - eps + eps / C`` on the label, ``eps / C`` elsewhere."""
    off = label_smoothing / num_labels
    targets = torch.full((labels.shape[0], num_labels), off, device=labels.device, dtype=torch.float32)
    targets.scatter_(1, labels.long().view(-1, 1), 1.0 - label_smoothing + off)
    return targets


def _sample_beta(alpha: float, generator: torch.Generator | None) -> float:
    # torch has no generator-aware Beta sampler: a numpy generator keyed by the torch one
    return float(numpy_rng_from_torch(generator).beta(alpha, alpha))


def cutmix_box(
    height: int, width: int, lam: float, generator: torch.Generator | None = None
) -> tuple[int, int, int, int]:
    """A box ``(y0, y1, x0, x1)`` covering about ``1 - lam`` of the image, centred uniformly, clipped to it."""
    cut = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * cut), int(width * cut)
    cy = int(torch.randint(0, height, (1,), generator=generator).item())
    cx = int(torch.randint(0, width, (1,), generator=generator).item())
    y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height)
    x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width)
    return y0, y1, x0, x1


def mixup_cutmix(
    pixel_values: torch.Tensor,
    labels: torch.Tensor,
    num_labels: int,
    mixup_alpha: float = 0.0,
    cutmix_alpha: float = 0.0,
    label_smoothing: float = 0.0,
    generator: torch.Generator | None = None,
    switch_prob: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch-wise Mixup or CutMix with the batch reversed as partner; returns ``(pixel_values, soft_targets)``.

    With both alphas > 0, CutMix is chosen with probability ``switch_prob``. ``lam ~ Beta(alpha, alpha)``; Mixup
    returns ``lam * x + (1 - lam) * x.flip(0)``; CutMix pastes a box of ``x.flip(0)`` and sets ``lam`` to the kept
    area fraction. Targets are ``lam * y + (1 - lam) * y.flip(0)`` of label-smoothed one-hots. With both alphas 0
    the images are returned unchanged with (smoothed) one-hot targets. Random draws (CPU) use ``generator``.
    """
    targets = smooth_one_hot(labels, num_labels, label_smoothing)
    if mixup_alpha <= 0 and cutmix_alpha <= 0:
        return pixel_values, targets
    if cutmix_alpha > 0 and mixup_alpha > 0:
        use_cutmix = bool(torch.rand((), generator=generator).item() < switch_prob)
    else:
        use_cutmix = cutmix_alpha > 0
    lam = _sample_beta(cutmix_alpha if use_cutmix else mixup_alpha, generator)
    partner = pixel_values.flip(0)
    if use_cutmix:
        height, width = pixel_values.shape[-2:]
        y0, y1, x0, x1 = cutmix_box(height, width, lam, generator)
        mixed = pixel_values.clone()
        mixed[..., y0:y1, x0:x1] = partner[..., y0:y1, x0:x1]
        lam = 1.0 - (y1 - y0) * (x1 - x0) / float(height * width)
    else:
        mixed = pixel_values * lam + partner * (1.0 - lam)
    targets = targets * lam + targets.flip(0) * (1.0 - lam)
    return mixed, targets


def soft_target_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy against a probability distribution per sample."""
    loss = torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1)
    if reduction == "sum":
        return loss.sum()
    if reduction == "none":
        return loss
    return loss.mean()


# --------------------------------------------------------------------------------------------------
# Trainer
# --------------------------------------------------------------------------------------------------
class ClassificationTrainer(Trainer):
    """``Trainer`` with a layer-decay AdamW optimizer and training-time Mixup / CutMix / label smoothing.

    Extra keyword arguments: ``layer_decay`` (1.0 = off), ``mixup_alpha``, ``cutmix_alpha`` (0 = off),
    ``label_smoothing`` (default: ``args.label_smoothing_factor``, the Trainer's flag), ``mix_seed`` (Mixup / CutMix draws come from
    a generator per (seed, step, micro-batch), so a resumed run mixes as the uninterrupted one did; default: the
    global torch RNG). Evaluation always uses the
    plain cross-entropy of the model. The collator's ``num_skipped`` / ``skipped_images`` entries (images it dropped)
    are removed before the forward pass; the training images among them are counted once each in
    ``self.skipped_images`` (see `SkippedImages`), which travels with the checkpoints.
    """

    def __init__(
        self,
        *args: Any,
        layer_decay: float = 1.0,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        label_smoothing: float | None = None,
        mix_seed: int | None = None,
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        self.layer_decay = float(layer_decay)
        self.mixup_alpha = float(mixup_alpha)
        self.cutmix_alpha = float(cutmix_alpha)
        self.label_smoothing = float(self.args.label_smoothing_factor if label_smoothing is None else label_smoothing)
        # we apply label smoothing ourselves, during training only
        self.label_smoother = None
        # Mixup/CutMix draws per (seed, step, micro-batch): a resumed run mixes as the uninterrupted one did
        self._mix_generators = StepGenerators(mix_seed, self.args.process_index) if mix_seed is not None else None
        self.add_callback(EpochToDatasetCallback(self))
        self.skipped_images = SkippedImages()

    @property
    def num_skipped_images(self) -> int:
        """Distinct training images this process's collator dropped (`total_skipped_images`: all processes')."""
        return self.skipped_images.local_count

    def total_skipped_images(self) -> int:
        """Distinct training images dropped by all processes together (collective under distributed training)."""
        return self.skipped_images.total(self.accelerator)

    def _skipped_images_file(self, checkpoint: str) -> str:
        return os.path.join(checkpoint, f"skipped_images_{self.args.process_index}.json")

    def _save_rng_state(self, output_dir: str) -> None:
        super()._save_rng_state(output_dir)
        self.skipped_images.save(self._skipped_images_file(output_dir))  # before trainer_state.json, like the RNG

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any):
        self.skipped_images = SkippedImages()
        if isinstance(resume_from_checkpoint, str):
            self.skipped_images.load(self._skipped_images_file(resume_from_checkpoint))
        return super().train(resume_from_checkpoint, *args, **kwargs)

    @property
    def uses_soft_targets(self) -> bool:
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0 or self.label_smoothing > 0

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        opt_model = self.model if model is None else model
        if self.optimizer is None:
            groups = param_groups_layer_decay(
                opt_model, self.args.weight_decay, self.layer_decay, self.args.learning_rate
            )
            if self.optimizer_cls_and_kwargs is not None:
                optimizer_cls, optimizer_kwargs = self.optimizer_cls_and_kwargs
            else:
                optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
            optimizer_kwargs = {k: v for k, v in optimizer_kwargs.items() if k not in ("params", "model")}
            self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        model = model if model is not None else self.model
        if not loads_through_from_pretrained(model, resume_from_checkpoint) or self.is_deepspeed_enabled \
                or self.is_fsdp_enabled:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        load_weights_strictly(model, resume_from_checkpoint)

    def create_model_card(self, *args: Any, **kwargs: Any) -> None:
        """Keeps the card `run_image_classification.py` wrote (what the model was fine-tuned from, the recipe, the
        results): `push_to_hub` would write the Trainer's generic card over it."""
        if has_cim_card(self.args.output_dir):
            return None
        return super().create_model_card(*args, **kwargs)

    def _load_best_model(self) -> None:
        checkpoint = self.state.best_model_checkpoint
        if not loads_through_from_pretrained(self.model, checkpoint) or self.is_deepspeed_enabled or self.is_fsdp_enabled:
            return super()._load_best_model()
        load_weights_strictly(self.model, checkpoint)

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        inputs = dict(inputs)
        inputs.pop("num_skipped", None)
        skipped = inputs.pop("skipped_images", None)
        if skipped and model.training:
            self.skipped_images.add(skipped)
        inputs.pop("cim_valid", None)
        if not (model.training and self.uses_soft_targets and inputs.get("labels") is not None):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

        labels = inputs.pop("labels")
        num_labels = self.accelerator.unwrap_model(model).config.num_labels
        pixel_values, targets = mixup_cutmix(
            inputs["pixel_values"],
            labels,
            num_labels,
            self.mixup_alpha,
            self.cutmix_alpha,
            self.label_smoothing,
            generator=self._mix_generators.next(self.state.global_step) if self._mix_generators else None,
        )
        inputs["pixel_values"] = pixel_values
        outputs = model(**inputs)
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        if self.model_accepts_loss_kwargs and num_items_in_batch is not None:
            # The Trainer will not divide by the accumulation steps: normalise over the accumulated batch.
            loss = soft_target_cross_entropy(logits, targets, reduction="sum") / num_items_in_batch
            if self.args.average_tokens_across_devices:
                loss = loss * self.accelerator.num_processes
        else:
            loss = soft_target_cross_entropy(logits, targets)
        return (loss, outputs) if return_outputs else loss


__all__ = [
    "ClassificationTrainer",
    "LinearProbeForImageClassification",
    "LinearProbeHead",
    "cutmix_box",
    "is_no_weight_decay",
    "layer_id_for_parameter",
    "load_encoder_for_classification",
    "mixup_cutmix",
    "num_layers_for_decay",
    "param_groups_layer_decay",
    "resize_vit_position_embeddings",
    "smooth_one_hot",
    "soft_target_cross_entropy",
]
