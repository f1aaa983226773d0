"""Training-step throughput of `CIMForPreTraining` vs `ViTMAEForPreTraining` with the same ViT encoder.

One step = forward + backward + AdamW step (+ the EMA target update for CIM, which its training callback runs
after every optimizer step; `--no_ema` leaves it out). Same batch size, dtype, thread count and device for both;
the two models (and the pretext sampler alone) are timed alternately, round after round, in one process, and
the medians are compared.

- CIM: 224 px search views -> 160 px context (target encoder, no grad) + 6 x 64 px exemplars (online encoder),
  1-layer 512-wide cross-attention decoder, exemplar photometric augmentation on (the package defaults).
- MAE: 224 px, mask ratio 0.75, the default MAE decoder (8 layers, width 512, 16 heads, MLP 2048).

FLOPs per image are measured with `torch.utils.flop_counter.FlopCounterMode` on one full step (forward +
backward; matmuls, convolutions and attention, the CPU flash-attention kernels included) and checked against
an analytic matmul count written below. Peak memory is measured in a fresh subprocess per model (see
`--help` of `--memory_steps`).

    python benchmarks/bench_step.py                       # ViT-S, batch 8, fp32, all cores
    python benchmarks/bench_step.py --model vit-base-patch16 --device cuda --dtype bf16 --batch_size 64
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
from transformers import ViTMAEConfig, ViTMAEForPreTraining

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

from transformers_cim import CIMConfig, CIMForPreTraining  # noqa: E402
from transformers_cim.configuration_cim import VIT_PRESETS  # noqa: E402
from transformers_cim.pretext import sample_pretext  # noqa: E402

MODELS = ("vit-tiny-patch16", "vit-small-patch16", "vit-base-patch16")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=MODELS, default="vit-small-patch16", help="encoder of both models")
    p.add_argument("--batch_size", type=int, default=8, help="images per step, both models (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=1,
                   help="untimed steps per model before timing (the first one is the FLOP-counted step)")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds; each round times one step of each candidate")
    p.add_argument("--compile", action="store_true", help="torch.compile both models (compile time is excluded)")
    p.add_argument("--no_ema", action="store_true", help="leave the EMA target update out of the CIM step")
    p.add_argument("--memory_steps", type=int, default=2,
                   help="steps run in a fresh subprocess per model to measure peak memory (0: skip). CUDA: "
                        "torch.cuda.max_memory_allocated. CPU: the rise of the process's peak RSS (ru_maxrss) over "
                        "its RSS after imports and input creation, i.e. weights + AdamW state + grads + activations")
    p.add_argument("--memory_probe", choices=("cim", "mae"), default=None, help=argparse.SUPPRESS)
    C.add_common_args(p)
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------------------------
# Models and steps
# ------------------------------------------------------------------------------------------------------------


def build_cim(model: str) -> CIMForPreTraining:
    return CIMForPreTraining(CIMConfig.from_preset(model))


def build_mae(model: str) -> ViTMAEForPreTraining:
    hidden, layers, heads, mlp = VIT_PRESETS[model]
    config = ViTMAEConfig(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=mlp,
        image_size=224, patch_size=16, qkv_bias=True, layer_norm_eps=1e-6, mask_ratio=0.75,
        decoder_hidden_size=512, decoder_num_hidden_layers=8, decoder_num_attention_heads=16,
        decoder_intermediate_size=2048,
    )
    return ViTMAEForPreTraining(config)


def make_optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=1.5e-4, betas=(0.9, 0.95), weight_decay=0.05)


def make_step(model, runner, optimizer, pixel_values, device, dtype: str, ema: bool):
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


def build_candidate(name: str, args, device, pixel_values):
    model = (build_cim if name == "cim" else build_mae)(args.model).to(device).train()
    runner = torch.compile(model) if args.compile else model
    optimizer = make_optimizer(model)
    ema = name == "cim" and not args.no_ema
    return model, make_step(model, runner, optimizer, pixel_values, device, args.dtype, ema), \
        make_step(model, model, optimizer, pixel_values, device, args.dtype, ema)


# ------------------------------------------------------------------------------------------------------------
# Analytic matmul FLOPs (forward + backward, per image): a cross-check of FlopCounterMode
# ------------------------------------------------------------------------------------------------------------


def vit_layers_fwd(tokens: int, hidden: int, mlp: int, layers: int) -> int:
    """QKV + output projections, MLP, and the two attention matmuls, forward, one sequence."""
    per_layer = 2 * tokens * (4 * hidden * hidden + 2 * hidden * mlp) + 4 * tokens * tokens * hidden
    return layers * per_layer


def patch_embed_fwd(patches: int, hidden: int, patch: int = 16) -> int:
    return 2 * patches * 3 * patch * patch * hidden


def analytic_flops_cim(config: CIMConfig) -> dict[str, int]:
    enc = config.encoder_config
    d, mlp, depth, e = enc.hidden_size, enc.intermediate_size, enc.num_hidden_layers, config.decoder_hidden_size
    k = config.num_exemplars
    pc, pe = (config.context_size // 16) ** 2, (config.exemplar_size // 16) ** 2
    lc, le = pc + 1, pe + 1
    target = patch_embed_fwd(pc, d) + vit_layers_fwd(lc, d, mlp, depth)  # forward only (no grad)
    # online: patch projection frozen on pixels -> forward only; the layers train -> forward + 2x backward
    online = k * (patch_embed_fwd(pe, d) + 3 * vit_layers_fwd(le, d, mlp, depth))
    hidden = int(e * config.decoder_mlp_ratio)
    per_exemplar = (2 * lc * e * e * 2  # q and o projections
                    + 2 * le * e * e * 2  # k and v projections
                    + 4 * lc * le * e  # attention
                    + 2 * lc * e * hidden * 2  # MLP
                    ) * config.decoder_num_layers + 2 * pc * e  # 1x1 predictor
    decoder_fwd = 2 * lc * d * e + k * 2 * le * d * e + k * per_exemplar
    # backward is 2x forward, except the context side of input_proj (its input, the target tokens, needs no grad)
    decoder = 3 * decoder_fwd - 2 * lc * d * e
    return {"online encoder": online, "target encoder": target, "decoder": decoder,
            "total": online + target + decoder}


def analytic_flops_mae(config: ViTMAEConfig) -> dict[str, int]:
    d, mlp, depth = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    patches = (config.image_size // config.patch_size) ** 2
    visible = int(round(patches * (1 - config.mask_ratio))) + 1
    e, dmlp, ddepth = config.decoder_hidden_size, config.decoder_intermediate_size, config.decoder_num_hidden_layers
    # patch projection: forward + weight grad (its input, the pixels, needs none)
    encoder = 2 * patch_embed_fwd(patches, d, config.patch_size) + 3 * vit_layers_fwd(visible, d, mlp, depth)
    decoder_fwd = (2 * visible * d * e + vit_layers_fwd(patches + 1, e, dmlp, ddepth)
                   + 2 * (patches + 1) * e * config.patch_size ** 2 * 3)
    decoder = 3 * decoder_fwd
    return {"online encoder": encoder, "target encoder": 0, "decoder": decoder, "total": encoder + decoder}


# ------------------------------------------------------------------------------------------------------------
# Memory probe (runs in a fresh process)
# ------------------------------------------------------------------------------------------------------------


def memory_probe(args) -> None:
    device = C.setup(args)
    pixel_values = torch.randn(args.batch_size, 3, 224, 224, device=device)
    baseline = C.current_rss_bytes()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _, step, _ = build_candidate(args.memory_probe, args, device, pixel_values)
    for _ in range(args.memory_steps):
        step()
    C.synchronize(device)
    out = {"peak_rss_bytes": C.peak_rss_bytes(), "baseline_rss_bytes": baseline,
           "cpu_peak_delta_bytes": C.peak_rss_bytes() - baseline}
    if device.type == "cuda":
        out["cuda_peak_bytes"] = torch.cuda.max_memory_allocated(device)
    print(json.dumps(out))


def memory_argv(args, name: str) -> list[str]:
    argv = ["--memory_probe", name, "--model", args.model, "--batch_size", str(args.batch_size),
            "--device", args.device, "--dtype", args.dtype, "--threads", str(args.threads), "--seed", str(args.seed),
            "--memory_steps", str(args.memory_steps)]
    if args.compile:
        argv.append("--compile")
    if args.no_ema:
        argv.append("--no_ema")
    return argv


# ------------------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------------------


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.memory_probe:
        memory_probe(args)
        return
    started = time.perf_counter()
    device = C.setup(args)
    print(f"bench_step: {args.model}, batch {args.batch_size}, {args.dtype}, {args.device}, {args.threads} threads"
          f"{', torch.compile' if args.compile else ''}")

    memory = {}
    if args.memory_steps > 0:  # before anything big lives in this process (the probes share the machine's RAM)
        for name in ("cim", "mae"):
            print(f"measuring peak memory of {name} in a subprocess ({args.memory_steps} steps)...")
            memory[name] = C.run_probe(os.path.abspath(__file__), memory_argv(args, name))

    generator = torch.Generator(device="cpu").manual_seed(args.seed)
    pixel_values = torch.randn(args.batch_size, 3, 224, 224, generator=generator).to(device)
    cim, cim_step, cim_eager_step = build_candidate("cim", args, device, pixel_values)
    mae, mae_step, mae_eager_step = build_candidate("mae", args, device, pixel_values)

    def pretext():
        with C.autocast(device, args.dtype), torch.no_grad():
            return sample_pretext(pixel_values, cim.config)

    # FLOPs: one eager step under FlopCounterMode per model (also the first warm-up step when not compiling)
    flops = {}
    for name, step, prefixes in (
        ("cim", cim_eager_step, {"online encoder": "CIMForPreTraining.vit",
                                 "target encoder": "CIMForPreTraining.target_encoder",
                                 "decoder": "CIMForPreTraining.decoder"}),
        ("mae", mae_eager_step, {"online encoder": "ViTMAEForPreTraining.vit",
                                 "decoder": "ViTMAEForPreTraining.decoder"}),
    ):
        counter = C.flop_counter()
        with counter:
            step()
        flops[name] = C.flops_by_prefix(counter, prefixes)
    counter = C.flop_counter()
    with counter:
        pretext()
    flops["pretext"] = {"total": counter.get_total_flops()}
    analytic = {"cim": analytic_flops_cim(cim.config), "mae": analytic_flops_mae(mae.config)}

    candidates = {"cim": cim_step, "mae": mae_step, "pretext": pretext}
    warm = max(0, args.warmup - (0 if args.compile else 1))
    if args.compile:
        print("compiling (first calls)...")
        for name in ("cim", "mae"):
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
    for name, label in (("cim", "CIM (`CIMForPreTraining`)"), ("mae", "MAE (`ViTMAEForPreTraining`)")):
        per_image = flops[name]["total"] / bs
        rows.append([label, f"{med[name]:.3f} ({C.spread(times[name])})", f"{bs / med[name]:.2f}",
                     f"{per_image / 1e9:.2f}", f"{flops[name]['total'] / med[name] / 1e12:.3f}", mem(name)])
    mem_label = ("peak CUDA memory allocated" if args.device == "cuda"
                 else "peak RSS rise (weights+optimizer+grads+activations)")
    table = C.markdown_table(
        ["model", "step s, median (min-max)", "images/s", "GFLOP/image (fwd+bwd)", "achieved TFLOP/s", mem_label],
        rows)

    flop_rows = []
    for part in ("online encoder", "target encoder", "decoder", "total"):
        flop_rows.append([part] + [f"{flops[n].get(part, 0) / bs / 1e9:.2f} / {analytic[n][part] / 1e9:.2f}"
                                   for n in ("cim", "mae")])
    flop_table = C.markdown_table(["per image, GFLOP: measured / analytic", "CIM", "MAE"], flop_rows)

    ratio_tp = (bs / med["cim"]) / (bs / med["mae"])
    ratio_fl = flops["cim"]["total"] / flops["mae"]["total"]
    share = med["pretext"] / med["cim"]
    lines = [
        f"### Training step: CIM vs MAE, {args.model}, batch {bs}, {args.dtype}, {args.device}"
        f"{', torch.compile' if args.compile else ''}",
        "",
        *C.machine_lines(device, args.threads),
        f"- Command: `{C.command_line()}`",
        f"- Step = forward + backward + AdamW step{'' if args.no_ema else ' (+ EMA target update for CIM)'}; "
        f"{args.rounds} alternating rounds after {args.warmup} warm-up step(s); synthetic N(0,1) inputs",
        "",
        table,
        "",
        f"- Throughput ratio CIM / MAE: **{ratio_tp:.2f}x**; FLOP ratio CIM / MAE: **{ratio_fl:.2f}x** "
        f"(so CIM {'needs fewer' if ratio_fl < 1 else 'needs more'} FLOPs per image; equal FLOP efficiency would "
        f"give a throughput ratio of {1 / ratio_fl:.2f}x)",
        f"- Pretext sampling (`sample_pretext`, same batch, timed alone): {med['pretext'] * 1e3:.1f} ms median "
        f"= **{100 * share:.1f}%** of the CIM step ({flops['pretext']['total'] / bs / 1e6:.1f} MFLOP/image counted: "
        "the blur convolutions; grid_sample and resizing are not FLOP-counted)",
        "- FLOPs: measured with torch.utils.flop_counter.FlopCounterMode on one step (matmul, conv, attention; "
        "used for the ratios and TFLOP/s); the analytic column counts matmuls and attention only",
        "",
        flop_table,
    ]
    if args.device == "cpu" and memory:
        lines += ["", "- CPU memory: each model runs alone in a fresh subprocess for "
                      f"{args.memory_steps} steps; the figure is peak RSS (getrusage ru_maxrss) minus the RSS after "
                      "imports and input creation. Absolute peak RSS: " + ", ".join(
                          f"{n.upper()} {C.fmt_bytes(memory[n]['peak_rss_bytes'])}" for n in memory)]
    elif memory:
        lines += ["", f"- CUDA memory: torch.cuda.max_memory_allocated over {args.memory_steps} steps of each model "
                      "alone in a fresh subprocess (weights, AdamW state, gradients, activations)"]
    lines.append(f"- Benchmark wall time: {time.perf_counter() - started:.0f} s")
    C.emit("\n".join(lines), args.output)


if __name__ == "__main__":
    main()
