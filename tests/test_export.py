"""Tests for transformers_cim.export: a CIM checkpoint's online encoder as a plain, code-free checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageClassification,
    ResNetConfig,
    ResNetModel,
    ViTConfig,
    ViTForImageClassification,
    ViTModel,
    pipeline,
)

from transformers_cim import CIMConfig, CIMForPreTraining
from transformers_cim.export import export_encoder, main


def tiny_vit_cim_config() -> CIMConfig:
    encoder = ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, patch_size=8, image_size=32
    )
    return CIMConfig(
        encoder_config=encoder,
        image_size=32,
        context_size=32,
        exemplar_size=16,
        num_exemplars=2,
        decoder_hidden_size=32,
        decoder_num_attention_heads=2,
        image_mean=[0.5, 0.4, 0.3],
        image_std=[0.2, 0.25, 0.3],
    )


def tiny_resnet_cim_config() -> CIMConfig:
    encoder = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic")
    return CIMConfig(
        encoder_config=encoder,
        image_size=64,
        context_size=64,
        exemplar_size=32,
        num_exemplars=2,
        decoder_hidden_size=32,
        decoder_num_attention_heads=2,
    )


@pytest.fixture(scope="module")
def vit_export(tmp_path_factory):
    root = tmp_path_factory.mktemp("vit_export")
    torch.manual_seed(0)
    model = CIMForPreTraining(tiny_vit_cim_config())
    with torch.no_grad():  # make online and target encoders differ, as after training
        for p in model.vit.parameters():
            p.add_(0.01 * torch.randn_like(p))
    model.save_pretrained(root / "cim")
    out = export_encoder(root / "cim", root / "encoder")
    return root, out


def _image(seed: int = 0, size=(45, 37)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def test_exported_vit_config_is_stock(vit_export):
    root, out = vit_export
    assert out == str(root / "encoder")
    with open(os.path.join(out, "config.json")) as f:
        config = json.load(f)
    assert config["model_type"] == "vit"
    assert config["architectures"] == ["ViTModel"]
    assert "auto_map" not in config and "encoder_config" not in config
    assert config["hidden_size"] == 32 and config["image_size"] == 32
    processor = AutoImageProcessor.from_pretrained(out)
    assert list(processor.image_mean) == pytest.approx([0.5, 0.4, 0.3])  # the CIM config's statistics
    assert list(processor.image_std) == pytest.approx([0.2, 0.25, 0.3])
    assert processor.crop_size == {"height": 32, "width": 32}  # the evaluation transform: resize, centre crop
    assert not any(name.endswith(".py") for name in os.listdir(out))


def test_exported_features_identical_to_cim_online_encoder(vit_export):
    root, out = vit_export
    cim = CIMForPreTraining.from_pretrained(root / "cim").eval()
    exported = AutoModel.from_pretrained(out).eval()
    assert isinstance(exported, ViTModel)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = cim.vit(x).last_hidden_state
        torch.testing.assert_close(exported(x).last_hidden_state, expected, rtol=0, atol=0)
        # ... and not the target encoder's
        assert not torch.allclose(cim.target_encoder(x).last_hidden_state, expected)
        # at another resolution the stock ViT interpolates its position table the stock way: equal to the CIM
        # encoder under position_interpolation="transformers", not under the authors' default form
        x64 = torch.randn(1, 3, 64, 64)
        stock = CIMForPreTraining.from_pretrained(root / "cim", position_interpolation="transformers").eval()
        exported_64 = exported(x64, interpolate_pos_encoding=True).last_hidden_state
        torch.testing.assert_close(
            exported_64, stock.vit(x64, interpolate_pos_encoding=True).last_hidden_state, rtol=0, atol=0
        )
        assert not torch.allclose(exported_64, cim.vit(x64, interpolate_pos_encoding=True).last_hidden_state)


def test_exported_vit_pooler_is_the_cls_token_not_random(vit_export):
    """Loading the export reports no missing weight, and every output is defined: pooler_output is exactly the final
    CLS token (an identity pooler), not a randomly initialised dense layer."""
    root, out = vit_export
    model, info = AutoModel.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"] and not info["unexpected_keys"]
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        outputs = model.eval()(x)
        cim = CIMForPreTraining.from_pretrained(root / "cim").eval()
        torch.testing.assert_close(outputs.pooler_output, outputs.last_hidden_state[:, 0], rtol=0, atol=0)
        torch.testing.assert_close(outputs.pooler_output, cim.vit(x).last_hidden_state[:, 0], rtol=0, atol=0)
    again = AutoModel.from_pretrained(out)  # a second load gives the same pooler: nothing is initialised at load
    torch.testing.assert_close(again.pooler.dense.weight, torch.eye(32), rtol=0, atol=0)
    assert "pooler_output" in (root / "encoder" / "README.md").read_text()


def test_exported_encoder_loads_in_pipelines_offline(vit_export):
    _, out = vit_export
    image = _image()
    extractor = pipeline("image-feature-extraction", model=out)
    features = np.asarray(extractor(image))
    assert features.shape == (1, 1 + 16, 32)
    model = AutoModel.from_pretrained(out).eval()
    inputs = AutoImageProcessor.from_pretrained(out)(image, return_tensors="pt")
    with torch.no_grad():
        expected = model(**inputs).last_hidden_state.numpy()
    np.testing.assert_allclose(features, expected, rtol=1e-5, atol=1e-5)

    classifier = pipeline("image-classification", model=out)
    predictions = classifier(image)
    assert len(predictions) == 2 and abs(sum(p["score"] for p in predictions) - 1) < 1e-5
    head_model = AutoModelForImageClassification.from_pretrained(out, num_labels=4)
    assert isinstance(head_model, ViTForImageClassification)
    torch.testing.assert_close(head_model.vit.layers[0].mlp.fc1.weight, model.layers[0].mlp.fc1.weight)


def test_export_resnet(tmp_path):
    torch.manual_seed(0)
    model = CIMForPreTraining(tiny_resnet_cim_config()).eval()
    model.save_pretrained(tmp_path / "cim")
    assert main([str(tmp_path / "cim"), str(tmp_path / "encoder")]) == 0
    config = json.loads((tmp_path / "encoder" / "config.json").read_text())
    assert config["model_type"] == "resnet" and "auto_map" not in config
    exported = AutoModel.from_pretrained(tmp_path / "encoder").eval()
    assert isinstance(exported, ResNetModel)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(exported(x).pooler_output, model.resnet(x).pooler_output, rtol=0, atol=0)
    processor = AutoImageProcessor.from_pretrained(tmp_path / "encoder")
    assert processor.size == {"shortest_edge": 73} and processor.crop_size == {"height": 64, "width": 64}
    assert pipeline("image-classification", model=str(tmp_path / "encoder"))(_image(1))


def test_cli_help_and_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "cim-export-encoder" in capsys.readouterr().out
    assert main([str(tmp_path / "missing"), str(tmp_path / "out")]) == 1
    assert "does not exist" in capsys.readouterr().err
    # a config without weights is refused with a clear error
    os.makedirs(tmp_path / "noweights")
    tiny_vit_cim_config().save_pretrained(tmp_path / "noweights")
    assert main([str(tmp_path / "noweights"), str(tmp_path / "out")]) == 1


def test_export_from_a_hub_id_in_the_offline_cache(vit_export, offline_hub_cache, tmp_path, capsys):
    root, _ = vit_export
    snapshot = offline_hub_cache(root / "cim", "someone/cim-tiny")
    assert main(["someone/cim-tiny", str(tmp_path / "encoder")]) == 0
    assert "base_model: someone/cim-tiny\n" in (tmp_path / "encoder" / "README.md").read_text()
    exported = AutoModel.from_pretrained(tmp_path / "encoder")
    cim = CIMForPreTraining.from_pretrained(snapshot)
    torch.testing.assert_close(exported.embeddings.position_embeddings, cim.vit.embeddings.position_embeddings)
    # neither local nor cached: one sentence naming the id and the fix
    assert main(["someone/not-downloaded", str(tmp_path / "other")]) == 1
    message = capsys.readouterr().err
    assert "'someone/not-downloaded'" in message and "Hub cache" in message and "hf download" in message


def test_console_script_is_registered():
    from importlib.metadata import entry_points

    scripts = {ep.name: ep for ep in entry_points(group="console_scripts")}
    assert scripts["cim-export-encoder"].load() is main


@pytest.mark.slow
def test_cli_entry_point_runs_as_module(vit_export, tmp_path):
    root, _ = vit_export
    result = subprocess.run(
        [sys.executable, "-m", "transformers_cim.export", str(root / "cim"), str(tmp_path / "e")],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith(str(tmp_path / "e"))
    assert os.path.isfile(tmp_path / "e" / "model.safetensors")
