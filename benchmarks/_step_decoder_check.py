"""The "before" decoder of bench_step.py: the context queries repeated per exemplar, as the decoder ran before
it shared them, emulated on a second CIM model with the same weights, and the check that both give the same
logits and loss."""

from __future__ import annotations

from collections.abc import Callable

import torch

from transformers_cim import CIMForPreTraining
from transformers_cim.modeling_cim import CIMCorrelationDecoder, CIMDecoderLayer
from transformers_cim.pretext import sample_config_boxes

CHECK_TOLERANCE = 1e-5  # largest |logit| and |loss| difference accepted between the two decoders


def repeat_queries_per_exemplar(layer: CIMDecoderLayer) -> None:
    """Makes `layer` take per-image queries as the decoder before the query sharing did: the queries are first
    repeated once per exemplar (image-major, like the exemplars), then the layer runs with `num_exemplars=1`, so
    its query LayerNorm and q projection run on all B*K copies."""
    shared_forward = layer.forward

    def forward(queries: torch.Tensor, exemplar: torch.Tensor, num_exemplars: int = 1) -> torch.Tensor:
        if num_exemplars > 1:
            queries = queries.repeat_interleave(num_exemplars, dim=0)
        return shared_forward(queries, exemplar, 1)

    layer.forward = forward


def emulate_repeated_queries(decoder: CIMCorrelationDecoder) -> None:
    """The decoder before its first layer shared the query-side work across the K exemplars: every layer gets
    (B*K, Lc, D) queries and runs per exemplar. Only the first layer is ever called with num_exemplars > 1;
    wrapping every layer keeps that true whatever the layer count."""
    for layer in decoder.layers:
        repeat_queries_per_exemplar(layer)


@torch.no_grad()
def check_repeated_matches_shared(
    shared: CIMForPreTraining, repeated: CIMForPreTraining, pixel_values: torch.Tensor, seed: int
) -> dict[str, float]:
    """Runs both models (same weights, fp32, training mode) on the same views with the same fixed exemplar
    boxes and the same seeded augmentation draws; returns the largest |difference| of the logits and of the
    loss. BatchNorm-free models: the forward changes no state."""
    boxes = sample_config_boxes(
        shared.config,
        pixel_values.shape[0],
        shared.config.num_exemplars,
        generator=torch.Generator().manual_seed(seed),
        device=pixel_values.device,
    )
    outputs = []
    for model in (shared, repeated):
        generator = torch.Generator(device=pixel_values.device).manual_seed(seed)
        outputs.append(model(pixel_values, exemplar_boxes=boxes, generator=generator))
    a, b = outputs
    return {"logits": (a.logits - b.logits).abs().max().item(), "loss": (a.loss - b.loss).abs().item()}


def decoder_check(
    models: dict[str, torch.nn.Module],
    device: torch.device,
    pixel_values: torch.Tensor,
    seed: int,
    build_shared: Callable[[], torch.nn.Module],
) -> dict[str, float] | None:
    """The check of the emulated decoder, on the timed model(s) before their first step (a shared-query copy
    with the same weights, made by `build_shared`, stands in when only `repeated` is timed). None when `repeated`
    is not timed."""
    if "cim-repeated" not in models:
        return None
    repeated = models["cim-repeated"]
    shared = models.get("cim-shared")
    if shared is None:
        shared = build_shared().to(device).train()
        shared.load_state_dict(repeated.state_dict())
    diff = check_repeated_matches_shared(shared, repeated, pixel_values, seed)
    if max(diff.values()) > CHECK_TOLERANCE:
        raise SystemExit(
            f"the emulated repeated-query decoder does not reproduce the package's: {diff} "
            f"(tolerance {CHECK_TOLERANCE:g})"
        )
    return diff
