"""Seconds per UperNet training step (forward + backward + AdamW step) of randomly initialised ViT encoders, the
paper's segmentation setting: 512 px crops, UperNet width 512 (auxiliary head 256), BEiT's FPN neck over blocks
4, 6, 8, 12. Prints a table of s/step and images/s per model, after `--warmup` untimed steps.

The UperNet is the one `run_semantic_segmentation.py` builds
(`transformers_cim.transfer.upernet_for_semantic_segmentation`).
Its decoder at stride 4 costs as much as a ViT-B/16 encoder or more, so small encoders are not much faster.

    python benchmarks/bench_segmentation.py --threads 1                     # ViT-S/16 and ViT-B/16, batch 2
    python benchmarks/bench_segmentation.py --models vit-base-patch16 --batch_size 2 --device cuda --dtype bf16
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

from transformers_cim import preset_encoder_config  # noqa: E402
from transformers_cim.transfer import upernet_for_semantic_segmentation  # noqa: E402

MODELS = ("vit-small-patch16", "vit-base-patch16")
NUM_LABELS = 150  # ADE20K


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), help="ViT presets (default: %(default)s)")
    parser.add_argument("--image_size", type=int, default=512, help="square crop (default: %(default)s)")
    parser.add_argument(
        "--batch_size",
        type=int,
        default=2,
        help="at least 2: the pooling branch of UperNet has BatchNorm over 1x1 maps (default: %(default)s)",
    )
    parser.add_argument("--decoder_hidden_size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per model (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (default: %(default)s)")
    return C.add_common_args(parser).parse_args()


def training_step(model, optimizer, pixel_values, labels, device, dtype) -> None:
    with C.autocast(device, dtype):
        loss = model(pixel_values=pixel_values, labels=labels).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def time_model(name: str, args: argparse.Namespace, device: torch.device) -> tuple[float, list[float]]:
    """Median and all timed seconds per step of one preset's UperNet."""
    model = (
        upernet_for_semantic_segmentation(
            None,
            NUM_LABELS,
            encoder_config=preset_encoder_config(name),
            image_size=args.image_size,
            hidden_size=args.decoder_hidden_size,
            auxiliary_channels=args.decoder_hidden_size // 2,
        )
        .to(device)
        .train()
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    generator = torch.Generator().manual_seed(args.seed)
    size = (args.batch_size, 3, args.image_size, args.image_size)
    pixel_values = torch.randn(size, generator=generator).to(device)
    labels = torch.randint(0, NUM_LABELS, (args.batch_size, args.image_size, args.image_size), generator=generator).to(
        device
    )
    for _ in range(args.warmup):
        training_step(model, optimizer, pixel_values, labels, device, args.dtype)
    times = []
    for step in range(args.steps):
        times.append(
            C.time_call(lambda: training_step(model, optimizer, pixel_values, labels, device, args.dtype), device)
        )
        print(f"  {name} step {step + 1}/{args.steps}: {times[-1]:.2f} s", flush=True)
    return C.median(times), times


def main() -> None:
    args = parse_args()
    device = C.setup(args)
    rows = []
    for name in args.models:
        seconds, times = time_model(name, args, device)
        rows.append([name, args.batch_size, f"{seconds:.2f}", C.spread(times), f"{args.batch_size / seconds:.3f}"])
    table = C.markdown_table(["encoder (random init)", "batch", "s/step (median)", "range", "images/s"], rows)
    lines = [
        f"UperNet training step at {args.image_size} px, decoder width {args.decoder_hidden_size}, "
        f"{NUM_LABELS} classes, {args.dtype}, {args.steps} timed steps after {args.warmup} warm-up",
        "",
        table,
        "",
        *C.machine_lines(device, args.threads),
        f"- Command: `{C.command_line()}`",
    ]
    C.emit("\n".join(lines), args.output)


if __name__ == "__main__":
    main()
