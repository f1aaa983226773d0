"""The quality benchmark's models and data: one encoder shape for CIM, MAE and random init (the MAE authors' init
for MAE), and the Imagenette loaders of each stage."""

from __future__ import annotations

import argparse
import math
from collections.abc import Iterator
from typing import Any

import datasets
import torch
import transformers
from torch import nn
from torch.utils.data import DataLoader
from transformers import (
    ViTConfig,
    ViTMAEConfig,
    ViTMAEForPreTraining,
)

from transformers_cim import CIMConfig, CIMForPreTraining
from transformers_cim.training.data import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    RandomResizedCropFlip,
    ResizeCenterCrop,
    SkippingCollator,
    build_classification_transform,
    build_pretraining_transform,
    load_image_dataset,
    prepare_dataset,
)

from .common import MIN_IMAGE_SIDE


def cim_config(args: argparse.Namespace) -> CIMConfig:
    """The package's default CIM config (authors' recipe) with this benchmark's sizes only."""
    config = CIMConfig.from_preset(
        args.encoder,
        image_size=args.image_size,
        context_size=args.context_size,
        exemplar_size=args.exemplar_size,
        num_exemplars=args.num_exemplars,
        decoder_hidden_size=args.decoder_hidden_size,
        decoder_num_attention_heads=args.decoder_num_attention_heads,
    )
    config.encoder_config.patch_size = args.patch_size
    config.encoder_config.num_hidden_layers = args.num_layers
    if args.cim_overrides:
        config.update_from_string(args.cim_overrides)
    if getattr(args, "exemplar_augmentation_ramp", None) is not None:  # a list, which --cim_overrides cannot carry
        config.exemplar_augmentation_ramp = list(args.exemplar_augmentation_ramp)
    return CIMConfig.from_dict(config.to_dict())  # re-validated with the new encoder sizes


def encoder_vit_config(args: argparse.Namespace) -> ViTConfig:
    """The stock ViTConfig every exported encoder uses (the CIM encoder config)."""
    enc = cim_config(args).encoder_config
    return ViTConfig(
        hidden_size=enc.hidden_size,
        num_hidden_layers=enc.num_hidden_layers,
        num_attention_heads=enc.num_attention_heads,
        intermediate_size=enc.intermediate_size,
        hidden_act=enc.hidden_act,
        layer_norm_eps=enc.layer_norm_eps,
        qkv_bias=enc.qkv_bias,
        image_size=args.image_size,
        patch_size=args.patch_size,
        num_channels=3,
    )


def mae_config(args: argparse.Namespace) -> ViTMAEConfig:
    enc = encoder_vit_config(args)
    return ViTMAEConfig(
        hidden_size=enc.hidden_size,
        num_hidden_layers=enc.num_hidden_layers,
        num_attention_heads=enc.num_attention_heads,
        intermediate_size=enc.intermediate_size,
        hidden_act=enc.hidden_act,
        layer_norm_eps=enc.layer_norm_eps,
        qkv_bias=enc.qkv_bias,
        image_size=args.image_size,
        patch_size=args.patch_size,
        num_channels=3,
        mask_ratio=args.mask_ratio,
        norm_pix_loss=True,
        decoder_hidden_size=args.mae_decoder_hidden_size,
        decoder_num_hidden_layers=args.mae_decoder_layers,
        decoder_num_attention_heads=args.mae_decoder_heads,
        decoder_intermediate_size=4 * args.mae_decoder_hidden_size,
    )


def new_cim_model(args: argparse.Namespace) -> CIMForPreTraining:
    transformers.set_seed(args.seed)
    return CIMForPreTraining(cim_config(args))


@torch.no_grad()
def init_linear_like_mae_authors(module: nn.Module) -> None:
    """MAE authors' init of the blocks: Linear xavier-uniform / zero bias (q, k, v with the bound of their fused
    (3D x D) qkv matrix), LayerNorm 1 / 0."""
    for name, sub in module.named_modules():
        if isinstance(sub, nn.Linear):
            if name.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj"):
                bound = math.sqrt(6.0 / (sub.weight.shape[1] + 3 * sub.weight.shape[0]))
                nn.init.uniform_(sub.weight, -bound, bound)
            else:
                nn.init.xavier_uniform_(sub.weight)
            if sub.bias is not None:
                nn.init.zeros_(sub.bias)
        elif isinstance(sub, nn.LayerNorm):
            nn.init.ones_(sub.weight)
            nn.init.zeros_(sub.bias)


def new_mae_model(args: argparse.Namespace) -> ViTMAEForPreTraining:
    """A fresh `ViTMAEForPreTraining` initialised like the MAE authors' code, sin-cos tables actually written.

    Work-around: in the installed transformers, `ViTMAEPreTrainedModel._init_weights` flags the patch projection as
    initialised before `ViTMAEEmbeddings.initialize_weights` runs (which then returns early) and zeroes the
    decoder's `decoder_pos_embed`: both frozen sin-cos tables stay all zero. We run MAE's own initialisers here,
    then the authors' xavier init of every Linear (transformers uses normal(0.02)); cls / mask token normal(0.02).
    """
    transformers.set_seed(args.seed)
    model = ViTMAEForPreTraining(mae_config(args))
    embeddings = model.vit.embeddings
    embeddings.patch_embeddings.projection._is_hf_initialized = False
    with torch.no_grad():
        embeddings.initialize_weights()  # sin-cos table, xavier patch projection (as a Linear), cls normal(0.02)
        model.decoder.initialize_weights(embeddings.patch_embeddings.num_patches)
        init_linear_like_mae_authors(model.vit.layers)
        init_linear_like_mae_authors(model.vit.layernorm)
        init_linear_like_mae_authors(model.decoder)
        nn.init.normal_(model.decoder.mask_token, std=0.02)
    if embeddings.position_embeddings.abs().sum() == 0 or model.decoder.decoder_pos_embed.abs().sum() == 0:
        raise RuntimeError("could not initialise the MAE sin-cos position embeddings")
    return model


def load_split(args: argparse.Namespace, split: str, limit: int | None) -> datasets.Dataset:
    """A split of the dataset; with `limit`, a fixed seeded subset of that many rows."""
    ds = load_image_dataset(dataset_name=args.dataset_name, split=split)
    if limit is not None and limit < len(ds):
        ds = ds.shuffle(seed=args.seed).select(range(limit))
    return ds


def num_classes_of(ds: datasets.Dataset) -> int:
    feature = ds.features.get("label")
    return int(feature.num_classes) if hasattr(feature, "num_classes") else int(max(ds["label"])) + 1


def make_loader(
    args: argparse.Namespace, ds: Any, batch_size: int, shuffle: bool, drop_last: bool, seed_offset: int = 0
) -> DataLoader:
    workers = int(args.num_workers)
    return DataLoader(
        ds,
        batch_size=batch_size,
        shuffle=shuffle,
        drop_last=drop_last,
        num_workers=workers,
        collate_fn=SkippingCollator(),
        pin_memory=args.device == "cuda",
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
        generator=torch.Generator().manual_seed(args.seed + seed_offset),
    )


def pretraining_loader(args: argparse.Namespace, crop_min: float, batch_size: int) -> DataLoader:
    """Unlabelled random-resized-crop + flip views of the train split (the CIM search view / MAE input)."""
    raw = load_split(args, "train", args.max_pretrain_images)
    view = RandomResizedCropFlip(
        size=args.image_size, scale=(crop_min, 1.0), mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD
    )
    ds = prepare_dataset(raw, "image", build_pretraining_transform("image", view, MIN_IMAGE_SIDE))
    return make_loader(args, ds, batch_size, shuffle=True, drop_last=True, seed_offset=1)


def eval_dataset(args: argparse.Namespace, split: str, limit: int | None) -> tuple[Any, int]:
    """Labelled split with the evaluation transform (resize to size / 0.875, centre crop), and its class count."""
    raw = load_split(args, split, limit)
    transform = ResizeCenterCrop(
        size=args.image_size, crop_pct=0.875, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD
    )
    fn = build_classification_transform("image", "label", transform, MIN_IMAGE_SIDE)
    return prepare_dataset(raw, "image", fn), num_classes_of(raw)


def finetune_loader(args: argparse.Namespace) -> DataLoader:
    """Labelled train views for fine-tuning: random-resized crop (0.08, 1) + flip (erasing / mixing: per batch)."""
    raw = load_split(args, "train", args.max_train_images)
    view = RandomResizedCropFlip(
        size=args.image_size, scale=(args.finetune_crop_min, 1.0), mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD
    )
    ds = prepare_dataset(raw, "image", build_classification_transform("image", "label", view, MIN_IMAGE_SIDE))
    return make_loader(args, ds, args.finetune_batch_size, shuffle=True, drop_last=True, seed_offset=2)


def endless(loader: DataLoader) -> Iterator[dict]:
    while True:
        yield from loader
