"""Configuration of the CIM (Correlational Image Modeling) model family.

`CIMConfig` holds the encoder as a stock `transformers` sub-config (`ViTConfig` or `ResNetConfig`) plus
every knob of the crop-and-correlate pretext task, the correlation decoder, the loss and the EMA target.
The defaults are the authors' released ViT-B recipe (224 px search view, 160 px context, 6 exemplars of
64 px, exemplar scale (0.05, 0.48), aspect (1/3, 3), rotation +-45 degrees, photometric exemplar
augmentation, 1-layer 512-wide 16-head decoder, cross-entropy, EMA 0.99 -> 1.0, no contrastive loss).
"""

from __future__ import annotations

import math
from typing import ClassVar

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PreTrainedConfig, ResNetConfig, ViTConfig
from transformers.configuration_utils import SubConfigSpec

IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)
LOSS_TYPES = ("ce", "balanced_ce", "mse", "focal")
TARGET_ENCODER_MODES = ("ema", "shared")
EXEMPLAR_BOX_MODES = ("enclosing", "exact")
ENCODER_INITS = ("xavier", "transformers")
CONTEXT_RESAMPLES = ("bicubic", "bilinear")
POSITION_INTERPOLATIONS = ("authors", "transformers")
ENCODER_TYPES = ("vit", "resnet")

# Encoder presets: (hidden size, layers, heads, MLP size) of the standard ViT family (the authors' T/S/B/L-16, H-14);
# the patch size is the number after "patch" in the name.
VIT_PRESETS: dict[str, tuple[int, int, int, int]] = {
    "vit-tiny-patch16": (192, 12, 3, 768),
    "vit-small-patch16": (384, 12, 6, 1536),
    "vit-base-patch16": (768, 12, 12, 3072),
    "vit-large-patch16": (1024, 24, 16, 4096),
    "vit-huge-patch14": (1280, 32, 16, 5120),
}
PRESET_NAMES: tuple[str, ...] = (*VIT_PRESETS, "resnet-50")


@strict
class CIMConfig(PreTrainedConfig):
    r"""
    Configuration of [`CIMModel`] and [`CIMForPreTraining`].

    Args:
        encoder_config (`dict` or `PreTrainedConfig`, *optional*):
            The encoder: a `ViTConfig` (default, ViT-B/16) or a `ResNetConfig`. Its `image_size` is set to
            `image_size` so that a fine-tuned model starts from the search-view resolution.
        image_size (`int`, defaults to 224): side of the "search" view produced by the data pipeline.
        context_size (`int`, defaults to 160): side m of the context (the search view resized).
        exemplar_size (`int`, defaults to 64): side n of each exemplar.
        num_exemplars (`int`, defaults to 6): exemplars K cut from each search view.
        exemplar_scale (`list[float]`, defaults to `[0.05, 0.48]`): range of exemplar area / view area.
        exemplar_aspect_ratio (`list[float]`, defaults to `[1/3, 3]`): range of h / w, sampled log-uniformly.
        exemplar_max_rotation (`float`, defaults to 45.0): rotation sampled uniformly in +- this many degrees.
        exemplar_box_mode (`str`, defaults to `"enclosing"`): how a sampled box becomes an exemplar.
            "enclosing" (the authors' code): an axis-aligned box is sampled, the view turned by theta, and the
            exemplar is the sampled box's bounding box in the turned view (a rotated rectangle enclosing the
            sample, so larger and squarer). "exact" (the paper's wording): the rotated w x h box itself.
        exemplar_antialias (`bool`, defaults to `True`): antialiased exemplar resampling (each pixel the mean of
            s x s bilinear samples, s the largest downscale the box sizes need, at most 4), like the authors'
            antialiased PIL resize; `False` samples each pixel once (bilinear, aliased when shrinking).
        exemplar_augmentation (`bool`, defaults to `True`): photometric transforms on the exemplars only.
        exemplar_augmentation_ramp (`list[float]`, defaults to `[0.0, 0.0]`): fractions (start, end) of training
            between which the photometric exemplar transforms ramp linearly from off to the recipe's (their
            probabilities and colour-jitter strengths scaled by the ramp's strength, 0 before start, 1 after end).
            `[0, 0]` is the authors' recipe, full from the first step. Set by the Trainer callback every step; a
            model used outside the Trainer applies the full recipe.
        exemplar_color_jitter (`list[float]`): brightness, contrast, saturation, hue strengths.
        exemplar_color_jitter_prob, exemplar_grayscale_prob, exemplar_blur_prob, exemplar_solarize_prob,
        exemplar_hflip_prob (`float`): probabilities of each photometric transform.
        exemplar_blur_sigma (`list[float]`): range of the Gaussian blur sigma, in pixels of the exemplar.
        decoder_hidden_size, decoder_num_attention_heads, decoder_num_layers, decoder_mlp_ratio:
            the correlation decoder (512 / 16 / 1 / 4.0).
        loss_type (`str`): one of "ce", "balanced_ce", "mse", "focal".
        focal_gamma, focal_alpha (`float`): focal-loss parameters (used when `loss_type="focal"`).
        correlation_loss_weight (`float`, defaults to 1.0): weight of the correlation loss.
        contrastive_loss_weight (`float`, defaults to 0.0): weight of the optional MoCo-v3-style global loss
            of the authors' code (off in the paper and in the released recipe).
        contrastive_temperature, projector_hidden_size, projector_output_size: that loss's settings.
        target_encoder_mode (`str`): "ema" (paper) or "shared" (the context is encoded by the online encoder
            too; the Table 2 ablation).
        momentum_start, momentum_end (`float`): EMA momentum, cosine schedule over training (0.99 -> 1.0).
        freeze_patch_embedding (`bool`, defaults to `True`): keep the random ViT patch projection frozen
            (the MoCo v3 trick used by the authors).
        use_sincos_position_embeddings (`bool`, defaults to `True`): fixed 2-D sin-cos position embeddings
            in the ViT encoder (frozen during pre-training).
        image_mean, image_std (`list[float]`): normalisation of `pixel_values`, needed to undo it for the
            photometric exemplar transforms and for visualisation.
        initializer_range (`float`, defaults to 0.02): std of the decoder's weight initialisation.
        encoder_init (`str`, defaults to `"xavier"`): "xavier" (the authors' code): every Linear of the ViT
            encoders xavier-uniform with zero bias, the frozen patch projection xavier-uniform as a linear
            layer (fan-in 3 * patch**2), CLS token normal(0.02). "transformers": the stock ViT init
            (truncated normal 0.02). ResNet encoders always keep the stock init.
        decoder_prior_bias (`bool`, defaults to `False`): add a learnable per-pixel bias (m x m) to the decoder's
            logits, initialised to the logits of the constant prior (the mean true map under this config's box
            distribution), so that training starts at the best exemplar-blind prediction and spends its steps on where
            this exemplar differs from where exemplars usually are. `False` is the authors' decoder (one scalar bias).
        decoder_predictor_lr_scale (`float`, defaults to 2.0): learning-rate multiplier (and 1 / it on the weight
            decay) of the decoder's 1x1 predictor under `CIMTrainer`. The authors' predictor has two logits whose
            difference is ours; under Adam each of the two moves by the learning rate, so their difference moves twice
            as far per step as our single logit would: 2.0 reproduces their training step exactly, 1.0 is one learning
            rate for every parameter.
        decoder_shared_norm (`bool`, defaults to `True`): one LayerNorm for the context queries and the exemplar
            tokens of a decoder layer (the authors' `norm1`); `False` gives each side its own.
        decoder_align_corners (`bool`, defaults to `True`): `align_corners` of the bilinear upsampling of the
            logit map to the context size (the authors' code uses `True`).
        context_resample (`str`, defaults to `"bicubic"`): how the search view is resized to the context,
            "bicubic" (authors) or "bilinear"; both antialiased.
        position_interpolation (`str`, defaults to `"authors"`): how the ViT encoders resize their position table
            for the smaller context and exemplar inputs. "authors": bicubic with `scale_factor=(g + 0.1) / N` (the
            DINO form their code uses); "transformers": the stock ViT's bicubic to `size=(g, g)`. The two differ
            slightly in where they sample the table; an exported encoder, used at its own size, is unaffected.
    """

    model_type = "cim"
    sub_configs_defaults: ClassVar[dict[str, SubConfigSpec]] = {
        # default encoder: the ViT-B/16 preset (LayerNorm eps 1e-6 like the authors' ViT, not ViTConfig's 1e-12)
        "encoder_config": SubConfigSpec(
            config_class=AutoConfig, model_type="vit", init_kwargs={"layer_norm_eps": 1e-6, "qkv_bias": True}
        ),
    }

    encoder_config: dict | PreTrainedConfig | None = None
    image_size: int = 224
    context_size: int = 160
    exemplar_size: int = 64
    num_exemplars: int = 6
    exemplar_scale: list[float] | tuple[float, float] = (0.05, 0.48)
    exemplar_aspect_ratio: list[float] | tuple[float, float] = (1.0 / 3.0, 3.0)
    exemplar_max_rotation: float | int = 45.0
    exemplar_box_mode: str = "enclosing"
    exemplar_antialias: bool = True
    exemplar_augmentation: bool = True
    exemplar_augmentation_ramp: list[float] | tuple[float, float] = (0.0, 0.0)
    exemplar_color_jitter: list[float] | tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)
    exemplar_color_jitter_prob: float = 0.8
    exemplar_grayscale_prob: float = 0.2
    exemplar_blur_prob: float = 0.5
    exemplar_blur_sigma: list[float] | tuple[float, float] = (0.1, 2.0)
    exemplar_solarize_prob: float = 0.2
    exemplar_hflip_prob: float = 0.5
    decoder_hidden_size: int = 512
    decoder_num_attention_heads: int = 16
    decoder_num_layers: int = 1
    decoder_mlp_ratio: float | int = 4.0
    loss_type: str = "ce"
    focal_gamma: float | int = 2.0
    focal_alpha: float = 0.25
    correlation_loss_weight: float | int = 1.0
    contrastive_loss_weight: float | int = 0.0
    contrastive_temperature: float = 0.2
    projector_hidden_size: int = 4096
    projector_output_size: int = 256
    target_encoder_mode: str = "ema"
    momentum_start: float = 0.99
    momentum_end: float = 1.0
    freeze_patch_embedding: bool = True
    use_sincos_position_embeddings: bool = True
    image_mean: list[float] | tuple[float, float, float] = IMAGENET_DEFAULT_MEAN
    image_std: list[float] | tuple[float, float, float] = IMAGENET_DEFAULT_STD
    initializer_range: float = 0.02
    encoder_init: str = "xavier"
    decoder_prior_bias: bool = False
    decoder_predictor_lr_scale: float | int = 2.0
    decoder_shared_norm: bool = True
    decoder_align_corners: bool = True
    context_resample: str = "bicubic"
    position_interpolation: str = "authors"

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        for name in (
            "exemplar_scale",
            "exemplar_aspect_ratio",
            "exemplar_color_jitter",
            "exemplar_blur_sigma",
            "exemplar_augmentation_ramp",
            "image_mean",
            "image_std",
        ):
            setattr(self, name, [float(v) for v in getattr(self, name)])
        if getattr(self.encoder_config, "model_type", None) == "vit":
            self.encoder_config.image_size = self.image_size
        check_cim_config(self)

    @property
    def encoder_type(self) -> str:
        """ "vit" or "resnet"."""
        return self.encoder_config.model_type

    @property
    def encoder_hidden_size(self) -> int:
        """Width of the encoder's output tokens."""
        if self.encoder_type == "resnet":
            return self.encoder_config.hidden_sizes[-1]
        return self.encoder_config.hidden_size

    @property
    def encoder_stride(self) -> int:
        """Pixels per output token along one side (ViT patch size, 32 for ResNet)."""
        if self.encoder_type == "resnet":
            return 32
        return int(self.encoder_config.patch_size)

    @property
    def context_grid_size(self) -> int:
        return self.context_size // self.encoder_stride

    @classmethod
    def from_preset(cls, name: str, **kwargs) -> CIMConfig:
        """Builds a config from a named preset (see `PRESET_NAMES`); `kwargs` override CIM fields.

        With a patch size that does not divide the recipe's 160 px context and 64 px exemplars (ViT-H/14), those
        default to the largest multiples of the patch below them (154 and 56 px: the 11 x 11 and 4 x 4 patches that
        the authors' code, which floors, gets from 160 and 64 px at patch 14)."""
        encoder_config = preset_encoder_config(name)
        if name in VIT_PRESETS:
            patch = encoder_config.patch_size
            for field_name in ("context_size", "exemplar_size"):
                recipe = cls.__dataclass_fields__[field_name].default
                if field_name not in kwargs and recipe % patch:
                    kwargs[field_name] = recipe - recipe % patch
        return cls(encoder_config=encoder_config, **kwargs)


def preset_encoder_config(name: str) -> PreTrainedConfig:
    """The encoder config of a named preset: ViT-T/S/B/L with patch 16, ViT-H with patch 14, or ResNet-50."""
    if name == "resnet-50":
        return ResNetConfig(
            depths=[3, 4, 6, 3], hidden_sizes=[256, 512, 1024, 2048], layer_type="bottleneck", embedding_size=64
        )
    if name not in VIT_PRESETS:
        raise ValueError(f"Unknown CIM preset {name!r}. Choose one of: {', '.join(PRESET_NAMES)}.")
    hidden, layers, heads, mlp = VIT_PRESETS[name]
    return ViTConfig(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=mlp,
        patch_size=vit_preset_patch_size(name),
        layer_norm_eps=1e-6,
        qkv_bias=True,
    )


def vit_preset_patch_size(name: str) -> int:
    """The patch size of a ViT preset, read from its name (``vit-huge-patch14`` -> 14)."""
    return int(name.rsplit("patch", 1)[1])


def _check_range(name: str, pair: list[float], low: float, high: float, low_open: bool = True) -> None:
    if len(pair) != 2:
        raise ValueError(f"`{name}` must be a pair (min, max), got {pair}.")
    lo, hi = pair
    below = lo <= low if low_open else lo < low
    if below or hi > high or lo > hi:
        bracket = "(" if low_open else "["
        raise ValueError(
            f"`{name}`={pair} must satisfy {low} {'<' if low_open else '<='} min <= max <= {high} "
            f"(a range inside {bracket}{low}, {high}])."
        )


def _check_probability(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"`{name}`={value} is a probability and must lie in [0, 1].")


def check_cim_config(config: CIMConfig) -> None:
    """Raises a `ValueError` naming the first invalid setting and why it is invalid."""
    if config.encoder_type not in ENCODER_TYPES:
        raise ValueError(f"`encoder_config` has model_type {config.encoder_type!r}; CIM supports {ENCODER_TYPES}.")
    for name in (
        "image_size",
        "context_size",
        "exemplar_size",
        "num_exemplars",
        "decoder_hidden_size",
        "decoder_num_attention_heads",
        "decoder_num_layers",
    ):
        if getattr(config, name) < 1:
            raise ValueError(f"`{name}` must be a positive integer, got {getattr(config, name)}.")
    if config.exemplar_size > config.context_size:
        raise ValueError(
            f"`exemplar_size`={config.exemplar_size} is larger than `context_size`="
            f"{config.context_size}: exemplars are parts of the context, so use exemplar_size <= context_size."
        )
    if config.context_size > config.image_size:
        raise ValueError(
            f"`context_size`={config.context_size} is larger than `image_size`={config.image_size}: "
            "the context is the search view resized down."
        )
    stride = config.encoder_stride
    for name in ("context_size", "exemplar_size"):
        if getattr(config, name) % stride:
            what = "patch_size" if config.encoder_type == "vit" else "the ResNet output stride"
            raise ValueError(
                f"`{name}`={getattr(config, name)} is not divisible by {what} ({stride}); pick a multiple of {stride}."
            )
    if config.encoder_type == "vit" and config.image_size % stride:
        raise ValueError(f"`image_size`={config.image_size} is not divisible by patch_size ({stride}).")
    _check_range("exemplar_scale", config.exemplar_scale, 0.0, 1.0)
    _check_range("exemplar_aspect_ratio", config.exemplar_aspect_ratio, 0.0, math.inf)
    if not 0.0 <= config.exemplar_max_rotation <= 90.0:
        raise ValueError(f"`exemplar_max_rotation`={config.exemplar_max_rotation} must be in [0, 90] degrees.")
    for name in (
        "exemplar_color_jitter_prob",
        "exemplar_grayscale_prob",
        "exemplar_blur_prob",
        "exemplar_solarize_prob",
        "exemplar_hflip_prob",
    ):
        _check_probability(name, getattr(config, name))
    if len(config.exemplar_color_jitter) != 4 or min(config.exemplar_color_jitter) < 0:
        raise ValueError(
            "`exemplar_color_jitter` must be 4 non-negative strengths (brightness, contrast, "
            f"saturation, hue), got {config.exemplar_color_jitter}."
        )
    if config.exemplar_color_jitter[3] > 0.5:
        raise ValueError(f"`exemplar_color_jitter` hue strength {config.exemplar_color_jitter[3]} must be <= 0.5.")
    _check_range("exemplar_blur_sigma", config.exemplar_blur_sigma, 0.0, 10.0)
    ramp = config.exemplar_augmentation_ramp
    if len(ramp) != 2 or not 0.0 <= ramp[0] <= ramp[1] <= 1.0:
        raise ValueError(
            f"`exemplar_augmentation_ramp`={ramp} must be fractions of training (start, end) with "
            "0 <= start <= end <= 1 ([0, 0]: the full augmentation from the first step)."
        )
    if config.decoder_hidden_size % config.decoder_num_attention_heads:
        raise ValueError(
            f"`decoder_hidden_size`={config.decoder_hidden_size} is not divisible by "
            f"`decoder_num_attention_heads`={config.decoder_num_attention_heads}."
        )
    if config.decoder_predictor_lr_scale <= 0:
        raise ValueError(
            f"`decoder_predictor_lr_scale`={config.decoder_predictor_lr_scale} must be positive "
            "(2.0: the authors' step)."
        )
    if config.loss_type not in LOSS_TYPES:
        raise ValueError(f"Unknown `loss_type`={config.loss_type!r}; choose one of {LOSS_TYPES}.")
    if config.exemplar_box_mode not in EXEMPLAR_BOX_MODES:
        raise ValueError(
            f"Unknown `exemplar_box_mode`={config.exemplar_box_mode!r}; choose one of {EXEMPLAR_BOX_MODES}."
        )
    if config.encoder_init not in ENCODER_INITS:
        raise ValueError(f"Unknown `encoder_init`={config.encoder_init!r}; choose one of {ENCODER_INITS}.")
    if config.context_resample not in CONTEXT_RESAMPLES:
        raise ValueError(f"Unknown `context_resample`={config.context_resample!r}; choose one of {CONTEXT_RESAMPLES}.")
    if config.position_interpolation not in POSITION_INTERPOLATIONS:
        raise ValueError(
            f"Unknown `position_interpolation`={config.position_interpolation!r}; choose one of "
            f"{POSITION_INTERPOLATIONS}."
        )
    if config.encoder_type == "vit":
        hidden, heads = config.encoder_config.hidden_size, config.encoder_config.num_attention_heads
        if hidden % heads:
            raise ValueError(
                f"The encoder's `hidden_size`={hidden} is not divisible by its "
                f"`num_attention_heads`={heads}; pick a width that the heads divide."
            )
    if config.target_encoder_mode not in TARGET_ENCODER_MODES:
        raise ValueError(
            f"Unknown `target_encoder_mode`={config.target_encoder_mode!r}; choose one of {TARGET_ENCODER_MODES}."
        )
    if not 0.0 <= config.momentum_start <= config.momentum_end <= 1.0:
        raise ValueError(
            f"EMA momentum must satisfy 0 <= momentum_start ({config.momentum_start}) <= "
            f"momentum_end ({config.momentum_end}) <= 1."
        )
    if config.correlation_loss_weight < 0 or config.contrastive_loss_weight < 0:
        raise ValueError("Loss weights must be non-negative.")
    if config.correlation_loss_weight == 0 and config.contrastive_loss_weight == 0:
        raise ValueError("Both `correlation_loss_weight` and `contrastive_loss_weight` are 0: nothing to train.")
    if len(config.image_mean) != 3 or len(config.image_std) != 3 or min(config.image_std) <= 0:
        raise ValueError("`image_mean` and `image_std` must have 3 values each, with positive std.")


__all__ = ["CIMConfig", "PRESET_NAMES", "preset_encoder_config"]
