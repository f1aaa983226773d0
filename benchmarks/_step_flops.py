"""Analytic matmul FLOPs of one training step (forward + backward, per image) of CIM and MAE, which
bench_step.py checks `FlopCounterMode`'s count against."""

from __future__ import annotations

import torch
from transformers import ViTMAEConfig

from transformers_cim import CIMConfig


def vit_layers_fwd(tokens: int, hidden: int, mlp: int, layers: int) -> int:
    """QKV + output projections, MLP, and the two attention matmuls, forward, one sequence."""
    per_layer = 2 * tokens * (4 * hidden * hidden + 2 * hidden * mlp) + 4 * tokens * tokens * hidden
    return layers * per_layer


def patch_embed_fwd(patches: int, hidden: int, patch: int) -> int:
    """The patch projection (a patch x patch stride-patch convolution over 3 channels), forward."""
    return 2 * patches * 3 * patch * patch * hidden


def cim_decoder_fwd(config: CIMConfig, shared_queries: bool) -> int:
    """Forward matmul FLOPs of the correlation decoder per image. With `shared_queries` the first layer's q
    projection runs once per image, otherwise once per exemplar (every other layer runs per exemplar)."""
    d, e, k = config.encoder_hidden_size, config.decoder_hidden_size, config.num_exemplars
    pc, pe = (config.context_size // config.encoder_stride) ** 2, (config.exemplar_size // config.encoder_stride) ** 2
    lc, le = pc + 1, pe + 1
    hidden = int(e * config.decoder_mlp_ratio)
    per_exemplar_layer = (
        2 * lc * e * e  # o projection (q: below)
        + 2 * le * e * e * 2  # k and v projections
        + 4 * lc * le * e  # attention
        + 2 * lc * e * hidden * 2
    )  # MLP
    q_projections = sum(1 if shared_queries and index == 0 else k for index in range(config.decoder_num_layers))
    layers = k * per_exemplar_layer * config.decoder_num_layers + q_projections * 2 * lc * e * e
    input_proj = 2 * lc * d * e + k * 2 * le * d * e
    predictor = k * 2 * pc * e  # 1x1 conv
    return input_proj + layers + predictor


def analytic_flops_cim(config: CIMConfig, shared_queries: bool = True) -> dict[str, int]:
    enc = config.encoder_config
    d, mlp, depth, patch = enc.hidden_size, enc.intermediate_size, enc.num_hidden_layers, config.encoder_stride
    k, e = config.num_exemplars, config.decoder_hidden_size
    pc, pe = (config.context_size // patch) ** 2, (config.exemplar_size // patch) ** 2
    lc, le = pc + 1, pe + 1
    target = patch_embed_fwd(pc, d, patch) + vit_layers_fwd(lc, d, mlp, depth)  # forward only (no grad)
    # online: patch projection frozen on pixels -> forward only; the layers train -> forward + 2x backward
    online = k * (patch_embed_fwd(pe, d, patch) + 3 * vit_layers_fwd(le, d, mlp, depth))
    # backward is 2x forward, except the context side of input_proj (its input, the target tokens, needs no grad)
    decoder = 3 * cim_decoder_fwd(config, shared_queries) - 2 * lc * d * e
    return {"online encoder": online, "target encoder": target, "decoder": decoder, "total": online + target + decoder}


def analytic_flops_mae(config: ViTMAEConfig) -> dict[str, int]:
    d, mlp, depth = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    patches = (config.image_size // config.patch_size) ** 2
    visible = int(round(patches * (1 - config.mask_ratio))) + 1
    e, dmlp, ddepth = config.decoder_hidden_size, config.decoder_intermediate_size, config.decoder_num_hidden_layers
    # patch projection: forward + weight grad (its input, the pixels, needs none)
    encoder = 2 * patch_embed_fwd(patches, d, config.patch_size) + 3 * vit_layers_fwd(visible, d, mlp, depth)
    decoder_fwd = (
        2 * visible * d * e
        + vit_layers_fwd(patches + 1, e, dmlp, ddepth)
        + 2 * (patches + 1) * e * config.patch_size**2 * 3
    )
    decoder = 3 * decoder_fwd
    return {"online encoder": encoder, "target encoder": 0, "decoder": decoder, "total": encoder + decoder}


def analytic_flops(name: str, model: torch.nn.Module) -> dict[str, int]:
    if name == "mae":
        return analytic_flops_mae(model.config)
    return analytic_flops_cim(model.config, shared_queries=name == "cim-shared")


def flop_prefixes(name: str) -> dict[str, str]:
    """FlopCounterMode module paths of each component of candidate `name`."""
    if name == "mae":
        return {"online encoder": "ViTMAEForPreTraining.vit", "decoder": "ViTMAEForPreTraining.decoder"}
    return {
        "online encoder": "CIMForPreTraining.vit",
        "target encoder": "CIMForPreTraining.target_encoder",
        "decoder": "CIMForPreTraining.decoder",
    }
