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
import json
import os
import sys
import tempfile
import time
from typing import Any

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
for _path in (os.path.join(REPO, "src"), os.path.dirname(HERE)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import datasets  # noqa: E402
import transformers  # noqa: E402

from quality.common import METHODS, log  # noqa: E402
from quality.probe import frozen_stage  # noqa: E402
from quality.report import write_report  # noqa: E402
from quality.stages import finetune_stage, pretrain_stage  # noqa: E402

DEFAULT_DATA = "/work/shared/data/imagenette-160"

# Settings that differ between the CPU default, --gpu and --smoke. Explicit flags always win; --smoke then
# overrides the preset. "encoder" names a width preset of transformers_cim (hidden / heads / MLP).
CPU_PRESET: dict[str, Any] = {
    "device": "cpu",
    "bf16": False,
    "encoder": "vit-tiny-patch16",
    "num_layers": 6,
    "patch_size": 8,
    "image_size": 96,
    "context_size": 64,
    "exemplar_size": 32,
    # the small-budget CIM recipe (docs/does-cim-learn.md): a 128-wide decoder (1.65x the steps per second of 256 at
    # about the same learning per step) and the exemplar photometric augmentation ramped in over the middle half
    "decoder_hidden_size": 128,
    "decoder_num_attention_heads": 4,
    "exemplar_augmentation_ramp": [0.25, 0.75],
    # and, measured in the 90-minute run of docs/quality.md: one encoder for exemplars and context, a decoder that
    # starts at the constant prior, and CIM's own batch 16 at lr 5e-4 (4x the steps of batch 64 in the same time)
    "cim_overrides": "decoder_prior_bias=true,target_encoder_mode=shared",
    "cim_batch_size": 16,
    "cim_blr": 8e-3,
    "mae_decoder_hidden_size": 128,
    "mae_decoder_layers": 2,
    "mae_decoder_heads": 4,
    "batch_size": 64,
    "pretrain_minutes": 10.0,
    "finetune_epochs": 2.0,
    "finetune_batch_size": 64,
    "num_workers": 0,
    "deadline_minutes": 0.0,
    "work_dir": os.path.join(HERE, "work", "cpu"),
}
GPU_PRESET: dict[str, Any] = {
    "device": "cuda",
    "bf16": True,
    "encoder": "vit-small-patch16",
    "num_layers": 12,
    "patch_size": 16,
    "image_size": 160,
    "context_size": 112,
    "exemplar_size": 64,
    "decoder_hidden_size": 512,
    "decoder_num_attention_heads": 16,
    "cim_overrides": "",
    "mae_decoder_hidden_size": 256,
    "mae_decoder_layers": 4,
    "mae_decoder_heads": 8,
    "batch_size": 256,
    "pretrain_minutes": 3.0,
    "finetune_epochs": 0.0,
    "finetune_batch_size": 256,
    "num_workers": max(0, min(15, (os.cpu_count() or 1) - 1)),
    "deadline_minutes": 9.0,
    "work_dir": os.path.join(HERE, "work", "gpu"),
}
SMOKE_OVERRIDES: dict[str, Any] = {
    "num_layers": 2,
    "pretrain_minutes": 20 / 60,
    "max_pretrain_images": 300,
    "max_train_images": 300,
    "max_eval_images": 300,
    "probe_epochs": 50,
    "finetune_epochs": 1.0,
    "batch_size": 32,
    "finetune_batch_size": 32,
    "num_workers": 0,
    "deadline_minutes": 0.0,
}


def build_parser() -> argparse.ArgumentParser:
    """All flags; those left at None are filled from the CPU / GPU preset and --smoke (see `resolve_settings`)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_argument_group("mode")
    mode.add_argument("--gpu", action="store_true", help="the one-GPU preset (ViT-S/16, 160 px, bf16, ~8 min)")
    mode.add_argument(
        "--smoke", action="store_true", help="dry run: depth 2, 20 s of pre-training per method, 300 images per split"
    )
    mode.add_argument("--work_dir", default=None, help="per-stage results, checkpoints, features (resumable)")
    mode.add_argument("--output_dir", default=None, help="where quality.md / quality.json go (default: work_dir)")
    mode.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    mode.add_argument("--device", choices=("cpu", "cuda"), default=None)
    mode.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None, help="bf16 autocast")
    mode.add_argument("--threads", type=int, default=None, help="torch threads (default: 1 on CPU)")
    mode.add_argument("--num_workers", type=int, default=None, help="data-loader worker processes")
    mode.add_argument("--seed", type=int, default=0)
    mode.add_argument(
        "--deadline_minutes",
        type=float,
        default=None,
        help="skip stages that would start after this many minutes (0 = none); for a capped command",
    )
    data = p.add_argument_group("data")
    data.add_argument("--dataset_name", default=DEFAULT_DATA, help="Hub id or local Hub-layout dir (image, label)")
    data.add_argument("--max_pretrain_images", type=int, default=None, help="train images for pre-training (all)")
    data.add_argument(
        "--max_train_images", type=int, default=None, help="labelled train images for probe / k-NN / fine-tune (all)"
    )
    data.add_argument("--max_eval_images", type=int, default=None, help="validation images (all 3,925)")
    enc = p.add_argument_group("encoder (shared by every method)")
    enc.add_argument(
        "--encoder",
        default=None,
        choices=("vit-tiny-patch16", "vit-small-patch16", "vit-base-patch16"),
        help="width preset (hidden / heads / MLP); the patch size and depth are set separately",
    )
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
    cim.add_argument(
        "--exemplar_augmentation_ramp",
        type=float,
        nargs=2,
        default=None,
        metavar=("START", "END"),
        help="fractions of the budget between which the exemplar photometric augmentation ramps from off to the "
        "recipe's (default: the package's, 0 0 = full throughout)",
    )
    cim.add_argument(
        "--cim_overrides",
        default=None,
        help='CIMConfig fields, "key=value,key=value"; replaces the preset\'s (CPU: '
        '"decoder_prior_bias=true,target_encoder_mode=shared"; --cim_overrides "" for the authors\' recipe)',
    )
    cim.add_argument(
        "--cim_batch_size", type=int, default=None, help="CIM's own batch (CPU preset 16; else --batch_size)"
    )
    cim.add_argument(
        "--cim_blr", type=float, default=None, help="CIM's own base lr (CPU preset 8e-3; else --pretrain_blr)"
    )
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
    log(
        f"wrote {os.path.join(args.output_dir, 'quality.md')} and quality.json "
        f"({(time.perf_counter() - args.start_time) / 60:.1f} min)"
    )
    return text


if __name__ == "__main__":
    main()
