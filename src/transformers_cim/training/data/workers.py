"""Data-loader workers for streamed data: :func:`count_shards` and :func:`check_num_workers` keep every worker busy."""

from __future__ import annotations

import logging
from typing import Any

import datasets

logger = logging.getLogger(__name__)


def count_shards(ds: Any) -> int:
    """Number of shards of a streaming dataset (``IterableDataset.num_shards``), 1 for anything else."""
    if isinstance(ds, datasets.IterableDataset):
        return max(1, int(getattr(ds, "num_shards", None) or getattr(ds, "n_shards", 1)))
    return 1


def check_num_workers(num_workers: int, num_shards: int) -> int:
    """Largest worker count <= ``num_workers`` that divides ``num_shards`` (warns when lowering).

    A streaming worker without a shard idles and uneven shard counts leave workers idle at the end. Under
    distributed training pass the shards of one rank (``num_shards // world_size``).
    """
    num_shards = max(1, int(num_shards))
    if num_workers <= 0:
        return 0
    workers = next(w for w in range(min(num_workers, num_shards), 0, -1) if num_shards % w == 0)
    if workers != num_workers:
        logger.warning(
            "Lowering dataloader workers from %d to %d: the streamed dataset has %d shard(s) and each worker needs an "
            "equal share (re-shard the data into more files to use more workers).",
            num_workers,
            workers,
            num_shards,
        )
    return workers
