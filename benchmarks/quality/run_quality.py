#!/usr/bin/env python
"""Quality benchmark: does CIM pre-training give a better ViT encoder than MAE or no pre-training at all?

One script, one encoder shape, three starting points:

* ``cim``: `transformers_cim.CIMForPreTraining` with the package's default config (the authors' recipe:
  enclosing exemplar boxes, xavier encoder init, EMA target, cross-entropy, ...) except for the sizes;
* ``mae``: `transformers.ViTMAEForPreTraining` with the same encoder (width, depth, heads, MLP, patch,
  image size, LayerNorm eps, qkv bias), mask ratio 0.75, normalised-pixel loss, the MAE authors' init;
* ``random``: the CIM encoder at step 0 (same init, same fixed 2-D sin-cos position table).

CIM and MAE get the SAME WALL CLOCK of pre-training (``--pretrain_minutes`` each) on the Imagenette train
split without labels, in one shared training loop (AdamW (0.9, 0.95), weight decay 0.05, same peak lr,
same batch, gradient clipping 1.0). The learning-rate warm-up / cosine decay and CIM's EMA-momentum
schedule are functions of the elapsed fraction of the budget, so both schedules complete whatever the
machine's speed or load.

Every encoder is then exported as a stock `ViTModel` and evaluated with three protocols:

1. frozen features (both the CLS token and the mean of the patch tokens, after the final LayerNorm) of
   the train split -> linear probe (`BatchNorm1d(affine=False)` + `Linear`, MAE's head) and weighted k-NN
   (k=20, cosine, T=0.07, DINO), scored on the whole validation split (3,925 images);
2. end-to-end fine-tuning with the authors' recipe, as a `BeitForImageClassification` that is exactly a
   plain ViT (relative position bias and layer scale off, absolute position embeddings on; the ViT's key
   bias, which softmax ignores, is dropped): mean-pooled patch tokens + LayerNorm (fc_norm), drop-path 0.1,
   layer-wise lr decay 0.8, base lr 1.2e-3 x batch / 256, weight decay 0.05, random erasing 0.25,
   mixup 0.8 / cutmix 1.0, label smoothing 0.1, head init std 2e-5 (no RandAugment: see the README);
3. every accuracy comes with a 95% Wilson score interval over the validation images.

Each stage writes its result under ``--work_dir`` and is reused by a later invocation when the settings it
depends on are unchanged (resumable); the report (markdown + JSON) is rewritten after every stage.

    python benchmarks/quality/run_quality.py                 # CPU: ViT-T/8, 96 px, 10 min per method
    python benchmarks/quality/run_quality.py --gpu           # one H100/H200, ~8 min: ViT-S/16, 160 px, bf16
    python benchmarks/quality/run_quality.py --smoke         # seconds-long budgets, 300 images: does it run?
    python benchmarks/quality/run_quality.py --gpu --smoke   # the --gpu code path, tiny, on CPU if no GPU

See benchmarks/quality/README.md for the exact commands and what the numbers mean.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
for _path in (os.path.join(REPO, "src"), os.path.dirname(HERE)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import datasets  # noqa: E402
import transformers  # noqa: E402
from transformers import (  # noqa: E402
    BeitConfig,
    BeitForImageClassification,
    ViTConfig,
    ViTMAEConfig,
    ViTMAEForPreTraining,
    ViTModel,
)

from transformers_cim import CIMConfig, CIMForPreTraining  # noqa: E402
from transformers_cim.training.data import (  # noqa: E402
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
from transformers_cim.export import export_encoder  # noqa: E402
from transformers_cim.training.layer_decay import is_no_weight_decay, param_groups_layer_decay  # noqa: E402
from transformers_cim.training.linear_probe import LinearProbeHead  # noqa: E402
from transformers_cim.training.mixup import mixup_cutmix, soft_target_cross_entropy  # noqa: E402
from transformers_cim.training.knn import extract_features, knn_predict  # noqa: E402
from transformers_cim.training.trainer import cosine_momentum  # noqa: E402

DEFAULT_DATA = "/work/shared/data/imagenette-160"
METHODS = ("cim", "mae", "random")
METHOD_NAMES = {"cim": "CIM", "mae": "MAE", "random": "random init"}
Z_95 = 1.959964  # two-sided 95% normal quantile
MIN_IMAGE_SIDE = 16

# Settings that differ between the CPU default, --gpu and --smoke. Explicit flags always win; --smoke then
# overrides the preset. "encoder" names a width preset of transformers_cim (hidden / heads / MLP).
CPU_PRESET: dict[str, Any] = {
    "device": "cpu", "bf16": False, "encoder": "vit-tiny-patch16", "num_layers": 6, "patch_size": 8,
    "image_size": 96, "context_size": 64, "exemplar_size": 32, "decoder_hidden_size": 256,
    "decoder_num_attention_heads": 8, "mae_decoder_hidden_size": 128, "mae_decoder_layers": 2,
    "mae_decoder_heads": 4, "batch_size": 64, "pretrain_minutes": 10.0, "finetune_epochs": 2.0,
    "finetune_batch_size": 64, "num_workers": 0, "deadline_minutes": 0.0,
    "work_dir": os.path.join(HERE, "work", "cpu"),
}
GPU_PRESET: dict[str, Any] = {
    "device": "cuda", "bf16": True, "encoder": "vit-small-patch16", "num_layers": 12, "patch_size": 16,
    "image_size": 160, "context_size": 112, "exemplar_size": 64, "decoder_hidden_size": 512,
    "decoder_num_attention_heads": 16, "mae_decoder_hidden_size": 256, "mae_decoder_layers": 4,
    "mae_decoder_heads": 8, "batch_size": 256, "pretrain_minutes": 3.0, "finetune_epochs": 0.0,
    "finetune_batch_size": 256, "num_workers": max(0, min(15, (os.cpu_count() or 1) - 1)),
    "deadline_minutes": 9.0, "work_dir": os.path.join(HERE, "work", "gpu"),
}
SMOKE_OVERRIDES: dict[str, Any] = {
    "num_layers": 2, "pretrain_minutes": 20 / 60, "max_pretrain_images": 300, "max_train_images": 300,
    "max_eval_images": 300, "probe_epochs": 50, "finetune_epochs": 1.0, "batch_size": 32,
    "finetune_batch_size": 32, "num_workers": 0, "deadline_minutes": 0.0,
}

# The settings each stage's result depends on: a stored result is reused only when these are unchanged.
ENCODER_KEYS = ("dataset_name", "seed", "encoder", "num_layers", "patch_size", "image_size")
PRETRAIN_KEYS = ENCODER_KEYS + ("pretrain_minutes", "batch_size", "pretrain_blr", "warmup_fraction", "clip_grad",
                                "max_pretrain_images", "bf16", "device")
CIM_KEYS = PRETRAIN_KEYS + ("context_size", "exemplar_size", "num_exemplars", "decoder_hidden_size",
                            "decoder_num_attention_heads", "cim_crop_min", "cim_overrides")
MAE_KEYS = PRETRAIN_KEYS + ("mask_ratio", "mae_decoder_hidden_size", "mae_decoder_layers", "mae_decoder_heads",
                            "mae_crop_min")
FROZEN_KEYS = ("max_train_images", "max_eval_images", "probe_epochs", "probe_lr", "knn_k", "knn_temperature")
FINETUNE_KEYS = ("max_train_images", "max_eval_images", "finetune_epochs", "finetune_batch_size", "finetune_blr",
                 "finetune_layer_decay", "finetune_weight_decay", "finetune_drop_path", "finetune_warmup_fraction",
                 "finetune_crop_min", "random_erasing", "mixup", "cutmix", "label_smoothing")


# ------------------------------------------------------------------------------------------------------------
# Arguments
# ------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """All flags; those left at None are filled from the CPU / GPU preset and --smoke (see `resolve_settings`)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_argument_group("mode")
    mode.add_argument("--gpu", action="store_true", help="the one-GPU preset (ViT-S/16, 160 px, bf16, ~8 min)")
    mode.add_argument("--smoke", action="store_true",
                      help="dry run: depth 2, 20 s of pre-training per method, 300 images per split")
    mode.add_argument("--work_dir", default=None, help="per-stage results, checkpoints, features (resumable)")
    mode.add_argument("--output_dir", default=None, help="where quality.md / quality.json go (default: work_dir)")
    mode.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    mode.add_argument("--device", choices=("cpu", "cuda"), default=None)
    mode.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None, help="bf16 autocast")
    mode.add_argument("--threads", type=int, default=None, help="torch threads (default: 1 on CPU)")
    mode.add_argument("--num_workers", type=int, default=None, help="data-loader worker processes")
    mode.add_argument("--seed", type=int, default=0)
    mode.add_argument("--deadline_minutes", type=float, default=None,
                      help="skip stages that would start after this many minutes (0 = none); for a capped command")
    data = p.add_argument_group("data")
    data.add_argument("--dataset_name", default=DEFAULT_DATA, help="Hub id or local Hub-layout dir (image, label)")
    data.add_argument("--max_pretrain_images", type=int, default=None, help="train images for pre-training (all)")
    data.add_argument("--max_train_images", type=int, default=None,
                      help="labelled train images for probe / k-NN / fine-tune (all)")
    data.add_argument("--max_eval_images", type=int, default=None, help="validation images (all 3,925)")
    enc = p.add_argument_group("encoder (shared by every method)")
    enc.add_argument("--encoder", default=None, choices=("vit-tiny-patch16", "vit-small-patch16", "vit-base-patch16"),
                     help="width preset (hidden / heads / MLP); the patch size and depth are set separately")
    enc.add_argument("--num_layers", type=int, default=None)
    enc.add_argument("--patch_size", type=int, default=None)
    enc.add_argument("--image_size", type=int, default=None, help="CIM search view, MAE input, evaluation size")
    cim = p.add_argument_group("CIM (everything else: the package defaults, i.e. the authors' recipe)")
    cim.add_argument("--context_size", type=int, default=None)
    cim.add_argument("--exemplar_size", type=int, default=None, help=">= 4 patches per side is advised")
    cim.add_argument("--num_exemplars", type=int, default=6)
    cim.add_argument("--decoder_hidden_size", type=int, default=None)
    cim.add_argument("--decoder_num_attention_heads", type=int, default=None)
    cim.add_argument("--cim_crop_min", type=float, default=0.5, help="search-view crop scale (authors: 0.5)")
    cim.add_argument("--cim_overrides", default="", help='CIMConfig fields, "key=value,key=value" (e.g. '
                     '"exemplar_augmentation=false": the setting that learns at CPU budgets, see the README)')
    mae = p.add_argument_group("MAE")
    mae.add_argument("--mask_ratio", type=float, default=0.75)
    mae.add_argument("--mae_decoder_hidden_size", type=int, default=None)
    mae.add_argument("--mae_decoder_layers", type=int, default=None)
    mae.add_argument("--mae_decoder_heads", type=int, default=None)
    mae.add_argument("--mae_crop_min", type=float, default=0.2, help="crop scale (MAE authors: 0.2)")
    pre = p.add_argument_group("pre-training (the same for CIM and MAE)")
    pre.add_argument("--pretrain_minutes", type=float, default=None, help="wall-clock budget per method")
    pre.add_argument("--batch_size", type=int, default=None)
    pre.add_argument("--pretrain_blr", type=float, default=1e-3, help="peak lr = blr x batch / 256")
    pre.add_argument("--warmup_fraction", type=float, default=0.1, help="of the time budget")
    pre.add_argument("--clip_grad", type=float, default=1.0)
    ev = p.add_argument_group("frozen-feature evaluation")
    ev.add_argument("--probe_epochs", type=int, default=None, help="over the cached features (default 100)")
    ev.add_argument("--probe_lr", type=float, default=1e-3)
    ev.add_argument("--knn_k", type=int, default=20)
    ev.add_argument("--knn_temperature", type=float, default=0.07)
    ft = p.add_argument_group("fine-tuning (authors' recipe)")
    ft.add_argument("--finetune_epochs", type=float, default=None, help="0 skips the stage")
    ft.add_argument("--finetune_batch_size", type=int, default=None)
    ft.add_argument("--finetune_blr", type=float, default=1.2e-3, help="lr = blr x batch / 256")
    ft.add_argument("--finetune_layer_decay", type=float, default=0.8)
    ft.add_argument("--finetune_weight_decay", type=float, default=0.05)
    ft.add_argument("--finetune_drop_path", type=float, default=0.1)
    ft.add_argument("--finetune_warmup_fraction", type=float, default=0.05, help="5 of 100 epochs")
    ft.add_argument("--finetune_crop_min", type=float, default=0.08)
    ft.add_argument("--random_erasing", type=float, default=0.25)
    ft.add_argument("--mixup", type=float, default=0.8)
    ft.add_argument("--cutmix", type=float, default=1.0)
    ft.add_argument("--label_smoothing", type=float, default=0.1)
    return p


def resolve_settings(args: argparse.Namespace) -> argparse.Namespace:
    """Fill unset flags: explicit flag > --smoke > --gpu / CPU preset > generic default."""
    preset = GPU_PRESET if args.gpu else CPU_PRESET
    layers = [SMOKE_OVERRIDES] if args.smoke else []
    for name, value in {**preset, **{k: v for layer in layers for k, v in layer.items()}}.items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    args.probe_epochs = 100 if args.probe_epochs is None else args.probe_epochs
    if args.smoke and args.work_dir == preset["work_dir"]:
        args.work_dir = tempfile.mkdtemp(prefix="cim-quality-smoke-")
    args.output_dir = args.output_dir or args.work_dir
    if args.device == "cuda" and not torch.cuda.is_available():
        if not args.smoke:
            sys.exit("--gpu / --device cuda asked for, but CUDA is not available (add --smoke for a CPU dry run)")
        log("no CUDA: the --gpu --smoke dry run runs on the CPU (bf16 autocast still on)")
        args.device = "cpu"
    return args


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return resolve_settings(build_parser().parse_args(argv))


# ------------------------------------------------------------------------------------------------------------
# Small utilities
# ------------------------------------------------------------------------------------------------------------


def log(msg: str) -> None:
    print(f"[quality {datetime.datetime.now().strftime('%H:%M:%S')}] {msg}", flush=True)


def read_json(path: str) -> dict | None:
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def write_json(path: str, data: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
    os.replace(path + ".tmp", path)


def wilson_interval(correct: int, total: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (95% for the default z); (0, 1) when total is 0."""
    if total <= 0:
        return 0.0, 1.0
    p = correct / total
    denom = 1.0 + z * z / total
    centre = (p + z * z / (2 * total)) / denom
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def accuracy_record(predictions: torch.Tensor, labels: torch.Tensor) -> dict:
    """Top-1 accuracy with its count and 95% Wilson interval (JSON-ready)."""
    correct, total = int((predictions.cpu() == labels.cpu()).sum()), int(labels.numel())
    low, high = wilson_interval(correct, total)
    return {"top1": correct / max(total, 1), "correct": correct, "total": total, "ci95": [low, high]}


def subset_settings(args: argparse.Namespace, keys: tuple[str, ...]) -> dict:
    return {k: getattr(args, k) for k in keys}


def reusable(path: str, settings: dict) -> dict | None:
    """The stored stage result at `path` if it was made with `settings`; None (stage to run) otherwise."""
    done = read_json(path)
    if done is None:
        return None
    if done.get("settings") != settings:
        log(f"{os.path.relpath(path)}: made with other settings, redoing")
        return None
    return done


def autocast(args: argparse.Namespace) -> torch.autocast:
    return torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16, enabled=bool(args.bf16))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def warmup_cosine(progress: float, warmup: float) -> float:
    """Learning-rate multiplier at `progress` in [0, 1]: linear warm-up over `warmup`, then cosine to 0."""
    if progress < warmup:
        return progress / warmup
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (progress - warmup) / max(1e-9, 1.0 - warmup))))


def set_group_lrs(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def method_dir(args: argparse.Namespace, method: str) -> str:
    return os.path.join(args.work_dir, method)


def past_deadline(args: argparse.Namespace) -> bool:
    return bool(args.deadline_minutes) and time.perf_counter() - args.start_time > 60 * args.deadline_minutes


# ------------------------------------------------------------------------------------------------------------
# Models: one encoder shape, two pre-training heads
# ------------------------------------------------------------------------------------------------------------


def cim_config(args: argparse.Namespace) -> CIMConfig:
    """The package's default CIM config (authors' recipe) with this benchmark's sizes only."""
    config = CIMConfig.from_preset(
        args.encoder, image_size=args.image_size, context_size=args.context_size,
        exemplar_size=args.exemplar_size, num_exemplars=args.num_exemplars,
        decoder_hidden_size=args.decoder_hidden_size, decoder_num_attention_heads=args.decoder_num_attention_heads)
    config.encoder_config.patch_size = args.patch_size
    config.encoder_config.num_hidden_layers = args.num_layers
    if args.cim_overrides:
        config.update_from_string(args.cim_overrides)
    return CIMConfig.from_dict(config.to_dict())  # re-validated with the new encoder sizes


def encoder_vit_config(args: argparse.Namespace) -> ViTConfig:
    """The stock ViTConfig every exported encoder uses (the CIM encoder config)."""
    enc = cim_config(args).encoder_config
    return ViTConfig(hidden_size=enc.hidden_size, num_hidden_layers=enc.num_hidden_layers,
                     num_attention_heads=enc.num_attention_heads, intermediate_size=enc.intermediate_size,
                     hidden_act=enc.hidden_act, layer_norm_eps=enc.layer_norm_eps, qkv_bias=enc.qkv_bias,
                     image_size=args.image_size, patch_size=args.patch_size, num_channels=3)


def mae_config(args: argparse.Namespace) -> ViTMAEConfig:
    enc = encoder_vit_config(args)
    return ViTMAEConfig(hidden_size=enc.hidden_size, num_hidden_layers=enc.num_hidden_layers,
                        num_attention_heads=enc.num_attention_heads, intermediate_size=enc.intermediate_size,
                        hidden_act=enc.hidden_act, layer_norm_eps=enc.layer_norm_eps, qkv_bias=enc.qkv_bias,
                        image_size=args.image_size, patch_size=args.patch_size, num_channels=3,
                        mask_ratio=args.mask_ratio, norm_pix_loss=True,
                        decoder_hidden_size=args.mae_decoder_hidden_size,
                        decoder_num_hidden_layers=args.mae_decoder_layers,
                        decoder_num_attention_heads=args.mae_decoder_heads,
                        decoder_intermediate_size=4 * args.mae_decoder_hidden_size)


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


# ------------------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------------------


def load_split(args: argparse.Namespace, split: str, limit: int | None) -> datasets.Dataset:
    """A split of the dataset; with `limit`, a fixed seeded subset of that many rows."""
    ds = load_image_dataset(dataset_name=args.dataset_name, split=split)
    if limit is not None and limit < len(ds):
        ds = ds.shuffle(seed=args.seed).select(range(limit))
    return ds


def num_classes_of(ds: datasets.Dataset) -> int:
    feature = ds.features.get("label")
    return int(feature.num_classes) if hasattr(feature, "num_classes") else int(max(ds["label"])) + 1


def make_loader(args: argparse.Namespace, ds: Any, batch_size: int, shuffle: bool, drop_last: bool,
                seed_offset: int = 0) -> DataLoader:
    workers = int(args.num_workers)
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last, num_workers=workers,
                      collate_fn=SkippingCollator(), pin_memory=args.device == "cuda",
                      persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None,
                      generator=torch.Generator().manual_seed(args.seed + seed_offset))


def pretraining_loader(args: argparse.Namespace, crop_min: float) -> DataLoader:
    """Unlabelled random-resized-crop + flip views of the train split (the CIM search view / MAE input)."""
    raw = load_split(args, "train", args.max_pretrain_images)
    view = RandomResizedCropFlip(size=args.image_size, scale=(crop_min, 1.0), mean=IMAGENET_DEFAULT_MEAN,
                                 std=IMAGENET_DEFAULT_STD)
    ds = prepare_dataset(raw, "image", build_pretraining_transform("image", view, MIN_IMAGE_SIDE))
    return make_loader(args, ds, args.batch_size, shuffle=True, drop_last=True, seed_offset=1)


def eval_dataset(args: argparse.Namespace, split: str, limit: int | None) -> tuple[Any, int]:
    """Labelled split with the evaluation transform (resize to size / 0.875, centre crop), and its class count."""
    raw = load_split(args, split, limit)
    transform = ResizeCenterCrop(size=args.image_size, crop_pct=0.875, mean=IMAGENET_DEFAULT_MEAN,
                                 std=IMAGENET_DEFAULT_STD)
    fn = build_classification_transform("image", "label", transform, MIN_IMAGE_SIDE)
    return prepare_dataset(raw, "image", fn), num_classes_of(raw)


def finetune_loader(args: argparse.Namespace) -> DataLoader:
    """Labelled train views for fine-tuning: random-resized crop (0.08, 1) + flip (erasing / mixing: per batch)."""
    raw = load_split(args, "train", args.max_train_images)
    view = RandomResizedCropFlip(size=args.image_size, scale=(args.finetune_crop_min, 1.0),
                                 mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD)
    ds = prepare_dataset(raw, "image", build_classification_transform("image", "label", view, MIN_IMAGE_SIDE))
    return make_loader(args, ds, args.finetune_batch_size, shuffle=True, drop_last=True, seed_offset=2)


def endless(loader: DataLoader) -> Iterator[dict]:
    while True:
        yield from loader


# ------------------------------------------------------------------------------------------------------------
# Pre-training for a wall-clock budget (one loop for both methods)
# ------------------------------------------------------------------------------------------------------------


def pretraining_optimizer(model: nn.Module, lr: float) -> torch.optim.AdamW:
    """AdamW (0.9, 0.95), weight decay 0.05 except on norms, biases, CLS / mask tokens, position tables."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if is_no_weight_decay(name, param) else decay).append(param)
    groups = [{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))


def pretrain_for_budget(args: argparse.Namespace, model: nn.Module, crop_min: float,
                        loss_fn: Callable[[nn.Module, torch.Tensor], torch.Tensor],
                        after_step: Callable[[float], None] | None = None) -> dict:
    """Train until `--pretrain_minutes` of wall clock (data loading included) have passed.

    The lr multiplier and `after_step(progress)` see progress = elapsed / budget, so the warm-up + cosine schedule
    (and CIM's EMA momentum) complete whatever the speed. The device is synchronised every 10 steps (loss read).
    """
    device, budget = torch.device(args.device), 60.0 * args.pretrain_minutes
    model.to(device).train()
    peak_lr = args.pretrain_blr * args.batch_size / 256
    optimizer = pretraining_optimizer(model, peak_lr)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    loader = pretraining_loader(args, crop_min)
    losses, steps, images, data_wait = [], 0, 0, 0.0
    start = time.perf_counter()
    batches = endless(loader)
    while (progress := (time.perf_counter() - start) / budget) < 1.0:
        wait = time.perf_counter()
        pixel_values = next(batches)["pixel_values"].to(device, non_blocking=True)
        data_wait += time.perf_counter() - wait
        if pixel_values.shape[0] == 0:
            continue
        set_group_lrs(optimizer, peak_lr * warmup_cosine(progress, args.warmup_fraction))
        with autocast(args):
            loss = loss_fn(model, pixel_values)
        loss.backward()
        if args.clip_grad:
            torch.nn.utils.clip_grad_norm_(params, args.clip_grad)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if after_step is not None:
            after_step(progress)
        steps, images = steps + 1, images + pixel_values.shape[0]
        if steps % 10 == 1:
            losses.append((steps, round(float(loss.detach()), 5)))  # also a device sync
        last_loss = loss.detach()
    synchronize(device)
    if steps and losses[-1][0] != steps:
        losses.append((steps, round(float(last_loss), 5)))
    wall = time.perf_counter() - start
    n_images = len(loader.dataset)
    return {"steps": steps, "images_seen": images, "epochs": images / n_images, "wall_s": wall,
            "data_wait_s": data_wait, "images_per_s": images / wall, "peak_lr": peak_lr,
            "first_loss": losses[0][1] if losses else None, "final_loss": losses[-1][1] if losses else None,
            "loss_curve": losses, "pretrain_images": n_images}


def cim_step_functions(args: argparse.Namespace, model: CIMForPreTraining,
                       ) -> tuple[Callable[[nn.Module, torch.Tensor], torch.Tensor], Callable[[float], None]]:
    """(loss_fn, after_step) of CIM: seeded exemplar sampling on the device; cosine EMA momentum update."""
    generator = torch.Generator(device=torch.device(args.device)).manual_seed(args.seed)
    start, end = model.config.momentum_start, model.config.momentum_end

    def loss_fn(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return m(pixel_values=x, generator=generator).loss

    def after_step(progress: float) -> None:
        if model.uses_target_encoder:
            model.momentum_update(cosine_momentum(progress, 1.0, start, end))

    return loss_fn, after_step


def pretrain_stage(args: argparse.Namespace, method: str) -> dict:
    """Pre-train (or reuse), export the encoder as a stock ViTModel; returns the stage record."""
    keys = {"cim": CIM_KEYS, "mae": MAE_KEYS, "random": ENCODER_KEYS}[method]
    record_path = os.path.join(method_dir(args, method), "pretrain.json")
    settings = subset_settings(args, keys)
    done = reusable(record_path, settings)
    if done is not None and os.path.isfile(os.path.join(method_dir(args, method), "encoder", "config.json")):
        log(f"{method}: pre-training reused ({done.get('steps', 0)} steps)")
        return done
    shutil.rmtree(method_dir(args, method), ignore_errors=True)  # everything downstream is stale too
    log(f"{method}: pre-training for {args.pretrain_minutes:g} min" if method != "random" else "random: export")
    record = {"cim": pretrain_cim, "mae": pretrain_mae, "random": pretrain_random}[method](args)
    record.update(settings=settings, finished_at=datetime.datetime.now().isoformat(timespec="seconds"))
    write_json(record_path, record)
    return record


def pretrain_cim(args: argparse.Namespace) -> dict:
    model = new_cim_model(args)
    loss_fn, after_step = cim_step_functions(args, model)
    record = pretrain_for_budget(args, model, args.cim_crop_min, loss_fn, after_step)
    checkpoint = os.path.join(method_dir(args, "cim"), "pretrain")
    model.cpu().save_pretrained(checkpoint)
    export_encoder(checkpoint, os.path.join(method_dir(args, "cim"), "encoder"))
    record["config"] = {k: getattr(model.config, k, None) for k in (
        "exemplar_box_mode", "encoder_init", "exemplar_scale", "exemplar_max_rotation", "loss_type",
        "target_encoder_mode", "momentum_start", "context_resample", "decoder_shared_norm")}
    return record


def pretrain_mae(args: argparse.Namespace) -> dict:
    model = new_mae_model(args)
    record = pretrain_for_budget(args, model, args.mae_crop_min, lambda m, x: m(pixel_values=x).loss)
    model.cpu()
    save_mae_encoder(args, model, os.path.join(method_dir(args, "mae"), "encoder"))
    return record


def pretrain_random(args: argparse.Namespace) -> dict:
    """The CIM online encoder at step 0: same init, same frozen sin-cos table; exported like CIM's."""
    checkpoint = os.path.join(method_dir(args, "random"), "init")
    new_cim_model(args).save_pretrained(checkpoint)
    export_encoder(checkpoint, os.path.join(method_dir(args, "random"), "encoder"))
    return {"steps": 0, "images_seen": 0, "epochs": 0.0, "wall_s": 0.0}


@torch.no_grad()
def save_mae_encoder(args: argparse.Namespace, mae: ViTMAEForPreTraining, out_dir: str) -> None:
    """MAE's `vit.*` weights as a stock ViTModel, checked against ViTMAEModel without masking."""
    encoder = ViTModel(encoder_vit_config(args), add_pooling_layer=False)
    state = {k[len("vit."):]: v for k, v in mae.state_dict().items() if k.startswith("vit.")}
    missing, unexpected = encoder.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"MAE -> ViTModel mapping failed: missing {missing}, unexpected {unexpected}")
    encoder.embeddings.position_embeddings.copy_(mae.vit.embeddings.position_embeddings)  # the fixed sin-cos table
    mae.eval()
    mae.vit.config.mask_ratio = 0.0
    check = torch.randn(2, 3, args.image_size, args.image_size)
    keep_order = torch.arange(mae.vit.embeddings.patch_embeddings.num_patches).float().expand(2, -1)
    err = (mae.vit(check, noise=keep_order).last_hidden_state - encoder.eval()(check).last_hidden_state).abs().max()
    if err > 1e-4:
        raise RuntimeError(f"MAE encoder and the mapped ViTModel disagree (max abs diff {err:.2e})")
    encoder.config.architectures = ["ViTModel"]
    encoder.save_pretrained(out_dir)


# ------------------------------------------------------------------------------------------------------------
# Frozen features: linear probe and k-NN on the CLS token and on the mean patch token
# ------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def cls_and_mean_tokens(encoder: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """[CLS token, mean of the patch tokens], both after the encoder's final LayerNorm: (N, 2D)."""
    hidden = encoder(pixel_values=pixel_values).last_hidden_state
    return torch.cat([hidden[:, 0], hidden[:, 1:].mean(1)], dim=-1)


def split_features(args: argparse.Namespace, encoder: ViTModel, ds: Any) -> dict[str, torch.Tensor]:
    device = torch.device(args.device)
    with autocast(args):
        feats, labels = extract_features(encoder, ds, batch_size=256, device=device, normalize=False,
                                         num_workers=args.num_workers, feature_fn=cls_and_mean_tokens)
    width = feats.shape[1] // 2
    return {"cls": feats[:, :width].float().cpu(), "mean": feats[:, width:].float().cpu(), "labels": labels.cpu()}


def linear_probe(args: argparse.Namespace, train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor,
                 val_y: torch.Tensor, num_classes: int) -> dict:
    """MAE's probe head (BatchNorm1d without affine + Linear) on cached features: AdamW, cosine, batch 256."""
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    x, y = train_x.to(device), train_y.to(device)
    head = LinearProbeHead(x.shape[1], num_classes).to(device)
    optimizer = torch.optim.AdamW(head.parameters(), lr=args.probe_lr, weight_decay=0.0)
    batch, total = 256, max(1, args.probe_epochs * math.ceil(len(x) / 256))
    head.train()
    step = 0
    for _ in range(args.probe_epochs):
        for idx in torch.randperm(len(x), generator=gen).split(batch):
            if len(idx) < 2:
                continue
            set_group_lrs(optimizer, args.probe_lr * warmup_cosine(step / total, 0.0))
            loss = F.cross_entropy(head(x[idx.to(device)]), y[idx.to(device)])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
    head.eval()
    with torch.no_grad():
        predictions = head(val_x.to(device)).argmax(1)
    return accuracy_record(predictions, val_y)


def knn(args: argparse.Namespace, train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor,
        val_y: torch.Tensor, num_classes: int) -> dict:
    """Weighted k-NN (cosine similarity, weights exp(sim / T)), `transformers_cim.training.knn.knn_predict`."""
    device = torch.device(args.device)
    scores = knn_predict(train_x.to(device), train_y.to(device), val_x.to(device), k=args.knn_k,
                         temperature=args.knn_temperature, num_classes=num_classes)
    return accuracy_record(scores.argmax(1), val_y)


def frozen_stage(args: argparse.Namespace, method: str, pretrain: dict) -> dict:
    """Features of the train / validation splits, then probe + k-NN for CLS and mean features (or reuse)."""
    path = os.path.join(method_dir(args, method), "frozen.json")
    settings = {**subset_settings(args, FROZEN_KEYS), "encoder_id": pretrain["finished_at"]}
    if (done := reusable(path, settings)) is not None:
        log(f"{method}: frozen-feature evaluation reused")
        return done
    start = time.perf_counter()
    encoder = ViTModel.from_pretrained(os.path.join(method_dir(args, method), "encoder"), add_pooling_layer=False)
    encoder.to(torch.device(args.device)).eval()
    train_ds, num_classes = eval_dataset(args, "train", args.max_train_images)
    val_ds, _ = eval_dataset(args, "validation", args.max_eval_images)
    train, val = split_features(args, encoder, train_ds), split_features(args, encoder, val_ds)
    feature_s = time.perf_counter() - start
    record: dict[str, Any] = {"settings": settings, "n_train": len(train["labels"]), "n_val": len(val["labels"]),
                              "feature_s": feature_s}
    for kind in ("cls", "mean"):
        args_xy = (train[kind], train["labels"], val[kind], val["labels"], num_classes)
        record[f"probe_{kind}"] = linear_probe(args, *args_xy)
        record[f"knn_{kind}"] = knn(args, *args_xy)
    record["wall_s"] = time.perf_counter() - start
    write_json(path, record)
    log(f"{method}: probe CLS {pct(record['probe_cls'])} / mean {pct(record['probe_mean'])}, "
        f"k-NN CLS {pct(record['knn_cls'])} / mean {pct(record['knn_mean'])} ({record['wall_s']:.0f} s)")
    return record


# ------------------------------------------------------------------------------------------------------------
# Fine-tuning: the authors' recipe on a BEiT model that is exactly the plain ViT
# ------------------------------------------------------------------------------------------------------------


def beit_config(vit: ViTConfig, num_labels: int, drop_path: float) -> BeitConfig:
    """A `BeitConfig` equal to `vit` as a plain ViT (no relative position bias, no layer scale, absolute position
    embeddings), with mean pooling + LayerNorm (the authors' fc_norm) and drop-path."""
    return BeitConfig(hidden_size=vit.hidden_size, num_hidden_layers=vit.num_hidden_layers,
                      num_attention_heads=vit.num_attention_heads, intermediate_size=vit.intermediate_size,
                      hidden_act=vit.hidden_act, layer_norm_eps=vit.layer_norm_eps, image_size=vit.image_size,
                      patch_size=vit.patch_size, num_channels=3, hidden_dropout_prob=0.0,
                      attention_probs_dropout_prob=0.0, use_mask_token=False, use_absolute_position_embeddings=True,
                      use_relative_position_bias=False, use_shared_relative_position_bias=False,
                      layer_scale_init_value=0.0, drop_path_rate=drop_path, use_mean_pooling=True,
                      num_labels=num_labels)


@torch.no_grad()
def beit_from_vit(encoder_dir: str, num_labels: int, drop_path: float) -> BeitForImageClassification:
    """The exported ViT encoder as a `BeitForImageClassification` (fresh fc_norm; head init std 2e-5).

    Dropped: the ViT's final LayerNorm (replaced by the fc_norm after pooling, as in the authors' global-pool
    mode) and the key bias (adds a per-query constant to every logit of a softmax row: no effect). Checked: the
    BEiT encoder's patch tokens equal the ViT's before its final LayerNorm.
    """
    vit = ViTModel.from_pretrained(encoder_dir, add_pooling_layer=False).eval()
    model = BeitForImageClassification(beit_config(vit.config, num_labels, drop_path))
    state = {k: v for k, v in vit.state_dict().items()
             if not k.endswith("k_proj.bias") and not k.startswith("layernorm.")}
    missing, unexpected = model.beit.load_state_dict(state, strict=False)
    if unexpected or set(missing) != {"pooler.layernorm.weight", "pooler.layernorm.bias"}:
        raise RuntimeError(f"ViT -> BEiT mapping failed: missing {missing}, unexpected {unexpected}")
    nn.init.trunc_normal_(model.classifier.weight, std=2e-5)
    nn.init.zeros_(model.classifier.bias)
    model.eval()
    x = torch.randn(2, 3, vit.config.image_size, vit.config.image_size)
    err = (model.beit(x).last_hidden_state - vit(x, output_hidden_states=True).hidden_states[-1]).abs().max()
    if err > 1e-4:
        raise RuntimeError(f"the BEiT copy of the ViT encoder disagrees with it (max abs diff {err:.2e})")
    return model


def random_erasing_(pixel_values: torch.Tensor, probability: float, generator: torch.Generator,
                    area: tuple[float, float] = (0.02, 1 / 3), aspect: tuple[float, float] = (0.3, 3.3)) -> None:
    """Per image, with `probability`: replace one random rectangle (area fraction and log-uniform aspect in the
    given ranges, up to 10 tries to fit) by standard-normal noise (the normalised-pixel 'pixel' mode), in place."""
    batch, channels, height, width = pixel_values.shape
    log_aspect = (math.log(aspect[0]), math.log(aspect[1]))
    for i in range(batch):
        if float(torch.rand((), generator=generator)) >= probability:
            continue
        for _ in range(10):
            target = height * width * float(torch.empty(()).uniform_(*area, generator=generator))
            ratio = math.exp(float(torch.empty(()).uniform_(*log_aspect, generator=generator)))
            h, w = int(round(math.sqrt(target * ratio))), int(round(math.sqrt(target / ratio)))
            if 0 < h < height and 0 < w < width:
                top = int(torch.randint(0, height - h + 1, (), generator=generator))
                left = int(torch.randint(0, width - w + 1, (), generator=generator))
                noise = torch.randn((channels, h, w), generator=generator)
                pixel_values[i, :, top:top + h, left:left + w] = noise.to(pixel_values)
                break


def finetune_step(args: argparse.Namespace, model: nn.Module, optimizer: torch.optim.Optimizer, batch: dict,
                  num_classes: int, generator: torch.Generator) -> float:
    """One step: random erasing, mixup / cutmix with label smoothing, soft-target cross-entropy."""
    device = torch.device(args.device)
    pixel_values, labels = batch["pixel_values"], batch["labels"]
    random_erasing_(pixel_values, args.random_erasing, generator)
    pixel_values, targets = mixup_cutmix(pixel_values.to(device, non_blocking=True), labels.to(device), num_classes,
                                         args.mixup, args.cutmix, args.label_smoothing, generator=generator)
    with autocast(args):
        logits = model(pixel_values=pixel_values).logits
    loss = soft_target_cross_entropy(logits, targets)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


@torch.no_grad()
def classify(args: argparse.Namespace, model: nn.Module, ds: Any) -> dict:
    """Top-1 of `model` on a labelled dataset (the evaluation transform)."""
    device = torch.device(args.device)
    model.eval()
    predictions, labels = [], []
    for batch in make_loader(args, ds, 256, shuffle=False, drop_last=False):
        with autocast(args):
            predictions.append(model(pixel_values=batch["pixel_values"].to(device)).logits.argmax(1).cpu())
        labels.append(batch["labels"])
    return accuracy_record(torch.cat(predictions), torch.cat(labels))


def finetune_stage(args: argparse.Namespace, method: str, pretrain: dict) -> dict | None:
    """End-to-end fine-tuning with the authors' recipe, then top-1 on the validation split (or reuse)."""
    if not args.finetune_epochs:
        return None
    path = os.path.join(method_dir(args, method), "finetune.json")
    settings = {**subset_settings(args, FINETUNE_KEYS), "encoder_id": pretrain["finished_at"]}
    if (done := reusable(path, settings)) is not None:
        log(f"{method}: fine-tune reused")
        return done
    if past_deadline(args):
        log(f"{method}: fine-tune skipped (--deadline_minutes {args.deadline_minutes:g} passed)")
        return {"skipped": "deadline"}
    start, device = time.perf_counter(), torch.device(args.device)
    val_ds, num_classes = eval_dataset(args, "validation", args.max_eval_images)
    model = beit_from_vit(os.path.join(method_dir(args, method), "encoder"), num_classes, args.finetune_drop_path)
    model.to(device)
    loader = finetune_loader(args)
    lr = args.finetune_blr * args.finetune_batch_size / 256
    groups = param_groups_layer_decay(model, args.finetune_weight_decay, args.finetune_layer_decay, lr)
    optimizer = torch.optim.AdamW(groups, lr=lr)
    total = max(1, int(round(args.finetune_epochs * len(loader))))
    generator = torch.Generator().manual_seed(args.seed + 3)
    losses, batches = [], endless(loader)
    model.train()
    for step in range(total):
        set_group_lrs(optimizer, lr * warmup_cosine(step / total, args.finetune_warmup_fraction))
        loss = finetune_step(args, model, optimizer, next(batches), num_classes, generator)
        if step % 20 == 0 or step == total - 1:
            losses.append((step + 1, round(loss, 4)))
    train_s = time.perf_counter() - start
    record = {"settings": settings, "steps": total, "lr": lr, "train_s": train_s, "loss_curve": losses,
              "top1": classify(args, model, val_ds), "drop_path": "applied (BEiT drop_path_rate)"}
    record["wall_s"] = time.perf_counter() - start
    write_json(path, record)
    log(f"{method}: fine-tune top-1 {pct(record['top1'])} ({total} steps, {record['wall_s']:.0f} s)")
    return record


# ------------------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------------------


def pct(acc: dict | None) -> str:
    """'71.3 (69.9-72.7)': top-1 % and its 95% Wilson interval; 'n/a' / 'skipped' when absent."""
    if not acc:
        return "n/a"
    if "skipped" in acc:
        return f"skipped ({acc['skipped']})"
    acc = acc.get("top1", acc) if isinstance(acc.get("top1"), dict) else acc
    low, high = acc["ci95"]
    return f"{100 * acc['top1']:.1f} ({100 * low:.1f}-{100 * high:.1f})"


def accuracy_table(args: argparse.Namespace, results: dict) -> list[str]:
    lines = ["| method | CLS linear probe | mean-token linear probe | CLS k-NN | mean-token k-NN | fine-tune top-1 |",
             "|---|---|---|---|---|---|"]
    for method in args.methods:
        res = results.get(method, {})
        frozen, ft = res.get("frozen") or {}, res.get("finetune")
        ft_cell = "not run (--finetune_epochs 0)" if not args.finetune_epochs else pct(ft)
        lines.append(f"| {METHOD_NAMES[method]} | {pct(frozen.get('probe_cls'))} | {pct(frozen.get('probe_mean'))} | "
                     f"{pct(frozen.get('knn_cls'))} | {pct(frozen.get('knn_mean'))} | {ft_cell} |")
    return lines


def pretrain_table(args: argparse.Namespace, results: dict) -> list[str]:
    lines = ["| method | steps | images seen (epochs) | images/s | data wait | wall | loss first -> last |",
             "|---|---|---|---|---|---|---|"]
    for method in args.methods:
        pre = results.get(method, {}).get("pretrain") or {}
        if not pre.get("steps"):
            lines.append(f"| {METHOD_NAMES[method]} | 0 | - | - | - | - | - |")
            continue
        lines.append(f"| {METHOD_NAMES[method]} | {pre['steps']} | {pre['images_seen']} ({pre['epochs']:.2f}) | "
                     f"{pre['images_per_s']:.1f} | {pre['data_wait_s']:.0f} s | {pre['wall_s'] / 60:.2f} min | "
                     f"{pre['first_loss']} -> {pre['final_loss']} |")
    return lines


def settings_lines(args: argparse.Namespace, results: dict) -> list[str]:
    enc = encoder_vit_config(args)
    frozen = next((r["frozen"] for r in results.values() if r.get("frozen")), {})
    n_train, n_val = frozen.get("n_train", args.max_train_images), frozen.get("n_val", args.max_eval_images)
    cim_cfg = next((r["pretrain"].get("config") for r in results.values() if r.get("pretrain", {}).get("config")), {})
    return [
        f"- data: `{args.dataset_name}`; pre-training on {args.max_pretrain_images or 'all'} train images without "
        f"labels; probe / k-NN / fine-tune on {n_train} labelled train images; every accuracy on {n_val} validation "
        "images. Accuracy: top-1 % (95% Wilson interval over the validation images; 10 classes, chance 10%).",
        f"- encoder (all methods): ViT hidden {enc.hidden_size}, {enc.num_hidden_layers} layers, "
        f"{enc.num_attention_heads} heads, MLP {enc.intermediate_size}, patch {enc.patch_size}, {args.image_size} px "
        f"({(args.image_size // enc.patch_size) ** 2} patches), fixed 2-D sin-cos position table.",
        f"- pre-training: {args.pretrain_minutes:g} min wall clock per method (data loading included), batch "
        f"{args.batch_size}, AdamW (0.9, 0.95) wd 0.05, peak lr {args.pretrain_blr * args.batch_size / 256:g} "
        f"(blr {args.pretrain_blr:g} x batch/256), warm-up {args.warmup_fraction:g} of the budget then cosine, "
        f"clip {args.clip_grad:g}; {args.device}{' bf16 autocast' if args.bf16 else ' fp32'}.",
        f"- CIM: package defaults except sizes: context {args.context_size} px ({args.context_size // args.patch_size}"
        f"^2 tokens), {args.num_exemplars} exemplars of {args.exemplar_size} px ({args.exemplar_size // args.patch_size}"
        f"^2 tokens), decoder {args.decoder_hidden_size} / {args.decoder_num_attention_heads} heads, view crop "
        f"({args.cim_crop_min:g}, 1); {json.dumps(cim_cfg)}.",
        f"- MAE: `transformers.ViTMAEForPreTraining`, mask {args.mask_ratio:g}, normalised-pixel loss, decoder "
        f"{args.mae_decoder_hidden_size} / {args.mae_decoder_layers} layers / {args.mae_decoder_heads} heads, view crop "
        f"({args.mae_crop_min:g}, 1), MAE authors' init (xavier).",
        f"- linear probe: BatchNorm1d(affine=False) + Linear on cached frozen features, AdamW lr {args.probe_lr:g}, "
        f"cosine, {args.probe_epochs} epochs, batch 256. k-NN: k={args.knn_k}, cosine, T={args.knn_temperature:g}. "
        "CLS = CLS token, mean = mean of the patch tokens, both after the final LayerNorm.",
        f"- fine-tune: BEiT-as-plain-ViT, mean-pool + LayerNorm, {args.finetune_epochs:g} epochs, batch "
        f"{args.finetune_batch_size}, lr {args.finetune_blr:g} x batch/256, layer decay {args.finetune_layer_decay:g}, "
        f"wd {args.finetune_weight_decay:g}, drop-path {args.finetune_drop_path:g}, crop ({args.finetune_crop_min:g}, "
        f"1) + flip, random erasing {args.random_erasing:g}, mixup {args.mixup:g} / cutmix {args.cutmix:g}, label "
        f"smoothing {args.label_smoothing:g}, warm-up {args.finetune_warmup_fraction:g}, cosine; no RandAugment.",
        f"- one seed ({args.seed}): the intervals cover the finite validation set only, not seed-to-seed variation.",
        f"- machine: {machine_line(args)}",
    ]


def machine_line(args: argparse.Namespace) -> str:
    try:
        from _common import machine_lines

        return " ".join(line.lstrip("- ") for line in machine_lines(torch.device(args.device), args.threads))
    except Exception:  # noqa: BLE001 - the helper is optional
        return f"{platform.processor() or platform.machine()}, {args.threads} threads, torch {torch.__version__}"


def write_report(args: argparse.Namespace, results: dict) -> str:
    """Markdown + JSON report of whatever stages are done so far; returns the markdown."""
    title = "# Pre-training quality: CIM vs MAE vs random init" + (" (SMOKE RUN: numbers mean nothing)"
                                                                   if args.smoke else "")
    text = "\n".join([
        title, "",
        f"Date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}; wall time of this "
        f"invocation so far: {(time.perf_counter() - args.start_time) / 60:.1f} min (finished stages are reused).", "",
        *accuracy_table(args, results), "", "Pre-training (equal wall clock per method):", "",
        *pretrain_table(args, results), "", "Settings:", *settings_lines(args, results), "",
    ])
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "quality.md"), "w") as f:
        f.write(text)
    settings = {k: v for k, v in vars(args).items() if k != "start_time"}
    write_json(os.path.join(args.output_dir, "quality.json"), {"settings": settings, "results": results})
    return text


# ------------------------------------------------------------------------------------------------------------
# Driver
# ------------------------------------------------------------------------------------------------------------


def setup(args: argparse.Namespace) -> None:
    args.start_time = time.perf_counter()
    args.threads = args.threads or (1 if args.device == "cpu" else min(8, os.cpu_count() or 1))
    torch.set_num_threads(args.threads)
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    os.makedirs(args.work_dir, exist_ok=True)
    log(f"work dir {args.work_dir}; output dir {args.output_dir}")
    log("settings: " + json.dumps({k: v for k, v in vars(args).items() if k != "start_time"}, sort_keys=True))


def run_stages(args: argparse.Namespace) -> dict:
    """Pre-train every method first (equal budgets back to back), then evaluate each; report after each stage."""
    results: dict[str, dict] = {m: {} for m in args.methods}
    for method in args.methods:
        results[method]["pretrain"] = pretrain_stage(args, method)
        write_report(args, results)
    for method in args.methods:
        results[method]["frozen"] = frozen_stage(args, method, results[method]["pretrain"])
        write_report(args, results)
    for method in args.methods:
        results[method]["finetune"] = finetune_stage(args, method, results[method]["pretrain"])
        write_report(args, results)
    return results


def main(argv: list[str] | None = None) -> str:
    args = parse_args(argv)
    setup(args)
    results = run_stages(args)
    text = write_report(args, results)
    print(text, flush=True)
    log(f"wrote {os.path.join(args.output_dir, 'quality.md')} and quality.json "
        f"({(time.perf_counter() - args.start_time) / 60:.1f} min)")
    return text


if __name__ == "__main__":
    main()
