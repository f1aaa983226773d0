"""Model cards for CIM pre-training checkpoints and exported encoders, written with huggingface_hub's ModelCard
tooling (`ModelCardData` for the YAML header)."""

from __future__ import annotations

import os

from huggingface_hub import ModelCard, ModelCardData

CARD_TAGS = ["self-supervised", "cim", "image-feature-extraction", "vision", "transformers-cim"]


def encoder_description(encoder_config) -> str:
    """One line on a stock ViT / ResNet config: widths, depth, heads, patch."""
    enc = encoder_config
    if enc.model_type == "resnet":
        return f"ResNet (depths {list(enc.depths)}, widths {list(enc.hidden_sizes)})"
    return (f"ViT (hidden {enc.hidden_size}, {enc.num_hidden_layers} layers, {enc.num_attention_heads} heads, "
            f"patch {enc.patch_size})")


def card_with_metadata(data: ModelCardData, body: str) -> ModelCard:
    """A model card: `data` as its YAML header, then the markdown `body`."""
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")


def _settings_table(config) -> str:
    rows = [
        ("encoder", encoder_description(config.encoder_config)),
        ("search view / context / exemplar", f"{config.image_size} / {config.context_size} / {config.exemplar_size} px"),
        ("exemplars per image", config.num_exemplars),
        ("exemplar scale / aspect / rotation", f"{config.exemplar_scale} / {[round(a, 3) for a in config.exemplar_aspect_ratio]} / "
                                               f"+-{config.exemplar_max_rotation} deg"),
        ("exemplar photometric augmentation", config.exemplar_augmentation),
        ("decoder", f"{config.decoder_num_layers} x cross-attention, width {config.decoder_hidden_size}, "
                    f"{config.decoder_num_attention_heads} heads"),
        ("loss", f"{config.loss_type} (x{config.correlation_loss_weight}), contrastive x{config.contrastive_loss_weight}"),
        ("target encoder", f"{config.target_encoder_mode}, momentum {config.momentum_start} -> {config.momentum_end} (cosine)"),
    ]
    return "\n".join(["| setting | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows])


def build_model_card(config, *, dataset_name: str, max_steps: int, train_images: int | None,
                     final_metrics: dict[str, float], figure: str | None, repo_id: str | None = None) -> ModelCard:
    """A card saying what was trained, on what, for how long, how well, and how to load it."""
    datasets = [dataset_name] if dataset_name and "/" in dataset_name and not os.path.exists(dataset_name) else None
    data = ModelCardData(
        library_name="transformers", pipeline_tag="image-feature-extraction", tags=CARD_TAGS,
        license="apache-2.0", datasets=datasets,
    )
    name = repo_id or "this checkpoint"
    metrics = "\n".join(f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |"
                        for k, v in final_metrics.items())
    head = "ViTForImageClassification" if config.encoder_type == "vit" else "ResNetForImageClassification"
    figure_md = f"\n![Predicted vs true correlation maps]({figure})\n\nColumns: context with the exemplar's outline, " \
                "the exemplar, the true map, the predicted map.\n" if figure else ""
    body = f"""# CIM pre-trained encoder

A vision encoder pre-trained without labels by **Correlational Image Modeling** (Li, Xie, Loy, CVPR 2023,
arXiv 2303.12670) with transformers-cim: an online encoder learns to predict where
rotated, rescaled and colour-distorted exemplars lie in a context image encoded by its EMA copy.

## Training

- data: `{dataset_name}`{f" ({train_images} images seen)" if train_images else ""}
- optimizer steps: {max_steps}

{_settings_table(config)}

## Final pretext metrics

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


def has_cim_card(output_dir: str) -> bool:
    """Whether `output_dir` holds a pre-training card of this package (README.md tagged `transformers-cim`)."""
    path = os.path.join(output_dir, "README.md")
    return os.path.isfile(path) and "transformers-cim" in (ModelCard.load(path).data.tags or [])


def write_model_card(output_dir: str, card: ModelCard) -> str:
    path = os.path.join(output_dir, "README.md")
    card.save(path)
    return path


__all__ = ["CARD_TAGS", "build_model_card", "card_with_metadata", "encoder_description", "has_cim_card",
           "write_model_card"]
