"""ResumableImageStream: a stream resumed from the snapshot of any batch yields exactly the batches the uninterrupted
stream yielded after it (same records, same shuffle, same crops and flips, same worker order), with and without
DataLoader workers, across passes, and refuses a resume it cannot honour."""

from __future__ import annotations

import json

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from transformers_cim.training.data import RandomResizedCropFlip, SkippingCollator
from transformers_cim.training.streaming import STREAM_STATE_KEY, ResumableImageStream, StreamPosition

ROWS_PER_SHARD, NUM_SHARDS, BATCH = 12, 4, 4
CORRUPT = {(1, 3), (2, 0)}  # (shard, row) holding undecodable bytes


def write_shards(root, num_shards: int = NUM_SHARDS) -> list[str]:
    rng = np.random.default_rng(0)
    paths = []
    for k in range(num_shards):
        images = []
        for i in range(ROWS_PER_SHARD):
            if (k, i) in CORRUPT:
                images.append({"bytes": b"not an image", "path": None})
            else:
                images.append(Image.fromarray(rng.integers(0, 256, (40, 48, 3)).astype(np.uint8)))
        path = str(root / f"train-{k:05d}-of-{num_shards:05d}.parquet")
        datasets.Dataset.from_dict(
            {"image": images, "idx": [k * 100 + i for i in range(ROWS_PER_SHARD)]},
            features=datasets.Features({"image": datasets.Image(), "idx": datasets.Value("int64")}),
        ).to_parquet(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> list[str]:
    return write_shards(tmp_path_factory.mktemp("stream"))


def make_stream(shards: list[str], buffer_size: int = 8, seed: int = 3, **kwargs) -> ResumableImageStream:
    source = datasets.load_dataset("parquet", data_files=shards, split="train", streaming=True)
    transform = RandomResizedCropFlip(size=16, scale=(0.3, 1.0))
    return ResumableImageStream(source, "image", transform, min_size=8, buffer_size=buffer_size, seed=seed, **kwargs)


def read(stream: ResumableImageStream, num_workers: int, epoch: int = 0) -> list[dict]:
    stream.set_epoch(epoch)
    loader = torch.utils.data.DataLoader(
        stream, batch_size=BATCH, collate_fn=SkippingCollator(), num_workers=num_workers
    )
    return list(loader)


def position_after(batches: list[dict], index: int) -> dict:
    """What a checkpoint saved after training on batches[: index + 1] holds (through JSON, as on disk)."""
    position = StreamPosition()
    for batch in batches[: index + 1]:
        position.update(batch[STREAM_STATE_KEY])
    return json.loads(json.dumps(position.state_dict()))


def assert_same_batches(actual: list[dict], expected: list[dict]) -> None:
    assert len(actual) == len(expected)
    for i, (a, b) in enumerate(zip(actual, expected)):
        assert int(a["num_skipped"]) == int(b["num_skipped"]), i
        assert torch.equal(a["pixel_values"], b["pixel_values"]), f"batch {i} differs"


class WholeImage:
    """A transform that keeps the decoded image as it is, so a view identifies its record."""

    size = (40, 48)

    def __call__(self, image: Image.Image, rng: np.random.Generator | None = None) -> torch.Tensor:
        return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float()


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_pass_reads_every_record_once_shuffled_and_augmented(shards, num_workers):
    batches = read(make_stream(shards), num_workers)
    total = NUM_SHARDS * ROWS_PER_SHARD
    assert sum(int(b["pixel_values"].shape[0]) for b in batches) == total - len(CORRUPT)
    assert sum(int(b["num_skipped"]) for b in batches) == len(CORRUPT)
    # every valid record exactly once: with a transform that keeps the image whole, a view identifies its record
    source = datasets.load_dataset("parquet", data_files=shards, split="train", streaming=True)
    whole = [
        v.numpy().tobytes()
        for b in read(ResumableImageStream(source, "image", WholeImage(), min_size=8, buffer_size=8), num_workers)
        for v in b["pixel_values"]
    ]
    assert len(whole) == len(set(whole)) == total - len(CORRUPT)
    # the buffer shuffles: not the order of a stream without a buffer (same seed, same crops per record)
    unshuffled = read(make_stream(shards, buffer_size=1), num_workers)
    assert not all(torch.equal(a["pixel_values"], b["pixel_values"]) for a, b in zip(batches, unshuffled))
    # same seed, same pass: identical; another seed or another pass: different
    assert_same_batches(read(make_stream(shards), num_workers), batches)
    assert not torch.equal(
        read(make_stream(shards, seed=4), num_workers)[0]["pixel_values"], batches[0]["pixel_values"]
    )
    assert not torch.equal(
        read(make_stream(shards), num_workers, epoch=1)[0]["pixel_values"], batches[0]["pixel_values"]
    )


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("index", [0, 4, 7, 10])
def test_resuming_from_any_batch_yields_exactly_the_rest(shards, num_workers, index):
    batches = read(make_stream(shards), num_workers)
    assert index < len(batches) - 1
    resumed = make_stream(shards)
    resumed.load_state_dict(position_after(batches, index))
    assert_same_batches(read(resumed, num_workers), batches[index + 1 :])


def test_resuming_while_the_buffer_drains(shards):
    # the last batches come from the buffer after the stream ended: the snapshot says so and no record is re-read
    batches = read(make_stream(shards, buffer_size=20), 0)
    state = position_after(batches, len(batches) - 3)
    assert state["roles"][0]["draining"]
    resumed = make_stream(shards, buffer_size=20)
    resumed.load_state_dict(state)
    assert_same_batches(read(resumed, 0), batches[-2:])


def test_resuming_a_later_pass_when_the_trainer_counts_epochs_from_zero(shards):
    # the Trainer restarts its epoch loop at 0 for a stream; the stream resumes the pass its checkpoint was in
    second_pass = read(make_stream(shards), 2, epoch=1)
    resumed = make_stream(shards)
    resumed.load_state_dict(position_after(second_pass, 5))
    assert_same_batches(read(resumed, 2, epoch=0), second_pass[6:])
    # and the pass after the resumed one is the stream's next pass, fresh
    assert_same_batches(read(resumed, 2, epoch=1), read(make_stream(shards), 2, epoch=2))


def test_resuming_with_another_number_of_workers_is_refused(shards):
    batches = read(make_stream(shards), 2)
    resumed = make_stream(shards)
    resumed.load_state_dict(position_after(batches, 3))
    with pytest.raises(ValueError, match="--dataloader_num_workers 2"):
        read(resumed, 0)


def test_resuming_with_another_number_of_processes_is_refused(shards):
    state = position_after(read(make_stream(shards, rank=1, world_size=2), 0), 2)
    assert state["world_size"] == 2
    with pytest.raises(ValueError, match="resume with 2"):
        make_stream(shards).load_state_dict(state)


def test_resuming_on_data_that_changed_is_refused(shards, tmp_path):
    batches = read(make_stream(shards), 0)
    shorter = write_shards(tmp_path, num_shards=1)
    resumed = make_stream(shorter)
    resumed.load_state_dict(position_after(batches, 6))
    with pytest.raises(RuntimeError, match="files changed"):
        read(resumed, 0)


def test_each_rank_reads_its_own_shards(shards):
    def images(rank: int, world_size: int) -> list[bytes]:
        source = datasets.load_dataset("parquet", data_files=shards, split="train", streaming=True)
        stream = ResumableImageStream(
            source, "image", WholeImage(), min_size=8, buffer_size=4, rank=rank, world_size=world_size
        )
        return [v.numpy().tobytes() for b in read(stream, 0) for v in b["pixel_values"]]

    everything = images(0, 1)
    ranks = [images(0, 2), images(1, 2)]
    assert len(everything) == len(set(everything)) == NUM_SHARDS * ROWS_PER_SHARD - len(CORRUPT)
    assert not set(ranks[0]) & set(ranks[1])
    assert sorted(ranks[0] + ranks[1]) == sorted(everything)
    assert make_stream(shards, rank=0, world_size=2).num_shards == 2


def test_workers_with_unequal_shares_resume_exactly(shards):
    # 3 shards for 2 workers: one worker reads twice as much and runs alone at the end of the pass
    batches = read(make_stream(shards[:3]), 2)
    assert sum(int(b["pixel_values"].shape[0]) + int(b["num_skipped"]) for b in batches) == 3 * ROWS_PER_SHARD
    for index in (3, len(batches) - 3):
        resumed = make_stream(shards[:3])
        resumed.load_state_dict(position_after(batches, index))
        assert_same_batches(read(resumed, 2), batches[index + 1 :])


def test_the_re_read_at_resume_is_bounded_by_the_oldest_buffered_record(monkeypatch):
    # a reservoir keeps some records for ~N ln N arrivals; the reader yields any record 4N arrivals old instead, so a
    # resumed reader re-reads at most 4N records (here N = 8 over 2,000 records)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (12, 12, 3)).astype(np.uint8)) for _ in range(2000)]
    source = datasets.Dataset.from_dict({"image": images}, features=datasets.Features({"image": datasets.Image()}))

    def spans(max_age_factor: int) -> list[int]:
        monkeypatch.setattr("transformers_cim.training.streaming._Reader.MAX_AGE_BUFFERS", max_age_factor)
        stream = ResumableImageStream(
            source.to_iterable_dataset(), "image", RandomResizedCropFlip(size=8), min_size=8, buffer_size=8, seed=0
        )
        states = [b[STREAM_STATE_KEY] for b in read(stream, 0)]
        return [s["next_seq"] - s["start_seq"] for s in states if not s["draining"]]

    capped, uncapped = spans(4), spans(10**6)
    assert max(capped) <= 4 * 8 < max(uncapped)
