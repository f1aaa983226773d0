"""The quality benchmark's report: the accuracy and pre-training tables, the settings and the machine, written as
``quality.md`` and ``quality.json`` after every stage."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time

import torch

from .common import METHOD_NAMES, write_json
from .models import encoder_vit_config


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
    lines = [
        "| method | CLS linear probe | mean-token linear probe | CLS k-NN | mean-token k-NN | fine-tune top-1 |",
        "|---|---|---|---|---|---|",
    ]
    for method in args.methods:
        res = results.get(method, {})
        frozen, ft = res.get("frozen") or {}, res.get("finetune")
        ft_cell = "not run (--finetune_epochs 0)" if not args.finetune_epochs else pct(ft)
        lines.append(
            f"| {METHOD_NAMES[method]} | {pct(frozen.get('probe_cls'))} | {pct(frozen.get('probe_mean'))} | "
            f"{pct(frozen.get('knn_cls'))} | {pct(frozen.get('knn_mean'))} | {ft_cell} |"
        )
    return lines


def pretrain_table(args: argparse.Namespace, results: dict) -> list[str]:
    lines = [
        "| method | steps | images seen (epochs) | images/s | data wait | wall | loss first -> last |",
        "|---|---|---|---|---|---|---|",
    ]
    for method in args.methods:
        pre = results.get(method, {}).get("pretrain") or {}
        if not pre.get("steps"):
            lines.append(f"| {METHOD_NAMES[method]} | 0 | - | - | - | - | - |")
            continue
        lines.append(
            f"| {METHOD_NAMES[method]} | {pre['steps']} | {pre['images_seen']} ({pre['epochs']:.2f}) | "
            f"{pre['images_per_s']:.1f} | {pre['data_wait_s']:.0f} s | {pre['wall_s'] / 60:.2f} min | "
            f"{pre['first_loss']} -> {pre['final_loss']}{prior_cell(pre)} |"
        )
    return lines


def prior_cell(pre: dict) -> str:
    """CIM's last-tenth mean loss against the constant prior's, where recorded."""
    if "prior_loss" not in pre:
        return ""
    return (
        f" (last tenth {pre['last_tenth_loss']} = {pre['last_tenth_loss_to_prior']} x the prior's {pre['prior_loss']})"
    )


def cim_batch_note(args: argparse.Namespace) -> str:
    """ ", batch B, peak lr L" when CIM has a batch or base lr of its own, else ""."""
    batch, blr = getattr(args, "cim_batch_size", None), getattr(args, "cim_blr", None)
    if not batch and not blr:
        return ""
    batch, blr = batch or args.batch_size, blr or args.pretrain_blr
    return f", its own batch {batch} and peak lr {blr * batch / 256:g} (blr {blr:g})"


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
        f"^2 tokens), {args.num_exemplars} exemplars of {args.exemplar_size} px "
        f"({args.exemplar_size // args.patch_size}"
        f"^2 tokens), decoder {args.decoder_hidden_size} / {args.decoder_num_attention_heads} heads, view crop "
        f"({args.cim_crop_min:g}, 1){cim_batch_note(args)}; {json.dumps(cim_cfg)}.",
        f"- MAE: `transformers.ViTMAEForPreTraining`, mask {args.mask_ratio:g}, normalised-pixel loss, decoder "
        f"{args.mae_decoder_hidden_size} / {args.mae_decoder_layers} layers / {args.mae_decoder_heads} heads, view "
        "crop "
        f"({args.mae_crop_min:g}, 1), MAE authors' init (xavier).",
        f"- linear probe: BatchNorm1d(affine=False) + Linear on cached frozen features, AdamW lr {args.probe_lr:g}, "
        f"cosine, {args.probe_epochs} epochs, batch 256. k-NN: k={args.knn_k}, cosine, T={args.knn_temperature:g}. "
        "CLS = CLS token, mean = mean of the patch tokens, both after the final LayerNorm.",
        f"- fine-tune: BEiT-as-plain-ViT, mean-pool + LayerNorm, {args.finetune_epochs:g} epochs, batch "
        f"{args.finetune_batch_size}, lr {args.finetune_blr:g} x batch/256, layer decay "
        f"{args.finetune_layer_decay:g}, "
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
    title = "# Pre-training quality: CIM vs MAE vs random init" + (
        " (SMOKE RUN: numbers mean nothing)" if args.smoke else ""
    )
    text = "\n".join(
        [
            title,
            "",
            f"Date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}; wall time of this "
            f"invocation so far: {(time.perf_counter() - args.start_time) / 60:.1f} min (finished stages are reused).",
            "",
            *accuracy_table(args, results),
            "",
            "Pre-training (equal wall clock per method):",
            "",
            *pretrain_table(args, results),
            "",
            "Settings:",
            *settings_lines(args, results),
            "",
        ]
    )
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "quality.md"), "w") as f:
        f.write(text)
    settings = {k: v for k, v in vars(args).items() if k != "start_time"}
    write_json(os.path.join(args.output_dir, "quality.json"), {"settings": settings, "results": results})
    return text
