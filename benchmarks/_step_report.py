"""The lines of bench_step.py's report: the sizes, paired images/s ratios and the decoder check."""

from __future__ import annotations

import _common as C
from _step_decoder_check import CHECK_TOLERANCE
from transformers import ViTMAEConfig

from transformers_cim import CIMConfig


def size_line(cim: CIMConfig, mae: ViTMAEConfig, size: str, model: str) -> str:
    """One line naming the encoder and the CIM and MAE input / decoder sizes."""
    enc, patch = cim.encoder_config, cim.encoder_stride
    return (
        f"- Size `{size}`: encoder {model} width ({enc.hidden_size}, {enc.num_attention_heads} heads, MLP "
        f"{enc.intermediate_size}), {enc.num_hidden_layers} layers, patch {patch}. CIM: {cim.image_size} px views "
        f"-> {cim.context_size} px context ({cim.context_size // patch}^2 tokens) + {cim.num_exemplars} x "
        f"{cim.exemplar_size} px exemplars ({cim.exemplar_size // patch}^2 tokens), decoder "
        f"{cim.decoder_num_layers} x {cim.decoder_hidden_size} wide, {cim.decoder_num_attention_heads} heads. "
        f"MAE: {mae.image_size} px, mask {mae.mask_ratio:g}, decoder {mae.decoder_num_hidden_layers} x "
        f"{mae.decoder_hidden_size} wide, {mae.decoder_num_attention_heads} heads, MLP "
        f"{mae.decoder_intermediate_size}{', normalised-pixel loss' if mae.norm_pix_loss else ''}"
    )


def paired_ratios(times: dict[str, list[float]], faster: str, slower: str) -> list[float]:
    """Per-round images/s ratios `faster` / `slower` (= step time of `slower` / of `faster` in the same round): the
    two ran back to back, so load that drifts between rounds cancels out of each ratio."""
    return [t_slower / t_faster for t_faster, t_slower in zip(times[faster], times[slower])]


def ratio_text(times: dict[str, list[float]], a: str, b: str) -> str:
    """images/s ratio a / b: of the median step times, then the median (min-max) of the per-round ratios."""
    per_round = paired_ratios(times, a, b)
    return (
        f"**{C.median(times[b]) / C.median(times[a]):.3f}x** (per-round ratios: median "
        f"{C.median(per_round):.3f}x, {C.spread(per_round)})"
    )


def ratio_lines(times: dict[str, list[float]], flops: dict[str, dict[str, int]]) -> list[str]:
    """images/s ratios CIM / MAE per decoder variant (before / after the query sharing), and shared / repeated."""
    lines = []
    for name, when in (("cim-repeated", "before (repeated queries)"), ("cim-shared", "after (shared queries)")):
        if name in times:
            lines.append(
                f"- images/s CIM / MAE, {when}: {ratio_text(times, name, 'mae')}; FLOP ratio CIM / MAE: "
                f"{flops[name]['total'] / flops['mae']['total']:.2f}x (equal FLOP efficiency would give "
                f"{flops['mae']['total'] / flops[name]['total']:.2f}x)"
            )
    if "cim-shared" in times and "cim-repeated" in times:
        shared, repeated = flops["cim-shared"], flops["cim-repeated"]
        lines.append(
            f"- images/s CIM shared / CIM repeated: {ratio_text(times, 'cim-shared', 'cim-repeated')}; "
            f"FLOP ratio shared / repeated: per image {shared['total'] / repeated['total']:.3f}x, "
            f"decoder {shared['decoder'] / repeated['decoder']:.3f}x"
        )
    return lines


def check_line(diff: dict[str, float] | None) -> list[str]:
    if diff is None:
        return []
    return [
        f"- Emulated repeated-query decoder vs the package's, same weights, fixed exemplar boxes, same "
        f"augmentation seed, fp32 (before any step): max |logits difference| {diff['logits']:.1e}, |loss "
        f"difference| {diff['loss']:.1e} (tolerance {CHECK_TOLERANCE:g}): same outputs"
    ]
