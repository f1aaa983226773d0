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
import contextlib
import json
import math
import os
import re
import shutil
import sys
import tempfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import BeitForImageClassification, PreTrainedModel, ViTConfig, ViTForImageClassification

from .configuration_cim import VIT_PRESETS, CIMConfig, vit_preset_patch_size
from .errors import UserPathError, UserValueError
from .image_processing import eval_image_processor
from .modeling_cim import CIMForPreTraining, sincos_position_embedding_2d
from .transfer import beit_config_from_vit

PRETRAINING = "pretraining"
CLASSIFIER = "classifier"

# attention heads of the standard ViTs by width (heads do not show in the weights' shapes)
DEFAULT_NUM_HEADS: dict[int, int] = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16}
DEFAULT_DECODER_NUM_HEADS = 16  # every decoder of the authors' presets: 512 wide, 16 heads
DEFAULT_EXEMPLAR_SIZE = 64
LAYER_NORM_EPS = 1e-6  # the authors' LayerNorm (timm's default eps is 1e-6 too)

# the contrastive (MoCo v3 style) MLPs of their pre-training model, and where ours keeps them
CONTRASTIVE_HEADS: dict[str, str] = {
    "decoder_g_embed.": "projector.net.",
    "decoder_predictor.": "predictor.net.",
    "decoder_g_embed_c.": "target_projector.net.",
}

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
class ConversionOptions:
    """What the command line may set; None means "from the checkpoint, else the authors' default"."""

    model_size: str | None = None
    num_heads: int | None = None
    decoder_num_heads: int = DEFAULT_DECODER_NUM_HEADS
    exemplar_size: int | None = None
    num_exemplars: int | None = None
    contrastive_loss_weight: float | None = None
    id2label: dict[int, str] | None = None


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


@dataclass
class VitShape:
    """The sizes of a ViT read off its weights."""

    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    patch_size: int
    image_size: int


class KeyReader:
    """Takes tensors out of a state dict by name, failing with the missing name, and remembers what is left."""

    def __init__(self, state_dict: dict[str, torch.Tensor], what: str):
        self.state_dict, self.what = state_dict, what
        self.unused = set(state_dict)

    def require(self, *keys: str) -> None:
        missing = [key for key in keys if key not in self.state_dict]
        if missing:
            raise UserValueError(f"The {self.what} has no {missing[0]!r}: the checkpoint is incomplete or of another "
                                 "model.")

    def shape(self, key: str) -> torch.Size:
        self.require(key)
        return self.state_dict[key].shape

    def take(self, key: str, keep_dtype: bool = False) -> torch.Tensor:
        """The tensor as float32 (``keep_dtype``: as stored, for BatchNorm's integer step counter)."""
        self.require(key)
        self.unused.discard(key)
        tensor = self.state_dict[key].detach()
        # a copy of its own: safetensors refuses tensors that share memory (a split qkv would)
        return (tensor if keep_dtype else tensor.to(torch.float32)).clone()


# --------------------------------------------------------------------------------------------------
# Reading the file
# --------------------------------------------------------------------------------------------------


def allowing_args_namespace() -> contextlib.AbstractContextManager:
    """A context in which ``torch.load(weights_only=True)`` also builds ``argparse.Namespace`` (their ``args``)."""
    if hasattr(torch.serialization, "safe_globals"):
        return torch.serialization.safe_globals([argparse.Namespace])
    torch.serialization.add_safe_globals([argparse.Namespace])  # torch 2.4 has only the process-wide list
    return contextlib.nullcontext()


def load_original_state_dict(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The state dict and the training arguments (empty when absent) of an authors' checkpoint file."""
    path = os.fspath(path)
    if os.path.isdir(path):
        hint = (" It holds a config.json: it is already a transformers checkpoint, load it with from_pretrained "
                "(or export its encoder with cim-export-encoder)." if os.path.isfile(os.path.join(path, "config.json"))
                else "")
        raise UserValueError(f"{path!r} is a directory; pass the authors' .pth checkpoint file itself.{hint}")
    if not os.path.isfile(path):
        raise UserPathError(f"No checkpoint file at {path!r}.")
    try:
        with allowing_args_namespace():
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001  (torch raises pickle, zip and key errors alike for unreadable files)
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(err))
        if found:
            raise UserValueError(
                f"{path!r} holds a Python object ({found.group(1)}) that only an unrestricted unpickler can build, "
                "and this converter loads with torch.load(weights_only=True) only. If you trust the file, "
                "re-save just its weights: torch.save({'model': torch.load(path, weights_only=False)['model']}, "
                "'weights.pth'), and convert that."
            ) from None
        raise UserValueError(f"{path!r} cannot be read as a PyTorch checkpoint ({type(err).__name__}: "
                             f"{str(err).splitlines()[0] if str(err) else ''}).") from None
    return split_checkpoint(checkpoint, path)


def split_checkpoint(checkpoint: Any, path: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict, args) of a loaded checkpoint: ``{"model": state_dict, "args": ...}`` or the state dict itself."""
    if not isinstance(checkpoint, dict):
        raise UserValueError(f"{path!r} holds a {type(checkpoint).__name__}, not a dict; expected the authors' "
                             "checkpoint ({'model': state_dict, ...}) or a state dict.")
    state_dict = checkpoint.get("model", checkpoint)
    if not isinstance(state_dict, dict) or not state_dict:
        raise UserValueError(f"{path!r}: the 'model' entry is not a state dict (got {type(state_dict).__name__}).")
    not_tensors = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise UserValueError(f"{path!r} is not a state dict of tensors (entries {not_tensors[:3]} are not tensors); "
                             "expected the authors' checkpoint ({'model': state_dict, ...}) or a state dict.")
    if all(k.startswith("module.") for k in state_dict):  # saved from a DistributedDataParallel wrapper
        state_dict = {k[len("module."):]: v for k, v in state_dict.items()}
    args = checkpoint.get("args") if "model" in checkpoint else None
    if isinstance(args, argparse.Namespace):
        args = vars(args)
    return state_dict, dict(args) if isinstance(args, dict) else {}


def checkpoint_kind(state_dict: dict[str, torch.Tensor]) -> str:
    """PRETRAINING or CLASSIFIER, from the keys; a clear error for anything else."""
    keys = set(state_dict)
    if any(k.startswith(("decoder_corr_block.", "blocks_c.")) for k in keys):
        return PRETRAINING
    if "head.weight" in keys and any(k.startswith("blocks.") for k in keys):
        return CLASSIFIER
    if "mask_token" in keys or any(k.startswith("decoder_blocks.") for k in keys):
        found = "an MAE pre-training state dict"
    elif any(k.startswith(("vit.", "beit.", "encoder.", "layers.")) for k in keys):
        found = "a transformers-style state dict"
    else:
        found = f"keys such as {sorted(keys)[:4]}"
    raise UserValueError(
        f"This is not a checkpoint of the authors' CIM code (found {found}). Expected either their pre-training "
        "model (keys blocks.N.*, blocks_c.N.*, decoder_corr_block.block.*) or their fine-tuned ViT (keys blocks.N.*, "
        "head.*). A transformers checkpoint directory needs no conversion: load it with from_pretrained."
    )


# --------------------------------------------------------------------------------------------------
# Shapes
# --------------------------------------------------------------------------------------------------


def square_grid(num_positions: int, what: str) -> int:
    grid = math.isqrt(num_positions)
    if grid * grid != num_positions:
        raise UserValueError(f"{what} has {num_positions} patch positions, not a square grid.")
    return grid


def preset_from_args(args: dict[str, Any]) -> str | None:
    """Our preset name for their ``--model`` (``cim_vit_base_patch16``, ``vit_huge_patch14``), if it is one."""
    found = re.search(r"vit_(tiny|small|base|large|huge)_patch(\d+)", str(args.get("model", "")))
    name = f"vit-{found.group(1)}-patch{found.group(2)}" if found else None
    return name if name in VIT_PRESETS else None


def read_vit_shape(reader: KeyReader, options: ConversionOptions, args: dict[str, Any]) -> tuple[VitShape, list[str]]:
    """The encoder's sizes from the shapes of ``patch_embed``, ``blocks`` and ``pos_embed``; heads from
    ``--num_heads``, else the preset (``--model_size`` or their ``args.model``), else the width's standard count."""
    hidden, _, patch, patch_w = reader.shape("patch_embed.proj.weight")
    if patch != patch_w:
        raise UserValueError(f"Non-square patches ({patch} x {patch_w}) are not supported.")
    intermediate = reader.shape("blocks.0.mlp.fc1.weight")[0]
    num_layers = 1 + max(int(k.split(".")[1]) for k in reader.state_dict if re.match(r"blocks\.\d+\.", k))
    image_size = square_grid(reader.shape("pos_embed")[1] - 1, "pos_embed") * patch
    notes = [f"encoder: width {hidden}, {num_layers} layers, MLP {intermediate}, patch {patch}, image {image_size} px"]

    if options.model_size is not None and options.model_size not in VIT_PRESETS:
        raise UserValueError(f"Unknown --model_size {options.model_size!r}; choose one of {', '.join(VIT_PRESETS)}.")
    preset = options.model_size or preset_from_args(args)
    if options.model_size is not None:
        expected = VIT_PRESETS[options.model_size]
        found = (hidden, num_layers, intermediate, patch)
        wanted = (expected[0], expected[1], expected[3], vit_preset_patch_size(options.model_size))
        if found != wanted:
            raise UserValueError(f"--model_size {options.model_size} is width/layers/MLP/patch {wanted}, but the "
                                 f"checkpoint's weights are {found}; drop --model_size to infer it from the weights.")
    if options.num_heads is not None:
        heads, source = options.num_heads, "--num_heads"
    elif preset is not None and VIT_PRESETS[preset][0] == hidden and VIT_PRESETS[preset][1] == num_layers:
        heads, source = VIT_PRESETS[preset][2], f"preset {preset}"
    elif hidden in DEFAULT_NUM_HEADS:
        heads, source = DEFAULT_NUM_HEADS[hidden], f"the standard count for width {hidden}"
    else:
        raise UserValueError(f"Width {hidden} is not a standard ViT width ({sorted(DEFAULT_NUM_HEADS)}): the number of "
                             "attention heads cannot be inferred, pass --num_heads.")
    if hidden % heads:
        raise UserValueError(f"{heads} attention heads do not divide the width {hidden}; pass the right --num_heads.")
    notes.append(f"encoder: {heads} attention heads ({source})")
    return VitShape(hidden, num_layers, heads, intermediate, patch, image_size), notes


# --------------------------------------------------------------------------------------------------
# Weight mapping
# --------------------------------------------------------------------------------------------------


def convert_embeddings(reader: KeyReader, target: str, patch_prefix: str = "patch_embed.") -> dict[str, torch.Tensor]:
    """Patch projection, CLS token and position table -> ``{target}embeddings.*``."""
    return {
        f"{target}embeddings.patch_embeddings.projection.weight": reader.take(f"{patch_prefix}proj.weight"),
        f"{target}embeddings.patch_embeddings.projection.bias": reader.take(f"{patch_prefix}proj.bias"),
        f"{target}embeddings.cls_token": reader.take("cls_token"),
        f"{target}embeddings.position_embeddings": reader.take("pos_embed"),
    }


def convert_vit_block(reader: KeyReader, source: str, target: str, key_bias: bool = True) -> dict[str, torch.Tensor]:
    """One timm block (``norm1``, fused ``attn.qkv``, ``attn.proj``, ``norm2``, ``mlp.fc1/fc2``) -> one transformers
    ViT / BEiT layer. ``key_bias=False`` drops the key bias (BEiT has none; see the module docstring)."""
    out: dict[str, torch.Tensor] = {}
    q_w, k_w, v_w = reader.take(f"{source}attn.qkv.weight").chunk(3, dim=0)  # rows: queries, keys, values
    q_b, k_b, v_b = reader.take(f"{source}attn.qkv.bias").chunk(3, dim=0)
    for name, weight, bias in (("q_proj", q_w, q_b), ("k_proj", k_w, k_b), ("v_proj", v_w, v_b)):
        out[f"{target}attention.{name}.weight"] = weight.clone()
        if name != "k_proj" or key_bias:
            out[f"{target}attention.{name}.bias"] = bias.clone()
    pairs = {"attn.proj": "attention.o_proj", "norm1": "layernorm_before", "norm2": "layernorm_after",
             "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
    for theirs, ours in pairs.items():
        for param in ("weight", "bias"):
            out[f"{target}{ours}.{param}"] = reader.take(f"{source}{theirs}.{param}")
    return out


def convert_vit_encoder(reader: KeyReader, shape: VitShape, target: str, suffix: str = "",
                        key_bias: bool = True) -> dict[str, torch.Tensor]:
    """All blocks ``blocks{suffix}.N.*`` -> ``{target}layers.N.*``."""
    out: dict[str, torch.Tensor] = {}
    for index in range(shape.num_layers):
        out.update(convert_vit_block(reader, f"blocks{suffix}.{index}.", f"{target}layers.{index}.", key_bias))
    return out


def copy_weight_and_bias(reader: KeyReader, source: str, target: str) -> dict[str, torch.Tensor]:
    """``{source}.weight/bias`` (a Linear or LayerNorm) -> ``{target}.weight/bias``."""
    return {f"{target}.weight": reader.take(f"{source}.weight"), f"{target}.bias": reader.take(f"{source}.bias")}


def convert_decoder(reader: KeyReader) -> dict[str, torch.Tensor]:
    """Their ``decoder_embed``, ``decoder_corr_block.block`` (``attn.q``, fused ``attn.kv``), ``decoder_norm`` and
    2-channel ``decoder_pred_mask.0`` -> our ``decoder.*``. ``decoder_pos_embed`` is checked, not copied."""
    block, layer = "decoder_corr_block.block.", "decoder.layers.0."
    out = copy_weight_and_bias(reader, "decoder_embed", "decoder.input_proj")
    k_w, v_w = reader.take(f"{block}attn.kv.weight").chunk(2, dim=0)  # rows: keys, then values
    k_b, v_b = reader.take(f"{block}attn.kv.bias").chunk(2, dim=0)
    out |= {f"{layer}cross_attention.k_proj.weight": k_w.clone(), f"{layer}cross_attention.k_proj.bias": k_b.clone(),
            f"{layer}cross_attention.v_proj.weight": v_w.clone(), f"{layer}cross_attention.v_proj.bias": v_b.clone()}
    pairs = {"attn.q": "cross_attention.q_proj", "attn.proj": "cross_attention.o_proj",
             "norm1": "query_norm", "norm2": "mlp_norm", "mlp.fc1": "mlp.0", "mlp.fc2": "mlp.2"}
    for theirs, ours in pairs.items():
        out |= copy_weight_and_bias(reader, f"{block}{theirs}", f"{layer}{ours}")
    out |= copy_weight_and_bias(reader, "decoder_norm", "decoder.norm")
    weight, bias = reader.take("decoder_pred_mask.0.weight"), reader.take("decoder_pred_mask.0.bias")
    if weight.shape[0] != 2:
        raise UserValueError(f"decoder_pred_mask.0 has {weight.shape[0]} output channels; the authors' predictor "
                             "has 2.")
    # channel 1 is "inside the exemplar" (their masks are 1 there): softmax(l0, l1)[1] = sigmoid(l1 - l0)
    out["decoder.predictor.weight"] = (weight[1] - weight[0]).unsqueeze(0)
    out["decoder.predictor.bias"] = (bias[1] - bias[0]).reshape(1)
    return out


def check_decoder_position_table(reader: KeyReader, patch_size: int) -> int:
    """The context size; their fixed ``decoder_pos_embed`` must be the sin-cos table our decoder computes."""
    table = reader.take("decoder_pos_embed")[0]
    grid = square_grid(table.shape[0] - 1, "decoder_pos_embed")
    ours = sincos_position_embedding_2d(grid, table.shape[1], with_cls=True)
    if not torch.allclose(table, ours, atol=1e-5):
        raise UserValueError("decoder_pos_embed is not the fixed 2-D sin-cos table (max difference "
                             f"{(table - ours).abs().max():.2e}); CIMForPreTraining computes that table and cannot "
                             "hold a learned one, so this checkpoint cannot be converted exactly.")
    return grid * patch_size


def convert_contrastive_heads(reader: KeyReader, keep: bool) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Their contrastive MLPs -> our projector / predictor / target_projector when kept; else their keys."""
    out: dict[str, torch.Tensor] = {}
    names = sorted(k for k in reader.state_dict if k.startswith(tuple(CONTRASTIVE_HEADS)))
    if not keep:
        for key in names:
            reader.take(key, keep_dtype=True)
        return out, names
    for key in names:
        prefix = next(p for p in CONTRASTIVE_HEADS if key.startswith(p))
        out[CONTRASTIVE_HEADS[prefix] + key[len(prefix):]] = reader.take(key, keep_dtype=True)
    return out, []


# --------------------------------------------------------------------------------------------------
# Configs and models
# --------------------------------------------------------------------------------------------------


def vit_config(shape: VitShape, **kwargs) -> ViTConfig:
    return ViTConfig(hidden_size=shape.hidden_size, num_hidden_layers=shape.num_layers,
                        num_attention_heads=shape.num_heads, intermediate_size=shape.intermediate_size,
                        patch_size=shape.patch_size, image_size=shape.image_size, hidden_act="gelu",
                        layer_norm_eps=LAYER_NORM_EPS, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                        **kwargs)


def pretext_settings(args: dict[str, Any], options: ConversionOptions, patch_size: int,
                     context_size: int) -> tuple[dict[str, Any], list[str]]:
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
    overrides = {"exemplar_size": options.exemplar_size, "num_exemplars": options.num_exemplars,
                 "contrastive_loss_weight": options.contrastive_loss_weight}
    fields |= {name: value for name, value in overrides.items() if value is not None}
    size = int(fields.get("exemplar_size", DEFAULT_EXEMPLAR_SIZE))
    fields["exemplar_size"] = min(size - size % patch_size, context_size)
    if fields["exemplar_size"] != size:
        notes.append(f"exemplars: {fields['exemplar_size']} px instead of {size} (a multiple of the patch, at most "
                     "the context)")
    if "context_size" in args and int(args["context_size"]) != context_size:
        notes.append(f"context: {context_size} px (the decoder's patch grid); their args say {args['context_size']}, "
                     "which their code floors to the same grid")
    return fields, notes


def build_with_weights(model_class: type[PreTrainedModel], config, weights: dict[str, torch.Tensor]) -> PreTrainedModel:
    """An instance of ``model_class`` holding exactly ``weights`` (built on the meta device: no random init)."""
    with torch.device("meta"):
        model = model_class(config)
    try:
        model.load_state_dict(weights, strict=True, assign=True)
    except RuntimeError as err:
        raise UserValueError(f"The converted weights do not fit {model_class.__name__}: "
                             f"{' '.join(str(err).split())[:600]}") from None
    left_on_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left_on_meta:
        raise RuntimeError(f"Not filled by the conversion: {left_on_meta[:5]}")
    return model.eval()


def convert_pretraining(state_dict: dict[str, torch.Tensor], args: dict[str, Any],
                        options: ConversionOptions) -> tuple[CIMForPreTraining, ConversionSummary]:
    """Their ``CorrelationalAutoencoderViT`` state dict -> a `CIMForPreTraining`."""
    reader = KeyReader(state_dict, "pre-training state dict")
    shape, notes = read_vit_shape(reader, options, args)
    context_size = check_decoder_position_table(reader, shape.patch_size)
    decoder_width = reader.shape("decoder_embed.weight")[0]
    decoder_mlp = reader.shape("decoder_corr_block.block.mlp.fc1.weight")[0]
    if int(decoder_width * (decoder_mlp / decoder_width)) != decoder_mlp:
        raise UserValueError(f"The decoder MLP width {decoder_mlp} is not a ratio of its width {decoder_width} that "
                             "CIMConfig.decoder_mlp_ratio can express.")
    fields, pretext_notes = pretext_settings(args, options, shape.patch_size, context_size)
    keep_heads = float(fields.get("contrastive_loss_weight", 0.0)) > 0
    if keep_heads:
        fields["projector_hidden_size"] = reader.shape("decoder_g_embed.0.weight")[0]
        fields["projector_output_size"] = reader.shape("decoder_g_embed.6.weight")[0]
    try:
        config = CIMConfig(
            encoder_config=vit_config(shape, qkv_bias=True), image_size=shape.image_size, context_size=context_size,
            decoder_hidden_size=decoder_width, decoder_num_attention_heads=options.decoder_num_heads,
            decoder_num_layers=1, decoder_mlp_ratio=decoder_mlp / decoder_width,
            decoder_shared_norm=True, decoder_align_corners=True, **fields,
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
        raise UserValueError(f"The pre-training state dict has tensors this converter does not know: "
                             f"{sorted(reader.unused)[:8]}; it may come from a modified model.")
    model = build_with_weights(CIMForPreTraining, config, weights)
    notes += [f"decoder: width {decoder_width}, {options.decoder_num_heads} heads, MLP {decoder_mlp}, "
              f"context {context_size} px, exemplars {config.num_exemplars} x {config.exemplar_size} px",
              "decoder_pos_embed: equal to the sin-cos table CIMForPreTraining computes (not stored)"]
    notes += pretext_notes
    if dropped:
        notes.append("contrastive heads dropped: the config has contrastive_loss_weight 0 "
                     "(keep them with --contrastive_loss_weight > 0)")
    summary = ConversionSummary(PRETRAINING, type(model).__name__, config_notes=notes, dropped_keys=dropped)
    return model, summary


def convert_classifier(state_dict: dict[str, torch.Tensor], args: dict[str, Any],
                       options: ConversionOptions) -> tuple[PreTrainedModel, ConversionSummary]:
    """Their fine-tuned timm ViT -> `BeitForImageClassification` (mean pooling) or `ViTForImageClassification`
    (CLS token)."""
    reader = KeyReader(state_dict, "fine-tuned state dict")
    shape, notes = read_vit_shape(reader, options, args)
    has_fc_norm, has_norm = "fc_norm.weight" in state_dict, "norm.weight" in state_dict
    if has_fc_norm == has_norm:
        raise UserValueError("The fine-tuned state dict must have exactly one of fc_norm.* (global pooling) and "
                             f"norm.* (CLS token); it has {'both' if has_norm else 'neither'}.")
    num_labels = reader.shape("head.weight")[0]
    id2label = options.id2label or {i: f"LABEL_{i}" for i in range(num_labels)}
    if len(id2label) != num_labels:
        raise UserValueError(f"--id2label has {len(id2label)} labels, the head has {num_labels} outputs.")
    labels = {"id2label": id2label, "label2id": {v: k for k, v in id2label.items()}}
    if has_fc_norm:
        config = beit_config_from_vit(vit_config(shape), use_mean_pooling=True, drop_path_rate=0.0,
                                      **labels)
        prefix, model_class = "beit.", BeitForImageClassification
        weights = convert_embeddings(reader, prefix)
        weights |= convert_vit_encoder(reader, shape, prefix, key_bias=False)
        weights |= copy_weight_and_bias(reader, "fc_norm", "beit.pooler.layernorm")
        notes.append("global pooling + fc_norm -> BEiT with mean pooling; key biases dropped (exact: softmax "
                     "ignores a per-query constant)")
    else:
        config = vit_config(shape, qkv_bias=True, **labels)
        prefix, model_class = "vit.", ViTForImageClassification
        weights = convert_embeddings(reader, prefix)
        weights |= convert_vit_encoder(reader, shape, prefix)
        weights |= copy_weight_and_bias(reader, "norm", "vit.layernorm")
        notes.append("CLS token + norm -> ViT")
    weights |= copy_weight_and_bias(reader, "head", "classifier")
    if reader.unused:
        raise UserValueError(f"The fine-tuned state dict has tensors this converter does not know: "
                             f"{sorted(reader.unused)[:8]}.")
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


def convert_checkpoint(checkpoint_path: str | os.PathLike, output_dir: str | os.PathLike,
                       options: ConversionOptions | None = None) -> ConversionSummary:
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
    parser.add_argument("--model_size", choices=tuple(VIT_PRESETS), default=None,
                        help="encoder preset to check the weights against; default: inferred from the weights")
    parser.add_argument("--num_heads", type=int, default=None,
                        help="encoder attention heads; default: the preset's, else by width "
                             f"({', '.join(f'{w}: {h}' for w, h in DEFAULT_NUM_HEADS.items())})")
    parser.add_argument("--decoder_num_heads", type=int, default=DEFAULT_DECODER_NUM_HEADS,
                        help="correlation decoder attention heads (default: %(default)s, the authors')")
    parser.add_argument("--exemplar_size", type=int, default=None,
                        help=f"exemplar side in px; default: the checkpoint's args, else {DEFAULT_EXEMPLAR_SIZE}")
    parser.add_argument("--num_exemplars", type=int, default=None,
                        help="exemplars per image; default: the checkpoint's args, else the recipe's 6")
    parser.add_argument("--contrastive_loss_weight", type=float, default=None,
                        help="> 0 keeps the contrastive heads; default: the checkpoint's args (sigma_cont), else 0")
    parser.add_argument("--id2label", default=None,
                        help="JSON file with the fine-tuned classifier's class names (list or index -> name)")
    args = parser.parse_args(argv)
    try:
        options = ConversionOptions(
            model_size=args.model_size, num_heads=args.num_heads, decoder_num_heads=args.decoder_num_heads,
            exemplar_size=args.exemplar_size, num_exemplars=args.num_exemplars,
            contrastive_loss_weight=args.contrastive_loss_weight, id2label=read_id2label(args.id2label),
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
