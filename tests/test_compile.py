"""The whole pre-training forward (pretext sampling, both encoders, decoder, loss) compiles as one graph.

Slow (about a minute of compilation on a CPU): run with `python -m pytest -m slow tests/test_compile.py`.
Known limit: a `torch.Generator` argument is not traceable by dynamo, so a compiled step samples from the global
RNG (or takes explicit `exemplar_boxes`); the Trainer's per-step generators are for eager runs.
"""

from __future__ import annotations

import pytest
import torch

from transformers_cim import CIMForPreTraining

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("single_thread")]


def assert_compiled_step_matches_eager(
    model: CIMForPreTraining, x: torch.Tensor, boxes: torch.Tensor, x_again: torch.Tensor, grad_atol: float = 1e-5
) -> None:
    """One full-graph compiled step (any graph break is an error) gives the eager loss and gradients, and a second
    call with the same shapes and other values does not recompile."""

    def step(pixel_values: torch.Tensor, exemplar_boxes: torch.Tensor) -> torch.Tensor:
        return model(pixel_values, exemplar_boxes=exemplar_boxes).loss

    compiled = torch.compile(step, fullgraph=True)
    loss = compiled(x, boxes)
    loss.backward()
    compiled_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    eager = step(x, boxes)
    eager.backward()
    torch.testing.assert_close(loss, eager, rtol=1e-4, atol=1e-5)
    for name, grad in compiled_grads.items():
        torch.testing.assert_close(grad, dict(model.named_parameters())[name].grad, rtol=1e-3, atol=grad_atol)
    graphs_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    compiled(x_again, boxes.flip(1).contiguous())
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs_before


def test_full_step_compiles_without_graph_breaks_and_matches_eager(tiny_vit_config, search_views):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = CIMForPreTraining(tiny_vit_config(exemplar_augmentation=False))
    boxes = torch.tensor([[[0.5, 0.5, 0.4, 0.3, 0.2], [0.3, 0.6, 0.3, 0.5, -0.4], [0.6, 0.4, 0.5, 0.4, 0.7]]] * 2)
    assert_compiled_step_matches_eager(model, search_views(batch=2), boxes, search_views(batch=2, seed=1))


def test_pretext_sampling_from_the_global_rng_compiles(tiny_vit_config, search_views):
    torch._dynamo.reset()
    model = CIMForPreTraining(tiny_vit_config())  # augmentation on: every random draw inside the graph
    compiled = torch.compile(lambda x: model(x).loss, fullgraph=True)
    loss = compiled(search_views(batch=2))
    assert torch.isfinite(loss)


@pytest.mark.parametrize("channels_last", [False, True])
def test_resnet_step_compiles_without_graph_breaks_and_matches_eager(tiny_resnet_config, search_views, channels_last):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = CIMForPreTraining(tiny_resnet_config(exemplar_augmentation=False))
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    boxes = torch.tensor([[[0.5, 0.5, 0.4, 0.3, 0.2], [0.3, 0.6, 0.3, 0.5, -0.4]]] * 2)
    assert_compiled_step_matches_eager(
        model, search_views(batch=2), boxes, search_views(batch=2, seed=1), grad_atol=1e-4
    )


def test_trainer_torch_compile_matches_the_eager_run(tmp_path, tiny_vit_config, search_views, monkeypatch):
    """`--torch_compile` through the Trainer: the compiled step samples from the global RNG seeded with the eager
    generator's seed (`CIMTrainer.compiled_pretext_rng`); with inductor's eager-equal random ops the two runs draw the
    same exemplars, so their losses agree step by step."""
    from transformers import TrainingArguments

    from transformers_cim.training.data import SkippingCollator
    from transformers_cim.training.trainer import CIMTrainer

    monkeypatch.setattr(torch._inductor.config, "fallback_random", True)
    rows = [{"pixel_values": v, "cim_valid": True} for v in search_views(batch=8, seed=3)]

    def run(compile_: bool, out: str) -> list[float]:
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = CIMForPreTraining(tiny_vit_config())
        args = TrainingArguments(
            output_dir=out,
            use_cpu=True,
            report_to="none",
            save_strategy="no",
            max_steps=3,
            per_device_train_batch_size=4,
            learning_rate=1e-3,
            logging_steps=1,
            seed=0,
            disable_tqdm=True,
            dataloader_num_workers=0,
            remove_unused_columns=False,
            torch_compile=compile_,
        )
        trainer = CIMTrainer(model=model, args=args, train_dataset=rows, data_collator=SkippingCollator())
        trainer.train()
        return [e["loss"] for e in trainer.state.log_history if "loss" in e]

    eager = run(False, str(tmp_path / "eager"))
    compiled = run(True, str(tmp_path / "compiled"))
    assert len(eager) == len(compiled) == 3
    for a, b in zip(eager, compiled):
        assert a == pytest.approx(b, rel=1e-3)
