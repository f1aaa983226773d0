"""CIMForPreTraining / CIMModel: shapes, learning, losses, EMA target, freezing, serialisation, attention
backends, gradient checkpointing, precomputed inputs, contrastive option and shared-encoder ablation."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import ViTModel

from transformers_cim import CIMForPreTraining, CIMModel
from transformers_cim.modeling_cim import correlation_loss, sincos_position_embedding_2d

pytestmark = pytest.mark.usefixtures("single_thread")


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def build(config, seed: int = 0) -> CIMForPreTraining:
    torch.manual_seed(seed)
    return CIMForPreTraining(config)


def perturb_online(model: CIMForPreTraining, seed: int = 1, scale: float = 0.05) -> None:
    """Moves every trainable online parameter so that online != target."""
    g = gen(seed)
    with torch.no_grad():
        for p in model.encoder.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=g))


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def assert_ema(new: torch.Tensor, target: torch.Tensor, online: torch.Tensor, m: float, name: str = "") -> None:
    """new == target * m + online * (1 - m) up to float32 rounding of the two products and the sum."""
    t, o = target.double(), online.detach().double()
    expected = t * m + o * (1 - m)
    bound = 3 * 2.0**-24 * (t.abs() * m + o.abs() * (1 - m)) + 1e-30  # 3 half-ulps of the terms
    error = (new.double() - expected).abs()
    assert (error <= bound).all(), (name, (error - bound).max().item())


def target_state(model):
    return {k: v.clone() for k, v in model.target_encoder.state_dict().items()}


# ------------------------------------------------------------------------------------------------ shapes


def test_vit_output_shapes_and_dtypes(tiny_vit_config, search_views):
    model = build(tiny_vit_config())
    out = model(search_views(batch=2), generator=gen())
    assert out.logits.shape == (2, 3, 48, 48) and out.logits.dtype == torch.float32
    assert out.correlation_labels.shape == (2, 3, 48, 48) and out.correlation_labels.dtype == torch.float32
    assert set(out.correlation_labels.unique().tolist()) == {0.0, 1.0}
    assert out.exemplar_pixel_values.shape == (2, 3, 3, 16, 16)
    assert out.context_pixel_values.shape == (2, 3, 48, 48)
    assert out.exemplar_boxes.shape == (2, 3, 5)
    assert out.loss.shape == () and torch.isfinite(out.loss)
    assert out.contrastive_loss is None and torch.equal(out.loss, out.correlation_loss)
    # tuple output
    as_tuple = model(search_views(batch=2), generator=gen(), return_dict=False)
    assert torch.equal(as_tuple[0], out.loss) and torch.equal(as_tuple[1], out.logits)


def test_resnet_output_shapes_and_dtypes(tiny_resnet_config, search_views):
    model = build(tiny_resnet_config())
    assert hasattr(model, "resnet") and not hasattr(model, "vit")
    out = model(search_views(batch=3), generator=gen())
    assert out.logits.shape == (3, 2, 64, 64) and out.logits.dtype == torch.float32
    assert out.correlation_labels.shape == (3, 2, 64, 64)
    assert set(out.correlation_labels.unique().tolist()) == {0.0, 1.0}
    assert out.exemplar_pixel_values.shape == (3, 2, 3, 32, 32)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.grad is not None for p in model.resnet.parameters())
    assert all(p.grad is None for p in model.target_encoder.parameters())


def test_cim_model_features(tiny_vit_config, tiny_resnet_config, search_views):
    x = search_views(batch=2)
    vit = CIMModel(tiny_vit_config())
    out = vit(x)
    assert out.last_hidden_state.shape == (2, 1 + 16, 192)
    assert torch.equal(out.pooler_output, out.last_hidden_state[:, 0])
    assert vit(x[..., :48, :48]).last_hidden_state.shape == (2, 1 + 9, 192)  # interpolated positions
    resnet = CIMModel(tiny_resnet_config())
    out = resnet(x)
    assert out.last_hidden_state.shape == (2, 32, 2, 2) and out.pooler_output.shape == (2, 32)


# ------------------------------------------------------------------------------------------------ learning


def test_loss_decreases_on_a_fixed_batch(tiny_vit_config, search_views):
    model = build(tiny_vit_config(exemplar_augmentation=False))
    model.train()
    x = search_views(batch=4, seed=1)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(40):
        out = model(x, generator=gen(7))  # the same exemplars every step
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        model.momentum_update(0.99)
        losses.append(out.loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.7 * losses[0], losses  # measured: 0.50-0.57 over 3 seeds
    # better than the best constant prediction per (image, exemplar): the model localises the exemplars
    p = out.correlation_labels.mean(dim=(-2, -1)).clamp(1e-6, 1 - 1e-6)
    constant_baseline = (-(p * p.log() + (1 - p) * (1 - p).log())).mean(0).sum().item()
    assert losses[-1] < 0.9 * constant_baseline, (losses[-1], constant_baseline)


@pytest.mark.parametrize("loss_type", ["ce", "balanced_ce", "mse", "focal"])
def test_each_loss_type_runs(loss_type, tiny_vit_config, search_views):
    model = build(tiny_vit_config(loss_type=loss_type))
    out = model(search_views(), generator=gen())
    assert torch.isfinite(out.loss) and out.loss > 0
    out.loss.backward()
    assert model.decoder.predictor.weight.grad.abs().sum() > 0


def test_loss_values_at_known_points(tiny_vit_config):
    """Zero logits (p = 1/2 everywhere) have closed-form losses, summed over the K exemplars."""
    labels = torch.zeros(2, 3, 8, 8)
    labels[:, :, 2:6, 1:5] = 1  # positive fraction 1/4 for every (image, exemplar)
    zeros = torch.zeros_like(labels)
    k, log2 = 3, math.log(2)
    cases = {
        "ce": k * log2,
        "balanced_ce": k * log2,  # positives and negatives weighted to half each
        "mse": k * 0.25,
        "focal": k * 0.25 * log2 * (0.25 * 0.25 + 0.75 * 0.75),  # alpha (0.25 | 0.75) * (1/2)^2 * ln 2
    }
    for loss_type, expected in cases.items():
        config = tiny_vit_config(loss_type=loss_type)
        assert correlation_loss(zeros, labels, config).item() == pytest.approx(expected, rel=1e-5), loss_type
    confident = (labels * 2 - 1) * 30  # right and certain: ~0 for every loss
    for loss_type in cases:
        assert correlation_loss(confident, labels, tiny_vit_config(loss_type=loss_type)).item() < 1e-6


def test_loss_weight_scales_the_loss(tiny_vit_config, search_views):
    x = search_views()
    a = build(tiny_vit_config())(x, generator=gen())
    b = build(tiny_vit_config(correlation_loss_weight=2.5))(x, generator=gen())
    torch.testing.assert_close(b.loss, 2.5 * a.loss)


# ------------------------------------------------------------------------------------------------ EMA target


def test_fresh_model_target_equals_online_in_separate_storage(tiny_vit_config, tiny_resnet_config):
    for config in (tiny_vit_config(), tiny_resnet_config()):
        model = build(config)
        online, target = model.encoder.state_dict(), model.target_encoder.state_dict()
        assert_same_tensors(online, target)
        for key in online:
            assert online[key].data_ptr() != target[key].data_ptr(), key


def test_position_embeddings_are_fixed_sincos(tiny_vit_config):
    model = build(tiny_vit_config())
    pos = model.vit.embeddings.position_embeddings
    assert not pos.requires_grad
    assert torch.equal(pos[0], sincos_position_embedding_2d(4, 192, with_cls=True))  # 64 px / 16 = 4x4 grid
    assert torch.equal(model.target_encoder.embeddings.position_embeddings, pos)


@pytest.mark.parametrize("momentum", [0.9, 0.5])
def test_momentum_update_is_exact(momentum, tiny_vit_config):
    model = build(tiny_vit_config())
    perturb_online(model)
    before = {k: v.clone() for k, v in model.target_encoder.named_parameters()}
    online = dict(model.encoder.named_parameters())
    model.momentum_update(momentum)
    moved = 0
    for name, p in model.target_encoder.named_parameters():
        assert_ema(p, before[name], online[name], momentum, name)
        moved += not torch.equal(p, before[name])
    assert moved > 10
    # 1.0 leaves the target exactly unchanged
    frozen = {k: v.clone() for k, v in model.target_encoder.named_parameters()}
    perturb_online(model, seed=2)
    model.momentum_update(1.0)
    assert_same_tensors(frozen, dict(model.target_encoder.named_parameters()))
    # 0.0 copies the online encoder
    model.momentum_update(0.0)
    assert_same_tensors(
        {k: v.detach() for k, v in model.encoder.named_parameters()},
        {k: v.detach() for k, v in model.target_encoder.named_parameters()},
    )


def test_momentum_update_copies_resnet_buffers(tiny_resnet_config, search_views):
    model = build(tiny_resnet_config())
    model.train()
    model(search_views(), generator=gen())  # online BatchNorm statistics move, the target's do not
    online_stats = model.resnet.embedder.embedder.normalization.running_mean.clone()
    target_stats = model.target_encoder.embedder.embedder.normalization.running_mean
    assert not torch.equal(online_stats, target_stats)
    model.momentum_update(0.99)
    assert torch.equal(model.target_encoder.embedder.embedder.normalization.running_mean, online_stats)


def test_target_gets_no_gradients_and_stays_in_eval(tiny_vit_config, search_views):
    model = build(tiny_vit_config())
    model.train()
    assert model.training and model.vit.training and model.decoder.training
    assert not model.target_encoder.training
    assert not any(m.training for m in model.target_encoder.modules())
    assert not any(p.requires_grad for p in model.target_encoder.parameters())
    before = target_state(model)
    out = model(search_views(), generator=gen())
    out.loss.backward()
    assert all(p.grad is None for p in model.target_encoder.parameters())
    # online encoder (except the frozen patch projection and positions) and decoder learn
    frozen = {
        "embeddings.patch_embeddings.projection.weight",
        "embeddings.patch_embeddings.projection.bias",
        "embeddings.position_embeddings",
    }
    for name, p in model.vit.named_parameters():
        if name in frozen:
            assert not p.requires_grad and p.grad is None, name
        else:
            assert p.requires_grad and p.grad is not None, name
    assert model.vit.layers[0].attention.q_proj.weight.grad.abs().sum() > 0
    for name, p in model.decoder.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # an optimizer step changes the online encoder only; the target moves only with momentum_update
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()
    assert_same_tensors(before, model.target_encoder.state_dict())
    assert not torch.equal(
        model.vit.layers[0].attention.q_proj.weight, model.target_encoder.layers[0].attention.q_proj.weight
    )
    model.eval()
    model.train()
    assert not model.target_encoder.training


def test_context_goes_through_the_target_encoder_without_gradients(tiny_vit_config, search_views):
    model = build(tiny_vit_config())
    model.train()
    x = search_views()
    sampled = model(x, generator=gen(8))
    inputs = dict(exemplar_pixel_values=sampled.exemplar_pixel_values, correlation_labels=sampled.correlation_labels)
    context = sampled.context_pixel_values.clone().requires_grad_(True)
    out = model(x, context_pixel_values=context, **inputs)
    out.loss.backward()
    assert context.grad is None  # the EMA target encodes the context under no_grad
    exemplars = sampled.exemplar_pixel_values.clone().requires_grad_(True)
    model(x, exemplar_pixel_values=exemplars, correlation_labels=sampled.correlation_labels).loss.backward()
    assert exemplars.grad is not None and exemplars.grad.abs().sum() > 0  # the online encoder: with gradients
    # changing only the target changes the logits: the context really is encoded by the target
    with torch.no_grad():
        model.target_encoder.layernorm.weight.mul_(1.5)
    assert not torch.allclose(model(x, **inputs).logits, out.logits, atol=1e-4)
    # shared mode: the online encoder encodes the context, with gradients
    shared = build(tiny_vit_config(target_encoder_mode="shared"))
    context = sampled.context_pixel_values.clone().requires_grad_(True)
    shared(x, context_pixel_values=context, **inputs).loss.backward()
    assert context.grad is not None and context.grad.abs().sum() > 0


def test_unfrozen_patch_embedding_learns(tiny_vit_config, search_views):
    model = build(tiny_vit_config(freeze_patch_embedding=False))
    model(search_views(), generator=gen()).loss.backward()
    assert model.vit.embeddings.patch_embeddings.projection.weight.grad is not None


# ------------------------------------------------------------------------------------------------ serialisation


def test_save_load_round_trip_is_bit_exact_with_target(tiny_vit_config, search_views, tmp_path):
    model = build(tiny_vit_config())
    perturb_online(model)
    model.momentum_update(0.5)  # now target differs from both its init and the online encoder
    assert not torch.equal(model.vit.layernorm.weight, model.target_encoder.layernorm.weight)
    model.save_pretrained(tmp_path)
    loaded, info = CIMForPreTraining.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert_same_tensors(model.state_dict(), loaded.state_dict())
    assert not loaded.target_encoder.training and not any(p.requires_grad for p in loaded.target_encoder.parameters())
    assert not loaded.vit.embeddings.patch_embeddings.projection.weight.requires_grad
    model.eval()
    x = search_views()
    a, b = model(x, generator=gen(3)), loaded(x, generator=gen(3))
    assert torch.equal(a.logits, b.logits) and torch.equal(a.loss, b.loss)
    assert torch.equal(a.exemplar_pixel_values, b.exemplar_pixel_values)


def test_resnet_save_load_round_trip(tiny_resnet_config, search_views, tmp_path):
    model = build(tiny_resnet_config())
    model.train()
    model(search_views(), generator=gen())  # move BatchNorm statistics
    perturb_online(model)
    model.momentum_update(0.5)
    model.save_pretrained(tmp_path)
    loaded = CIMForPreTraining.from_pretrained(tmp_path)
    assert_same_tensors(model.state_dict(), loaded.state_dict())
    model.eval()
    x = search_views()
    assert torch.equal(model(x, generator=gen(1)).logits, loaded(x, generator=gen(1)).logits)


def _checkpoint_without_target(model, directory):
    model.save_pretrained(directory)
    path = directory / "model.safetensors"
    weights = load_file(path)
    kept = {k: v for k, v in weights.items() if not k.startswith("target_")}
    assert len(kept) < len(weights)
    save_file(kept, path, metadata={"format": "pt"})


def test_checkpoint_without_target_sets_target_to_online(tiny_vit_config, tmp_path):
    model = build(tiny_vit_config())
    perturb_online(model)  # online no longer equals any fresh initialisation
    _checkpoint_without_target(model, tmp_path)
    loaded, info = CIMForPreTraining.from_pretrained(tmp_path, output_loading_info=True)
    assert any(k.startswith("target_encoder.") for k in info["missing_keys"])
    assert_same_tensors(model.vit.state_dict(), loaded.vit.state_dict())
    assert_same_tensors(loaded.vit.state_dict(), loaded.target_encoder.state_dict())
    assert not any(p.requires_grad for p in loaded.target_encoder.parameters())


def test_missing_target_projector_keeps_the_saved_target_encoder(tiny_vit_config, tmp_path):
    """Resuming an EMA checkpoint with the contrastive loss newly switched on: only the (new) projector
    pair is initialised; the saved EMA target encoder must survive."""
    model = build(tiny_vit_config())
    perturb_online(model)
    model.momentum_update(0.5)
    model.save_pretrained(tmp_path)
    loaded = CIMForPreTraining.from_pretrained(
        tmp_path, contrastive_loss_weight=0.5, projector_hidden_size=32, projector_output_size=16
    )
    assert_same_tensors(model.target_encoder.state_dict(), loaded.target_encoder.state_dict())
    assert_same_tensors(model.vit.state_dict(), loaded.vit.state_dict())
    assert_same_tensors(loaded.projector.state_dict(), loaded.target_projector.state_dict())


def test_pretraining_model_from_encoder_only_checkpoint(tiny_vit_config, tmp_path):
    """A CIMModel (encoder only) checkpoint continues pre-training with target = its encoder."""
    encoder = CIMModel(tiny_vit_config())
    with torch.no_grad():
        for p in encoder.parameters():
            p.add_(0.01)
    encoder.save_pretrained(tmp_path)
    loaded = CIMForPreTraining.from_pretrained(tmp_path)
    assert_same_tensors(encoder.vit.state_dict(), loaded.vit.state_dict())
    assert_same_tensors(encoder.vit.state_dict(), loaded.target_encoder.state_dict())


def test_encoder_only_model_loads_from_pretraining_checkpoint(tiny_vit_config, search_views, tmp_path):
    model = build(tiny_vit_config())
    perturb_online(model)
    model.momentum_update(0.5)
    model.save_pretrained(tmp_path)
    encoder, info = CIMModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"]
    assert_same_tensors(model.vit.state_dict(), encoder.vit.state_dict())  # the online one, not the target
    x = search_views()
    torch.testing.assert_close(encoder(x).last_hidden_state, model.vit(x).last_hidden_state, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------ backends


def test_sdpa_and_eager_attention_agree(tiny_vit_config, search_views, tmp_path):
    build(tiny_vit_config()).save_pretrained(tmp_path)
    eager = CIMForPreTraining.from_pretrained(tmp_path, attn_implementation="eager")
    sdpa = CIMForPreTraining.from_pretrained(tmp_path, attn_implementation="sdpa")
    for model, name in ((eager, "eager"), (sdpa, "sdpa")):
        assert model.vit.config._attn_implementation == name
        assert model.target_encoder.config._attn_implementation == name
    x = search_views()
    a, b = eager(x, generator=gen(2)), sdpa(x, generator=gen(2))
    torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(a.loss, b.loss, rtol=0, atol=1e-5)
    # also through the config of a freshly built model
    config = tiny_vit_config()
    config._attn_implementation = "eager"
    model = build(config)
    assert model.vit.config._attn_implementation == "eager"
    torch.testing.assert_close(
        model(x, generator=gen(2)).logits, build(tiny_vit_config())(x, generator=gen(2)).logits, rtol=0, atol=1e-5
    )


def _gradients(model, x):
    model.zero_grad(set_to_none=True)
    out = model(x, generator=gen(5))
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_gradient_checkpointing_gives_the_same_gradients(tiny_vit_config, search_views):
    model = build(tiny_vit_config())
    model.train()
    x = search_views()
    calls = []
    # a sub-module of a checkpointed layer runs again when backward recomputes the layer
    model.vit.layers[0].attention.register_forward_hook(lambda *args: calls.append(1))
    loss, grads = _gradients(model, x)
    plain_calls = len(calls)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # renamed activation_checkpointing_* in 5.x
        model.gradient_checkpointing_enable()
        assert model.is_gradient_checkpointing
    calls.clear()
    loss_ckpt, grads_ckpt = _gradients(model, x)
    assert len(calls) > plain_calls  # the layer really was recomputed during backward
    torch.testing.assert_close(loss_ckpt, loss, rtol=0, atol=1e-6)
    assert grads.keys() == grads_ckpt.keys() and len(grads) > 20
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], rtol=0, atol=1e-5, msg=name)


# ------------------------------------------------------------------------------------------------ inputs


def test_precomputed_exemplars_and_labels(tiny_vit_config, search_views):
    model = build(tiny_vit_config())
    x = search_views()
    sampled = model(x, generator=gen(4))
    given = model(
        x, exemplar_pixel_values=sampled.exemplar_pixel_values, correlation_labels=sampled.correlation_labels
    )
    assert torch.equal(given.logits, sampled.logits) and torch.equal(given.loss, sampled.loss)
    assert given.exemplar_boxes is None
    # explicit context too
    with_context = model(
        x,
        exemplar_pixel_values=sampled.exemplar_pixel_values,
        correlation_labels=sampled.correlation_labels,
        context_pixel_values=sampled.context_pixel_values,
    )
    assert torch.equal(with_context.logits, sampled.logits)
    # fixed boxes (augmentation off) reproduce the sampled geometry
    plain = build(tiny_vit_config(exemplar_augmentation=False))
    first = plain(x, generator=gen(4))
    boxed = plain(x, exemplar_boxes=first.exemplar_boxes)
    assert torch.equal(boxed.correlation_labels, first.correlation_labels)
    assert torch.equal(boxed.logits, first.logits)


@pytest.mark.parametrize("family", ["vit", "resnet"])
def test_each_map_depends_only_on_its_own_image_and_exemplar(
    family, tiny_vit_config, tiny_resnet_config, search_views
):
    """Batching B images x K exemplars must pair context b with exemplar (b, k) only."""
    model = build(tiny_vit_config() if family == "vit" else tiny_resnet_config())
    model.eval()
    x = search_views(batch=3)
    full = model(x, generator=gen(6))
    k = full.exemplar_pixel_values.shape[1]
    for b in range(3):
        for j in range(k):
            one = model(
                x[b : b + 1],
                exemplar_pixel_values=full.exemplar_pixel_values[b : b + 1, j : j + 1],
                correlation_labels=full.correlation_labels[b : b + 1, j : j + 1],
            )
            torch.testing.assert_close(one.logits[0, 0], full.logits[b, j], rtol=0, atol=1e-5)


def test_decoder_localises_with_context_positions(tiny_vit_config):
    """Identical context tokens at every position: only the fixed 2-D sin-cos position embedding of the
    context queries can make the predicted map vary over space."""
    model = build(tiny_vit_config())
    decoder = model.decoder
    emb = decoder.context_position_embedding(3, torch.device("cpu"), torch.float32)
    assert torch.equal(emb[0], sincos_position_embedding_2d(3, 64, with_cls=True))
    context = torch.randn(1, 1, 192).expand(2, 1 + 9, 192)
    exemplars = torch.randn(2, 3, 2, 192)
    logits = decoder(context, exemplars)
    assert logits.shape == (2, 3, 48, 48)
    assert (logits.amax(dim=(-2, -1)) - logits.amin(dim=(-2, -1))).min() > 1e-3


def test_exemplars_without_labels(tiny_vit_config, search_views):
    model = build(tiny_vit_config())
    x = search_views()
    exemplars = torch.randn(2, 3, 3, 16, 16)
    with pytest.raises(ValueError, match="correlation_labels"):
        model(x, exemplar_pixel_values=exemplars)
    out = model(x, exemplar_pixel_values=exemplars, return_loss=False)
    assert out.loss is None and out.logits.shape == (2, 3, 48, 48)


def test_no_loss_when_not_asked(tiny_vit_config, search_views):
    out = build(tiny_vit_config())(search_views(), generator=gen(), return_loss=False)
    assert out.loss is None and out.correlation_loss is None and out.logits is not None


# ------------------------------------------------------------------------------------------------ options


def test_contrastive_loss_option(tiny_vit_config, search_views, tmp_path):
    config = tiny_vit_config(contrastive_loss_weight=0.5, projector_hidden_size=32, projector_output_size=16)
    model = build(config)
    model.train()
    out = model(search_views(batch=4), generator=gen())
    assert out.contrastive_loss is not None and torch.isfinite(out.contrastive_loss) and out.contrastive_loss > 0
    torch.testing.assert_close(out.loss, out.correlation_loss + 0.5 * out.contrastive_loss)
    out.loss.backward()
    for head in (model.projector, model.predictor):
        assert all(p.grad is not None for p in head.parameters())
    assert all(p.grad is None and not p.requires_grad for p in model.target_projector.parameters())
    assert not model.target_projector.training
    # a fresh target projector equals the projector; momentum_update moves it by the EMA formula
    assert_same_tensors(dict(model.projector.named_parameters()), dict(model.target_projector.named_parameters()))
    with torch.no_grad():
        for p in model.projector.parameters():
            p.add_(0.1)
    before = {k: v.clone() for k, v in model.target_projector.named_parameters()}
    online = dict(model.projector.named_parameters())
    model.momentum_update(0.9)
    for name, p in model.target_projector.named_parameters():
        assert_ema(p, before[name], online[name], 0.9, name)
    # saved and restored with the rest
    model.save_pretrained(tmp_path)
    loaded = CIMForPreTraining.from_pretrained(tmp_path)
    assert_same_tensors(model.state_dict(), loaded.state_dict())


def test_shared_target_encoder_mode(tiny_vit_config, search_views, tmp_path):
    model = build(tiny_vit_config(target_encoder_mode="shared"))
    assert not hasattr(model, "target_encoder")
    assert not any(k.startswith("target_") for k in model.state_dict())
    model.train()
    x = search_views()
    out = model(x, generator=gen())
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert model.vit.layers[0].attention.q_proj.weight.grad is not None
    model.momentum_update(0.9)  # nothing to update: a no-op
    model.save_pretrained(tmp_path)
    loaded = CIMForPreTraining.from_pretrained(tmp_path)
    assert not hasattr(loaded, "target_encoder")
    model.eval()
    assert torch.equal(model(x, generator=gen(1)).logits, loaded(x, generator=gen(1)).logits)


# ------------------------------------------------------------------------ the authors' model, as switches


def _uniform_bound_check(weight: torch.Tensor, bound: float) -> None:
    """Samples of U(-bound, bound): never beyond the bound, filling it, with the uniform's std bound / sqrt(3)."""
    assert weight.abs().max() <= bound + 1e-7
    assert weight.abs().max() > 0.95 * bound
    assert abs(weight.std().item() - bound / math.sqrt(3)) < 0.05 * bound


def test_authors_init_reaches_the_nested_vit_encoders(tiny_vit_config):
    torch.manual_seed(0)
    config = tiny_vit_config()
    model = CIMForPreTraining(config)
    width = config.encoder_config.hidden_size
    patch = config.encoder_config.patch_size
    for encoder in (model.vit, model.target_encoder):
        projection = encoder.embeddings.patch_embeddings.projection.weight
        _uniform_bound_check(projection, math.sqrt(6.0 / (3 * patch * patch + width)))  # xavier as a Linear
        assert not encoder.embeddings.patch_embeddings.projection.bias.any()
        layer = encoder.layers[0]
        # q, k, v: the authors' fused (3D x D) matrix; the rest: plain xavier
        _uniform_bound_check(layer.attention.q_proj.weight, math.sqrt(6.0 / (4 * width)))
        _uniform_bound_check(
            layer.mlp.fc1.weight if hasattr(layer, "mlp") else layer.intermediate.dense.weight,
            math.sqrt(6.0 / (width + config.encoder_config.intermediate_size)),
        )
        assert abs(encoder.embeddings.cls_token.std().item() - 0.02) < 0.01
    assert torch.equal(
        model.vit.layers[0].attention.q_proj.weight, model.target_encoder.layers[0].attention.q_proj.weight
    )


def test_stock_init_is_a_switch(tiny_vit_config):
    torch.manual_seed(0)
    model = CIMForPreTraining(tiny_vit_config(encoder_init="transformers"))
    projection = model.vit.embeddings.patch_embeddings.projection.weight
    assert abs(projection.std().item() - 0.02) < 0.003  # transformers' truncated normal, std 0.02


def test_authors_init_leaves_loaded_weights_alone(tiny_vit_config, tmp_path):
    model = CIMForPreTraining(tiny_vit_config())
    with torch.no_grad():
        model.vit.layers[0].attention.q_proj.weight.fill_(0.125)
    model.save_pretrained(tmp_path)
    loaded = CIMForPreTraining.from_pretrained(tmp_path)
    assert torch.equal(loaded.vit.layers[0].attention.q_proj.weight, model.vit.layers[0].attention.q_proj.weight)


def test_shared_decoder_norm_switch(tiny_vit_config):
    shared = CIMForPreTraining(tiny_vit_config())
    separate = CIMForPreTraining(tiny_vit_config(decoder_shared_norm=False))
    assert shared.decoder.layers[0].key_value_norm is None
    names = {n for n, _ in separate.decoder.named_parameters()}
    assert "layers.0.key_value_norm.weight" in names
    # with one norm, changing its scale changes the exemplar side too
    context = torch.randn(1, 10, shared.config.encoder_hidden_size)
    exemplar = torch.randn(1, 2, 5, shared.config.encoder_hidden_size)
    before = shared.decoder(context, exemplar)
    with torch.no_grad():
        shared.decoder.layers[0].query_norm.weight.mul_(2.0)
    assert not torch.allclose(before, shared.decoder(context, exemplar))


@pytest.mark.parametrize("align_corners", [True, False])
def test_logit_upsampling_follows_align_corners(align_corners, tiny_vit_config):
    model = CIMForPreTraining(tiny_vit_config(decoder_align_corners=align_corners)).eval()
    hidden = model.config.encoder_hidden_size
    context, exemplar = torch.randn(1, 10, hidden), torch.randn(1, 2, 5, hidden)
    logits = model.decoder(context, exemplar)  # (1, 2, 48, 48) from a 3 x 3 grid
    decoder = model.decoder
    queries = decoder.input_proj(context) + decoder.context_position_embedding(3, context.device, context.dtype)
    queries = queries.repeat_interleave(2, dim=0)
    kv = decoder.input_proj(exemplar.flatten(0, 1))
    queries = decoder.norm(decoder.layers[0](queries, kv))[:, 1:]
    grid = decoder.predictor(queries.transpose(1, 2).reshape(2, -1, 3, 3))
    expected = torch.nn.functional.interpolate(grid, size=(48, 48), mode="bilinear", align_corners=align_corners)
    other = torch.nn.functional.interpolate(grid, size=(48, 48), mode="bilinear", align_corners=not align_corners)
    torch.testing.assert_close(logits[0], expected[:, 0])
    assert not torch.allclose(logits[0], other[:, 0], atol=1e-3)


def test_encoder_width_the_heads_do_not_divide_is_refused():
    from transformers_cim import CIMConfig, preset_encoder_config

    encoder = preset_encoder_config("vit-tiny-patch16")
    encoder.hidden_size, encoder.num_attention_heads = 100, 3
    with pytest.raises(ValueError, match="not divisible by its `num_attention_heads`"):
        CIMConfig(encoder_config=encoder)


@pytest.mark.parametrize("implementation", ["eager", "sdpa", "flex_attention"])
def test_resnet_models_take_every_attention_implementation_the_class_claims(
    implementation, tiny_resnet_config, search_views, tmp_path
):
    """`_supports_sdpa` / `_supports_flex_attn` hold for a ResNet encoder too: the implementation asked for is the
    decoder's (the ResNet has no attention and stays as it is), through `from_pretrained` and
    `set_attn_implementation`, and the logits do not change."""
    assert CIMForPreTraining._supports_sdpa and CIMForPreTraining._supports_flex_attn
    build(tiny_resnet_config()).save_pretrained(tmp_path)
    reference = CIMForPreTraining.from_pretrained(tmp_path, attn_implementation="eager").eval()
    loaded = CIMForPreTraining.from_pretrained(tmp_path, attn_implementation=implementation).eval()
    switched = CIMForPreTraining.from_pretrained(tmp_path).eval()
    switched.set_attn_implementation(implementation)
    x = search_views()
    with torch.no_grad():  # flex attention has no CPU backward
        expected = reference(x, generator=gen(2)).logits
        for model in (loaded, switched):
            assert model.config._attn_implementation == implementation
            torch.testing.assert_close(model(x, generator=gen(2)).logits, expected, rtol=0, atol=1e-5)


def test_a_resnet_model_dispatches_its_decoder_to_the_chosen_backend(tiny_resnet_config, search_views):
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    calls = []

    def counting_attention(module, query, key, value, attention_mask, **kwargs):
        calls.append(type(module).__name__)
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("cim_test_counting_resnet", counting_attention)
    model = build(tiny_resnet_config())
    model.set_attn_implementation("cim_test_counting_resnet")
    model(search_views(), generator=gen(3))
    assert "CIMCrossAttention" in calls


def test_decoder_attention_goes_through_the_configured_backend(tiny_vit_config, search_views):
    """The decoder's cross-attention is dispatched through transformers' attention interface, so the backend
    the config names (sdpa, flash, flex, or a registered one) is the one that runs."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    calls = []

    def counting_attention(module, query, key, value, attention_mask, **kwargs):
        calls.append(type(module).__name__)
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("cim_test_counting", counting_attention)
    model = build(tiny_vit_config())
    x = search_views()
    reference = model(x, generator=gen(3)).logits
    model.set_attn_implementation("cim_test_counting")
    counted = model(x, generator=gen(3)).logits
    assert "CIMCrossAttention" in calls
    torch.testing.assert_close(counted, reference, rtol=0, atol=1e-5)


def test_gradient_checkpointing_works_for_resnet_encoders(tiny_resnet_config, search_views):
    """supports_gradient_checkpointing holds for ResNet too: each stage is recomputed in backward, with the same
    loss, gradients and BatchNorm running statistics as without checkpointing."""
    torch.manual_seed(0)
    plain = CIMForPreTraining(tiny_resnet_config()).train()
    ckpt = copy.deepcopy(plain)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # renamed activation_checkpointing_* in 5.x
        ckpt.gradient_checkpointing_enable()
    assert ckpt.is_gradient_checkpointing and not plain.is_gradient_checkpointing
    assert ckpt.state_dict().keys() == plain.state_dict().keys()  # checkpoints load and save unchanged
    calls = {"plain": 0, "ckpt": 0}
    for name, model in (("plain", plain), ("ckpt", ckpt)):
        # the first block of a stage runs again when backward recomputes the stage (the recomputation stops once
        # the last tensor backward needs is rebuilt, so a hook on the whole stage would not see it end)
        model.resnet.encoder.stages[0].layers[0].layer[0].register_forward_hook(
            lambda *args, name=name: calls.__setitem__(name, calls[name] + 1)
        )
    x = search_views()
    loss, grads = _gradients(plain, x)
    loss_ckpt, grads_ckpt = _gradients(ckpt, x)
    assert calls["plain"] >= 1 and calls["ckpt"] == 2 * calls["plain"]  # every stage pass recomputed once
    torch.testing.assert_close(loss_ckpt, loss, rtol=0, atol=1e-6)
    assert grads.keys() == grads_ckpt.keys() and len(grads) > 20
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], rtol=0, atol=1e-5, msg=name)
    buffers = dict(plain.named_buffers())
    for name, buffer in ckpt.named_buffers():  # running statistics updated once per forward, as without
        torch.testing.assert_close(buffer, buffers[name], rtol=0, atol=1e-6, msg=name)
    with torch.no_grad():  # no backward to replay: no checkpointing, no recomputation
        calls["ckpt"] = 0
        ckpt(x, generator=gen(5))
    assert calls["ckpt"] == calls["plain"]


@pytest.mark.parametrize("shared_norm", [True, False])
def test_decoder_shares_query_work_across_exemplars(shared_norm, tiny_vit_config):
    """The first layer normalises and projects each image's context queries once and broadcasts them over
    its K exemplars: the logits equal those of repeating the queries K times first."""
    torch.manual_seed(0)
    model = CIMForPreTraining(tiny_vit_config(decoder_shared_norm=shared_norm, decoder_num_layers=2)).eval()
    decoder, hidden = model.decoder, model.config.encoder_hidden_size
    context, exemplar = torch.randn(2, 10, hidden), torch.randn(2, 3, 5, hidden)
    logits = decoder(context, exemplar)
    queries = decoder.input_proj(context) + decoder.context_position_embedding(3, context.device, context.dtype)
    queries = queries.repeat_interleave(3, dim=0)  # the per-exemplar way
    kv = decoder.input_proj(exemplar.flatten(0, 1))
    for layer in decoder.layers:
        queries = layer(queries, kv)
    grid = decoder.predictor(decoder.norm(queries)[:, 1:].transpose(1, 2).reshape(6, -1, 3, 3))
    expected = torch.nn.functional.interpolate(grid, size=(48, 48), mode="bilinear", align_corners=True)
    torch.testing.assert_close(logits, expected.view(2, 3, 48, 48), rtol=0, atol=1e-6)
    # image b's exemplars see image b's queries only
    swapped = decoder(context.flip(0), exemplar.flip(0))
    torch.testing.assert_close(swapped, logits.flip(0), rtol=0, atol=1e-6)


def test_resnet_channels_last_matches_default_layout_and_saves(tmp_path, tiny_resnet_config, search_views):
    torch.manual_seed(0)
    model = CIMForPreTraining(tiny_resnet_config(exemplar_augmentation=False)).eval()  # no random draws
    x = search_views(batch=2)
    boxes = torch.tensor([[[0.5, 0.5, 0.4, 0.3, 0.2], [0.3, 0.6, 0.3, 0.5, -0.4]]] * 2)
    with torch.no_grad():
        want = model(x, exemplar_boxes=boxes).loss
        fast = model.to(memory_format=torch.channels_last)
        conv = next(m for m in fast.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1))
        assert conv.weight.is_contiguous(memory_format=torch.channels_last)
        got = fast(x, exemplar_boxes=boxes).loss
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    fast.save_pretrained(tmp_path / "cl")
    reloaded = CIMForPreTraining.from_pretrained(tmp_path / "cl").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x, exemplar_boxes=boxes).loss, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", ["authors", "transformers"])
def test_position_interpolation_switch(tiny_vit_config, mode):
    """The encoders' position table for a smaller input: the authors' `scale_factor=(g + 0.1) / N` bicubic (written
    out here from their formula) or the stock ViT's `size=(g, g)`; at the table's own size both return it as is."""
    import torch.nn.functional as F

    model = CIMForPreTraining(tiny_vit_config(position_interpolation=mode))
    table = model.vit.embeddings.position_embeddings  # 64 px views, patch 16: a 4 x 4 table
    patch_grid = table[:, 1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
    tokens = torch.zeros(1, 1 + 9, table.shape[-1])  # a 48 px context: 3 x 3 patches
    if mode == "authors":
        resized = F.interpolate(patch_grid, scale_factor=(3.1 / 4, 3.1 / 4), mode="bicubic", align_corners=False)
    else:
        resized = F.interpolate(patch_grid, size=(3, 3), mode="bicubic", align_corners=False)
    want = torch.cat((table[:, :1], resized.permute(0, 2, 3, 1).reshape(1, 9, -1)), dim=1)
    for encoder in (model.vit, model.target_encoder):
        torch.testing.assert_close(encoder.embeddings.interpolate_pos_encoding(tokens, 48, 48), want)
        assert torch.equal(encoder.embeddings.interpolate_pos_encoding(torch.zeros(1, 17, 1), 64, 64), table)
    assert type(model.vit) is ViTModel  # still the stock class: exports and pipelines see a plain ViT
    other = (
        F.interpolate(patch_grid, size=(3, 3), mode="bicubic", align_corners=False)
        if mode == "authors"
        else F.interpolate(patch_grid, scale_factor=(3.1 / 4, 3.1 / 4), mode="bicubic", align_corners=False)
    )
    assert not torch.allclose(other, resized)  # the two modes really differ at this size


# ------------------------------------------------------------------------------------------------ prior bias


def test_prior_bias_starts_the_decoder_at_the_constant_prior(tiny_vit_config, search_views, tmp_path):
    """With `decoder_prior_bias` the logits are the prior's plus the decoder's output: with the predictor zeroed the
    model predicts the prior exactly, scoring the prior's loss; the bias is saved, reloaded, and not weight-decayed."""
    from transformers_cim.pretext_metrics import correlation_prior, prior_logits, prior_metrics
    from transformers_cim.training.trainer import CIMTrainer

    config = tiny_vit_config(decoder_prior_bias=True)
    model = build(config)
    expected = prior_logits(correlation_prior(config, generator=gen(0)))
    assert torch.equal(model.decoder.prior_bias, expected)
    assert model.decoder.prior_bias.requires_grad
    with torch.no_grad():
        model.decoder.predictor.weight.zero_()
        model.decoder.predictor.bias.zero_()
    out = model(search_views(), generator=gen(4))
    torch.testing.assert_close(out.logits, expected.expand_as(out.logits), rtol=0, atol=0)
    prior_loss, _ = prior_metrics(correlation_prior(config, generator=gen(0)), out.correlation_labels, config)
    torch.testing.assert_close(out.loss, prior_loss)
    model.save_pretrained(tmp_path)
    assert torch.equal(CIMForPreTraining.from_pretrained(tmp_path).decoder.prior_bias, expected)
    assert "decoder.prior_bias" not in CIMTrainer.get_decay_parameter_names(None, model)
    assert "decoder.predictor.weight" in CIMTrainer.get_decay_parameter_names(None, model)


def test_without_prior_bias_the_decoder_has_the_authors_parameters_only(tiny_vit_config):
    model = build(tiny_vit_config())
    assert not any("prior_bias" in name for name, _ in model.named_parameters())
