"""PyTorch CIM models: the online encoder (`CIMModel`) and the pre-training model (`CIMForPreTraining`).

`CIMForPreTraining` owns an online encoder (a stock `ViTModel` under `vit`, or `ResNetModel` under
`resnet`), an EMA copy of it (`target_encoder`), and the lightweight cross-attention correlation decoder.
Its `forward` runs the whole pretext step on the input's device: sample exemplars and true maps
(`pretext.sample_pretext`), encode the context with the target and all B*K exemplars with the online
encoder in one batch, decode one correlation logit per context pixel, and compute the loss.
"""

from __future__ import annotations

import math
import types
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedModel, ResNetModel, ViTModel
from transformers import initialization as init
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.vit.modeling_vit import eager_attention_forward
from transformers.utils import ModelOutput

from .configuration_cim import CIMConfig
from .pretext import resize_context, sample_pretext
from .prior import correlation_prior, prior_logits
from .resnet_checkpointing import make_stages_checkpointable


@dataclass
class CIMModelOutput(ModelOutput):
    """Output of [`CIMModel`].

    Args:
        last_hidden_state (`torch.FloatTensor`): ViT tokens (batch, 1 + patches, hidden) or ResNet feature
            map (batch, channels, h, w).
        pooler_output (`torch.FloatTensor`): the image feature (batch, hidden): the CLS token for ViT, the
            global average for ResNet.
        hidden_states (`tuple(torch.FloatTensor)`, *optional*): per-layer hidden states when requested.
    """

    last_hidden_state: torch.FloatTensor | None = None
    pooler_output: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class CIMForPreTrainingOutput(ModelOutput):
    """Output of [`CIMForPreTraining`].

    Args:
        loss (`torch.FloatTensor` of shape `()`): total loss (weighted correlation + contrastive).
        logits (`torch.FloatTensor` of shape `(batch, K, context_size, context_size)`): one correlation
            logit per context pixel; `sigmoid(logits)` is the probability that the pixel is in the exemplar.
        correlation_labels (`torch.FloatTensor`, same shape): the true maps as 0/1 floats.
        exemplar_pixel_values (`torch.FloatTensor` of shape `(batch, K, 3, n, n)`): the exemplars used.
        context_pixel_values (`torch.FloatTensor` of shape `(batch, 3, m, m)`): the context used.
        exemplar_boxes (`torch.FloatTensor` of shape `(batch, K, 5)`, *optional*): (cx, cy, w, h, theta) of
            each exemplar in fractions of the search view (None when the caller passed exemplars).
        correlation_loss, contrastive_loss (`torch.FloatTensor`, *optional*): the loss terms.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    correlation_labels: torch.FloatTensor | None = None
    exemplar_pixel_values: torch.FloatTensor | None = None
    context_pixel_values: torch.FloatTensor | None = None
    exemplar_boxes: torch.FloatTensor | None = None
    correlation_loss: torch.FloatTensor | None = None
    contrastive_loss: torch.FloatTensor | None = None


def sincos_position_embedding_2d(grid_size: int, dim: int, with_cls: bool = False) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embedding (grid_size**2 [+1], dim); half the channels encode the row,
    half the column; the CLS row (first, when requested) is zero."""
    if dim % 4:
        raise ValueError(f"2-D sin-cos position embeddings need a width divisible by 4, got {dim}.")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4.0))
    coords = torch.arange(grid_size, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")
    out_rows = rows.reshape(-1, 1) * omega.view(1, -1)
    out_cols = cols.reshape(-1, 1) * omega.view(1, -1)
    emb = torch.cat([out_cols.sin(), out_cols.cos(), out_rows.sin(), out_rows.cos()], dim=1)
    if with_cls:
        emb = torch.cat([torch.zeros(1, dim, dtype=emb.dtype), emb], dim=0)
    return emb.float()


def build_encoder(config: CIMConfig) -> nn.Module:
    """A stock transformers encoder from `config.encoder_config`."""
    if config.encoder_type == "resnet":
        # a ResNet has no attention: an implementation asked of the CIM model is the decoder's alone
        config.encoder_config._attn_implementation_internal = None
        return ResNetModel(config.encoder_config)
    encoder = ViTModel(config.encoder_config, add_pooling_layer=False)
    use_position_interpolation(encoder, config.position_interpolation)
    return encoder


def interpolate_positions_like_authors(
    embeddings: nn.Module, tokens: torch.Tensor, height: int, width: int
) -> torch.Tensor:
    """The position table of a ``ViTEmbeddings`` for a ``height`` x ``width`` input, resized as the CIM authors'
    code (and DINO's) does: bicubic with ``scale_factor=(g + 0.1) / N`` for a g-patch side and an N x N table, where
    the stock ViT resizes to ``size=(g, g)``; the two sample the table at slightly different points."""
    table = embeddings.position_embeddings
    num_positions = table.shape[1] - 1
    if tokens.shape[1] - 1 == num_positions and height == width:
        return table
    side = math.isqrt(num_positions)
    dim = table.shape[-1]
    rows, cols = height // embeddings.patch_size, width // embeddings.patch_size
    grid = table[:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2)
    grid = F.interpolate(
        grid, scale_factor=((rows + 0.1) / side, (cols + 0.1) / side), mode="bicubic", align_corners=False
    )
    return torch.cat((table[:, :1], grid.permute(0, 2, 3, 1).reshape(1, rows * cols, dim)), dim=1)


def use_position_interpolation(encoder: nn.Module, mode: str) -> None:
    """Makes a ViT encoder resize its position table the ``mode`` way ("authors" or the stock "transformers");
    the encoder stays a stock ``ViTModel`` (the method is bound on this instance only)."""
    if not isinstance(encoder, ViTModel):
        return
    embeddings = encoder.embeddings
    if mode == "authors":
        embeddings.interpolate_pos_encoding = types.MethodType(interpolate_positions_like_authors, embeddings)
    elif "interpolate_pos_encoding" in vars(embeddings):
        del embeddings.interpolate_pos_encoding


def encoder_attribute(config: CIMConfig) -> str:
    """Attribute (and checkpoint prefix) of the online encoder: the stock base_model_prefix of the family."""
    return "resnet" if config.encoder_type == "resnet" else "vit"


def encode_tokens(encoder: nn.Module, pixel_values: torch.Tensor, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """Runs a ViT or ResNet encoder; returns (tokens (N, L, D), global feature (N, D)). ViT tokens keep CLS."""
    if isinstance(encoder, ResNetModel):
        feature_map = encoder(pixel_values, return_dict=True).last_hidden_state  # (N, C, h, w)
        tokens = feature_map.flatten(2).transpose(1, 2)
        return tokens, tokens.mean(1)
    tokens = encoder(pixel_values, interpolate_pos_encoding=True, **kwargs).last_hidden_state
    return tokens, tokens[:, 0]


@torch.no_grad()
def init_vit_like_authors(encoder: ViTModel) -> None:
    """The authors' ViT init: Linear xavier-uniform / zero bias, LayerNorm 1 / 0, the patch projection
    xavier-uniform as a Linear of fan-in 3 * patch**2 with zero bias, CLS token normal(0.02). Weights already
    loaded from a checkpoint are left alone (transformers' init functions skip them). The authors' query, key
    and value projections are one fused (3D x D) Linear, so each of ours gets that matrix's xavier bound."""
    for name, module in encoder.named_modules():
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj"):
            width = module.weight.shape[1]
            bound = math.sqrt(6.0 / (width + 3 * module.weight.shape[0]))
            init.uniform_(module.weight, -bound, bound)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            init.xavier_uniform_(module.weight)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
    projection = encoder.embeddings.patch_embeddings.projection
    fan_out, fan_in = projection.weight.shape[0], projection.weight[0].numel()
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    init.uniform_(projection.weight, -bound, bound)
    if projection.bias is not None:
        init.zeros_(projection.bias)
    init.normal_(encoder.embeddings.cls_token, std=0.02)


class CIMCrossAttention(nn.Module):
    """Multi-head attention with queries from the context and keys/values from the exemplar, run by the
    attention backend the config names (`eager`, `sdpa`, `flash_attention_2`, `flex_attention`, ...)."""

    is_causal = False  # read by the flash-attention backends

    def __init__(self, config: CIMConfig):
        super().__init__()
        hidden_size = config.decoder_hidden_size
        self.config = config
        self.num_heads = config.decoder_num_attention_heads
        self.head_dim = hidden_size // self.num_heads
        self.scaling = self.head_dim**-0.5
        self.q_proj = nn.Linear(hidden_size, hidden_size)
        self.k_proj = nn.Linear(hidden_size, hidden_size)
        self.v_proj = nn.Linear(hidden_size, hidden_size)
        self.o_proj = nn.Linear(hidden_size, hidden_size)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], x.shape[1], self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, query_states: torch.Tensor, keys_values: torch.Tensor) -> torch.Tensor:
        """`query_states`: the queries already projected by `q_proj` (the decoder may share them across exemplars)."""
        q, k, v = (
            self._heads(query_states),
            self._heads(self.k_proj(keys_values)),
            self._heads(self.v_proj(keys_values)),
        )
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        out, _ = attention(self, q, k, v, None, scaling=self.scaling, dropout=0.0)  # (N, L, heads, head_dim)
        return self.o_proj(out.reshape(query_states.shape))


class CIMDecoderLayer(nn.Module):
    """Pre-norm cross-attention block: x = q + CA(LN(q), LN(z)); x = x + MLP(LN(x))  (paper Eq. 4-5)."""

    def __init__(self, config: CIMConfig):
        super().__init__()
        width = config.decoder_hidden_size
        self.query_norm = nn.LayerNorm(width, eps=1e-6)
        # the authors normalise both sides with one LayerNorm (their `norm1`)
        self.key_value_norm = None if config.decoder_shared_norm else nn.LayerNorm(width, eps=1e-6)
        self.cross_attention = CIMCrossAttention(config)
        self.mlp_norm = nn.LayerNorm(width, eps=1e-6)
        hidden = int(width * config.decoder_mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(self, queries: torch.Tensor, exemplar: torch.Tensor, num_exemplars: int = 1) -> torch.Tensor:
        """queries (N, Lc, D), exemplar (N * num_exemplars, Le, D). With num_exemplars > 1 the queries are one
        image's, shared by its exemplars: their norm and projection run once per image, then are broadcast."""
        key_value_norm = self.key_value_norm or self.query_norm
        query_states = self.cross_attention.q_proj(self.query_norm(queries))
        if num_exemplars > 1:
            query_states = query_states.repeat_interleave(num_exemplars, dim=0)  # image-major, like the exemplars
            queries = queries.repeat_interleave(num_exemplars, dim=0)
        x = queries + self.cross_attention(query_states, key_value_norm(exemplar))
        return x + self.mlp(self.mlp_norm(x))


PRIOR_BIAS_SEED = 0  # the box sample that `decoder_prior_bias` starts from


class CIMCorrelationDecoder(nn.Module):
    """Predicts a correlation logit map on the context grid from context and exemplar tokens (Eq. 4-6)."""

    def __init__(self, config: CIMConfig):
        super().__init__()
        self.config = config
        self.has_cls = config.encoder_type == "vit"
        self.input_proj = nn.Linear(config.encoder_hidden_size, config.decoder_hidden_size)
        self.layers = nn.ModuleList([CIMDecoderLayer(config) for _ in range(config.decoder_num_layers)])
        self.norm = nn.LayerNorm(config.decoder_hidden_size, eps=1e-6)
        self.predictor = nn.Conv2d(config.decoder_hidden_size, 1, kernel_size=1)
        if config.decoder_prior_bias:  # initialised to the prior's logits by `reset_prior_bias`
            self.prior_bias = nn.Parameter(torch.zeros(config.context_size, config.context_size))
        self._position_cache: dict[tuple, torch.Tensor] = {}

    @torch.no_grad()
    def reset_prior_bias(self) -> None:
        """Sets the per-pixel bias to the logits of the constant prior of the config's box distribution (a fixed
        seed: the same start for every model of one config)."""
        prior = correlation_prior(self.config, generator=torch.Generator().manual_seed(PRIOR_BIAS_SEED))
        self.prior_bias.copy_(prior_logits(prior))

    def context_position_embedding(self, grid: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        key = (grid, device, dtype)
        # under torch.compile the table is a constant of the graph; a cache filled on the first call would change the
        # module's state between steps and force a recompilation
        if torch.compiler.is_compiling() or key not in self._position_cache:
            emb = sincos_position_embedding_2d(grid, self.config.decoder_hidden_size, with_cls=self.has_cls)
            emb = emb.to(device=device, dtype=dtype).unsqueeze(0)
            if torch.compiler.is_compiling():
                return emb
            self._position_cache[key] = emb
        return self._position_cache[key]

    def forward(self, context_tokens: torch.Tensor, exemplar_tokens: torch.Tensor) -> torch.Tensor:
        """context_tokens (B, Lc, E), exemplar_tokens (B, K, Le, E) -> logits (B, K, m, m)."""
        batch, num_exemplars = exemplar_tokens.shape[:2]
        grid = int(math.isqrt(context_tokens.shape[1] - int(self.has_cls)))
        queries = self.input_proj(context_tokens)
        queries = queries + self.context_position_embedding(grid, queries.device, queries.dtype)  # (B, Lc, D)
        exemplar = self.input_proj(exemplar_tokens.flatten(0, 1))  # (B*K, Le, D)
        for index, layer in enumerate(self.layers):  # the first layer broadcasts the queries to (B*K, Lc, D)
            queries = layer(queries, exemplar, num_exemplars if index == 0 else 1)
        queries = self.norm(queries)[:, int(self.has_cls) :]
        # contiguous: on CPU the 1x1 conv of the channels-last view rounds differently depending on the weight's
        # memory alignment, so a reloaded (mmap'd) checkpoint would not reproduce the logits bit for bit
        feature_map = queries.transpose(1, 2).reshape(batch * num_exemplars, -1, grid, grid).contiguous()
        logits = self.predictor(feature_map)
        size = self.config.context_size
        logits = F.interpolate(
            logits, size=(size, size), mode="bilinear", align_corners=self.config.decoder_align_corners
        )
        logits = logits.view(batch, num_exemplars, size, size)
        if self.config.decoder_prior_bias:
            logits = logits + self.prior_bias.to(logits.dtype)
        return logits


class CIMProjectionHead(nn.Module):
    """MLP with BatchNorm between layers (MoCo v3 projector / predictor); last BN has no affine."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int):
        super().__init__()
        layers: list[nn.Module] = []
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        for i in range(num_layers):
            last = i == num_layers - 1
            layers.append(nn.Linear(dims[i], dims[i + 1], bias=False))
            layers.append(nn.BatchNorm1d(dims[i + 1], affine=not last))
            if not last:
                layers.append(nn.ReLU(inplace=True))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def correlation_loss(logits: torch.Tensor, labels: torch.Tensor, config: CIMConfig) -> torch.Tensor:
    """Per-pixel loss between predicted logits and true maps (B, K, m, m): mean over images and pixels,
    summed over the K exemplars (as the authors' code). "ce" is two-class softmax cross-entropy, written
    as the equivalent binary cross-entropy on one logit."""
    logits, labels = logits.float(), labels.float()
    if config.loss_type == "ce":
        per_pixel = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
    elif config.loss_type == "balanced_ce":
        positive_fraction = labels.mean(dim=(-2, -1), keepdim=True).clamp(1e-6, 1 - 1e-6)
        weights = torch.where(labels > 0.5, 0.5 / positive_fraction, 0.5 / (1 - positive_fraction))
        per_pixel = weights * F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
    elif config.loss_type == "mse":
        per_pixel = (logits.sigmoid() - labels) ** 2
    else:  # focal
        probs = logits.sigmoid()
        ce = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
        p_true = torch.where(labels > 0.5, probs, 1 - probs)
        alpha = torch.where(labels > 0.5, config.focal_alpha, 1 - config.focal_alpha)
        per_pixel = alpha * (1 - p_true) ** config.focal_gamma * ce
    return per_pixel.mean(dim=(0, 2, 3)).sum()


def _gather_across_processes(x: torch.Tensor) -> torch.Tensor:
    """All-gathers a no-grad tensor when torch.distributed is running (the targets of the contrastive loss)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return x
    world = torch.distributed.get_world_size()
    if world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world)]
    torch.distributed.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


def contrastive_loss(
    online: torch.Tensor, target: torch.Tensor, temperature: float, num_exemplars: int
) -> torch.Tensor:
    """InfoNCE between each exemplar's predicted feature (B*K, d) and the targets of all contexts (B, d),
    the positive being its own image (scaled by 2T as MoCo v3)."""
    online = F.normalize(online.float(), dim=1)
    target = F.normalize(_gather_across_processes(target.float()), dim=1)
    rank = (
        torch.distributed.get_rank() if torch.distributed.is_available() and torch.distributed.is_initialized() else 0
    )
    batch = online.shape[0] // num_exemplars
    labels = torch.arange(batch, device=online.device).repeat_interleave(num_exemplars) + rank * batch
    return F.cross_entropy(online @ target.t() / temperature, labels) * (2 * temperature)


AUTO_MAP = {
    "AutoConfig": "configuration_cim.CIMConfig",
    "AutoModel": "modeling_cim.CIMModel",
    "AutoModelForPreTraining": "modeling_cim.CIMForPreTraining",
}


class CIMPreTrainedModel(PreTrainedModel):
    """Weight initialisation and the shared class attributes of the CIM models."""

    config_class = CIMConfig
    config: CIMConfig
    base_model_prefix = "vit"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _no_split_modules = ["ViTEmbeddings", "ViTLayer", "ResNetEmbeddings", "ResNetStage", "CIMDecoderLayer"]

    @property
    def encoder(self) -> nn.Module:
        """The online encoder (a stock `ViTModel` or `ResNetModel`)."""
        return getattr(self, encoder_attribute(self.config))

    def _set_gradient_checkpointing(
        self, enable: bool = True, gradient_checkpointing_func=checkpoint, every_n_layers: int = 1
    ):
        """As `PreTrainedModel`'s; a ResNet encoder (transformers' has no checkpointing) first gets checkpointable
        stages (see `resnet_checkpointing`), so the class's `supports_gradient_checkpointing` holds for both
        families."""
        if isinstance(self.encoder, ResNetModel):
            make_stages_checkpointable(self.encoder)
        super()._set_gradient_checkpointing(enable, gradient_checkpointing_func, every_n_layers)

    def set_attn_implementation(self, attn_implementation: str | dict, *args, **kwargs):
        """As `PreTrainedModel`'s; with a ResNet encoder (no attention) a single implementation is the decoder's,
        so `_supports_sdpa` / `_supports_flex_attn` hold for both encoder families."""
        if self.config.encoder_type == "resnet" and isinstance(attn_implementation, str):
            attn_implementation = {"": attn_implementation}
        return super().set_attn_implementation(attn_implementation, *args, **kwargs)

    def get_input_embeddings(self) -> nn.Module:
        if isinstance(self.encoder, ViTModel):
            return self.encoder.embeddings.patch_embeddings
        return self.encoder.embedder

    def save_pretrained(self, save_directory, *args, **kwargs):
        """As `PreTrainedModel.save_pretrained`, with `auto_map` entries for every CIM class so that the
        checkpoint loads with `trust_remote_code=True` where this package is not installed."""
        self.config.auto_map = dict(AUTO_MAP)
        return super().save_pretrained(save_directory, *args, **kwargs)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            init.xavier_uniform_(module.weight)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Conv2d):
            init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
            if module.bias is not None:
                init.zeros_(module.bias)
        else:
            super()._init_weights(module)

    @torch.no_grad()
    def initialize_weights(self):
        """The stock recursive init, then the authors' init of the ViT encoders when `encoder_init="xavier"`
        (transformers dispatches a nested `ViTModel` to its own `_init_weights`, which `_init_weights` here
        never reaches)."""
        super().initialize_weights()
        for module in self.modules():
            if isinstance(module, CIMCorrelationDecoder) and module.config.decoder_prior_bias:
                module.reset_prior_bias()
        if self.config.encoder_init == "xavier":
            for module in self.children():
                if isinstance(module, ViTModel):
                    init_vit_like_authors(module)

    def _set_fixed_vit_embeddings(self, encoder: nn.Module) -> None:
        """Writes 2-D sin-cos position embeddings into a ViT encoder and freezes what the config freezes."""
        if not isinstance(encoder, ViTModel):
            return
        embeddings = encoder.embeddings
        if self.config.use_sincos_position_embeddings and embeddings.position_embeddings.device.type != "meta":
            grid = int(math.isqrt(embeddings.position_embeddings.shape[1] - 1))
            emb = sincos_position_embedding_2d(grid, embeddings.position_embeddings.shape[-1], with_cls=True)
            with torch.no_grad():
                embeddings.position_embeddings.copy_(emb.unsqueeze(0))
        self._apply_freezing(encoder)

    def _apply_freezing(self, encoder: nn.Module) -> None:
        if not isinstance(encoder, ViTModel):
            return
        if self.config.use_sincos_position_embeddings:
            encoder.embeddings.position_embeddings.requires_grad_(False)
        if self.config.freeze_patch_embedding:
            encoder.embeddings.patch_embeddings.projection.requires_grad_(False)


class CIMModel(CIMPreTrainedModel):
    """The CIM online encoder alone, for features (what `AutoModel` returns for a CIM checkpoint)."""

    # a pre-training checkpoint also holds the target encoder, decoder and heads: not needed for features
    _keys_to_ignore_on_load_unexpected = [r"^target_", r"^decoder\.", r"^projector\.", r"^predictor\."]

    def __init__(self, config: CIMConfig):
        super().__init__(config)
        self.base_model_prefix = encoder_attribute(config)
        setattr(self, encoder_attribute(config), build_encoder(config))
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor,
        interpolate_pos_encoding: bool | None = True,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> CIMModelOutput:
        if isinstance(self.encoder, ResNetModel):
            out = self.encoder(pixel_values, output_hidden_states=output_hidden_states, return_dict=True)
            pooled = out.pooler_output.flatten(1)
        else:
            out = self.encoder(
                pixel_values,
                interpolate_pos_encoding=interpolate_pos_encoding,
                output_hidden_states=output_hidden_states,
                **kwargs,
            )
            pooled = out.last_hidden_state[:, 0]
        output = CIMModelOutput(
            last_hidden_state=out.last_hidden_state, pooler_output=pooled, hidden_states=out.hidden_states
        )
        return output if return_dict is not False else output.to_tuple()


class CIMForPreTraining(CIMPreTrainedModel):
    """CIM pre-training: online encoder on exemplars, EMA target encoder on the context, correlation decoder."""

    def __init__(self, config: CIMConfig):
        super().__init__(config)
        self.base_model_prefix = encoder_attribute(config)
        setattr(self, encoder_attribute(config), build_encoder(config))
        self.uses_target_encoder = config.target_encoder_mode == "ema"
        if self.uses_target_encoder:
            self.target_encoder = build_encoder(config)
        self.decoder = CIMCorrelationDecoder(config)
        if config.contrastive_loss_weight > 0:
            width = config.encoder_hidden_size
            self.projector = CIMProjectionHead(width, config.projector_hidden_size, config.projector_output_size, 3)
            self.predictor = CIMProjectionHead(
                config.projector_output_size, config.projector_hidden_size, config.projector_output_size, 2
            )
            if self.uses_target_encoder:
                self.target_projector = CIMProjectionHead(
                    width, config.projector_hidden_size, config.projector_output_size, 3
                )
        self.reset_augmentation_strength()
        self.post_init()
        self._set_fixed_vit_embeddings(self.encoder)
        self._apply_freezing(self.encoder)
        self.reset_target()

    def reset_augmentation_strength(self) -> None:
        """(Re)creates the exemplar photometric augmentation's strength at 1 (the recipe's), beside the weights.

        The Trainer's ramp callback sets it every step; a tensor buffer, so that a compiled forward reads a new value
        without recompiling. It is not saved: a model that was built on the meta device gets it from here."""
        params = list(self.parameters())
        device = params[0].device if params and not params[0].is_meta else None
        self.register_buffer("augmentation_strength", torch.ones((), device=device), persistent=False)

    def _target_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        pairs = []
        if self.uses_target_encoder:
            pairs.append((self.target_encoder, self.encoder))
            if hasattr(self, "target_projector"):
                pairs.append((self.target_projector, self.projector))
        return pairs

    @torch.no_grad()
    def reset_target(self, only: set[str] | None = None) -> None:
        """Sets target = online (a fresh model, or one whose checkpoint had no target), frozen, in eval mode.
        `only`: attribute names (e.g. {"target_projector"}) to reset; the other targets are just frozen."""
        names = {id(module): name for name, module in self.named_children()}
        for target, online in self._target_pairs():
            if only is not None and names[id(target)] not in only:
                target.requires_grad_(False)
                target.eval()
                continue
            if next(online.parameters()).device.type != "meta":
                target.load_state_dict(online.state_dict())
            target.requires_grad_(False)
            target.eval()

    @torch.no_grad()
    def momentum_update(self, momentum: float) -> None:
        """target <- momentum * target + (1 - momentum) * online, for parameters; buffers are copied."""
        for target, online in self._target_pairs():
            target_params = [p for p in target.parameters()]
            online_params = [p.detach() for p in online.parameters()]
            torch._foreach_mul_(target_params, momentum)
            torch._foreach_add_(target_params, online_params, alpha=1.0 - momentum)
            for tb, ob in zip(target.buffers(), online.buffers()):
                tb.copy_(ob)

    def train(self, mode: bool = True):
        super().train(mode)
        for target, _ in self._target_pairs():
            target.eval()
        return self

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """As `PreTrainedModel.from_pretrained`; a checkpoint without target weights (e.g. a plain encoder)
        gets target = online instead of a random target."""
        want_info = kwargs.pop("output_loading_info", False)
        kwargs.setdefault("use_safetensors", True)  # never unpickle weights from an untrusted checkpoint
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        model._apply_freezing(model.encoder)
        model.reset_augmentation_strength()  # not saved, and built on the meta device: uninitialised until set here
        # reset only the targets the checkpoint lacks (e.g. a new target_projector), keep a saved EMA encoder
        missing = {key.split(".", 1)[0] for key in info.get("missing_keys", [])}
        if any(name.startswith("target_") for name in missing):
            model.reset_target(only=missing)
        for target, _ in model._target_pairs():
            target.requires_grad_(False)
            target.eval()
        return (model, info) if want_info else model

    def _encode_context(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.uses_target_encoder:
            return encode_tokens(self.encoder, context)
        with torch.no_grad():
            return encode_tokens(self.target_encoder, context)

    def _contrastive(self, online_feature: torch.Tensor, context_feature: torch.Tensor) -> torch.Tensor:
        online = self.predictor(self.projector(online_feature))
        with torch.no_grad():
            head = self.target_projector if self.uses_target_encoder else self.projector
            target = head(context_feature)
        return contrastive_loss(
            online, target.detach(), self.config.contrastive_temperature, self.config.num_exemplars
        )

    def forward(
        self,
        pixel_values: torch.Tensor,
        exemplar_pixel_values: torch.Tensor | None = None,
        correlation_labels: torch.Tensor | None = None,
        context_pixel_values: torch.Tensor | None = None,
        exemplar_boxes: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        return_loss: bool = True,
        return_dict: bool | None = None,
        **kwargs,
    ) -> CIMForPreTrainingOutput:
        r"""
        pixel_values (`torch.FloatTensor` of shape `(batch, 3, image_size, image_size)`):
            normalised search views.
        exemplar_pixel_values (`torch.FloatTensor` of shape `(batch, K, 3, n, n)`, *optional*):
            precomputed exemplars; when absent they are sampled here, on the input's device.
        correlation_labels (`torch.FloatTensor` of shape `(batch, K, m, m)`, *optional*):
            true maps for given exemplars (needed for the loss when exemplars are given).
        context_pixel_values (`torch.FloatTensor` of shape `(batch, 3, m, m)`, *optional*):
            precomputed context; defaults to `pixel_values` resized to `context_size`.
        exemplar_boxes (`torch.FloatTensor` of shape `(batch, K, 5)`, *optional*):
            fixed exemplar boxes (cx, cy, w, h, theta); the exemplars and maps are computed from them.
        generator (`torch.Generator`, *optional*): makes the exemplar sampling reproducible.
        return_loss (`bool`, defaults to `True`): compute the loss.
        """
        if exemplar_pixel_values is None:
            pretext = sample_pretext(
                pixel_values,
                self.config,
                generator=generator,
                boxes=exemplar_boxes,
                augmentation_strength=self.augmentation_strength,
            )
            exemplars, labels, context = (
                pretext.exemplar_pixel_values,
                pretext.correlation_labels,
                pretext.context_pixel_values,
            )
            boxes = pretext.exemplar_boxes
        else:
            exemplars, labels, boxes = exemplar_pixel_values, correlation_labels, exemplar_boxes
            context = resize_context(pixel_values, self.config.context_size, self.config.context_resample)
        if context_pixel_values is not None:
            context = context_pixel_values
        batch, num_exemplars = exemplars.shape[:2]
        context_tokens, context_feature = self._encode_context(context)
        exemplar_tokens, exemplar_feature = encode_tokens(self.encoder, exemplars.flatten(0, 1))
        exemplar_tokens = exemplar_tokens.view(batch, num_exemplars, *exemplar_tokens.shape[1:])
        logits = self.decoder(context_tokens, exemplar_tokens)

        loss = corr_loss = ctr_loss = None
        if return_loss:
            if labels is None:
                raise ValueError(
                    "Exemplars were given without `correlation_labels`; pass the true maps or "
                    "call with return_loss=False."
                )
            corr_loss = correlation_loss(logits, labels, self.config)
            loss = self.config.correlation_loss_weight * corr_loss
            if self.config.contrastive_loss_weight > 0:
                ctr_loss = self._contrastive(exemplar_feature, context_feature)
                loss = loss + self.config.contrastive_loss_weight * ctr_loss
        output = CIMForPreTrainingOutput(
            loss=loss,
            logits=logits,
            correlation_labels=labels,
            exemplar_pixel_values=exemplars,
            context_pixel_values=context,
            exemplar_boxes=boxes,
            correlation_loss=corr_loss,
            contrastive_loss=ctr_loss,
        )
        return output if return_dict is not False else output.to_tuple()


__all__ = ["CIMForPreTraining", "CIMForPreTrainingOutput", "CIMModel", "CIMModelOutput", "CIMPreTrainedModel"]
