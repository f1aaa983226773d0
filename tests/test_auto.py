"""Auto classes, `trust_remote_code` loading without this package, and stock heads on CIM checkpoints."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForPreTraining,
    ResNetForImageClassification,
    ViTForImageClassification,
)

import transformers_cim
from transformers_cim import CIMConfig, CIMForPreTraining, CIMModel

pytestmark = pytest.mark.usefixtures("single_thread")


def saved_model(config, directory, seed: int = 0) -> CIMForPreTraining:
    """A pre-training model whose online and target encoders differ, saved to `directory`."""
    torch.manual_seed(seed)
    model = CIMForPreTraining(config)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.encoder.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    model.momentum_update(0.5)
    model.eval()
    model.save_pretrained(directory)
    return model


def test_package_registers_the_auto_classes(tiny_vit_config, search_views, tmp_path):
    model = saved_model(tiny_vit_config(), tmp_path)
    config = AutoConfig.from_pretrained(tmp_path)
    assert type(config) is CIMConfig and config.model_type == "cim"
    pretraining = AutoModelForPreTraining.from_pretrained(tmp_path)
    assert type(pretraining) is CIMForPreTraining
    encoder = AutoModel.from_pretrained(tmp_path)
    assert type(encoder) is CIMModel
    x = search_views()
    assert torch.equal(
        pretraining(x, generator=torch.Generator().manual_seed(0)).logits,
        model(x, generator=torch.Generator().manual_seed(0)).logits,
    )
    assert torch.equal(encoder(x).last_hidden_state, model.vit(x).last_hidden_state)
    # auto_map for every class is written so that a Hub copy loads with trust_remote_code
    assert set(config.auto_map) == {"AutoConfig", "AutoModel", "AutoModelForPreTraining"}
    for name in ("configuration_cim.py", "modeling_cim.py", "pretext.py"):
        assert (tmp_path / name).is_file(), name


CHILD = textwrap.dedent(
    """
    import sys
    sys.modules["transformers_cim"] = None  # this package must not be importable here
    sys.path[:] = [p for p in sys.path if not p.rstrip("/").endswith("src")]
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForPreTraining

    directory, data = sys.argv[1], torch.load(sys.argv[2])
    try:
        import transformers_cim  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("transformers_cim was importable in the child")
    config = AutoConfig.from_pretrained(directory, trust_remote_code=True)
    assert type(config).__name__ == "CIMConfig" and config.model_type == "cim", type(config)
    pretraining = AutoModelForPreTraining.from_pretrained(directory, trust_remote_code=True)
    encoder = AutoModel.from_pretrained(directory, trust_remote_code=True)
    assert type(pretraining).__name__ == "CIMForPreTraining", type(pretraining)
    assert type(encoder).__name__ == "CIMModel", type(encoder)
    for obj in (config, pretraining, encoder):
        assert type(obj).__module__.startswith("transformers_modules."), type(obj).__module__
    out = pretraining(data["pixel_values"], generator=torch.Generator().manual_seed(0))
    features = encoder(data["pixel_values"]).last_hidden_state
    torch.save({"logits": out.logits, "loss": out.loss, "features": features}, sys.argv[3])
    """
)


def test_trust_remote_code_loads_without_the_package(tiny_vit_config, search_views, tmp_path):
    checkpoint = tmp_path / "checkpoint"
    model = saved_model(tiny_vit_config(), checkpoint)
    x = search_views()
    expected = model(x, generator=torch.Generator().manual_seed(0))
    torch.save({"pixel_values": x}, tmp_path / "inputs.pt")
    (tmp_path / "child.py").write_text(CHILD)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"), OMP_NUM_THREADS="1")
    env.pop("PYTHONPATH", None)
    result = subprocess.run(
        [
            sys.executable,
            "-I",
            str(tmp_path / "child.py"),
            str(checkpoint),
            str(tmp_path / "inputs.pt"),
            str(tmp_path / "outputs.pt"),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    got = torch.load(tmp_path / "outputs.pt")
    assert torch.equal(got["logits"], expected.logits)
    assert torch.equal(got["loss"], expected.loss)
    assert torch.equal(got["features"], model.vit(x).last_hidden_state)
    assert any((tmp_path / "modules").rglob("modeling_cim.py"))  # the remote code really was used


def test_vit_for_image_classification_loads_the_online_encoder(tiny_vit_config, search_views, tmp_path):
    model = saved_model(tiny_vit_config(), tmp_path)
    classifier, info = ViTForImageClassification.from_pretrained(tmp_path, num_labels=5, output_loading_info=True)
    assert info["missing_keys"] == {"classifier.weight", "classifier.bias"}
    assert not info["mismatched_keys"]
    assert all(k.startswith(("target_encoder.", "decoder.")) for k in info["unexpected_keys"])
    assert classifier.config.num_labels == 5 and classifier.classifier.out_features == 5
    online, loaded = model.vit.state_dict(), classifier.vit.state_dict()
    assert online.keys() == loaded.keys()
    for key in online:  # the online encoder, not the (different) target
        assert torch.equal(online[key], loaded[key]), key
    target = model.target_encoder.state_dict()
    for key in (
        "layers.1.attention.q_proj.weight",
        "layers.0.mlp.fc1.bias",
        "layernorm.weight",
        "embeddings.cls_token",
    ):
        assert not torch.equal(loaded[key], target[key]), key  # so the test can tell online from target
    assert classifier.config.image_size == 64 and classifier.config.hidden_size == 192
    x = search_views()
    assert classifier(x).logits.shape == (2, 5)
    torch.testing.assert_close(classifier.vit(x).last_hidden_state, model.vit(x).last_hidden_state, rtol=0, atol=0)


def test_resnet_for_image_classification_loads_the_online_encoder(tiny_resnet_config, search_views, tmp_path):
    torch.manual_seed(0)
    model = CIMForPreTraining(tiny_resnet_config())
    model.train()
    model(search_views(), generator=torch.Generator().manual_seed(0))  # non-trivial BatchNorm statistics
    with torch.no_grad():
        for p in model.resnet.parameters():
            p.add_(0.01)
    model.eval()
    model.save_pretrained(tmp_path)
    classifier, info = ResNetForImageClassification.from_pretrained(tmp_path, num_labels=5, output_loading_info=True)
    assert info["missing_keys"] == {"classifier.1.weight", "classifier.1.bias"}
    assert not info["mismatched_keys"]
    online, loaded = model.resnet.state_dict(), classifier.resnet.state_dict()
    assert online.keys() == loaded.keys()
    for key in online:
        assert torch.equal(online[key], loaded[key]), key
    x = search_views()
    assert classifier(x).logits.shape == (2, 5)
    assert torch.equal(classifier.resnet(x).pooler_output, model.resnet(x).pooler_output)


def test_registration_is_idempotent():
    transformers_cim._register_auto_classes()  # re-import / re-register must not raise
    assert AutoConfig.for_model("cim").__class__ is CIMConfig
