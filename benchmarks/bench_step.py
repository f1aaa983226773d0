"""Training-step throughput of `CIMForPreTraining` vs `ViTMAEForPreTraining` with the same ViT encoder.

One step = forward + backward + AdamW step (+ the EMA target update for CIM, which its training callback runs
after every optimizer step; `--no_ema` leaves it out). Same batch size, dtype, thread count and device for all;
the models (and the pretext sampler alone) are timed alternately, round after round, in one process, and the
medians are compared.

Sizes (`--size`):

- `recipe` (default): CIM with 224 px search views -> 160 px context (target encoder, no grad) + 6 x 64 px
  exemplars (online encoder), 1-layer 512-wide cross-attention decoder (16 heads), exemplar photometric
  augmentation on (the package defaults); MAE at 224 px, mask ratio 0.75, the default MAE decoder (8 layers,
  width 512, 16 heads, MLP 2048). `--model` picks the encoder (patch 16).
- `small`: the CPU preset of the quality benchmark (`CPU_PRESET` in benchmarks/quality/run_quality.py): the
  `--model` width (default ViT-Tiny: 192, 3 heads, MLP 768) with 6 layers and patch 8, 96 px views, 64 px
  context, 6 exemplars of 32 px, CIM decoder 256 wide / 8 heads; MAE at 96 px, mask 0.75, normalised-pixel
  loss, decoder 128 wide, 2 layers, 4 heads, MLP 512.

Decoder queries (`--decoder_queries`): `shared` is the package's decoder, whose first layer normalises and
projects each image's context queries once and broadcasts them over its K exemplars; `repeated` emulates the
decoder as it was before that change (the queries repeated K times before the first layer, every layer run
per exemplar) on a second CIM model with the same weights, checked to give the same logits and loss; `both`
(default) times the two, so that the CIM / MAE images/s ratio is reported before and after.

FLOPs per image are measured with `torch.utils.flop_counter.FlopCounterMode` on one full step (forward +
backward; matmuls, convolutions and attention, the CPU flash-attention kernels included) and checked against
an analytic matmul count written below. Peak memory is measured in a fresh subprocess per model (see
`--help` of `--memory_steps`).

    python benchmarks/bench_step.py                       # recipe sizes, ViT-S, batch 8, fp32, all cores
    python benchmarks/bench_step.py --size small          # quality-benchmark sizes, ViT-T/8 x 6 layers, batch 16
    python benchmarks/bench_step.py --model vit-base-patch16 --device cuda --dtype bf16 --batch_size 64
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402
from _step_decoder_check import decoder_check  # noqa: E402
from _step_flops import analytic_flops, flop_prefixes  # noqa: E402
from _step_models import CIM_VARIANTS, SIZES, build_model, build_models, cim_variants, make_steps, search_views  # noqa: E402
from _step_report import check_line, ratio_lines, size_line  # noqa: E402

from transformers_cim.pretext import sample_pretext  # noqa: E402

MODELS = ("vit-tiny-patch16", "vit-small-patch16", "vit-base-patch16")
LABELS = {
    "cim-shared": "CIM, shared queries (`CIMForPreTraining` as it is)",
    "cim-repeated": "CIM, repeated queries (the decoder before sharing, emulated)",
    "mae": "MAE (`ViTMAEForPreTraining`)",
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--size",
        choices=tuple(SIZES),
        default="recipe",
        help="input / decoder sizes: the authors' recipe, or the quality benchmark's CPU preset "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--model",
        choices=MODELS,
        default=None,
        help="encoder of all models (default: vit-small-patch16 for recipe, vit-tiny-patch16 for small; "
        "small keeps the width and heads and uses 6 layers of patch 8)",
    )
    p.add_argument(
        "--batch_size",
        type=int,
        default=None,
        help="images per step, all models (default: 8 for recipe, 16 for small)",
    )
    p.add_argument(
        "--decoder_queries",
        choices=("shared", "repeated", "both"),
        default="both",
        help="CIM decoder(s) to time: the package's (shared first-layer queries), the emulated one from "
        "before the sharing (queries repeated K times), or both (default: %(default)s)",
    )
    p.add_argument(
        "--warmup",
        type=int,
        default=1,
        help="untimed steps per model before timing (the first one is the FLOP-counted step)",
    )
    p.add_argument("--rounds", type=int, default=5, help="timed rounds; each round times one step of each candidate")
    p.add_argument("--compile", action="store_true", help="torch.compile all models (compile time is excluded)")
    p.add_argument("--no_ema", action="store_true", help="leave the EMA target update out of the CIM step")
    p.add_argument(
        "--memory_steps",
        type=int,
        default=2,
        help="steps run in a fresh subprocess per model to measure peak memory (0: skip). CUDA: "
        "torch.cuda.max_memory_allocated. CPU: the rise of the process's peak RSS (ru_maxrss) over "
        "its RSS after imports and input creation, i.e. weights + AdamW state + grads + activations",
    )
    p.add_argument("--memory_probe", choices=(*CIM_VARIANTS, "mae"), default=None, help=argparse.SUPPRESS)
    C.add_common_args(p)
    args = p.parse_args(argv)
    spec = SIZES[args.size]
    args.model = args.model or spec.default_model
    args.batch_size = args.batch_size or spec.default_batch_size
    return args


def memory_probe(args) -> None:
    device = C.setup(args)
    pixel_values = search_views(args, device)
    baseline = C.current_rss_bytes()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model = build_model(args.memory_probe, args).to(device).train()
    step, _ = make_steps(args.memory_probe, model, args, device, pixel_values)
    for _ in range(args.memory_steps):
        step()
    C.synchronize(device)
    out = {
        "peak_rss_bytes": C.peak_rss_bytes(),
        "baseline_rss_bytes": baseline,
        "cpu_peak_delta_bytes": C.peak_rss_bytes() - baseline,
    }
    if device.type == "cuda":
        out["cuda_peak_bytes"] = torch.cuda.max_memory_allocated(device)
    print(json.dumps(out))


def memory_argv(args, name: str) -> list[str]:
    argv = [
        "--memory_probe",
        name,
        "--size",
        args.size,
        "--model",
        args.model,
        "--batch_size",
        str(args.batch_size),
        "--device",
        args.device,
        "--dtype",
        args.dtype,
        "--threads",
        str(args.threads),
        "--seed",
        str(args.seed),
        "--memory_steps",
        str(args.memory_steps),
    ]
    if args.compile:
        argv.append("--compile")
    if args.no_ema:
        argv.append("--no_ema")
    return argv


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.memory_probe:
        memory_probe(args)
        return
    started = time.perf_counter()
    device = C.setup(args)
    print(
        f"bench_step: size {args.size}, {args.model}, batch {args.batch_size}, {args.dtype}, {args.device}, "
        f"{args.threads} threads{', torch.compile' if args.compile else ''}, decoder queries "
        f"{args.decoder_queries}"
    )
    names = (*cim_variants(args), "mae")

    memory = {}
    if args.memory_steps > 0:  # before anything big lives in this process (the probes share the machine's RAM)
        for name in names:
            print(f"measuring peak memory of {name} in a subprocess ({args.memory_steps} steps)...")
            memory[name] = C.run_probe(os.path.abspath(__file__), memory_argv(args, name))

    pixel_values = search_views(args, device, torch.Generator(device="cpu").manual_seed(args.seed))
    models = build_models(args, device)
    diff = decoder_check(models, device, pixel_values, args.seed, lambda: build_model("cim-shared", args))
    if diff is not None:
        print(f"decoder check: max |logits diff| {diff['logits']:.1e}, |loss diff| {diff['loss']:.1e}")
    steps = {name: make_steps(name, models[name], args, device, pixel_values) for name in names}
    cim_config_used = models[names[0]].config

    def pretext():
        with C.autocast(device, args.dtype), torch.no_grad():
            return sample_pretext(pixel_values, cim_config_used)

    # FLOPs: one eager step under FlopCounterMode per model (also the first warm-up step when not compiling)
    flops = {}
    for name in names:
        counter = C.flop_counter()
        with counter:
            steps[name][1]()
        flops[name] = C.flops_by_prefix(counter, flop_prefixes(name))
    counter = C.flop_counter()
    with counter:
        pretext()
    flops["pretext"] = {"total": counter.get_total_flops()}
    analytic = {name: analytic_flops(name, models[name]) for name in names}

    candidates = {**{name: steps[name][0] for name in names}, "pretext": pretext}
    warm = max(0, args.warmup - (0 if args.compile else 1))
    if args.compile:
        print("compiling (first calls)...")
        for name in names:
            t = time.perf_counter()
            candidates[name]()
            print(f"  {name}: first compiled step {time.perf_counter() - t:.1f}s")
    for _ in range(warm):
        for fn in candidates.values():
            fn()
    print(f"timing {args.rounds} alternating rounds...")
    times = C.alternate(candidates, args.rounds, device)
    med = {name: C.median(t) for name, t in times.items()}
    bs = args.batch_size

    def mem(name: str) -> str:
        if name not in memory:
            return "not measured"
        m = memory[name]
        return C.fmt_bytes(m["cuda_peak_bytes"] if args.device == "cuda" else m["cpu_peak_delta_bytes"])

    rows = []
    for name in names:
        per_image = flops[name]["total"] / bs
        rows.append(
            [
                LABELS[name],
                f"{med[name]:.3f} ({C.spread(times[name])})",
                f"{bs / med[name]:.2f}",
                f"{per_image / 1e9:.3f}",
                f"{flops[name]['total'] / med[name] / 1e12:.3f}",
                mem(name),
            ]
        )
    mem_label = (
        "peak CUDA memory allocated"
        if args.device == "cuda"
        else "peak RSS rise (weights+optimizer+grads+activations)"
    )
    table = C.markdown_table(
        ["model", "step s, median (min-max)", "images/s", "GFLOP/image (fwd+bwd)", "achieved TFLOP/s", mem_label], rows
    )

    flop_rows = []
    for part in ("online encoder", "target encoder", "decoder", "total"):
        flop_rows.append(
            [part] + [f"{flops[n].get(part, 0) / bs / 1e9:.3f} / {analytic[n][part] / 1e9:.3f}" for n in names]
        )
    flop_table = C.markdown_table(
        ["per image, GFLOP: measured / analytic", *(LABELS[n].split(" (")[0] for n in names)], flop_rows
    )

    cim_name = names[0]
    share = med["pretext"] / med[cim_name]
    mae = models["mae"].config
    lines = [
        f"### Training step: CIM vs MAE, size {args.size}, {args.model}, batch {bs}, {args.dtype}, {args.device}"
        f"{', torch.compile' if args.compile else ''}",
        "",
        *C.machine_lines(device, args.threads),
        f"- Command: `{C.command_line()}`",
        size_line(cim_config_used, mae, args.size, args.model),
        f"- Step = forward + backward + AdamW step{'' if args.no_ema else ' (+ EMA target update for CIM)'}; "
        f"{args.rounds} alternating rounds after {args.warmup} warm-up step(s); synthetic N(0,1) inputs",
        *check_line(diff),
        "",
        table,
        "",
        *ratio_lines({n: times[n] for n in names}, flops),
        f"- Pretext sampling (`sample_pretext`, same batch, timed alone): {med['pretext'] * 1e3:.1f} ms median "
        f"= **{100 * share:.1f}%** of the {LABELS[cim_name].split(' (')[0]} step "
        f"({flops['pretext']['total'] / bs / 1e6:.1f} MFLOP/image counted: the blur convolutions; grid_sample and "
        "resizing are not FLOP-counted)",
        "- FLOPs: measured with torch.utils.flop_counter.FlopCounterMode on one step (matmul, conv, attention; "
        "used for the ratios and TFLOP/s); the analytic column counts matmuls and attention only",
        "",
        flop_table,
    ]
    if args.device == "cpu" and memory:
        lines += [
            "",
            "- CPU memory: each model runs alone in a fresh subprocess for "
            f"{args.memory_steps} steps; the figure is peak RSS (getrusage ru_maxrss) minus the RSS after "
            "imports and input creation. Absolute peak RSS: "
            + ", ".join(f"{n} {C.fmt_bytes(memory[n]['peak_rss_bytes'])}" for n in memory),
        ]
    elif memory:
        lines += [
            "",
            f"- CUDA memory: torch.cuda.max_memory_allocated over {args.memory_steps} steps of each model "
            "alone in a fresh subprocess (weights, AdamW state, gradients, activations)",
        ]
    lines.append(f"- Benchmark wall time: {time.perf_counter() - started:.0f} s")
    C.emit("\n".join(lines), args.output)


if __name__ == "__main__":
    main()
