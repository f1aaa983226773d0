"""Tests for transformers_cim.convert_cim_original_to_hf: the authors' checkpoints converted to transformers.

The authors' checkpoints are built here, tiny, with their parameter names and shapes (their models/cim.py,
models/nn_util.py and timm's VisionTransformer), and the converted models are checked against forwards written
here from their formulas, not by calling this package.
"""

from __future__ import annotations

import argparse
import math
import os

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from transformers import AutoImageProcessor, AutoModelForImageClassification, pipeline

from transformers_cim import CIMForPreTraining
from transformers_cim.convert_cim_original_to_hf import ConversionOptions, convert_checkpoint, main

WIDTH, DEPTH, HEADS, PATCH, IMAGE = 32, 2, 2, 8, 32
DEC_WIDTH, DEC_HEADS = 16, 2
EPS = 1e-6
TINY = ["--num_heads", str(HEADS), "--decoder_num_heads", str(DEC_HEADS)]


# --------------------------------------------------------------------------------------------------
# The authors' state dicts
# --------------------------------------------------------------------------------------------------


def authors_sincos(dim: int, grid: int) -> torch.Tensor:
    """Their get_2d_sincos_pos_embed with a zero CLS row: [sin, cos](column) then [sin, cos](row)."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    rows, cols = torch.meshgrid(
        torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64), indexing="ij"
    )
    col, row = cols.reshape(-1, 1) * omega, rows.reshape(-1, 1) * omega
    table = torch.cat([col.sin(), col.cos(), row.sin(), row.cos()], dim=1)
    return torch.cat([torch.zeros(1, dim, dtype=torch.float64), table]).float().unsqueeze(0)


def rand(*shape: int, scale: float = 0.2) -> torch.Tensor:
    return torch.randn(*shape) * scale


def norm_params(prefix: str, width: int) -> dict[str, torch.Tensor]:
    return {f"{prefix}.weight": 1 + rand(width, scale=0.1), f"{prefix}.bias": rand(width, scale=0.1)}


def linear_params(prefix: str, fan_in: int, fan_out: int) -> dict[str, torch.Tensor]:
    return {f"{prefix}.weight": rand(fan_out, fan_in, scale=fan_in**-0.5), f"{prefix}.bias": rand(fan_out)}


def timm_block_params(prefix: str) -> dict[str, torch.Tensor]:
    return {
        **norm_params(f"{prefix}norm1", WIDTH),
        **linear_params(f"{prefix}attn.qkv", WIDTH, 3 * WIDTH),
        **linear_params(f"{prefix}attn.proj", WIDTH, WIDTH),
        **norm_params(f"{prefix}norm2", WIDTH),
        **linear_params(f"{prefix}mlp.fc1", WIDTH, 4 * WIDTH),
        **linear_params(f"{prefix}mlp.fc2", 4 * WIDTH, WIDTH),
    }


def vit_params(suffix: str = "") -> dict[str, torch.Tensor]:
    """``patch_embed{suffix}.proj``, ``blocks{suffix}.N``; the CLS token and positions are added by the callers."""
    params = {
        f"patch_embed{suffix}.proj.weight": rand(WIDTH, 3, PATCH, PATCH, scale=0.1),
        f"patch_embed{suffix}.proj.bias": rand(WIDTH),
    }
    for index in range(DEPTH):
        params |= timm_block_params(f"blocks{suffix}.{index}.")
    return params


def authors_mlp(num_layers: int, in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    """Their build_mlp: Linear (no bias), BatchNorm, ReLU, ..., last BatchNorm without affine."""
    layers: list[nn.Module] = []
    for index in range(num_layers):
        last = index == num_layers - 1
        layers.append(nn.Linear(in_dim if index == 0 else hidden, out_dim if last else hidden, bias=False))
        layers += [nn.BatchNorm1d(out_dim, affine=False)] if last else [nn.BatchNorm1d(hidden), nn.ReLU()]
    for module in layers:
        if isinstance(module, nn.BatchNorm1d):
            module.running_mean.normal_()
            module.num_batches_tracked.fill_(7)
    return nn.Sequential(*layers)


def pretraining_state_dict(image: int = IMAGE, context: int = IMAGE) -> dict[str, torch.Tensor]:
    """Their CorrelationalAutoencoderViT: online and EMA (``_c``) encoders that differ, decoder, contrastive MLPs."""
    torch.manual_seed(0)
    sd = {"cls_token": rand(1, 1, WIDTH), "pos_embed": authors_sincos(WIDTH, image // PATCH)}
    sd |= vit_params() | norm_params("norm", WIDTH) | vit_params("_c") | norm_params("norm_c", WIDTH)
    block = "decoder_corr_block.block."
    sd |= linear_params("decoder_embed", WIDTH, DEC_WIDTH)
    sd["decoder_pos_embed"] = authors_sincos(DEC_WIDTH, context // PATCH)
    sd |= {
        **norm_params(f"{block}norm1", DEC_WIDTH),
        **linear_params(f"{block}attn.q", DEC_WIDTH, DEC_WIDTH),
        **linear_params(f"{block}attn.kv", DEC_WIDTH, 2 * DEC_WIDTH),
        **linear_params(f"{block}attn.proj", DEC_WIDTH, DEC_WIDTH),
        **norm_params(f"{block}norm2", DEC_WIDTH),
        **linear_params(f"{block}mlp.fc1", DEC_WIDTH, 4 * DEC_WIDTH),
        **linear_params(f"{block}mlp.fc2", 4 * DEC_WIDTH, DEC_WIDTH),
    }
    sd |= norm_params("decoder_norm", DEC_WIDTH)
    sd |= {"decoder_pred_mask.0.weight": rand(2, DEC_WIDTH, 1, 1, scale=0.5), "decoder_pred_mask.0.bias": rand(2)}
    heads = {
        "decoder_g_embed": authors_mlp(3, WIDTH, 24, 8),
        "decoder_g_embed_c": authors_mlp(3, WIDTH, 24, 8),
        "decoder_predictor": authors_mlp(2, 8, 24, 8),
    }
    for name, head in heads.items():
        sd |= {f"{name}.{key}": value for key, value in head.state_dict().items()}
    return sd


def classifier_state_dict(global_pool: bool, num_classes: int = 5) -> dict[str, torch.Tensor]:
    """Their fine-tuned timm VisionTransformer: ``fc_norm`` with global pooling, else ``norm``; ``head``."""
    torch.manual_seed(1)
    sd = {"cls_token": rand(1, 1, WIDTH), "pos_embed": authors_sincos(WIDTH, IMAGE // PATCH)}
    sd |= vit_params() | norm_params("fc_norm" if global_pool else "norm", WIDTH)
    return sd | linear_params("head", WIDTH, num_classes)


# --------------------------------------------------------------------------------------------------
# The authors' forwards, from their formulas
# --------------------------------------------------------------------------------------------------


def layer_norm(x: torch.Tensor, p: dict, prefix: str) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], p[f"{prefix}.weight"], p[f"{prefix}.bias"], EPS)


def linear(x: torch.Tensor, p: dict, prefix: str) -> torch.Tensor:
    return F.linear(x, p[f"{prefix}.weight"], p.get(f"{prefix}.bias"))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Multi-head softmax attention on (B, N, C) inputs, scale head_dim**-0.5."""
    batch, n_q, width = q.shape
    split = lambda t: t.reshape(batch, t.shape[1], heads, width // heads).transpose(1, 2)  # noqa: E731
    weights = (split(q) @ split(k).transpose(-2, -1) * (width // heads) ** -0.5).softmax(-1)
    return (weights @ split(v)).transpose(1, 2).reshape(batch, n_q, width)


def mlp(x: torch.Tensor, p: dict, prefix: str) -> torch.Tensor:
    return linear(F.gelu(linear(x, p, f"{prefix}.fc1")), p, f"{prefix}.fc2")


def timm_block(x: torch.Tensor, p: dict, prefix: str) -> torch.Tensor:
    """x + proj(attn(qkv(norm1 x))), then x + mlp(norm2 x)."""
    q, k, v = linear(layer_norm(x, p, f"{prefix}norm1"), p, f"{prefix}attn.qkv").chunk(3, dim=-1)
    x = x + linear(attention(q, k, v, HEADS), p, f"{prefix}attn.proj")
    return x + mlp(layer_norm(x, p, f"{prefix}norm2"), p, f"{prefix}mlp")


def positions(p: dict, grid: int, authors_interpolation: bool) -> torch.Tensor:
    """The position table for a grid x grid input: as stored, or bicubic-interpolated. Their code interpolates with
    ``scale_factor=(grid + 0.1) / N`` (DINO's trick); transformers' ViT with ``size=grid``."""
    table = p["pos_embed"]
    n = math.isqrt(table.shape[1] - 1)
    if grid == n:
        return table
    patch_table = table[:, 1:].reshape(1, n, n, -1).permute(0, 3, 1, 2)
    if authors_interpolation:
        patch_table = F.interpolate(patch_table, scale_factor=((grid + 0.1) / n,) * 2, mode="bicubic")
    else:
        patch_table = F.interpolate(patch_table, size=(grid, grid), mode="bicubic", align_corners=False)
    return torch.cat([table[:, :1], patch_table.permute(0, 2, 3, 1).reshape(1, grid * grid, -1)], dim=1)


def authors_encoder(pixels: torch.Tensor, p: dict, suffix: str, authors_interpolation: bool = True) -> torch.Tensor:
    """Their forward_encoder for one input: ``patch_embed{suffix}``, online CLS and positions, ``blocks{suffix}``,
    ``norm{suffix}``."""
    x = F.conv2d(pixels, p[f"patch_embed{suffix}.proj.weight"], p[f"patch_embed{suffix}.proj.bias"], stride=PATCH)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([p["cls_token"].expand(x.shape[0], -1, -1), x], dim=1)
    x = x + positions(p, pixels.shape[-1] // PATCH, authors_interpolation)
    for index in range(DEPTH):
        x = timm_block(x, p, f"blocks{suffix}.{index}.")
    return layer_norm(x, p, f"norm{suffix}")


def authors_correlation_logits(
    context: torch.Tensor, exemplars: torch.Tensor, p: dict, authors_interpolation: bool = True
) -> torch.Tensor:
    """Their forward_encoder + forward_mask_decoder: (B, K, 2, m, m) logits for context (B, 3, m, m) and
    exemplars (B, K, 3, n, n), one exemplar at a time as their code loops."""
    block = "decoder_corr_block.block."
    x = linear(authors_encoder(context, p, "_c", authors_interpolation), p, "decoder_embed") + p["decoder_pos_embed"]
    size, grid = context.shape[-1], context.shape[-1] // PATCH
    out = []
    for k in range(exemplars.shape[1]):
        t = linear(authors_encoder(exemplars[:, k], p, "", authors_interpolation), p, "decoder_embed")
        x_norm, t_norm = layer_norm(x, p, f"{block}norm1"), layer_norm(t, p, f"{block}norm1")  # one norm1 for both
        keys, values = linear(t_norm, p, f"{block}attn.kv").chunk(2, dim=-1)
        y = x + linear(attention(linear(x_norm, p, f"{block}attn.q"), keys, values, DEC_HEADS), p, f"{block}attn.proj")
        y = y + mlp(layer_norm(y, p, f"{block}norm2"), p, f"{block}mlp")
        y = layer_norm(y, p, "decoder_norm")[:, 1:]
        feature_map = y.reshape(y.shape[0], grid, grid, -1).permute(0, 3, 1, 2)
        logits = F.conv2d(feature_map, p["decoder_pred_mask.0.weight"], p["decoder_pred_mask.0.bias"])
        out.append(F.interpolate(logits, size=(size, size), mode="bilinear", align_corners=True))
    return torch.stack(out, dim=1)


def authors_classifier_logits(pixels: torch.Tensor, p: dict) -> torch.Tensor:
    """Their fine-tuned VisionTransformer: mean of the patch tokens + fc_norm, or norm + CLS token; then head."""
    x = F.conv2d(pixels, p["patch_embed.proj.weight"], p["patch_embed.proj.bias"], stride=PATCH)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([p["cls_token"].expand(x.shape[0], -1, -1), x], dim=1) + p["pos_embed"]
    for index in range(DEPTH):
        x = timm_block(x, p, f"blocks.{index}.")
    feature = layer_norm(x[:, 1:].mean(1), p, "fc_norm") if "fc_norm.weight" in p else layer_norm(x, p, "norm")[:, 0]
    return linear(feature, p, "head")


# --------------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------------


def our_logits(model: CIMForPreTraining, context: torch.Tensor, exemplars: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(context, exemplar_pixel_values=exemplars, context_pixel_values=context, return_loss=False).logits


def test_pretraining_checkpoint_reproduces_the_authors_logits(tmp_path, capsys):
    sd = pretraining_state_dict()
    torch.save({"model": sd, "epoch": 299}, tmp_path / "cim.pth")
    assert main([str(tmp_path / "cim.pth"), str(tmp_path / "out"), "--exemplar_size", str(IMAGE), *TINY]) == 0
    printed = capsys.readouterr().out
    assert "CIMForPreTraining" in printed and "dropped: decoder_g_embed.* (16 tensors)" in printed  # contrastive heads

    model = CIMForPreTraining.from_pretrained(tmp_path / "out").eval()
    config = model.config
    assert (config.image_size, config.context_size, config.exemplar_size) == (IMAGE, IMAGE, IMAGE)
    assert config.decoder_shared_norm and config.decoder_align_corners and config.contrastive_loss_weight == 0
    assert not hasattr(model, "projector")
    torch.manual_seed(2)
    context, exemplars = torch.randn(2, 3, IMAGE, IMAGE), torch.randn(2, 3, 3, IMAGE, IMAGE)
    theirs = authors_correlation_logits(context, exemplars, sd)
    ours = our_logits(model, context, exemplars)
    assert ours.shape == (2, 3, IMAGE, IMAGE)
    # their two logits are one: softmax(l0, l1)[1] == sigmoid(l1 - l0)
    torch.testing.assert_close(ours, theirs[:, :, 1] - theirs[:, :, 0], atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.sigmoid(), theirs.softmax(2)[:, :, 1], atol=1e-6, rtol=0)
    # the EMA target kept its own weights (not a copy of the online encoder)
    assert not torch.equal(model.target_encoder.layernorm.weight, model.vit.layernorm.weight)


def test_smaller_inputs_match_the_authors_with_their_position_interpolation(tmp_path):
    """A context and exemplars smaller than the image interpolate the position table. The converted model uses the
    authors' form (``scale_factor=(g + 0.1) / N``, `position_interpolation="authors"`, the default) and so
    reproduces their logits; the stock ViT form (``size=``) is the switch's other value."""
    sd = pretraining_state_dict(image=48, context=IMAGE)
    args = argparse.Namespace(
        model="cim_vit_base_patch16",
        template_size=16,
        template_num=2,
        sigma_cont=0.0,
        sigma_corr=1.0,
        template_min_scale=0.05,
        template_max_scale=0.48,
        context_size=IMAGE,
        template_min_ratio=0.5,
        template_max_ratio=4.0,
    )
    torch.save({"model": sd, "args": args}, tmp_path / "cim.pth")  # args: an argparse.Namespace, as their scripts do
    convert_checkpoint(
        tmp_path / "cim.pth", tmp_path / "out", ConversionOptions(num_heads=HEADS, decoder_num_heads=DEC_HEADS)
    )
    model = CIMForPreTraining.from_pretrained(tmp_path / "out").eval()
    assert (model.config.exemplar_size, model.config.num_exemplars) == (16, 2)
    assert model.config.exemplar_scale == [0.05, 0.48]
    assert model.config.exemplar_aspect_ratio == [0.25, 2.0]  # their w / h range (0.5, 4) as our h / w
    assert (model.config.image_size, model.config.context_size) == (48, IMAGE)
    assert model.config.position_interpolation == "authors"
    torch.manual_seed(3)
    context, exemplars = torch.randn(2, 3, IMAGE, IMAGE), torch.randn(2, 2, 3, 16, 16)
    ours = our_logits(model, context, exemplars)
    theirs = authors_correlation_logits(context, exemplars, sd)
    torch.testing.assert_close(ours, theirs[:, :, 1] - theirs[:, :, 0], atol=1e-5, rtol=0)
    stock = CIMForPreTraining.from_pretrained(tmp_path / "out", position_interpolation="transformers").eval()
    stock_logits = our_logits(stock, context, exemplars)
    same_interpolation = authors_correlation_logits(context, exemplars, sd, authors_interpolation=False)
    torch.testing.assert_close(
        stock_logits, same_interpolation[:, :, 1] - same_interpolation[:, :, 0], atol=1e-5, rtol=0
    )
    assert (stock_logits - ours).abs().max() > 1e-4  # the switch matters at these sizes


def test_contrastive_heads_are_kept_when_the_config_uses_them(tmp_path):
    sd = pretraining_state_dict()
    torch.save({"model": sd}, tmp_path / "cim.pth")
    summary = convert_checkpoint(
        tmp_path / "cim.pth",
        tmp_path / "out",
        ConversionOptions(num_heads=HEADS, decoder_num_heads=DEC_HEADS, contrastive_loss_weight=1.0),
    )
    assert summary.dropped_keys == []
    model = CIMForPreTraining.from_pretrained(tmp_path / "out")
    assert (model.config.projector_hidden_size, model.config.projector_output_size) == (24, 8)
    ours = model.state_dict()
    for theirs, prefix in (
        ("decoder_g_embed.", "projector.net."),
        ("decoder_g_embed_c.", "target_projector.net."),
        ("decoder_predictor.", "predictor.net."),
    ):
        for key in (k for k in sd if k.startswith(theirs)):
            assert torch.equal(ours[prefix + key[len(theirs) :]], sd[key]), key


@pytest.mark.parametrize("global_pool", [True, False], ids=["global-pool-beit", "cls-token-vit"])
def test_finetuned_classifier_reproduces_the_authors_logits_and_loads_in_a_pipeline(tmp_path, global_pool):
    sd = classifier_state_dict(global_pool)
    torch.save(
        {"model": sd, "args": argparse.Namespace(model="vit_base_patch16", global_pool=global_pool)},
        tmp_path / "ft.pth",
    )
    assert main([str(tmp_path / "ft.pth"), str(tmp_path / "out"), "--num_heads", str(HEADS)]) == 0
    model = AutoModelForImageClassification.from_pretrained(tmp_path / "out").eval()
    assert model.config.model_type == ("beit" if global_pool else "vit")
    torch.manual_seed(4)
    pixels = torch.randn(2, 3, IMAGE, IMAGE)
    with torch.no_grad():
        ours = model(pixels).logits
    torch.testing.assert_close(ours, authors_classifier_logits(pixels, sd), atol=1e-5, rtol=0)

    image = Image.fromarray((torch.rand(40, 48, 3) * 255).to(torch.uint8).numpy())
    predictions = pipeline("image-classification", model=str(tmp_path / "out"), top_k=5)(image)
    processor = AutoImageProcessor.from_pretrained(tmp_path / "out")
    # the authors' evaluation transform: shorter side to int(size / 0.95) (<= 224 px inputs), centre crop
    assert processor.size == {"shortest_edge": int(IMAGE / 0.95)}
    processed = processor(image, return_tensors="pt").pixel_values
    expected = authors_classifier_logits(processed, sd).softmax(-1)[0]
    assert len(predictions) == 5
    for prediction in predictions:
        index = int(prediction["label"].split("_")[1])
        assert prediction["score"] == pytest.approx(expected[index].item(), abs=1e-5)


class Payload:
    """An arbitrary object: unpickling it would run ``touch`` (a weights-only load must refuse it instead)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (touch, (self.marker,))


def touch(path: str) -> None:
    open(path, "w").close()


def write_broken_checkpoint(case: str, tmp_path) -> str:
    path = tmp_path / "in.pth"
    if case == "not a dict":
        torch.save(torch.zeros(3), path)
    elif case == "neither format":
        torch.save({"model": {"encoder.weight": torch.zeros(2)}}, path)
    elif case == "missing key":
        sd = pretraining_state_dict()
        del sd["norm_c.weight"]
        torch.save({"model": sd}, path)
    elif case == "unknown width":
        torch.save({"model": pretraining_state_dict()}, path)
    elif case == "arbitrary object":
        torch.save({"model": classifier_state_dict(True), "extra": Payload(str(tmp_path / "ran"))}, path)
    elif case == "not a checkpoint":
        path.write_text("hello")
    elif case == "transformers directory":
        path = tmp_path / "hf"
        path.mkdir()
        (path / "config.json").write_text("{}")
    return str(path)


@pytest.mark.parametrize(
    "case, message",
    [
        ("not a dict", "holds a Tensor, not a dict"),
        ("neither format", "not a checkpoint of the authors' CIM code"),
        ("missing key", "no 'norm_c.weight'"),
        ("unknown width", "pass --num_heads"),
        ("arbitrary object", "weights_only=True"),
        ("not a checkpoint", "cannot be read as a PyTorch checkpoint"),
        ("transformers directory", "already a transformers checkpoint"),
    ],
)
def test_wrong_inputs_fail_clearly_and_write_nothing(tmp_path, capsys, case, message):
    source = write_broken_checkpoint(case, tmp_path)
    extra = ["--decoder_num_heads", str(DEC_HEADS)] if case == "unknown width" else TINY
    before = set(os.listdir(tmp_path))
    assert main([source, str(tmp_path / "out"), *extra]) == 1
    err = capsys.readouterr().err
    assert err.startswith("cim-convert-original: error: ") and message in err, err
    assert set(os.listdir(tmp_path)) == before  # no output, no staging folder, and the payload never ran


def test_a_model_size_that_the_weights_contradict_is_refused(tmp_path, capsys):
    torch.save({"model": classifier_state_dict(True)}, tmp_path / "ft.pth")
    assert main([str(tmp_path / "ft.pth"), str(tmp_path / "out"), "--model_size", "vit-base-patch16"]) == 1
    assert "--model_size vit-base-patch16" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_non_empty_output_directory_is_refused(tmp_path, capsys):
    torch.save({"model": classifier_state_dict(True)}, tmp_path / "ft.pth")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    assert main([str(tmp_path / "ft.pth"), str(tmp_path / "out"), "--num_heads", str(HEADS)]) == 1
    assert "not an empty directory" in capsys.readouterr().err
    assert os.listdir(tmp_path / "out") == ["keep.txt"]


def test_console_script_is_registered():
    from importlib.metadata import entry_points

    scripts = {ep.name: ep for ep in entry_points(group="console_scripts")}
    assert scripts["cim-convert-original"].load() is main
