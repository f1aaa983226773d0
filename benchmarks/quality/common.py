"""What every stage of the quality benchmark shares: the methods, the settings each stored result depends on (a
result is reused only while they are unchanged), JSON and accuracy records with Wilson intervals, the lr schedule
and the time budget."""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import time

import torch

METHODS = ("cim", "mae", "random")

METHOD_NAMES = {"cim": "CIM", "mae": "MAE", "random": "random init"}

Z_95 = 1.959964  # two-sided 95% normal quantile

MIN_IMAGE_SIDE = 16

ENCODER_KEYS = ("dataset_name", "seed", "encoder", "num_layers", "patch_size", "image_size")

PRETRAIN_KEYS = ENCODER_KEYS + (
    "pretrain_minutes",
    "batch_size",
    "pretrain_blr",
    "warmup_fraction",
    "clip_grad",
    "max_pretrain_images",
    "bf16",
    "device",
)

CIM_KEYS = PRETRAIN_KEYS + (
    "context_size",
    "exemplar_size",
    "num_exemplars",
    "decoder_hidden_size",
    "decoder_num_attention_heads",
    "cim_crop_min",
    "cim_overrides",
    "exemplar_augmentation_ramp",
    "cim_batch_size",
    "cim_blr",
)

MAE_KEYS = PRETRAIN_KEYS + (
    "mask_ratio",
    "mae_decoder_hidden_size",
    "mae_decoder_layers",
    "mae_decoder_heads",
    "mae_crop_min",
)

FROZEN_KEYS = ("max_train_images", "max_eval_images", "probe_epochs", "probe_lr", "knn_k", "knn_temperature")

FINETUNE_KEYS = (
    "max_train_images",
    "max_eval_images",
    "finetune_epochs",
    "finetune_batch_size",
    "finetune_blr",
    "finetune_layer_decay",
    "finetune_weight_decay",
    "finetune_drop_path",
    "finetune_warmup_fraction",
    "finetune_crop_min",
    "random_erasing",
    "mixup",
    "cutmix",
    "label_smoothing",
)


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
