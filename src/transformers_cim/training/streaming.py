"""Streamed pre-training data that a checkpoint resumes exactly.

`ResumableImageStream` reads a `datasets.IterableDataset` whose images are still encoded and yields decoded,
augmented rows for :class:`~transformers_cim.training.data.SkippingCollator`. Every reader (one per DataLoader worker,
or one
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
without decoding them, to refill it (at most 4 x the buffer size: see `_Reader`).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import datasets
import torch
from datasets.distributed import split_dataset_by_node

from ..errors import UserValueError
from .data.collate import decoded_row, register_batch_annotator, without_image_decoding
from .seeding import numpy_rng

STREAM_STATE_KEY = "stream_state"
_ACTIVE_READER: _Reader | None = None  # the reader iterating in this process (one per worker process)


def current_snapshot() -> dict | None:
    """Snapshot of the reader iterating in this process (the one that produced the rows being collated), if any."""
    return None if _ACTIVE_READER is None else _ACTIVE_READER.snapshot()


def _stream_state_entry() -> dict:
    """What `SkippingCollator` adds to a batch: ``{STREAM_STATE_KEY: snapshot}`` while a reader runs here."""
    snapshot = current_snapshot()
    return {} if snapshot is None else {STREAM_STATE_KEY: snapshot}


register_batch_annotator(_stream_state_entry)


READ_BATCH = 32  # records fetched from datasets at a time (one at a time costs ~5x more per record)


@dataclass
class _Record:
    seq: int  # position of the record in this reader's unshuffled stream
    value: Any  # the encoded image
    source_state: dict  # datasets' state just before the read batch holding the record
    offset: int  # the record's index in that batch


class _Reader:
    """One reader's records, shuffle buffer, generators and position.

    The buffer is a reservoir: once full, each new record replaces a random one, which is yielded. A record older
    than `max_age` records is yielded in place of the random pick (it would otherwise stay for up to ~N ln N
    records, and a resumed reader re-reads everything from the oldest buffered record on): this bounds the re-read
    at resume to `max_age` records and changes the order of about e^-4 (1.8%) of the records.
    """

    MAX_AGE_BUFFERS = 4  # max_age in buffer sizes

    def __init__(
        self,
        source: datasets.IterableDataset,
        image_column: str,
        transform: Callable,
        min_size: int,
        buffer_size: int,
        role: int,
        num_roles: int,
        epoch: int,
        seed_key: list[int],
        world_size: int = 1,
        rank: int = 0,
    ):
        self.source, self.image_column = source, image_column
        self.transform, self.min_size, self.buffer_size = transform, min_size, buffer_size
        self.max_age = self.MAX_AGE_BUFFERS * buffer_size
        self.role, self.num_roles, self.epoch, self.world_size, self.rank = role, num_roles, epoch, world_size, rank
        self.shuffle_rng = numpy_rng(*seed_key, 0)
        self.augment_rng = numpy_rng(*seed_key, 1)
        self.buffer: list[_Record] = []
        self._slot_of: dict[int, int] = {}  # seq -> index in buffer (while filling and replacing)
        self._arrival: deque[int] = deque()  # seqs in arrival order; those already yielded are dropped lazily
        self.next_seq = 0
        self.draining = False  # the source is exhausted and the buffer is being emptied (from its end)

    def _records(self, skip: int = 0) -> Iterator[_Record]:
        """This reader's records from the source's current state on, the first `skip` of them left out."""
        batches = self.source.iter(batch_size=READ_BATCH)  # `iter` reads this reader's shards even in a worker
        while True:
            before = self.source.state_dict()
            try:
                batch = next(batches)
            except StopIteration:
                return
            for offset, value in enumerate(batch[self.image_column]):
                if skip:
                    skip -= 1
                    continue
                record = _Record(self.next_seq, value, before, offset)
                self.next_seq += 1
                yield record

    def _decode(self, record: _Record) -> dict:
        # a record without a file name is named by its place in this reader's stream (the same in every pass)
        where = f"stream record {record.seq} of reader {self.role}" + (
            f", process {self.rank}" if self.world_size > 1 else ""
        )
        return decoded_row(record.value, self.transform, self.min_size, self.augment_rng, where=where)

    def _oldest(self) -> _Record | None:
        if self.draining:
            return min(self.buffer, key=lambda r: r.seq) if self.buffer else None
        while self._arrival and self._arrival[0] not in self._slot_of:
            self._arrival.popleft()
        return self.buffer[self._slot_of[self._arrival[0]]] if self._arrival else None

    def _put(self, record: _Record, slot: int) -> None:
        if slot == len(self.buffer):
            self.buffer.append(record)
        else:
            del self._slot_of[self.buffer[slot].seq]
            self.buffer[slot] = record
        self._slot_of[record.seq] = slot
        self._arrival.append(record.seq)

    def _slot_to_yield(self, incoming: _Record) -> int:
        oldest = self._oldest()
        if oldest is not None and incoming.seq - oldest.seq >= self.max_age:
            return self._slot_of[oldest.seq]
        return int(self.shuffle_rng.integers(self.buffer_size))

    def rows(self, resume: dict | None) -> Iterator[dict]:
        if resume is not None:
            self.source.load_state_dict(resume["source_state"])
            records = self._records(skip=resume["source_offset"])
            self._restore(resume, records)
        else:
            records = self._records()
        if not self.draining:
            for record in records:
                if len(self.buffer) < self.buffer_size:
                    self._put(record, len(self.buffer))
                    continue
                slot = self._slot_to_yield(record)
                out = self.buffer[slot]
                self._put(record, slot)
                yield self._decode(out)
            order = self.shuffle_rng.permutation(len(self.buffer))
            self.buffer = [self.buffer[i] for i in order]
            self._slot_of, self._arrival = {}, deque()
            self.draining = True
        while self.buffer:
            yield self._decode(self.buffer.pop())

    def snapshot(self) -> dict:
        oldest = self._oldest()
        return {
            "role": self.role,
            "num_roles": self.num_roles,
            "world_size": self.world_size,
            "epoch": self.epoch,
            "source_state": oldest.source_state if oldest else self.source.state_dict(),
            "source_offset": oldest.offset if oldest else 0,
            "start_seq": oldest.seq if oldest else self.next_seq,
            "buffer_seqs": [r.seq for r in self.buffer],
            "next_seq": self.next_seq,
            "draining": self.draining,
            "shuffle_rng": self.shuffle_rng.bit_generator.state,
            "augment_rng": self.augment_rng.bit_generator.state,
        }

    def _restore(self, state: dict, records: Iterator[_Record]) -> None:
        """Re-reads (without decoding) the records from the oldest buffered one on, keeping the buffered ones."""
        self.next_seq = state["start_seq"]
        slots: dict[int, int] = {seq: i for i, seq in enumerate(state["buffer_seqs"])}
        buffer: list[_Record | None] = [None] * len(slots)
        for _ in range(state["next_seq"] - state["start_seq"]):
            record = next(records, None)
            if record is None:
                raise RuntimeError(
                    "The stream ended before the checkpoint's position: its files changed since the "
                    "checkpoint was saved. Resume with the same data, or start a new run."
                )
            if record.seq in slots:
                buffer[slots[record.seq]] = record
        if any(r is None for r in buffer):
            raise RuntimeError(
                "The checkpoint's shuffle buffer does not match the stream: its files changed since the "
                "checkpoint was saved. Resume with the same data, or start a new run."
            )
        self.buffer = buffer
        self.draining = bool(state["draining"])
        if not self.draining:
            self._slot_of = {r.seq: i for i, r in enumerate(self.buffer)}
            self._arrival = deque(sorted(self._slot_of))
        self.shuffle_rng.bit_generator.state = state["shuffle_rng"]
        self.augment_rng.bit_generator.state = state["augment_rng"]


class ResumableImageStream(torch.utils.data.IterableDataset):
    """Decoded, augmented rows from a streamed image dataset, resumable from a snapshot (see the module docstring).

    Args:
        source: the stream; its image column may still decode (it is read encoded).
        image_column: the column holding the images.
        transform: called as ``transform(pil_image, rng=numpy_generator)``; returns a (3, H, W) tensor and has a
            ``size`` attribute (e.g. :class:`~transformers_cim.training.data.RandomResizedCropFlip`).
        min_size: images with a shorter side are yielded with ``cim_valid=False`` (the collator drops them).
        buffer_size: the shuffle buffer of each reader (records are held encoded).
        seed: with the rank, worker and epoch, seeds each reader's shuffling and augmentation.
        rank, world_size: this process's part of the stream: whole shards when there are at least `world_size` of
            them, else every `world_size`-th record.
    """

    def __init__(
        self,
        source: datasets.IterableDataset,
        image_column: str,
        transform: Callable,
        *,
        min_size: int = 32,
        buffer_size: int = 1000,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        if buffer_size < 1:
            raise ValueError(f"buffer_size must be at least 1, got {buffer_size}.")
        self.source = without_image_decoding(source, image_column)
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
        saved_world = state.get("world_size", 1)
        if saved_world != self.world_size:
            raise UserValueError(
                f"The checkpoint's stream was read by {saved_world} process(es), this run has "
                f"{self.world_size}: resume with {saved_world} (each process's position is saved separately)."
            )
        self._resume, self._epoch_offset = state, None
        self.epoch = state["epoch"]

    def _resume_for(self, num_workers: int) -> dict | None:
        if self._resume is None or self._resume["epoch"] != self.epoch:
            return None
        if self._resume["num_roles"] != num_workers:
            raise UserValueError(
                f"The checkpoint's stream was read by {self._resume['num_roles']} dataloader worker(s) per process, "
                "this "
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
                raise UserValueError(
                    f"{num_workers} dataloader workers for {source.num_shards} shard(s) in this process: "
                    "each worker reads whole shards, so use at most as many workers as shards."
                )
            # an uneven split gives some workers one shard more; they simply run longer
            source = source.shard(num_shards=num_workers, index=role, contiguous=True)
        source.set_epoch(self.epoch)
        reader = _Reader(
            source,
            self.image_column,
            self.transform,
            self.min_size,
            self.buffer_size,
            role,
            num_workers,
            self.epoch,
            [self.seed, self.rank, role, self.epoch],
            self.world_size,
            rank=self.rank,
        )
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
        self.num_roles, self.world_size = 1, 1
        self.last_role: int | None = None
        self.roles: dict[int, dict] = {}

    def update(self, snapshot: dict) -> None:
        if snapshot["epoch"] != self.epoch:  # a new pass over the stream: the previous one's positions are done
            self.epoch, self.roles = snapshot["epoch"], {}
        self.num_roles, self.last_role = snapshot["num_roles"], snapshot["role"]
        self.world_size = snapshot["world_size"]
        self.roles[snapshot["role"]] = snapshot

    def state_dict(self) -> dict | None:
        if self.last_role is None:
            return None
        return {
            "epoch": self.epoch,
            "num_roles": self.num_roles,
            "world_size": self.world_size,
            "next_role": (self.last_role + 1) % self.num_roles,
            "roles": [self.roles.get(role) for role in range(self.num_roles)],
        }


__all__ = ["ResumableImageStream", "StreamPosition", "STREAM_STATE_KEY", "current_snapshot"]
