"""Local ``evaluate`` metric modules shipped with the package (loadable offline, by path)."""

from __future__ import annotations

import os


TOP_K_ACCURACY_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "top_k_accuracy")


def load_top_k_accuracy(config_name: str | None = None, **kwargs):
    """``evaluate.load`` of the bundled top-k accuracy metric (``config_name="ranked"`` for ranked class ids)."""
    import evaluate

    kwargs.setdefault("keep_in_memory", True)
    return evaluate.load(TOP_K_ACCURACY_PATH, config_name, **kwargs)


__all__ = ["TOP_K_ACCURACY_PATH", "load_top_k_accuracy"]
