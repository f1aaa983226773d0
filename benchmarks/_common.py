"""Shared helpers of the speed benchmarks: command-line flags, machine description, timing, FLOP counting,
peak memory and markdown output. Every benchmark imports this module from its own folder."""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# ------------------------------------------------------------------------------------------------------------
# Flags and set-up
# ------------------------------------------------------------------------------------------------------------


def add_common_args(parser: argparse.ArgumentParser, default_device: str = "cpu") -> argparse.ArgumentParser:
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default=default_device,
        help="where the model / batched code runs (default: %(default)s)",
    )
    parser.add_argument(
        "--dtype",
        choices=tuple(DTYPES),
        default="fp32",
        help="fp32, or bf16 autocast (weights stay fp32, matmuls run in bf16) (default: %(default)s)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch.set_num_threads (default: all cores of this process's CPU affinity)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--output", type=str, default=None, help="also write the printed markdown (tables + machine line) to this file"
    )
    return parser


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def setup(args: argparse.Namespace) -> torch.device:
    """Applies --threads and --seed, checks --device; returns the torch device."""
    args.threads = args.threads or available_cores()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda was asked for, but torch.cuda.is_available() is False on this machine.")
    return torch.device(args.device)


def autocast(device: torch.device, dtype: str):
    """bf16 autocast on the device, or a no-op for fp32."""
    if dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[dtype])


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------------------------------
# Machine line
# ------------------------------------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_name(device: torch.device | None = None) -> str | None:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(device if device is not None and device.type == "cuda" else 0)
    return None


def now_utc() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def machine_lines(device: torch.device, threads: int, extra: str | None = None) -> list[str]:
    import transformers

    load = ""
    with contextlib.suppress(OSError, AttributeError):
        load = f", load average {os.getloadavg()[0]:.1f}"
    gpu = gpu_name(device)
    lines = [
        f"- Machine: CPU {cpu_model()} ({available_cores()} cores available{load}); "
        f"GPU: {gpu if gpu else 'none'}; device used: {device.type}",
        f"- Software: Python {platform.python_version()}, torch {torch.__version__}, transformers "
        f"{transformers.__version__}; torch threads: {threads}",
        f"- Date: {now_utc()}",
    ]
    if extra:
        lines.append(f"- {extra}")
    return lines


# ------------------------------------------------------------------------------------------------------------
# Timing
# ------------------------------------------------------------------------------------------------------------


def time_call(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds taken by fn(), synchronising the device before and after."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def alternate(
    candidates: dict[str, Callable[[], object]],
    rounds: int,
    device: torch.device,
    log: Callable[[str], None] | None = print,
) -> dict[str, list[float]]:
    """Times every candidate once per round, in an order that rotates each round (so no candidate always runs
    first or after the same neighbour). Returns the per-round times."""
    names = list(candidates)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(time_call(candidates[name], device))
        if log:
            log(f"  round {r + 1}/{rounds}: " + ", ".join(f"{n} {times[n][-1]:.3f}s" for n in names))
    return times


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def spread(values: Sequence[float]) -> str:
    """min-max of the round times, as a short string."""
    return f"{min(values):.3g}-{max(values):.3g}"


# ------------------------------------------------------------------------------------------------------------
# FLOPs
# ------------------------------------------------------------------------------------------------------------


def _cpu_sdpa(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_sdpa_backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def flop_counter() -> FlopCounterMode:
    """`FlopCounterMode` that also counts the CPU flash-attention kernels (torch's registry lacks them, so on CPU
    attention would silently count as 0)."""
    aten = torch.ops.aten
    mapping = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu] = _cpu_sdpa
        mapping[aten._scaled_dot_product_flash_attention_for_cpu_backward] = _cpu_sdpa_backward
    return FlopCounterMode(display=False, custom_mapping=mapping)


def flops_by_prefix(counter: FlopCounterMode, prefixes: dict[str, str]) -> dict[str, int]:
    """Totals of the counter's per-module table for the given {label: module path} entries, plus 'total'."""
    counts = counter.get_flop_counts()
    out = {}
    for label, module in prefixes.items():
        out[label] = int(sum(counts.get(module, {}).values()))
    out["total"] = int(counter.get_total_flops())
    return out


# ------------------------------------------------------------------------------------------------------------
# Memory
# ------------------------------------------------------------------------------------------------------------


def current_rss_bytes() -> int:
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except ImportError:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """High-water mark of this process's resident set (ru_maxrss is in KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def run_probe(script: str, argv: list[str], timeout: float | None = None) -> dict:
    """Runs `python script argv...` in a fresh process; returns the JSON object its last stdout line holds."""
    proc = subprocess.run([sys.executable, script, *argv], capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"probe {' '.join(argv)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "n/a"
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


# ------------------------------------------------------------------------------------------------------------
# Output
# ------------------------------------------------------------------------------------------------------------


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]], align: str | None = None) -> str:
    align = align or ("l" + "r" * (len(headers) - 1))
    marks = {"l": ":--", "r": "--:", "c": ":-:"}
    lines = ["| " + " | ".join(str(h) for h in headers) + " |", "|" + "|".join(marks[a] for a in align) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def emit(text: str, output: str | None) -> None:
    """Prints the report and writes it to --output when given."""
    print("\n" + text)
    if output:
        os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
        with open(output, "w") as f:
            f.write(text.rstrip() + "\n")
        print(f"\n(written to {output})")


def command_line() -> str:
    return "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:])
