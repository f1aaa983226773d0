"""The package never unpickles arbitrary objects: no pickle.load anywhere in src/, and torch.load only with
weights_only=True (the converter of the authors' .pth checkpoints)."""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "transformers_cim"
UNSAFE_CALLS = {("torch", "load"), ("pickle", "load"), ("pickle", "loads"), ("dill", "load")}


def _weights_only(call: ast.Call) -> bool:
    """A `torch.load(..., weights_only=True)` call: torch's restricted unpickler (tensors and plain containers)."""
    return any(
        k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True for k in call.keywords
    )


def _unsafe_calls(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and isinstance(node.func.value, ast.Name)
        ):
            if (node.func.value.id, node.func.attr) in UNSAFE_CALLS and not _weights_only(node):
                found.append(f"{path.name}:{node.lineno} {node.func.value.id}.{node.func.attr}")
    return found


def test_scanner_detects_unsafe_call(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import torch\nstate = torch.load('x.bin')\nother = torch.load('y.pth', weights_only=False)\n"
        "safe = torch.load('z.pth', map_location='cpu', weights_only=True)\n"
    )
    assert _unsafe_calls(bad) == ["bad.py:2 torch.load", "bad.py:3 torch.load"]


@pytest.mark.parametrize("path", sorted(SRC.rglob("*.py")), ids=lambda p: p.name)
def test_no_pickle_loading_in_package(path):
    assert _unsafe_calls(path) == []


def test_cim_from_pretrained_refuses_pickle_weights(tmp_path):
    import torch

    from transformers_cim import CIMConfig, CIMForPreTraining

    config = CIMConfig.from_preset(
        "vit-tiny-patch16",
        image_size=32,
        context_size=32,
        exemplar_size=16,
        num_exemplars=1,
        decoder_hidden_size=32,
        decoder_num_attention_heads=2,
    )
    config.encoder_config.num_hidden_layers = 1
    model = CIMForPreTraining(CIMConfig.from_dict(config.to_dict()))
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")  # a pickle-only checkpoint
    with pytest.raises((OSError, EnvironmentError, ValueError)):
        CIMForPreTraining.from_pretrained(tmp_path)
