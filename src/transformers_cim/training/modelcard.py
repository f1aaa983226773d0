"""Model cards of training runs: CIM pre-training checkpoints, fine-tuned classifiers and segmentation models, with
their `model-index` results (the shared card basics are in :mod:`transformers_cim.hub_card`)."""

from __future__ import annotations

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from ..hub_card import CARD_TAGS, card_with_metadata, encoder_description, is_hub_id


def augmentation_description(config) -> str:
    """The exemplar photometric augmentation: off, the recipe throughout, or its ramp over training."""
    if not config.exemplar_augmentation:
        return "off"
    start, end = config.exemplar_augmentation_ramp
    if end <= 0:
        return "on (the recipe's, from the first step)"
    return f"ramped from off at {start:.0%} of training to the recipe's at {end:.0%}"


def target_encoder_description(config) -> str:
    """The context's encoder: the EMA target with its momentum schedule, or the online encoder itself."""
    if config.target_encoder_mode == "shared":
        return "shared: the online encoder also encodes the context (no EMA target)"
    return f"ema, momentum {config.momentum_start} -> {config.momentum_end} (cosine)"


def _settings_table(config) -> str:
    rows = [
        ("encoder", encoder_description(config.encoder_config)),
        (
            "search view / context / exemplar",
            f"{config.image_size} / {config.context_size} / {config.exemplar_size} px",
        ),
        ("exemplars per image", config.num_exemplars),
        (
            "exemplar scale / aspect / rotation",
            f"{config.exemplar_scale} / {[round(a, 3) for a in config.exemplar_aspect_ratio]} / "
            f"+-{config.exemplar_max_rotation} deg",
        ),
        ("exemplar boxes / antialiasing", f"{config.exemplar_box_mode} / {config.exemplar_antialias}"),
        ("exemplar photometric augmentation", augmentation_description(config)),
        ("encoder init", config.encoder_init),
        (
            "decoder",
            f"{config.decoder_num_layers} x cross-attention, width {config.decoder_hidden_size}, "
            f"{config.decoder_num_attention_heads} heads, "
            f"{'one shared' if config.decoder_shared_norm else 'separate'} input LayerNorm",
        ),
        (
            "loss",
            f"{config.loss_type} (x{config.correlation_loss_weight}), contrastive x{config.contrastive_loss_weight}",
        ),
        ("target encoder", target_encoder_description(config)),
    ]
    return "\n".join(["| setting | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows])


def build_model_card(
    config,
    *,
    dataset_name: str,
    max_steps: int,
    train_images: int | None,
    final_metrics: dict[str, float],
    figure: str | None,
    repo_id: str | None = None,
    license: str | None = None,
) -> ModelCard:
    """A card saying what was trained, on what, for how long, how well, and how to load it. `license` (a Hub licence
    id) is stated only when given."""
    datasets = [dataset_name] if is_hub_id(dataset_name) else None
    data = ModelCardData(
        library_name="transformers",
        pipeline_tag="image-feature-extraction",
        tags=CARD_TAGS,
        license=license,
        datasets=datasets,
    )
    name = repo_id or "this checkpoint"
    metrics = "\n".join(
        f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in final_metrics.items()
    )
    head = "ViTForImageClassification" if config.encoder_type == "vit" else "ResNetForImageClassification"
    figure_md = (
        f"\n![Predicted vs true correlation maps]({figure})\n\nColumns: context with the exemplar's outline, "
        "the exemplar, the true map, the predicted map.\n"
        if figure
        else ""
    )
    body = f"""# CIM pre-trained encoder

A vision encoder pre-trained without labels by **Correlational Image Modeling** (Li, Xie, Loy, CVPR 2023,
arXiv 2303.12670) with transformers-cim: an online encoder learns to predict where
rotated, rescaled and colour-distorted exemplars lie in a context image encoded by its EMA copy.

## Training

- data: `{dataset_name}`{f" ({train_images} images seen)" if train_images else ""}
- optimizer steps: {max_steps}

{_settings_table(config)}

## Final pretext metrics

`prior_loss` / `prior_iou` score the best constant map (the mean true map under this run's box distribution,
the same for every exemplar) on the same batches; `loss_to_prior` under 1 and a positive `pretext_iou_gain`
mean the model locates each exemplar rather than where exemplars usually are.

| metric | value |
|---|---|
{metrics}
{figure_md}
## How to use

```python
import transformers_cim  # registers CIM with the Auto classes
from transformers import AutoModel, {head}

encoder = AutoModel.from_pretrained("{name}")  # CIMModel: the online encoder, for features
classifier = {head}.from_pretrained("{name}", num_labels=10)  # fine-tune
```

Without installing transformers-cim: `AutoModel.from_pretrained("{name}", trust_remote_code=True)`.
Fine-tune with `run_image_classification.py --model_name_or_path {name}`.
"""
    return card_with_metadata(data, body)


def build_classification_card(
    *,
    model_name: str,
    base: str,
    encoder_config,
    linear_probe: bool,
    dataset_name: str,
    eval_split: str | None,
    num_labels: int,
    recipe: dict[str, object],
    results: dict[str, float],
    license: str | None = None,
    base_is_hub_id: bool | None = None,
) -> ModelCard:
    """The card of a fine-tuned (or linear-probed) classifier: what it was fine-tuned from (`base`: a checkpoint path
    or a Hub id, which also becomes `base_model` in the metadata), on what, with which recipe, and its results (top-1
    and top-5 in the model-index when evaluated). `license` is stated only when given; `base_is_hub_id` defaults to
    what `base` looks like."""
    hub_base = is_hub_id(base) if base_is_hub_id is None else base_is_hub_id
    metrics = [
        ("accuracy", "Top-1 accuracy", results.get("eval_accuracy")),
        ("top_5_accuracy", "Top-5 accuracy", results.get("eval_top5_accuracy")),
    ]
    eval_results = [
        EvalResult(
            task_type="image-classification",
            dataset_type=dataset_name,
            dataset_name=dataset_name,
            dataset_split=eval_split,
            metric_type=kind,
            metric_name=name,
            metric_value=float(value),
        )
        for kind, name, value in metrics
        if value is not None
    ] or None
    data = ModelCardData(
        library_name="transformers",
        pipeline_tag="image-classification",
        license=license,
        base_model=base if hub_base else None,
        datasets=[dataset_name] if is_hub_id(dataset_name) else None,
        tags=["image-classification", "cim", "transformers-cim", "linear-probe" if linear_probe else "fine-tuned"],
        model_name=model_name,
        eval_results=eval_results,
    )
    source = f"[`{base}`](https://huggingface.co/{base})" if hub_base else f"the local checkpoint `{base}`"
    mode = "a linear probe (frozen encoder, BatchNorm + linear head)" if linear_probe else "end-to-end fine-tuning"
    recipe_rows = "\n".join(f"| {key} | {value} |" for key, value in recipe.items())
    shown = {
        key: value
        for key, value in results.items()
        if key in ("eval_accuracy", "eval_top5_accuracy", "eval_loss", "train_loss", "epoch", "skipped_images")
    }
    result_rows = "\n".join(
        f"| {key} | {value:.4f} |"
        if isinstance(value, float) and key != "epoch"
        else f"| {key} | {value:g} |"
        if isinstance(value, float)
        else f"| {key} | {value} |"
        for key, value in shown.items()
    )
    evaluated = (
        f" (evaluated on the `{eval_split}` split)"
        if eval_split and "eval_accuracy" in results
        else " (not evaluated)"
    )
    body = f"""# {model_name}

A {encoder_description(encoder_config)} image classifier ({num_labels} classes), trained by {mode} from {source}
on `{dataset_name}` with `run_image_classification.py` of transformers-cim.

## Results{evaluated}

| metric | value |
|---|---|
{result_rows}

## Recipe

| setting | value |
|---|---|
{recipe_rows}

## How to use

```python
from transformers import pipeline

classifier = pipeline("image-classification", model="PATH_OR_REPO")
```

The saved image processor computes the evaluation transform (resize, centre crop), so the pipeline sees the pixels
the reported accuracy was measured on.
"""
    return card_with_metadata(data, body)


def build_segmentation_card(
    *,
    model_name: str,
    base: str | None,
    encoder_config,
    dataset_name: str,
    num_labels: int,
    recipe: dict[str, object],
    split_results: dict[str, dict[str, float]],
    license: str | None = None,
    figure: str | None = None,
) -> ModelCard:
    """The card of a semantic-segmentation model (UperNet): what it was trained from (`base`: a checkpoint path or a
    Hub id, or None for random init), on what, with which recipe, and its scores per evaluated split
    (`split_results`: ``{split: {"mean_iou", "overall_accuracy", "iou_<class>", ...}}``; mean IoU and pixel accuracy
    go into the model-index)."""
    hub_base = is_hub_id(base)
    eval_results = [
        EvalResult(
            task_type="image-segmentation",
            dataset_type=dataset_name,
            dataset_name=dataset_name,
            dataset_split=split,
            metric_type=kind,
            metric_name=name,
            metric_value=float(value),
        )
        for split, scores in split_results.items()
        for kind, name, value in (
            ("mean_iou", "Mean IoU", scores.get("mean_iou")),
            ("accuracy", "Pixel accuracy", scores.get("overall_accuracy")),
        )
        if value is not None
    ] or None
    data = ModelCardData(
        library_name="transformers",
        pipeline_tag="image-segmentation",
        license=license,
        base_model=base if hub_base else None,
        datasets=[dataset_name] if is_hub_id(dataset_name) else None,
        tags=["image-segmentation", "semantic-segmentation", "upernet", "cim", "transformers-cim"],
        model_name=model_name,
        eval_results=eval_results,
    )
    if base is None:
        source = "a randomly initialised encoder (no pre-training)"
    else:
        source = f"[`{base}`](https://huggingface.co/{base})" if hub_base else f"the local checkpoint `{base}`"
    recipe_rows = "\n".join(f"| {key} | {value} |" for key, value in recipe.items())
    sections = []
    for split, scores in split_results.items():
        rows = "\n".join(f"| {key} | {value:.4f} |" for key, value in scores.items() if isinstance(value, float))
        sections.append(f"### `{split}`\n\n| metric | value |\n|---|---|\n{rows}\n")
    results = "\n".join(sections) if sections else "Not evaluated.\n"
    figure_md = f"\n![image, true mask, predicted mask]({figure})\n" if figure else ""
    body = f"""# {model_name}

UperNet semantic segmentation ({num_labels} classes) over a {encoder_description(encoder_config)} encoder from
{source}, trained on `{dataset_name}` with `run_semantic_segmentation.py` of transformers-cim. Scores are computed
on whole images at the masks' resolution (`overall_accuracy` is pixel accuracy; the ignore index is left out).

## Results

{results}{figure_md}
## Recipe

| setting | value |
|---|---|
{recipe_rows}

## How to use

```python
from transformers import pipeline

segmenter = pipeline("image-segmentation", model="PATH_OR_REPO")
masks = segmenter("street.jpg")  # one {{"label", "mask"}} per class found
```

The saved image processor resizes to the evaluation size and normalises with the encoder's mean and std.
"""
    return card_with_metadata(data, body)


__all__ = [
    "build_classification_card",
    "build_model_card",
    "build_segmentation_card",
]
