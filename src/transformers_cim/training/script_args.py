"""Command-line arguments that `run_pretraining.py` and `run_image_classification.py` share, declared once.

Each script's `DataTrainingArguments` extends `DataSourceArguments` with its own fields (shuffle buffer, minimum image
size, crops, ...), and its training arguments extend `ResumableTrainingArguments` (the resume rule); `HfArgumentParser`
reads the inherited fields like its own.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field, fields
from typing import get_type_hints

import datasets
import torch
from torch import nn
from transformers import HfArgumentParser, IntervalStrategy, TrainingArguments

from ..errors import UserPathError, UserValueError
from .checkpoints import checkpoint_to_resume
from .data import load_image_dataset


@dataclass
class DataSourceArguments:
    """Where the images come from: one source (a Hub dataset, image folders or data files), or none for the
    scikit-image sample photos."""

    dataset_name: str | None = field(default=None, metadata={"help": "A Hub dataset id or a local Hub-layout dir."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "The dataset's configuration."})
    train_dir: str | None = field(
        default=None,
        metadata={
            "help": "A folder of training images (sub-folders allowed; for classification, one sub-folder per class)."
        },
    )
    validation_dir: str | None = field(
        default=None,
        metadata={"help": "A folder of validation images (for classification, with the training folder's classes)."},
    )
    train_files: list[str] | None = field(
        default=None,
        metadata={"help": "Training data files (parquet, arrow, csv, json, webdataset tar or image files)."},
    )
    validation_files: list[str] | None = field(default=None, metadata={"help": "Validation data files."})
    image_column_name: str | None = field(default=None, metadata={"help": "Image column; auto-detected if unset."})
    streaming: bool = field(
        default=False,
        metadata={
            "help": "Stream the dataset (needs --max_steps; classification also needs a ClassLabel label column and a "
            "validation split)."
        },
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only this many training images."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use only this many validation images."})

    def load_split(
        self, split: str, *, cache_dir: str | None = None, token: str | None = None
    ) -> datasets.Dataset | datasets.IterableDataset:
        """One split of the chosen source (see :func:`~transformers_cim.training.data.load_image_dataset`)."""
        return load_image_dataset(
            dataset_name=self.dataset_name,
            dataset_config_name=self.dataset_config_name,
            train_dir=self.train_dir,
            train_files=self.train_files,
            validation_dir=self.validation_dir,
            validation_files=self.validation_files,
            split=split,
            streaming=self.streaming,
            cache_dir=cache_dir,
            token=token,
            test_dir=getattr(self, "test_dir", None),  # fields of the classification script's arguments
            test_files=getattr(self, "test_files", None),
        )


def accelerator_available() -> bool:
    """Whether torch sees an accelerator (CUDA, or any other that `torch.accelerator` knows) to pin memory for."""
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and hasattr(accelerator, "is_available"):
        return bool(accelerator.is_available())
    return torch.cuda.is_available()


@dataclass
class ResumableTrainingArguments(TrainingArguments):
    """`TrainingArguments` with the resume rule of both scripts
    (`transformers_cim.training.checkpoints.checkpoint_to_resume`):
    a run resumes from the newest complete checkpoint in output_dir unless --overwrite_output_dir;
    --resume_from_checkpoint PATH or `last` names one. Data-loader memory is pinned only when torch sees an
    accelerator (on a CPU-only machine pinning does nothing and torch warns about it)."""

    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Start afresh even when output_dir holds checkpoints (by default the run resumes from the newest "
            "complete one)."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        if self.dataloader_pin_memory and not accelerator_available():
            # pinned memory only speeds up copies to an accelerator; without one, torch warns on every data loader
            self.dataloader_pin_memory = False

    def checkpoint_to_resume(self, model: nn.Module | None = None) -> str | None:
        """The checkpoint to pass to `Trainer.train`, or None; refuses one that `model` cannot continue from."""
        return checkpoint_to_resume(self.output_dir, self.resume_from_checkpoint, self.overwrite_output_dir, model)


TRAINER_GROUP_TITLE = "Trainer arguments (transformers.TrainingArguments, after the script's own)"


class ScriptArgumentParser(HfArgumentParser):
    """`HfArgumentParser` whose ``--help`` lists the script's own arguments first, one titled group per dataclass (its
    ``_argument_group_name``), and the Trainer's many flags last, in a group of their own.

    The fields a `TrainingArguments` subclass declares or re-declares (with the recipe's defaults) form the training
    group; the fields it inherits unchanged from `TrainingArguments` form the Trainer group."""

    def __init__(self, dataclass_types, **kwargs):
        kwargs.setdefault("usage", "%(prog)s [-h] [--ARGUMENT VALUE ...] | %(prog)s ARGUMENTS.json")
        super().__init__(dataclass_types, **kwargs)

    def _add_dataclass_arguments(self, dtype) -> None:
        if not (isinstance(dtype, type) and issubclass(dtype, TrainingArguments)):
            return super()._add_dataclass_arguments(dtype)
        own = set()
        for cls in dtype.__mro__:
            if cls is TrainingArguments:
                break
            own.update(getattr(cls, "__annotations__", {}))
        own_group = self.add_argument_group(getattr(dtype, "_argument_group_name", "training"))
        trainer_group = self.add_argument_group(TRAINER_GROUP_TITLE)
        type_hints = get_type_hints(dtype)
        for dataclass_field in fields(dtype):
            if not dataclass_field.init:
                continue
            dataclass_field.type = type_hints[dataclass_field.name]
            group = own_group if dataclass_field.name in own else trainer_group
            self._parse_dataclass_field(group, dataclass_field)


def parse_with_given(parser: ScriptArgumentParser, argv: list[str] | None = None) -> tuple[tuple, set[str]]:
    """The parser's dataclasses from the command line (or one ``.json`` file as the only argument), and the names of
    the arguments given explicitly, to tell a default from a value asked for."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if len(argv) == 1 and argv[0].endswith(".json"):
        path = os.path.abspath(argv[0])
        if not os.path.isfile(path):
            raise UserPathError(f"Argument file {argv[0]!r} does not exist.")
        parsed = parser.parse_json_file(path)
        with open(path, encoding="utf-8") as f:
            given = set(json.load(f))
    else:
        parsed = parser.parse_args_into_dataclasses(args=argv)
        given = {a.split("=")[0][2:].replace("-", "_") for a in argv if a.startswith("--")}
    return tuple(parsed), given


STAGES = ("do_train", "do_eval", "do_predict")


def choose_stages(training_args: TrainingArguments, given: set[str]) -> bool:
    """Like transformers' example scripts: train only with --do_train, evaluate only with --do_eval, predict only
    with --do_predict. With none of the three given, train and evaluate; returns True in that case.
    ``training_args`` must keep the --do_eval given as ``do_eval_as_given`` (TrainingArguments turns do_eval on
    whenever an eval_strategy is set)."""
    asked = given & set(STAGES)
    if not asked:
        training_args.do_train, training_args.do_eval, training_args.do_predict = True, True, False
    for name in set(STAGES) - asked if asked else ():
        setattr(training_args, name, False)
    if "do_eval" in asked:
        training_args.do_eval = training_args.do_eval_as_given  # `--do_eval false` means false
    if not training_args.do_eval:
        training_args.eval_strategy = IntervalStrategy.NO
    if not (training_args.do_train or training_args.do_eval or training_args.do_predict):
        raise UserValueError("Nothing to do: --do_train, --do_eval and --do_predict are all off.")
    return not asked


def set_learning_rate(args: TrainingArguments, base_learning_rate: float | None, explicit: bool) -> str:
    """Sets ``args.learning_rate = base_learning_rate x total batch / 256`` unless the learning rate was given
    (`explicit`) or `base_learning_rate` is None (the learning rate is kept as it is); returns the one log line that
    says where the learning rate came from, with each factor."""
    if explicit or base_learning_rate is None:
        origin = "--learning_rate as given" if explicit else "not scaled by the batch"
        return f"lr = {args.learning_rate:.4g} ({origin})"
    per_device, accumulation, processes = (
        args.per_device_train_batch_size,
        args.gradient_accumulation_steps,
        args.world_size,
    )
    total_batch = per_device * accumulation * processes
    args.learning_rate = base_learning_rate * total_batch / 256
    return (
        f"lr = base_lr x total_batch / 256 = {base_learning_rate:.4g} x {total_batch} / 256 = "
        f"{args.learning_rate:.4g} (total_batch = {per_device} per device x {accumulation} accumulation "
        f"step(s) x {processes} process(es); --learning_rate sets it directly)"
    )


__all__ = [
    "DataSourceArguments",
    "ResumableTrainingArguments",
    "ScriptArgumentParser",
    "accelerator_available",
    "set_learning_rate",
]
