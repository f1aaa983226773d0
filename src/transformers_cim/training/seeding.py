"""The one seeding idiom of the package: a random generator is a pure function of a key of integers (seed, epoch,
row, step, process, ...), through numpy's `SeedSequence`, so that a resumed run draws what the uninterrupted run drew
whatever else used the global random state. Draws that must follow a torch generator (or torch's global state, seeded
by the Trainer and per data-loader worker) take one integer from it as their key."""

from __future__ import annotations

import numpy as np
import torch


def numpy_rng(*key: int) -> np.random.Generator:
    """A numpy generator determined by `key` alone."""
    return np.random.default_rng([int(k) % 2**64 for k in key])


def seed_from_key(*key: int) -> int:
    """A 63-bit seed determined by `key` alone."""
    return int(np.random.SeedSequence([int(k) % 2**64 for k in key]).generate_state(1, np.uint64)[0]) % 2**63


def torch_generator(*key: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A torch generator determined by `key` alone."""
    return torch.Generator(device=device).manual_seed(seed_from_key(*key))


def numpy_rng_from_torch(generator: torch.Generator | None = None) -> np.random.Generator:
    """A numpy generator keyed by one draw of `generator` (torch's global generator when None)."""
    return numpy_rng(int(torch.randint(0, 2**62, (1,), generator=generator).item()))


__all__ = ["numpy_rng", "numpy_rng_from_torch", "seed_from_key", "torch_generator"]
