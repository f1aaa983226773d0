"""The quality benchmark's frozen-feature stage: CLS and mean-patch features of every encoder, a linear probe
(MAE's BatchNorm + Linear head) and weighted k-NN on each, scored with Wilson intervals."""

from __future__ import annotations

import argparse
import math
import os
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    ViTModel,
)

from transformers_cim.training.knn import extract_features, knn_predict
from transformers_cim.training.linear_probe import LinearProbeHead

from .common import (
    FROZEN_KEYS,
    accuracy_record,
    autocast,
    log,
    method_dir,
    reusable,
    set_group_lrs,
    subset_settings,
    warmup_cosine,
    write_json,
)
from .models import eval_dataset
from .report import pct


@torch.no_grad()
def cls_and_mean_tokens(encoder: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """[CLS token, mean of the patch tokens], both after the encoder's final LayerNorm: (N, 2D)."""
    hidden = encoder(pixel_values=pixel_values).last_hidden_state
    return torch.cat([hidden[:, 0], hidden[:, 1:].mean(1)], dim=-1)


def split_features(args: argparse.Namespace, encoder: ViTModel, ds: Any) -> dict[str, torch.Tensor]:
    device = torch.device(args.device)
    with autocast(args):
        feats, labels = extract_features(
            encoder,
            ds,
            batch_size=256,
            device=device,
            normalize=False,
            num_workers=args.num_workers,
            feature_fn=cls_and_mean_tokens,
        )
    width = feats.shape[1] // 2
    return {"cls": feats[:, :width].float().cpu(), "mean": feats[:, width:].float().cpu(), "labels": labels.cpu()}


def linear_probe(
    args: argparse.Namespace,
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    val_x: torch.Tensor,
    val_y: torch.Tensor,
    num_classes: int,
) -> dict:
    """MAE's probe head (BatchNorm1d without affine + Linear) on cached features: AdamW, cosine, batch 256."""
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    x, y = train_x.to(device), train_y.to(device)
    head = LinearProbeHead(x.shape[1], num_classes).to(device)
    optimizer = torch.optim.AdamW(head.parameters(), lr=args.probe_lr, weight_decay=0.0)
    batch, total = 256, max(1, args.probe_epochs * math.ceil(len(x) / 256))
    head.train()
    step = 0
    for _ in range(args.probe_epochs):
        for idx in torch.randperm(len(x), generator=gen).split(batch):
            if len(idx) < 2:
                continue
            set_group_lrs(optimizer, args.probe_lr * warmup_cosine(step / total, 0.0))
            loss = F.cross_entropy(head(x[idx.to(device)]), y[idx.to(device)])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
    head.eval()
    with torch.no_grad():
        predictions = head(val_x.to(device)).argmax(1)
    return accuracy_record(predictions, val_y)


def knn(
    args: argparse.Namespace,
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    val_x: torch.Tensor,
    val_y: torch.Tensor,
    num_classes: int,
) -> dict:
    """Weighted k-NN (cosine similarity, weights exp(sim / T)), `transformers_cim.training.knn.knn_predict`."""
    device = torch.device(args.device)
    scores = knn_predict(
        train_x.to(device),
        train_y.to(device),
        val_x.to(device),
        k=args.knn_k,
        temperature=args.knn_temperature,
        num_classes=num_classes,
    )
    return accuracy_record(scores.argmax(1), val_y)


def frozen_stage(args: argparse.Namespace, method: str, pretrain: dict) -> dict:
    """Features of the train / validation splits, then probe + k-NN for CLS and mean features (or reuse)."""
    path = os.path.join(method_dir(args, method), "frozen.json")
    settings = {**subset_settings(args, FROZEN_KEYS), "encoder_id": pretrain["finished_at"]}
    if (done := reusable(path, settings)) is not None:
        log(f"{method}: frozen-feature evaluation reused")
        return done
    start = time.perf_counter()
    encoder = ViTModel.from_pretrained(os.path.join(method_dir(args, method), "encoder"), add_pooling_layer=False)
    encoder.to(torch.device(args.device)).eval()
    train_ds, num_classes = eval_dataset(args, "train", args.max_train_images)
    val_ds, _ = eval_dataset(args, "validation", args.max_eval_images)
    train, val = split_features(args, encoder, train_ds), split_features(args, encoder, val_ds)
    feature_s = time.perf_counter() - start
    record: dict[str, Any] = {
        "settings": settings,
        "n_train": len(train["labels"]),
        "n_val": len(val["labels"]),
        "feature_s": feature_s,
    }
    for kind in ("cls", "mean"):
        args_xy = (train[kind], train["labels"], val[kind], val["labels"], num_classes)
        record[f"probe_{kind}"] = linear_probe(args, *args_xy)
        record[f"knn_{kind}"] = knn(args, *args_xy)
    record["wall_s"] = time.perf_counter() - start
    write_json(path, record)
    log(
        f"{method}: probe CLS {pct(record['probe_cls'])} / mean {pct(record['probe_mean'])}, "
        f"k-NN CLS {pct(record['knn_cls'])} / mean {pct(record['knn_mean'])} ({record['wall_s']:.0f} s)"
    )
    return record
