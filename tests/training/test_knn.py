"""Tests for transformers_cim.training.knn: weighted k-NN on frozen features."""

from __future__ import annotations

import math

import datasets
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset
from transformers import (
    ResNetConfig,
    ResNetModel,
    TrainerControl,
    TrainerState,
    TrainingArguments,
    ViTConfig,
    ViTModel,
)

from transformers_cim.training.data import ResizeCenterCrop, build_classification_transform, prepare_dataset
from transformers_cim.training.knn import KNNCallback, extract_features, knn_accuracy, knn_evaluate, knn_predict


def tiny_vit() -> ViTModel:
    torch.manual_seed(0)
    config = ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, patch_size=8, image_size=32
    )
    return ViTModel(config, add_pooling_layer=False).eval()


# hand-built 2-D case: unit vectors; class 0 at (1, 0), class 1 at (0.8, 0.6) and (0.6, 0.8), class 2 at (0, 1)
TRAIN = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.6, 0.8], [0.0, 1.0]])
TRAIN_LABELS = torch.tensor([0, 1, 1, 2])
TEST = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
TEST_LABELS = torch.tensor([0, 1])


def test_knn_hand_computed_scores():
    # test 0: neighbours (k=3) at similarity 1 (class 0), 0.8 and 0.6 (class 1); weights exp(sim / T)
    scores = knn_predict(TRAIN, TRAIN_LABELS, TEST, k=3, temperature=1.0, num_classes=3)
    expected0 = [math.exp(1.0), math.exp(0.8) + math.exp(0.6), 0.0]
    # test 1: neighbours at 1.0 and 0.96 (class 1) and 0.8 (class 2)
    expected1 = [0.0, math.exp(1.0) + math.exp(0.96), math.exp(0.8)]
    torch.testing.assert_close(scores, torch.tensor([expected0, expected1]), rtol=1e-5, atol=1e-5)


def test_knn_hand_computed_accuracy_depends_on_temperature():
    # T = 0.1: e^10 = 22026 beats e^8 + e^6 = 3384, so test 0 is class 0 -> both right
    assert knn_accuracy(TRAIN, TRAIN_LABELS, TEST, TEST_LABELS, k=3, temperature=0.1) == 1.0
    # T = 1: e^1 = 2.72 loses to e^0.8 + e^0.6 = 4.05 (the two class-1 votes win) -> test 0 wrong
    assert knn_accuracy(TRAIN, TRAIN_LABELS, TEST, TEST_LABELS, k=3, temperature=1.0) == 0.5
    # k = 1 is plain nearest neighbour; feature scale does not matter (cosine similarity)
    assert knn_accuracy(5 * TRAIN, TRAIN_LABELS, 0.1 * TEST, TEST_LABELS, k=1, temperature=1.0) == 1.0
    # k larger than the training set is capped: all four vote
    scores = knn_predict(TRAIN, TRAIN_LABELS, TEST[:1], k=50, temperature=1.0)
    torch.testing.assert_close(scores[0, 2], torch.tensor(math.exp(0.0)))


def test_knn_perfectly_separable_features_and_batching():
    generator = torch.Generator().manual_seed(0)
    centers = F.normalize(torch.randn(10, 64, generator=generator), dim=-1)
    train_labels = torch.arange(10).repeat_interleave(20)
    test_labels = torch.arange(10).repeat(7)
    train = centers[train_labels] + 0.01 * torch.randn(200, 64, generator=generator)
    test = centers[test_labels] + 0.01 * torch.randn(70, 64, generator=generator)
    assert knn_accuracy(train, train_labels, test, test_labels, k=20, temperature=0.07) == 1.0
    full = knn_predict(train, train_labels, test, k=20, temperature=0.07, batch_size=1024)
    chunked = knn_predict(train, train_labels, test, k=20, temperature=0.07, batch_size=3)
    torch.testing.assert_close(full, chunked, rtol=1e-5, atol=0)
    # shuffled labels: about chance
    shuffled = test_labels[torch.randperm(70, generator=generator)]
    assert knn_accuracy(train, train_labels, test, shuffled) < 0.5


def test_knn_input_checks():
    with pytest.raises(ValueError, match="shapes"):
        knn_accuracy(TRAIN, TRAIN_LABELS, torch.zeros(2, 3), TEST_LABELS)
    with pytest.raises(ValueError, match="temperature"):
        knn_accuracy(TRAIN, TRAIN_LABELS, TEST, TEST_LABELS, temperature=0)


def test_extract_features_vit_and_resnet():
    model = tiny_vit()
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    rows = [{"pixel_values": x[i], "labels": i % 2, "cim_valid": i != 3} for i in range(5)]
    feats, labels = extract_features(model, rows, batch_size=2)
    keep = torch.tensor([0, 1, 2, 4])
    with torch.no_grad():
        expected = F.normalize(model(x[keep]).last_hidden_state[:, 0], dim=-1)
    torch.testing.assert_close(feats, expected, rtol=1e-5, atol=1e-5)
    assert labels.tolist() == [0, 1, 0, 0]
    # a DataLoader of (x, y) tuples; 48 px input interpolates the position embeddings
    loader = DataLoader(TensorDataset(torch.randn(4, 3, 48, 48), torch.tensor([0, 1, 2, 3])), batch_size=3)
    feats, labels = extract_features(model, loader, normalize=False)
    assert feats.shape == (4, 32) and labels.tolist() == [0, 1, 2, 3]
    assert not model.training

    resnet = ResNetModel(
        ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic")
    ).eval()
    feats, _ = extract_features(resnet, rows[:2], max_samples=1)
    with torch.no_grad():
        expected = F.normalize(resnet(x[:1]).pooler_output.flatten(1), dim=-1)
    torch.testing.assert_close(feats, expected, rtol=1e-5, atol=1e-5)


def _color_dataset(per_class: int, seed: int) -> datasets.Dataset:
    colors = [(220, 30, 30), (30, 200, 40), (30, 40, 220), (230, 220, 30)]
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for label, color in enumerate(colors):
        for _ in range(per_class):
            pixels = np.clip(np.array(color)[None, None] + rng.normal(0, 10, (36, 36, 3)), 0, 255)
            images.append(Image.fromarray(pixels.astype(np.uint8)))
            labels.append(label)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=4)})
    ds = datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)
    fn = build_classification_transform("image", "label", ResizeCenterCrop(32), min_size=8)
    return prepare_dataset(ds, "image", fn)


def test_knn_evaluate_and_callback_on_image_datasets(tmp_path):
    model = tiny_vit()
    train_ds, eval_ds = _color_dataset(8, seed=0), _color_dataset(3, seed=1)
    result = knn_evaluate(model, train_ds, eval_ds, k=5, batch_size=8)
    assert set(result) == {"knn_top1"}
    assert result["knn_top1"] == 1.0  # noisy solid colours: separable even with random features

    callback = KNNCallback(train_ds, eval_ds, k=5, batch_size=8)
    state = TrainerState()
    state.global_step, state.epoch = 10, 1.0
    metrics = {"eval_loss": 1.0}
    callback.on_evaluate(
        TrainingArguments(output_dir=str(tmp_path), report_to="none"),
        state,
        TrainerControl(),
        metrics=metrics,
        model=model,
    )
    assert metrics["eval_knn_top1"] == 1.0
    assert state.log_history[-1]["eval_knn_top1"] == 1.0 and state.log_history[-1]["step"] == 10
