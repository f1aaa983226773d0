"""Tests for transformers_cim.training.trainer: the momentum schedule and callback, the pretext IoU, weight-decay
groups,
logging, the non-finite-loss stop, batches whose every image was dropped, and exact pretext sampling per step."""

from __future__ import annotations

import math
import os

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback, TrainingArguments, ViTConfig

from transformers_cim import CIMConfig, CIMForPreTraining
from transformers_cim.hub_card import has_cim_card, write_model_card
from transformers_cim.training.data import SkippingCollator
from transformers_cim.training.modelcard import build_model_card
from transformers_cim.training.trainer import (
    CIMTrainer,
    MomentumCallback,
    NonFiniteLossError,
    correlation_iou,
    cosine_momentum,
    unwrap_cim,
)

pytestmark = pytest.mark.usefixtures("single_thread")

SIZE = 32


# ---------------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------------


def tiny_config(**overrides) -> CIMConfig:
    """1-layer, 32-wide ViT with 8 px patches: 32 px views, 24 px context (3x3 tokens), 2 exemplars of 8 px."""
    encoder = ViTConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        patch_size=8,
        layer_norm_eps=1e-6,
        qkv_bias=True,
    )
    kwargs = dict(
        image_size=SIZE,
        context_size=24,
        exemplar_size=8,
        num_exemplars=2,
        decoder_hidden_size=32,
        decoder_num_attention_heads=2,
    )
    kwargs.update(overrides)
    return CIMConfig(encoder_config=encoder, **kwargs)


def tiny_model(seed: int = 0, **overrides) -> CIMForPreTraining:
    torch.manual_seed(seed)
    return CIMForPreTraining(tiny_config(**overrides))


def rows(count: int, seed: int = 0) -> list[dict]:
    """Map-style rows as the pre-training transform makes them (valid search views)."""
    g = torch.Generator().manual_seed(seed)
    return [{"pixel_values": torch.randn(3, SIZE, SIZE, generator=g), "cim_valid": True} for _ in range(count)]


class OrderedRows(torch.utils.data.IterableDataset):
    """Rows in a fixed order (no sampler shuffling), valid or not as `flags` says; invalid rows carry the zero
    placeholder the data pipeline puts in place of an undecodable image."""

    def __init__(self, flags: list[bool]):
        self.flags = flags

    def __iter__(self):
        g = torch.Generator().manual_seed(0)
        for ok in self.flags:
            pixels = torch.randn(3, SIZE, SIZE, generator=g)
            yield {"pixel_values": pixels if ok else torch.zeros(3, SIZE, SIZE), "cim_valid": ok}


def training_args(output_dir, **overrides) -> TrainingArguments:
    kwargs = dict(
        output_dir=str(output_dir),
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        remove_unused_columns=False,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        max_steps=4,
        logging_steps=1,
        seed=0,
        weight_decay=0.05,
    )
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def make_trainer(model, train_dataset, output_dir, callbacks=None, **args) -> CIMTrainer:
    return CIMTrainer(
        model=model,
        args=training_args(output_dir, **args),
        train_dataset=train_dataset,
        data_collator=SkippingCollator(),
        callbacks=callbacks,
    )


def count_compute_loss(trainer: CIMTrainer) -> list:
    """Instruments `trainer.compute_loss`; returns the list of the pixel_values shapes it was called with."""
    shapes = []
    original = trainer.compute_loss

    def compute_loss(model, inputs, *args, **kwargs):
        if model.training:
            shapes.append(tuple(inputs["pixel_values"].shape))
        return original(model, inputs, *args, **kwargs)

    trainer.compute_loss = compute_loss
    return shapes


# ---------------------------------------------------------------------------------------------------------------
# cosine_momentum
# ---------------------------------------------------------------------------------------------------------------


def test_cosine_momentum_end_points_and_midpoint():
    assert cosine_momentum(0, 100, 0.99, 1.0) == pytest.approx(0.99, abs=1e-12)
    assert cosine_momentum(100, 100, 0.99, 1.0) == pytest.approx(1.0, abs=1e-12)
    assert cosine_momentum(50, 100, 0.99, 1.0) == pytest.approx(0.995, abs=1e-12)
    assert cosine_momentum(3, 6, 0.5, 0.9) == pytest.approx(0.7, abs=1e-12)
    # beyond the end (a run continued past max_steps) it stays at the end value; never below start
    assert cosine_momentum(150, 100, 0.99, 1.0) == pytest.approx(1.0, abs=1e-12)
    assert cosine_momentum(-5, 100, 0.99, 1.0) == pytest.approx(0.99, abs=1e-12)


@pytest.mark.parametrize(
    ("step", "max_steps", "start", "end", "expected"),
    [
        # end - (end - start) * (cos(pi * step / max_steps) + 1) / 2, worked out by hand
        (25, 100, 0.99, 1.0, 1.0 - 0.01 * (math.sqrt(0.5) + 1) / 2),  # 0.991464466...
        (75, 100, 0.99, 1.0, 1.0 - 0.01 * (1 - math.sqrt(0.5)) / 2),  # 0.998535533...
        (1, 3, 0.9, 1.0, 1.0 - 0.1 * 0.75),  # cos(pi/3) = 1/2
        (2, 3, 0.9, 1.0, 1.0 - 0.1 * 0.25),  # cos(2pi/3) = -1/2
        (1, 6, 0.0, 1.0, 1.0 - (math.sqrt(3) / 2 + 1) / 2),  # cos(pi/6)
    ],
)
def test_cosine_momentum_formula(step, max_steps, start, end, expected):
    assert cosine_momentum(step, max_steps, start, end) == pytest.approx(expected, abs=1e-12)


def test_cosine_momentum_is_monotone_for_increasing_schedule():
    values = [cosine_momentum(s, 40, 0.99, 1.0) for s in range(41)]
    assert all(b >= a for a, b in zip(values, values[1:]))
    assert values[0] == pytest.approx(0.99) and values[-1] == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------------------------
# correlation_iou
# ---------------------------------------------------------------------------------------------------------------


def test_correlation_iou_exact_on_hand_built_maps():
    labels = torch.zeros(1, 3, 4, 4)
    logits = torch.full((1, 3, 4, 4), -10.0)
    # map 0: truth = top-left 2x2 (4 px), prediction = top row left 2 + 2 px outside -> inter 2, union 6
    labels[0, 0, :2, :2] = 1
    logits[0, 0, 0, :2] = 10
    logits[0, 0, 3, 2:] = 10
    # map 1: both empty -> counted as a perfect 1.0
    # map 2: truth = whole first column (4 px), prediction = the same column -> 1.0
    labels[0, 2, :, 0] = 1
    logits[0, 2, :, 0] = 3
    iou = correlation_iou(logits, labels)
    assert iou.item() == pytest.approx((2 / 6 + 1.0 + 1.0) / 3, abs=1e-7)


def test_correlation_iou_threshold_and_misses():
    labels = torch.zeros(2, 1, 3, 3)
    labels[0, 0, 1, 1] = 1  # 1 true pixel, predicted nowhere -> IoU 0
    labels[1, 0] = 1  # 9 true pixels
    logits = torch.full((2, 1, 3, 3), -5.0)
    logits[1, 0, 0] = 0.0  # sigmoid(0) = 0.5 is NOT > 0.5
    logits[1, 0, 1:] = 0.1  # 6 pixels just above the threshold -> IoU 6/9
    assert correlation_iou(logits, labels).item() == pytest.approx((0.0 + 6 / 9) / 2, abs=1e-7)
    # a higher threshold drops the 0.1 logits (sigmoid 0.525) too
    assert correlation_iou(logits, labels, threshold=0.6).item() == pytest.approx(0.0, abs=1e-7)


# ---------------------------------------------------------------------------------------------------------------
# weight decay groups
# ---------------------------------------------------------------------------------------------------------------


def test_decay_parameter_names_exclude_norms_biases_and_tokens(tmp_path):
    # trainable position embeddings so that their exclusion is a decision of the trainer, not of freezing
    # one learning rate for every parameter: the predictor's own groups are tested below
    model = tiny_model(
        use_sincos_position_embeddings=False, freeze_patch_embedding=False, decoder_predictor_lr_scale=1
    )
    trainer = make_trainer(model, rows(4), tmp_path)
    decay = set(trainer.get_decay_parameter_names(model))
    names = dict(model.named_parameters())
    assert "vit.embeddings.cls_token" in names and "vit.embeddings.position_embeddings" in names
    for name in decay:
        assert not name.endswith(".bias"), name
        assert "norm" not in name, name
        assert "cls_token" not in name and "position_embeddings" not in name, name
    # every matrix / conv kernel of the encoder and decoder is decayed
    expected = {n for n, p in names.items() if p.ndim >= 2 and "cls_token" not in n and "position_embeddings" not in n}
    assert decay == expected
    assert "decoder.input_proj.weight" in decay and "decoder.predictor.weight" in decay
    assert any(n.startswith("vit.") and n.endswith("q_proj.weight") for n in decay)
    assert "vit.embeddings.patch_embeddings.projection.weight" in decay

    # the optimizer really uses them: two groups, with wd on exactly the trainable decay parameters
    optimizer = trainer.create_optimizer()
    by_id = {id(p): n for n, p in names.items()}
    groups = {g["weight_decay"]: {by_id[id(p)] for p in g["params"]} for g in optimizer.param_groups}
    assert set(groups) == {0.05, 0.0}
    trainable = {n for n, p in names.items() if p.requires_grad}
    assert groups[0.05] == decay & trainable
    assert groups[0.0] == trainable - decay
    assert {"vit.embeddings.cls_token", "vit.embeddings.position_embeddings"} <= groups[0.0]
    assert any(n.endswith("layernorm_before.weight") for n in groups[0.0])
    # the EMA target is out of the optimizer
    assert not any(n.startswith("target_encoder.") for g in groups.values() for n in g)


# ---------------------------------------------------------------------------------------------------------------
# the momentum callback
# ---------------------------------------------------------------------------------------------------------------


class SnapshotOnline(TrainerCallback):
    """Copies the online encoder's parameters right after each optimizer step (before the EMA update)."""

    def __init__(self):
        self.snapshots: list[dict[str, torch.Tensor]] = []

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.snapshots.append({n: p.detach().clone() for n, p in model.vit.named_parameters()})


def test_momentum_callback_updates_once_per_optimizer_step_with_accumulation(tmp_path):
    model = tiny_model(momentum_start=0.5, momentum_end=1.0)
    target_start = {n: p.detach().clone() for n, p in model.target_encoder.named_parameters()}
    online_start = {n: p.detach().clone() for n, p in model.vit.named_parameters()}
    assert all(torch.equal(target_start[n], online_start[n]) for n in target_start)  # a fresh model: target = online
    snapshots = SnapshotOnline()
    trainer = make_trainer(
        model,
        rows(16),
        tmp_path,
        callbacks=[snapshots],
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        max_steps=4,
    )
    micro_batches = count_compute_loss(trainer)
    updates = []
    original_update = model.momentum_update

    def momentum_update(momentum):
        updates.append((trainer.state.global_step, momentum))
        original_update(momentum)

    model.momentum_update = momentum_update
    trainer.train()

    assert len(micro_batches) == 8  # 4 optimizer steps x 2 micro-batches
    assert [step for step, _ in updates] == [1, 2, 3, 4]  # once per optimizer step, after global_step += 1
    expected_momenta = [cosine_momentum(s, 4, 0.5, 1.0) for s in range(4)]
    assert [m for _, m in updates] == pytest.approx(expected_momenta, abs=1e-12)
    assert trainer.momentum_callback.last_momentum == pytest.approx(expected_momenta[-1], abs=1e-12)

    # the target equals the EMA computed by hand from the online weights after each optimizer step
    assert len(snapshots.snapshots) == 4
    manual = {n: t.clone() for n, t in target_start.items()}
    for momentum, online in zip(expected_momenta, snapshots.snapshots):
        for name in manual:
            manual[name].mul_(momentum).add_(online[name], alpha=1.0 - momentum)
    final_target = dict(model.target_encoder.named_parameters())
    final_online = dict(model.vit.named_parameters())
    for name, value in manual.items():
        torch.testing.assert_close(final_target[name].detach(), value, rtol=0, atol=1e-6)
    # non-trivial: the target moved away from its start and lags behind the online encoder
    moved = [n for n in manual if not torch.equal(final_target[n], target_start[n])]
    assert "layers.0.attention.q_proj.weight" in moved
    assert not torch.allclose(
        final_target["layers.0.attention.q_proj.weight"], final_online["layers.0.attention.q_proj.weight"]
    )
    # the target stays frozen and in eval mode
    assert not any(p.requires_grad for p in model.target_encoder.parameters())
    assert not model.target_encoder.training


def test_momentum_callback_is_added_once(tmp_path):
    model = tiny_model()
    trainer = CIMTrainer(
        model=model,
        args=training_args(tmp_path),
        train_dataset=rows(4),
        data_collator=SkippingCollator(),
        callbacks=[MomentumCallback()],
    )
    assert sum(isinstance(cb, MomentumCallback) for cb in trainer.callback_handler.callbacks) == 1


def test_augmentation_ramp_callback_sets_the_strength_of_every_micro_batch(tmp_path):
    """Ramp 0.5 over 4 optimizer steps of 2 micro-batches: strengths 0, 0.5, 1, 1, the same for both micro-batches of
    a step, logged, and the full recipe again once training ends (what evaluation and a saved model use)."""
    model = tiny_model(exemplar_augmentation_ramp=[0.0, 0.5])
    trainer = make_trainer(
        model, rows(16), tmp_path, per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=4
    )
    seen = []
    original = trainer.compute_loss

    def compute_loss(model, inputs, *args, **kwargs):
        seen.append((trainer.state.global_step, unwrap_cim(model).augmentation_strength.item()))
        return original(model, inputs, *args, **kwargs)

    trainer.compute_loss = compute_loss
    trainer.train()
    assert seen == [(0, 0.0), (0, 0.0), (1, 0.5), (1, 0.5), (2, 1.0), (2, 1.0), (3, 1.0), (3, 1.0)]
    assert [entry["augmentation_strength"] for entry in trainer.state.log_history if "loss" in entry] == [0, 0.5, 1, 1]
    assert model.augmentation_strength.item() == 1.0


def test_without_a_ramp_every_step_uses_the_full_augmentation(tmp_path):
    model = tiny_model()
    trainer = make_trainer(model, rows(8), tmp_path, max_steps=2)
    strengths = []
    original = trainer.compute_loss

    def compute_loss(model, inputs, *args, **kwargs):
        strengths.append(unwrap_cim(model).augmentation_strength.item())
        return original(model, inputs, *args, **kwargs)

    trainer.compute_loss = compute_loss
    trainer.train()
    assert strengths == [1.0, 1.0]


def test_model_card_states_the_exemplar_augmentation_and_its_ramp():
    def row(config) -> str:
        card = build_model_card(
            config, dataset_name="photos", max_steps=1, train_images=None, final_metrics={}, figure=None
        )
        return next(line for line in str(card).splitlines() if line.startswith("| exemplar photometric augmentation"))

    assert "off" in row(tiny_config(exemplar_augmentation=False))
    assert "from the first step" in row(tiny_config())
    assert "from off at 25% of training to the recipe's at 75%" in row(
        tiny_config(exemplar_augmentation_ramp=[0.25, 0.75])
    )
    shared = build_model_card(
        tiny_config(target_encoder_mode="shared"),
        dataset_name="photos",
        max_steps=1,
        train_images=None,
        final_metrics={},
        figure=None,
    )
    assert "| target encoder | shared: the online encoder also encodes the context (no EMA target) |" in str(shared)
    assert "| target encoder | ema, momentum 0.99 -> 1.0 (cosine) |" in str(
        build_model_card(
            tiny_config(), dataset_name="photos", max_steps=1, train_images=None, final_metrics={}, figure=None
        )
    )


def test_create_model_card_keeps_the_cim_card(tmp_path):
    """`push_to_hub` calls create_model_card: the pre-training card in the output dir must survive it."""
    trainer = make_trainer(tiny_model(), rows(4), tmp_path)
    trainer.create_model_card()  # no CIM card yet: the Trainer writes its generic one
    assert (tmp_path / "README.md").is_file() and not has_cim_card(str(tmp_path))
    card = build_model_card(
        tiny_config(), dataset_name="photos", max_steps=1, train_images=None, final_metrics={}, figure=None
    )
    write_model_card(str(tmp_path), card)
    written = (tmp_path / "README.md").read_text()
    trainer.create_model_card()
    assert (tmp_path / "README.md").read_text() == written


# ---------------------------------------------------------------------------------------------------------------
# logging
# ---------------------------------------------------------------------------------------------------------------


def test_logs_contain_loss_momentum_and_pretext_iou(tmp_path):
    trainer = make_trainer(tiny_model(), rows(16), tmp_path, max_steps=4, logging_steps=2)
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["step"] for entry in logged] == [2, 4]
    for entry in logged:
        assert math.isfinite(entry["loss"]) and entry["loss"] > 0
        assert 0.0 <= entry["pretext_iou"] <= 1.0
        # the constant prior scored on the same maps, and the gains over it
        assert 0.0 <= entry["prior_iou"] <= 1.0 and entry["prior_loss"] > 0
        assert entry["pretext_iou_gain"] == pytest.approx(entry["pretext_iou"] - entry["prior_iou"], abs=2e-4)
        assert entry["loss_to_prior"] == pytest.approx(entry["correlation_loss"] / entry["prior_loss"], rel=1e-3)
        assert entry["correlation_loss"] == pytest.approx(entry["loss"], rel=1e-3)  # no contrastive term
        # the momentum of the last EMA update before the log: after optimizer step s it is m(s - 1)
        assert entry["momentum"] == pytest.approx(round(cosine_momentum(entry["step"] - 1, 4, 0.99, 1.0), 6), abs=1e-9)
        assert entry["skipped_images"] == 0


# ---------------------------------------------------------------------------------------------------------------
# non-finite loss
# ---------------------------------------------------------------------------------------------------------------


def test_non_finite_loss_raises_and_last_checkpoint_is_finite(tmp_path):
    model = tiny_model()
    trainer = make_trainer(model, rows(64), tmp_path, max_steps=10, save_strategy="steps", save_steps=2)
    original_forward = model.forward

    def forward(*args, **kwargs):
        outputs = original_forward(*args, **kwargs)
        if trainer.state.global_step == 5 and outputs.loss is not None:
            outputs.loss = outputs.loss * float("nan")
        return outputs

    model.forward = forward
    with pytest.raises(NonFiniteLossError) as excinfo:
        trainer.train()
    message = str(excinfo.value)
    assert "nan" in message and "step 5" in message
    assert "--resume_from_checkpoint" in message and "learning rate" in message
    assert trainer.state.global_step == 5  # stopped before the 6th optimizer step
    # nothing non-finite reached the weights
    assert all(torch.isfinite(p).all() for p in model.parameters())
    checkpoints = sorted(d for d in os.listdir(tmp_path) if d.startswith("checkpoint-"))
    assert checkpoints == ["checkpoint-2", "checkpoint-4"]
    weights = load_file(os.path.join(tmp_path, "checkpoint-4", "model.safetensors"))
    assert any(k.startswith("target_encoder.") for k in weights)
    for name, tensor in weights.items():
        assert torch.isfinite(tensor).all(), name


def test_infinite_loss_also_raises(tmp_path):
    model = tiny_model()
    trainer = make_trainer(model, rows(16), tmp_path, max_steps=3)
    original_forward = model.forward

    def forward(*args, **kwargs):
        outputs = original_forward(*args, **kwargs)
        outputs.loss = outputs.loss + float("inf")
        return outputs

    model.forward = forward
    with pytest.raises(NonFiniteLossError, match=r"The loss became inf at step 0"):
        trainer.train()


# ---------------------------------------------------------------------------------------------------------------
# batches without any usable image
# ---------------------------------------------------------------------------------------------------------------


def test_batch_of_only_invalid_images_is_skipped_and_counted(tmp_path):
    flags = [True] * 4 + [False] * 4 + [True, False, True, False] + [True] * 4
    model = tiny_model()
    trainer = make_trainer(model, OrderedRows(flags), tmp_path, max_steps=4, logging_steps=1)
    shapes = count_compute_loss(trainer)
    trainer.train()
    assert trainer.state.global_step == 4
    assert shapes == [(4, 3, SIZE, SIZE), (0, 3, SIZE, SIZE), (2, 3, SIZE, SIZE), (4, 3, SIZE, SIZE)]
    assert trainer.num_skipped_images == 6
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["skipped_images"] for entry in logged] == [0, 4, 6, 6]
    assert logged[1]["loss"] == 0.0 and "pretext_iou" not in logged[1]  # nothing to score in the empty batch
    assert all(math.isfinite(entry["loss"]) for entry in logged)
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ---------------------------------------------------------------------------------------------------------------
# pretext sampling is a pure function of (seed, step, micro-batch, process)
# ---------------------------------------------------------------------------------------------------------------


def test_pretext_generator_depends_on_step_and_micro_batch_only(tmp_path):
    trainer = make_trainer(tiny_model(), rows(4), tmp_path)

    def draw():
        return torch.rand(4, generator=trainer.pretext_generator(torch.device("cpu")))

    trainer.state.global_step = 7
    first, second = draw(), draw()  # two micro-batches of one optimizer step differ
    assert not torch.equal(first, second)
    torch.manual_seed(123)  # the global RNG (drawn by data augmentation) does not matter
    trainer.state.global_step = 8
    other_step = draw()
    trainer.state.global_step = 7
    assert torch.equal(draw(), first)
    assert not torch.equal(other_step, first)
    assert torch.equal(draw(), second)


def test_skipped_images_counted_once_saved_and_restored(tmp_path, caplog):
    from transformers_cim.training.utils import SkippedImages

    skipped = SkippedImages(log_first=2)
    with caplog.at_level("WARNING"):
        skipped.add([("a.png", "undecodable (OSError: truncated)"), ("row 3", "too small (1x1 px)")])
        skipped.add([("a.png", "undecodable (OSError: truncated)"), (None, "no image data"), ("row 9", "empty")])
    assert skipped.local_count == skipped.total() == 4  # a.png once; the unnamed one each time it is met
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        "Skipped training image a.png: undecodable (OSError: truncated)",
        "Skipped training image row 3: too small (1x1 px) (further skipped images are counted, not logged)",
    ]
    skipped.save(str(tmp_path / "s.json"))
    restored = SkippedImages()
    restored.load(str(tmp_path / "s.json"))
    restored.add([("row 3", "too small"), ("row 4", "too small")])
    assert restored.local_count == 5
    (tmp_path / "old.json").write_text('{"num_skipped_images": 7}')  # a checkpoint of an older version: a count
    restored.load(str(tmp_path / "old.json"))
    assert restored.local_count == 7


def test_compiled_step_rng_is_the_eager_generators_stream_and_restores_the_global_rng(tmp_path):
    trainer = make_trainer(tiny_model(), rows(4), tmp_path)
    trainer.state.global_step = 5
    eager = torch.rand(6, generator=trainer.pretext_generator(torch.device("cpu")))
    trainer._pretext_generators = type(trainer._pretext_generators)(trainer.args.seed, trainer.args.process_index)
    torch.manual_seed(99)
    before = torch.random.get_rng_state()
    with trainer.compiled_pretext_rng(torch.device("cpu")):
        compiled = torch.rand(6)  # what a compiled step draws from the global RNG
    assert torch.equal(compiled, eager)
    assert torch.equal(torch.random.get_rng_state(), before)  # the data pipeline's stream is untouched


def test_bf16_training_through_the_trainer_runs_under_autocast(tmp_path):
    model = tiny_model()
    dtypes = []
    model.decoder.register_forward_hook(lambda module, args, output: dtypes.append(output.dtype))
    trainer = make_trainer(model, rows(8), tmp_path, bf16=True)
    result = trainer.train()
    assert math.isfinite(result.training_loss)
    assert dtypes and all(d == torch.bfloat16 for d in dtypes)  # the decoder ran in bf16
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay fp32


def test_predictor_steps_at_the_scaled_learning_rate_like_the_authors_two_logits(tmp_path):
    """With `decoder_predictor_lr_scale` 2 the predictor has its own groups at 2x lr and wd / 2: from the same start
    and batch, its first AdamW step is twice the step at scale 1 (the decay, lr x wd, unchanged); nothing else moves
    differently."""

    def one_step(scale: float) -> tuple[CIMTrainer, dict[str, torch.Tensor]]:
        model = tiny_model(decoder_predictor_lr_scale=scale)
        trainer = make_trainer(
            model, rows(4), tmp_path / str(scale), max_steps=1, lr_scheduler_type="constant", learning_rate=1e-3
        )
        trainer.train()
        return trainer, {n: p.detach().clone() for n, p in model.named_parameters()}

    start = {n: p.detach().clone() for n, p in tiny_model().named_parameters()}
    trainer, scaled = one_step(2.0)
    _, plain = one_step(1.0)
    groups = [
        g
        for g in trainer.optimizer.param_groups
        if any(p is trainer.model.decoder.predictor.weight for p in g["params"])
    ]
    assert len(groups) == 1 and groups[0]["lr"] == pytest.approx(2e-3) and groups[0]["weight_decay"] == 0.025
    decay = 1e-3 * 0.05
    for name in ("decoder.predictor.weight",):
        step_scaled = scaled[name] - start[name] * (1 - decay)
        step_plain = plain[name] - start[name] * (1 - decay)
        torch.testing.assert_close(step_scaled, 2 * step_plain, rtol=1e-4, atol=1e-7)
        assert step_plain.abs().max() > 1e-4
    for name in ("decoder.predictor.bias",):  # no weight decay on biases
        torch.testing.assert_close(scaled[name] - start[name], 2 * (plain[name] - start[name]), rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(scaled["decoder.input_proj.weight"], plain["decoder.input_proj.weight"])


def test_a_shared_encoder_logs_no_momentum(tmp_path):
    """Without an EMA target there is no momentum to report (the callback's updates are no-ops)."""
    trainer = make_trainer(tiny_model(target_encoder_mode="shared"), rows(8), tmp_path, max_steps=2, logging_steps=1)
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logged and not any("momentum" in entry for entry in logged)
    assert all("augmentation_strength" in entry for entry in logged)
