"""Tests for transformers_cim.training.classification_trainer and run_image_classification.py (tiny models,
self-made data)."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image
from safetensors.torch import load_file
from transformers import (
    ResNetConfig,
    ResNetForImageClassification,
    TrainingArguments,
    ViTConfig,
    ViTForImageClassification,
    ViTModel,
    pipeline,
)

from transformers_cim import CIMConfig, CIMForPreTraining
from transformers_cim.encoder_loading import load_encoder_for_classification
from transformers_cim.errors import UserValueError
from transformers_cim.training.classification_trainer import ClassificationTrainer
from transformers_cim.training.layer_decay import param_groups_layer_decay
from transformers_cim.training.linear_probe import LinearProbeForImageClassification
from transformers_cim.training.mixup import mixup_cutmix, smooth_one_hot, soft_target_cross_entropy

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
import run_image_classification  # noqa: E402

COLORS = {
    "red": (220, 30, 30),
    "green": (30, 200, 40),
    "blue": (30, 40, 220),
    "yellow": (230, 220, 30),
    "magenta": (200, 30, 200),
}


def tiny_vit_config(**kwargs) -> ViTConfig:
    values = dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, patch_size=8, image_size=32
    )
    values.update(kwargs)
    return ViTConfig(**values)


def tiny_resnet_config(**kwargs) -> ResNetConfig:
    values = dict(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic")
    values.update(kwargs)
    return ResNetConfig(**values)


def save_tiny_cim(path: str, seed: int = 0) -> CIMForPreTraining:
    torch.manual_seed(seed)
    config = CIMConfig(
        encoder_config=tiny_vit_config(),
        image_size=32,
        context_size=32,
        exemplar_size=16,
        num_exemplars=2,
        decoder_hidden_size=32,
        decoder_num_attention_heads=2,
    )
    model = CIMForPreTraining(config).eval()
    model.save_pretrained(path)
    return model


def make_color_folder(root: str, per_class: int, size: int = 40, seed: int = 0, classes=None) -> str:
    """One sub-folder per class of noisy solid-colour PNGs: trivially separable by colour."""
    rng = np.random.default_rng(seed)
    for name in classes or COLORS:
        os.makedirs(os.path.join(root, name), exist_ok=True)
        for i in range(per_class):
            pixels = np.array(COLORS[name])[None, None, :] + rng.normal(0, 20, (size, size, 3))
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(os.path.join(root, name, f"{i}.png"))
    return root


# ------------------------------------------------------------------------------------------------------------
# Layer-wise lr decay
# ------------------------------------------------------------------------------------------------------------
def _lr_and_wd_by_name(model, groups):
    by_id = {}
    for group in groups:
        for p in group["params"]:
            assert id(p) not in by_id, "a parameter is in two groups"
            by_id[id(p)] = (group["lr"], group["weight_decay"])
    return {name: by_id[id(p)] for name, p in model.named_parameters() if id(p) in by_id}


def test_layer_decay_groups_vit_have_exact_lrs():
    model = ViTForImageClassification(tiny_vit_config(num_labels=3))
    groups = param_groups_layer_decay(model, weight_decay=0.05, layer_decay=0.5, base_lr=1.0)
    table = _lr_and_wd_by_name(model, groups)
    assert set(table) == {n for n, _ in model.named_parameters()}
    # L = 2 blocks: embeddings 0.5**3, block 0 0.5**2, block 1 0.5, final norm + head 1.0
    expected_lr = {
        "vit.embeddings.cls_token": 0.125,
        "vit.embeddings.position_embeddings": 0.125,
        "vit.embeddings.patch_embeddings.projection.weight": 0.125,
        "vit.layers.0.attention.q_proj.weight": 0.25,
        "vit.layers.0.mlp.fc2.bias": 0.25,
        "vit.layers.1.layernorm_before.weight": 0.5,
        "vit.layers.1.mlp.fc1.weight": 0.5,
        "vit.layernorm.weight": 1.0,
        "classifier.weight": 1.0,
        "classifier.bias": 1.0,
    }
    for name, lr in expected_lr.items():
        assert table[name][0] == pytest.approx(lr, rel=0, abs=1e-12), name
    no_decay = {n for n, (_, wd) in table.items() if wd == 0.0}
    decay = {n for n, (_, wd) in table.items() if wd == 0.05}
    assert no_decay | decay == set(table)
    assert {
        "vit.embeddings.cls_token",
        "vit.embeddings.position_embeddings",
        "vit.layernorm.weight",
        "vit.layernorm.bias",
        "classifier.bias",
        "vit.layers.0.attention.q_proj.bias",
    } <= no_decay
    assert decay == {
        n
        for n, p in model.named_parameters()
        if p.ndim > 1 and "cls_token" not in n and "position_embeddings" not in n
    }
    # every group's lr is base_lr * its lr_scale
    assert all(g["lr"] == pytest.approx(g["lr_scale"]) for g in groups)


def test_layer_decay_off_and_frozen_parameters_left_out():
    model = ViTForImageClassification(tiny_vit_config(num_labels=3))
    model.vit.embeddings.patch_embeddings.requires_grad_(False)
    groups = param_groups_layer_decay(model, weight_decay=0.1, layer_decay=1.0, base_lr=3e-4)
    assert {g["lr"] for g in groups} == {3e-4}
    in_groups = {id(p) for g in groups for p in g["params"]}
    assert id(model.vit.embeddings.patch_embeddings.projection.weight) not in in_groups
    assert len(in_groups) == sum(1 for p in model.parameters() if p.requires_grad)


def test_layer_decay_groups_resnet_per_stage():
    model = ResNetForImageClassification(tiny_resnet_config(num_labels=4))
    table = _lr_and_wd_by_name(model, param_groups_layer_decay(model, 0.05, 0.5, 2.0))
    for name, (lr, _) in table.items():
        if name.startswith("resnet.embedder."):
            assert lr == pytest.approx(2.0 * 0.5**3), name
        elif name.startswith("resnet.encoder.stages.0."):
            assert lr == pytest.approx(2.0 * 0.5**2), name
        elif name.startswith("resnet.encoder.stages.1."):
            assert lr == pytest.approx(2.0 * 0.5), name
        else:
            assert name.startswith("classifier."), name
            assert lr == pytest.approx(2.0), name


def test_trainer_optimizer_uses_layer_decay_groups(tmp_path):
    model = ViTForImageClassification(tiny_vit_config(num_labels=3))
    args = TrainingArguments(
        output_dir=str(tmp_path), learning_rate=1e-3, weight_decay=0.05, report_to="none", use_cpu=True
    )
    trainer = ClassificationTrainer(model=model, args=args, layer_decay=0.5)
    optimizer = trainer.create_optimizer()
    assert isinstance(optimizer, torch.optim.AdamW)
    lrs = sorted({round(g["lr"], 12) for g in optimizer.param_groups})
    assert lrs == [1.25e-4, 2.5e-4, 5e-4, 1e-3]
    expected = {
        id(p): lr for g in param_groups_layer_decay(model, 0.05, 0.5, 1e-3) for p in g["params"] for lr in [g["lr"]]
    }
    for group in optimizer.param_groups:
        assert all(expected[id(p)] == group["lr"] for p in group["params"])


# ------------------------------------------------------------------------------------------------------------
# Mixup / CutMix / soft targets
# ------------------------------------------------------------------------------------------------------------
def test_mixup_is_the_expected_convex_combination():
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 1, 2, 1])
    mixed, targets = mixup_cutmix(
        x, labels, 3, mixup_alpha=0.8, label_smoothing=0.1, generator=torch.Generator().manual_seed(0)
    )
    # lam is drawn from Beta(0.8, 0.8) through a numpy Generator seeded by the torch generator's first draw
    seed = int(torch.randint(0, 2**62, (1,), generator=torch.Generator().manual_seed(0)).item())
    lam = float(np.random.default_rng(seed).beta(0.8, 0.8))
    assert 0.0 < lam < 1.0
    torch.testing.assert_close(mixed, lam * x + (1 - lam) * x.flip(0))
    smooth = torch.full((4, 3), 0.1 / 3)
    smooth[torch.arange(4), labels] = 0.9 + 0.1 / 3
    torch.testing.assert_close(targets, lam * smooth + (1 - lam) * smooth.flip(0))
    torch.testing.assert_close(targets.sum(1), torch.ones(4))
    # same seed, same batch; another seed, another lam
    again = mixup_cutmix(x, labels, 3, 0.8, 0.0, 0.1, torch.Generator().manual_seed(0))
    other = mixup_cutmix(x, labels, 3, 0.8, 0.0, 0.1, torch.Generator().manual_seed(7))
    torch.testing.assert_close(again[0], mixed)
    assert not torch.allclose(other[0], mixed)


def test_cutmix_pastes_a_box_and_weights_targets_by_area():
    x = torch.arange(2 * 1 * 16 * 16, dtype=torch.float32).view(2, 1, 16, 16)
    labels = torch.tensor([0, 1])
    for seed in range(5):
        mixed, targets = mixup_cutmix(x, labels, 2, cutmix_alpha=1.0, generator=torch.Generator().manual_seed(seed))
        from_partner = mixed[0] == x[1]
        kept = (mixed[0] == x[0]).float().mean().item()
        assert torch.all(from_partner | (mixed[0] == x[0]))
        ys, xs = torch.nonzero(from_partner[0], as_tuple=True)
        if len(ys):  # the pasted region is one rectangle
            assert from_partner[0, ys.min() : ys.max() + 1, xs.min() : xs.max() + 1].all()
        torch.testing.assert_close(targets[0], torch.tensor([kept, 1 - kept]))
        torch.testing.assert_close(targets[1], torch.tensor([1 - kept, kept]))


def test_no_mixing_gives_label_smoothed_one_hots_and_matching_loss():
    x = torch.randn(3, 3, 8, 8)
    labels = torch.tensor([2, 0, 1])
    mixed, targets = mixup_cutmix(x, labels, 3, label_smoothing=0.2)
    assert mixed is x
    torch.testing.assert_close(targets, smooth_one_hot(labels, 3, 0.2))
    logits = torch.randn(3, 3)
    torch.testing.assert_close(
        soft_target_cross_entropy(logits, targets), F.cross_entropy(logits, labels, label_smoothing=0.2)
    )


def test_trainer_mixes_only_in_training(tmp_path):
    torch.manual_seed(0)
    model = ViTForImageClassification(tiny_vit_config(num_labels=3))
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    trainer = ClassificationTrainer(
        model=model, args=args, mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, mix_seed=0
    )
    inputs = {
        "pixel_values": torch.randn(4, 3, 32, 32),
        "labels": torch.tensor([0, 1, 2, 0]),
        "num_skipped": torch.tensor(2),
        "skipped_images": [("a.png", "undecodable"), ("row 7", "too small")],
    }
    model.eval()
    with torch.no_grad():
        eval_loss = trainer.compute_loss(model, dict(inputs))
        plain = F.cross_entropy(model(pixel_values=inputs["pixel_values"]).logits, inputs["labels"])
    torch.testing.assert_close(eval_loss, plain)
    model.train()
    train_loss = trainer.compute_loss(model, dict(inputs))
    assert torch.isfinite(train_loss) and train_loss.requires_grad
    assert not torch.allclose(train_loss.detach(), plain)
    # training images only (not the evaluation's), each counted once however often met
    assert trainer.num_skipped_images == 2
    trainer.compute_loss(model, {**inputs, "skipped_images": [("a.png", "undecodable"), (None, "no image data")]})
    assert trainer.num_skipped_images == 3 == trainer.total_skipped_images()


# ------------------------------------------------------------------------------------------------------------
# Linear probe
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["vit", "resnet"])
def test_linear_probe_freezes_encoder_and_folds_into_stock_model(family):
    torch.manual_seed(0)
    if family == "vit":
        base = ViTForImageClassification(tiny_vit_config(num_labels=4))
    else:
        base = ResNetForImageClassification(tiny_resnet_config(num_labels=4))
    probe = LinearProbeForImageClassification(base)
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    assert {n for n, p in probe.named_parameters() if p.requires_grad} == {"head.linear.weight", "head.linear.bias"}
    groups = param_groups_layer_decay(probe, 0.0, 0.75, 1e-3)
    assert sum(len(g["params"]) for g in groups) == 2

    optimizer = torch.optim.AdamW(groups)
    probe.train()
    assert not probe.model.training and probe.head.training
    x, y = torch.randn(8, 3, 32, 32), torch.tensor([0, 1, 2, 3] * 2)
    for _ in range(3):
        out = probe(pixel_values=x, labels=y)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    for n, p in base.named_parameters():
        torch.testing.assert_close(p, before[n]), n  # encoder untouched (BatchNorm stats too, for ResNet)
    assert probe.head.norm.num_batches_tracked.item() == 3

    probe.eval()
    with torch.no_grad():
        probe_logits = probe(pixel_values=x).logits
        stock = probe.to_classification_model().eval()
        assert type(stock) is type(base)
        torch.testing.assert_close(stock(pixel_values=x).logits, probe_logits, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------------------------
# Loading checkpoints
# ------------------------------------------------------------------------------------------------------------
def test_load_cim_checkpoint_as_classifier(tmp_path):
    cim = save_tiny_cim(str(tmp_path / "cim"))
    id2label = {0: "a", 1: "b", 2: "c"}
    model = load_encoder_for_classification(str(tmp_path / "cim"), 3, id2label=id2label)
    assert isinstance(model, ViTForImageClassification)
    assert model.config.id2label == id2label and model.config.label2id == {"a": 0, "b": 1, "c": 2}
    source = cim.vit.state_dict()
    for name, value in model.vit.state_dict().items():
        torch.testing.assert_close(value, source[name]), name
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.eval().vit(x).last_hidden_state, cim.vit(x).last_hidden_state)


def test_load_stock_checkpoints_and_resize(tmp_path):
    torch.manual_seed(0)
    encoder = ViTModel(tiny_vit_config(), add_pooling_layer=False).eval()
    encoder.save_pretrained(tmp_path / "encoder")
    model = load_encoder_for_classification(tmp_path / "encoder", 2, image_size=48).eval()
    assert model.config.image_size == 48
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():  # identical to interpolating the position embeddings on the fly
        expected = encoder(x, interpolate_pos_encoding=True).last_hidden_state
        torch.testing.assert_close(model.vit(x).last_hidden_state, expected)
    # a stock classifier with another label count gets a new head
    model.save_pretrained(tmp_path / "clf")
    again = load_encoder_for_classification(tmp_path / "clf", 5)
    assert again.classifier.out_features == 5 and again.config.image_size == 48
    # ResNet
    ResNetForImageClassification(tiny_resnet_config(num_labels=3)).save_pretrained(tmp_path / "resnet")
    assert isinstance(load_encoder_for_classification(tmp_path / "resnet", 7), ResNetForImageClassification)


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_encoder_for_classification(tmp_path / "missing", 3)
    with pytest.raises(ValueError, match="model_name_or_path"):
        load_encoder_for_classification(None, 3)
    ViTModel(tiny_vit_config()).save_pretrained(tmp_path / "enc")
    with pytest.raises(ValueError, match="at least 2 classes"):
        load_encoder_for_classification(tmp_path / "enc", 1)
    os.makedirs(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_encoder_for_classification(tmp_path / "empty", 3)


# ------------------------------------------------------------------------------------------------------------
# The script
# ------------------------------------------------------------------------------------------------------------
def _script_args(tmp_path, model_dir, **overrides):
    args = {
        "model_name_or_path": str(model_dir),
        "train_dir": str(tmp_path / "data" / "train"),
        "validation_dir": str(tmp_path / "data" / "validation"),
        "image_size": 32,
        "output_dir": str(tmp_path / "out"),
        "num_train_epochs": 3,
        "per_device_train_batch_size": 10,
        "per_device_eval_batch_size": 16,
        "learning_rate": 3e-3,
        "mixup": 0.0,
        "cutmix": 0.0,
        "layer_decay": 0.9,
        "save_strategy": "no",
        "logging_steps": 5,
        "seed": 0,
        "use_cpu": True,
        "dataloader_num_workers": 0,
        "report_to": "none",
    }
    args.update(overrides)
    return args


@pytest.fixture
def color_data(tmp_path):
    make_color_folder(str(tmp_path / "data" / "train"), per_class=10, seed=0)
    make_color_folder(str(tmp_path / "data" / "validation"), per_class=4, seed=1)
    return tmp_path / "data"


@pytest.mark.parametrize(
    "pooling, model_type, architecture",
    [
        (None, "beit", "BeitForImageClassification"),  # the default: the authors' mean-pool head
        ("cls", "vit", "ViTForImageClassification"),
    ],
)
def test_script_fine_tunes_cim_checkpoint_end_to_end(tmp_path, color_data, pooling, model_type, architecture):
    save_tiny_cim(str(tmp_path / "cim"))
    args_file = tmp_path / "args.json"
    args = _script_args(tmp_path, tmp_path / "cim")
    if pooling is not None:
        args["pooling"] = pooling
    args_file.write_text(json.dumps(args))
    results = run_image_classification.main([str(args_file)])

    out = tmp_path / "out"
    with open(out / "all_results.json") as f:
        all_results = json.load(f)
    assert all_results["eval_accuracy"] == pytest.approx(results["eval_accuracy"])
    assert all_results["eval_accuracy"] > 0.5  # 5 classes: chance is 0.2
    assert "eval_top5_accuracy" in all_results and all_results["eval_top5_accuracy"] == 1.0
    # evaluated after every epoch
    with open(out / "trainer_state.json") as f:
        history = json.load(f)["log_history"]
    assert sorted(e["epoch"] for e in history if "eval_accuracy" in e) == [1.0, 2.0, 3.0]

    with open(out / "config.json") as f:
        config = json.load(f)
    assert config["model_type"] == model_type and config["architectures"] == [architecture]
    assert "auto_map" not in config
    assert sorted(config["id2label"].values()) == sorted(COLORS)
    if pooling is None:
        assert config["use_mean_pooling"] and config["drop_path_rate"] == 0.1
    card = (out / "README.md").read_text()
    assert "image-classification" in card and "model-index" in card and "type: accuracy" in card
    assert "top_5_accuracy" in card

    classifier = pipeline("image-classification", model=str(out))
    image = Image.open(color_data / "validation" / "blue" / "0.png")
    predictions = classifier(image, top_k=5)
    assert {p["label"] for p in predictions} == set(COLORS)


def test_script_linear_probe_saves_stock_classifier(tmp_path, color_data):
    torch.manual_seed(0)
    ViTModel(tiny_vit_config(), add_pooling_layer=False).save_pretrained(tmp_path / "encoder")
    args = _script_args(
        tmp_path,
        tmp_path / "encoder",
        linear_probe=True,
        learning_rate=0.05,
        num_train_epochs=3,
        eval_strategy="no",
        mixup=None,
        cutmix=None,
        layer_decay=None,
    )
    argv = []
    for key, value in args.items():
        if value is None:
            continue
        if value is True:
            argv.append(f"--{key}")
        else:
            argv += [f"--{key}", str(value)]
    results = run_image_classification.main(argv)
    assert results["eval_accuracy"] > 0.4
    model = ViTForImageClassification.from_pretrained(str(tmp_path / "out")).eval()
    # the encoder is unchanged by linear probing
    encoder = ViTModel.from_pretrained(str(tmp_path / "encoder"), add_pooling_layer=False)
    torch.testing.assert_close(model.vit.layers[1].mlp.fc1.weight, encoder.layers[1].mlp.fc1.weight)
    extractor = pipeline("image-classification", model=str(tmp_path / "out"))
    assert len(extractor(Image.open(color_data / "validation" / "red" / "0.png"))) == 5


def test_script_uses_train_val_split_and_image_files_with_mixup(tmp_path):
    make_color_folder(str(tmp_path / "data" / "train"), per_class=8, seed=0, classes=["red", "green", "blue"])
    torch.manual_seed(0)
    ViTForImageClassification(tiny_vit_config(num_labels=10)).save_pretrained(tmp_path / "clf")
    args = _script_args(
        tmp_path,
        tmp_path / "clf",
        validation_dir=None,
        train_val_split=0.25,
        num_train_epochs=1,
        mixup=0.8,
        cutmix=1.0,
        label_smoothing=0.1,
        layer_decay=0.75,
        image_size=48,
    )
    results = run_image_classification.main(
        [str(a) for kv in args.items() if kv[1] is not None for a in (f"--{kv[0]}", kv[1])]
    )
    assert 0.0 <= results["eval_accuracy"] <= 1.0
    assert "eval_top5_accuracy" not in results  # 3 classes: top-1 only
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["image_size"] == 48 and len(config["id2label"]) == 3


def test_script_accepts_a_hub_id_from_the_offline_cache(tmp_path, color_data, offline_hub_cache):
    torch.manual_seed(0)
    ViTModel(tiny_vit_config(), add_pooling_layer=False).save_pretrained(tmp_path / "encoder")
    offline_hub_cache(tmp_path / "encoder", "someone/vit-tiny")
    args = _script_args(tmp_path, "someone/vit-tiny", num_train_epochs=1, eval_strategy="no")
    results = run_image_classification.main([a for k, v in args.items() for a in (f"--{k}", str(v))])
    assert 0.0 <= results["eval_accuracy"] <= 1.0
    card = yaml.safe_load((tmp_path / "out" / "README.md").read_text().split("---\n")[1])
    assert card["base_model"] == "someone/vit-tiny"
    # an id neither local nor cached: one sentence naming the id and the fix
    args["model_name_or_path"] = "someone/not-downloaded"
    with pytest.raises(
        FileNotFoundError,
        match=r"'someone/not-downloaded' does not exist locally and is not in the "
        r"Hub cache .*hf download someone/not-downloaded",
    ):
        run_image_classification.main([a for k, v in args.items() for a in (f"--{k}", str(v))])


def test_script_refuses_to_resume_a_pretraining_checkpoint(tmp_path, color_data):
    """A checkpoint of another kind in output_dir is never resumed: one line naming it and the way out;
    --overwrite_output_dir starts afresh."""
    save_tiny_cim(str(tmp_path / "cim"))
    save_tiny_cim(str(tmp_path / "out" / "checkpoint-7"))  # e.g. pre-training written to the same folder
    (tmp_path / "out" / "checkpoint-7" / "trainer_state.json").write_text("{}")
    args = _script_args(tmp_path, tmp_path / "cim", num_train_epochs=1, eval_strategy="no")
    argv = [a for k, v in args.items() for a in (f"--{k}", str(v))]
    with pytest.raises(
        ValueError,
        match=r"Cannot resume from \S*checkpoint-7: it holds a CIMForPreTraining and this "
        r"run trains a BeitForImageClassification; pass --overwrite_output_dir",
    ):
        run_image_classification.main(argv)
    results = run_image_classification.main(argv + ["--overwrite_output_dir"])
    assert results["epoch"] == 1.0


def test_script_errors(tmp_path):
    import datasets

    images = [Image.new("RGB", (32, 32), COLORS["red"]) for _ in range(3)]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["red"])})
    datasets.Dataset.from_dict({"image": images, "label": [0, 0, 0]}, features=features).to_parquet(
        str(tmp_path / "one.parquet")
    )
    os.makedirs(tmp_path / "flat")
    for i, image in enumerate(images):
        image.save(tmp_path / "flat" / f"{i}.png")
    ViTModel(tiny_vit_config()).save_pretrained(tmp_path / "enc")
    common = ["--model_name_or_path", str(tmp_path / "enc"), "--output_dir", str(tmp_path / "o"), "--use_cpu"]
    with pytest.raises(ValueError, match="model_name_or_path"):
        run_image_classification.main(["--output_dir", str(tmp_path / "o"), "--train_dir", str(tmp_path / "flat")])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run_image_classification.main(
            ["--model_name_or_path", str(tmp_path / "nope"), "--output_dir", str(tmp_path / "o")]
        )
    with pytest.raises(ValueError, match="single class"):
        run_image_classification.main(common + ["--train_files", str(tmp_path / "one.parquet")])
    with pytest.raises(ValueError, match="not found"):
        run_image_classification.main(
            common + ["--train_files", str(tmp_path / "one.parquet"), "--label_column_name", "species"]
        )
    with pytest.raises(ValueError, match="No label column"):
        run_image_classification.main(common + ["--train_dir", str(tmp_path / "flat")])


def test_script_resume_continues_exactly_with_random_crops_and_mixup(tmp_path, color_data, monkeypatch, stop_at_step):
    """Stopped after step 4 of 10 (checkpoint at 3) and run again: the script resumes from the newest complete
    checkpoint (a half-written one is passed over) and ends with the uninterrupted run's weights. Random crops are
    seeded per row and Mixup/CutMix per step, and the weights are restored strictly (the stock Trainer would drop the
    ViT layers saved in the legacy key format)."""
    save_tiny_cim(str(tmp_path / "cim"))

    def argv(out):
        args = _script_args(
            tmp_path,
            tmp_path / "cim",
            output_dir=str(out),
            num_train_epochs=2,
            mixup=0.8,
            cutmix=1.0,
            label_smoothing=0.1,
            save_strategy="steps",
            save_steps=3,
            eval_strategy="no",
        )
        return [a for k, v in args.items() for a in (f"--{k}", str(v))]

    run_image_classification.main(argv(tmp_path / "A"))
    with monkeypatch.context() as patch:
        base = run_image_classification.ClassificationTrainer

        class Stopping(base):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                self.add_callback(stop_at_step(4))

        patch.setattr(run_image_classification, "ClassificationTrainer", Stopping)
        run_image_classification.main(argv(tmp_path / "B"))
    checkpoints = sorted(d for d in os.listdir(tmp_path / "B") if d.startswith("checkpoint-"))
    assert checkpoints == ["checkpoint-3"]
    at_step_3 = load_file(str(tmp_path / "B" / "checkpoint-3" / "model.safetensors"))
    (tmp_path / "B" / "checkpoint-9").mkdir()
    (tmp_path / "B" / "checkpoint-9" / "model.safetensors").write_bytes(b"")  # killed mid-save
    run_image_classification.main(argv(tmp_path / "B"))

    a, b = load_file(str(tmp_path / "A" / "model.safetensors")), load_file(str(tmp_path / "B" / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6, msg=key)
    # and not trivially: the weights moved after checkpoint-3
    assert at_step_3.keys() == a.keys() and any(not torch.equal(at_step_3[k], a[k]) for k in a)


# ------------------------------------------------------------------------------------------------------------
# What each flag does (the first-hour issue)
# ------------------------------------------------------------------------------------------------------------
def _argv(args: dict) -> list[str]:
    argv = []
    for key, value in args.items():
        if value is None:
            continue
        argv += [f"--{key}"] if value is True else [f"--{key}", str(value)]
    return argv


def test_script_trains_evaluates_and_predicts_only_when_asked(tmp_path, color_data):
    """--do_train alone trains without evaluating; --do_eval alone scores the fine-tuned classifier without training
    it; --do_predict writes row, label, score for the test images; a checkpoint with no trained head is refused."""
    save_tiny_cim(str(tmp_path / "cim"))
    args = _script_args(tmp_path, tmp_path / "cim", num_train_epochs=1, do_train=True)
    results = run_image_classification.main(_argv(args))
    assert "train_loss" in results and not any(key.startswith("eval_") for key in results)
    history = json.loads((tmp_path / "out" / "trainer_state.json").read_text())["log_history"]
    assert not any("eval_loss" in entry for entry in history)  # eval_strategy epoch, but no --do_eval
    weights = (tmp_path / "out" / "model.safetensors").read_bytes()

    args = _script_args(
        tmp_path,
        tmp_path / "out",
        output_dir=str(tmp_path / "scored"),
        do_eval=True,
        do_predict=True,
        test_dir=str(color_data / "validation"),
    )
    results = run_image_classification.main(_argv(args))
    assert 0.0 <= results["eval_accuracy"] <= 1.0 and "train_loss" not in results
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == weights
    assert not (tmp_path / "scored" / "model.safetensors").exists()  # nothing trained, nothing saved
    with open(tmp_path / "scored" / "predictions.csv") as f:
        rows = f.read().splitlines()
    assert rows[0] == "row,label,score" and len(rows) == 1 + 4 * len(COLORS)
    for index, row in enumerate(rows[1:]):
        number, label, score = row.split(",")
        assert int(number) == index and label in COLORS and 0.0 < float(score) <= 1.0

    with pytest.raises(ValueError, match=r"is not a fine-tuned classifier .* needs --do_train"):
        run_image_classification.main(_argv(_script_args(tmp_path, tmp_path / "cim", do_eval=True)))

    def stages(*argv):
        *_, training_args, given = run_image_classification.parse_arguments(["--model_name_or_path", "m", *argv])
        run_image_classification.choose_stages(training_args, given)
        return training_args.do_train, training_args.do_eval, training_args.do_predict, training_args.eval_strategy

    assert stages() == (True, True, False, "epoch")  # none given: train and evaluate
    assert stages("--do_train", "--do_eval", "false") == (True, False, False, "no")
    assert stages("--do_predict") == (False, False, True, "no")


def test_script_label_smoothing_factor_is_used_and_carded(tmp_path, color_data, monkeypatch, caplog):
    """The Trainer's --label_smoothing_factor is what the loss uses and the card reports; the script's old
    --label_smoothing is an alias with a warning, refused when it disagrees."""
    save_tiny_cim(str(tmp_path / "cim"))
    seen = []

    class Recording(run_image_classification.ClassificationTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            seen.append(self)

    monkeypatch.setattr(run_image_classification, "ClassificationTrainer", Recording)
    base = _script_args(tmp_path, tmp_path / "cim", num_train_epochs=1, eval_strategy="no")
    run_image_classification.main(_argv({**base, "label_smoothing_factor": 0.3}))
    assert seen[-1].label_smoothing == 0.3
    assert "| label smoothing (--label_smoothing_factor) | 0.3 |" in (tmp_path / "out" / "README.md").read_text()

    with caplog.at_level("WARNING", logger="run_image_classification"):
        run_image_classification.main(_argv({**base, "label_smoothing": 0.2, "overwrite_output_dir": True}))
    assert seen[-1].label_smoothing == 0.2 and "--label_smoothing is deprecated" in caplog.text
    with pytest.raises(ValueError, match="--label_smoothing 0.2 and --label_smoothing_factor 0.3 disagree"):
        run_image_classification.main(_argv({**base, "label_smoothing": 0.2, "label_smoothing_factor": 0.3}))


def test_script_card_names_the_base_recipe_results_and_licence(tmp_path, color_data):
    save_tiny_cim(str(tmp_path / "cim"))
    args = _script_args(tmp_path, tmp_path / "cim", num_train_epochs=1, eval_strategy="no")
    results = run_image_classification.main(_argv(args))

    text = (tmp_path / "out" / "README.md").read_text()
    header = yaml.safe_load(text.split("---\n")[1])
    assert "trained from scratch" not in text
    assert f"from the local checkpoint `{tmp_path / 'cim'}`" in text  # a local path: named, no base_model
    assert "base_model" not in header and "license" not in header  # no licence stated anywhere: none invented
    assert "| peak learning rate | 0.003, cosine schedule" in text and "| layer decay | 0.9 |" in text
    assert f"| eval_accuracy | {results['eval_accuracy']:.4f} |" in text
    accuracy = [m for m in header["model-index"][0]["results"][0]["metrics"] if m["type"] == "accuracy"]
    assert accuracy[0]["value"] == pytest.approx(results["eval_accuracy"])

    (tmp_path / "cim" / "README.md").write_text("---\nlicense: mit\n---\n\n# a CIM checkpoint\n")
    run_image_classification.main(_argv({**args, "overwrite_output_dir": True}))
    assert yaml.safe_load((tmp_path / "out" / "README.md").read_text().split("---\n")[1])["license"] == "mit"
    run_image_classification.main(_argv({**args, "overwrite_output_dir": True, "license": "cc-by-4.0"}))
    assert yaml.safe_load((tmp_path / "out" / "README.md").read_text().split("---\n")[1])["license"] == "cc-by-4.0"


def test_script_revision_image_processor_and_trust_remote_code(tmp_path, color_data, offline_hub_cache):
    from transformers import AutoImageProcessor, ViTImageProcessor

    torch.manual_seed(0)
    ViTModel(tiny_vit_config(), add_pooling_layer=False).save_pretrained(tmp_path / "encoder")
    snapshot = offline_hub_cache(tmp_path / "encoder", "someone/vit-tiny")
    ViTImageProcessor(image_mean=[0.1, 0.2, 0.3], image_std=[0.4, 0.5, 0.6]).save_pretrained(tmp_path / "processor")
    args = _script_args(
        tmp_path,
        "someone/vit-tiny",
        num_train_epochs=1,
        eval_strategy="no",
        model_revision=os.path.basename(snapshot),
        image_processor_name=str(tmp_path / "processor"),
        trust_remote_code=True,
    )
    run_image_classification.main(_argv(args))
    processor = AutoImageProcessor.from_pretrained(tmp_path / "out")
    assert list(processor.image_mean) == pytest.approx([0.1, 0.2, 0.3])
    assert list(processor.image_std) == pytest.approx([0.4, 0.5, 0.6])
    with pytest.raises(FileNotFoundError, match="'someone/vit-tiny' at revision 'v2' does not exist locally"):
        run_image_classification.main(_argv({**args, "model_revision": "v2"}))


def test_ignore_mismatched_sizes_reinitialises_encoder_weights(tmp_path, caplog):
    torch.manual_seed(0)
    ViTModel(tiny_vit_config(), add_pooling_layer=False).save_pretrained(tmp_path / "encoder")
    config = json.loads((tmp_path / "encoder" / "config.json").read_text())
    config["intermediate_size"] = 48  # the saved MLP weights are 64 wide
    (tmp_path / "encoder" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="encoder weights of the wrong shape.*--ignore_mismatched_sizes"):
        load_encoder_for_classification(tmp_path / "encoder", 3)
    with caplog.at_level("WARNING"):
        model = load_encoder_for_classification(tmp_path / "encoder", 3, ignore_mismatched_sizes=True)
    assert model.vit.layers[0].mlp.fc1.weight.shape == (48, 32)
    assert "Re-initialised" in caplog.text


# ------------------------------------------------------------------------------------------------------------
# The authors' fine-tuning recipe: head, drop-path, random erasing, EMA encoder
# ------------------------------------------------------------------------------------------------------------
def test_recipe_defaults_are_the_authors_for_vit_fine_tuning():
    model_args, _, training_args, _ = run_image_classification.parse_arguments(["--model_name_or_path", "x"])
    run_image_classification.apply_recipe_defaults(model_args, training_args, "vit")
    assert (model_args.pooling, model_args.drop_path_rate, model_args.random_erasing, model_args.layer_decay) == (
        "mean",
        0.1,
        0.25,
        0.8,
    )
    probe_args, _, probe_training, _ = run_image_classification.parse_arguments(
        ["--model_name_or_path", "x", "--linear_probe"]
    )
    run_image_classification.apply_recipe_defaults(probe_args, probe_training, "vit")
    assert (probe_args.pooling, probe_args.drop_path_rate, probe_args.random_erasing) == ("cls", 0.0, 0.0)


@pytest.mark.parametrize(
    "argv, encoder_type, message",
    [
        (["--pooling", "cls", "--drop_path_rate", "0.1"], "vit", "--drop_path_rate needs --pooling mean"),
        (["--pooling", "mean"], "resnet", "apply to ViT encoders"),
        (["--linear_probe", "--pooling", "mean"], "vit", "--linear_probe reads the CLS token"),
        (["--random_erasing", "1.5"], "vit", r"--random_erasing is a probability"),
    ],
)
def test_recipe_refuses_contradictory_heads(argv, encoder_type, message):
    model_args, _, training_args, _ = run_image_classification.parse_arguments(["--model_name_or_path", "x", *argv])
    with pytest.raises(UserValueError, match=message):
        run_image_classification.apply_recipe_defaults(model_args, training_args, encoder_type)


def test_random_erasing_is_seeded_noise_in_one_rectangle():
    from transformers_cim.training.data import RandomResizedCropFlip

    image = Image.fromarray(np.full((48, 48, 3), 128, np.uint8))
    plain = RandomResizedCropFlip(size=32, scale=(1.0, 1.0), hflip=False)
    erasing = RandomResizedCropFlip(size=32, scale=(1.0, 1.0), hflip=False, random_erasing=1.0)
    base = plain(image, np.random.default_rng(0))
    erased = erasing(image, np.random.default_rng(0))
    changed = (erased != base).any(0)
    rows, cols = changed.any(1).nonzero().flatten(), changed.any(0).nonzero().flatten()
    assert 0 < changed.sum() < 32 * 32
    # the changed pixels fill exactly one axis-aligned rectangle
    assert changed[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1].all()
    assert changed.sum() == (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
    torch.testing.assert_close(erasing(image, np.random.default_rng(0)), erased)  # same seed, same erasing
    # probability 0 draws nothing: the views of existing seeds are unchanged
    torch.testing.assert_close(
        RandomResizedCropFlip(size=32, random_erasing=0.0)(image, np.random.default_rng(5)),
        RandomResizedCropFlip(size=32)(image, np.random.default_rng(5)),
    )


def test_ema_encoder_is_the_target_encoders_weights(tmp_path):
    cim = save_tiny_cim(str(tmp_path / "cim"))
    with torch.no_grad():  # make the EMA target differ from the online encoder
        for param in cim.target_encoder.parameters():
            param.add_(0.5)
    cim.save_pretrained(tmp_path / "cim")
    online = load_encoder_for_classification(str(tmp_path / "cim"), num_labels=2)
    ema = load_encoder_for_classification(str(tmp_path / "cim"), num_labels=2, encoder_weights="ema")
    torch.testing.assert_close(ema.vit.layers[0].mlp.fc1.weight, cim.target_encoder.layers[0].mlp.fc1.weight)
    torch.testing.assert_close(ema.vit.layernorm.weight, cim.target_encoder.layernorm.weight)
    # the authors' --use_ema keeps the online embeddings (CLS token, positions, patch projection)
    torch.testing.assert_close(ema.vit.embeddings.cls_token, cim.vit.embeddings.cls_token)
    assert not torch.equal(ema.vit.embeddings.cls_token, cim.target_encoder.embeddings.cls_token)
    torch.testing.assert_close(online.vit.layers[0].mlp.fc1.weight, cim.vit.layers[0].mlp.fc1.weight)
    assert not torch.equal(ema.vit.layers[0].mlp.fc1.weight, online.vit.layers[0].mlp.fc1.weight)
    ViTModel(tiny_vit_config(), add_pooling_layer=False).save_pretrained(tmp_path / "encoder")
    with pytest.raises(UserValueError, match="exists only in a CIM pre-training checkpoint"):
        load_encoder_for_classification(str(tmp_path / "encoder"), num_labels=2, encoder_weights="ema")
