"""The quality benchmark's pre-training loop gives CIM the same optimizer as `CIMTrainer` (the predictor at its own
learning-rate scale) and lets CIM have a batch and base lr of its own while MAE keeps the shared ones."""

from __future__ import annotations

import argparse
import os
import sys

import pytest
import torch
from conftest import make_tiny_vit_config
from torch import nn

from transformers_cim import CIMForPreTraining

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

from quality.common import CIM_KEYS, MAE_KEYS, set_group_lrs  # noqa: E402
from quality.report import cim_batch_note  # noqa: E402
from quality.run_quality import parse_args  # noqa: E402
from quality.stages import pretraining_optimizer  # noqa: E402


def group_of(optimizer: torch.optim.Optimizer, param: nn.Parameter) -> dict:
    return next(group for group in optimizer.param_groups if any(p is param for p in group["params"]))


@pytest.mark.parametrize("scale", [1.0, 2.0, 3.5])
def test_cim_predictor_gets_its_lr_scale_and_decay_over_scale(scale):
    model = CIMForPreTraining(make_tiny_vit_config(decoder_predictor_lr_scale=scale))
    optimizer = pretraining_optimizer(model, lr=1e-3)
    set_group_lrs(optimizer, 4e-4)  # what the loop does every step
    weight, bias = model.decoder.predictor.weight, model.decoder.predictor.bias
    query = next(p for n, p in model.named_parameters() if n.endswith("q_proj.weight") and "decoder" in n)
    assert group_of(optimizer, weight)["lr"] == pytest.approx(4e-4 * scale)
    assert group_of(optimizer, weight)["weight_decay"] == pytest.approx(0.05 / scale)
    assert group_of(optimizer, bias)["lr"] == pytest.approx(4e-4 * scale)
    assert group_of(optimizer, bias)["weight_decay"] == 0.0
    assert group_of(optimizer, query)["lr"] == pytest.approx(4e-4)
    assert group_of(optimizer, query)["weight_decay"] == pytest.approx(0.05)
    assert len(optimizer.param_groups) == (2 if scale == 1.0 else 4)
    trained = {id(p) for p in model.parameters() if p.requires_grad}
    assert sorted(id(p) for g in optimizer.param_groups for p in g["params"]) == sorted(trained)


def test_other_models_keep_two_groups():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    optimizer = pretraining_optimizer(model, lr=1e-3)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.05, 0.0]


def test_cim_batch_and_blr_default_to_the_shared_ones_and_only_key_cim():
    args = parse_args(["--cim_batch_size", "16", "--cim_blr", "8e-3"])
    assert (args.batch_size, args.cim_batch_size, args.cim_blr) == (64, 16, 8e-3)
    assert "cim_batch_size" in CIM_KEYS and "cim_blr" in CIM_KEYS
    assert "cim_batch_size" not in MAE_KEYS and "cim_blr" not in MAE_KEYS
    assert cim_batch_note(args) == ", its own batch 16 and peak lr 0.0005 (blr 0.008)"
    cpu = parse_args([])
    assert (cpu.batch_size, cpu.cim_batch_size, cpu.cim_blr) == (64, 16, 8e-3)
    assert cpu.cim_overrides == "decoder_prior_bias=true,target_encoder_mode=shared"
    assert parse_args(["--cim_overrides", ""]).cim_overrides == ""
    shared = parse_args(["--gpu", "--smoke"])
    assert shared.cim_batch_size is None and shared.cim_overrides == "" and cim_batch_note(shared) == ""
    assert cim_batch_note(argparse.Namespace(cim_batch_size=None, cim_blr=2e-3, batch_size=64, pretrain_blr=1e-3)) == (
        ", its own batch 64 and peak lr 0.0005 (blr 0.002)"
    )
