"""The resume rule of the training scripts: which checkpoint directories are complete, and whether one fits the model.

- `checkpoint_to_resume` is the resume rule of both scripts: the newest *complete* checkpoint in the output directory
  (`last_complete_checkpoint`: the Trainer writes `trainer_state.json` last, so a run killed mid-save leaves a folder
  without it) unless --overwrite_output_dir, or the one --resume_from_checkpoint names; never one of another model
  (`checkpoint_mismatch`).

Reading and loading checkpoints (`resolve_checkpoint_path`, `checkpoint_kind`, ...) is library work:
:mod:`transformers_cim.checkpoint_loading`.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter

from safetensors import safe_open
from torch import nn
from transformers.utils import logging

from ..checkpoint_loading import read_config_dict
from ..errors import UserPathError, UserValueError

logger = logging.get_logger(__name__)

CHECKPOINT_COMPLETE_MARKER = "trainer_state.json"  # Trainer writes it last when saving a checkpoint


def is_complete_checkpoint(path: str) -> bool:
    """A checkpoint folder whose save finished: a run killed mid-save leaves it without the state file, or with
    the state file cut short."""
    try:
        with open(os.path.join(path, CHECKPOINT_COMPLETE_MARKER)) as f:
            json.load(f)
    except (OSError, ValueError):
        return False
    return True


def last_complete_checkpoint(output_dir: str) -> str | None:
    """The newest `checkpoint-N` in output_dir whose save finished; incomplete ones are skipped with a warning."""
    if not os.path.isdir(output_dir):
        return None
    steps = sorted(
        (int(name.split("-")[1]), name)
        for name in os.listdir(output_dir)
        if re.fullmatch(r"checkpoint-\d+", name) and os.path.isdir(os.path.join(output_dir, name))
    )
    for _, name in reversed(steps):
        path = os.path.join(output_dir, name)
        if is_complete_checkpoint(path):
            return path
        logger.warning("Skipping %s: its save did not finish (no %s).", path, CHECKPOINT_COMPLETE_MARKER)
    return None


LAST_CHECKPOINT_NAMES = ("last", "latest", "true")


def checkpoint_to_resume(
    output_dir: str,
    resume_from_checkpoint: str | bool | None = None,
    overwrite_output_dir: bool = False,
    model: nn.Module | None = None,
) -> str | None:
    """The checkpoint a run resumes from, by the one rule of both scripts (the transformers examples' rule):

    - ``--resume_from_checkpoint PATH``: that checkpoint, which must be complete;
    - ``--resume_from_checkpoint last`` (or ``True``): the newest complete checkpoint in ``output_dir``, which must
      exist;
    - neither: the newest complete checkpoint in ``output_dir`` when there is one, unless ``overwrite_output_dir``.

    A checkpoint that `model` cannot continue from (another architecture, or weights of other shapes: a pre-training
    checkpoint met by fine-tuning, another label count or size) is refused with the way out, never resumed."""
    resume = resume_from_checkpoint
    explicit = bool(resume) and str(resume).lower() not in LAST_CHECKPOINT_NAMES
    if explicit:
        if not os.path.isdir(resume):
            raise UserPathError(f"--resume_from_checkpoint {resume} does not exist.")
        if not is_complete_checkpoint(resume):
            raise UserValueError(
                f"--resume_from_checkpoint {resume} is incomplete (no {CHECKPOINT_COMPLETE_MARKER}: the "
                "run was probably killed while saving it). Resume from an earlier checkpoint or use "
                "'last'."
            )
        checkpoint = resume
    elif resume:
        checkpoint = last_complete_checkpoint(output_dir)
        if checkpoint is None:
            raise UserPathError(f"No complete checkpoint found in {output_dir} to resume from.")
    else:
        checkpoint = None if overwrite_output_dir else last_complete_checkpoint(output_dir)
        if checkpoint is None:
            return None
    reason = checkpoint_mismatch(checkpoint, model) if model is not None else None
    if reason is not None:
        way_out = (
            "pass a checkpoint of this model"
            if explicit
            else ("pass --overwrite_output_dir to start afresh there, or use another --output_dir")
        )
        raise UserValueError(f"Cannot resume from {checkpoint}: {reason}; {way_out}.")
    if not resume:
        logger.warning(
            "Resuming from %s, the newest complete checkpoint in the output directory "
            "(--overwrite_output_dir starts afresh instead).",
            checkpoint,
        )
    return checkpoint


def checkpoint_mismatch(checkpoint: str, model: nn.Module) -> str | None:
    """Why `model` cannot continue from `checkpoint` (the architecture its config.json names, or the shapes of its
    saved tensors, read from the safetensors headers), or None when it can."""
    model_class = type(model).__name__
    if os.path.isfile(os.path.join(checkpoint, "config.json")):
        saved_class = (read_config_dict(checkpoint).get("architectures") or [model_class])[0]
        if saved_class != model_class:
            return f"it holds a {saved_class} and this run trains a {model_class}"
    saved = _saved_tensor_shapes(checkpoint)
    if saved is not None:
        expected = Counter(tuple(tensor.shape) for tensor in model.state_dict().values())
        if saved != expected:
            extra, missing = sorted(saved - expected), sorted(expected - saved)
            example = (
                f"a tensor of shape {extra[0]} that it does not have" if extra else f"no tensor of shape {missing[0]}"
            )
            return f"its weights do not fit this run's {model_class} (it holds {example})"
    return None


def _saved_tensor_shapes(checkpoint: str) -> Counter | None:
    """How many tensors of each shape the checkpoint's safetensors weights hold (headers only), or None without."""
    index = os.path.join(checkpoint, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    paths = [os.path.join(checkpoint, name) for name in files]
    if not all(os.path.isfile(path) for path in paths):
        return None
    shapes = Counter()
    for path in paths:
        with safe_open(path, "pt") as f:
            shapes.update(tuple(f.get_slice(key).get_shape()) for key in f.keys())
    return shapes


__all__ = [
    "CHECKPOINT_COMPLETE_MARKER",
    "checkpoint_mismatch",
    "checkpoint_to_resume",
    "is_complete_checkpoint",
    "last_complete_checkpoint",
]
