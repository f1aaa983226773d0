"""Cost of resuming a stream: ResumableImageStream's saved position vs the Trainer's replay of the stream.

A stream is read for `--position` images (as a run would be before its checkpoint) and the position of its last
batch is taken, as `CIMTrainer` saves it. Then, alternating over `--rounds` rounds, the time until the first batch
after that position is measured two ways:

- `position`: a fresh stream loads the saved position and yields its next batch (it re-reads, without decoding,
  the records still in its shuffle buffer);
- `replay`: what `Trainer` does without a saved position (`skip_first_batches`): read the stream from its start and
  drop every batch up to the position, decoding each.

Both yield the same batch; the script checks that it is the same tensor before timing.

    python benchmarks/bench_resume.py
    python benchmarks/bench_resume.py --position 8192 --workers 2
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
from transformers_cim.training.streaming import STREAM_STATE_KEY, ResumableImageStream, StreamPosition  # noqa: E402

DEFAULT_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "imagenette-160")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=DEFAULT_DATA, help="dataset for load_image_dataset(dataset_name=...)")
    p.add_argument("--split", default="train")
    p.add_argument("--position", type=int, default=4096, help="images read before the checkpoint")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers")
    p.add_argument("--loader_batch_size", type=int, default=32)
    p.add_argument("--shuffle_buffer", type=int, default=1000)
    p.add_argument("--image_size", type=int, default=224)
    p.add_argument("--rounds", type=int, default=3)
    C.add_common_args(p)
    return p.parse_args(argv)


def make_stream(args) -> ResumableImageStream:
    ds = data.load_image_dataset(dataset_name=args.data, split=args.split, streaming=True)
    column = data.find_image_column(ds.features)
    transform = data.RandomResizedCropFlip(size=args.image_size, scale=(0.5, 1.0))
    return ResumableImageStream(ds, column, transform, buffer_size=args.shuffle_buffer, seed=args.seed)


def loader(stream, args) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(
        stream, batch_size=args.loader_batch_size, num_workers=args.workers, collate_fn=data.SkippingCollator()
    )


def saved_position(args) -> tuple[dict, int]:
    """The position after the batch that reaches `args.position` images, and that batch's index."""
    position = StreamPosition()
    seen = 0
    for index, batch in enumerate(loader(make_stream(args), args)):
        position.update(batch[STREAM_STATE_KEY])
        seen += int(batch["pixel_values"].shape[0]) + int(batch["num_skipped"])
        if seen >= args.position:
            return position.state_dict(), index
    sys.exit(f"The stream has fewer than {args.position} images; lower --position.")


def first_batch_from_position(args, state: dict) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    stream = make_stream(args)
    stream.load_state_dict(state)
    batch = next(iter(loader(stream, args)))
    return time.perf_counter() - start, batch["pixel_values"]


def first_batch_by_replay(args, index: int) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    for i, batch in enumerate(loader(make_stream(args), args)):
        if i == index + 1:
            return time.perf_counter() - start, batch["pixel_values"]
    raise RuntimeError("the stream ended before the position")


def main(argv=None) -> None:
    args = parse_args(argv)
    started = time.perf_counter()
    device = C.setup(args)
    state, index = saved_position(args)
    _, a = first_batch_from_position(args, state)
    _, b = first_batch_by_replay(args, index)
    if not torch.equal(a, b):
        sys.exit("The resumed stream's first batch differs from the replayed one: the saved position is wrong.")
    times: dict[str, list[float]] = {"position": [], "replay": []}
    for r in range(args.rounds):
        for name in ["position", "replay"] if r % 2 == 0 else ["replay", "position"]:
            seconds, _ = (
                first_batch_from_position(args, state) if name == "position" else first_batch_by_replay(args, index)
            )
            times[name].append(seconds)
        print(
            f"  round {r + 1}/{args.rounds}: position {times['position'][-1]:.2f} s, replay "
            f"{times['replay'][-1]:.2f} s"
        )
    pos, rep = C.median(times["position"]), C.median(times["replay"])
    re_read = sum(r["next_seq"] - r["start_seq"] for r in state["roles"] if r is not None)
    table = C.markdown_table(
        ["resume by", "time to the first batch after the checkpoint, s, median (min-max)"],
        [
            ["saved stream position (ResumableImageStream)", f"{pos:.2f} ({C.spread(times['position'])})"],
            ["replay and drop (Trainer without a position)", f"{rep:.2f} ({C.spread(times['replay'])})"],
        ],
    )
    lines = [
        f"### Resuming a stream {args.position} images in",
        "",
        *C.machine_lines(device, args.threads),
        f"- Command: `{C.command_line()}`",
        f"- Data: `{os.path.normpath(args.data)}` split {args.split}, streaming, shuffle buffer "
        f"{args.shuffle_buffer}, "
        f"{args.workers} workers, loader batch {args.loader_batch_size}; resumed after batch {index} "
        "(both ways yield the same next batch: checked)",
        "",
        table,
        "",
        f"- The saved position is **{rep / pos:.1f}x** faster to resume from; replay grows with the position, the "
        "saved "
        "position with the shuffle buffer only.",
        f"- Records re-read (not decoded) to refill the shuffle buffer: {re_read} (at most 4 x the buffer per "
        "reader); "
        f"replay reads and decodes all {args.position}+.",
        f"- Benchmark wall time: {time.perf_counter() - started:.0f} s",
    ]
    C.emit("\n".join(lines), args.output)


if __name__ == "__main__":
    main()
