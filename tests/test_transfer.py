"""Transfer into stock classes: the BEiT copy of a ViT computes the same features (the dropped key bias is exact),
the authors' mean-pool head and UperNet load from a CIM checkpoint and through pipelines without custom code."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import make_tiny_resnet_config, make_tiny_vit_config
from PIL import Image
from transformers import (
    BeitImageProcessor,
    ResNetConfig,
    ResNetModel,
    UperNetForSemanticSegmentation,
    ViTConfig,
    ViTModel,
    pipeline,
)

from transformers_cim import CIMForPreTraining
from transformers_cim.errors import UserValueError
from transformers_cim.transfer import (
    beit_for_image_classification,
    default_out_indices,
    upernet_for_semantic_segmentation,
)


def _vit_with_random_biases(seed: int = 0) -> ViTModel:
    """A small ViT whose every parameter, key bias included, is random (the stock init zeroes biases, which would
    make the key-bias check vacuous)."""
    torch.manual_seed(seed)
    config = ViTConfig(
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
        layer_norm_eps=1e-6,
    )
    vit = ViTModel(config, add_pooling_layer=False).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in vit.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.2 + (1.0 if param.ndim == 1 else 0.0))
    return vit


def _save_vit(vit: ViTModel, path) -> str:
    vit.save_pretrained(path)
    return str(path)


def test_default_out_indices_are_beits_for_12_blocks_and_distinct_for_any_depth():
    assert default_out_indices(12) == [4, 6, 8, 12]
    for depth in range(4, 33):
        indices = default_out_indices(depth)
        assert len(indices) == 4 and indices == sorted(set(indices)) and indices[0] >= 1 and indices[-1] == depth
    with pytest.raises(UserValueError, match="4 feature levels"):
        default_out_indices(3)


def test_beit_classifier_is_the_vit_without_key_bias(tmp_path, single_thread):
    vit = _vit_with_random_biases()
    assert vit.layers[0].attention.k_proj.bias.abs().sum() > 1  # the dropped bias is not zero
    model = beit_for_image_classification(
        _save_vit(vit, tmp_path / "vit"), num_labels=3, drop_path_rate=0.0, seed=0
    ).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = vit(x, output_hidden_states=True).hidden_states[-1]  # before the ViT's final LayerNorm
        got = model.beit(x, output_hidden_states=True).hidden_states[-1]
        pooled = model.beit(x).pooler_output
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # the authors' head: mean of the patch tokens (not the CLS token), then the LayerNorm
    norm = model.beit.pooler.layernorm
    torch.testing.assert_close(pooled, norm(want[:, 1:].mean(1)), atol=1e-5, rtol=1e-5)
    assert model.classifier.weight.std() < 1e-4 and model.config.use_mean_pooling
    # the same seed draws the same head
    again = beit_for_image_classification(str(tmp_path / "vit"), num_labels=3, seed=0)
    torch.testing.assert_close(again.classifier.weight, model.classifier.weight)


def test_beit_classifier_from_cim_checkpoint_loads_in_a_pipeline(tmp_path, single_thread):
    cim = CIMForPreTraining(make_tiny_vit_config())
    cim.save_pretrained(tmp_path / "cim")
    model = beit_for_image_classification(
        str(tmp_path / "cim"), num_labels=2, id2label={0: "cat", 1: "dog"}, drop_path_rate=0.1
    )
    torch.testing.assert_close(model.beit.layers[1].mlp.fc1.weight, cim.vit.layers[1].mlp.fc1.weight)
    assert model.config.drop_path_rate == 0.1
    model.save_pretrained(tmp_path / "clf")
    BeitImageProcessor(size={"height": 64, "width": 64}, do_center_crop=False).save_pretrained(tmp_path / "clf")
    saved = json.loads((tmp_path / "clf" / "config.json").read_text())
    assert saved["model_type"] == "beit" and "auto_map" not in saved
    classify = pipeline("image-classification", model=str(tmp_path / "clf"))
    out = classify(Image.fromarray(np.zeros((50, 70, 3), np.uint8)))
    assert {o["label"] for o in out} == {"cat", "dog"}


def test_upernet_backbone_features_are_the_vit_blocks(tmp_path, single_thread):
    vit = _vit_with_random_biases(seed=3)
    model = upernet_for_semantic_segmentation(
        _save_vit(vit, tmp_path / "vit"), num_labels=5, drop_path_rate=0.0, hidden_size=32, auxiliary_channels=16
    ).eval()
    assert model.config.backbone_config.out_indices == [1, 2, 3, 4]
    x = torch.randn(1, 3, 32, 48, generator=torch.Generator().manual_seed(2))  # non-square: interpolated positions
    with torch.no_grad():
        want = vit(x, output_hidden_states=True, interpolate_pos_encoding=True).hidden_states
        got = model.backbone.beit(x, output_hidden_states=True).hidden_states
        logits = model(x).logits
    for i in (1, 2, 3, 4):
        torch.testing.assert_close(got[i], want[i], atol=1e-5, rtol=1e-5)
    assert logits.shape == (1, 5, 32, 48)


def test_upernet_from_resnet_cim_checkpoint_uses_its_stages(tmp_path, single_thread):
    cim = CIMForPreTraining(make_tiny_resnet_config()).eval()
    cim.save_pretrained(tmp_path / "cim")
    model = upernet_for_semantic_segmentation(
        str(tmp_path / "cim"), num_labels=3, hidden_size=16, auxiliary_channels=8
    ).eval()
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ResNetModel(cim.config.encoder_config)
        want.load_state_dict(cim.resnet.state_dict())
        want_maps = want.eval()(x, output_hidden_states=True).hidden_states[1:]
        got_maps = model.backbone(x).feature_maps
        assert model(x).logits.shape == (1, 3, 64, 64)
    assert len(got_maps) == 4
    for g, w in zip(got_maps, want_maps):
        torch.testing.assert_close(g, w)


def test_random_init_upernet_and_segmentation_pipeline(tmp_path, single_thread):
    encoder_config = make_tiny_vit_config().encoder_config
    encoder_config.num_hidden_layers = 4
    model = upernet_for_semantic_segmentation(
        None,
        num_labels=3,
        id2label={0: "road", 1: "sky", 2: "car"},
        encoder_config=encoder_config,
        image_size=64,
        hidden_size=32,
        auxiliary_channels=16,
    )
    assert isinstance(model, UperNetForSemanticSegmentation)
    model.save_pretrained(tmp_path / "seg")
    BeitImageProcessor(size={"height": 64, "width": 64}, do_center_crop=False, do_reduce_labels=False).save_pretrained(
        tmp_path / "seg"
    )
    segment = pipeline("image-segmentation", model=str(tmp_path / "seg"))
    out = segment(Image.fromarray(np.full((40, 60, 3), 128, np.uint8)))
    assert out and all(o["label"] in {"road", "sky", "car"} for o in out)
    assert all(o["mask"].size == (60, 40) for o in out)


def test_resnet_encoder_refused_for_the_beit_classifier(tmp_path):
    ResNetModel(
        ResNetConfig(embedding_size=8, hidden_sizes=[8, 8, 8, 8], depths=[1, 1, 1, 1], layer_type="basic")
    ).save_pretrained(tmp_path / "r")
    with pytest.raises(UserValueError, match="not a ViT"):
        beit_for_image_classification(str(tmp_path / "r"), num_labels=2)
