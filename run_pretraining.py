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
import signal
import sys
from dataclasses import dataclass, field, fields

import datasets
import torch
import transformers

from transformers_cim import CIMConfig, CIMForPreTraining
from transformers_cim.configuration_cim import PRESET_NAMES
from transformers_cim.training.data import (
    RandomResizedCropFlip,
    ResizeCenterCrop,
    SeededImageDataset,
    SkippingCollator,
    build_classification_transform,
    build_pretraining_transform,
    check_num_workers,
    decode_image,
    find_image_column,
    find_label_column,
    prepare_dataset,
)
from transformers_cim.errors import UserPathError, UserValueError, exit_on_user_error
from transformers_cim.training.knn import KNNCallback
from transformers_cim.training.modelcard import build_model_card, card_license, write_model_card
from transformers_cim.training.script_args import (
    DataSourceArguments,
    ResumableTrainingArguments,
    ScriptArgumentParser,
    set_learning_rate,
)
from transformers_cim.training.streaming import ResumableImageStream
from transformers_cim.training.trainer import CIMTrainer, SaveOnSignalCallback
from transformers_cim.training.utils import fetch_batches_per_process
from transformers_cim.training.visualization_callback import VisualizationCallback

logger = logging.getLogger("run_pretraining")

# The offline quick start: the smallest setting measured to learn its pretext task within minutes on 2 CPU cores
# (README, "Does CIM learn its task?"): ViT-Tiny width with 2 layers, patch 8 (a 32 px exemplar is 4 x 4 tokens),
# 96 px views, 64 px context, rotated exemplars, and the exemplars' photometric augmentation off: with it on, no
# run of up to 1,000 steps got clearly below the constant prior. Every other setting is the authors'.
QUICKSTART_CONFIG = dict(image_size=96, context_size=64, exemplar_size=32, num_exemplars=6,
                         decoder_hidden_size=256, decoder_num_attention_heads=8, exemplar_augmentation=False)
QUICKSTART_ENCODER = dict(patch_size=8, num_hidden_layers=2)
QUICKSTART_MAX_STEPS = 2000
QUICKSTART_LEARNING_RATE = 5e-4
PREFLIGHT_IMAGES = 16


@dataclass
class ModelArguments:
    """Which model to pre-train."""

    _argument_group_name = "model"

    model_name_or_path: str | None = field(default=None, metadata={
        "help": "A CIM checkpoint to continue from, or a ViT/ResNet checkpoint to initialise the encoder with."})
    config_name: str | None = field(default=None, metadata={
        "help": f"A preset ({', '.join(PRESET_NAMES)}) or a path to a CIM config. Default: vit-base-patch16, "
                "or the small quick-start model when no dataset is given."})
    config_overrides: str | None = field(default=None, metadata={
        "help": "Comma-separated key=value CIM config overrides; `encoder.` keys go to the encoder config, e.g. "
                "'num_exemplars=4,encoder.num_hidden_layers=6'."})
    attn_implementation: str | None = field(default="sdpa", metadata={"help": "eager, sdpa or flash_attention_2."})
    channels_last: bool = field(default=False, metadata={
        "help": "ResNet encoders: keep the convolution weights (hence activations) in channels-last memory format, "
                "faster with bf16 on recent GPUs. Results equal the default layout up to rounding."})
    cache_dir: str | None = field(default=None, metadata={"help": "Where downloaded datasets/models are cached."})
    token: str | None = field(default=None, metadata={"help": "Hub token for private data or pushing."})
    license: str | None = field(default=None, metadata={
        "help": "Licence stated in the model card (a Hub licence id, e.g. apache-2.0, mit). Default: the licence of "
                "--model_name_or_path's card when it states one, else none."})


@dataclass
class CIMArguments:
    """The CIM settings that override the config's (unset: the config's value)."""

    _argument_group_name = "CIM (each overrides the config's value)"

    image_size: int | None = field(default=None, metadata={"help": "Search-view side (default 224)."})
    context_size: int | None = field(default=None, metadata={"help": "Context side m (default 160)."})
    exemplar_size: int | None = field(default=None, metadata={"help": "Exemplar side n (default 64)."})
    num_exemplars: int | None = field(default=None, metadata={"help": "Exemplars per image K (default 6)."})
    exemplar_scale: list[float] | None = field(default=None, metadata={"help": "Exemplar area fraction range.", "nargs": 2})
    exemplar_aspect_ratio: list[float] | None = field(default=None, metadata={"help": "h/w range (log-uniform).", "nargs": 2})
    exemplar_max_rotation: float | None = field(default=None, metadata={"help": "Max rotation in degrees (45)."})
    exemplar_augmentation: bool | None = field(default=None, metadata={"help": "Photometric exemplar transforms."})
    decoder_hidden_size: int | None = field(default=None, metadata={"help": "Decoder width (512)."})
    decoder_num_attention_heads: int | None = field(default=None, metadata={"help": "Decoder heads (16)."})
    decoder_num_layers: int | None = field(default=None, metadata={"help": "Decoder layers (1)."})
    loss_type: str | None = field(default=None, metadata={"help": "ce, balanced_ce, mse or focal."})
    momentum_start: float | None = field(default=None, metadata={"help": "EMA momentum at step 0 (0.99)."})
    momentum_end: float | None = field(default=None, metadata={"help": "EMA momentum at the last step (1.0)."})
    contrastive_loss_weight: float | None = field(default=None, metadata={"help": "Global contrastive loss weight (0)."})
    target_encoder_mode: str | None = field(default=None, metadata={"help": "ema (paper) or shared."})


@dataclass
class DataTrainingArguments(DataSourceArguments):
    """Where the images come from (the shared `DataSourceArguments`) and how they are prepared."""

    _argument_group_name = "data"

    shuffle_buffer_size: int = field(default=10_000, metadata={
        "help": "Shuffle buffer of a streamed dataset, per data reader (each worker of each process holds its own, of "
                "encoded images)."})
    view_scale: list[float] = field(default_factory=lambda: [0.5, 1.0], metadata={
        "help": "Random-resized-crop scale range of the search view (recipe: 0.5 1.0).", "nargs": 2})
    min_image_size: int = field(default=32, metadata={"help": "Images with a shorter side are skipped."})
    visualize_every_steps: int | None = field(default=None, metadata={
        "help": "Also write the correlation-map figure every N steps (correlation_maps_stepN.png, and to the --report_to "
                "trackers). Default: to the trackers about 10 times per run when --report_to names any, else only at "
                "the end; 0: only at the end."})
    num_visualize_images: int = field(default=4, metadata={"help": "Images in the correlation-map figure."})
    knn_eval_steps: int = field(default=0, metadata={
        "help": "Every N optimizer steps (and at the last), log knn_top1: the weighted k-NN top-1 accuracy of the "
                "online encoder's CLS / pooled feature, with labelled training images as the memory bank and the "
                "labelled validation split as queries (needs a label column, e.g. class sub-folders, and a validation "
                "split: --validation_dir / --validation_files / a dataset's). 0: off."})
    knn_max_train_samples: int = field(default=1000, metadata={"help": "k-NN monitor: memory-bank images."})
    knn_max_eval_samples: int = field(default=500, metadata={"help": "k-NN monitor: query images."})
    knn_k: int = field(default=20, metadata={"help": "k-NN monitor: neighbours (cosine, weights exp(sim / 0.07))."})


@dataclass
class CIMTrainingArguments(ResumableTrainingArguments):
    """`TrainingArguments` with the CIM recipe's defaults (AdamW betas (0.9, 0.95), wd 0.05, warm-up 40/300, cosine,
    no gradient clipping)."""

    _argument_group_name = "training (the CIM recipe's defaults)"

    base_learning_rate: float = field(default=1.5e-4, metadata={
        "help": "lr = base_learning_rate * total batch / 256 (ignored when --learning_rate is given)."})
    adam_beta2: float = field(default=0.95, metadata={"help": "AdamW beta2."})
    weight_decay: float = field(default=0.05, metadata={"help": "AdamW weight decay (none on norms/biases)."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "Learning-rate schedule."})
    warmup_steps: float = field(default=40 / 300, metadata={
        "help": "Linear warm-up: steps, or a fraction of the run when < 1 (default 40/300: the recipe's 40 of 300 epochs)."})
    max_grad_norm: float = field(default=0.0, metadata={
        "help": "Gradient clipping (0 = off). Off like the authors' runs: their script asks for 1.0, but their code "
                "clips only on an AMP path their fp32 runs never took."})
    logging_steps: float = field(default=10, metadata={"help": "Log loss, momentum and pretext IoU every N steps."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "Keep False: the collator needs its columns."})
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


def apply_overrides(config: CIMConfig, overrides: str | None) -> None:
    """Applies --config_overrides 'key=value,encoder.key=value' with `PretrainedConfig.update_from_string`, once for
    the CIM config and once for its encoder config (the `encoder.` keys); a value is read as the type of the field."""
    updates = {"cim": [], "encoder": []}
    for item in filter(None, (item.strip() for item in (overrides or "").split(","))):
        key, sep, value = (part.strip() for part in item.partition("="))
        if not sep:
            raise UserValueError(f"--config_overrides item {item!r} is not key=value.")
        updates["encoder" if key.startswith("encoder.") else "cim"].append((key.removeprefix("encoder."), value))
    for target, items in ((config, updates["cim"]), (config.encoder_config, updates["encoder"])):
        for key, _ in items:
            if not hasattr(target, key):
                raise UserValueError(f"--config_overrides: {type(target).__name__} has no field {key!r}.")
        try:
            if items:
                target.update_from_string(",".join(f"{key}={value}" for key, value in items))
        except (ValueError, TypeError) as err:
            raise UserValueError(f"--config_overrides: {type(target).__name__}: {err}") from None


CLI_CONFIG_FIELDS = tuple(f.name for f in fields(CIMArguments))  # each a CIMConfig field of the same name


def build_config(model_args: ModelArguments, cim_args: CIMArguments, quickstart: bool) -> CIMConfig:
    """The CIM config: preset / path / checkpoint, then CLI fields, then --config_overrides; validated."""
    if model_args.config_name and os.path.exists(model_args.config_name):
        config = CIMConfig.from_pretrained(model_args.config_name)
    elif model_args.config_name:
        try:
            config = CIMConfig.from_preset(model_args.config_name)
        except ValueError as err:
            raise UserValueError(f"--config_name: {err}") from None
    elif model_args.model_name_or_path and _is_cim_checkpoint(model_args.model_name_or_path):
        config = CIMConfig.from_pretrained(model_args.model_name_or_path)
    elif quickstart:
        config = CIMConfig.from_preset("vit-tiny-patch16", **QUICKSTART_CONFIG)
        for key, value in QUICKSTART_ENCODER.items():
            setattr(config.encoder_config, key, value)
    else:
        config = CIMConfig.from_preset("vit-base-patch16")
    for name in CLI_CONFIG_FIELDS:
        value = getattr(cim_args, name)
        if value is not None:
            setattr(config, name, value)
    apply_overrides(config, model_args.config_overrides)
    # rebuild so every value goes through the config's validation (clear error on a bad combination)
    try:
        return CIMConfig.from_dict(config.to_dict())
    except ValueError as err:
        raise UserValueError(f"Invalid CIM configuration: {err}") from None


def _is_cim_checkpoint(path: str) -> bool:
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        return False
    with open(config_file) as f:
        return json.load(f).get("model_type") == "cim"


def build_model(model_args: ModelArguments, config: CIMConfig) -> CIMForPreTraining:
    """A fresh CIM model, a CIM checkpoint, or a CIM model whose encoder starts from a ViT/ResNet checkpoint."""
    attn = model_args.attn_implementation
    if model_args.model_name_or_path is None:
        config._attn_implementation = attn
        return CIMForPreTraining(config)
    if not os.path.exists(model_args.model_name_or_path) and "/" not in model_args.model_name_or_path:
        raise UserPathError(f"--model_name_or_path {model_args.model_name_or_path!r} is neither a local "
                                "directory nor a Hub id.")
    if _is_cim_checkpoint(model_args.model_name_or_path):
        return CIMForPreTraining.from_pretrained(model_args.model_name_or_path, config=config, attn_implementation=attn)
    encoder_cls = transformers.ResNetModel if config.encoder_type == "resnet" else transformers.ViTModel
    encoder = encoder_cls.from_pretrained(model_args.model_name_or_path, cache_dir=model_args.cache_dir)
    config.encoder_config = encoder.config
    config = CIMConfig.from_dict(config.to_dict())
    config._attn_implementation = attn
    model = CIMForPreTraining(config)
    missing, _ = model.encoder.load_state_dict(encoder.state_dict(), strict=False)
    if missing:
        logger.warning("Encoder weights not found in %s: %s", model_args.model_name_or_path, missing)
    model.reset_target()
    return model


def load_split(data_args: DataTrainingArguments, model_args: ModelArguments, split: str):
    return data_args.load_split(split, cache_dir=model_args.cache_dir, token=model_args.token)


def preflight_images(raw_ds, image_column: str, min_size: int, count: int = PREFLIGHT_IMAGES) -> list:
    """Decodes the first images; raises a clear error before training when none is usable."""
    images, seen = [], 0
    source = raw_ds.cast_column(image_column, datasets.Image(decode=False)) if isinstance(
        (raw_ds.features or {}).get(image_column), datasets.Image) else raw_ds
    for row in source:
        seen += 1
        image = decode_image(row[image_column], min_size=min_size)
        if image is not None:
            images.append(image)
        if seen >= count:
            break
    if seen == 0:
        raise UserValueError("The training data is empty: no rows to pre-train on. Check the data source.")
    if not images:
        raise UserValueError(f"None of the first {seen} values of column {image_column!r} is a usable image (undecodable "
                         f"or shorter side < --min_image_size={min_size}). Check --image_column_name and the data, or "
                         "lower --min_image_size.")
    return images


def knn_datasets(data_args: DataTrainingArguments, model_args: ModelArguments, training_args: CIMTrainingArguments,
                 raw_train, image_column: str, eval_transform: ResizeCenterCrop) -> tuple:
    """The data of the --knn_eval_steps monitor: a memory bank of labelled training images and queries from the
    labelled validation split, both through the evaluation transform, the first --knn_max_*_samples of each
    (shuffled with --seed when not streamed)."""
    label_column = find_label_column(raw_train, None)
    if label_column is None:
        columns = list(raw_train.features or raw_train.column_names)
        raise UserValueError(f"--knn_eval_steps needs labelled images: no label column among {columns} (an image "
                             "folder gets one from its class sub-folders).")
    feature = (raw_train.features or {}).get(label_column)
    if not (isinstance(feature, datasets.ClassLabel) or (isinstance(feature, datasets.Value) and "int" in feature.dtype)):
        raise UserValueError(f"--knn_eval_steps needs class ids as labels; column {label_column!r} holds {feature}.")
    try:
        raw_eval = load_split(data_args, model_args, "validation")
    except UserValueError as err:
        raise UserValueError(f"--knn_eval_steps needs a labelled validation split (--validation_dir, "
                             f"--validation_files or a dataset with one): {err}") from None
    parts = []
    for raw, count in ((raw_train, data_args.knn_max_train_samples), (raw_eval, data_args.knn_max_eval_samples)):
        if label_column not in (raw.features or {label_column: None}):
            raise UserValueError(f"--knn_eval_steps: the validation split has no label column {label_column!r}.")
        raw = raw.take(count) if data_args.streaming else raw.shuffle(seed=training_args.seed).select(
            range(min(count, len(raw))))
        parts.append(prepare_dataset(raw, image_column, build_classification_transform(
            image_column, label_column, eval_transform, data_args.min_image_size)))
    return tuple(parts)


def preview_batch(images: list, config: CIMConfig, count: int) -> torch.Tensor:
    """Fixed, deterministic search views for the correlation-map figure."""
    transform = ResizeCenterCrop(config.image_size, crop_pct=1.0, mean=config.image_mean, std=config.image_std)
    return torch.stack([transform(image) for image in images[:count]])


def prepare_train_dataset(raw_ds, image_column: str, config: CIMConfig, data_args, training_args):
    """Streamed: a ResumableImageStream (this process's part, shuffled, resumable from a checkpoint); otherwise a
    SeededImageDataset (views seeded per row and epoch, so a resumed run gives the same crops)."""
    transform = RandomResizedCropFlip(size=config.image_size, scale=tuple(data_args.view_scale),
                                      mean=config.image_mean, std=config.image_std)
    if data_args.streaming:
        if data_args.max_train_samples:
            raw_ds = raw_ds.take(data_args.max_train_samples)
        return ResumableImageStream(raw_ds, image_column, transform, min_size=data_args.min_image_size,
                                    buffer_size=data_args.shuffle_buffer_size, seed=training_args.seed,
                                    rank=training_args.process_index, world_size=training_args.world_size)
    if data_args.max_train_samples:
        raw_ds = raw_ds.shuffle(seed=training_args.seed).select(range(min(data_args.max_train_samples, len(raw_ds))))
    return SeededImageDataset(raw_ds, image_column, transform, min_size=data_args.min_image_size,
                              seed=training_args.seed)


def choose_learning_rate(training_args: CIMTrainingArguments, explicit_lr: bool, quickstart: bool) -> str:
    """Sets the learning rate (given, the quick start's, or base x total batch / 256); returns the line saying so."""
    if quickstart and not explicit_lr:
        training_args.learning_rate = QUICKSTART_LEARNING_RATE
        return f"lr = {QUICKSTART_LEARNING_RATE:.4g} (the quick start's; --learning_rate sets it)"
    return set_learning_rate(training_args, training_args.base_learning_rate, explicit_lr)


def use_shards_per_rank(training_args: CIMTrainingArguments, num_shards: int) -> None:
    """Every process fetches its own batches from the stream (ResumableImageStream reads this process's whole shards
    when there are at least as many shards as processes, else every world_size-th record), never rank 0 reading
    and dispatching: that cannot carry the variable-size batches left when undecodable images are dropped."""
    fetch_batches_per_process(training_args)
    if training_args.world_size > 1 and num_shards < training_args.world_size:
        logger.warning("The stream has %d shard(s) for %d processes: every rank reads the whole stream and keeps "
                       "its share. Re-shard the data into more files so each rank reads only its own.", num_shards,
                       training_args.world_size)


def refuse_fsdp(training_args: CIMTrainingArguments) -> None:
    """FSDP is refused with a clear error: see the README's "Multi-GPU and multi-node" section."""
    if training_args.fsdp or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true"):
        raise UserValueError(
            "CIM pre-training does not support FSDP yet: the EMA update (target <- m*target + (1-m)*online) must "
            "run on matching shards of the online and target encoders, and that has not been built or tested "
            "under FSDP. Use DDP (plain `accelerate launch` or `torchrun`), which replicates both encoders."
        )


def main(argv: list[str] | None = None) -> dict:
    model_args, data_args, cim_args, training_args, explicit_lr = parse_arguments(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    transformers.utils.logging.set_verbosity_warning()
    refuse_fsdp(training_args)
    quickstart = uses_default_data(data_args)
    if quickstart and training_args.max_steps <= 0 and training_args.num_train_epochs == 3.0:
        training_args.max_steps = QUICKSTART_MAX_STEPS
    if data_args.streaming and training_args.max_steps <= 0:
        raise UserValueError("A streamed dataset has no length: pass --max_steps.")

    # data first: a wrong path or column fails here, before a model is built
    raw_train = load_split(data_args, model_args, "train")
    image_column = find_image_column(raw_train.features or raw_train.column_names, data_args.image_column_name)
    preflight = preflight_images(raw_train, image_column, data_args.min_image_size)
    config = build_config(model_args, cim_args, quickstart)
    train_ds = prepare_train_dataset(raw_train, image_column, config, data_args, training_args)
    eval_transform = ResizeCenterCrop(config.image_size, mean=config.image_mean, std=config.image_std)
    eval_ds = None
    if training_args.do_eval:
        raw_eval = load_split(data_args, model_args, "validation")
        if data_args.max_eval_samples:
            raw_eval = raw_eval.take(data_args.max_eval_samples) if data_args.streaming else raw_eval.select(
                range(min(data_args.max_eval_samples, len(raw_eval))))
        eval_ds = prepare_dataset(raw_eval, image_column,
                                  build_pretraining_transform(image_column, eval_transform, data_args.min_image_size))
    knn_sets = None
    if data_args.knn_eval_steps > 0:
        knn_sets = knn_datasets(data_args, model_args, training_args, raw_train, image_column, eval_transform)
    if data_args.streaming:
        use_shards_per_rank(training_args, train_ds.source.num_shards)
        training_args.dataloader_num_workers = check_num_workers(training_args.dataloader_num_workers,
                                                                 train_ds.num_shards)
    logger.info("Training %s on %s (image column %r)", config.encoder_type,
                data_args.dataset_name or data_args.train_dir or data_args.train_files or "the embedded photos",
                image_column)
    logger.info(choose_learning_rate(training_args, explicit_lr, quickstart))

    transformers.set_seed(training_args.seed)  # a fresh model's initial weights follow --seed (Trainer seeds later)
    model = build_model(model_args, config)
    if model_args.channels_last:
        if config.encoder_type != "resnet":
            raise UserValueError("--channels_last is for ResNet encoders; a ViT's only convolution is its patch "
                                 "embedding, which gains nothing from it.")
        model = model.to(memory_format=torch.channels_last)
    image_processor = eval_transform.image_processor()
    on_signal = SaveOnSignalCallback()
    trainer = CIMTrainer(model=model, args=training_args, train_dataset=train_ds, eval_dataset=eval_ds,
                         data_collator=SkippingCollator(), processing_class=image_processor, callbacks=[on_signal])
    trainer.add_callback(VisualizationCallback(preview_batch(preflight, config, data_args.num_visualize_images),
                                               every_steps=data_args.visualize_every_steps, trainer=trainer))
    knn = None
    if knn_sets is not None:  # k-NN top-1 every --knn_eval_steps, logged next to the loss
        knn = KNNCallback(*knn_sets, metric_key_prefix="knn", every_steps=data_args.knn_eval_steps, on_evaluate=False,
                          trainer=trainer, k=data_args.knn_k, batch_size=training_args.per_device_eval_batch_size)
        trainer.add_callback(knn)

    results: dict = {}
    train_result = trainer.train(resume_from_checkpoint=training_args.checkpoint_to_resume(model))
    if on_signal.received is not None:
        stop_after_signal(trainer, on_signal.received)
    trainer.save_model()
    results.update(train_result.metrics)
    results["skipped_images"] = trainer.total_skipped_images()  # distinct images, all processes
    if results["skipped_images"]:
        logger.warning("Skipped %d undecodable or too-small training images (each counted once; the first few are "
                       "named above with the reason).", results["skipped_images"])
    if knn is not None and knn.last_result is not None:
        results.update(knn.last_result)  # the k-NN top-1 after the last step
    if eval_ds is not None:
        results.update(trainer.evaluate())
    trainer.log_metrics("train", results)
    trainer.save_metrics("all", results)
    trainer.save_state()
    if trainer.is_world_process_zero():
        write_card(trainer, config, data_args, results, license=model_args.license or card_license(
            model_args.model_name_or_path if model_args.model_name_or_path and os.path.isdir(
                model_args.model_name_or_path) else None))
    if training_args.push_to_hub:
        trainer.push_to_hub(commit_message="CIM pre-training: checkpoint, correlation-map figure and model card")
    end_distributed(trainer)
    return results


def stop_after_signal(trainer: CIMTrainer, signum: int) -> None:
    """Ends the run after SaveOnSignalCallback saved a checkpoint: exit status 128 + signal, as if killed by it,
    without the final model, metrics or card of a finished run."""
    checkpoint = os.path.join(trainer.args.output_dir, f"checkpoint-{trainer.state.global_step}")
    logger.warning("Received %s: saved %s and stopped. Run the same command again to resume from it.",
                   signal.Signals(signum).name, checkpoint)
    end_distributed(trainer)
    raise SystemExit(128 + signum)


def end_distributed(trainer: CIMTrainer) -> None:
    """Waits for every rank, then tears the process group down explicitly: leaving it to interpreter exit lets
    gloo's threads be destroyed while still joinable, which aborts a rank ("terminate called without an active
    exception") after a run that otherwise succeeded."""
    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.end_training()


def final_pretext_metrics(trainer: CIMTrainer, results: dict) -> dict:
    metrics: dict = {}
    for entry in trainer.state.log_history:
        for key in ("loss", "correlation_loss", "prior_loss", "loss_to_prior", "pretext_iou", "prior_iou",
                    "pretext_iou_gain", "momentum", "eval_loss", "eval_correlation_loss", "eval_prior_loss",
                    "eval_loss_to_prior", "eval_pretext_iou", "eval_prior_iou", "eval_pretext_iou_gain", "knn_top1"):
            if key in entry:
                metrics[key] = entry[key]
    metrics["skipped_images"] = results.get("skipped_images", 0)
    return metrics


def write_card(trainer: CIMTrainer, config: CIMConfig, data_args: DataTrainingArguments, results: dict,
               license: str | None = None) -> None:
    figure = "correlation_maps.png" if os.path.exists(os.path.join(trainer.args.output_dir, "correlation_maps.png")) else None
    source = data_args.dataset_name or data_args.train_dir or ", ".join(data_args.train_files or []) \
        or "scikit-image sample photos (embedded default)"
    images = trainer.state.global_step * trainer.args.per_device_train_batch_size * \
        trainer.args.gradient_accumulation_steps * trainer.args.world_size
    card = build_model_card(config, dataset_name=source, max_steps=trainer.state.global_step, train_images=images,
                            final_metrics=final_pretext_metrics(trainer, results), figure=figure,
                            repo_id=trainer.args.hub_model_id, license=license)
    write_model_card(trainer.args.output_dir, card)


if __name__ == "__main__":
    exit_on_user_error(main)
