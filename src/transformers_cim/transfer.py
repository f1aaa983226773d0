"""Transfer a CIM encoder into stock transformers models: the authors' classification head and UperNet segmentation.

The CIM authors fine-tune with *global average pooling*: the mean of the patch tokens, then a fresh LayerNorm
(``fc_norm``), with drop-path; the paper's segmentation transfer puts the ViT in UperNet with BEiT's multi-scale
neck. transformers has both as stock classes, under BEiT: a `BeitConfig` with relative position bias and layer
scale off and absolute position embeddings on *is* a plain ViT, except that BEiT's attention has no key bias.
Dropping the key bias is exact: it adds ``q . b_k``, the same constant for every key of a query, to one row of
attention logits, and softmax ignores a constant added to a row. So

- `beit_for_image_classification` gives a `BeitForImageClassification` (mean pooling + LayerNorm, drop-path) that
  is the ViT encoder with the authors' head, and
- `upernet_for_semantic_segmentation` gives an `UperNetForSemanticSegmentation` whose backbone is a `BeitBackbone`
  (BEiT's FPN neck over four blocks) for a ViT, or a `ResNetBackbone` (four stages) for a ResNet,

both saved and loaded with no custom code (`pipeline("image-classification")`, `pipeline("image-segmentation")`).
Any checkpoint `load_encoder_for_classification` reads is accepted: a CIM pre-training checkpoint (its online
encoder), an exported encoder, a stock ViT / ResNet, a Hub id; ``None`` with an encoder config gives random init.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from transformers import (
    BeitConfig,
    BeitForImageClassification,
    PreTrainedConfig,
    ResNetConfig,
    UperNetConfig,
    UperNetForSemanticSegmentation,
    ViTConfig,
    ViTModel,
)

from .encoder_loading import load_encoder_for_classification
from .errors import UserValueError

# The BEiT / MAE fine-tuning head: classifier weights drawn with this std (a near-zero start).
HEAD_INIT_STD = 2e-5


def beit_config_from_vit(
    vit_config: ViTConfig, *, use_mean_pooling: bool = True, drop_path_rate: float = 0.0, **kwargs: Any
) -> BeitConfig:
    """A `BeitConfig` computing exactly what ``vit_config``'s ViT computes (no relative position bias, no layer
    scale, absolute position embeddings), plus the head / backbone settings in ``kwargs``."""
    if getattr(vit_config, "hidden_dropout_prob", 0.0) or getattr(vit_config, "attention_probs_dropout_prob", 0.0):
        kwargs.setdefault("hidden_dropout_prob", vit_config.hidden_dropout_prob)
        kwargs.setdefault("attention_probs_dropout_prob", vit_config.attention_probs_dropout_prob)
    return BeitConfig(
        hidden_size=vit_config.hidden_size,
        num_hidden_layers=vit_config.num_hidden_layers,
        num_attention_heads=vit_config.num_attention_heads,
        intermediate_size=vit_config.intermediate_size,
        hidden_act=vit_config.hidden_act,
        layer_norm_eps=vit_config.layer_norm_eps,
        image_size=vit_config.image_size,
        patch_size=vit_config.patch_size,
        num_channels=vit_config.num_channels,
        use_mask_token=False,
        use_absolute_position_embeddings=True,
        use_relative_position_bias=False,
        use_shared_relative_position_bias=False,
        layer_scale_init_value=0.0,
        use_mean_pooling=use_mean_pooling,
        drop_path_rate=drop_path_rate,
        **kwargs,
    )


def vit_state_dict_to_beit(state: Mapping[str, torch.Tensor], *, keep_final_norm: bool) -> dict[str, torch.Tensor]:
    """A ``ViTModel`` state dict as a ``BeitModel`` one: the names already agree; the key bias is dropped (exact,
    see the module docstring), and so is the final LayerNorm unless ``keep_final_norm`` (BEiT with mean pooling
    and BEiT's backbone have none; the pooled LayerNorm is a fresh one, as in the authors' fine-tuning)."""
    if not state:
        raise ValueError("Empty ViT state dict.")
    out = {}
    for name, tensor in state.items():
        if name.endswith("attention.k_proj.bias") or name.startswith("pooler."):
            continue
        if name.startswith("layernorm.") and not keep_final_norm:
            continue
        out[name] = tensor
    return out


def _load_vit_into_beit(beit_model: nn.Module, vit: ViTModel, *, keep_final_norm: bool) -> None:
    state = vit_state_dict_to_beit(vit.state_dict(), keep_final_norm=keep_final_norm)
    missing, unexpected = beit_model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("pooler.")]
    if missing or unexpected:
        raise RuntimeError(f"ViT -> BEiT weight mapping failed: missing {missing[:5]}, unexpected {unexpected[:5]}")


def load_vit_encoder(
    model_name_or_path: str | os.PathLike | None,
    *,
    vit_config: ViTConfig | None = None,
    image_size: int | None = None,
    encoder_weights: str = "online",
) -> ViTModel:
    """The ViT encoder of a checkpoint (CIM, exported, stock, Hub id) or, with ``model_name_or_path=None``, a
    randomly initialised one of ``vit_config``; its position table resized to ``image_size`` if given.
    ``encoder_weights="ema"`` takes a CIM checkpoint's EMA target encoder."""
    if model_name_or_path is None:
        if vit_config is None:
            raise UserValueError("Give a checkpoint to start from, or an encoder config for random init.")
        config = ViTConfig.from_dict(vit_config.to_dict())
        if image_size is not None:
            config.image_size = int(image_size)
        return ViTModel(config, add_pooling_layer=False)
    model = load_encoder_for_classification(
        model_name_or_path, num_labels=2, image_size=image_size, encoder_weights=encoder_weights
    )
    if model.config.model_type != "vit":
        raise UserValueError(f"{model_name_or_path!r} holds a {model.config.model_type} encoder, not a ViT.")
    return model.vit


def beit_for_image_classification(
    model_name_or_path: str | os.PathLike | None,
    num_labels: int,
    *,
    id2label: Mapping[int, str] | None = None,
    label2id: Mapping[str, int] | None = None,
    drop_path_rate: float = 0.1,
    image_size: int | None = None,
    vit_config: ViTConfig | None = None,
    seed: int | None = None,
    encoder_weights: str = "online",
) -> BeitForImageClassification:
    """The ViT encoder of ``model_name_or_path`` with the authors' fine-tuning head: mean of the patch tokens,
    a fresh LayerNorm, a linear classifier drawn with std 2e-5 (seeded by ``seed``); drop-path in the blocks."""
    vit = load_vit_encoder(
        model_name_or_path, vit_config=vit_config, image_size=image_size, encoder_weights=encoder_weights
    )
    id2label = {int(k): str(v) for k, v in (id2label or {i: f"LABEL_{i}" for i in range(num_labels)}).items()}
    label2id = dict(label2id) if label2id is not None else {v: k for k, v in id2label.items()}
    config = beit_config_from_vit(
        vit.config,
        use_mean_pooling=True,
        drop_path_rate=drop_path_rate,
        num_labels=num_labels,
        id2label=id2label,
        label2id=label2id,
    )
    model = BeitForImageClassification(config)
    _load_vit_into_beit(model.beit, vit, keep_final_norm=False)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    with torch.no_grad():
        weight = torch.empty_like(model.classifier.weight)
        nn.init.trunc_normal_(
            weight, std=HEAD_INIT_STD, a=-2 * HEAD_INIT_STD, b=2 * HEAD_INIT_STD, generator=generator
        )
        model.classifier.weight.copy_(weight)
        model.classifier.bias.zero_()
    return model


def default_out_indices(num_layers: int) -> list[int]:
    """The four blocks whose outputs feed the FPN: BEiT's ADE20K setup takes blocks 4, 6, 8, 12 of 12 (1-based,
    i.e. hidden-state indices, where 0 is the embeddings); other depths take the same fractions."""
    if num_layers < 4:
        raise UserValueError(
            f"UperNet needs 4 feature levels: an encoder of {num_layers} blocks has too few; "
            "pre-train (or start from) an encoder with at least 4 blocks."
        )
    indices: list[int] = []
    for fraction in (1 / 3, 1 / 2, 2 / 3):
        nearest = int(num_layers * fraction + 0.5)
        indices.append(max(nearest, indices[-1] + 1 if indices else 1))
    return indices + [num_layers]


def _backbone_config(
    encoder_config: PreTrainedConfig, out_indices: Sequence[int] | None, drop_path_rate: float
) -> PreTrainedConfig:
    if encoder_config.model_type == "vit":
        indices = (
            list(out_indices) if out_indices is not None else default_out_indices(encoder_config.num_hidden_layers)
        )
        if len(indices) != 4:
            raise UserValueError(f"BEiT's FPN neck takes exactly 4 feature levels, got out_indices={indices}.")
        return beit_config_from_vit(
            encoder_config,
            use_mean_pooling=True,
            drop_path_rate=drop_path_rate,
            add_fpn=True,
            reshape_hidden_states=True,
            out_indices=indices,
        )
    if encoder_config.model_type == "resnet":
        config = ResNetConfig.from_dict(encoder_config.to_dict())
        config.out_features = [f"stage{i}" for i in range(1, len(config.depths) + 1)][-4:]
        return config
    raise UserValueError(f"No segmentation backbone for a {encoder_config.model_type!r} encoder (ViT or ResNet).")


def upernet_for_semantic_segmentation(
    model_name_or_path: str | os.PathLike | None,
    num_labels: int,
    *,
    id2label: Mapping[int, str] | None = None,
    label2id: Mapping[str, int] | None = None,
    encoder_config: PreTrainedConfig | None = None,
    image_size: int | None = None,
    out_indices: Sequence[int] | None = None,
    drop_path_rate: float = 0.1,
    hidden_size: int = 512,
    auxiliary_channels: int = 256,
    use_auxiliary_head: bool = True,
    auxiliary_loss_weight: float = 0.4,
    ignore_index: int = 255,
    encoder_weights: str = "online",
) -> UperNetForSemanticSegmentation:
    """UperNet over the encoder of ``model_name_or_path`` (or a random one of ``encoder_config``): a ViT becomes a
    `BeitBackbone` with BEiT's FPN neck over four blocks (``out_indices``), a ResNet a `ResNetBackbone` over its
    four stages. The decode and auxiliary heads are new."""
    if model_name_or_path is not None:
        encoder = load_encoder_for_classification(
            model_name_or_path, num_labels=2, image_size=image_size, encoder_weights=encoder_weights
        )
        base = encoder.vit if encoder.config.model_type == "vit" else encoder.resnet
        encoder_config = base.config
    elif encoder_config is None:
        raise UserValueError("Give a checkpoint to start from, or an encoder config for random init.")
    else:
        encoder_config = encoder_config.__class__.from_dict(encoder_config.to_dict())
        if image_size is not None and encoder_config.model_type == "vit":
            encoder_config.image_size = int(image_size)
        base = None
    backbone_config = _backbone_config(encoder_config, out_indices, drop_path_rate)
    id2label = {int(k): str(v) for k, v in (id2label or {i: f"LABEL_{i}" for i in range(num_labels)}).items()}
    label2id = dict(label2id) if label2id is not None else {v: k for k, v in id2label.items()}
    config = UperNetConfig(
        backbone_config=backbone_config,
        hidden_size=hidden_size,
        auxiliary_channels=auxiliary_channels,
        use_auxiliary_head=use_auxiliary_head,
        auxiliary_loss_weight=auxiliary_loss_weight,
        loss_ignore_index=ignore_index,
        num_labels=num_labels,
        id2label=id2label,
        label2id=label2id,
    )
    model = UperNetForSemanticSegmentation(config)
    if base is not None:
        if encoder_config.model_type == "vit":
            _load_vit_into_beit(model.backbone.beit, base, keep_final_norm=False)
        else:
            state = {k: v for k, v in base.state_dict().items() if not k.startswith("pooler.")}
            missing, unexpected = model.backbone.load_state_dict(state, strict=False)
            if missing or unexpected:
                raise RuntimeError(
                    f"ResNet -> ResNetBackbone mapping failed: missing {missing[:5]}, unexpected {unexpected[:5]}"
                )
    return model


__all__ = [
    "beit_config_from_vit",
    "beit_for_image_classification",
    "default_out_indices",
    "load_vit_encoder",
    "upernet_for_semantic_segmentation",
    "vit_state_dict_to_beit",
]
