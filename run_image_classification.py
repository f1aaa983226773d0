#!/usr/bin/env python
"""Fine-tune or linear-probe a CIM (or any ViT / ResNet) checkpoint for image classification; report top-1/top-5.

The model can be a CIM pre-training checkpoint (its online encoder is used, or its EMA target encoder with
``--use_ema_encoder``), an encoder exported with ``cim-export-encoder``, or any ViT / ResNet checkpoint, as a local
directory or a Hub model id. The result is a stock checkpoint with its image processor (which computes the evaluation
transform), loadable with no custom code: for a ViT fine-tuned with the CIM authors' head (``--pooling mean``, the
default: mean of the patch tokens + LayerNorm, drop-path) a ``BeitForImageClassification`` that is exactly the ViT
(see ``transformers_cim.transfer``); with ``--pooling cls`` or for a linear probe a ``ViTForImageClassification``; for
a ResNet a ``ResNetForImageClassification``.

Quick start (offline; the scikit-image sample photos when no dataset is given):

    python run_image_classification.py --model_name_or_path outputs/cim-quickstart --image_size 128 \
        --output_dir outputs/cim-quickstart-ft

The authors' recipe (the defaults; ViT-B/16, ImageNet-1K, 100 epochs): mean pooling + LayerNorm, base lr 1.2e-3 x
batch / 256, layer decay 0.8, drop-path 0.1, random erasing 0.25, Mixup 0.8, CutMix 1.0, label smoothing 0.1:

    python run_image_classification.py --model_name_or_path outputs/cim-vit-b --dataset_name ILSVRC/imagenet-1k \
        --per_device_train_batch_size 128 --num_train_epochs 100 --bf16 --output_dir outputs/cim-vit-b-ft

Linear probing (frozen encoder, BatchNorm + linear head on the CLS feature): add ``--linear_probe``.
Stages, as in transformers' example scripts: ``--do_train``, ``--do_eval`` (alone: score a fine-tuned classifier as
it is), ``--do_predict`` (``predictions.csv``: row, label, score for ``--test_dir`` / ``--test_files`` or a dataset's
test split); with none of them given, the script trains and evaluates.
Arguments may also come from one ``.json`` file: ``python run_image_classification.py args.json``.
User errors (a missing path, a bad value, an empty dataset, a checkpoint of the wrong kind) end in one line on stderr
and exit status 2.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field
from typing import Any

import datasets
import transformers

from transformers_cim.checkpoint_loading import resolve_checkpoint_path
from transformers_cim.errors import UserValueError, exit_on_user_error
from transformers_cim.training.classification_data import build_datasets, load_split
from transformers_cim.training.classification_metrics import classification_metric_functions
from transformers_cim.training.classification_recipe import (
    apply_recipe_defaults,
    checkpoint_encoder_type,
    image_statistics,
    load_classifier,
    trained_class_names,
    write_classification_card,
)
from transformers_cim.training.classification_trainer import ClassificationTrainer
from transformers_cim.training.data import (
    RandomResizedCropFlip,
    ResizeCenterCrop,
    SkippingCollator,
    build_pretraining_transform,
    check_num_workers,
    count_shards,
    find_image_column,
    prepare_dataset,
)
from transformers_cim.training.predictions import write_predictions
from transformers_cim.training.script_args import (
    DataSourceArguments,
    ResumableTrainingArguments,
    ScriptArgumentParser,
    choose_stages,
    parse_with_given,
    set_learning_rate,
)
from transformers_cim.training.utils import fetch_batches_per_process

logger = logging.getLogger("run_image_classification")


@dataclass
class ModelArguments:
    """The checkpoint to start from and the fine-tuning recipe."""

    _argument_group_name = "model and fine-tuning recipe"

    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Required. A CIM pre-training checkpoint, an exported encoder or a ViT/ResNet checkpoint: a local "
            "directory or a Hub model id (downloaded, or from the Hub cache when HF_HUB_OFFLINE=1)."
        },
    )
    model_revision: str = field(
        default="main",
        metadata={
            "help": "The Hub revision (branch, tag or commit) of --model_name_or_path and --image_processor_name."
        },
    )
    image_processor_name: str | None = field(
        default=None,
        metadata={
            "help": "An image processor (local folder or Hub id) whose mean / std normalise the images instead of the "
            "checkpoint's; resizing stays --image_size with the bicubic resize + centre crop of the saved processor."
        },
    )
    ignore_mismatched_sizes: bool = field(
        default=False,
        metadata={
            "help": "Re-initialise encoder weights whose shapes do not fit the checkpoint's config instead of "
            "stopping. "
            "The classification head is always new when the label count differs."
        },
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={
            "help": "Allow custom code from the Hub for --image_processor_name. (The model is always a stock ViT / "
            "ResNet "
            "loaded without custom code, and datasets runs no dataset scripts.)"
        },
    )
    license: str | None = field(
        default=None,
        metadata={
            "help": "Licence stated in the model card (a Hub licence id, e.g. apache-2.0, mit, cc-by-nc-4.0). "
            "Default: "
            "the base checkpoint card's licence, else none stated."
        },
    )
    image_size: int = field(
        default=224,
        metadata={
            "help": "Training / evaluation resolution. For ViT, the position embeddings are interpolated (bicubic) "
            "when it differs from the checkpoint's."
        },
    )
    pooling: str | None = field(
        default=None,
        metadata={
            "help": "ViT fine-tuning head: 'mean' (mean of the patch tokens + a new LayerNorm, the CIM authors' "
            "default; "
            "saved as a stock BeitForImageClassification that computes exactly the ViT) or 'cls' (the CLS token "
            "after the final LayerNorm; a ViTForImageClassification). Default: mean, or cls for --linear_probe.",
            "choices": ["mean", "cls"],
        },
    )
    drop_path_rate: float | None = field(
        default=None,
        metadata={
            "help": "Stochastic depth of the ViT blocks (needs --pooling mean: ViTForImageClassification has none). "
            "Default: 0.1 (the authors' recipe) with mean pooling, else 0."
        },
    )
    random_erasing: float | None = field(
        default=None,
        metadata={
            "help": "Probability of random erasing (one rectangle of per-pixel noise) of a training view. Default: "
            "0.25 "
            "for fine-tuning (the authors' recipe), 0 for linear probing."
        },
    )
    use_ema_encoder: bool = field(
        default=False,
        metadata={
            "help": "Fine-tune the EMA target encoder of a CIM pre-training checkpoint instead of its online encoder "
            "(the authors' --use_ema option)."
        },
    )
    linear_probe: bool = field(
        default=False,
        metadata={
            "help": "Freeze the encoder; train BatchNorm1d(affine=False) + Linear on the CLS (ViT) / pooled (ResNet) "
            "feature (MAE's linear probing). The saved model folds the probe into a stock classifier."
        },
    )
    layer_decay: float | None = field(
        default=None,
        metadata={
            "help": "Layer-wise lr decay (1.0 = off). Default: 0.8 for ViT fine-tuning (the CIM authors' recipe; "
            "MAE's "
            "ViT-B recipe uses 0.65), else 1.0."
        },
    )
    mixup: float | None = field(
        default=None, metadata={"help": "Mixup alpha (0 = off). Default: 0.8 for fine-tuning, 0 for linear probing."}
    )
    cutmix: float | None = field(
        default=None, metadata={"help": "CutMix alpha (0 = off). Default: 1.0 for fine-tuning, 0 for linear probing."}
    )
    label_smoothing: float | None = field(
        default=None,
        metadata={"help": "Deprecated alias of --label_smoothing_factor (the Trainer's flag), with a warning."},
    )
    attn_implementation: str | None = field(
        default="sdpa", metadata={"help": "ViT attention: eager, sdpa or flash_attention_2."}
    )
    cache_dir: str | None = field(default=None, metadata={"help": "Where datasets and Hub models are cached."})
    token: str | None = field(default=None, metadata={"help": "Hub token for private datasets and models."})


@dataclass
class DataTrainingArguments(DataSourceArguments):
    """Where the labelled images come from (the shared `DataSourceArguments`: one source; none = the scikit-image
    sample photos) and how they are prepared."""

    _argument_group_name = "data"

    test_dir: str | None = field(
        default=None,
        metadata={
            "help": "A folder of images to predict with --do_predict (no labels needed). Default: a dataset's test "
            "split."
        },
    )
    test_files: list[str] | None = field(default=None, metadata={"help": "Data files to predict with --do_predict."})
    label_column_name: str | None = field(default=None, metadata={"help": "Label column; auto-detected if unset."})
    train_val_split: float | None = field(
        default=0.15,
        metadata={
            "help": "Fraction of the training set held out for validation when there is no validation split "
            "(0 = no evaluation)."
        },
    )
    shuffle_buffer_size: int = field(default=10_000, metadata={"help": "Shuffle buffer of a streamed dataset."})
    crop_min_scale: float = field(default=0.08, metadata={"help": "Smallest area fraction of the training crop."})
    crop_pct: float | None = field(
        default=None,
        metadata={
            "help": "Evaluation: resize to image_size/crop_pct, center-crop. Default: the CIM authors' 0.95 up to "
            "224 px, "
            "1.0 above (MAE's is 0.875)."
        },
    )
    min_image_size: int = field(default=16, metadata={"help": "Images with a shorter side are skipped."})
    hub_metrics: bool = field(
        default=False,
        metadata={
            "help": "Score top-1 with the Hub's evaluate-metric/accuracy (needs a connection) instead of this "
            "package's "
            "offline copy; the two give the same number."
        },
    )


@dataclass
class ClassificationTrainingArguments(ResumableTrainingArguments):
    """`TrainingArguments` with fine-tuning defaults (AdamW, wd 0.05, cosine with 5% warm-up, per-epoch eval)."""

    _argument_group_name = "training (the fine-tuning recipe's defaults)"

    base_learning_rate: float | None = field(
        default=None,
        metadata={
            "help": "lr = base_learning_rate * total batch / 256 unless --learning_rate is given. Default: 1.2e-3 "
            "(ViT fine-tuning, the CIM authors' recipe), 5e-4 (ResNet fine-tuning) or 1e-3 (linear probing)."
        },
    )
    label_smoothing_factor: float | None = field(
        default=None,
        metadata={
            "help": "Label smoothing (training only; with Mixup / CutMix, of the mixed targets). Default: 0.1 for "
            "fine-tuning, 0 for linear probing."
        },
    )
    weight_decay: float = field(default=0.05, metadata={"help": "AdamW weight decay (none on norms/biases/tokens)."})
    adam_beta2: float = field(default=0.999, metadata={"help": "AdamW beta2."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "Learning-rate schedule."})
    warmup_steps: float = field(default=0.05, metadata={"help": "Warm-up steps (>= 1) or fraction of training (< 1)."})
    eval_strategy: str = field(default="epoch", metadata={"help": "When to evaluate (no, steps, epoch)."})
    save_strategy: str = field(default="epoch", metadata={"help": "When to save checkpoints."})
    save_total_limit: int | None = field(default=2, metadata={"help": "Checkpoints kept."})
    logging_steps: float = field(default=10, metadata={"help": "Log every N steps."})
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Keep False: the collator needs its columns."}
    )
    output_dir: str | None = field(default="outputs/image-classification", metadata={"help": "Where to write."})

    def __post_init__(self):
        self.do_eval_as_given = self.do_eval  # TrainingArguments turns do_eval on whenever eval_strategy is not "no"
        super().__post_init__()


def parse_arguments(argv: list[str] | None = None):
    """The three argument dataclasses and the names of the arguments given explicitly (command line or ``.json``)."""
    parser = ScriptArgumentParser((ModelArguments, DataTrainingArguments, ClassificationTrainingArguments))
    (model_args, data_args, training_args), given = parse_with_given(parser, argv)
    return model_args, data_args, training_args, given


def main(argv: list[str] | None = None) -> dict[str, Any]:
    # parse
    model_args, data_args, training_args, given = parse_arguments(argv)
    # logging
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%m/%d/%Y %H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    log_level = training_args.get_process_log_level()
    logger.setLevel(logging.INFO if training_args.should_log else log_level)  # this script's lines on the main process
    datasets.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.set_verbosity(log_level)

    # stages and the checkpoint: what it is decides the recipe and whether its head is trained
    if choose_stages(training_args, given):
        logger.info("No --do_train / --do_eval / --do_predict given: training and evaluating (--do_train --do_eval).")
    path = resolve_checkpoint_path(
        model_args.model_name_or_path,
        cache_dir=model_args.cache_dir,
        token=model_args.token,
        revision=model_args.model_revision,
    )
    encoder_type, fine_tuned_beit = checkpoint_encoder_type(path, model_args, training_args)
    apply_recipe_defaults(model_args, training_args, encoder_type)
    if data_args.streaming and training_args.max_steps <= 0 and training_args.do_train:
        raise UserValueError("--streaming needs --max_steps (a streamed dataset has no length).")
    class_names = None if training_args.do_train else trained_class_names(path, model_args)

    # learning rate and seed
    base = training_args.base_learning_rate
    if base is None:
        base = 1e-3 if model_args.linear_probe else (1.2e-3 if encoder_type == "vit" else 5e-4)
    if training_args.do_train:
        logger.info(set_learning_rate(training_args, base, "learning_rate" in given))
        logger.info(
            f"Layer decay {model_args.layer_decay}, mixup {model_args.mixup}, cutmix {model_args.cutmix}, "
            f"label smoothing {training_args.label_smoothing_factor}, random erasing "
            f"{model_args.random_erasing}, pooling {model_args.pooling}, drop-path {model_args.drop_path_rate}, "
            f"linear probe {model_args.linear_probe}."
        )
    transformers.set_seed(training_args.seed)

    # transforms
    if data_args.crop_pct is None:
        data_args.crop_pct = 0.95 if model_args.image_size <= 224 else 1.0
    mean, std = image_statistics(model_args, path)
    train_transform = RandomResizedCropFlip(
        size=model_args.image_size,
        scale=(data_args.crop_min_scale, 1.0),
        hflip=True,
        mean=mean,
        std=std,
        random_erasing=model_args.random_erasing,
    )
    eval_transform = ResizeCenterCrop(size=model_args.image_size, crop_pct=data_args.crop_pct, mean=mean, std=std)
    # data
    train_ds, eval_ds, names, _, _, eval_split = build_datasets(
        data_args, model_args, training_args, train_transform, eval_transform, class_names
    )
    test_ds = None
    if training_args.do_predict:  # opened now: a missing test split fails before training
        test_raw = load_split(data_args, model_args, "test")
        test_column = find_image_column(test_raw, data_args.image_column_name)
        test_ds = prepare_dataset(
            test_raw, test_column, build_pretraining_transform(test_column, eval_transform, data_args.min_image_size)
        )
    if not training_args.do_train:
        train_ds = None
    if data_args.streaming and train_ds is not None:
        # each process reads its own stream batches (see fetch_batches_per_process); workers must divide the shards
        fetch_batches_per_process(training_args)
        shards = max(1, count_shards(train_ds) // max(1, training_args.world_size))
        training_args.dataloader_num_workers = check_num_workers(training_args.dataloader_num_workers, shards)
    id2label = dict(enumerate(names))
    if eval_ds is None and training_args.do_eval:
        logger.warning("No evaluation set (no validation split and --train_val_split 0): --do_eval is ignored.")
        training_args.do_eval = False
        training_args.eval_strategy = transformers.IntervalStrategy.NO
    if not training_args.do_eval:
        eval_ds = None

    # model: the authors' mean-pool BEiT head, or a stock ViT / ResNet classifier, or a linear probe
    model = load_classifier(path, model_args, training_args, encoder_type, fine_tuned_beit, id2label)
    image_processor = eval_transform.image_processor()  # pipeline() users get the evaluated pixels

    # Trainer
    preprocess_logits, compute_metrics = classification_metric_functions(len(names), data_args.hub_metrics)
    trainer = ClassificationTrainer(
        model=model,
        args=training_args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        data_collator=SkippingCollator(),
        processing_class=image_processor,
        compute_metrics=compute_metrics,
        preprocess_logits_for_metrics=preprocess_logits,
        layer_decay=model_args.layer_decay,
        mixup_alpha=model_args.mixup,
        cutmix_alpha=model_args.cutmix,
        mix_seed=training_args.seed,
    )

    # train
    results: dict[str, Any] = {}
    if training_args.do_train:
        train_result = trainer.train(resume_from_checkpoint=training_args.checkpoint_to_resume(model))
        train_metrics = dict(train_result.metrics)
        train_metrics["skipped_images"] = trainer.total_skipped_images()  # distinct images, all processes
        trainer.log_metrics("train", train_metrics)
        trainer.save_metrics("train", train_metrics)
        trainer.save_state()
        results.update(train_metrics)

    # evaluate
    if training_args.do_eval:
        eval_metrics = trainer.evaluate()
        trainer.log_metrics("eval", eval_metrics)
        trainer.save_metrics("eval", eval_metrics)
        results.update(eval_metrics)

    # save the stock classifier and its card
    final = trainer.accelerator.unwrap_model(model)
    if model_args.linear_probe:
        # fold BatchNorm + Linear into the stock classifier: the saved model is a plain ViT/ResNet classifier
        final = model.to_classification_model()
    if training_args.do_train:
        final.config.architectures = [type(final).__name__]
        if model_args.linear_probe:
            if trainer.is_world_process_zero():
                final.save_pretrained(training_args.output_dir)
                image_processor.save_pretrained(training_args.output_dir)
        else:
            trainer.save_model()  # model + image processor (processing_class)
        write_classification_card(
            trainer, model_args, data_args, path, len(names), eval_split if training_args.do_eval else None, results
        )
        logger.info(f"Saved the {type(final).__name__} and its image processor to {training_args.output_dir}.")

    # predict
    if training_args.do_predict and trainer.is_world_process_zero():
        os.makedirs(training_args.output_dir, exist_ok=True)
        predictions = os.path.join(training_args.output_dir, "predictions.csv")
        count = write_predictions(final, test_ds, names, training_args, predictions)
        logger.info(f"Wrote {count} predictions (row, label, score) to {predictions}.")
        results["predictions_file"] = predictions
    # push
    if training_args.push_to_hub and training_args.do_train:
        trainer.push_to_hub(commit_message="Fine-tuned classifier, image processor and model card")
    return results


if __name__ == "__main__":
    exit_on_user_error(main)
