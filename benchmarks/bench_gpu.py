"""GPU benchmark of the CIM training step: model FLOP utilisation (MFU) and the largest batch that fits.

For the CIM ViT-B/16 pre-training step (224 px views -> 160 px context + 6 x 64 px exemplars; forward + backward
+ AdamW + EMA update), with bf16 autocast and PyTorch SDPA attention, eager and under `torch.compile`:

- images/s, achieved TFLOP/s and MFU = FLOPs per step / step time / the GPU's dense bf16 peak. FLOPs per step
  are counted with `torch.utils.flop_counter.FlopCounterMode` on one eager step (forward + backward: matmuls,
  convolutions, attention). The peak comes from a datasheet table below (or `--peak_tflops`).
- the share of the step spent in the batched pretext sampler (`sample_pretext`, timed alone on the same batch);
- peak memory (`torch.cuda.max_memory_allocated`) at the MFU batch size;
- the largest batch whose training step fits: doubling from `--search_start`, then bisection between the last
  batch that fitted and the first that ran out of memory (two full steps per probe, so the AdamW state and the
  gradients are resident), catching `torch.OutOfMemoryError`.

Without CUDA it exits with a message. `--device cpu --dry_run` runs the same logic on a tiny encoder on the CPU,
with a simulated out-of-memory error above `--dry_run_max_fit` images, to check the script itself.

    python benchmarks/bench_gpu.py --output benchmarks/results/gpu_h100.md
    python benchmarks/bench_gpu.py --device cpu --dry_run
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

from transformers_cim import CIMConfig, CIMForPreTraining  # noqa: E402
from transformers_cim.pretext import sample_pretext  # noqa: E402

# Dense (no sparsity) bf16 tensor-core peaks from the vendors' datasheets, TFLOP/s; first matching name wins.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("GH200", 989.0),
    ("H200", 989.0),
    ("H100", 989.0),  # SXM ("NVIDIA H100 80GB HBM3")
    ("B200", 2250.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("A10", 125.0),
)


class SimulatedOutOfMemory(torch.OutOfMemoryError):
    """Raised by the dry run in place of a real CUDA out-of-memory error."""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vit-base-patch16", help="CIM encoder preset (default: %(default)s)")
    p.add_argument("--batch_size", type=int, default=128, help="batch of the MFU measurement")
    p.add_argument("--steps", type=int, default=10, help="timed steps per mode")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per mode (after compilation)")
    p.add_argument("--modes", default="eager,compile", help="comma-separated: eager, compile")
    p.add_argument("--peak_tflops", type=float, default=None, help="override the GPU's dense bf16 peak (TFLOP/s)")
    p.add_argument("--search_start", type=int, default=64, help="first batch of the largest-batch search")
    p.add_argument("--search_limit", type=int, default=8192, help="stop doubling here")
    p.add_argument("--search_granularity", type=int, default=8, help="bisect until hi - lo <= this")
    p.add_argument(
        "--search_mode",
        choices=("eager", "compile", "none"),
        default="eager",
        help="step used by the largest-batch search (compile re-compiles per batch size)",
    )
    p.add_argument(
        "--dry_run", action="store_true", help="tiny encoder, small batches, simulated OOM (for CPU checks)"
    )
    p.add_argument("--dry_run_max_fit", type=int, default=12, help="dry run: batches above this 'run out of memory'")
    C.add_common_args(p, default_device="cuda")
    p.set_defaults(dtype="bf16")
    args = p.parse_args(argv)
    if args.dry_run:
        args.batch_size = min(args.batch_size, 4)
        args.steps, args.warmup = min(args.steps, 2), min(args.warmup, 1)
        args.search_start = min(args.search_start, 2)
        args.search_limit = min(args.search_limit, 64)
        args.search_granularity = min(args.search_granularity, 1)
    return args


def build_config(args) -> CIMConfig:
    if args.dry_run:
        from transformers import ViTConfig

        encoder = ViTConfig(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=128,
            patch_size=16,
            layer_norm_eps=1e-6,
            qkv_bias=True,
        )
        return CIMConfig(encoder_config=encoder, decoder_hidden_size=64, decoder_num_attention_heads=4)
    return CIMConfig.from_preset(args.model)


def build_model(args, device) -> CIMForPreTraining:
    config = build_config(args)
    config.encoder_config._attn_implementation = "sdpa"
    model = CIMForPreTraining(config).to(device).train()
    return model


def make_step(model, runner, optimizer, args, device, fail_above: int | None = None):
    def step(pixel_values):
        with C.autocast(device, args.dtype):
            loss = runner(pixel_values).loss
        if fail_above is not None and pixel_values.shape[0] > fail_above:
            raise SimulatedOutOfMemory(f"simulated: batch {pixel_values.shape[0]} > {fail_above}")
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.momentum_update(0.99)

    step.reset = lambda: optimizer.zero_grad(set_to_none=True)  # drops gradients left by a failed step
    return step


def peak_tflops(args) -> tuple[float | None, str]:
    if args.peak_tflops:
        return args.peak_tflops, "given with --peak_tflops"
    if args.dry_run and args.device == "cpu":
        return 1.0, "dry run: an assumed 1 TFLOP/s, not a real peak"
    name = C.gpu_name() or ""
    for key, value in PEAK_BF16_TFLOPS:
        if key.lower() in name.lower():
            return value, f"datasheet dense bf16 peak of {key}"
    return None, f"unknown peak for {name!r}: pass --peak_tflops"


def free_memory(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def is_oom(err: BaseException) -> bool:
    return (
        isinstance(err, torch.OutOfMemoryError)
        or "out of memory" in str(err).lower()
        or "CUBLAS_STATUS_ALLOC_FAILED" in str(err)
    )


def make_inputs(batch: int, device) -> torch.Tensor:
    return torch.randn(batch, 3, 224, 224, device=device)


def fits(step, batch: int, device) -> bool:
    """Two training steps at `batch`: True when they run, False on out-of-memory (any other error propagates)."""
    pixel_values = None
    try:
        pixel_values = make_inputs(batch, device)
        step(pixel_values)
        step(pixel_values)
        C.synchronize(device)
        return True
    except (torch.OutOfMemoryError, RuntimeError) as err:
        if not is_oom(err):
            raise
        return False
    finally:
        del pixel_values
        step.reset()
        free_memory(device)


def largest_batch(step, args, device, log=print) -> tuple[int | None, list[tuple[int, bool]]]:
    """Doubling from search_start until a batch fails (or search_limit), then bisection. Returns (largest batch
    that fitted or None, probes)."""
    probes: list[tuple[int, bool]] = []

    def probe(batch: int) -> bool:
        ok = fits(step, batch, device)
        probes.append((batch, ok))
        log(f"  batch {batch}: {'fits' if ok else 'out of memory'}")
        return ok

    lo, hi, batch = None, None, args.search_start
    while batch <= args.search_limit:
        if probe(batch):
            lo, batch = batch, batch * 2
        else:
            hi = batch
            break
    if lo is None:  # even the first batch failed: bisect below it
        lo_bound = 0
        hi = hi or args.search_start
        while hi - lo_bound > max(1, args.search_granularity):
            mid = (lo_bound + hi) // 2
            if mid == 0:
                break
            lo_bound, hi = (mid, hi) if probe(mid) else (lo_bound, mid)
        return (lo_bound or None), probes
    if hi is None:  # hit the search limit without failing
        return lo, probes
    while hi - lo > max(1, args.search_granularity):
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if probe(mid) else (lo, mid)
    return lo, probes


def count_flops(model, step, batch: int, device) -> int:
    pixel_values = make_inputs(batch, device)
    counter = C.flop_counter()
    with counter:
        step(pixel_values)
    return int(counter.get_total_flops())


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit(
            "bench_gpu.py needs a CUDA GPU and none is visible (torch.cuda.is_available() is False). "
            "Run it on a GPU machine, or check the script with: python benchmarks/bench_gpu.py --device cpu "
            "--dry_run"
        )
    if args.device == "cpu" and not args.dry_run:
        sys.exit("bench_gpu.py measures a GPU; on the CPU only --dry_run is supported (use bench_step.py for CPU).")
    started = time.perf_counter()
    device = C.setup(args)
    torch.set_float32_matmul_precision("high")
    where = C.gpu_name(device) if device.type == "cuda" else "CPU (dry run)"
    print(
        f"bench_gpu: {'tiny dry-run encoder' if args.dry_run else args.model} on {where}, {args.dtype}, "
        f"batch {args.batch_size}, started {C.now_utc()}"
    )

    model = build_model(args, device)
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=1.5e-4, betas=(0.9, 0.95), weight_decay=0.05
    )
    attn = model.config.encoder_config._attn_implementation
    fail_above = args.dry_run_max_fit if args.dry_run else None
    eager_step = make_step(model, model, optimizer, args, device, fail_above)
    flops = count_flops(model, eager_step, args.batch_size, device)
    peak, peak_source = peak_tflops(args)

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    steps = {"eager": eager_step}
    if "compile" in modes:
        steps["compile"] = make_step(model, torch.compile(model), optimizer, args, device, fail_above)
    if args.search_mode == "compile":
        # dynamic=False: one graph per batch size. Dynamic shapes crash inside the package's pretext sampler
        # (torch.rand(..., generator=None) with a symbolic batch size), see benchmarks/README.md.
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, 64)
        search_step = make_step(model, torch.compile(model, dynamic=False), optimizer, args, device, fail_above)
    else:
        search_step = eager_step

    pixel_values = make_inputs(args.batch_size, device)

    def pretext():
        with torch.no_grad(), C.autocast(device, args.dtype):
            return sample_pretext(pixel_values, model.config)

    rows = []
    for mode in modes:
        step = steps[mode]
        t = time.perf_counter()
        step(pixel_values)  # compilation happens here
        C.synchronize(device)
        first = time.perf_counter() - t
        for _ in range(args.warmup):
            step(pixel_values)
            pretext()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times = C.alternate(
            {mode: lambda step=step: step(pixel_values), "pretext": pretext}, args.steps, device, log=None
        )
        step_s, pre_s = C.median(times[mode]), C.median(times["pretext"])
        tflops = flops / step_s / 1e12
        mem = C.fmt_bytes(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else "n/a (cpu)"
        mfu = f"{100 * tflops / peak:.1f}%" if peak else "n/a"
        rows.append(
            [
                mode,
                f"{first:.1f}",
                f"{step_s * 1e3:.1f} ({C.spread([x * 1e3 for x in times[mode]])})",
                f"{args.batch_size / step_s:.0f}",
                f"{tflops:.1f}",
                mfu,
                f"{100 * pre_s / step_s:.1f}%",
                mem,
            ]
        )
        print(f"  {mode}: {step_s * 1e3:.1f} ms/step, {args.batch_size / step_s:.0f} images/s, MFU {mfu}")
    pixel_values = None  # noqa: F841 - frees the MFU batch before the search
    free_memory(device)

    search_lines = []
    if args.search_mode != "none":
        print(f"largest batch ({args.search_mode} step): doubling from {args.search_start}, then bisection")
        best, probes = largest_batch(search_step, args, device)
        trail = ", ".join(f"{b}{'' if ok else ' OOM'}" for b, ok in probes)
        if best is None:
            search_lines.append(f"- Largest batch: none fits (probes: {trail})")
        else:
            limit_hit = all(ok for _, ok in probes)
            search_lines.append(
                f"- Largest batch that fits ({args.search_mode} step, {args.dtype}, AdamW, 2 steps per probe): "
                f"**{best}**{' (search limit reached; raise --search_limit)' if limit_hit else ''}"
                f"{f', to within {args.search_granularity}' if not limit_hit else ''} (probes: {trail})"
            )
        if args.dry_run:
            search_lines.append(
                f"- Dry run: out-of-memory simulated above batch {args.dry_run_max_fit}; expected "
                f"answer {args.dry_run_max_fit}"
            )

    table = C.markdown_table(
        [
            "mode",
            "first step s (compile)",
            "step ms, median (min-max)",
            "images/s",
            "achieved TFLOP/s",
            "MFU",
            "pretext share",
            "peak memory",
        ],
        rows,
    )
    lines = [
        f"### GPU: CIM {'(dry run, tiny encoder)' if args.dry_run else args.model} training step, batch "
        f"{args.batch_size}, {args.dtype} autocast, attention {attn}",
        "",
        f"- Ran on: {where}, {C.now_utc()}",
        *C.machine_lines(device, args.threads),
        f"- Command: `{C.command_line()}`",
        f"- FLOPs per step (FlopCounterMode, fwd+bwd): {flops / 1e12:.3f} TFLOP = {flops / args.batch_size / 1e9:.2f} "
        f"GFLOP/image; MFU against {f'{peak:.0f} TFLOP/s' if peak else 'n/a'} ({peak_source})",
        f"- Step = forward + backward + AdamW + EMA update; {args.steps} timed steps after {args.warmup} warm-up; "
        "pretext share = `sample_pretext` alone on the same batch / step time",
        "",
        table,
        "",
        *search_lines,
        f"- Benchmark wall time: {time.perf_counter() - started:.0f} s",
    ]
    C.emit("\n".join(lines), args.output)


if __name__ == "__main__":
    main()
