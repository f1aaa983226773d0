"""The candidates of bench_step.py: the CIM and MAE configs at each size, the models (the CIM decoder with shared or
repeated queries), their optimizer, one timed training step each, and the search views they train on."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable

import _common as C
import torch
from _step_decoder_check import emulate_repeated_queries
from transformers import ViTMAEConfig, ViTMAEForPreTraining

from transformers_cim import CIMConfig, CIMForPreTraining

CIM_VARIANTS = ("cim-shared", "cim-repeated")


@dataclasses.dataclass(frozen=True)
class SizeSpec:
    """The input and decoder sizes of one `--size`; `None` keeps the `--model` preset's value."""

    default_model: str
    default_batch_size: int
    image_size: int
    context_size: int
    exemplar_size: int
    num_exemplars: int
    decoder_hidden_size: int
    decoder_num_attention_heads: int
    mae_decoder_hidden_size: int
    mae_decoder_layers: int
    mae_decoder_heads: int
    mae_decoder_mlp: int
    mae_norm_pix_loss: bool
    patch_size: int | None = None
    num_layers: int | None = None


SIZES: dict[str, SizeSpec] = {
    # the package defaults (the authors' recipe) and the stock MAE decoder: today's behaviour of this script
    "recipe": SizeSpec(
        default_model="vit-small-patch16",
        default_batch_size=8,
        image_size=224,
        context_size=160,
        exemplar_size=64,
        num_exemplars=6,
        decoder_hidden_size=512,
        decoder_num_attention_heads=16,
        mae_decoder_hidden_size=512,
        mae_decoder_layers=8,
        mae_decoder_heads=16,
        mae_decoder_mlp=2048,
        mae_norm_pix_loss=False,
    ),
    # benchmarks/quality/run_quality.py CPU_PRESET (its MAE: normalised-pixel loss, decoder MLP 4 x width)
    "small": SizeSpec(
        default_model="vit-tiny-patch16",
        default_batch_size=16,
        image_size=96,
        context_size=64,
        exemplar_size=32,
        num_exemplars=6,
        decoder_hidden_size=256,
        decoder_num_attention_heads=8,
        mae_decoder_hidden_size=128,
        mae_decoder_layers=2,
        mae_decoder_heads=4,
        mae_decoder_mlp=512,
        mae_norm_pix_loss=True,
        patch_size=8,
        num_layers=6,
    ),
}


def cim_variants(args: argparse.Namespace) -> tuple[str, ...]:
    """The CIM candidates `--decoder_queries` asks for."""
    return CIM_VARIANTS if args.decoder_queries == "both" else (f"cim-{args.decoder_queries}",)


def cim_config(model: str, size: str) -> CIMConfig:
    """The package's default CIM config for encoder preset `model`, with the sizes of `size`."""
    spec = SIZES[size]
    config = CIMConfig.from_preset(
        model,
        image_size=spec.image_size,
        context_size=spec.context_size,
        exemplar_size=spec.exemplar_size,
        num_exemplars=spec.num_exemplars,
        decoder_hidden_size=spec.decoder_hidden_size,
        decoder_num_attention_heads=spec.decoder_num_attention_heads,
    )
    if spec.patch_size is None and spec.num_layers is None:
        return config
    if spec.patch_size is not None:
        config.encoder_config.patch_size = spec.patch_size
    if spec.num_layers is not None:
        config.encoder_config.num_hidden_layers = spec.num_layers
    return CIMConfig.from_dict(config.to_dict())  # re-validated with the new encoder sizes


def mae_config(cim: CIMConfig, size: str) -> ViTMAEConfig:
    """`ViTMAEConfig` with the CIM config's encoder (width, depth, heads, MLP, patch, view size) and the MAE
    decoder of `size`."""
    spec, enc = SIZES[size], cim.encoder_config
    return ViTMAEConfig(
        hidden_size=enc.hidden_size,
        num_hidden_layers=enc.num_hidden_layers,
        num_attention_heads=enc.num_attention_heads,
        intermediate_size=enc.intermediate_size,
        image_size=cim.image_size,
        patch_size=enc.patch_size,
        qkv_bias=True,
        layer_norm_eps=1e-6,
        mask_ratio=0.75,
        norm_pix_loss=spec.mae_norm_pix_loss,
        decoder_hidden_size=spec.mae_decoder_hidden_size,
        decoder_num_hidden_layers=spec.mae_decoder_layers,
        decoder_num_attention_heads=spec.mae_decoder_heads,
        decoder_intermediate_size=spec.mae_decoder_mlp,
    )


def build_model(name: str, args: argparse.Namespace) -> torch.nn.Module:
    """A fresh model of candidate `name` ("cim-shared", "cim-repeated" or "mae")."""
    config = cim_config(args.model, args.size)
    if name == "mae":
        return ViTMAEForPreTraining(mae_config(config, args.size))
    model = CIMForPreTraining(config)
    if name == "cim-repeated":
        emulate_repeated_queries(model.decoder)
    return model


def build_models(args: argparse.Namespace, device: torch.device) -> dict[str, torch.nn.Module]:
    """The timed models, in training mode on `device`; the CIM variants share their initial weights."""
    models = {name: build_model(name, args).to(device).train() for name in (*cim_variants(args), "mae")}
    if "cim-shared" in models and "cim-repeated" in models:
        models["cim-repeated"].load_state_dict(models["cim-shared"].state_dict())
    return models


def make_optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=1.5e-4, betas=(0.9, 0.95), weight_decay=0.05)


def make_step(model, runner, optimizer, pixel_values, device, dtype: str, ema: bool) -> Callable[[], torch.Tensor]:
    """A closure running one full training step of `runner` (the model, or its compiled wrapper)."""

    def step():
        with C.autocast(device, dtype):
            loss = runner(pixel_values).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if ema:
            model.momentum_update(0.99)
        return loss

    return step


def make_steps(
    name: str, model: torch.nn.Module, args: argparse.Namespace, device: torch.device, pixel_values: torch.Tensor
) -> tuple[Callable[[], torch.Tensor], Callable[[], torch.Tensor]]:
    """(timed step, eager step for the FLOP count) of one candidate, sharing one optimizer."""
    runner = torch.compile(model) if args.compile else model
    optimizer = make_optimizer(model)
    ema = name.startswith("cim") and not args.no_ema
    return (
        make_step(model, runner, optimizer, pixel_values, device, args.dtype, ema),
        make_step(model, model, optimizer, pixel_values, device, args.dtype, ema),
    )


def search_views(args: argparse.Namespace, device: torch.device, generator: torch.Generator | None = None):
    """The synthetic N(0, 1) batch of search views every candidate trains on."""
    size = SIZES[args.size].image_size
    return torch.randn(args.batch_size, 3, size, size, generator=generator).to(device)
