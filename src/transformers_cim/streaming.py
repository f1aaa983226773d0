"""Streamed pre-training data that a checkpoint resumes exactly.

`ResumableImageStream` reads a `datasets.IterableDataset` whose images are still encoded and yields decoded,
augmented rows for :class:`~transformers_cim.data.SkippingCollator`. Every reader (one per DataLoader worker, or one
per process without workers) owns its part of the stream, a shuffle buffer and two seeded generators (shuffling and
crop/flip), so what it yields depends only on (seed, rank, worker, epoch) and on where it is.

`snapshot()` says where a reader is after the row it yielded last. The collator attaches the snapshot of the
reader that produced a batch to the batch, `CIMTrainer` keeps the snapshots of the last batch it trained on from
each reader and saves them with every checkpoint (`cim_stream_state_<rank>.json`), and `load_state_dict` makes the
next iteration continue from there: no record is read twice or skipped, crops and flips are the same, and the
workers' batches come in the same order as in the uninterrupted run.

The position inside the files is datasets' own `IterableDataset.state_dict`. datasets cannot restore the content of
its shuffle buffer (it is dropped on resume), so the shuffle buffer is kept here instead: a snapshot lists the
sequence numbers of the records it holds, and a resumed reader re-reads the records from the oldest of them on,
without decoding them, to refill it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import datasets
import numpy as np
import torch
from datasets.distributed import split_dataset_by_node

from .data import _placeholder, _without_image_decoding, decode_image

logger = logging.getLogger(__name__)

STREAM_STATE_KEY = "stream_state"
_ACTIVE_READER: "_Reader | None" = None  # the reader iterating in this process (one per worker process)


def current_snapshot() -> dict | None:
    """Snapshot of the reader iterating in this process (the one that produced the rows being collated), if any."""
    return None if _ACTIVE_READER is None else _ACTIVE_READER.snapshot()


@dataclass
class _Record:
    seq: int  # position of the record in this reader's unshuffled stream
    value: Any  # the encoded image
    source_state: dict  # datasets' state just before the record was read


class _Reader:
    """One reader's records, shuffle buffer, generators and position."""

    def __init__(self, source: datasets.IterableDataset, image_column: str, transform: Callable, min_size: int,
                 buffer_size: int, role: int, num_roles: int, epoch: int, seed_key: list[int]):
        self.source, self.image_column = source, image_column
        self.transform, self.min_size, self.buffer_size = transform, min_size, buffer_size
        self.role, self.num_roles, self.epoch = role, num_roles, epoch
        self.shuffle_rng = np.random.default_rng([*seed_key, 0])
        self.augment_rng = np.random.default_rng([*seed_key, 1])
        self.buffer: list[_Record] = []
        self.next_seq = 0
        self.draining = False  # the source is exhausted and the buffer is being emptied

    def _records(self) -> Iterator[_Record]:
        rows = self.source.iter(batch_size=1)  # `iter` reads this reader's shards even inside a DataLoader worker
        while True:
            before = self.source.state_dict()
            try:
                row = next(rows)
            except StopIteration:
                return
            record = _Record(self.next_seq, row[self.image_column][0], before)
            self.next_seq += 1
            yield record

    def _decode(self, record: _Record) -> dict:
        image = decode_image(record.value, min_size=self.min_size)
        if image is None:
            return {"pixel_values": _placeholder(self.transform), "cim_valid": False}
        return {"pixel_values": self.transform(image, rng=self.augment_rng), "cim_valid": True}

    def rows(self, resume: dict | None) -> Iterator[dict]:
        records = self._records()
        if resume is not None:
            self._restore(resume, records)
        if not self.draining:
            for record in records:
                if len(self.buffer) < self.buffer_size:
                    self.buffer.append(record)
                    continue
                slot = int(self.shuffle_rng.integers(self.buffer_size))
                out, self.buffer[slot] = self.buffer[slot], record
                yield self._decode(out)
            order = self.shuffle_rng.permutation(len(self.buffer))
            self.buffer = [self.buffer[i] for i in order]
            self.draining = True
        while self.buffer:
            yield self._decode(self.buffer.pop(0))

    def snapshot(self) -> dict:
        oldest = min(self.buffer, key=lambda r: r.seq) if self.buffer else None
        return {
            "role": self.role,
            "num_roles": self.num_roles,
            "epoch": self.epoch,
            "source_state": oldest.source_state if oldest else self.source.state_dict(),
            "start_seq": oldest.seq if oldest else self.next_seq,
            "buffer_seqs": [r.seq for r in self.buffer],
            "next_seq": self.next_seq,
            "draining": self.draining,
            "shuffle_rng": self.shuffle_rng.bit_generator.state,
            "augment_rng": self.augment_rng.bit_generator.state,
        }

    def _restore(self, state: dict, records: Iterator[_Record]) -> None:
        """Re-reads (without decoding) the records from the oldest buffered one on, keeping the buffered ones."""
        self.source.load_state_dict(state["source_state"])
        self.next_seq = state["start_seq"]
        slots: dict[int, int] = {seq: i for i, seq in enumerate(state["buffer_seqs"])}
        buffer: list[_Record | None] = [None] * len(slots)
        for _ in range(state["next_seq"] - state["start_seq"]):
            record = next(records, None)
            if record is None:
                raise RuntimeError("The stream ended before the checkpoint's position: its files changed since the "
                                   "checkpoint was saved. Resume with the same data, or start a new run.")
            if record.seq in slots:
                buffer[slots[record.seq]] = record
        self.buffer = [r for r in buffer if r is not None]
        self.draining = bool(state["draining"])
        self.shuffle_rng.bit_generator.state = state["shuffle_rng"]
        self.augment_rng.bit_generator.state = state["augment_rng"]


class ResumableImageStream(torch.utils.data.IterableDataset):
    """Decoded, augmented rows from a streamed image dataset, resumable from a snapshot (see the module docstring).

    Args:
        source: the stream; its image column may still decode (it is read encoded).
        image_column: the column holding the images.
        transform: called as ``transform(pil_image, rng=numpy_generator)``; returns a (3, H, W) tensor and has a
            ``size`` attribute (e.g. :class:`~transformers_cim.data.RandomResizedCropFlip`).
        min_size: images with a shorter side are yielded with ``cim_valid=False`` (the collator drops them).
        buffer_size: the shuffle buffer of each reader (records are held encoded).
        seed: with the rank, worker and epoch, seeds each reader's shuffling and augmentation.
        rank, world_size: this process's part of the stream: whole shards when there are at least `world_size` of
            them, else every `world_size`-th record.
    """

    def __init__(self, source: datasets.IterableDataset, image_column: str, transform: Callable, *,
                 min_size: int = 32, buffer_size: int = 1000, seed: int = 0, rank: int = 0, world_size: int = 1):
        if buffer_size < 1:
            raise ValueError(f"buffer_size must be at least 1, got {buffer_size}.")
        self.source = _without_image_decoding(source, image_column)
        if self.source.features is not None:
            self.source = self.source.select_columns([image_column])
        self.image_column, self.transform, self.min_size = image_column, transform, min_size
        self.buffer_size, self.seed, self.rank, self.world_size = buffer_size, seed, rank, world_size
        self.epoch = 0
        self._resume: dict | None = None
        self._epoch_offset: int | None = None

    @property
    def num_shards(self) -> int:
        """Shards this process reads (what its DataLoader workers share)."""
        total = self.source.num_shards
        return total // self.world_size if total >= self.world_size else 1

    def _rank_source(self) -> datasets.IterableDataset:
        if self.world_size == 1:
            return self.source
        if self.source.num_shards >= self.world_size:
            return self.source.shard(num_shards=self.world_size, index=self.rank, contiguous=True)
        return split_dataset_by_node(self.source, rank=self.rank, world_size=self.world_size)

    def set_epoch(self, epoch: int) -> None:
        # the Trainer counts epochs from 0 again on resume; the resumed pass is the checkpoint's epoch
        if self._resume is not None and self._epoch_offset is None:
            self._epoch_offset = self._resume["epoch"] - epoch
        self.epoch = epoch + (self._epoch_offset or 0)

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state` (a :meth:`StreamPosition.state_dict`) at the next iteration of its epoch."""
        for key in ("epoch", "num_roles", "next_role", "roles"):
            if key not in state:
                raise ValueError(f"Not a stream state: no {key!r}.")
        self._resume, self._epoch_offset = state, None
        self.epoch = state["epoch"]

    def _resume_for(self, num_workers: int) -> dict | None:
        if self._resume is None or self._resume["epoch"] != self.epoch:
            return None
        if self._resume["num_roles"] != num_workers:
            raise ValueError(
                f"The checkpoint's stream was read by {self._resume['num_roles']} dataloader worker(s) per process, this "
                f"run uses {num_workers}: resume with --dataloader_num_workers {self._resume['num_roles']} (each "
                "worker's position is saved separately)."
            )
        return self._resume

    def __iter__(self) -> Iterator[dict]:
        global _ACTIVE_READER
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        resume = self._resume_for(num_workers)
        # the resumed run's worker 0 reads for the worker whose batch was due next, so batches keep their order
        role = (worker + (resume["next_role"] if resume else 0)) % num_workers
        source = self._rank_source()
        if num_workers > 1:
            if source.num_shards < num_workers:
                raise ValueError(f"{num_workers} dataloader workers for {source.num_shards} shard(s) in this process: "
                                 "each worker reads whole shards, so use at most as many workers as shards.")
            # an uneven split gives some workers one shard more; they simply run longer
            source = source.shard(num_shards=num_workers, index=role, contiguous=True)
        source.set_epoch(self.epoch)
        reader = _Reader(source, self.image_column, self.transform, self.min_size, self.buffer_size, role,
                         num_workers, self.epoch, [self.seed, self.rank, role, self.epoch])
        _ACTIVE_READER = reader
        try:
            yield from reader.rows(resume["roles"][role] if resume else None)
        finally:
            if _ACTIVE_READER is reader:
                _ACTIVE_READER = None


class StreamPosition:
    """The snapshots of the last batch trained on from each reader of one process: what a checkpoint saves."""

    def __init__(self) -> None:
        self.epoch: int | None = None
        self.num_roles = 1
        self.last_role: int | None = None
        self.roles: dict[int, dict] = {}

    def update(self, snapshot: dict) -> None:
        if snapshot["epoch"] != self.epoch:  # a new pass over the stream: the previous one's positions are done
            self.epoch, self.roles = snapshot["epoch"], {}
        self.num_roles, self.last_role = snapshot["num_roles"], snapshot["role"]
        self.roles[snapshot["role"]] = snapshot

    def state_dict(self) -> dict | None:
        if self.last_role is None:
            return None
        return {
            "epoch": self.epoch,
            "num_roles": self.num_roles,
            "next_role": (self.last_role + 1) % self.num_roles,
            "roles": [self.roles.get(role) for role in range(self.num_roles)],
        }


__all__ = ["ResumableImageStream", "StreamPosition", "STREAM_STATE_KEY", "current_snapshot"]
