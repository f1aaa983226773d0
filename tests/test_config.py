"""CIMConfig: the authors' recipe as defaults, presets, serialisation, validation, sub-config loading."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import ResNetConfig, ViTConfig

from transformers_cim import PRESET_NAMES, CIMConfig, CIMForPreTraining, preset_encoder_config

RECIPE = {
    "image_size": 224,
    "context_size": 160,
    "exemplar_size": 64,
    "num_exemplars": 6,
    "exemplar_scale": [0.05, 0.48],
    "exemplar_max_rotation": 45.0,
    "exemplar_augmentation": True,
    "exemplar_color_jitter": [0.4, 0.4, 0.2, 0.1],
    "exemplar_color_jitter_prob": 0.8,
    "exemplar_grayscale_prob": 0.2,
    "exemplar_blur_prob": 0.5,
    "exemplar_blur_sigma": [0.1, 2.0],
    "exemplar_solarize_prob": 0.2,
    "decoder_hidden_size": 512,
    "decoder_num_attention_heads": 16,
    "decoder_num_layers": 1,
    "decoder_mlp_ratio": 4.0,
    "loss_type": "ce",
    "momentum_start": 0.99,
    "momentum_end": 1.0,
    "contrastive_loss_weight": 0.0,
    "correlation_loss_weight": 1.0,
    "target_encoder_mode": "ema",
    "freeze_patch_embedding": True,
    "use_sincos_position_embeddings": True,
}


pytestmark = pytest.mark.usefixtures("single_thread")


def _check_recipe(config: CIMConfig) -> None:
    for name, expected in RECIPE.items():
        assert getattr(config, name) == expected, name
    assert config.exemplar_aspect_ratio == pytest.approx([1 / 3, 3.0], abs=1e-12)
    # ViT-B/16 encoder, as the released checkpoint; LayerNorm eps 1e-6 as the authors' (MAE) ViT
    enc = config.encoder_config
    assert isinstance(enc, ViTConfig)
    assert (enc.hidden_size, enc.num_hidden_layers, enc.num_attention_heads, enc.intermediate_size) == (
        768,
        12,
        12,
        3072,
    )
    assert enc.patch_size == 16 and enc.image_size == 224 and enc.qkv_bias
    assert enc.layer_norm_eps == pytest.approx(1e-6)
    assert config.context_grid_size == 10  # 160 / 16
    # footnote of the paper: 100 context patches + 6 x 16 exemplar patches = 196 = one 224 px image
    assert config.context_grid_size**2 + config.num_exemplars * (config.exemplar_size // 16) ** 2 == 196


def test_defaults_are_the_authors_recipe():
    _check_recipe(CIMConfig())


def test_vit_base_preset_is_the_recipe_and_equals_the_default():
    config = CIMConfig.from_preset("vit-base-patch16")
    _check_recipe(config)
    assert config.encoder_config.to_dict() == CIMConfig().encoder_config.to_dict()


# encoder parameters (no head, no pooler) of the standard models: ViT-T/S/B/L-16 and ViT-H/14 at 224 px and ResNet-50
PRESET_SHAPES = {
    "vit-tiny-patch16": (192, 5.52e6),
    "vit-small-patch16": (384, 21.67e6),
    "vit-base-patch16": (768, 85.80e6),
    "vit-large-patch16": (1024, 303.30e6),
    "vit-huge-patch14": (1280, 630.76e6),
    "resnet-50": (2048, 23.51e6),
}


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_each_preset_builds(name):
    assert set(PRESET_NAMES) == set(PRESET_SHAPES)
    config = CIMConfig.from_preset(name)
    width, num_params = PRESET_SHAPES[name]
    assert config.encoder_hidden_size == width
    assert config.encoder_type == ("resnet" if name == "resnet-50" else "vit")
    assert config.encoder_stride == {"resnet-50": 32, "vit-huge-patch14": 14}.get(name, 16)
    with torch.device("meta"):  # shapes only: no memory, no init cost
        model = CIMForPreTraining(config)
    assert sum(p.numel() for p in model.encoder.parameters()) == pytest.approx(num_params, rel=1e-3)
    target = sum(p.numel() for p in model.target_encoder.parameters())
    assert target == sum(p.numel() for p in model.encoder.parameters())
    # preset + overrides
    context, exemplar = (56, 28) if config.encoder_stride == 14 else (64, 32)
    small = CIMConfig.from_preset(name, context_size=context, exemplar_size=exemplar, num_exemplars=2)
    assert (small.context_size, small.exemplar_size, small.num_exemplars) == (context, exemplar, 2)
    assert small.encoder_config.to_dict() == config.encoder_config.to_dict()


def test_unknown_preset_raises():
    with pytest.raises(ValueError, match="preset.*vit-huge"):
        CIMConfig.from_preset("vit-huge")
    with pytest.raises(ValueError, match="preset"):
        preset_encoder_config("resnet-18")


NON_DEFAULT = dict(
    loss_type="focal",
    exemplar_scale=[0.1, 0.9],
    exemplar_aspect_ratio=[0.5, 2.0],
    exemplar_max_rotation=10,
    contrastive_loss_weight=0.5,
    target_encoder_mode="shared",
    momentum_start=0.996,
    exemplar_augmentation=False,
    decoder_num_layers=2,
)


@pytest.mark.parametrize("family", ["vit", "resnet"])
def test_save_load_round_trip(family, tmp_path, tiny_vit_config, tiny_resnet_config):
    make = tiny_vit_config if family == "vit" else tiny_resnet_config
    config = make(**NON_DEFAULT)
    config.save_pretrained(tmp_path)
    loaded = CIMConfig.from_pretrained(tmp_path)
    assert loaded.to_dict() == config.to_dict()
    assert type(loaded.encoder_config) is type(config.encoder_config)
    assert loaded.encoder_config.to_dict() == config.encoder_config.to_dict()
    for name, value in NON_DEFAULT.items():
        assert getattr(loaded, name) == value, name
    # and through a plain dict / JSON string
    assert CIMConfig.from_dict(json.loads(config.to_json_string())).to_dict() == config.to_dict()


def test_vit_encoder_image_size_follows_search_view(tiny_vit_config):
    assert tiny_vit_config().encoder_config.image_size == 64
    assert CIMConfig(image_size=192, context_size=160).encoder_config.image_size == 192


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(exemplar_size=64, context_size=48), "exemplar_size"),
        (dict(exemplar_scale=[0.0, 0.5]), "exemplar_scale"),
        (dict(exemplar_scale=[-0.1, 0.5]), "exemplar_scale"),
        (dict(exemplar_scale=[0.1, 1.2]), "exemplar_scale"),
        (dict(exemplar_scale=[0.6, 0.5]), "exemplar_scale"),
        (dict(exemplar_scale=[0.1, 0.2, 0.3]), "exemplar_scale"),
        (dict(context_size=40, image_size=64), "context_size"),
        (dict(exemplar_size=24), "exemplar_size"),
        (dict(loss_type="hinge"), "loss_type"),
        (dict(target_encoder_mode="reverse"), "target_encoder_mode"),
        (dict(exemplar_aspect_ratio=[0.0, 2.0]), "exemplar_aspect_ratio"),
        (dict(exemplar_max_rotation=120.0), "exemplar_max_rotation"),
        (dict(exemplar_blur_prob=1.5), "exemplar_blur_prob"),
        (dict(decoder_hidden_size=60, decoder_num_attention_heads=8), "decoder_hidden_size"),
        (dict(context_size=80, image_size=64, exemplar_size=16), "context_size"),
        (dict(momentum_start=0.99, momentum_end=0.9), "momentum"),
        (dict(num_exemplars=0), "num_exemplars"),
    ],
)
def test_bad_values_raise_naming_the_field(overrides, field, tiny_vit_config):
    with pytest.raises(ValueError, match=field):
        tiny_vit_config(**overrides)


def test_resnet_stride_must_divide_context(tiny_resnet_config):
    with pytest.raises(ValueError, match="context_size"):
        tiny_resnet_config(context_size=48, exemplar_size=32)
    with pytest.raises(ValueError, match="exemplar_size"):
        tiny_resnet_config(exemplar_size=16)


def test_full_range_scale_upper_bound_is_allowed(tiny_vit_config):
    # (0, 1] is the allowed range: 1.0 itself is fine (the paper's r0 in (0, 1))
    assert tiny_vit_config(exemplar_scale=[0.01, 1.0]).exemplar_scale == [0.01, 1.0]


def test_invalid_saved_config_is_rejected_on_load(tmp_path, tiny_vit_config):
    tiny_vit_config().save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    data = json.loads(path.read_text())
    data["loss_type"] = "l1"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="loss_type"):
        CIMConfig.from_pretrained(tmp_path)


def test_encoder_sub_config_loads_from_cim_checkpoint(tmp_path, tiny_vit_config, tiny_resnet_config):
    vit_dir, resnet_dir = tmp_path / "vit", tmp_path / "resnet"
    vit = tiny_vit_config()
    vit.save_pretrained(vit_dir)
    loaded = ViTConfig.from_pretrained(vit_dir)
    assert type(loaded) is ViTConfig
    assert (loaded.hidden_size, loaded.num_hidden_layers, loaded.image_size) == (192, 2, 64)
    assert loaded.layer_norm_eps == pytest.approx(1e-6)

    resnet = tiny_resnet_config()
    resnet.save_pretrained(resnet_dir)
    loaded = ResNetConfig.from_pretrained(resnet_dir)
    assert type(loaded) is ResNetConfig
    assert list(loaded.hidden_sizes) == [8, 16, 16, 32] and list(loaded.depths) == [1, 1, 1, 1]


def test_derived_properties(tiny_vit_config, tiny_resnet_config):
    vit, resnet = tiny_vit_config(), tiny_resnet_config()
    assert (vit.encoder_type, vit.encoder_hidden_size, vit.encoder_stride, vit.context_grid_size) == (
        "vit",
        192,
        16,
        3,
    )
    assert (resnet.encoder_type, resnet.encoder_hidden_size, resnet.encoder_stride, resnet.context_grid_size) == (
        "resnet",
        32,
        32,
        2,
    )
    assert math.isclose(vit.exemplar_aspect_ratio[0] * vit.exemplar_aspect_ratio[1], 1.0)


def test_default_config_round_trip(tmp_path):
    config = CIMConfig()
    config.save_pretrained(tmp_path)
    loaded = CIMConfig.from_pretrained(tmp_path)
    assert loaded.to_dict() == config.to_dict()
    _check_recipe(loaded)


def test_vit_huge_preset_floors_the_recipe_sizes_to_its_patch():
    config = CIMConfig.from_preset("vit-huge-patch14")
    assert (config.image_size, config.context_size, config.exemplar_size) == (224, 154, 56)  # 16, 11, 4 patches
    assert CIMConfig.from_preset("vit-huge-patch14", context_size=168).context_size == 168
