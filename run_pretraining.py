#!/usr/bin/env python
"""Pre-train a vision encoder with Correlational Image Modeling (CIM), the way `run_mae.py` pre-trains MAE.

Quick start (offline, a few minutes on 2 CPU cores, real photos shipped with scikit-image):

    python run_pretraining.py --output_dir outputs/cim-quickstart

Real runs: a Hub dataset (streamed or not), an image folder, or parquet files, e.g.

    python run_pretraining.py --dataset_name ILSVRC/imagenet-1k --streaming --config_name vit-base-patch16 \
        --per_device_train_batch_size 256 --max_steps 100000 --bf16 --output_dir outputs/cim-vit-b

Arguments may also come from one `.json` file: `python run_pretraining.py args.json`.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass, field, fields

import torch
import transformers

from transformers_cim.configuration_cim import PRESET_NAMES
from transformers_cim.errors import UserPathError, UserValueError, exit_on_user_error
from transformers_cim.hub_card import card_license
from transformers_cim.training.data import (
    ResizeCenterCrop,
    SkippingCollator,
    build_pretraining_transform,
    check_num_workers,
    find_image_column,
    prepare_dataset,
)
from transformers_cim.training.knn import KNNCallback
from transformers_cim.training.pretraining import (
    build_config,
    build_model,
    choose_learning_rate,
    end_distributed,
    knn_datasets,
    load_split,
    preflight_images,
    prepare_train_dataset,
    preview_batch,
    refuse_fsdp,
    stop_after_signal,
    use_shards_per_rank,
    write_card,
)
from transformers_cim.training.script_args import DataSourceArguments, ResumableTrainingArguments, ScriptArgumentParser
from transformers_cim.training.trainer import CIMTrainer, SaveOnSignalCallback
from transformers_cim.training.visualization_callback import VisualizationCallback

logger = logging.getLogger("run_pretraining")

# The offline quick start (docs/does-cim-learn.md): ViT-Tiny width with 2 layers, patch 8 (a 32 px exemplar is 4 x 4
# tokens), 96 px views, 64 px context, rotated exemplars, and the small-budget recipe measured there: a 128-wide
# decoder, the prior bias, one encoder for exemplars and context (the paper's "shared" variant: twice the learning per
# step of the EMA target at this budget), and the exemplars' photometric augmentation off for the first half, ramped
# in until 80 % of training and full for the rest. Every other setting is the authors'.
QUICKSTART_CONFIG = dict(
    image_size=96,
    context_size=64,
    exemplar_size=32,
    num_exemplars=6,
    decoder_hidden_size=128,
    decoder_num_attention_heads=4,
    decoder_prior_bias=True,
    target_encoder_mode="shared",
    exemplar_augmentation_ramp=[0.5, 0.8],
)
QUICKSTART_ENCODER = dict(patch_size=8, num_hidden_layers=2)
QUICKSTART_MAX_STEPS = 5000
QUICKSTART_LEARNING_RATE = 5e-4
PREFLIGHT_IMAGES = 16


@dataclass
class ModelArguments:
    """Which model to pre-train."""

    _argument_group_name = "model"

    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "A CIM checkpoint to continue from, or a ViT/ResNet checkpoint to initialise the encoder with."
        },
    )
    config_name: str | None = field(
        default=None,
        metadata={
            "help": f"A preset ({', '.join(PRESET_NAMES)}) or a path to a CIM config. Default: vit-base-patch16, "
            "or the small quick-start model when no dataset is given."
        },
    )
    config_overrides: str | None = field(
        default=None,
        metadata={
            "help": "Comma-separated key=value CIM config overrides; `encoder.` keys go to the encoder config, e.g. "
            "'num_exemplars=4,encoder.num_hidden_layers=6'."
        },
    )
    attn_implementation: str | None = field(default="sdpa", metadata={"help": "eager, sdpa or flash_attention_2."})
    channels_last: bool = field(
        default=False,
        metadata={
            "help": "ResNet encoders: keep the convolution weights (hence activations) in channels-last memory "
            "format, "
            "faster with bf16 on recent GPUs. Results equal the default layout up to rounding."
        },
    )
    cache_dir: str | None = field(default=None, metadata={"help": "Where downloaded datasets/models are cached."})
    token: str | None = field(default=None, metadata={"help": "Hub token for private data or pushing."})
    license: str | None = field(
        default=None,
        metadata={
            "help": "Licence stated in the model card (a Hub licence id, e.g. apache-2.0, mit). Default: the licence "
            "of "
            "--model_name_or_path's card when it states one, else none."
        },
    )


@dataclass
class CIMArguments:
    """The CIM settings that override the config's (unset: the config's value)."""

    _argument_group_name = "CIM (each overrides the config's value)"

    image_size: int | None = field(default=None, metadata={"help": "Search-view side (default 224)."})
    context_size: int | None = field(default=None, metadata={"help": "Context side m (default 160)."})
    exemplar_size: int | None = field(default=None, metadata={"help": "Exemplar side n (default 64)."})
    num_exemplars: int | None = field(default=None, metadata={"help": "Exemplars per image K (default 6)."})
    exemplar_scale: list[float] | None = field(
        default=None, metadata={"help": "Exemplar area fraction range.", "nargs": 2}
    )
    exemplar_aspect_ratio: list[float] | None = field(
        default=None, metadata={"help": "h/w range (log-uniform).", "nargs": 2}
    )
    exemplar_max_rotation: float | None = field(default=None, metadata={"help": "Max rotation in degrees (45)."})
    exemplar_augmentation: bool | None = field(default=None, metadata={"help": "Photometric exemplar transforms."})
    exemplar_augmentation_ramp: list[float] | None = field(
        default=None,
        metadata={
            "help": "Fractions of training (start end) between which the photometric exemplar transforms ramp from "
            "off to the recipe's (0 0: full from the first step, the authors' recipe).",
            "nargs": 2,
        },
    )
    decoder_hidden_size: int | None = field(default=None, metadata={"help": "Decoder width (512)."})
    decoder_num_attention_heads: int | None = field(default=None, metadata={"help": "Decoder heads (16)."})
    decoder_num_layers: int | None = field(default=None, metadata={"help": "Decoder layers (1)."})
    loss_type: str | None = field(default=None, metadata={"help": "ce, balanced_ce, mse or focal."})
    momentum_start: float | None = field(default=None, metadata={"help": "EMA momentum at step 0 (0.99)."})
    momentum_end: float | None = field(default=None, metadata={"help": "EMA momentum at the last step (1.0)."})
    contrastive_loss_weight: float | None = field(
        default=None, metadata={"help": "Global contrastive loss weight (0)."}
    )
    target_encoder_mode: str | None = field(default=None, metadata={"help": "ema (paper) or shared."})


@dataclass
class DataTrainingArguments(DataSourceArguments):
    """Where the images come from (the shared `DataSourceArguments`) and how they are prepared."""

    _argument_group_name = "data"

    shuffle_buffer_size: int = field(
        default=10_000,
        metadata={
            "help": "Shuffle buffer of a streamed dataset, per data reader (each worker of each process holds its "
            "own, of "
            "encoded images)."
        },
    )
    view_scale: list[float] = field(
        default_factory=lambda: [0.5, 1.0],
        metadata={"help": "Random-resized-crop scale range of the search view (recipe: 0.5 1.0).", "nargs": 2},
    )
    min_image_size: int = field(default=32, metadata={"help": "Images with a shorter side are skipped."})
    visualize_every_steps: int | None = field(
        default=None,
        metadata={
            "help": "Also write the correlation-map figure every N steps (correlation_maps_stepN.png, and to the "
            "--report_to "
            "trackers). Default: to the trackers about 10 times per run when --report_to names any, else only at "
            "the end; 0: only at the end."
        },
    )
    num_visualize_images: int = field(default=4, metadata={"help": "Images in the correlation-map figure."})
    knn_eval_steps: int = field(
        default=0,
        metadata={
            "help": "Every N optimizer steps (and at the last), log knn_top1: the weighted k-NN top-1 accuracy of the "
            "online encoder's CLS / pooled feature, with labelled training images as the memory bank and the "
            "labelled validation split as queries (needs a label column, e.g. class sub-folders, and a validation "
            "split: --validation_dir / --validation_files / a dataset's). 0: off."
        },
    )
    knn_max_train_samples: int = field(default=1000, metadata={"help": "k-NN monitor: memory-bank images."})
    knn_max_eval_samples: int = field(default=500, metadata={"help": "k-NN monitor: query images."})
    knn_k: int = field(default=20, metadata={"help": "k-NN monitor: neighbours (cosine, weights exp(sim / 0.07))."})


@dataclass
class CIMTrainingArguments(ResumableTrainingArguments):
    """`TrainingArguments` with the CIM recipe's defaults (AdamW betas (0.9, 0.95), wd 0.05, warm-up 40/300, cosine,
    no gradient clipping)."""

    _argument_group_name = "training (the CIM recipe's defaults)"

    base_learning_rate: float = field(
        default=1.5e-4,
        metadata={"help": "lr = base_learning_rate * total batch / 256 (ignored when --learning_rate is given)."},
    )
    adam_beta2: float = field(default=0.95, metadata={"help": "AdamW beta2."})
    weight_decay: float = field(default=0.05, metadata={"help": "AdamW weight decay (none on norms/biases)."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "Learning-rate schedule."})
    warmup_steps: float = field(
        default=40 / 300,
        metadata={
            "help": "Linear warm-up: steps, or a fraction of the run when < 1 (default 40/300: the recipe's 40 of "
            "300 epochs)."
        },
    )
    max_grad_norm: float = field(
        default=0.0,
        metadata={
            "help": "Gradient clipping (0 = off). Off like the authors' runs: their script asks for 1.0, but their "
            "code "
            "clips only on an AMP path their fp32 runs never took."
        },
    )
    logging_steps: float = field(default=10, metadata={"help": "Log loss, momentum and pretext IoU every N steps."})
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Keep False: the collator needs its columns."}
    )
    dataloader_drop_last: bool = field(default=True, metadata={"help": "Drop the last incomplete batch."})
    save_total_limit: int | None = field(default=3, metadata={"help": "Checkpoints kept."})


def parse_arguments(argv: list[str] | None = None):
    parser = ScriptArgumentParser((ModelArguments, DataTrainingArguments, CIMArguments, CIMTrainingArguments))
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 1 and argv[0].endswith(".json"):
        if not os.path.isfile(argv[0]):
            raise UserPathError(f"Argument file {argv[0]!r} does not exist.")
        model_args, data_args, cim_args, training_args = parser.parse_json_file(os.path.abspath(argv[0]))
        with open(argv[0]) as f:
            explicit_lr = "learning_rate" in json.load(f)
    else:
        model_args, data_args, cim_args, training_args = parser.parse_args_into_dataclasses(args=argv)
        explicit_lr = any(a.split("=")[0] == "--learning_rate" for a in argv)
    return model_args, data_args, cim_args, training_args, explicit_lr


def uses_default_data(data_args: DataTrainingArguments) -> bool:
    return not (data_args.dataset_name or data_args.train_dir or data_args.train_files)


CLI_CONFIG_FIELDS = tuple(f.name for f in fields(CIMArguments))  # each a CIMConfig field of the same name


def main(argv: list[str] | None = None) -> dict:
    # parse
    model_args, data_args, cim_args, training_args, explicit_lr = parse_arguments(argv)
    # logging
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    transformers.utils.logging.set_verbosity_warning()
    # the run's shape: no FSDP, the quick start's steps when no data is given, a length for a stream
    refuse_fsdp(training_args)
    quickstart = uses_default_data(data_args)
    if quickstart and training_args.max_steps <= 0 and training_args.num_train_epochs == 3.0:
        training_args.max_steps = QUICKSTART_MAX_STEPS
    if data_args.streaming and training_args.max_steps <= 0:
        raise UserValueError("A streamed dataset has no length: pass --max_steps.")

    # data first: a wrong path or column fails here, before a model is built
    raw_train = load_split(data_args, model_args, "train")
    image_column = find_image_column(raw_train.features or raw_train.column_names, data_args.image_column_name)
    preflight = preflight_images(raw_train, image_column, data_args.min_image_size, count=PREFLIGHT_IMAGES)
    # config (the model's settings decide the transforms)
    quickstart_settings = {"config": QUICKSTART_CONFIG, "encoder": QUICKSTART_ENCODER} if quickstart else None
    config = build_config(model_args, cim_args, CLI_CONFIG_FIELDS, quickstart_settings)
    # transforms and datasets: the training views, the evaluation split, the k-NN monitor's images
    train_ds = prepare_train_dataset(raw_train, image_column, config, data_args, training_args)
    eval_transform = ResizeCenterCrop(config.image_size, mean=config.image_mean, std=config.image_std)
    eval_ds = None
    if training_args.do_eval:
        raw_eval = load_split(data_args, model_args, "validation")
        if data_args.max_eval_samples:
            raw_eval = (
                raw_eval.take(data_args.max_eval_samples)
                if data_args.streaming
                else raw_eval.select(range(min(data_args.max_eval_samples, len(raw_eval))))
            )
        eval_ds = prepare_dataset(
            raw_eval, image_column, build_pretraining_transform(image_column, eval_transform, data_args.min_image_size)
        )
    knn_sets = None
    if data_args.knn_eval_steps > 0:
        knn_sets = knn_datasets(data_args, model_args, training_args, raw_train, image_column, eval_transform)
    if data_args.streaming:
        use_shards_per_rank(training_args, train_ds.source.num_shards)
        training_args.dataloader_num_workers = check_num_workers(
            training_args.dataloader_num_workers, train_ds.num_shards
        )
    logger.info(
        "Training %s on %s (image column %r)",
        config.encoder_type,
        data_args.dataset_name or data_args.train_dir or data_args.train_files or "the embedded photos",
        image_column,
    )
    logger.info(choose_learning_rate(training_args, explicit_lr, QUICKSTART_LEARNING_RATE if quickstart else None))

    # model
    transformers.set_seed(training_args.seed)  # a fresh model's initial weights follow --seed (Trainer seeds later)
    model = build_model(model_args, config)
    if model_args.channels_last:
        if config.encoder_type != "resnet":
            raise UserValueError(
                "--channels_last is for ResNet encoders; a ViT's only convolution is its patch "
                "embedding, which gains nothing from it."
            )
        model = model.to(memory_format=torch.channels_last)
    # Trainer, with the correlation-map figures and the k-NN monitor
    image_processor = eval_transform.image_processor()
    on_signal = SaveOnSignalCallback()
    trainer = CIMTrainer(
        model=model,
        args=training_args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        data_collator=SkippingCollator(),
        processing_class=image_processor,
        callbacks=[on_signal],
    )
    trainer.add_callback(
        VisualizationCallback(
            preview_batch(preflight, config, data_args.num_visualize_images),
            every_steps=data_args.visualize_every_steps,
            trainer=trainer,
        )
    )
    knn = None
    if knn_sets is not None:  # k-NN top-1 every --knn_eval_steps, logged next to the loss
        knn = KNNCallback(
            *knn_sets,
            metric_key_prefix="knn",
            every_steps=data_args.knn_eval_steps,
            on_evaluate=False,
            trainer=trainer,
            k=data_args.knn_k,
            batch_size=training_args.per_device_eval_batch_size,
        )
        trainer.add_callback(knn)

    # train (resuming by the scripts' one rule), then save
    results: dict = {}
    train_result = trainer.train(resume_from_checkpoint=training_args.checkpoint_to_resume(model))
    if on_signal.received is not None:
        stop_after_signal(trainer, on_signal.received)
    trainer.save_model()
    results.update(train_result.metrics)
    results["skipped_images"] = trainer.total_skipped_images()  # distinct images, all processes
    if results["skipped_images"]:
        logger.warning(
            "Skipped %d undecodable or too-small training images (each counted once; the first few are "
            "named above with the reason).",
            results["skipped_images"],
        )
    if knn is not None and knn.last_result is not None:
        results.update(knn.last_result)  # the k-NN top-1 after the last step
    # evaluate
    if eval_ds is not None:
        results.update(trainer.evaluate())
    trainer.log_metrics("train", results)
    trainer.save_metrics("all", results)
    trainer.save_state()
    # model card, push
    if trainer.is_world_process_zero():
        write_card(
            trainer,
            config,
            data_args,
            results,
            license=model_args.license
            or card_license(
                model_args.model_name_or_path
                if model_args.model_name_or_path and os.path.isdir(model_args.model_name_or_path)
                else None
            ),
        )
    if training_args.push_to_hub:
        trainer.push_to_hub(commit_message="CIM pre-training: checkpoint, correlation-map figure and model card")
    end_distributed(trainer)
    return results


if __name__ == "__main__":
    exit_on_user_error(main)
