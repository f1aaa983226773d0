"""Command-line arguments that `run_pretraining.py` and `run_image_classification.py` share, declared once.

Each script's `DataTrainingArguments` extends `DataSourceArguments` with its own fields (shuffle buffer, minimum image
size, crops, ...), and its training arguments extend `ResumableTrainingArguments` (the resume rule); `HfArgumentParser`
reads the inherited fields like its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import datasets
from torch import nn
from transformers import TrainingArguments

from .checkpoints import checkpoint_to_resume
from .data import load_image_dataset


@dataclass
class DataSourceArguments:
    """Where the images come from: one source (a Hub dataset, image folders or data files), or none for the
    scikit-image sample photos."""

    dataset_name: str | None = field(default=None, metadata={"help": "A Hub dataset id or a local Hub-layout dir."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "The dataset's configuration."})
    train_dir: str | None = field(default=None, metadata={
        "help": "A folder of training images (sub-folders allowed; for classification, one sub-folder per class)."})
    validation_dir: str | None = field(default=None, metadata={
        "help": "A folder of validation images (for classification, with the training folder's classes)."})
    train_files: list[str] | None = field(default=None, metadata={
        "help": "Training data files (parquet, arrow, csv, json, webdataset tar or image files)."})
    validation_files: list[str] | None = field(default=None, metadata={"help": "Validation data files."})
    image_column_name: str | None = field(default=None, metadata={"help": "Image column; auto-detected if unset."})
    streaming: bool = field(default=False, metadata={
        "help": "Stream the dataset (needs --max_steps; classification also needs a ClassLabel label column and a "
                "validation split)."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only this many training images."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use only this many validation images."})

    def load_split(self, split: str, *, cache_dir: str | None = None,
                   token: str | None = None) -> datasets.Dataset | datasets.IterableDataset:
        """One split of the chosen source (see :func:`~transformers_cim.data.load_image_dataset`)."""
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
        )


@dataclass
class ResumableTrainingArguments(TrainingArguments):
    """`TrainingArguments` with the resume rule of both scripts (`transformers_cim.checkpoints.checkpoint_to_resume`):
    a run resumes from the newest complete checkpoint in output_dir unless --overwrite_output_dir;
    --resume_from_checkpoint PATH or `last` names one."""

    overwrite_output_dir: bool = field(default=False, metadata={
        "help": "Start afresh even when output_dir holds checkpoints (by default the run resumes from the newest "
                "complete one)."})

    def checkpoint_to_resume(self, model: nn.Module | None = None) -> str | None:
        """The checkpoint to pass to `Trainer.train`, or None; refuses one that `model` cannot continue from."""
        return checkpoint_to_resume(self.output_dir, self.resume_from_checkpoint, self.overwrite_output_dir, model)


__all__ = ["DataSourceArguments", "ResumableTrainingArguments"]
