#!/usr/bin/env python
"""Semantic segmentation with UperNet over a CIM (or any ViT / ResNet) encoder; reports mean IoU.

The encoder comes from a CIM pre-training checkpoint (its online encoder), an exported encoder, any ViT / ResNet
checkpoint (local or a Hub id), or random init (``--encoder_config`` without ``--model_name_or_path``). A ViT
becomes BEiT's backbone with its FPN neck (a `BeitConfig` without BEiT's extras *is* a plain ViT), a ResNet a
`ResNetBackbone`; the result is a stock ``UperNetForSemanticSegmentation`` with its image processor, loadable with
``pipeline("image-segmentation", model=output_dir)`` and no custom code.

Data: a Hub dataset (``--dataset_name``, streamed or not), a local folder in the Hub's parquet layout, data files,
or folders with ``images/`` and ``masks/`` sub-folders (``--train_dir`` / ``--validation_dir`` / ``--test_dir``;
masks are single-channel index maps of the same file name). Class names come from ``--id2label FILE``, else the
dataset's ``id2label.json``.

Paper setup (ADE20K, UperNet, ViT-B/16, 512 px crops, 160k iterations, batch 16, AdamW lr 1e-4, layer decay 0.65,
drop path 0.1; ADE20K's 0 is "other", hence ``--reduce_labels``):

    python run_semantic_segmentation.py --model_name_or_path outputs/cim-vit-b --dataset_name scene_parse_150 \
        --id2label ade20k-id2label.json --reduce_labels --crop_size 512 --base_size 512 --max_steps 160000 \
        --per_device_train_batch_size 2 --gradient_accumulation_steps 8 --bf16 --output_dir outputs/cim-ade20k

Stages, as in transformers' example scripts: ``--do_train``, ``--do_eval`` (the validation split),
``--do_predict`` (the test split or ``--test_dir``: predicted masks as PNGs, and scores when it has masks); with
none of them given, the script trains and evaluates. User errors end in one line on stderr and exit status 2.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field
from typing import Any

import datasets
import transformers

from transformers_cim.configuration_cim import PRESET_NAMES
from transformers_cim.errors import UserValueError, exit_on_user_error
from transformers_cim.training.data.segmentation import (
    MaskRules,
    SegmentationCollator,
    SegmentationEvalTransform,
    SegmentationTrainTransform,
)
from transformers_cim.training.predictions import MaskWriter, write_predicted_masks
from transformers_cim.training.script_args import (
    DataSourceArguments,
    ResumableTrainingArguments,
    ScriptArgumentParser,
    choose_stages,
    parse_with_given,
)
from transformers_cim.training.segmentation import SegmentationTrainer, input_multiple, render_segmentation_examples
from transformers_cim.training.segmentation_data import (
    VALIDATION_SPLIT_NAMES,
    find_id2label,
    first_image_size,
    has_mask_column,
    load_split,
    prepare_rows,
    row_names,
    split_names,
    subset,
)
from transformers_cim.training.segmentation_recipe import (
    build_upernet,
    check_recipe,
    image_processor_for,
    image_statistics,
    processor_size,
    resolve_start_checkpoint,
    write_segmentation_card,
)
from transformers_cim.training.utils import fetch_batches_per_process

logger = logging.getLogger("run_semantic_segmentation")

FIGURE_FILE = "segmentation_examples.png"


@dataclass
class ModelArguments:
    """The encoder to start from and the UperNet around it."""

    _argument_group_name = "model"

    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "A CIM pre-training checkpoint, an exported encoder, a ViT/ResNet checkpoint or a trained UperNet "
            "(local or Hub id). Omit it for random init of --encoder_config."
        },
    )
    encoder_config: str | None = field(
        default=None,
        metadata={
            "help": f"Random init: a preset ({', '.join(PRESET_NAMES)}) or a checkpoint folder whose encoder "
            "architecture (config.json) is copied without its weights."
        },
    )
    patch_size: int | None = field(default=None, metadata={"help": "Random init: override the ViT patch size."})
    num_layers: int | None = field(default=None, metadata={"help": "Random init: override the ViT depth."})
    model_revision: str = field(default="main", metadata={"help": "Hub revision of --model_name_or_path."})
    decoder_hidden_size: int = field(
        default=512, metadata={"help": "UperNet head width (the paper's 512; use 128-256 on a CPU)."}
    )
    auxiliary_channels: int | None = field(
        default=None, metadata={"help": "Width of the auxiliary FCN head. Default: half of --decoder_hidden_size."}
    )
    auxiliary_loss_weight: float = field(default=0.4, metadata={"help": "Weight of the auxiliary head's loss."})
    out_indices: list[int] | None = field(
        default=None,
        metadata={
            "help": "ViT blocks (1-based) feeding the FPN, 4 of them. Default: 4, 6, 8, 12 of 12 and the same "
            "fractions "
            "of other depths."
        },
    )
    drop_path_rate: float = field(default=0.1, metadata={"help": "Stochastic depth in the ViT blocks."})
    layer_decay: float = field(
        default=0.65,
        metadata={
            "help": "Layer-wise lr decay: block i of L trains at lr x decay^(L+1-i), the neck and heads at lr (1 = "
            "off)."
        },
    )
    license: str | None = field(default=None, metadata={"help": "Licence for the card. Default: the base card's."})
    cache_dir: str | None = field(default=None, metadata={"help": "Where datasets and Hub models are cached."})
    token: str | None = field(default=None, metadata={"help": "Hub token for private datasets and models."})


@dataclass
class DataTrainingArguments(DataSourceArguments):
    """Where the (image, mask) pairs come from and how they are prepared."""

    _argument_group_name = "data"

    train_dir: str | None = field(
        default=None,
        metadata={
            "help": "A folder with images/ and masks/ sub-folders (labels/ or annotations/ also accepted), paired by "
            "file "
            "name without the extension; masks are single-channel index maps."
        },
    )
    validation_dir: str | None = field(default=None, metadata={"help": "Validation folder, laid out as --train_dir."})
    test_dir: str | None = field(
        default=None,
        metadata={
            "help": "--do_predict: a folder laid out as --train_dir (masks/ optional), instead of the test split."
        },
    )
    label_column_name: str | None = field(
        default=None,
        metadata={"help": "The mask column; auto-detected (label, mask, annotation, ... or the other Image column)."},
    )
    id2label: str | None = field(
        default=None,
        metadata={
            "help": "A JSON file {id: name} (or a list of names) of the classes after --reduce_labels. Default: the "
            "dataset's id2label.json."
        },
    )
    reduce_labels: bool = field(
        default=False,
        metadata={
            "help": "Mask value 0 means 'unlabelled': it becomes the ignore index and every other id is lowered by 1 "
            "(ADE20K)."
        },
    )
    ignore_index: int = field(default=255, metadata={"help": "Mask value left out of the loss and the scores."})
    crop_size: list[int] = field(
        default_factory=lambda: [512], metadata={"help": "Training crop: one size (square) or height width."}
    )
    base_size: int | None = field(
        default=None,
        metadata={
            "help": "Shorter side the images are rescaled to before the random scale, and at evaluation. Default: the "
            "crop's shorter side for training; evaluation at the images' own size."
        },
    )
    scale_range: list[float] = field(
        default_factory=lambda: [0.5, 2.0],
        metadata={"help": "Random rescale of the training images: factor range of base_size."},
    )
    hflip: bool = field(default=True, metadata={"help": "Random horizontal flips in training."})
    test_split_name: str = field(default="test", metadata={"help": "The split --do_predict uses."})
    shuffle_buffer_size: int = field(default=1_000, metadata={"help": "Shuffle buffer of a streamed dataset."})
    min_image_size: int = field(default=16, metadata={"help": "Images with a shorter side are skipped."})
    num_figure_images: int = field(
        default=4,
        metadata={
            "help": f"Validation images drawn in {FIGURE_FILE} (image, true mask, predicted mask); 0 = no figure."
        },
    )


@dataclass
class SegmentationTrainingArguments(ResumableTrainingArguments):
    """`TrainingArguments` with UperNet defaults (MAE's ADE20K recipe: AdamW lr 1e-4, wd 0.05, linear decay = poly
    power 1, 1% warm-up; the whole-image evaluation at each epoch)."""

    _argument_group_name = "training (UperNet recipe defaults)"

    learning_rate: float = field(default=1e-4, metadata={"help": "Peak AdamW learning rate (neck and heads)."})
    weight_decay: float = field(default=0.05, metadata={"help": "AdamW weight decay (none on norms/biases/tokens)."})
    lr_scheduler_type: str = field(default="linear", metadata={"help": "Learning-rate schedule (linear = poly 1)."})
    warmup_steps: float = field(default=0.01, metadata={"help": "Warm-up steps (>= 1) or fraction of training."})
    eval_strategy: str = field(default="epoch", metadata={"help": "When to evaluate (no, steps, epoch)."})
    save_strategy: str = field(default="epoch", metadata={"help": "When to save checkpoints."})
    save_total_limit: int | None = field(default=2, metadata={"help": "Checkpoints kept."})
    logging_steps: float = field(default=10, metadata={"help": "Log every N steps."})
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Keep False: the collator needs its columns."}
    )
    dataloader_drop_last: bool = field(
        default=True,
        metadata={
            "help": "Drop an epoch's last, incomplete batch (a batch of one image cannot train UperNet's BatchNorm)."
        },
    )
    output_dir: str | None = field(default="outputs/semantic-segmentation", metadata={"help": "Where to write."})

    def __post_init__(self):
        self.do_eval_as_given = self.do_eval  # TrainingArguments turns do_eval on whenever eval_strategy is not "no"
        super().__post_init__()


def parse_arguments(argv: list[str] | None = None):
    """The three argument dataclasses and the names of the arguments given explicitly (command line or ``.json``)."""
    parser = ScriptArgumentParser((ModelArguments, DataTrainingArguments, SegmentationTrainingArguments))
    (model_args, data_args, training_args), given = parse_with_given(parser, argv)
    return model_args, data_args, training_args, given


# ------------------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------------------


# ------------------------------------------------------------------------------------------------------------
# Model
# ------------------------------------------------------------------------------------------------------------


# ------------------------------------------------------------------------------------------------------------
# Prediction, figure, card
# ------------------------------------------------------------------------------------------------------------


# ------------------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------------------
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
    logger.setLevel(logging.INFO if training_args.should_log else log_level)
    datasets.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.set_verbosity(log_level)

    # stages, the recipe's checks, the checkpoint
    choose_stages(training_args, given)
    crop = check_recipe(model_args, data_args, training_args)
    path = resolve_start_checkpoint(model_args, training_args)
    transformers.set_seed(training_args.seed)

    # classes, mask rules and transforms
    id2label = find_id2label(data_args, model_args)
    rules = MaskRules(
        num_labels=len(id2label), ignore_index=data_args.ignore_index, reduce_labels=data_args.reduce_labels
    )
    mean, std = image_statistics(model_args, path)
    train_transform = SegmentationTrainTransform(
        crop,
        base_size=data_args.base_size,
        scale_range=tuple(data_args.scale_range),
        hflip=data_args.hflip,
        mean=mean,
        std=std,
        ignore_index=data_args.ignore_index,
    )
    eval_transform = SegmentationEvalTransform(data_args.base_size, mean=mean, std=std)
    logger.info(
        f"{len(id2label)} classes ({', '.join(list(id2label.values())[:12])}"
        f"{', ...' if len(id2label) > 12 else ''}); ignore index {data_args.ignore_index}; "
        f"reduce_labels {data_args.reduce_labels}; training view {train_transform}."
    )

    # data: the splits each stage needs, opened before any model is built
    splits = split_names(data_args, model_args)
    eval_split = next((s for s in VALIDATION_SPLIT_NAMES if s in splits), None)
    train_ds = eval_ds = eval_raw = test_raw = train_raw = None
    if training_args.do_train:
        train_raw = load_split(data_args, model_args, "train")
        if data_args.streaming:
            train_raw = train_raw.shuffle(seed=training_args.seed, buffer_size=data_args.shuffle_buffer_size)
        train_raw = subset(train_raw, data_args.max_train_samples, data_args.streaming, training_args.seed)
        train_ds = prepare_rows(train_raw, data_args, train_transform, rules, training_args.seed, split="train")
    if training_args.do_eval:
        if eval_split is None:
            logger.warning(f"No validation split (the source has {splits}): --do_eval is ignored.")
            training_args.do_eval, training_args.eval_strategy = False, transformers.IntervalStrategy.NO
        else:
            eval_raw = subset(
                load_split(data_args, model_args, eval_split),
                data_args.max_eval_samples,
                data_args.streaming,
                training_args.seed,
            )
            eval_ds = prepare_rows(eval_raw, data_args, eval_transform, rules, training_args.seed, split=eval_split)
    if training_args.do_predict:  # opened now: a missing test split fails before training
        if not data_args.test_dir and data_args.test_split_name not in splits:
            raise UserValueError(
                f"--do_predict: no {data_args.test_split_name!r} split in {splits}; give --test_dir "
                "or --test_split_name."
            )
        test_raw = load_split(data_args, model_args, "test" if data_args.test_dir else data_args.test_split_name)
    if data_args.streaming and train_ds is not None:
        fetch_batches_per_process(training_args)
    if (
        train_ds is not None
        and not data_args.streaming
        and training_args.dataloader_drop_last
        and len(train_ds) < training_args.per_device_train_batch_size * training_args.world_size
    ):
        raise UserValueError(
            f"The training set has {len(train_ds)} images, fewer than one batch "
            f"({training_args.per_device_train_batch_size} per device): lower "
            "--per_device_train_batch_size (incomplete batches are dropped)."
        )

    # model and its image processor
    model = build_upernet(model_args, path, id2label, crop, data_args.ignore_index)
    size_source = next((raw for raw in (eval_raw, test_raw, train_raw) if raw is not None), None)
    size = processor_size(
        first_image_size(size_source, data_args) if size_source is not None else None,
        data_args.base_size,
        crop,
        input_multiple(model),
    )
    image_processor = image_processor_for(size, mean, std, data_args.reduce_labels)

    # Trainer
    trainer = SegmentationTrainer(
        model=model,
        args=training_args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        data_collator=SegmentationCollator(),
        processing_class=image_processor,
        layer_decay=model_args.layer_decay,
        ignore_index=data_args.ignore_index,
        num_examples=data_args.num_figure_images,
    )

    # train
    results: dict[str, Any] = {}
    if training_args.do_train:
        train_result = trainer.train(resume_from_checkpoint=training_args.checkpoint_to_resume(model))
        train_metrics = dict(train_result.metrics)
        train_metrics["skipped_images"] = trainer.total_skipped_images()
        trainer.log_metrics("train", train_metrics)
        trainer.save_metrics("train", train_metrics)
        trainer.save_state()
        results.update(train_metrics)

    # evaluate, with the figure of examples
    figure = None
    if training_args.do_eval:
        eval_metrics = trainer.evaluate()
        trainer.log_metrics("eval", eval_metrics)
        trainer.save_metrics("eval", eval_metrics)
        results.update(eval_metrics)
        if trainer.last_examples and trainer.is_world_process_zero():
            os.makedirs(training_args.output_dir, exist_ok=True)
            render_segmentation_examples(
                trainer.last_examples, list(id2label.values()), mean, std, data_args.ignore_index
            ).save(os.path.join(training_args.output_dir, FIGURE_FILE))
            figure = FIGURE_FILE

    # predict: scored and saved when the test split has masks, else only saved
    final = trainer.accelerator.unwrap_model(model)
    if training_args.do_predict:
        writer = MaskWriter(os.path.join(training_args.output_dir, "predictions"), row_names(test_raw, data_args))
        if has_mask_column(test_raw, data_args):  # scored and saved in one pass
            test_ds = prepare_rows(test_raw, data_args, eval_transform, rules, training_args.seed, split="test")
            test_metrics = trainer.evaluate(test_ds, metric_key_prefix="test", on_prediction=writer)
            trainer.log_metrics("test", test_metrics)
            trainer.save_metrics("test", test_metrics)
            results.update(test_metrics)
        elif trainer.is_world_process_zero():
            write_predicted_masks(final, test_raw, data_args, eval_transform, writer)
        logger.info(f"Wrote {writer.count} predicted masks (PNG index maps) to {writer.folder}.")

    # save, card
    if training_args.do_train:
        final.config.architectures = [type(final).__name__]
        trainer.save_model()  # model + image processor (processing_class)
        if trainer.is_world_process_zero():
            write_segmentation_card(trainer, model_args, data_args, results, id2label, crop, path, eval_split, figure)
        logger.info(f"Saved the UperNet and its image processor to {training_args.output_dir}.")
    # push
    if training_args.push_to_hub and training_args.do_train:
        trainer.push_to_hub(commit_message="UperNet semantic segmentation, image processor and model card")
    return results


if __name__ == "__main__":
    exit_on_user_error(main)
