"""The quality benchmark's training stages: pre-training CIM and MAE for the same wall-clock budget in one loop
(lr and EMA schedules follow the elapsed fraction of the budget), and fine-tuning each encoder with the authors'
recipe as a BEiT model that is exactly the plain ViT."""

from __future__ import annotations

import argparse
import datetime
import math
import os
import shutil
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers import (
    BeitConfig,
    BeitForImageClassification,
    ViTConfig,
    ViTMAEForPreTraining,
    ViTModel,
)

from transformers_cim import CIMForPreTraining
from transformers_cim.export import export_encoder
from transformers_cim.pretext import augmentation_ramp, correlation_maps, sample_config_boxes
from transformers_cim.pretext_metrics import correlation_prior, prior_metrics
from transformers_cim.training.layer_decay import is_no_weight_decay, param_groups_layer_decay
from transformers_cim.training.mixup import mixup_cutmix, soft_target_cross_entropy
from transformers_cim.training.trainer import cosine_momentum, split_predictor_groups

from .common import (
    CIM_KEYS,
    ENCODER_KEYS,
    FINETUNE_KEYS,
    MAE_KEYS,
    accuracy_record,
    autocast,
    log,
    method_dir,
    past_deadline,
    reusable,
    set_group_lrs,
    subset_settings,
    synchronize,
    warmup_cosine,
    write_json,
)
from .models import (
    encoder_vit_config,
    endless,
    eval_dataset,
    finetune_loader,
    make_loader,
    new_cim_model,
    new_mae_model,
    pretraining_loader,
)
from .report import pct


def pretraining_optimizer(model: nn.Module, lr: float) -> torch.optim.AdamW:
    """AdamW (0.9, 0.95), weight decay 0.05 except on norms, biases, CLS / mask tokens, position tables; for CIM the
    decoder's predictor at `decoder_predictor_lr_scale` x the lr and wd / that scale, as `CIMTrainer` does."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if is_no_weight_decay(name, param) else decay).append(param)
    groups = [{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))
    if isinstance(model, CIMForPreTraining) and model.config.decoder_predictor_lr_scale != 1.0:
        split_predictor_groups(optimizer, model, model.config.decoder_predictor_lr_scale)
    return optimizer


def pretrain_for_budget(
    args: argparse.Namespace,
    model: nn.Module,
    crop_min: float,
    loss_fn: Callable[[nn.Module, torch.Tensor], torch.Tensor],
    after_step: Callable[[float], None] | None = None,
    batch_size: int | None = None,
    blr: float | None = None,
) -> dict:
    """Train until `--pretrain_minutes` of wall clock (data loading included) have passed.

    The lr multiplier and `after_step(progress)` see progress = elapsed / budget, so the warm-up + cosine schedule
    (and CIM's EMA momentum) complete whatever the speed. The device is synchronised every 10 steps (loss read).
    `batch_size` / `blr` default to the shared `--batch_size` / `--pretrain_blr`.
    """
    device, budget = torch.device(args.device), 60.0 * args.pretrain_minutes
    model.to(device).train()
    batch_size = batch_size or args.batch_size
    peak_lr = (blr or args.pretrain_blr) * batch_size / 256
    optimizer = pretraining_optimizer(model, peak_lr)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    loader = pretraining_loader(args, crop_min, batch_size)
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
    return {
        "steps": steps,
        "images_seen": images,
        "epochs": images / n_images,
        "wall_s": wall,
        "data_wait_s": data_wait,
        "images_per_s": images / wall,
        "batch_size": batch_size,
        "peak_lr": peak_lr,
        "first_loss": losses[0][1] if losses else None,
        "final_loss": losses[-1][1] if losses else None,
        "loss_curve": losses,
        "pretrain_images": n_images,
    }


def cim_step_functions(
    args: argparse.Namespace,
    model: CIMForPreTraining,
) -> tuple[Callable[[nn.Module, torch.Tensor], torch.Tensor], Callable[[float], None]]:
    """(loss_fn, after_step) of CIM: seeded exemplar sampling on the device; cosine EMA momentum update; the
    exemplar augmentation's ramp (`exemplar_augmentation_ramp`) over the time budget, for the next step."""
    generator = torch.Generator(device=torch.device(args.device)).manual_seed(args.seed)
    start, end = model.config.momentum_start, model.config.momentum_end
    ramp = model.config.exemplar_augmentation_ramp
    model.augmentation_strength.fill_(augmentation_ramp(0, 1, ramp))

    def loss_fn(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return m(pixel_values=x, generator=generator).loss

    def after_step(progress: float) -> None:
        if model.uses_target_encoder:
            model.momentum_update(cosine_momentum(progress, 1.0, start, end))
        model.augmentation_strength.fill_(augmentation_ramp(progress, 1.0, ramp))

    return loss_fn, after_step


def cim_prior_record(config, loss_curve: list, seed: int, samples: int = 512) -> dict:
    """The constant prior's loss under the run's box distribution, and the mean of the last tenth of the logged
    losses (taken every 10 steps) against it: under 1 means CIM located its exemplars better than the prior."""
    generator = torch.Generator().manual_seed(seed + 7)
    boxes = sample_config_boxes(config, samples, config.num_exemplars, generator=generator)
    labels = correlation_maps(boxes, config.context_size)
    prior_loss = float(prior_metrics(correlation_prior(config, generator=generator), labels, config)[0])
    tail = [loss for _, loss in loss_curve[-max(1, len(loss_curve) // 10) :]]
    last = sum(tail) / len(tail) if tail else float("nan")
    return {
        "prior_loss": round(prior_loss, 4),
        "last_tenth_loss": round(last, 4),
        "last_tenth_loss_to_prior": round(last / prior_loss, 3),
    }


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
    record = pretrain_for_budget(
        args, model, args.cim_crop_min, loss_fn, after_step, batch_size=args.cim_batch_size, blr=args.cim_blr
    )
    model.augmentation_strength.fill_(1.0)
    record.update(cim_prior_record(model.config, record["loss_curve"], args.seed))
    checkpoint = os.path.join(method_dir(args, "cim"), "pretrain")
    model.cpu().save_pretrained(checkpoint)
    export_encoder(checkpoint, os.path.join(method_dir(args, "cim"), "encoder"))
    record["config"] = {
        k: getattr(model.config, k, None)
        for k in (
            "exemplar_box_mode",
            "encoder_init",
            "exemplar_scale",
            "exemplar_max_rotation",
            "loss_type",
            "target_encoder_mode",
            "momentum_start",
            "context_resample",
            "exemplar_augmentation",
            "exemplar_augmentation_ramp",
            "decoder_shared_norm",
            "decoder_prior_bias",
            "decoder_predictor_lr_scale",
        )
    }
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
    state = {k[len("vit.") :]: v for k, v in mae.state_dict().items() if k.startswith("vit.")}
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


def beit_config(vit: ViTConfig, num_labels: int, drop_path: float) -> BeitConfig:
    """A `BeitConfig` equal to `vit` as a plain ViT (no relative position bias, no layer scale, absolute position
    embeddings), with mean pooling + LayerNorm (the authors' fc_norm) and drop-path."""
    return BeitConfig(
        hidden_size=vit.hidden_size,
        num_hidden_layers=vit.num_hidden_layers,
        num_attention_heads=vit.num_attention_heads,
        intermediate_size=vit.intermediate_size,
        hidden_act=vit.hidden_act,
        layer_norm_eps=vit.layer_norm_eps,
        image_size=vit.image_size,
        patch_size=vit.patch_size,
        num_channels=3,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        use_mask_token=False,
        use_absolute_position_embeddings=True,
        use_relative_position_bias=False,
        use_shared_relative_position_bias=False,
        layer_scale_init_value=0.0,
        drop_path_rate=drop_path,
        use_mean_pooling=True,
        num_labels=num_labels,
    )


@torch.no_grad()
def beit_from_vit(encoder_dir: str, num_labels: int, drop_path: float) -> BeitForImageClassification:
    """The exported ViT encoder as a `BeitForImageClassification` (fresh fc_norm; head init std 2e-5).

    Dropped: the ViT's final LayerNorm (replaced by the fc_norm after pooling, as in the authors' global-pool
    mode) and the key bias (adds a per-query constant to every logit of a softmax row: no effect). Checked: the
    BEiT encoder's patch tokens equal the ViT's before its final LayerNorm.
    """
    vit = ViTModel.from_pretrained(encoder_dir, add_pooling_layer=False).eval()
    model = BeitForImageClassification(beit_config(vit.config, num_labels, drop_path))
    state = {
        k: v for k, v in vit.state_dict().items() if not k.endswith("k_proj.bias") and not k.startswith("layernorm.")
    }
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


def random_erasing_(
    pixel_values: torch.Tensor,
    probability: float,
    generator: torch.Generator,
    area: tuple[float, float] = (0.02, 1 / 3),
    aspect: tuple[float, float] = (0.3, 3.3),
) -> None:
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
                pixel_values[i, :, top : top + h, left : left + w] = noise.to(pixel_values)
                break


def finetune_step(
    args: argparse.Namespace,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: dict,
    num_classes: int,
    generator: torch.Generator,
) -> float:
    """One step: random erasing, mixup / cutmix with label smoothing, soft-target cross-entropy."""
    device = torch.device(args.device)
    pixel_values, labels = batch["pixel_values"], batch["labels"]
    random_erasing_(pixel_values, args.random_erasing, generator)
    pixel_values, targets = mixup_cutmix(
        pixel_values.to(device, non_blocking=True),
        labels.to(device),
        num_classes,
        args.mixup,
        args.cutmix,
        args.label_smoothing,
        generator=generator,
    )
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
    record = {
        "settings": settings,
        "steps": total,
        "lr": lr,
        "train_s": train_s,
        "loss_curve": losses,
        "top1": classify(args, model, val_ds),
        "drop_path": "applied (BEiT drop_path_rate)",
    }
    record["wall_s"] = time.perf_counter() - start
    write_json(path, record)
    log(f"{method}: fine-tune top-1 {pct(record['top1'])} ({total} steps, {record['wall_s']:.0f} s)")
    return record
