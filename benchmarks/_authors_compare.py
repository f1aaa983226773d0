"""Part 1 of the side-by-side with the authors' code: equality on identical inputs (loss, maps, gradients, one AdamW
step and one EMA update), between their model and its conversion to ours. The building blocks are in ``_authors``."""

from __future__ import annotations

import copy
import os
import subprocess
import types
from dataclasses import dataclass

import torch
from _authors import (  # noqa: E402
    ONE_LR_NOTE,
    PREDICTOR_PREFIX,
    PREDICTOR_TWO_LOGIT_LR,
    STEP_CHECK_EPS,
    TARGET_CLS_NOTE,
    TOLERANCE,  # noqa: F401 (re-exported for the test)
    FixedInputs,
    Sizes,
    adamw,
    authors_forward,
    authors_momentum_update,
    authors_probabilities,
    authors_tensors_as_ours,
    build_authors_model,
    convert_authors_model,
    fixed_inputs,
    import_authors_code,  # noqa: F401 (the test's entry point)
    max_abs,
    our_forward,
    set_lr,
)
from torch import nn

from transformers_cim import CIMForPreTraining


@dataclass
class Difference:
    """The largest absolute difference of one quantity, and where it is (a parameter name, or empty)."""

    quantity: str
    max_abs: float
    where: str = ""
    compared: int = 1


def largest_difference(quantity: str, ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> Difference:
    """The largest difference over the tensors of ``ours`` (every one must have a counterpart in ``theirs``)."""
    missing = sorted(set(ours) - set(theirs))
    if missing:
        raise KeyError(f"{quantity}: no counterpart for {missing[:5]}")
    worst = max(ours, key=lambda name: max_abs(ours[name], theirs[name]))
    return Difference(quantity, max_abs(ours[worst], theirs[worst]), worst, len(ours))


def our_gradients(model: CIMForPreTraining) -> dict[str, torch.Tensor]:
    """Our gradient of every parameter, zero where there is none (frozen patch projection, EMA target)."""
    return {
        name: torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()
        for name, p in model.named_parameters()
        if "position_embeddings" not in name
    }


def predictor_as_one_logit(theirs: dict[str, torch.Tensor], authors_model: nn.Module) -> dict[str, torch.Tensor]:
    """Their gradient mapped by the converter gives ``g1 - g0 = 2 g`` for our predictor; ``g`` is ``g1``."""
    out = dict(theirs)
    grad_w, grad_b = authors_model.decoder_pred_mask[0].weight.grad, authors_model.decoder_pred_mask[0].bias.grad
    out[PREDICTOR_PREFIX + "weight"] = grad_w[1:2].clone()
    out[PREDICTOR_PREFIX + "bias"] = grad_b[1:2].clone()
    return out


def compare_on_fixed_inputs(
    authors: types.SimpleNamespace,
    sizes: Sizes,
    work_dir: str,
    seed: int = 0,
    batch: int = 4,
    lr: float = 1e-4,
    weight_decay: float = 0.05,
    momentum: float = 0.99,
    perturb: str | None = None,
) -> list[Difference]:
    """Builds their model (their init), converts it to ours, feeds both the same context, exemplars and maps and
    compares loss, probabilities, logits, every gradient, then the weights after one AdamW step and one EMA update
    of each side. ``perturb`` (one of our parameter names) adds 1e-3 to the first element of that weight of ours
    after the conversion, to see the comparison fail."""
    theirs = build_authors_model(authors, sizes, seed)
    ours = convert_authors_model(theirs, sizes, work_dir)
    if perturb is not None:
        with torch.no_grad():
            dict(ours.named_parameters())[perturb].view(-1)[0] += 1e-3
    theirs.train()
    ours.train()
    inputs = fixed_inputs(sizes, batch, seed + 1)
    return forward_and_gradient_differences(theirs, ours, inputs, sizes) + step_differences(
        theirs, ours, sizes, lr, weight_decay, momentum
    )


def forward_and_gradient_differences(
    theirs: nn.Module, ours: CIMForPreTraining, inputs: FixedInputs, sizes: Sizes
) -> list[Difference]:
    """Loss, probabilities, logits and gradients of one forward + backward of each side (gradients left in place)."""
    their_loss, their_logits = authors_forward(theirs, inputs)
    our_loss, our_logits = our_forward(ours, inputs)
    their_loss.backward()
    our_loss.backward()
    grad_w = theirs.decoder_pred_mask[0].weight.grad
    their_grads = predictor_as_one_logit(authors_tensors_as_ours(theirs, sizes, grads=True), theirs)
    grads = our_gradients(ours)
    return [
        Difference("loss (per-exemplar mean CE summed over K)", max_abs(our_loss, their_loss)),
        Difference(
            "probabilities (sigmoid(l) vs softmax(l0, l1)[1])",
            max_abs(our_logits.detach().sigmoid(), authors_probabilities(theirs, inputs)),
            "",
            our_logits.numel(),
        ),
        Difference(
            "logits (l vs l1 - l0), relative to the largest absolute logit",
            max_abs(our_logits, their_logits) / float(their_logits.abs().max()),
            "",
            our_logits.numel(),
        ),
        Difference(
            "their predictor gradient: channel 0 + channel 1 (must be 0)", float((grad_w[0] + grad_w[1]).abs().max())
        ),
        largest_difference(
            "gradients (every trainable or frozen online / decoder parameter)",
            {n: g for n, g in grads.items() if not n.startswith("target_")},
            their_grads,
        ),
        Difference(
            "gradients reaching our EMA target (must be 0)",
            max(float(g.abs().max()) for n, g in grads.items() if n.startswith("target_")),
        ),
    ]


def step_differences(
    theirs: nn.Module, ours: CIMForPreTraining, sizes: Sizes, lr: float, weight_decay: float, momentum: float
) -> list[Difference]:
    """The weights after one AdamW step and one EMA update of each side, from the gradients in place; and our
    predictor after a step at the lr of every other parameter (what our trainer does), against theirs."""
    one_lr = copy.deepcopy(ours)
    for name, param in one_lr.named_parameters():
        param.grad = dict(ours.named_parameters())[name].grad
    optimizers = [
        adamw(one_lr, lr, weight_decay, eps=STEP_CHECK_EPS),
        adamw(theirs, lr, weight_decay, eps=STEP_CHECK_EPS),
        adamw(ours, lr, weight_decay, predictor_lr_scale=PREDICTOR_TWO_LOGIT_LR, eps=STEP_CHECK_EPS),
    ]
    for optimizer in optimizers:
        set_lr(optimizer, lr)
        optimizer.step()
    authors_momentum_update(theirs, momentum)
    ours.momentum_update(momentum)
    after = authors_tensors_as_ours(theirs, sizes)
    kinds: dict[str, dict[str, torch.Tensor]] = {"online": {}, "target": {}, "target_cls": {}}
    for name, tensor in ours.state_dict().items():
        target = name.startswith("target_")
        kind = "target_cls" if target and name.endswith("embeddings.cls_token") else "target" if target else "online"
        kinds[kind][name] = tensor
    predictor = {n: t for n, t in one_lr.state_dict().items() if n.startswith(PREDICTOR_PREFIX)}
    return [
        largest_difference("weights after one AdamW step (online encoder + decoder)", kinds["online"], after),
        largest_difference("weights after one EMA update (target encoder, CLS token aside)", kinds["target"], after),
        largest_difference(f"{TARGET_CLS_NOTE} (not gated)", kinds["target_cls"], after),
        largest_difference(f"{ONE_LR_NOTE} (not gated)", predictor, after),
    ]


def gated(difference: Difference) -> bool:
    """Whether a row of `compare_on_fixed_inputs` must be within `TOLERANCE` (the noted rows differ by
    construction)."""
    return not difference.quantity.endswith("(not gated)")


def git_commit(path: str) -> str:
    """The short commit of the repository at ``path``, marked when its tracked files have uncommitted changes."""

    def git(*command: str) -> str:
        found = subprocess.run(["git", "-C", path, *command], capture_output=True, text=True, check=False)
        return found.stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    return commit + (" + uncommitted changes" if git("status", "--porcelain", "--untracked-files=no") else "")


def transformers_cim_path() -> str:
    """Where the ``transformers_cim`` in use was imported from (the editable checkout, or another copy)."""
    import transformers_cim

    return os.path.dirname(os.path.abspath(transformers_cim.__file__))
