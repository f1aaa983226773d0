"""This package's CIM against the authors' own code (weivision/Correlational-Image-Modeling), on identical inputs.

Runs only where ``CIM_AUTHORS_CODE`` names a checkout of their repository (CI has no copy of their code) and
``timm`` and ``torchvision``, which their code imports, are installed; skipped with the reason otherwise:

    CIM_AUTHORS_CODE=/path/to/Correlational-Image-Modeling pytest tests/test_authors_code.py

Their model is built with their class and init, saved in their checkpoint format and converted with
``cim-convert-original``'s function; the building and comparing code is ``benchmarks/_authors.py``, shared with
``benchmarks/authors_side_by_side.py``.
"""

from __future__ import annotations

import os
import sys

import pytest

AUTHORS_CODE = os.environ.get("CIM_AUTHORS_CODE")

pytestmark = pytest.mark.skipif(
    not AUTHORS_CODE or not os.path.isfile(os.path.join(AUTHORS_CODE, "models", "cim.py")),
    reason="CIM_AUTHORS_CODE does not point to a checkout of weivision/Correlational-Image-Modeling (set it to run "
    "the comparison with the authors' code)",
)

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))


@pytest.fixture(scope="module")
def authors_module():
    pytest.importorskip("timm", reason="the authors' code imports timm")
    pytest.importorskip("torchvision", reason="the authors' code imports torchvision")
    import _authors_compare

    return _authors_compare


@pytest.fixture(scope="module")
def authors(authors_module):
    return authors_module.import_authors_code(AUTHORS_CODE)


def failing(authors_module, differences) -> list[str]:
    return [
        f"{d.quantity}: {d.max_abs:.3e} at {d.where!r}"
        for d in differences
        if authors_module.gated(d) and not d.max_abs <= authors_module.TOLERANCE
    ]


def test_loss_maps_gradients_and_one_step_equal_the_authors(authors_module, authors, tmp_path):
    """Loss, probabilities, logits, every gradient, the weights after one AdamW step and one EMA update: 1e-5."""
    differences = authors_module.compare_on_fixed_inputs(authors, authors_module.Sizes(), str(tmp_path))
    assert not failing(authors_module, differences)
    quantities = " | ".join(d.quantity for d in differences)
    for expected in ("loss", "probabilities", "gradients (every", "after one AdamW step", "after one EMA update"):
        assert expected in quantities
    gradient_row = next(d for d in differences if d.quantity.startswith("gradients (every"))
    assert gradient_row.compared > 50  # every online and decoder tensor was mapped and compared


def test_two_logit_predictor_moves_twice_as_far_under_adam(authors_module, authors, tmp_path):
    """With one lr for every parameter (our trainer), our predictor's step is half of their W1 - W0's."""
    differences = authors_module.compare_on_fixed_inputs(authors, authors_module.Sizes(), str(tmp_path))
    one_lr = next(d for d in differences if d.quantity.startswith(authors_module.ONE_LR_NOTE))
    assert one_lr.max_abs > 10 * authors_module.TOLERANCE


@pytest.mark.parametrize("weight", ["decoder.layers.0.mlp.2.weight", "vit.layers.1.attention.k_proj.weight"])
def test_a_perturbed_weight_is_detected(authors_module, authors, tmp_path, weight):
    """The comparison can fail: 1e-3 added to one element of one converted weight of ours shows in the maps and
    the gradients, not only in the weights compared after the step."""
    differences = authors_module.compare_on_fixed_inputs(
        authors, authors_module.Sizes(), str(tmp_path), perturb=weight
    )
    failed = failing(authors_module, differences)
    assert any(row.startswith("probabilities") for row in failed), failed
    assert any(row.startswith("gradients (every") for row in failed), failed
