"""Reading a checkpoint of the authors' CIM code (weivision/Correlational-Image-Modeling) for
:mod:`transformers_cim.convert_cim_original_to_hf`: the ``.pth`` file (``torch.load(weights_only=True)``, their
``argparse.Namespace`` of ``args`` allowed), what kind it is (pre-training or fine-tuned classifier), the ViT's sizes
read off the weights' shapes, and the mapping of their weight names (timm ViT blocks, the correlation decoder, the
contrastive MLPs) to ours. Nothing here writes a file."""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import re
from dataclasses import dataclass
from typing import Any

import torch

from .configuration_cim import VIT_PRESETS, vit_preset_patch_size
from .errors import UserPathError, UserValueError
from .modeling_cim import sincos_position_embedding_2d

PRETRAINING = "pretraining"
CLASSIFIER = "classifier"
# attention heads of the standard ViTs by width (heads do not show in the weights' shapes)
DEFAULT_NUM_HEADS: dict[int, int] = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16}
DEFAULT_DECODER_NUM_HEADS = 16  # every decoder of the authors' presets: 512 wide, 16 heads
# the contrastive (MoCo v3 style) MLPs of their pre-training model, and where ours keeps them
CONTRASTIVE_HEADS: dict[str, str] = {
    "decoder_g_embed.": "projector.net.",
    "decoder_predictor.": "predictor.net.",
    "decoder_g_embed_c.": "target_projector.net.",
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
            raise UserValueError(
                f"The {self.what} has no {missing[0]!r}: the checkpoint is incomplete or of another model."
            )

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
        hint = (
            " It holds a config.json: it is already a transformers checkpoint, load it with from_pretrained "
            "(or export its encoder with cim-export-encoder)."
            if os.path.isfile(os.path.join(path, "config.json"))
            else ""
        )
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
        raise UserValueError(
            f"{path!r} cannot be read as a PyTorch checkpoint ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''})."
        ) from None
    return split_checkpoint(checkpoint, path)


def split_checkpoint(checkpoint: Any, path: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict, args) of a loaded checkpoint: ``{"model": state_dict, "args": ...}`` or the state dict itself."""
    if not isinstance(checkpoint, dict):
        raise UserValueError(
            f"{path!r} holds a {type(checkpoint).__name__}, not a dict; expected the authors' "
            "checkpoint ({'model': state_dict, ...}) or a state dict."
        )
    state_dict = checkpoint.get("model", checkpoint)
    if not isinstance(state_dict, dict) or not state_dict:
        raise UserValueError(f"{path!r}: the 'model' entry is not a state dict (got {type(state_dict).__name__}).")
    not_tensors = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise UserValueError(
            f"{path!r} is not a state dict of tensors (entries {not_tensors[:3]} are not tensors); "
            "expected the authors' checkpoint ({'model': state_dict, ...}) or a state dict."
        )
    if all(k.startswith("module.") for k in state_dict):  # saved from a DistributedDataParallel wrapper
        state_dict = {k[len("module.") :]: v for k, v in state_dict.items()}
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
            raise UserValueError(
                f"--model_size {options.model_size} is width/layers/MLP/patch {wanted}, but the "
                f"checkpoint's weights are {found}; drop --model_size to infer it from the weights."
            )
    if options.num_heads is not None:
        heads, source = options.num_heads, "--num_heads"
    elif preset is not None and VIT_PRESETS[preset][0] == hidden and VIT_PRESETS[preset][1] == num_layers:
        heads, source = VIT_PRESETS[preset][2], f"preset {preset}"
    elif hidden in DEFAULT_NUM_HEADS:
        heads, source = DEFAULT_NUM_HEADS[hidden], f"the standard count for width {hidden}"
    else:
        raise UserValueError(
            f"Width {hidden} is not a standard ViT width ({sorted(DEFAULT_NUM_HEADS)}): the number of "
            "attention heads cannot be inferred, pass --num_heads."
        )
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
    pairs = {
        "attn.proj": "attention.o_proj",
        "norm1": "layernorm_before",
        "norm2": "layernorm_after",
        "mlp.fc1": "mlp.fc1",
        "mlp.fc2": "mlp.fc2",
    }
    for theirs, ours in pairs.items():
        for param in ("weight", "bias"):
            out[f"{target}{ours}.{param}"] = reader.take(f"{source}{theirs}.{param}")
    return out


def convert_vit_encoder(
    reader: KeyReader, shape: VitShape, target: str, suffix: str = "", key_bias: bool = True
) -> dict[str, torch.Tensor]:
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
    out |= {
        f"{layer}cross_attention.k_proj.weight": k_w.clone(),
        f"{layer}cross_attention.k_proj.bias": k_b.clone(),
        f"{layer}cross_attention.v_proj.weight": v_w.clone(),
        f"{layer}cross_attention.v_proj.bias": v_b.clone(),
    }
    pairs = {
        "attn.q": "cross_attention.q_proj",
        "attn.proj": "cross_attention.o_proj",
        "norm1": "query_norm",
        "norm2": "mlp_norm",
        "mlp.fc1": "mlp.0",
        "mlp.fc2": "mlp.2",
    }
    for theirs, ours in pairs.items():
        out |= copy_weight_and_bias(reader, f"{block}{theirs}", f"{layer}{ours}")
    out |= copy_weight_and_bias(reader, "decoder_norm", "decoder.norm")
    weight, bias = reader.take("decoder_pred_mask.0.weight"), reader.take("decoder_pred_mask.0.bias")
    if weight.shape[0] != 2:
        raise UserValueError(
            f"decoder_pred_mask.0 has {weight.shape[0]} output channels; the authors' predictor has 2."
        )
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
        raise UserValueError(
            "decoder_pos_embed is not the fixed 2-D sin-cos table (max difference "
            f"{(table - ours).abs().max():.2e}); CIMForPreTraining computes that table and cannot "
            "hold a learned one, so this checkpoint cannot be converted exactly."
        )
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
        out[CONTRASTIVE_HEADS[prefix] + key[len(prefix) :]] = reader.take(key, keep_dtype=True)
    return out, []


__all__ = [
    "CLASSIFIER",
    "CONTRASTIVE_HEADS",
    "ConversionOptions",
    "DEFAULT_DECODER_NUM_HEADS",
    "DEFAULT_NUM_HEADS",
    "KeyReader",
    "PRETRAINING",
    "VitShape",
    "check_decoder_position_table",
    "checkpoint_kind",
    "convert_contrastive_heads",
    "convert_decoder",
    "convert_embeddings",
    "convert_vit_block",
    "convert_vit_encoder",
    "copy_weight_and_bias",
    "load_original_state_dict",
    "preset_from_args",
    "read_vit_shape",
    "split_checkpoint",
    "square_grid",
]
