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

import collections
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from typing import Any

import datasets
import numpy as np
import PIL.Image
import torch
import transformers
from transformers import BeitImageProcessorPil, PreTrainedConfig, UperNetForSemanticSegmentation

from transformers_cim.checkpoint_loading import checkpoint_kind, encoder_config_from_checkpoint, image_stats_from_checkpoint, resolve_checkpoint_path
from transformers_cim.configuration_cim import PRESET_NAMES, preset_encoder_config
from transformers_cim.training.data import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    available_splits,
    decode_image,
    decode_image_with_reason,
    find_image_column,
    image_name,
    without_image_decoding,
)
from transformers_cim.training.data.segmentation import (
    MaskRules,
    SeededSegmentationDataset,
    SegmentationCollator,
    SegmentationEvalTransform,
    SegmentationTrainTransform,
    find_mask_column,
    mask_to_image,
    prepare_segmentation_stream,
    segmentation_folder_dataset,
    shorter_side_size,
)
from transformers_cim.errors import UserPathError, UserValueError, exit_on_user_error
from transformers_cim.training.modelcard import build_segmentation_card, card_license, write_model_card
from transformers_cim.training.script_args import (
    DataSourceArguments,
    ResumableTrainingArguments,
    ScriptArgumentParser,
    choose_stages,
    parse_with_given,
)
from transformers_cim.training.segmentation import SegmentationTrainer, input_multiple, predict_logits, \
    render_segmentation_examples
from transformers_cim.training.utils import fetch_batches_per_process
from transformers_cim.transfer import upernet_for_semantic_segmentation

logger = logging.getLogger("run_semantic_segmentation")

VALIDATION_SPLIT_NAMES = ("validation", "valid", "val")
FIGURE_FILE = "segmentation_examples.png"


@dataclass
class ModelArguments:
    """The encoder to start from and the UperNet around it."""

    _argument_group_name = "model"

    model_name_or_path: str | None = field(default=None, metadata={
        "help": "A CIM pre-training checkpoint, an exported encoder, a ViT/ResNet checkpoint or a trained UperNet "
                "(local or Hub id). Omit it for random init of --encoder_config."})
    encoder_config: str | None = field(default=None, metadata={
        "help": f"Random init: a preset ({', '.join(PRESET_NAMES)}) or a checkpoint folder whose encoder "
                "architecture (config.json) is copied without its weights."})
    patch_size: int | None = field(default=None, metadata={"help": "Random init: override the ViT patch size."})
    num_layers: int | None = field(default=None, metadata={"help": "Random init: override the ViT depth."})
    model_revision: str = field(default="main", metadata={"help": "Hub revision of --model_name_or_path."})
    decoder_hidden_size: int = field(default=512, metadata={
        "help": "UperNet head width (the paper's 512; use 128-256 on a CPU)."})
    auxiliary_channels: int | None = field(default=None, metadata={
        "help": "Width of the auxiliary FCN head. Default: half of --decoder_hidden_size."})
    auxiliary_loss_weight: float = field(default=0.4, metadata={"help": "Weight of the auxiliary head's loss."})
    out_indices: list[int] | None = field(default=None, metadata={
        "help": "ViT blocks (1-based) feeding the FPN, 4 of them. Default: 4, 6, 8, 12 of 12 and the same fractions "
                "of other depths."})
    drop_path_rate: float = field(default=0.1, metadata={"help": "Stochastic depth in the ViT blocks."})
    layer_decay: float = field(default=0.65, metadata={
        "help": "Layer-wise lr decay: block i of L trains at lr x decay^(L+1-i), the neck and heads at lr (1 = off)."})
    license: str | None = field(default=None, metadata={"help": "Licence for the card. Default: the base card's."})
    cache_dir: str | None = field(default=None, metadata={"help": "Where datasets and Hub models are cached."})
    token: str | None = field(default=None, metadata={"help": "Hub token for private datasets and models."})


@dataclass
class DataTrainingArguments(DataSourceArguments):
    """Where the (image, mask) pairs come from and how they are prepared."""

    _argument_group_name = "data"

    train_dir: str | None = field(default=None, metadata={
        "help": "A folder with images/ and masks/ sub-folders (labels/ or annotations/ also accepted), paired by file "
                "name without the extension; masks are single-channel index maps."})
    validation_dir: str | None = field(default=None, metadata={"help": "Validation folder, laid out as --train_dir."})
    test_dir: str | None = field(default=None, metadata={
        "help": "--do_predict: a folder laid out as --train_dir (masks/ optional), instead of the test split."})
    label_column_name: str | None = field(default=None, metadata={
        "help": "The mask column; auto-detected (label, mask, annotation, ... or the other Image column)."})
    id2label: str | None = field(default=None, metadata={
        "help": "A JSON file {id: name} (or a list of names) of the classes after --reduce_labels. Default: the "
                "dataset's id2label.json."})
    reduce_labels: bool = field(default=False, metadata={
        "help": "Mask value 0 means 'unlabelled': it becomes the ignore index and every other id is lowered by 1 "
                "(ADE20K)."})
    ignore_index: int = field(default=255, metadata={"help": "Mask value left out of the loss and the scores."})
    crop_size: list[int] = field(default_factory=lambda: [512], metadata={
        "help": "Training crop: one size (square) or height width."})
    base_size: int | None = field(default=None, metadata={
        "help": "Shorter side the images are rescaled to before the random scale, and at evaluation. Default: the "
                "crop's shorter side for training; evaluation at the images' own size."})
    scale_range: list[float] = field(default_factory=lambda: [0.5, 2.0], metadata={
        "help": "Random rescale of the training images: factor range of base_size."})
    hflip: bool = field(default=True, metadata={"help": "Random horizontal flips in training."})
    test_split_name: str = field(default="test", metadata={"help": "The split --do_predict uses."})
    shuffle_buffer_size: int = field(default=1_000, metadata={"help": "Shuffle buffer of a streamed dataset."})
    min_image_size: int = field(default=16, metadata={"help": "Images with a shorter side are skipped."})
    num_figure_images: int = field(default=4, metadata={
        "help": f"Validation images drawn in {FIGURE_FILE} (image, true mask, predicted mask); 0 = no figure."})


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
    remove_unused_columns: bool = field(default=False, metadata={"help": "Keep False: the collator needs its columns."})
    dataloader_drop_last: bool = field(default=True, metadata={
        "help": "Drop an epoch's last, incomplete batch (a batch of one image cannot train UperNet's BatchNorm)."})
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
def has_folders(data_args: DataTrainingArguments) -> bool:
    return bool(data_args.train_dir or data_args.validation_dir or data_args.test_dir)


def load_split(data_args: DataTrainingArguments, model_args: ModelArguments, split: str):
    """One split: image/mask folders (``train`` / ``validation`` / ``test`` from the three --*_dir), else the
    dataset or files through the package's loader."""
    if has_folders(data_args):
        if data_args.dataset_name or data_args.train_files or data_args.validation_files:
            raise UserValueError("Give one data source: --dataset_name, --train_files/--validation_files, or "
                                 "--train_dir/--validation_dir/--test_dir.")
        directory = {"train": data_args.train_dir, "validation": data_args.validation_dir,
                     "test": data_args.test_dir}.get(split)
        if directory is None:
            raise UserValueError(f"No --{split}_dir given for the {split} images.")
        ds = segmentation_folder_dataset(directory, f"{split}_dir", require_masks=split != "test")
        return ds.to_iterable_dataset() if data_args.streaming else ds
    if not (data_args.dataset_name or data_args.train_files or data_args.validation_files):
        raise UserValueError("No data: give --dataset_name (Hub id or local folder), --train_files, or --train_dir "
                             "(a folder with images/ and masks/).")
    return data_args.load_split(split, cache_dir=model_args.cache_dir, token=model_args.token)


def split_names(data_args: DataTrainingArguments, model_args: ModelArguments) -> list[str]:
    """The splits the source has."""
    if has_folders(data_args):
        return [s for s, d in (("train", data_args.train_dir), ("validation", data_args.validation_dir),
                               ("test", data_args.test_dir)) if d]
    if data_args.train_files or data_args.validation_files:
        return ["train"] + (["validation"] if data_args.validation_files else [])
    builder = datasets.load_dataset_builder(data_args.dataset_name, data_args.dataset_config_name,
                                            cache_dir=model_args.cache_dir, token=model_args.token)
    return available_splits(builder)


def read_id2label_file(path: str) -> dict[int, str]:
    """``{id: name}`` from a JSON object ``{"0": "sky", ...}`` or a list of names."""
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise UserValueError(f"Cannot read the class names in {path!r}: {err}.") from None
    pairs = enumerate(raw) if isinstance(raw, list) else raw.items() if isinstance(raw, dict) else None
    try:
        id2label = {int(k): str(v) for k, v in pairs}
    except (TypeError, ValueError):
        raise UserValueError(f"{path!r} must hold {{id: name}} with integer ids, or a list of names.") from None
    if sorted(id2label) != list(range(len(id2label))) or not id2label:
        raise UserValueError(f"The class ids in {path!r} must be 0..N-1 without gaps, got {sorted(id2label)[:10]}.")
    return id2label


def find_id2label(data_args: DataTrainingArguments, model_args: ModelArguments) -> dict[int, str]:
    """The class names: --id2label, else id2label.json of the dataset folder / Hub dataset / image folder."""
    if data_args.id2label:
        if not os.path.isfile(data_args.id2label):
            raise UserPathError(f"--id2label {data_args.id2label!r} does not exist.")
        return read_id2label_file(data_args.id2label)
    candidates = []
    if data_args.dataset_name and os.path.isdir(data_args.dataset_name):
        candidates.append(os.path.join(data_args.dataset_name, "id2label.json"))
    for directory in (data_args.train_dir, data_args.validation_dir):
        if directory:
            candidates += [os.path.join(directory, "id2label.json"),
                           os.path.join(os.path.dirname(os.path.normpath(directory)), "id2label.json")]
    for path in candidates:
        if os.path.isfile(path):
            return read_id2label_file(path)
    if data_args.dataset_name and not os.path.isdir(data_args.dataset_name):
        try:
            from huggingface_hub import hf_hub_download

            path = hf_hub_download(data_args.dataset_name, "id2label.json", repo_type="dataset",
                                   cache_dir=model_args.cache_dir, token=model_args.token)
            return read_id2label_file(path)
        except Exception as err:  # noqa: BLE001 - offline, missing file: say what to do instead
            logger.info(f"No id2label.json in the Hub dataset {data_args.dataset_name}: {err}")
    raise UserValueError("No class names: the dataset has no id2label.json. Give --id2label FILE (a JSON object "
                         "{\"0\": \"road\", ...} of the classes after --reduce_labels).")


def dataset_display_name(data_args: DataTrainingArguments) -> str:
    name = data_args.dataset_name or data_args.train_dir or (data_args.train_files or ["local files"])[0]
    name = name.rstrip("/\\")
    return os.path.basename(name) if os.path.exists(name) else name


def _subset(ds, n: int | None, streaming: bool, seed: int):
    if n is None:
        return ds
    return ds.take(n) if streaming else ds.shuffle(seed=seed).select(range(min(n, len(ds))))


def prepare_rows(raw, data_args: DataTrainingArguments, transform, rules: MaskRules, seed: int, *, split: str):
    """Rows ``{"pixel_values", "labels", "cim_valid"}`` of a split: map-style and seeded, or streamed."""
    image_column = find_image_column(raw, data_args.image_column_name)
    mask_column = find_mask_column(raw, image_column, data_args.label_column_name)
    if data_args.label_column_name is None:
        logger.info(f"{split}: images in column {image_column!r}, masks in {mask_column!r}.")
    if data_args.streaming:
        return prepare_segmentation_stream(raw, image_column, mask_column, transform, rules,
                                           min_size=data_args.min_image_size)
    return SeededSegmentationDataset(raw, image_column, mask_column, transform, rules,
                                     min_size=data_args.min_image_size, seed=seed)


def has_mask_column(raw, data_args: DataTrainingArguments) -> bool:
    try:
        find_mask_column(raw, find_image_column(raw, data_args.image_column_name), data_args.label_column_name)
    except UserValueError:
        return False
    return True


def first_image_size(raw, data_args: DataTrainingArguments) -> tuple[int, int] | None:
    """``(height, width)`` of the split's first image (the size the saved image processor resizes to)."""
    column = find_image_column(raw, data_args.image_column_name)
    row = next(iter(without_image_decoding(raw, column)), None)
    image = decode_image(row[column]) if row is not None else None
    return (image.height, image.width) if image is not None else None


# ------------------------------------------------------------------------------------------------------------
# Model
# ------------------------------------------------------------------------------------------------------------
def is_upernet_checkpoint(path: str) -> bool:
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        return False
    with open(config_file, encoding="utf-8") as f:
        return json.load(f).get("model_type") == "upernet"


def random_encoder_config(model_args: ModelArguments) -> PreTrainedConfig:
    """The encoder architecture for random init: a preset or a checkpoint's, with the overrides applied."""
    name = model_args.encoder_config
    if name in PRESET_NAMES:
        config = preset_encoder_config(name)
    elif os.path.isdir(os.path.expanduser(name)):
        config = encoder_config_from_checkpoint(os.path.expanduser(name))
    else:
        raise UserValueError(f"--encoder_config {name!r} is neither a preset ({', '.join(PRESET_NAMES)}) nor a "
                             "checkpoint folder.")
    if model_args.patch_size is not None:
        config.patch_size = model_args.patch_size
    if model_args.num_layers is not None:
        config.num_hidden_layers = model_args.num_layers
    return config


def image_statistics(model_args: ModelArguments, path: str | None) -> tuple[list[float], list[float]]:
    """The encoder's normalisation: its checkpoint's processor (or, for random init, --encoder_config's folder's),
    else ImageNet's."""
    source = path or (model_args.encoder_config if model_args.encoder_config and
                      os.path.isdir(os.path.expanduser(model_args.encoder_config)) else None)
    stats = image_stats_from_checkpoint(source) if source else None
    return stats if stats is not None else (list(IMAGENET_DEFAULT_MEAN), list(IMAGENET_DEFAULT_STD))


def build_model(model_args: ModelArguments, path: str | None, id2label: dict[int, str], crop: tuple[int, int],
                ignore_index: int) -> UperNetForSemanticSegmentation:
    """A trained UperNet as it is (same classes), else UperNet over the checkpoint's encoder or a random one."""
    if path is not None and is_upernet_checkpoint(path):
        model = UperNetForSemanticSegmentation.from_pretrained(path)
        if {int(k): v for k, v in model.config.id2label.items()} != id2label:
            raise UserValueError(f"{model_args.model_name_or_path} segments the classes "
                                 f"{list(model.config.id2label.values())[:8]}, the dataset has "
                                 f"{list(id2label.values())[:8]}: use the same classes, or start from its encoder.")
        model.config.loss_ignore_index = ignore_index
        return model
    if path is None and model_args.encoder_config is None:
        raise UserValueError("Give --model_name_or_path (a CIM checkpoint, an encoder) or, for random init, "
                             "--encoder_config (a preset or a checkpoint folder to copy the architecture of).")
    return upernet_for_semantic_segmentation(
        path, len(id2label), id2label=id2label, encoder_config=random_encoder_config(model_args) if path is None
        else None, image_size=max(crop), out_indices=model_args.out_indices, drop_path_rate=model_args.drop_path_rate,
        hidden_size=model_args.decoder_hidden_size,
        auxiliary_channels=model_args.auxiliary_channels or max(1, model_args.decoder_hidden_size // 2),
        auxiliary_loss_weight=model_args.auxiliary_loss_weight, ignore_index=ignore_index)


def image_processor_for(size: tuple[int, int], mean: list[float], std: list[float],
                        reduce_labels: bool) -> BeitImageProcessorPil:
    """The stock processor `pipeline("image-segmentation")` uses: resize to the evaluation size (bilinear),
    normalise with the encoder's statistics; ``do_reduce_labels`` as the training masks were read."""
    return BeitImageProcessorPil(
        do_resize=True, size={"height": int(size[0]), "width": int(size[1])},
        resample=PIL.Image.Resampling.BILINEAR, do_center_crop=False, do_rescale=True, do_normalize=True,
        image_mean=list(mean), image_std=list(std), do_reduce_labels=reduce_labels)


def processor_size(image_size: tuple[int, int] | None, base_size: int | None, crop: tuple[int, int],
                   multiple: int) -> tuple[int, int]:
    """The evaluation size of the split's first image (after the --base_size resize), rounded to the encoder's
    input multiple; the crop size when unknown."""
    if image_size is None:
        return crop
    height, width = shorter_side_size(*image_size, base_size) if base_size else image_size
    return (max(multiple, int(round(height / multiple)) * multiple),
            max(multiple, int(round(width / multiple)) * multiple))


# ------------------------------------------------------------------------------------------------------------
# Prediction, figure, card
# ------------------------------------------------------------------------------------------------------------
def row_names(raw, data_args: DataTrainingArguments) -> list[str] | None:
    """The file-name stem of every image of a map-style split (``row-000012`` where it has none), with ``-row-<i>``
    added where stems repeat (``images/a/001.jpg`` and ``images/b/001.jpg``) so no mask overwrites another; None if
    streamed."""
    if isinstance(raw, datasets.IterableDataset):
        return None
    column = find_image_column(raw, data_args.image_column_name)
    raw = without_image_decoding(raw, column)
    values = raw.select_columns([column])[column]
    names = [os.path.splitext(os.path.basename(image_name(v) or f"row-{i:06d}"))[0] for i, v in enumerate(values)]
    repeated = {name for name, count in collections.Counter(names).items() if count > 1}
    return [f"{name}-row-{i:06d}" if name in repeated else name for i, name in enumerate(names)]


class MaskWriter:
    """Saves predicted index maps as PNGs in `folder`, named after the images (or their rows), keeping count."""

    def __init__(self, folder: str, names: list[str] | None):
        self.folder, self.names, self.count = folder, names, 0
        os.makedirs(folder, exist_ok=True)

    def __call__(self, index: int, predicted: np.ndarray) -> None:
        name = self.names[index] if self.names is not None else f"row-{index:06d}"
        mask_to_image(predicted).save(os.path.join(self.folder, f"{name}.png"))
        self.count += 1


@torch.no_grad()
def write_predicted_masks(model: UperNetForSemanticSegmentation, raw, data_args: DataTrainingArguments,
                          transform: SegmentationEvalTransform, writer: MaskWriter) -> None:
    """Predicts every image of a split without masks (at its own size) and saves its index map with `writer`.
    Undecodable images are skipped with a warning."""
    column = find_image_column(raw, data_args.image_column_name)
    raw = without_image_decoding(raw, column)
    parameter = next(model.parameters())
    model.eval()
    for index, row in enumerate(raw):
        image, reason = decode_image_with_reason(row[column], min_size=data_args.min_image_size)
        if image is None:
            logger.warning(f"Prediction skipped row {index} ({image_name(row[column]) or 'no file name'}): {reason}")
            continue
        pixels = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)
        pixel_values, _ = transform(pixels, torch.zeros(1, 1))
        logits = predict_logits(model, pixel_values[None].to(parameter.device, parameter.dtype),
                                (image.height, image.width))
        writer(index, logits[0].argmax(0).cpu().numpy())


def recipe_rows(trainer: SegmentationTrainer, model_args: ModelArguments, data_args: DataTrainingArguments,
                crop: tuple[int, int]) -> dict[str, object]:
    args = trainer.args
    total_batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    return {
        "head": f"UperNet, width {model_args.decoder_hidden_size}, auxiliary FCN head x{model_args.auxiliary_loss_weight}",
        "optimizer steps (epochs)": f"{trainer.state.global_step} ({trainer.state.epoch or 0:g})",
        "total batch": total_batch,
        "training crop": f"{crop[0]}x{crop[1]} px after a random rescale x{data_args.scale_range} of shorter side "
                         f"{data_args.base_size or min(crop)}; flip {data_args.hflip}",
        "evaluation": "whole image, " + (f"shorter side {data_args.base_size} px" if data_args.base_size
                                         else "at its own size") + ", scored at the masks' resolution",
        "peak learning rate": f"{args.learning_rate:.4g}, {getattr(args.lr_scheduler_type, 'value', args.lr_scheduler_type)} "
                              f"schedule, warm-up {args.warmup_steps:g}",
        "optimizer": f"AdamW (betas {args.adam_beta1}, {args.adam_beta2}), weight decay {args.weight_decay}",
        "layer decay / drop path": f"{model_args.layer_decay} / {model_args.drop_path_rate}",
        "labels": f"ignore index {data_args.ignore_index}, reduce_labels {data_args.reduce_labels}",
        "seed": args.seed,
    }


def split_scores(results: dict[str, Any], prefix: str) -> dict[str, float]:
    """The scores of one split (``<prefix>_mean_iou``, ... ``<prefix>_iou_<class>``), without the prefix."""
    headline = ("mean_iou", "overall_accuracy", "mean_accuracy")
    scores = {key[len(prefix) + 1:]: float(value) for key, value in results.items() if key.startswith(f"{prefix}_")}
    return {key: value for key, value in scores.items() if key in headline or key.startswith("iou_")}


# ------------------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict[str, Any]:
    model_args, data_args, training_args, given = parse_arguments(argv)

    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%m/%d/%Y %H:%M:%S",
                        handlers=[logging.StreamHandler(sys.stdout)])
    log_level = training_args.get_process_log_level()
    logger.setLevel(logging.INFO if training_args.should_log else log_level)
    datasets.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.set_verbosity(log_level)

    choose_stages(training_args, given)
    if not 0 < model_args.layer_decay <= 1:
        raise UserValueError(f"--layer_decay must be in (0, 1], got {model_args.layer_decay}.")
    if len(data_args.crop_size) not in (1, 2) or min(data_args.crop_size) < 1:
        raise UserValueError(f"--crop_size takes one size or height width, got {data_args.crop_size}.")
    if len(data_args.scale_range) != 2:
        raise UserValueError(f"--scale_range takes two factors (min max), got {data_args.scale_range}.")
    crop = (data_args.crop_size[0], data_args.crop_size[-1])
    if training_args.do_train and training_args.per_device_train_batch_size < 2:
        raise UserValueError("--per_device_train_batch_size must be at least 2: UperNet's pooling branch normalises "
                             "1x1 maps with BatchNorm, which needs two images (use --gradient_accumulation_steps for "
                             "a larger total batch).")
    if data_args.streaming and training_args.do_train and training_args.max_steps <= 0:
        raise UserValueError("--streaming needs --max_steps (a streamed dataset has no length).")
    path = None
    if model_args.model_name_or_path:
        path = resolve_checkpoint_path(model_args.model_name_or_path, cache_dir=model_args.cache_dir,
                                       token=model_args.token, revision=model_args.model_revision)
        if not is_upernet_checkpoint(path):
            checkpoint_kind(path)  # a clear error for anything that is not an encoder checkpoint
        elif model_args.encoder_config:
            raise UserValueError("--encoder_config is for random init; --model_name_or_path is already a UperNet.")
    if not training_args.do_train and (path is None or not is_upernet_checkpoint(path)):
        raise UserValueError("Evaluating or predicting without --do_train needs a trained UperNet checkpoint as "
                             "--model_name_or_path (its heads would otherwise be random).")
    transformers.set_seed(training_args.seed)

    id2label = find_id2label(data_args, model_args)
    rules = MaskRules(num_labels=len(id2label), ignore_index=data_args.ignore_index,
                      reduce_labels=data_args.reduce_labels)
    mean, std = image_statistics(model_args, path)
    train_transform = SegmentationTrainTransform(crop, base_size=data_args.base_size,
                                                 scale_range=tuple(data_args.scale_range), hflip=data_args.hflip,
                                                 mean=mean, std=std, ignore_index=data_args.ignore_index)
    eval_transform = SegmentationEvalTransform(data_args.base_size, mean=mean, std=std)
    logger.info(f"{len(id2label)} classes ({', '.join(list(id2label.values())[:12])}"
                f"{', ...' if len(id2label) > 12 else ''}); ignore index {data_args.ignore_index}; "
                f"reduce_labels {data_args.reduce_labels}; training view {train_transform}.")

    splits = split_names(data_args, model_args)
    eval_split = next((s for s in VALIDATION_SPLIT_NAMES if s in splits), None)
    train_ds = eval_ds = eval_raw = test_raw = train_raw = None
    if training_args.do_train:
        train_raw = load_split(data_args, model_args, "train")
        if data_args.streaming:
            train_raw = train_raw.shuffle(seed=training_args.seed, buffer_size=data_args.shuffle_buffer_size)
        train_raw = _subset(train_raw, data_args.max_train_samples, data_args.streaming, training_args.seed)
        train_ds = prepare_rows(train_raw, data_args, train_transform, rules, training_args.seed, split="train")
    if training_args.do_eval:
        if eval_split is None:
            logger.warning(f"No validation split (the source has {splits}): --do_eval is ignored.")
            training_args.do_eval, training_args.eval_strategy = False, transformers.IntervalStrategy.NO
        else:
            eval_raw = _subset(load_split(data_args, model_args, eval_split), data_args.max_eval_samples,
                               data_args.streaming, training_args.seed)
            eval_ds = prepare_rows(eval_raw, data_args, eval_transform, rules, training_args.seed, split=eval_split)
    if training_args.do_predict:  # opened now: a missing test split fails before training
        if not data_args.test_dir and data_args.test_split_name not in splits:
            raise UserValueError(f"--do_predict: no {data_args.test_split_name!r} split in {splits}; give --test_dir "
                                 "or --test_split_name.")
        test_raw = load_split(data_args, model_args, "test" if data_args.test_dir else data_args.test_split_name)
    if data_args.streaming and train_ds is not None:
        fetch_batches_per_process(training_args)
    if train_ds is not None and not data_args.streaming and training_args.dataloader_drop_last \
            and len(train_ds) < training_args.per_device_train_batch_size * training_args.world_size:
        raise UserValueError(f"The training set has {len(train_ds)} images, fewer than one batch "
                             f"({training_args.per_device_train_batch_size} per device): lower "
                             "--per_device_train_batch_size (incomplete batches are dropped).")

    model = build_model(model_args, path, id2label, crop, data_args.ignore_index)
    size_source = next((raw for raw in (eval_raw, test_raw, train_raw) if raw is not None), None)
    size = processor_size(first_image_size(size_source, data_args) if size_source is not None else None,
                          data_args.base_size, crop, input_multiple(model))
    image_processor = image_processor_for(size, mean, std, data_args.reduce_labels)

    trainer = SegmentationTrainer(
        model=model, args=training_args, train_dataset=train_ds, eval_dataset=eval_ds,
        data_collator=SegmentationCollator(), processing_class=image_processor, layer_decay=model_args.layer_decay,
        ignore_index=data_args.ignore_index, num_examples=data_args.num_figure_images)

    results: dict[str, Any] = {}
    if training_args.do_train:
        train_result = trainer.train(resume_from_checkpoint=training_args.checkpoint_to_resume(model))
        train_metrics = dict(train_result.metrics)
        train_metrics["skipped_images"] = trainer.total_skipped_images()
        trainer.log_metrics("train", train_metrics)
        trainer.save_metrics("train", train_metrics)
        trainer.save_state()
        results.update(train_metrics)

    figure = None
    if training_args.do_eval:
        eval_metrics = trainer.evaluate()
        trainer.log_metrics("eval", eval_metrics)
        trainer.save_metrics("eval", eval_metrics)
        results.update(eval_metrics)
        if trainer.last_examples and trainer.is_world_process_zero():
            os.makedirs(training_args.output_dir, exist_ok=True)
            render_segmentation_examples(trainer.last_examples, list(id2label.values()), mean, std,
                                         data_args.ignore_index).save(os.path.join(training_args.output_dir,
                                                                                   FIGURE_FILE))
            figure = FIGURE_FILE

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

    if training_args.do_train:
        final.config.architectures = [type(final).__name__]
        trainer.save_model()  # model + image processor (processing_class)
        if trainer.is_world_process_zero():
            split_results = {name: split_scores(results, prefix) for name, prefix in
                             ((eval_split, "eval"), (data_args.test_split_name, "test")) if f"{prefix}_mean_iou" in results}
            encoder_config = final.config.backbone_config
            card = build_segmentation_card(
                model_name=os.path.basename(os.path.normpath(training_args.output_dir)),
                base=model_args.model_name_or_path, encoder_config=encoder_config,
                dataset_name=dataset_display_name(data_args), num_labels=len(id2label),
                recipe=recipe_rows(trainer, model_args, data_args, crop), split_results=split_results,
                license=model_args.license or card_license(path), figure=figure)
            write_model_card(training_args.output_dir, card)
        logger.info(f"Saved the UperNet and its image processor to {training_args.output_dir}.")
    if training_args.push_to_hub and training_args.do_train:
        trainer.push_to_hub(commit_message="UperNet semantic segmentation, image processor and model card")
    return results


if __name__ == "__main__":
    exit_on_user_error(main)
