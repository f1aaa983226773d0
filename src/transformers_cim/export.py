"""Export the online encoder of a CIM pre-training checkpoint as a plain transformers checkpoint.

The result is a stock ``ViTModel`` (or ``ResNetModel``) checkpoint: ``model_type`` ``vit`` / ``resnet``, no custom
code, no ``auto_map``, plus a stock image processor config. It loads anywhere a ViT / ResNet loads::

    AutoModel.from_pretrained(out_dir)
    AutoModelForImageClassification.from_pretrained(out_dir, num_labels=10)   # fresh head
    pipeline("image-feature-extraction", model=out_dir)

Command line: ``cim-export-encoder CIM_DIR OUT_DIR``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

import torch
from huggingface_hub import ModelCard, ModelCardData
from transformers import ResNetModel, ViTModel

from .checkpoint_loading import (
    checkpoint_kind,
    encoder_config_from_checkpoint,
    image_stats_from_checkpoint,
    quiet_loading,
    resolve_checkpoint_path,
)
from .configuration_cim import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from .errors import UserValueError
from .features import GLOBAL_FEATURE_DESCRIPTIONS
from .hub_card import card_with_metadata, encoder_description, write_model_card
from .image_processing import eval_image_processor


def _model_card(source: str, config) -> ModelCard:
    """The exported encoder's card: what it is, where it came from (``base_model`` when that is a Hub id)."""
    local = os.path.isdir(source)
    data = ModelCardData(
        library_name="transformers",
        pipeline_tag="image-feature-extraction",
        tags=["cim", "self-supervised", "image-feature-extraction"],
        base_model=None if local else source,
    )
    name = os.path.basename(os.path.normpath(source)) if local else source
    arch = encoder_description(config) + (f" at {config.image_size} px" if config.model_type == "vit" else "")
    return card_with_metadata(
        data,
        (
            f"# CIM encoder\n\nThe online encoder of a CIM (Correlational Image Modeling) pre-training checkpoint "
            f"(`{name}`), exported as a plain {arch}. No custom code is needed to load it; the usual image feature is "
            f"{GLOBAL_FEATURE_DESCRIPTIONS[config.model_type]}.\n\n```python\nfrom transformers import pipeline\n"
            'extractor = pipeline("image-feature-extraction", model="PATH")\n```\n'
        ),
    )


def export_encoder(cim_checkpoint_dir: str | os.PathLike, output_dir: str | os.PathLike) -> str:
    """Write the online encoder of ``cim_checkpoint_dir`` to ``output_dir`` as a stock checkpoint; return the path.

    The weights are the ``vit.`` (ViT family, as a ``ViTModel``) or ``resnet.`` (``ResNetModel``) entries of the CIM
    checkpoint; the target encoder and decoder are dropped. No output of the export is random: a ViT's pooler is
    saved as the identity on the final CLS token (``pooler.dense`` = identity matrix, zero bias, ``pooler_act``
    ``linear``), so ``pooler_output`` is exactly ``last_hidden_state[:, 0]``, the feature probes and k-NN read; a
    ResNet's pooler is its global average pooling. The image processor computes the
    evaluation transform (`eval_image_processor`, crop_pct 0.875) with the checkpoint's mean / std when it has one,
    else
    ImageNet's. A stock ViT / ResNet checkpoint is accepted too (its encoder is re-saved).
    """
    source = resolve_checkpoint_path(cim_checkpoint_dir)
    output_dir = os.fspath(output_dir)
    if os.path.abspath(source) == os.path.abspath(output_dir):
        raise UserValueError("output_dir must differ from the CIM checkpoint directory.")
    _, encoder_type = checkpoint_kind(source)
    config = encoder_config_from_checkpoint(source)
    config.architectures = None
    if hasattr(config, "auto_map"):
        config.auto_map = None
    if encoder_type == "vit":  # the pooler: identity on the CLS token (set below)
        config.pooler_output_size, config.pooler_act = config.hidden_size, "linear"
    with quiet_loading():  # the target encoder and decoder weights are left out on purpose
        if encoder_type == "vit":
            model, info = ViTModel.from_pretrained(source, config=config, output_loading_info=True)
        else:
            model, info = ResNetModel.from_pretrained(source, config=config, output_loading_info=True)
    missing = sorted(k for k in info["missing_keys"] if not k.startswith("pooler.") or encoder_type != "vit")
    if encoder_type == "vit":
        with torch.no_grad():
            model.pooler.dense.weight.copy_(torch.eye(config.hidden_size))
            model.pooler.dense.bias.zero_()
    if missing or info["mismatched_keys"]:
        problems = missing + [str(k) for k in info["mismatched_keys"]]
        raise UserValueError(
            f"{source!r} does not hold a complete {type(model).__name__} under the prefix "
            f"{model.base_model_prefix!r}: missing or mismatched {problems[:5]}"
        )

    os.makedirs(output_dir, exist_ok=True)
    model.config.architectures = [type(model).__name__]
    model.save_pretrained(output_dir)
    # make sure nothing custom leaks into the exported config
    config_file = os.path.join(output_dir, "config.json")
    with open(config_file, encoding="utf-8") as f:
        saved = json.load(f)
    if saved.pop("auto_map", None) is not None:
        with open(config_file, "w", encoding="utf-8") as f:
            json.dump(saved, f, indent=2, sort_keys=True)

    stats = image_stats_from_checkpoint(source)
    mean, std = stats if stats is not None else (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
    with open(os.path.join(source, "config.json"), encoding="utf-8") as f:
        source_config = json.load(f)
    if encoder_type == "vit":
        image_size = config.image_size
    else:  # a ResNet has no input size of its own: use the CIM search-view size when there is one
        image_size = source_config.get("image_size", 224) if source_config.get("model_type") == "cim" else 224
    if isinstance(image_size, (list, tuple)):
        image_size = image_size[0]
    eval_image_processor(int(image_size), mean=mean, std=std).save_pretrained(output_dir)
    write_model_card(output_dir, _model_card(os.fspath(cim_checkpoint_dir), config))
    return output_dir


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="cim-export-encoder",
        description=(
            "Export the online encoder of a CIM pre-training checkpoint as a plain ViTModel / ResNetModel checkpoint "
            "(stock config, no custom code) with an image processor, loadable by AutoModel and pipeline()."
        ),
    )
    parser.add_argument(
        "cim_checkpoint",
        help="CIM pre-training checkpoint: a directory (config.json model_type 'cim') "
        "or a Hub model id (downloaded, or from the Hub cache offline).",
    )
    parser.add_argument("output_dir", help="Directory to write the exported encoder to.")
    args = parser.parse_args(argv)
    try:
        path = export_encoder(args.cim_checkpoint, args.output_dir)
    except (OSError, ValueError) as err:
        print(f"cim-export-encoder: error: {err}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["export_encoder", "main"]
