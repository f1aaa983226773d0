"""Data-loading throughput of CIM pre-training: decode + search view, streamed from parquet, 0..N workers.

Two pipelines over the same streamed `datasets.IterableDataset` (`load_image_dataset(..., streaming=True)`), both
decoding with Pillow into `RandomResizedCropFlip(224, scale=(0.5, 1.0))` views and collated by `SkippingCollator`:

- `resumable`: `ResumableImageStream`, what `run_pretraining.py` trains on (its own shuffle buffer, per-reader
  generators, a position snapshot attached to every batch so checkpoints can resume the stream);
- `datasets`: datasets' own `shuffle(buffer_size)` then the batched `build_pretraining_transform` through
  `prepare_dataset` (`IterableDataset.map`), which cannot be resumed exactly.

For each (pipeline, worker count) it reads `--images` images; the settings alternate over `--rounds` rounds and the
medians are reported, both steady-state (after the first batch) and end to end (worker start-up, shuffle-buffer fill
and first batch included), with the resumable pipeline's rate relative to datasets' one.

It then compares the loader with the model: images/s of a CIM ViT-S training step at batch 8 measured in the
same process (or `--model_images_per_s`), and says which of the two bounds a run on this machine.

    python benchmarks/bench_dataloading.py
    python benchmarks/bench_dataloading.py --workers 0,1,2,4,8 --model_images_per_s 1800   # e.g. a GPU's rate
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

from transformers_cim.training import data  # noqa: E402
from transformers_cim.training.streaming import ResumableImageStream  # noqa: E402

PIPELINES = ("resumable", "datasets")

DEFAULT_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "imagenette-160")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=DEFAULT_DATA, help="dataset for load_image_dataset(dataset_name=...)")
    p.add_argument("--split", default="train")
    p.add_argument("--workers", default="0,1,2", help="comma-separated data-loader worker counts")
    p.add_argument("--images", type=int, default=512, help="images read per setting and round")
    p.add_argument("--loader_batch_size", type=int, default=32, help="DataLoader batch size")
    p.add_argument(
        "--shuffle_buffer",
        type=int,
        default=1000,
        help="streaming shuffle buffer (run_pretraining.py uses 10000; 0 = no shuffle)",
    )
    p.add_argument("--image_size", type=int, default=224)
    p.add_argument("--min_image_size", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument(
        "--model_images_per_s",
        type=float,
        default=None,
        help="images/s of the training step to compare with (default: measure a CIM step here)",
    )
    p.add_argument("--model", default="vit-small-patch16", help="encoder of the CIM step measured here")
    p.add_argument("--model_batch_size", type=int, default=8)
    p.add_argument("--model_steps", type=int, default=2, help="timed CIM steps (after one warm-up step)")
    C.add_common_args(p)
    return p.parse_args(argv)


def build_loader(args, workers: int, pipeline: str):
    ds = data.load_image_dataset(dataset_name=args.data, split=args.split, streaming=True)
    image_column = data.find_image_column(ds.features)
    transform = data.RandomResizedCropFlip(size=args.image_size, scale=(0.5, 1.0))
    if pipeline == "resumable":
        ds = ResumableImageStream(
            ds,
            image_column,
            transform,
            min_size=args.min_image_size,
            buffer_size=max(1, args.shuffle_buffer),
            seed=args.seed,
        )
    else:
        if args.shuffle_buffer > 0:
            ds = ds.shuffle(seed=args.seed, buffer_size=args.shuffle_buffer)
        ds = data.prepare_dataset(
            ds, image_column, data.build_pretraining_transform(image_column, transform, args.min_image_size)
        )
    return torch.utils.data.DataLoader(
        ds,
        batch_size=args.loader_batch_size,
        num_workers=workers,
        collate_fn=data.SkippingCollator(),
        persistent_workers=False,
    )


def read_images(args, workers: int, pipeline: str) -> dict:
    """Reads `args.images` images; returns counts and timings (first batch, total)."""
    start = time.perf_counter()
    loader = build_loader(args, workers, pipeline)
    iterator = iter(loader)
    seen = skipped = 0
    first_batch_s = after_first = None
    shape = None
    for batch in iterator:
        now = time.perf_counter()
        n = int(batch["pixel_values"].shape[0])
        if first_batch_s is None:
            first_batch_s, after_first = now - start, n
            shape = tuple(batch["pixel_values"].shape[1:])
        seen += n
        skipped += int(batch["num_skipped"])
        if seen >= args.images:
            break
    total = time.perf_counter() - start
    del iterator  # shuts the workers down
    steady = (seen - after_first) / max(total - first_batch_s, 1e-9)
    return {
        "images": seen,
        "skipped": skipped,
        "first_batch_s": first_batch_s,
        "total_s": total,
        "steady_images_per_s": steady,
        "end_to_end_images_per_s": seen / total,
        "shape": shape,
    }


def measure_model(args, device) -> float:
    """images/s of a CIM training step (forward + backward + AdamW + EMA) at `--model_batch_size`."""
    from bench_step import build_candidate

    step_args = argparse.Namespace(model=args.model, compile=False, no_ema=False, dtype=args.dtype)
    pixel_values = torch.randn(args.model_batch_size, 3, 224, 224, device=device)
    _, step, _ = build_candidate("cim", step_args, device, pixel_values)
    step()
    times = [C.time_call(step, device) for _ in range(args.model_steps)]
    return args.model_batch_size / C.median(times)


def main(argv=None) -> None:
    args = parse_args(argv)
    started = time.perf_counter()
    device = C.setup(args)
    worker_counts = [int(w) for w in args.workers.split(",")]
    settings = [(p, w) for w in worker_counts for p in PIPELINES]
    if args.images < 256:
        print(
            "note: the datasets pipeline maps 64 images at a time, so steady-state rates from fewer than ~256 images "
            "are coarse (a whole map batch can arrive with the first loader batch)"
        )
    print(
        f"bench_dataloading: {args.images} images per setting, workers {worker_counts}, {args.rounds} rounds, "
        f"loader batch {args.loader_batch_size}, shuffle buffer {args.shuffle_buffer}"
    )

    read_images(args, 0, "datasets")  # warm the page cache and the imports
    results: dict[tuple[str, int], list[dict]] = {s: [] for s in settings}
    for r in range(args.rounds):
        order = settings[r % len(settings) :] + settings[: r % len(settings)]
        for setting in order:
            results[setting].append(read_images(args, setting[1], setting[0]))
        print(
            f"  round {r + 1}/{args.rounds}: "
            + ", ".join(f"{p} {w} workers {results[(p, w)][-1]['steady_images_per_s']:.0f} img/s" for p, w in settings)
        )

    if args.model_images_per_s is None:
        print(f"measuring a CIM {args.model} step at batch {args.model_batch_size} ({args.dtype}, {args.device})...")
        model_rate, model_source = (
            measure_model(args, device),
            (
                f"CIM {args.model} training step, batch {args.model_batch_size}, {args.dtype}, {args.device}, "
                f"{args.threads} threads, measured here (median of {args.model_steps} steps)"
            ),
        )
    else:
        model_rate, model_source = args.model_images_per_s, "given with --model_images_per_s"

    def steady(setting) -> float:
        return C.median([x["steady_images_per_s"] for x in results[setting]])

    rows = []
    best, best_rate = None, 0.0
    for setting in settings:
        res = results[setting]
        rate = steady(setting)
        e2e = C.median([x["end_to_end_images_per_s"] for x in res])
        first = C.median([x["first_batch_s"] for x in res])
        if setting[0] == "resumable" and rate > best_rate:
            best, best_rate = setting, rate
        versus = f"{rate / steady(('datasets', setting[1])):.2f}x" if setting[0] == "resumable" else "1"
        rows.append(
            [
                setting[0],
                setting[1],
                f"{rate:.1f} ({C.spread([x['steady_images_per_s'] for x in res])})",
                versus,
                f"{e2e:.1f}",
                f"{first:.2f}",
                sum(x["skipped"] for x in res),
                f"{rate / model_rate:.1f}x",
            ]
        )
    table = C.markdown_table(
        [
            "pipeline",
            "workers",
            "images/s steady, median (min-max)",
            "vs datasets",
            "images/s end to end",
            "first batch s",
            "skipped",
            "loader / model rate",
        ],
        rows,
    )
    shape = results[settings[0]][0]["shape"]
    best_w = best[1]
    if best_rate >= model_rate:
        verdict = (
            f"**The model step bounds the run**: the resumable loader gives {best_rate:.0f} images/s with "
            f"{best_w} worker(s), {best_rate / model_rate:.1f}x the {model_rate:.1f} images/s the step consumes."
        )
    else:
        verdict = (
            f"**The loader bounds the run**: at most {best_rate:.0f} images/s ({best_w} worker(s)) against "
            f"{model_rate:.1f} images/s of the step; add workers (they must divide the shard count) or cores."
        )
    # one core: a single worker process (torch uses 1 thread there); else the in-process loader
    one_core = 1 if 1 in worker_counts else (0 if 0 in worker_counts else None)
    rate0 = steady(("resumable", one_core)) if one_core is not None else None
    lines = [
        f"### Data loading: streamed parquet -> decode -> {args.image_size} px search view",
        "",
        *C.machine_lines(device, args.threads),
        f"- Command: `{C.command_line()}`",
        f"- Data: `{os.path.normpath(args.data)}` split {args.split}, streaming, shuffle buffer "
        f"{args.shuffle_buffer}; `RandomResizedCropFlip(size={args.image_size}, scale=(0.5, 1.0))`; DataLoader batch "
        f"{args.loader_batch_size}, "
        f"`SkippingCollator`; batches of {shape}; {args.images} images per setting, {args.rounds} alternating rounds",
        "",
        table,
        "",
        f"- Model: {model_rate:.2f} images/s ({model_source}).",
        f"- {verdict}",
    ]
    if rate0 and args.model_images_per_s is None and args.device == "cpu":
        lines.append(
            f"- On a CPU-only machine loader and model share the cores: decoding costs {1e3 / rate0:.1f} "
            f"ms/image on one core ({one_core} worker{'s' if one_core != 1 else ''}) against "
            f"{1e3 / model_rate:.0f} ms/image for the step on all "
            f"{args.threads}, so decoding adds about {100 * model_rate / rate0 / args.threads:.1f}% to the "
            f"CPU time of training."
        )
    lines.append(f"- Benchmark wall time: {time.perf_counter() - started:.0f} s")
    C.emit("\n".join(lines), args.output)


if __name__ == "__main__":
    main()
