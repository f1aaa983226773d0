#!/usr/bin/env python
"""Quality benchmark: CIM vs MAE vs random init, same ViT encoder, same pre-training wall-clock budget.

Stages (each writes its result under --work_dir and is skipped when that result already exists):

1. pre-train the encoder with CIM (`run_pretraining.main`) and with `transformers.ViTMAEForPreTraining`
   (same encoder: hidden / layers / heads / patch / image size), each for --pretrain_minutes of wall clock
   on the train split. The number of optimizer steps is set from a short measured calibration so that the
   cosine learning-rate and EMA-momentum schedules complete; a callback also stops training at the budget.
2. export each encoder (CIM online encoder, MAE encoder mapped onto `ViTModel`, a random-init `ViTModel`)
   as a stock `ViTModel` checkpoint, then for each: frozen CLS features on a fixed train / validation subset ->
   (a) linear probe (BatchNorm1d(affine=False) + Linear, trained on the cached features),
   (b) weighted k-NN (k=20, cosine, T=0.07, `transformers_cim.knn.knn_accuracy`),
   (c) a short end-to-end fine-tune with `run_image_classification.main`.
3. print one markdown table (method x protocol -> top-1 %) with the settings, the machine and the date,
   and write it to --output.

Small CPU run (what benchmarks/quality/README.md reports):

    python benchmarks/quality/run_quality.py --threads 1 --pretrain_minutes 7 --batch_size 64 \
        --max_train_images 2000 --max_eval_images 1000 --finetune_epochs 1

A GPU run at the paper's ViT-S/16 token budget:

    python benchmarks/quality/run_quality.py --preset vit-small-patch16 --patch_size 16 --num_layers 12 \
        --image_size 224 --context_size 160 --exemplar_size 64 --decoder_hidden_size 512 \
        --decoder_num_attention_heads 16 --device cuda --bf16 --batch_size 256 --pretrain_minutes 60 ...
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
import time

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
for path in (REPO, os.path.dirname(HERE)):
    if path not in sys.path:
        sys.path.insert(0, path)

import transformers  # noqa: E402
from transformers import (  # noqa: E402
    Trainer,
    TrainerCallback,
    TrainingArguments,
    ViTConfig,
    ViTMAEConfig,
    ViTMAEForPreTraining,
    ViTModel,
)

from transformers_cim import CIMConfig, CIMForPreTraining  # noqa: E402
from transformers_cim.data import (  # noqa: E402
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
from transformers_cim.finetune import LinearProbeHead  # noqa: E402
from transformers_cim.knn import extract_features, knn_accuracy  # noqa: E402
from transformers_cim.modeling_cim import sincos_position_embedding_2d  # noqa: E402

DEFAULT_DATA = "/work/shared/data/imagenette-160"
METHODS_ORDER = ("cim", "mae", "random")


# ------------------------------------------------------------------------------------------------------------
# Arguments
# ------------------------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset_name", default=DEFAULT_DATA, help="Hub id or local Hub-layout dir (image + label).")
    p.add_argument("--work_dir", default="benchmarks/quality/work",
                   help="checkpoints, features and per-stage results (resumable: finished stages are skipped)")
    p.add_argument("--output", default=os.path.join("benchmarks", "quality", "results", "quality_cpu.md"))
    p.add_argument("--methods", nargs="+", default=list(METHODS_ORDER), choices=METHODS_ORDER)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--bf16", action="store_true", help="bf16 mixed precision (pre-training, fine-tuning, features)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores of this process)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num_workers", type=int, default=0, help="data-loader workers")
    # encoder (shared by every method)
    p.add_argument("--preset", default="vit-tiny-patch16",
                   help="CIM encoder preset (vit-tiny-patch16 = hidden 192, 3 heads; vit-small-patch16 = 384, 6)")
    p.add_argument("--patch_size", type=int, default=16)
    p.add_argument("--num_layers", type=int, default=4, help="encoder depth (None/0 = the preset's)")
    p.add_argument("--image_size", type=int, default=112, help="search view (CIM), MAE input and evaluation size")
    # CIM
    p.add_argument("--context_size", type=int, default=80)
    p.add_argument("--exemplar_size", type=int, default=32)
    p.add_argument("--num_exemplars", type=int, default=6)
    p.add_argument("--decoder_hidden_size", type=int, default=256)
    p.add_argument("--decoder_num_attention_heads", type=int, default=8)
    p.add_argument("--no_rotation", action="store_true", help="CIM ablation: exemplar_max_rotation 0")
    p.add_argument("--no_exemplar_augmentation", action="store_true", help="CIM ablation: no photometric aug.")
    p.add_argument("--target_encoder_mode", choices=("ema", "shared"), default="ema")
    p.add_argument("--loss_type", choices=("ce", "balanced_ce", "mse", "focal"), default="ce")
    # MAE
    p.add_argument("--mask_ratio", type=float, default=0.75)
    p.add_argument("--mae_decoder_hidden_size", type=int, default=128)
    p.add_argument("--mae_decoder_layers", type=int, default=2)
    p.add_argument("--mae_decoder_heads", type=int, default=4)
    # pre-training
    p.add_argument("--pretrain_minutes", type=float, default=8.0, help="wall-clock budget per method")
    p.add_argument("--batch_size", type=int, default=64, help="pre-training batch (both methods)")
    p.add_argument("--learning_rate", type=float, default=5e-4, help="pre-training peak lr (both methods)")
    p.add_argument("--calibration_steps", type=int, default=3, help="timed steps used to size max_steps")
    # evaluation
    p.add_argument("--max_train_images", type=int, default=2000, help="train subset for probe / k-NN / fine-tune")
    p.add_argument("--max_eval_images", type=int, default=1000, help="validation subset for every protocol")
    p.add_argument("--max_finetune_images", type=int, default=None,
                   help="train images for the fine-tune (default: --max_train_images)")
    p.add_argument("--knn_k", type=int, default=20)
    p.add_argument("--probe_epochs", type=int, default=100, help="linear-probe epochs over the cached features")
    p.add_argument("--probe_lr", type=float, default=1e-3)
    p.add_argument("--finetune_epochs", type=float, default=1.0)
    p.add_argument("--finetune_lr", type=float, default=5e-4)
    p.add_argument("--finetune_batch_size", type=int, default=64)
    p.add_argument("--finetune_layer_decay", type=float, default=0.75)
    p.add_argument("--skip_finetune", action="store_true")
    args = p.parse_args(argv)
    if args.max_finetune_images is None:
        args.max_finetune_images = args.max_train_images
    return args


def cim_tag(args) -> str:
    """Name of the CIM variant (ablations get their own work sub-directory and table row)."""
    parts = ["cim"]
    if args.no_rotation:
        parts.append("norot")
    if args.no_exemplar_augmentation:
        parts.append("noaug")
    if args.target_encoder_mode != "ema":
        parts.append(args.target_encoder_mode)
    if args.loss_type != "ce":
        parts.append(args.loss_type)
    return "-".join(parts)


def method_dir(args, method: str) -> str:
    return os.path.join(args.work_dir, cim_tag(args) if method == "cim" else method)


def read_json(path):
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    return None


def write_json(path, data) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
    os.replace(path + ".tmp", path)


def log(msg: str) -> None:
    print(f"[quality {datetime.datetime.now().strftime('%H:%M:%S')}] {msg}", flush=True)


# ------------------------------------------------------------------------------------------------------------
# Configs: one encoder, two pre-training methods
# ------------------------------------------------------------------------------------------------------------


def cim_config(args) -> CIMConfig:
    config = CIMConfig.from_preset(args.preset)
    if args.num_layers:
        config.encoder_config.num_hidden_layers = args.num_layers
    config.encoder_config.patch_size = args.patch_size
    for name in ("image_size", "context_size", "exemplar_size", "num_exemplars", "decoder_hidden_size",
                 "decoder_num_attention_heads", "target_encoder_mode", "loss_type"):
        setattr(config, name, getattr(args, name))
    if args.no_rotation:
        config.exemplar_max_rotation = 0.0
    if args.no_exemplar_augmentation:
        config.exemplar_augmentation = False
    return CIMConfig.from_dict(config.to_dict())


def encoder_vit_config(args) -> ViTConfig:
    """The plain ViTConfig of the shared encoder (what every exported encoder uses)."""
    enc = cim_config(args).encoder_config
    return ViTConfig(hidden_size=enc.hidden_size, num_hidden_layers=enc.num_hidden_layers,
                     num_attention_heads=enc.num_attention_heads, intermediate_size=enc.intermediate_size,
                     hidden_act=enc.hidden_act, layer_norm_eps=enc.layer_norm_eps, qkv_bias=enc.qkv_bias,
                     image_size=args.image_size, patch_size=args.patch_size, num_channels=3)


def mae_config(args) -> ViTMAEConfig:
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


def new_mae_model(args) -> ViTMAEForPreTraining:
    """A fresh `ViTMAEForPreTraining` with its fixed sin-cos position embeddings actually written.

    Work-around: in the installed transformers, `ViTMAEPreTrainedModel._init_weights` reaches the patch-projection
    Conv2d first (flagging it `_is_hf_initialized`), so `ViTMAEEmbeddings.initialize_weights` returns early and the
    encoder's position embeddings stay all zero; the decoder's `decoder_pos_embed` is explicitly zeroed and its
    `initialize_weights` is never called. Both tables are frozen (requires_grad=False), so MAE would train with
    no position information at all. We run MAE's own initialisers here.
    """
    model = ViTMAEForPreTraining(mae_config(args))
    embeddings = model.vit.embeddings
    embeddings.patch_embeddings.projection._is_hf_initialized = False
    with torch.no_grad():
        embeddings.initialize_weights()
        model.decoder.initialize_weights(embeddings.patch_embeddings.num_patches)
    if embeddings.position_embeddings.abs().sum() == 0 or model.decoder.decoder_pos_embed.abs().sum() == 0:
        raise RuntimeError("could not initialise the MAE sin-cos position embeddings")
    return model


def cim_cli_args(args) -> list[str]:
    """`run_pretraining.py` flags equal to `cim_config(args)`."""
    overrides = [f"encoder.patch_size={args.patch_size}"]
    if args.num_layers:
        overrides.append(f"encoder.num_hidden_layers={args.num_layers}")
    out = ["--config_name", args.preset, "--config_overrides", ",".join(overrides),
           "--image_size", str(args.image_size), "--context_size", str(args.context_size),
           "--exemplar_size", str(args.exemplar_size), "--num_exemplars", str(args.num_exemplars),
           "--decoder_hidden_size", str(args.decoder_hidden_size),
           "--decoder_num_attention_heads", str(args.decoder_num_attention_heads),
           "--target_encoder_mode", args.target_encoder_mode, "--loss_type", args.loss_type]
    if args.no_rotation:
        out += ["--exemplar_max_rotation", "0"]
    if args.no_exemplar_augmentation:
        out += ["--exemplar_augmentation", "false"]
    return out


# ------------------------------------------------------------------------------------------------------------
# Pre-training
# ------------------------------------------------------------------------------------------------------------


class TimeBudgetCallback(TrainerCallback):
    """Stops training once `budget_s` seconds have passed since the first step began."""

    def __init__(self, budget_s: float):
        self.budget_s, self.start = budget_s, None
        self.stopped_early = False

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self.start is not None and time.perf_counter() - self.start > self.budget_s:
            control.should_training_stop = True
            self.stopped_early = True


def pretraining_dataset(args):
    raw = load_image_dataset(dataset_name=args.dataset_name, split="train")
    transform = RandomResizedCropFlip(size=args.image_size, scale=(0.5, 1.0), mean=IMAGENET_DEFAULT_MEAN,
                                      std=IMAGENET_DEFAULT_STD)
    return prepare_dataset(raw, "image", build_pretraining_transform("image", transform, 32))


def drop_bookkeeping(collate):
    def fn(rows):
        batch = collate(rows)
        batch.pop("num_skipped", None)
        return batch
    return fn


def measure_step_time(args, model, forward_loss) -> float:
    """Seconds per optimizer step (data loading included) over a few real batches, after one warm-up step."""
    from torch.utils.data import DataLoader

    device = torch.device(args.device)
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate)
    ds = pretraining_dataset(args).shuffle(seed=args.seed + 1)
    loader = iter(DataLoader(ds, batch_size=args.batch_size, shuffle=False, num_workers=args.num_workers,
                             collate_fn=drop_bookkeeping(SkippingCollator())))
    times = []
    for i in range(args.calibration_steps + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        batch = next(loader)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            loss = forward_loss(model, batch["pixel_values"].to(device))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i > 0:
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def planned_steps(args, step_s: float) -> int:
    # ~8% of the budget is left for the Trainer's own overhead (logging, the EMA update, saving)
    return max(10, int(args.pretrain_minutes * 60 * 0.92 / step_s))


def common_trainer_flags(args) -> list[str]:
    flags = ["--seed", str(args.seed), "--report_to", "none", "--dataloader_num_workers", str(args.num_workers),
             "--save_strategy", "no", "--logging_steps", "10", "--disable_tqdm", "true"]
    if args.device == "cpu":
        flags += ["--use_cpu", "true"]
    if args.bf16:
        flags += ["--bf16", "true"]
    return flags


def pretrain_stage(args, method: str) -> tuple[str, str, dict | None]:
    """(output dir, result file, finished result or None) of a method's pre-training stage (resumable runs)."""
    out_dir = os.path.join(method_dir(args, method), "pretrain")
    result_file = os.path.join(out_dir, "quality_pretrain.json")
    done = read_json(result_file)
    if done is not None:
        log(f"{method} pre-training already done ({done['steps']} steps): skipped")
    return out_dir, result_file, done


def pretrain_cim(args) -> dict:
    out_dir, result_file, done = pretrain_stage(args, "cim")
    if done is not None:
        return done
    import run_pretraining

    torch.manual_seed(args.seed)
    model = CIMForPreTraining(cim_config(args))
    step_s = measure_step_time(args, model, lambda m, x: m(pixel_values=x).loss)
    del model
    max_steps = planned_steps(args, step_s)
    log(f"CIM: {step_s:.3f} s/step measured -> max_steps {max_steps} for {args.pretrain_minutes} min")

    budget = TimeBudgetCallback(args.pretrain_minutes * 60)
    base_trainer = run_pretraining.CIMTrainer

    class TimedCIMTrainer(base_trainer):  # inject the wall-clock guard into run_pretraining.main
        def __init__(self, *a, callbacks=None, **kw):
            super().__init__(*a, callbacks=[*(callbacks or []), budget], **kw)

    if os.path.isdir(out_dir):
        shutil.rmtree(out_dir)  # an unfinished run restarts from scratch (same budget, same schedule)
    argv = ["--dataset_name", args.dataset_name, *cim_cli_args(args), "--output_dir", out_dir,
            "--per_device_train_batch_size", str(args.batch_size), "--learning_rate", str(args.learning_rate),
            "--max_steps", str(max_steps), *common_trainer_flags(args)]  # warm-up: its 5% default
    log("run_pretraining.main " + " ".join(argv))
    run_pretraining.CIMTrainer = TimedCIMTrainer
    start = time.perf_counter()
    try:
        metrics = run_pretraining.main(argv)
    finally:
        run_pretraining.CIMTrainer = base_trainer
    wall = time.perf_counter() - start
    state = read_json(os.path.join(out_dir, "trainer_state.json")) or {}
    losses = [e["loss"] for e in state.get("log_history", []) if "loss" in e]
    ious = [e["pretext_iou"] for e in state.get("log_history", []) if "pretext_iou" in e]
    done = {"method": "cim", "steps": state.get("global_step", metrics.get("step")), "planned_steps": max_steps,
            "step_s_calibrated": step_s, "train_runtime_s": metrics.get("train_runtime"), "wall_s": wall,
            "stopped_by_budget": budget.stopped_early, "first_loss": losses[0] if losses else None,
            "final_loss": losses[-1] if losses else None, "final_pretext_iou": ious[-1] if ious else None,
            "batch_size": args.batch_size}
    write_json(result_file, done)
    return done


class MAEPretrainTrainer(Trainer):
    """Plain Trainer; the SkippingCollator's bookkeeping key is dropped before the forward pass."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = {k: v for k, v in inputs.items() if k == "pixel_values"}
        outputs = model(**inputs)
        return (outputs.loss, outputs) if return_outputs else outputs.loss


def pretrain_mae(args) -> dict:
    out_dir, result_file, done = pretrain_stage(args, "mae")
    if done is not None:
        return done
    transformers.set_seed(args.seed)
    model = new_mae_model(args)
    probe = new_mae_model(args)
    step_s = measure_step_time(args, probe, lambda m, x: m(pixel_values=x).loss)
    del probe
    max_steps = planned_steps(args, step_s)
    log(f"MAE: {step_s:.3f} s/step measured -> max_steps {max_steps} for {args.pretrain_minutes} min")
    if os.path.isdir(out_dir):
        shutil.rmtree(out_dir)
    # the MAE recipe's optimizer (AdamW betas (0.9, 0.95), wd 0.05, cosine, warm-up) at the same peak lr as CIM
    targs = TrainingArguments(
        output_dir=out_dir, per_device_train_batch_size=args.batch_size, learning_rate=args.learning_rate,
        max_steps=max_steps, warmup_steps=max(1, int(0.05 * max_steps)), lr_scheduler_type="cosine",
        weight_decay=0.05, adam_beta2=0.95, max_grad_norm=1.0, logging_steps=10, save_strategy="no",
        report_to="none", dataloader_num_workers=args.num_workers, dataloader_drop_last=True,
        remove_unused_columns=False, seed=args.seed, use_cpu=args.device == "cpu", bf16=args.bf16,
        disable_tqdm=True,
    )
    budget = TimeBudgetCallback(args.pretrain_minutes * 60)
    trainer = MAEPretrainTrainer(model=model, args=targs, train_dataset=pretraining_dataset(args),
                                 data_collator=SkippingCollator(), callbacks=[budget])
    start = time.perf_counter()
    result = trainer.train()
    wall = time.perf_counter() - start
    trainer.save_model()
    trainer.save_state()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    done = {"method": "mae", "steps": trainer.state.global_step, "planned_steps": max_steps,
            "step_s_calibrated": step_s, "train_runtime_s": result.metrics.get("train_runtime"), "wall_s": wall,
            "stopped_by_budget": budget.stopped_early, "first_loss": losses[0] if losses else None,
            "final_loss": losses[-1] if losses else None, "batch_size": args.batch_size}
    write_json(result_file, done)
    return done


# ------------------------------------------------------------------------------------------------------------
# Encoders as stock ViTModel checkpoints
# ------------------------------------------------------------------------------------------------------------


def export_encoder_dir(args, method: str) -> str:
    out = os.path.join(method_dir(args, method), "encoder")
    if os.path.isfile(os.path.join(out, "config.json")):
        return out
    if method == "cim":
        from transformers_cim.export import export_encoder

        export_encoder(os.path.join(method_dir(args, "cim"), "pretrain"), out)
        return out
    config = encoder_vit_config(args)
    if method == "random":
        transformers.set_seed(args.seed)
        encoder = ViTModel(config, add_pooling_layer=False)
        # the same fixed 2-D sin-cos position embeddings that CIM and MAE use
        grid = args.image_size // args.patch_size
        with torch.no_grad():
            encoder.embeddings.position_embeddings.copy_(
                sincos_position_embedding_2d(grid, config.hidden_size, with_cls=True).unsqueeze(0))
    else:  # mae: ViTMAEModel "vit." weights -> ViTModel
        mae = ViTMAEForPreTraining.from_pretrained(os.path.join(method_dir(args, "mae"), "pretrain"))
        encoder = ViTModel(config, add_pooling_layer=False)
        state = {k[len("vit."):]: v for k, v in mae.state_dict().items() if k.startswith("vit.")}
        missing, unexpected = encoder.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise RuntimeError(f"MAE -> ViTModel mapping failed: missing {missing}, unexpected {unexpected}")
        # MAE keeps its sin-cos position embeddings fixed (requires_grad=False) and never saves a learned table:
        # copy them explicitly and check they are the sin-cos table ViTModel will add to the patch tokens
        mae_pos = mae.vit.embeddings.position_embeddings.detach()
        with torch.no_grad():
            encoder.embeddings.position_embeddings.copy_(mae_pos)
        if mae_pos.abs().sum() == 0:
            raise RuntimeError("MAE position embeddings are all zero: the sin-cos table was not initialised")
        # ViTMAEEmbeddings.forward at the training size adds position_embeddings exactly like ViTEmbeddings
        check = torch.randn(2, 3, args.image_size, args.image_size)
        mae.vit.config.mask_ratio = 0.0
        with torch.no_grad():
            ref = mae.vit(check, noise=torch.arange(mae.vit.embeddings.patch_embeddings.num_patches)
                          .float().expand(2, -1)).last_hidden_state
            got = encoder(check).last_hidden_state
        err = (ref - got).abs().max().item()
        if err > 1e-4:
            raise RuntimeError(f"MAE encoder and the mapped ViTModel disagree (max abs diff {err:.2e})")
        log(f"MAE encoder mapped onto ViTModel (max abs diff vs ViTMAEModel without masking {err:.1e})")
    encoder.config.architectures = ["ViTModel"]
    encoder.save_pretrained(out)
    return out


# ------------------------------------------------------------------------------------------------------------
# Evaluation
# ------------------------------------------------------------------------------------------------------------


def eval_subsets(args):
    """Fixed, shuffled (seed) subsets: the same selection rule as run_image_classification's --max_*_samples."""
    train = load_image_dataset(dataset_name=args.dataset_name, split="train")
    val = load_image_dataset(dataset_name=args.dataset_name, split="validation")
    train = train.shuffle(seed=args.seed).select(range(min(args.max_train_images, len(train))))
    val = val.shuffle(seed=args.seed).select(range(min(args.max_eval_images, len(val))))
    transform = ResizeCenterCrop(size=args.image_size, crop_pct=0.875, mean=IMAGENET_DEFAULT_MEAN,
                                 std=IMAGENET_DEFAULT_STD)
    fn = build_classification_transform("image", "label", transform, 16)
    num_classes = train.features["label"].num_classes
    return prepare_dataset(train, "image", fn), prepare_dataset(val, "image", fn), num_classes


def features_for(args, method: str, encoder_dir: str, subsets) -> dict:
    path = os.path.join(method_dir(args, method), "features.pt")
    if os.path.isfile(path):
        return torch.load(path)
    device = torch.device(args.device)
    encoder = ViTModel.from_pretrained(encoder_dir, add_pooling_layer=False).to(device).eval()
    train_ds, val_ds, _ = subsets
    start = time.perf_counter()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
        xtr, ytr = extract_features(encoder, train_ds, batch_size=128, device=device, normalize=False,
                                    num_workers=args.num_workers)
        xva, yva = extract_features(encoder, val_ds, batch_size=128, device=device, normalize=False,
                                    num_workers=args.num_workers)
    feats = {"train": xtr.float().cpu(), "train_labels": ytr.cpu(), "val": xva.float().cpu(),
             "val_labels": yva.cpu(), "seconds": time.perf_counter() - start}
    torch.save(feats, path)
    log(f"{method}: features {tuple(xtr.shape)} / {tuple(xva.shape)} in {feats['seconds']:.0f} s")
    return feats


def linear_probe(args, feats: dict, num_classes: int) -> float:
    """BatchNorm1d(affine=False) + Linear on the frozen CLS features (MAE's linear-probe head), AdamW, cosine."""
    gen = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    x, y = feats["train"], feats["train_labels"]
    head = LinearProbeHead(x.shape[1], num_classes)
    opt = torch.optim.AdamW(head.parameters(), lr=args.probe_lr, weight_decay=0.0)
    batch = 256
    steps_per_epoch = math.ceil(len(x) / batch)
    total = args.probe_epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s / total, 1.0))))
    head.train()
    for _ in range(args.probe_epochs):
        order = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), batch):
            idx = order[i:i + batch]
            if len(idx) < 2:
                continue
            loss = F.cross_entropy(head(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    head.eval()
    with torch.no_grad():
        pred = head(feats["val"]).argmax(1)
    return float((pred == feats["val_labels"]).float().mean())


def finetune(args, method: str, encoder_dir: str) -> dict:
    out_dir = os.path.join(method_dir(args, method), "finetune")
    result_file = os.path.join(method_dir(args, method), "quality_finetune.json")
    if (done := read_json(result_file)) is not None:
        return done
    import run_image_classification

    if os.path.isdir(out_dir):
        shutil.rmtree(out_dir)
    argv = ["--model_name_or_path", encoder_dir, "--dataset_name", args.dataset_name,
            "--image_size", str(args.image_size), "--max_train_samples", str(args.max_finetune_images),
            "--max_eval_samples", str(args.max_eval_images), "--num_train_epochs", str(args.finetune_epochs),
            "--per_device_train_batch_size", str(args.finetune_batch_size), "--per_device_eval_batch_size", "128",
            "--learning_rate", str(args.finetune_lr), "--layer_decay", str(args.finetune_layer_decay),
            "--mixup", "0", "--cutmix", "0", "--label_smoothing", "0.1", "--warmup_steps", "0.1",
            "--eval_strategy", "no", "--output_dir", out_dir, *common_trainer_flags(args)]
    log(f"{method}: run_image_classification.main " + " ".join(argv))
    start = time.perf_counter()
    metrics = run_image_classification.main(argv)
    top1 = next((v for k, v in metrics.items() if "top1" in k or k == "eval_accuracy"), None)
    done = {"top1": top1, "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float))},
            "wall_s": time.perf_counter() - start}
    write_json(result_file, done)
    return done


def evaluate_method(args, method: str, subsets) -> dict:
    result_file = os.path.join(method_dir(args, method), "quality_eval.json")
    results = read_json(result_file) or {}
    encoder_dir = export_encoder_dir(args, method)
    num_classes = subsets[2]
    if "linear_probe" not in results or "knn" not in results:
        feats = features_for(args, method, encoder_dir, subsets)
        results["linear_probe"] = linear_probe(args, feats, num_classes)
        results["knn"] = knn_accuracy(feats["train"], feats["train_labels"], feats["val"], feats["val_labels"],
                                      k=args.knn_k, temperature=0.07, num_classes=num_classes)
        results["n_train"], results["n_val"] = len(feats["train"]), len(feats["val"])
        write_json(result_file, results)
        log(f"{method}: linear probe {100 * results['linear_probe']:.1f} %, k-NN {100 * results['knn']:.1f} %")
    if not args.skip_finetune and "finetune" not in results:
        ft = finetune(args, method, encoder_dir)
        results["finetune"] = ft["top1"]
        results["finetune_wall_s"] = ft["wall_s"]
        write_json(result_file, results)
        log(f"{method}: fine-tune {100 * (ft['top1'] or float('nan')):.1f} %")
    return results


# ------------------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------------------


def machine_line(args) -> str:
    try:
        from _common import machine_lines

        return " ".join(machine_lines(torch.device(args.device), args.threads))
    except Exception:  # noqa: BLE001 - the helper is optional
        return f"{platform.processor() or platform.machine()}, {args.threads} threads, torch {torch.__version__}"


def pct(value) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}"


def report(args, pretrain: dict, evals: dict, wall_s: float) -> str:
    enc = encoder_vit_config(args)
    names = {"cim": f"CIM ({cim_tag(args)})", "mae": "MAE", "random": "random init"}
    lines = [
        "# Pre-training quality: CIM vs MAE vs random init",
        "",
        f"Date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}. "
        f"Total wall time of this invocation: {wall_s / 60:.1f} min (finished stages are reused).",
        "",
        "| method | pre-train steps (batch) | final pre-train loss | linear probe top-1 (%) | "
        f"k-NN k={args.knn_k} top-1 (%) | fine-tune top-1 (%) |",
        "|---|---|---|---|---|---|",
    ]
    for method in args.methods:
        pre = pretrain.get(method)
        ev = evals.get(method, {})
        steps = f"{pre['steps']} ({pre['batch_size']})" if pre else "0"
        loss = f"{pre['final_loss']:.4f}" if pre and pre.get("final_loss") is not None else "-"
        lines.append(f"| {names[method]} | {steps} | {loss} | {pct(ev.get('linear_probe'))} | {pct(ev.get('knn'))} | "
                     f"{'skipped' if args.skip_finetune else pct(ev.get('finetune'))} |")
    n_train = next((e.get("n_train") for e in evals.values() if e.get("n_train")), args.max_train_images)
    n_val = next((e.get("n_val") for e in evals.values() if e.get("n_val")), args.max_eval_images)
    lines += [
        "",
        "Settings:",
        f"- data: `{args.dataset_name}` (pre-training: the whole train split, no labels; "
        f"evaluation: {n_train} train / {n_val} validation images, fixed shuffle seed {args.seed}).",
        f"- encoder (all methods): ViT, hidden {enc.hidden_size}, {enc.num_hidden_layers} layers, "
        f"{enc.num_attention_heads} heads, MLP {enc.intermediate_size}, patch {enc.patch_size}, "
        f"{args.image_size} px, fixed 2-D sin-cos position embeddings.",
        f"- pre-training: {args.pretrain_minutes:g} min wall clock per method, batch {args.batch_size}, "
        f"AdamW (0.9, 0.95) wd 0.05, peak lr {args.learning_rate:g}, cosine with 5% warm-up; max_steps sized by a "
        "measured calibration, plus a wall-clock stop.",
        f"- CIM: search view {args.image_size}, context {args.context_size}, {args.num_exemplars} x "
        f"{args.exemplar_size} px exemplars, decoder {args.decoder_hidden_size} wide / "
        f"{args.decoder_num_attention_heads} heads, loss {args.loss_type}, target {args.target_encoder_mode}, "
        f"rotation {'0' if args.no_rotation else '+-45'} deg, exemplar augmentation "
        f"{'off' if args.no_exemplar_augmentation else 'on'}.",
        f"- MAE (`transformers.ViTMAEForPreTraining`): mask {args.mask_ratio}, decoder "
        f"{args.mae_decoder_hidden_size} wide / {args.mae_decoder_layers} layers / {args.mae_decoder_heads} heads, "
        "normalised-pixel loss.",
        f"- linear probe: BatchNorm1d(affine=False) + Linear on the frozen CLS feature, AdamW lr {args.probe_lr:g}, "
        f"{args.probe_epochs} epochs over the cached features. k-NN: cosine, k={args.knn_k}, T=0.07, "
        "train-subset features as the memory bank.",
        f"- fine-tune: `run_image_classification.main`, {args.finetune_epochs:g} epoch(s) on "
        f"{args.max_finetune_images} train images, lr {args.finetune_lr:g}, batch {args.finetune_batch_size}, "
        f"layer decay {args.finetune_layer_decay}, label smoothing 0.1, no Mixup/CutMix.",
        f"- device {args.device}{' bf16' if args.bf16 else ' fp32'}; machine: {machine_line(args)}",
    ]
    for method in args.methods:
        pre = pretrain.get(method)
        if pre:
            lines.append(f"- {names[method]} pre-training: {pre['steps']} of {pre['planned_steps']} planned steps in "
                         f"{(pre.get('train_runtime_s') or 0) / 60:.1f} min ({pre['step_s_calibrated']:.2f} s/step "
                         f"calibrated), loss {pre.get('first_loss') or float('nan'):.4f} -> "
                         f"{pre.get('final_loss') or float('nan'):.4f}"
                         + (f", final pretext IoU {pre['final_pretext_iou']:.3f}" if pre.get("final_pretext_iou")
                            is not None else "") + ".")
    lines.append("")
    return "\n".join(lines)


def main(argv=None) -> str:
    args = parse_args(argv)
    start = time.perf_counter()
    try:
        args.threads = args.threads or len(os.sched_getaffinity(0))
    except AttributeError:
        args.threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda asked for, but CUDA is not available")
    os.makedirs(args.work_dir, exist_ok=True)
    write_json(os.path.join(args.work_dir, f"settings-{cim_tag(args)}.json"), vars(args))
    log(f"settings: {vars(args)}")

    pretrain = {}
    if "cim" in args.methods:
        pretrain["cim"] = pretrain_cim(args)
    if "mae" in args.methods:
        pretrain["mae"] = pretrain_mae(args)
    subsets = eval_subsets(args)
    evals = {m: evaluate_method(args, m, subsets) for m in args.methods}

    text = report(args, pretrain, evals, time.perf_counter() - start)
    print(text)
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as f:
            f.write(text)
        log(f"wrote {args.output}")
    return text


if __name__ == "__main__":
    main()
