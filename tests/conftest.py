"""Shared pytest fixtures: tiny CIM configurations that build and run in milliseconds on a CPU."""

from __future__ import annotations

import shutil

import pytest
import torch
from transformers import ResNetConfig, TrainerCallback

from transformers_cim import CIMConfig, preset_encoder_config


def make_tiny_vit_config(**overrides) -> CIMConfig:
    """ViT-T/16 narrowed to 2 layers; 64 px views, 48 px context (3x3 patches), 3 exemplars of 16 px."""
    encoder = preset_encoder_config("vit-tiny-patch16")
    encoder.num_hidden_layers = 2
    kwargs = dict(
        image_size=64,
        context_size=48,
        exemplar_size=16,
        num_exemplars=3,
        decoder_hidden_size=64,
        decoder_num_attention_heads=4,
    )
    kwargs.update(overrides)
    return CIMConfig(encoder_config=encoder, **kwargs)


def make_tiny_resnet_config(**overrides) -> CIMConfig:
    """A 4-stage basic-block ResNet with tiny widths; 64 px views and context (2x2 tokens), 2 exemplars of 32 px."""
    encoder = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 16, 32], depths=[1, 1, 1, 1], layer_type="basic")
    kwargs = dict(
        image_size=64,
        context_size=64,
        exemplar_size=32,
        num_exemplars=2,
        decoder_hidden_size=32,
        decoder_num_attention_heads=4,
    )
    kwargs.update(overrides)
    return CIMConfig(encoder_config=encoder, **kwargs)


@pytest.fixture
def tiny_vit_config():
    """Factory: `tiny_vit_config(**cim_overrides)` -> a tiny ViT `CIMConfig`."""
    return make_tiny_vit_config


@pytest.fixture
def tiny_resnet_config():
    """Factory: `tiny_resnet_config(**cim_overrides)` -> a tiny ResNet `CIMConfig`."""
    return make_tiny_resnet_config


@pytest.fixture
def search_views():
    """Factory: `search_views(batch, size, seed)` -> normalised-looking (B, 3, size, size) views, seeded."""

    def make(batch: int = 2, size: int = 64, seed: int = 0) -> torch.Tensor:
        return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))

    return make


@pytest.fixture
def single_thread():
    """Runs a test with one intra-op thread: tiny models are fastest so, and a shared 2-core machine under load
    makes multi-threaded kernels on tiny tensors 10-50x slower (OpenMP threads spinning against each other)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


class _StopAtStep(TrainerCallback):
    """Ends training after optimizer step `step`, as an interruption would (the schedule still says max_steps)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True
        return control


@pytest.fixture
def offline_hub_cache(tmp_path, monkeypatch):
    """Factory: `offline_hub_cache(folder, "org/name")` puts a copy of a checkpoint folder in a temporary Hub cache
    (the `HF_HUB_CACHE` layout: models--org--name/snapshots/<commit>/..., refs/main), with the Hub offline."""
    from huggingface_hub import constants

    cache = tmp_path / "hub-cache"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # read at import time by huggingface_hub
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))

    def publish(folder, repo_id: str) -> str:
        commit = "0123456789abcdef0123456789abcdef01234567"
        repo = cache / f"models--{repo_id.replace('/', '--')}"
        shutil.copytree(folder, repo / "snapshots" / commit)
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(commit)
        return str(repo / "snapshots" / commit)

    return publish


@pytest.fixture
def stop_at_step():
    """Factory: `stop_at_step(n)` -> a TrainerCallback that stops training after optimizer step n."""
    return _StopAtStep
