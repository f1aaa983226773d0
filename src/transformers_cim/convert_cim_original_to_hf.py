"""Convert a checkpoint of the authors' CIM code (weivision/Correlational-Image-Modeling) to transformers.

Two kinds of ``.pth`` file are understood, told apart by their keys:

* a **pre-training** checkpoint (their ``CorrelationalAutoencoderViT``) becomes a `CIMForPreTraining` checkpoint:
  online encoder, EMA target encoder (their ``*_c`` modules with the online CLS token and position table), and the
  correlation decoder, whose 2-logit predictor becomes our single logit ``logit_1 - logit_0`` (class 1 is "inside
  the exemplar" in their masks; softmax over two logits is the sigmoid of that difference, and the bilinear
  upsampling is linear, so nothing changes). The contrastive MLPs are kept only when the converted config uses the
  contrastive loss; otherwise they are dropped and listed.
* a **fine-tuned** classifier (their timm ``VisionTransformer``) becomes a stock classifier that
  ``pipeline("image-classification")`` loads without custom code: ``BeitForImageClassification`` configured as a
  plain ViT when it pools the mean of the patch tokens (``fc_norm``), ``ViTForImageClassification`` when it reads
  the CLS token (``norm``). BEiT's attention has no key bias; dropping the ViT key bias is exact because it adds
  ``q . b_k`` to every score of a query, a constant that softmax ignores.

The file is read with ``torch.load(weights_only=True)`` only (``argparse.Namespace``, in which their scripts store
``args``, is the one class allowed besides tensors and containers). The model size comes from the weights' shapes
(heads from ``--num_heads`` or the standard table), the image size from the position table, the context size from
the decoder's position table, and the pretext settings from the checkpoint's ``args`` where present. Everything is
checked before anything is written; the output is written to a temporary folder and moved into place at the end.

Command line: ``cim-convert-original CHECKPOINT.pth OUTPUT_DIR [--model_size vit-base-patch16]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import BeitForImageClassification, PreTrainedModel, ViTConfig, ViTForImageClassification

from .configuration_cim import VIT_PRESETS, CIMConfig
from .errors import UserValueError
from .image_processing import eval_image_processor
from .modeling_cim import CIMForPreTraining
from .original_checkpoint import (  # ConversionOptions re-exported: the converter's options
    CLASSIFIER,
    DEFAULT_DECODER_NUM_HEADS,
    DEFAULT_NUM_HEADS,
    PRETRAINING,
    ConversionOptions,
    KeyReader,
    VitShape,
    check_decoder_position_table,
    checkpoint_kind,
    convert_contrastive_heads,
    convert_decoder,
    convert_embeddings,
    convert_vit_encoder,
    copy_weight_and_bias,
    load_original_state_dict,
    read_vit_shape,
)
from .transfer import beit_config_from_vit

DEFAULT_EXEMPLAR_SIZE = 64
LAYER_NORM_EPS = 1e-6  # the authors' LayerNorm (timm's default eps is 1e-6 too)


# their pre-training arguments that set a field of CIMConfig: name in ``args`` -> config field
PRETEXT_ARGS: dict[str, str] = {
    "template_size": "exemplar_size",
    "template_num": "num_exemplars",
    "rotaton_max_degree": "exemplar_max_rotation",  # sic: their flag's spelling
    "sigma_cont": "contrastive_loss_weight",
    "sigma_corr": "correlation_loss_weight",
}
PRETEXT_RANGE_ARGS: dict[tuple[str, str], str] = {
    ("template_min_scale", "template_max_scale"): "exemplar_scale",
    ("template_min_ratio", "template_max_ratio"): "exemplar_aspect_ratio",
}


@dataclass
class ConversionSummary:
    """What a conversion wrote and what it left out, printed by the command line."""

    kind: str
    model_class: str
    output_dir: str = ""
    config_notes: list[str] = field(default_factory=list)
    dropped_keys: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [f"{self.kind} checkpoint -> {self.model_class} in {self.output_dir}"]
        out += [f"  {note}" for note in self.config_notes]
        if self.dropped_keys:
            modules = Counter(key.split(".", 1)[0] for key in self.dropped_keys)
            out.append("  dropped: " + ", ".join(f"{name}.* ({count} tensors)" for name, count in modules.items()))
        return out


# --------------------------------------------------------------------------------------------------
# Configs and models
# --------------------------------------------------------------------------------------------------


def vit_config(shape: VitShape, **kwargs) -> ViTConfig:
    return ViTConfig(
        hidden_size=shape.hidden_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        intermediate_size=shape.intermediate_size,
        patch_size=shape.patch_size,
        image_size=shape.image_size,
        hidden_act="gelu",
        layer_norm_eps=LAYER_NORM_EPS,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        **kwargs,
    )


def pretext_settings(
    args: dict[str, Any], options: ConversionOptions, patch_size: int, context_size: int
) -> tuple[dict[str, Any], list[str]]:
    """CIMConfig fields from their ``args`` (where present), then the command line; exemplar size floored to the
    patch, as their patch embedding does."""
    fields: dict[str, Any] = {name: args[key] for key, name in PRETEXT_ARGS.items() if key in args}
    for (low, high), name in PRETEXT_RANGE_ARGS.items():
        if low in args and high in args:
            fields[name] = [float(args[low]), float(args[high])]
    if "exemplar_aspect_ratio" in fields:
        # their ratio is width / height (torchvision's get_params: w = sqrt(area * r)); ours is h / w
        low, high = fields["exemplar_aspect_ratio"]
        fields["exemplar_aspect_ratio"] = [1.0 / high, 1.0 / low]
    notes = [f"pretext settings from the checkpoint's args: {sorted(fields)}"] if fields else []
    overrides = {
        "exemplar_size": options.exemplar_size,
        "num_exemplars": options.num_exemplars,
        "contrastive_loss_weight": options.contrastive_loss_weight,
    }
    fields |= {name: value for name, value in overrides.items() if value is not None}
    size = int(fields.get("exemplar_size", DEFAULT_EXEMPLAR_SIZE))
    fields["exemplar_size"] = min(size - size % patch_size, context_size)
    if fields["exemplar_size"] != size:
        notes.append(
            f"exemplars: {fields['exemplar_size']} px instead of {size} (a multiple of the patch, at most the context)"
        )
    if "context_size" in args and int(args["context_size"]) != context_size:
        notes.append(
            f"context: {context_size} px (the decoder's patch grid); their args say {args['context_size']}, "
            "which their code floors to the same grid"
        )
    return fields, notes


def build_with_weights(
    model_class: type[PreTrainedModel], config, weights: dict[str, torch.Tensor]
) -> PreTrainedModel:
    """An instance of ``model_class`` holding exactly ``weights`` (built on the meta device: no random init)."""
    with torch.device("meta"):
        model = model_class(config)
    try:
        model.load_state_dict(weights, strict=True, assign=True)
    except RuntimeError as err:
        raise UserValueError(
            f"The converted weights do not fit {model_class.__name__}: {' '.join(str(err).split())[:600]}"
        ) from None
    if hasattr(model, "reset_augmentation_strength"):  # a run-time buffer, never in a checkpoint
        model.reset_augmentation_strength()
    left_on_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left_on_meta:
        raise RuntimeError(f"Not filled by the conversion: {left_on_meta[:5]}")
    return model.eval()


def convert_pretraining(
    state_dict: dict[str, torch.Tensor], args: dict[str, Any], options: ConversionOptions
) -> tuple[CIMForPreTraining, ConversionSummary]:
    """Their ``CorrelationalAutoencoderViT`` state dict -> a `CIMForPreTraining`."""
    reader = KeyReader(state_dict, "pre-training state dict")
    shape, notes = read_vit_shape(reader, options, args)
    context_size = check_decoder_position_table(reader, shape.patch_size)
    decoder_width = reader.shape("decoder_embed.weight")[0]
    decoder_mlp = reader.shape("decoder_corr_block.block.mlp.fc1.weight")[0]
    if int(decoder_width * (decoder_mlp / decoder_width)) != decoder_mlp:
        raise UserValueError(
            f"The decoder MLP width {decoder_mlp} is not a ratio of its width {decoder_width} that "
            "CIMConfig.decoder_mlp_ratio can express."
        )
    fields, pretext_notes = pretext_settings(args, options, shape.patch_size, context_size)
    keep_heads = float(fields.get("contrastive_loss_weight", 0.0)) > 0
    if keep_heads:
        fields["projector_hidden_size"] = reader.shape("decoder_g_embed.0.weight")[0]
        fields["projector_output_size"] = reader.shape("decoder_g_embed.6.weight")[0]
    try:
        config = CIMConfig(
            encoder_config=vit_config(shape, qkv_bias=True),
            image_size=shape.image_size,
            context_size=context_size,
            decoder_hidden_size=decoder_width,
            decoder_num_attention_heads=options.decoder_num_heads,
            decoder_num_layers=1,
            decoder_mlp_ratio=decoder_mlp / decoder_width,
            decoder_shared_norm=True,
            decoder_align_corners=True,
            **fields,
        )
    except (ValueError, TypeError) as err:
        raise UserValueError(f"The checkpoint's sizes do not make a valid CIM config: {err}") from None

    weights = convert_embeddings(reader, "vit.")
    weights |= convert_vit_encoder(reader, shape, "vit.")
    weights |= copy_weight_and_bias(reader, "norm", "vit.layernorm")
    # the EMA target has its own patch projection, blocks and norm, and shares the online CLS token and positions
    target = convert_embeddings(reader, "target_encoder.", patch_prefix="patch_embed_c.")
    target |= convert_vit_encoder(reader, shape, "target_encoder.", suffix="_c")
    target |= copy_weight_and_bias(reader, "norm_c", "target_encoder.layernorm")
    weights |= target
    weights |= convert_decoder(reader)
    heads, dropped = convert_contrastive_heads(reader, keep_heads)
    weights |= heads
    if reader.unused:
        raise UserValueError(
            f"The pre-training state dict has tensors this converter does not know: "
            f"{sorted(reader.unused)[:8]}; it may come from a modified model."
        )
    model = build_with_weights(CIMForPreTraining, config, weights)
    notes += [
        f"decoder: width {decoder_width}, {options.decoder_num_heads} heads, MLP {decoder_mlp}, "
        f"context {context_size} px, exemplars {config.num_exemplars} x {config.exemplar_size} px",
        "decoder_pos_embed: equal to the sin-cos table CIMForPreTraining computes (not stored)",
    ]
    notes += pretext_notes
    if dropped:
        notes.append(
            "contrastive heads dropped: the config has contrastive_loss_weight 0 "
            "(keep them with --contrastive_loss_weight > 0)"
        )
    summary = ConversionSummary(PRETRAINING, type(model).__name__, config_notes=notes, dropped_keys=dropped)
    return model, summary


def convert_classifier(
    state_dict: dict[str, torch.Tensor], args: dict[str, Any], options: ConversionOptions
) -> tuple[PreTrainedModel, ConversionSummary]:
    """Their fine-tuned timm ViT -> `BeitForImageClassification` (mean pooling) or `ViTForImageClassification`
    (CLS token)."""
    reader = KeyReader(state_dict, "fine-tuned state dict")
    shape, notes = read_vit_shape(reader, options, args)
    has_fc_norm, has_norm = "fc_norm.weight" in state_dict, "norm.weight" in state_dict
    if has_fc_norm == has_norm:
        raise UserValueError(
            "The fine-tuned state dict must have exactly one of fc_norm.* (global pooling) and "
            f"norm.* (CLS token); it has {'both' if has_norm else 'neither'}."
        )
    num_labels = reader.shape("head.weight")[0]
    id2label = options.id2label or {i: f"LABEL_{i}" for i in range(num_labels)}
    if len(id2label) != num_labels:
        raise UserValueError(f"--id2label has {len(id2label)} labels, the head has {num_labels} outputs.")
    labels = {"id2label": id2label, "label2id": {v: k for k, v in id2label.items()}}
    if has_fc_norm:
        config = beit_config_from_vit(vit_config(shape), use_mean_pooling=True, drop_path_rate=0.0, **labels)
        prefix, model_class = "beit.", BeitForImageClassification
        weights = convert_embeddings(reader, prefix)
        weights |= convert_vit_encoder(reader, shape, prefix, key_bias=False)
        weights |= copy_weight_and_bias(reader, "fc_norm", "beit.pooler.layernorm")
        notes.append(
            "global pooling + fc_norm -> BEiT with mean pooling; key biases dropped (exact: softmax "
            "ignores a per-query constant)"
        )
    else:
        config = vit_config(shape, qkv_bias=True, **labels)
        prefix, model_class = "vit.", ViTForImageClassification
        weights = convert_embeddings(reader, prefix)
        weights |= convert_vit_encoder(reader, shape, prefix)
        weights |= copy_weight_and_bias(reader, "norm", "vit.layernorm")
        notes.append("CLS token + norm -> ViT")
    weights |= copy_weight_and_bias(reader, "head", "classifier")
    if reader.unused:
        raise UserValueError(
            f"The fine-tuned state dict has tensors this converter does not know: {sorted(reader.unused)[:8]}."
        )
    config.architectures = [model_class.__name__]
    model = build_with_weights(model_class, config, weights)
    notes.append(f"head: {num_labels} classes")
    return model, ConversionSummary(CLASSIFIER, model_class.__name__, config_notes=notes)


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------


def check_output_dir(output_dir: str) -> None:
    if os.path.exists(output_dir) and (not os.path.isdir(output_dir) or os.listdir(output_dir)):
        raise UserValueError(f"{output_dir!r} exists and is not an empty directory; pick a new output directory.")


def authors_eval_crop_pct(image_size: int) -> float:
    """The evaluation crop of the authors' fine-tuning code (their ``util/datasets.py`` ``build_transform``): the
    shorter side resized to ``image_size / 0.95`` for inputs up to 224 px, to ``image_size`` (no crop) above."""
    return 0.95 if image_size <= 224 else 1.0


def save_atomically(model: PreTrainedModel, kind: str, output_dir: str) -> None:
    """Writes into a temporary sibling folder, then moves it to ``output_dir``: a failure leaves nothing behind."""
    parent = os.path.dirname(os.path.abspath(output_dir))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".cim-convert-", dir=parent)
    try:
        model.save_pretrained(staging)
        if kind == CLASSIFIER:
            size = int(model.config.image_size)
            eval_image_processor(size, crop_pct=authors_eval_crop_pct(size)).save_pretrained(staging)
        if os.path.isdir(output_dir):
            os.rmdir(output_dir)  # empty (checked before converting)
        os.replace(staging, output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def convert_checkpoint(
    checkpoint_path: str | os.PathLike, output_dir: str | os.PathLike, options: ConversionOptions | None = None
) -> ConversionSummary:
    """Converts an authors' checkpoint file and writes the transformers checkpoint to ``output_dir``."""
    options = options or ConversionOptions()
    output_dir = os.fspath(output_dir)
    check_output_dir(output_dir)
    state_dict, args = load_original_state_dict(checkpoint_path)
    kind = checkpoint_kind(state_dict)
    convert = convert_pretraining if kind == PRETRAINING else convert_classifier
    model, summary = convert(state_dict, args, options)
    save_atomically(model, kind, output_dir)
    summary.output_dir = output_dir
    return summary


def read_id2label(path: str | None) -> dict[int, str] | None:
    """Class names from a JSON file: a list, or a mapping from class index to name."""
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            labels = json.load(f)
    except (OSError, ValueError) as err:
        raise UserValueError(f"--id2label {path!r} cannot be read as JSON: {err}") from None
    if isinstance(labels, list):
        return {i: str(name) for i, name in enumerate(labels)}
    if isinstance(labels, dict):
        return {int(i): str(name) for i, name in labels.items()}
    raise UserValueError(f"--id2label {path!r} must hold a list of names or an index -> name mapping.")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="cim-convert-original",
        description="Convert a checkpoint of the authors' CIM code (weivision/Correlational-Image-Modeling) to "
        "transformers: a pre-training checkpoint to CIMForPreTraining, a fine-tuned ViT to a stock "
        "image classifier (BEiT with mean pooling, or ViT) that pipeline('image-classification') loads.",
    )
    parser.add_argument("checkpoint", help="the authors' .pth file ({'model': state_dict, ...} or a state dict)")
    parser.add_argument("output_dir", help="new (or empty) directory to write the transformers checkpoint to")
    parser.add_argument(
        "--model_size",
        choices=tuple(VIT_PRESETS),
        default=None,
        help="encoder preset to check the weights against; default: inferred from the weights",
    )
    parser.add_argument(
        "--num_heads",
        type=int,
        default=None,
        help="encoder attention heads; default: the preset's, else by width "
        f"({', '.join(f'{w}: {h}' for w, h in DEFAULT_NUM_HEADS.items())})",
    )
    parser.add_argument(
        "--decoder_num_heads",
        type=int,
        default=DEFAULT_DECODER_NUM_HEADS,
        help="correlation decoder attention heads (default: %(default)s, the authors')",
    )
    parser.add_argument(
        "--exemplar_size",
        type=int,
        default=None,
        help=f"exemplar side in px; default: the checkpoint's args, else {DEFAULT_EXEMPLAR_SIZE}",
    )
    parser.add_argument(
        "--num_exemplars",
        type=int,
        default=None,
        help="exemplars per image; default: the checkpoint's args, else the recipe's 6",
    )
    parser.add_argument(
        "--contrastive_loss_weight",
        type=float,
        default=None,
        help="> 0 keeps the contrastive heads; default: the checkpoint's args (sigma_cont), else 0",
    )
    parser.add_argument(
        "--id2label",
        default=None,
        help="JSON file with the fine-tuned classifier's class names (list or index -> name)",
    )
    args = parser.parse_args(argv)
    try:
        options = ConversionOptions(
            model_size=args.model_size,
            num_heads=args.num_heads,
            decoder_num_heads=args.decoder_num_heads,
            exemplar_size=args.exemplar_size,
            num_exemplars=args.num_exemplars,
            contrastive_loss_weight=args.contrastive_loss_weight,
            id2label=read_id2label(args.id2label),
        )
        summary = convert_checkpoint(args.checkpoint, args.output_dir, options)
    except (OSError, ValueError) as err:
        print(f"cim-convert-original: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 1
    print("\n".join(summary.lines()))
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["ConversionOptions", "ConversionSummary", "convert_checkpoint", "load_original_state_dict", "main"]
