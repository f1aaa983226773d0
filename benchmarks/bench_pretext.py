"""Cost of generating the CIM pretext task: the package's batched sampler vs a per-image CPU pipeline.

- **batched**: `transformers_cim.pretext.sample_pretext` on a batch of normalised 224 px search views on
  `--device` (K=6 exemplars of 64 px, 160 px context and maps, photometric exemplar augmentation on: the package
  defaults), threads set with `torch.set_num_threads`.
- **reference**: the per-image, per-exemplar pipeline the paper's authors describe and run in their data loader,
  written here from that description: for every image and every exemplar, rotate the whole 224 px view with
  PIL by theta (expand=False), cut the axis-aligned box out of the rotated view, resize it to 64 px with PIL,
  apply the photometric transforms with PIL/numpy (colour jitter in random order, grayscale, Gaussian blur,
  solarize, flip), and build the 160 x 160 true map either by rotating a box-mask image back with PIL
  (`pil`) or by a Python loop over the map's pixels (`loop`). With N cores it runs in N worker processes (one
  per core, like data-loader workers); each worker only returns a checksum, so the inter-process transfer a real
  loader pays is *not* charged to the reference.

Both start from the same decoded 224 px views (real photos from the imagenette parquet copy when present) and end
with normalised float32 context, exemplars and maps. Candidates alternate round after round; medians reported.

With `--compare_reference` the batched sampler as it was before issue 11 ("lean pretext"; kept unchanged in
`transformers_cim._pretext_reference`) is timed side by side with the current one in the same process and the same
rounds, the whole sampler and `correlation_maps`, `warp_exemplars`, `augment_exemplars` alone, after checking
that both give identical outputs. The batched rows also give images per CPU-second of this process
(`time.process_time`), which a busy machine's time slicing does not inflate.

    python benchmarks/bench_pretext.py                 # 1 core and all cores, both reference mask variants
    python benchmarks/bench_pretext.py --device cuda --batch_size 256 --reference_mask pil
    python benchmarks/bench_pretext.py --threads 1 --reference_mask none --compare_reference   # before/after only
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import time

import numpy as np
import PIL.Image
import PIL.ImageDraw
import PIL.ImageEnhance
import PIL.ImageFilter
import PIL.ImageOps
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402
from _reference_pipeline import (  # noqa: E402
    MEAN,
    STD,
    ReferenceSettings,
    _worker_init,
    _worker_ready,
    _worker_run,
    mask_loop,
    mask_pil,
    reference_batch,
    sample_box,
)

DEFAULT_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "imagenette-160")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch_size", type=int, default=64, help="images per call of the batched sampler")
    p.add_argument(
        "--reference_images",
        type=int,
        default=12,
        help="images per round and per worker process for the reference pipeline",
    )
    p.add_argument(
        "--reference_mask",
        choices=("loop", "pil", "both", "none"),
        default="both",
        help="how the reference builds the true maps (default: %(default)s = time both variants; "
        "none: no PIL pipeline)",
    )
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument(
        "--data",
        default=DEFAULT_DATA,
        help="parquet dataset of real photos for the views (random images when it does not exist)",
    )
    p.add_argument("--no_augmentation", action="store_true", help="exemplar photometric transforms off (both sides)")
    p.add_argument(
        "--compare_reference",
        action="store_true",
        help="also time the batched implementation from before issue 11 side by side (whole sampler "
        "and its parts), after checking both give identical outputs",
    )
    C.add_common_args(p)
    args = p.parse_args(argv)
    return args


def load_views(path: str, count: int, size: int = 224, seed: int = 0) -> tuple[list[np.ndarray], str]:
    """`count` RGB uint8 views of size x size: real photos resized (bicubic) when `path` exists, else noise."""
    if os.path.isdir(path):
        import datasets

        ds = datasets.load_dataset(path, split="train", streaming=True)
        views = []
        iterator = iter(ds)
        for row in iterator:
            image = row["image"].convert("RGB").resize((size, size), PIL.Image.Resampling.BICUBIC)
            views.append(np.asarray(image, dtype=np.uint8).copy())
            if len(views) == count:
                break
        del iterator
        source = f"{len(views)} photos from {os.path.normpath(path)} resized to {size} px"
        while len(views) < count:
            views.append(views[len(views) % max(1, len(views))])
        return views, source
    rng = np.random.default_rng(seed)
    low = rng.integers(0, 256, (count, size // 8, size // 8, 3), dtype=np.uint8)
    views = [np.asarray(PIL.Image.fromarray(v).resize((size, size), PIL.Image.Resampling.BICUBIC)) for v in low]
    return views, f"{count} random smooth images (no dataset at {path})"


def to_normalized_batch(views: list[np.ndarray]) -> torch.Tensor:
    arr = np.stack(views).astype(np.float32) / 255.0
    arr = (arr - MEAN) / STD
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


class CpuTimed:
    """A callable that also records the CPU time (`time.process_time`, all threads) of each call."""

    def __init__(self, fn):
        self.fn, self.times = fn, []

    def __call__(self):
        start = time.process_time()
        out = self.fn()
        self.times.append(time.process_time() - start)
        return out


def check_identical(batch: torch.Tensor, config, seed: int, dtype: str, device: torch.device) -> None:
    """The current and the pre-issue-11 sampler give the same four tensors for the same seed (else: exit)."""
    from transformers_cim import _pretext_reference as before
    from transformers_cim.pretext import sample_pretext

    outs = []
    for sampler in (sample_pretext, before._sample_pretext_reference):
        with torch.no_grad(), C.autocast(device, dtype):
            outs.append(sampler(batch, config, generator=torch.Generator(device=device).manual_seed(seed)))
    for field in ("context_pixel_values", "exemplar_pixel_values", "correlation_labels", "exemplar_boxes"):
        if not torch.equal(getattr(outs[0], field), getattr(outs[1], field)):
            sys.exit(f"--compare_reference: {field} differs between the current and the reference sampler")


def part_candidates(batch: torch.Tensor, config, seed: int, device: torch.device) -> dict:
    """{(function, implementation): (callable, images per call)} for the sampler's parts, current and before."""
    from transformers_cim import _pretext_reference as before
    from transformers_cim import pretext

    generator = torch.Generator(device=device).manual_seed(seed)
    boxes = pretext.sample_config_boxes(
        config, batch.shape[0], config.num_exemplars, generator=generator, device=device
    )
    n, m, supersample = config.exemplar_size, config.context_size, pretext.exemplar_supersampling(config)
    mean = batch.new_tensor(config.image_mean).view(1, 3, 1, 1)
    std = batch.new_tensor(config.image_std).view(1, 3, 1, 1)
    exemplars = before._warp_exemplars_reference(batch, boxes, n, supersample)
    pixels = (exemplars.reshape(-1, *exemplars.shape[2:]) * std + mean).clamp(0, 1)  # what augmentation gets

    def warp_in_one_call():  # the path of GPUs and torch.compile
        chunk = pretext.CPU_WARP_CHUNK_BYTES
        pretext.CPU_WARP_CHUNK_BYTES = 1 << 62
        try:
            return pretext.warp_exemplars(batch, boxes, n, supersample)
        finally:
            pretext.CPU_WARP_CHUNK_BYTES = chunk

    calls = {
        ("correlation_maps", "current"): lambda: pretext.correlation_maps(boxes, m),
        ("correlation_maps", "before"): lambda: before._correlation_maps_reference(boxes, m),
        ("warp_exemplars", "current"): lambda: pretext.warp_exemplars(batch, boxes, n, supersample),
        ("warp_exemplars", "before"): lambda: before._warp_exemplars_reference(batch, boxes, n, supersample),
        ("warp_exemplars", "one call"): warp_in_one_call,
        ("augment_exemplars", "current"): lambda: pretext.augment_exemplars(pixels, config, generator),
        ("augment_exemplars", "before"): lambda: before._augment_exemplars_reference(pixels, config, generator),
        ("augment_exemplars", "masked"): lambda: pretext._augment(pixels, config, generator, subset=False),
    }
    return {key: (call, batch.shape[0]) for key, call in calls.items()}


IMPLEMENTATIONS = {
    "before": "before issue 11 (`_pretext_reference`)",
    "current": "current",
    "one call": "current, all images in one grid_sample call (GPU / compile path)",
    "masked": "current, on all samples, blended by mask (GPU / compile path)",
}


def comparison_rows(threads: int, timed: dict) -> list[list[object]]:
    """Rows of the before/after table: {(function, implementation): (images, wall times, cpu times)}."""
    rows = []
    for function in dict.fromkeys(name for name, _ in timed):
        rates = {}
        for impl, label in IMPLEMENTATIONS.items():
            if (function, impl) not in timed:
                continue
            images, wall, cpu = timed[(function, impl)]
            rates[impl] = (images / C.median(wall), images / C.median(cpu))
            per_call = f"{C.median(wall) * 1e3:.0f} ({C.spread([x * 1e3 for x in wall])})"
            ratio = "-"
            if impl != "before":
                wall_ratio, cpu_ratio = (rates[impl][i] / rates["before"][i] for i in (0, 1))
                ratio = (
                    f"**{wall_ratio:.2f}x** ({cpu_ratio:.2f}x)"
                    if impl == "current"
                    else f"{wall_ratio:.2f}x ({cpu_ratio:.2f}x)"
                )
            rows.append(
                [threads, function, label, images, per_call, f"{rates[impl][0]:.1f}", f"{rates[impl][1]:.1f}", ratio]
            )
    return rows


def check_masks(views, settings) -> float:
    """Mean IoU of the loop and PIL maps (and of the loop map with the exemplar geometry): a sanity check that
    both reference variants compute the same map."""
    rng = np.random.default_rng(0)
    ious = []
    for _ in range(20):
        box = sample_box(224, 224, settings, rng)
        a, b = mask_loop(box, 224, 224, 160), mask_pil(box, 224, 224, 160)
        union = np.logical_or(a, b).sum()
        ious.append(np.logical_and(a, b).sum() / union if union else 1.0)
    return float(np.mean(ious))


def main(argv=None) -> None:
    args = parse_args(argv)
    started = time.perf_counter()
    device = C.setup(args)
    all_cores = args.threads
    from transformers_cim import CIMConfig
    from transformers_cim.pretext import sample_pretext

    config = CIMConfig(exemplar_augmentation=not args.no_augmentation)
    settings = ReferenceSettings(augmentation=not args.no_augmentation)
    assert (config.num_exemplars, config.exemplar_size, config.context_size) == (
        settings.num_exemplars,
        settings.exemplar_size,
        settings.context_size,
    )
    masks = {"both": ("loop", "pil"), "none": ()}.get(args.reference_mask, (args.reference_mask,))
    thread_settings = sorted({1, all_cores})

    views, source = load_views(args.data, max(args.batch_size, args.reference_images * all_cores), seed=args.seed)
    batch = to_normalized_batch(views[: args.batch_size]).to(device)
    iou = check_masks(views, settings)
    if args.compare_reference:
        check_identical(batch, config, args.seed, args.dtype, device)
    print(
        f"bench_pretext: batch {args.batch_size} on {args.device} ({args.dtype}); reference {args.reference_images} "
        f"images/round/process, masks {masks}; thread settings {thread_settings}; loop-vs-PIL map IoU {iou:.3f}"
    )

    generator = torch.Generator(device=device).manual_seed(args.seed)

    def batched():
        with torch.no_grad(), C.autocast(device, args.dtype):
            return sample_pretext(batch, config, generator=generator)

    def batched_before():
        from transformers_cim._pretext_reference import _sample_pretext_reference

        with torch.no_grad(), C.autocast(device, args.dtype):
            return _sample_pretext_reference(batch, config, generator=generator)

    rng = np.random.default_rng(args.seed)
    results = []  # (threads, candidate, images per round, times)
    cpu_times = {}  # (threads, candidate) -> CPU seconds per round, for the in-process batched candidates
    compared = []  # rows of the before/after table
    for threads in thread_settings:
        torch.set_num_threads(threads)
        pool = None
        if threads > 1:
            pool = mp.get_context("spawn").Pool(
                threads, initializer=_worker_init, initargs=(views, not args.no_augmentation, args.seed)
            )
            pool.map(_worker_ready, range(threads * 4))  # start-up outside the timing
        batched_name = f"batched sample_pretext ({args.device})"
        candidates = {batched_name: CpuTimed(batched)}
        counts = {batched_name: args.batch_size}
        if args.compare_reference:
            before_name = f"batched sample_pretext ({args.device}), before issue 11"
            candidates[before_name] = CpuTimed(batched_before)
            counts[before_name] = args.batch_size
        for mode in masks:
            name = f"reference PIL pipeline, mask {mode}"
            if pool is None:
                chunk = views[: args.reference_images]
                candidates[name] = lambda chunk=chunk, mode=mode: reference_batch(chunk, settings, rng, mode)
                counts[name] = args.reference_images
            else:
                tasks = [(w * args.reference_images, args.reference_images, mode) for w in range(threads)]
                candidates[name] = lambda tasks=tasks: pool.map(_worker_run, tasks, chunksize=1)
                counts[name] = args.reference_images * threads
        label = f"{threads} core" + ("s" if threads > 1 else "") + (" (worker processes)" if pool else "")
        print(f"{label}: warm-up...")
        for _ in range(args.warmup):
            for fn in candidates.values():
                fn()
        for fn in candidates.values():
            if isinstance(fn, CpuTimed):
                fn.times.clear()  # the warm-up calls are not counted
        times = C.alternate(candidates, args.rounds, device)
        for name, t in times.items():
            results.append((threads, name, counts[name], t))
            if isinstance(candidates[name], CpuTimed):
                cpu_times[(threads, name)] = candidates[name].times
        if args.compare_reference:
            parts = part_candidates(batch, config, args.seed, device)
            timers = {f"{fn} ({impl})": CpuTimed(call) for (fn, impl), (call, _) in parts.items()}
            print(f"{label}: the sampler's parts, current and before issue 11...")
            for timer in timers.values():
                for _ in range(args.warmup):
                    timer()
                timer.times.clear()
            part_times = C.alternate(timers, args.rounds, device)
            whole = {
                ("sample_pretext", impl): (args.batch_size, times[name], cpu_times[(threads, name)])
                for impl, name in (("current", batched_name), ("before", before_name))
            }
            for (fn, impl), (_, images) in parts.items():
                whole[(fn, impl)] = (images, part_times[f"{fn} ({impl})"], timers[f"{fn} ({impl})"].times)
            compared += comparison_rows(threads, whole)
        if pool is not None:
            pool.close()
            pool.join()

    rows = []
    for threads in thread_settings:
        batched_rate = None
        for t, name, count, tm in results:
            if t != threads:
                continue
            rate = count / C.median(tm)
            if name.startswith("batched") and not name.endswith("before issue 11"):
                batched_rate = rate
            speedup = f"{batched_rate / rate:.2g}x" if batched_rate and not name.startswith("batched") else "-"
            cpu = cpu_times.get((t, name))
            per_cpu_second = f"{count / C.median(cpu):.1f}" if cpu else "-"
            how = (
                "torch threads" if name.startswith("batched") else "worker processes" if threads > 1 else "in process"
            )
            per_round = f"{C.median(tm) * 1e3:.0f} ({C.spread([x * 1e3 for x in tm])})"
            rows.append([f"{threads} ({how})", name, count, per_round, f"{rate:.1f}", per_cpu_second, speedup])
    table = C.markdown_table(
        [
            "cores",
            "pipeline",
            "images / round",
            "ms per round, median (min-max)",
            "images/s",
            "images per CPU-s",
            "batched speed-up",
        ],
        rows,
        align="llrrrrr",
    )
    comparison = []
    if compared:
        comparison = [
            "",
            "Before / after issue 11, side by side in this process (same rounds, identical outputs checked):",
            "",
            C.markdown_table(
                [
                    "cores",
                    "function",
                    "implementation",
                    "images / call",
                    "ms per call, median (min-max)",
                    "images/s",
                    "images per CPU-s",
                    "x before: wall (CPU)",
                ],
                compared,
                align="lllrrrrr",
            ),
        ]
    lines = [
        f"### Pretext generation: batched `sample_pretext` vs per-image PIL pipeline ({args.device}, {args.dtype})",
        "",
        *C.machine_lines(device, all_cores),
        f"- Command: `{C.command_line()}`",
        f"- Task: K={config.num_exemplars} exemplars of {config.exemplar_size} px + {config.context_size} px context "
        f"and maps from 224 px views, photometric exemplar augmentation {'off' if args.no_augmentation else 'on'}; "
        f"views: {source}",
        f"- {args.rounds} alternating rounds after {args.warmup} warm-up per setting; loop and PIL maps agree "
        f"(mean IoU {iou:.3f} over 20 boxes)",
        "",
        table,
        *comparison,
        "",
        "- images per CPU-s: images / `time.process_time` of this process (all its threads), batched rows only.",
        "- Reference with N>1 cores: N spawn worker processes (one per core, as data-loader workers), each "
        "doing `images / round / N` images and returning only a checksum.",
        f"- Benchmark wall time: {time.perf_counter() - started:.0f} s",
    ]
    C.emit("\n".join(lines), args.output)


if __name__ == "__main__":
    main()
