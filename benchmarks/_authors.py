"""Building blocks shared by ``authors_side_by_side.py`` and ``tests/test_authors_code.py``: the authors' CIM code
(weivision/Correlational-Image-Modeling) imported from a checkout outside this repository, their model built and
converted to ours with this package's converter, identical inputs fed to both, and both sides' pre-training steps.

Nothing of their code is copied here: their modules are imported at run time from the directory given
(``--authors_code DIR`` or the ``CIM_AUTHORS_CODE`` environment variable). Two run-time patches are applied, to
what their modules see, never to their files: (1) when torchvision's compiled operators cannot load (a torchvision
wheel built for another torch), ``torchvision._meta_registrations`` is replaced by an empty module so that the
pure-Python transforms their dataset uses still import; (2) their ``util.pos_embed`` gets a view of numpy that has
the ``np.float`` alias again (removed in numpy 1.24). Their code needs ``timm`` and ``torchvision``, installed
into the environment for this benchmark only; they are not dependencies of this package.

Conventions of the two models, and how they are mapped:
* their predictor has two logits per pixel (softmax cross-entropy); ours one logit ``l1 - l0`` (binary
  cross-entropy): the same probabilities and loss. Their gradient of channel 1 equals ours and that of channel 0
  its negative, so under Adam their difference ``W1 - W0`` moves twice as far per step as our single logit (Adam
  normalises each parameter's step): an exact equality of one optimizer step needs our predictor at twice the
  learning rate and half the weight decay (`PREDICTOR_TWO_LOGIT_LR`).
* both losses are the per-exemplar mean cross-entropy summed over the K exemplars.
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import random
import sys
import tempfile
import types
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from torch import nn

from transformers_cim import CIMForPreTraining
from transformers_cim.convert_cim_original_to_hf import ConversionOptions, convert_checkpoint, convert_pretraining
from transformers_cim.pretext import correlation_maps, sample_config_boxes
from transformers_cim.pretext_metrics import PROBABILITY_FLOOR
from transformers_cim.training.seeding import numpy_rng, torch_generator

AUTHORS_ENV = "CIM_AUTHORS_CODE"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
PREDICTOR_PREFIX = "decoder.predictor."
PREDICTOR_TWO_LOGIT_LR = 2.0  # see the module docstring
TOLERANCE = 1e-5
# Adam's first step is about lr * sign(g): elements whose gradient is rounding noise (~1e-8; the attention key biases,
# whose gradient is 0 in exact arithmetic since softmax ignores a per-query constant) would move by +-lr with
# arbitrary signs on the two sides. An eps well above that noise makes their steps negligible; every other element
# still moves by about lr.
STEP_CHECK_EPS = 1e-6
ONE_LR_NOTE = (
    "our predictor after the step at the lr of every other parameter (as our trainer runs it): their "
    "W1 - W0 moved twice as far"
)
TARGET_CLS_NOTE = (
    "target CLS token after the EMA update: theirs is the online CLS token (shared), ours an EMA copy of it"
)


@dataclass(frozen=True)
class Sizes:
    """The small model both sides are built at (the quality benchmark's CPU sizes, 2 layers)."""

    width: int = 192
    depth: int = 2
    heads: int = 3
    patch: int = 8
    image: int = 96
    context: int = 64
    exemplar: int = 32
    num_exemplars: int = 6
    decoder_width: int = 256
    decoder_heads: int = 8
    view_scale: tuple[float, float] = (0.5, 1.0)
    exemplar_scale: tuple[float, float] = (0.05, 0.48)
    exemplar_ratio: tuple[float, float] = (1 / 3, 3.0)  # theirs: width / height; symmetric, so ours (h / w) too
    max_rotation: int = 45

    def describe(self) -> str:
        return (
            f"ViT width {self.width}, {self.depth} layers, {self.heads} heads, patch {self.patch}; {self.image} px "
            f"views, {self.context} px context, {self.num_exemplars} exemplars of {self.exemplar} px; decoder "
            f"{self.decoder_width} wide, {self.decoder_heads} heads; exemplar scale {self.exemplar_scale}, aspect "
            f"1/3-3, rotation +-{self.max_rotation} deg; view scale {self.view_scale}"
        )


# --------------------------------------------------------------------------------------------------
# Importing their code
# --------------------------------------------------------------------------------------------------


def _import_torchvision() -> None:
    """Imports torchvision; if its compiled operators do not load, retries with its fake-kernel registrations
    stubbed out (they only describe those operators for torch.compile; the transforms do not need them)."""
    try:
        importlib.import_module("torchvision")
        return
    except RuntimeError as err:
        if "does not exist" not in str(err):
            raise
    for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
        del sys.modules[name]
    sys.modules["torchvision._meta_registrations"] = types.ModuleType("torchvision._meta_registrations")
    importlib.import_module("torchvision")


def _numpy_with_float_alias() -> types.ModuleType:
    """numpy, plus the ``np.float`` alias that numpy 1.24 removed (their ``util/pos_embed.py`` uses it)."""
    proxy = types.ModuleType("numpy_with_float_alias")
    proxy.__getattr__ = lambda name: getattr(np, name)
    proxy.float = float
    return proxy


def import_authors_code(path: str) -> types.SimpleNamespace:
    """Their ``models.cim`` and ``util.datasets`` modules, imported from the checkout at ``path``."""
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.isfile(os.path.join(path, "models", "cim.py")):
        raise FileNotFoundError(
            f"{path!r} is not a checkout of weivision/Correlational-Image-Modeling (no models/cim.py)."
        )
    _import_torchvision()
    if path not in sys.path:
        sys.path.insert(0, path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # their nn_util imports the deprecated timm.models.layers
        importlib.import_module("timm.models.layers")
    pos_embed = importlib.import_module("util.pos_embed")
    pos_embed.np = _numpy_with_float_alias()
    cim = importlib.import_module("models.cim")
    datasets_module = importlib.import_module("util.datasets")
    for module in (cim, datasets_module):
        if not os.path.abspath(module.__file__).startswith(path + os.sep):
            raise ImportError(
                f"{module.__name__} was imported from {module.__file__}, not from {path}: another "
                "package named models/util shadows their code."
            )
    return types.SimpleNamespace(cim=cim, datasets=datasets_module, path=path)


# --------------------------------------------------------------------------------------------------
# Their model, converted to ours
# --------------------------------------------------------------------------------------------------


def build_authors_model(authors: types.SimpleNamespace, sizes: Sizes, seed: int) -> nn.Module:
    """Their ``CorrelationalAutoencoderViT`` at ``sizes``, with their init, without the contrastive loss."""
    torch.manual_seed(seed)
    return authors.cim.CorrelationalAutoencoderViT(
        img_size=sizes.image,
        patch_size=sizes.patch,
        embed_dim=sizes.width,
        depth=sizes.depth,
        num_heads=sizes.heads,
        decoder_embed_dim=sizes.decoder_width,
        decoder_num_heads=sizes.decoder_heads,
        mlp_ratio=4.0,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        context_size=sizes.context,
        template_size=sizes.exemplar,
        sigma_cont=0.0,
        sigma_corr=1.0,
    )


def authors_args(sizes: Sizes) -> argparse.Namespace:
    """The ``args`` their checkpoints carry, with the names of their pre-training flags."""
    return argparse.Namespace(
        model="vit_tiny_patch16",
        gear="cim",
        input_size=sizes.image,
        context_size=sizes.context,
        template_size=sizes.exemplar,
        template_num=sizes.num_exemplars,
        rotaton_max_degree=sizes.max_rotation,
        template_min_scale=sizes.exemplar_scale[0],
        template_max_scale=sizes.exemplar_scale[1],
        template_min_ratio=sizes.exemplar_ratio[0],
        template_max_ratio=sizes.exemplar_ratio[1],
        sigma_cont=0.0,
        sigma_corr=1.0,
    )


def conversion_options(sizes: Sizes) -> ConversionOptions:
    return ConversionOptions(num_heads=sizes.heads, decoder_num_heads=sizes.decoder_heads)


def convert_authors_model(model: nn.Module, sizes: Sizes, work_dir: str) -> CIMForPreTraining:
    """Saves their model as their checkpoint file, converts it with ``cim-convert-original``'s function and loads
    the result with ``CIMForPreTraining.from_pretrained``."""
    os.makedirs(work_dir, exist_ok=True)
    checkpoint = os.path.join(work_dir, "authors_cim.pth")
    torch.save({"model": model.state_dict(), "epoch": 0, "args": authors_args(sizes)}, checkpoint)
    out = os.path.join(work_dir, "converted")
    convert_checkpoint(checkpoint, out, conversion_options(sizes))
    return CIMForPreTraining.from_pretrained(out)


def authors_tensors_as_ours(model: nn.Module, sizes: Sizes, grads: bool = False) -> dict[str, torch.Tensor]:
    """Their weights (or their gradients, ``grads=True``) under our parameter names, mapped by the converter.
    For gradients a parameter without one counts as zero; the fixed position tables keep their values (the
    converter checks them) and are not gradients. Our predictor's entry is ``channel 1 - channel 0``."""
    params = dict(model.named_parameters())
    tensors = {}
    for key, value in model.state_dict().items():
        if grads and key in params and not key.endswith("pos_embed"):
            grad = params[key].grad
            value = torch.zeros_like(value) if grad is None else grad
        tensors[key] = value.detach().clone()
    converted, _ = convert_pretraining(tensors, vars(authors_args(sizes)), conversion_options(sizes))
    return {name: tensor.detach() for name, tensor in converted.state_dict().items()}


# --------------------------------------------------------------------------------------------------
# Identical inputs, both forwards
# --------------------------------------------------------------------------------------------------


@dataclass
class FixedInputs:
    context: torch.Tensor  # (B, 3, m, m)
    exemplars: torch.Tensor  # (B, K, 3, n, n)
    masks: torch.Tensor  # (B, K, m, m), int64 in {0, 1}


def fixed_inputs(sizes: Sizes, batch: int, seed: int) -> FixedInputs:
    """Random normalised-scale pixels and true maps of rotated boxes (from our box sampler: any {0, 1} maps do)."""
    generator = torch.Generator().manual_seed(seed)
    context = torch.randn(batch, 3, sizes.context, sizes.context, generator=generator)
    exemplars = torch.randn(batch, sizes.num_exemplars, 3, sizes.exemplar, sizes.exemplar, generator=generator)
    config = types.SimpleNamespace(
        exemplar_scale=sizes.exemplar_scale,
        exemplar_aspect_ratio=sizes.exemplar_ratio,
        exemplar_max_rotation=float(sizes.max_rotation),
        exemplar_box_mode="enclosing",
    )
    boxes = sample_config_boxes(config, batch, sizes.num_exemplars, generator=generator)
    return FixedInputs(context, exemplars, correlation_maps(boxes, sizes.context).round().long())


def authors_forward(model: nn.Module, inputs: FixedInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, logits l1 - l0 of shape (B, K, m, m)) of their ``forward`` on the given tensors."""
    exemplars = list(inputs.exemplars.unbind(1))
    masks = list(inputs.masks.unbind(1))
    loss, predictions = model(inputs.context, exemplars, masks)
    two_logits = torch.stack(predictions, dim=1)  # (B, K, 2, m, m)
    return loss, two_logits[:, :, 1] - two_logits[:, :, 0]


def authors_probabilities(model: nn.Module, inputs: FixedInputs) -> torch.Tensor:
    """Their predicted probability of "inside the exemplar": softmax over their two logits, channel 1."""
    with torch.no_grad():
        _, predictions = model(inputs.context, list(inputs.exemplars.unbind(1)), list(inputs.masks.unbind(1)))
    return torch.stack(predictions, dim=1).softmax(dim=2)[:, :, 1]


def our_forward(model: CIMForPreTraining, inputs: FixedInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, logits (B, K, m, m)) of our forward with the exemplars, maps and context given (no pretext)."""
    out = model(
        inputs.context,
        exemplar_pixel_values=inputs.exemplars,
        correlation_labels=inputs.masks.float(),
        context_pixel_values=inputs.context,
    )
    return out.loss, out.logits


# --------------------------------------------------------------------------------------------------
# One optimizer, EMA and schedule for both sides
# --------------------------------------------------------------------------------------------------


def decays(name: str, param: torch.Tensor) -> bool:
    """Weight decay on matrices and kernels only: not on norms, biases or the CLS token (our trainer's rule;
    timm's ``add_weight_decay`` in their script also decays the (1, 1, D) CLS token)."""
    return param.ndim > 1 and "cls_token" not in name


def adamw(
    model: nn.Module, lr: float, weight_decay: float, predictor_lr_scale: float = 1.0, eps: float = 1e-8
) -> torch.optim.AdamW:
    """AdamW (0.9, 0.95) over the trainable parameters; ``predictor_lr_scale`` puts our predictor in a group of its
    own with that many times the lr and as many times less weight decay (same decoupled decay per step)."""
    groups: dict[tuple[bool, bool], list[torch.Tensor]] = {}  # (in the predictor group, decayed) -> parameters
    for name, param in model.named_parameters():
        if param.requires_grad:
            predictor = predictor_lr_scale != 1.0 and name.startswith(PREDICTOR_PREFIX)
            groups.setdefault((predictor, decays(name, param)), []).append(param)
    param_groups = []
    for (predictor, decayed), params in groups.items():
        scale = predictor_lr_scale if predictor else 1.0
        param_groups.append(
            {"params": params, "weight_decay": weight_decay / scale if decayed else 0.0, "lr_scale": scale}
        )
    return torch.optim.AdamW(param_groups, lr=lr, betas=(0.9, 0.95), eps=eps)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"]


def warmup_cosine_lr(step: int, total_steps: int, warmup_steps: int, peak_lr: float) -> float:
    """Linear warm-up from 0, then half-cosine to 0, per step (their ``adjust_learning_rate`` per iteration with
    ``min_lr`` 0)."""
    if step < warmup_steps:
        return peak_lr * step / warmup_steps
    progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
    return peak_lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def ema_momentum(step: int, total_steps: int, start: float = 0.99, end: float = 1.0) -> float:
    """Cosine momentum from ``start`` (step 0) to ``end``: their ``iter_update`` formula, our trainer's too."""
    return end - (end - start) * (math.cos(math.pi * step / max(total_steps, 1)) + 1.0) / 2.0


def authors_momentum_update(model: nn.Module, momentum: float) -> None:
    model.momentum = momentum
    model.momentum_update()


# --------------------------------------------------------------------------------------------------
# Data and the two pretext pipelines
# --------------------------------------------------------------------------------------------------


def write_image_folder(ds, image_column: str, root: str) -> str:
    """Writes the images of ``ds`` (encoded, as stored) as ``root/all/000000.ext``..., so that their
    ``ImageFolder`` lists row i as sample i. Returns ``root``."""
    folder = os.path.join(root, "all")
    os.makedirs(folder, exist_ok=True)
    encoded = ds.cast_column(image_column, type(ds.features[image_column])(decode=False))
    for index, value in enumerate(encoded[image_column]):
        extension = os.path.splitext(value.get("path") or "")[1].lower() or ".png"
        with open(os.path.join(folder, f"{index:06d}{extension}"), "wb") as f:
            f.write(value["bytes"])
    return root


def authors_transforms(authors: types.SimpleNamespace, sizes: Sizes, augmentation: bool) -> dict:
    """The transform dict their dataset takes, as their pre-training script builds it (``--common_aug`` and
    ``--template_aug`` both on or both off)."""
    from torchvision import transforms
    from torchvision.transforms import InterpolationMode

    to_tensor = transforms.Compose([transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    photometric = transforms.Compose(
        [
            transforms.RandomApply([transforms.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
            transforms.RandomGrayscale(p=0.2),
            transforms.RandomApply([authors.datasets.GaussianBlur([0.1, 2.0])], p=0.5),
            transforms.RandomApply([authors.datasets.Solarization()], p=0.2),
        ]
    )
    return {
        "search": transforms.Compose(
            [
                transforms.RandomResizedCrop(
                    sizes.image, scale=sizes.view_scale, interpolation=InterpolationMode.BICUBIC
                ),
                transforms.RandomHorizontalFlip(),
            ]
        ),
        "common": photometric if augmentation else None,
        "template": transforms.RandomHorizontalFlip() if augmentation else None,
        "post_context": to_tensor,
        "post_template": to_tensor,
    }


def authors_dataset(authors: types.SimpleNamespace, folder: str, sizes: Sizes, augmentation: bool):
    """Their ``CorrlationDataset`` (sic) over an image folder: each item (context, K exemplars, K masks)."""
    return authors.datasets.CorrlationDataset(
        folder,
        search_size=sizes.image,
        context_size=sizes.context,
        template_size=sizes.exemplar,
        template_num=sizes.num_exemplars,
        scale=sizes.exemplar_scale,
        ratio=sizes.exemplar_ratio,
        degree=sizes.max_rotation,
        transform=authors_transforms(authors, sizes, augmentation),
    )


def batch_indices(num_images: int, batch_size: int, seed: int) -> Iterator[tuple[int, list[int]]]:
    """(epoch, indices) of shuffled batches without end, the last partial batch of an epoch dropped; both sides
    draw the same images at every step."""
    epoch = 0
    while True:
        order = numpy_rng(seed, epoch).permutation(num_images)
        for start in range(0, num_images - batch_size + 1, batch_size):
            yield epoch, [int(i) for i in order[start : start + batch_size]]
        epoch += 1


def seed_global_rngs(seed: int) -> None:
    """Their pipeline draws from torch's, Python's and numpy's global generators."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def authors_batch(dataset, indices: list[int]) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """Their items collated as their DataLoader does: context (B, 3, m, m), K exemplar batches, K mask batches."""
    items = [dataset[i] for i in indices]
    context = torch.stack([item[0] for item in items])
    exemplars = [torch.stack([item[1][k] for item in items]) for k in range(len(items[0][1]))]
    masks = [torch.stack([item[2][k] for item in items]) for k in range(len(items[0][2]))]
    return context, exemplars, masks


def authors_step_loss(model: nn.Module, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, true maps (B, K, m, m)) of their forward on one of their batches."""
    context, exemplars, masks = batch
    loss, _ = model(context, exemplars, masks)
    return loss, torch.stack(masks, dim=1)


def our_step_loss(
    model: CIMForPreTraining, pixel_values: torch.Tensor, seed: int, step: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, true maps) of our forward, which samples the exemplars and maps itself (seeded per step)."""
    out = model(pixel_values, generator=torch_generator(seed, step))
    return out.loss, out.correlation_labels


def constant_map_loss(mask_sum: torch.Tensor, count: int, prior: torch.Tensor, num_exemplars: int) -> float:
    """The loss (per-exemplar mean cross-entropy summed over K) of predicting ``prior`` (m, m) for ``count`` maps
    whose per-pixel sum is ``mask_sum``: the cross-entropy is linear in the maps, so the sums suffice."""
    p = prior.double().clamp(PROBABILITY_FLOOR, 1 - PROBABILITY_FLOOR)
    per_pixel = -(mask_sum.double() * p.log() + (count - mask_sum.double()) * (-p).log1p()) / count
    return float(per_pixel.mean()) * num_exemplars


def temporary_directory() -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix="cim-authors-")


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().float() - b.detach().float()).abs().max())
