"""What every model card of this package shares, written with huggingface_hub's ModelCard tooling
(`ModelCardData` for the YAML header): the tags, the encoder's one-line description, reading a card's licence and
whether a folder already holds one of ours. The cards of training runs are built in
:mod:`transformers_cim.training.modelcard`; the exported encoder's in :mod:`transformers_cim.export`."""

from __future__ import annotations

import os

from huggingface_hub import ModelCard, ModelCardData

CARD_TAGS = ["self-supervised", "cim", "image-feature-extraction", "vision", "transformers-cim"]


def encoder_description(encoder_config) -> str:
    """One line on a stock ViT / ResNet config: widths, depth, heads, patch."""
    enc = encoder_config
    if enc.model_type == "resnet":
        return f"ResNet (depths {list(enc.depths)}, widths {list(enc.hidden_sizes)})"
    return (
        f"ViT (hidden {enc.hidden_size}, {enc.num_hidden_layers} layers, {enc.num_attention_heads} heads, "
        f"patch {enc.patch_size})"
    )


def card_with_metadata(data: ModelCardData, body: str) -> ModelCard:
    """A model card: `data` as its YAML header, then the markdown `body`."""
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")


def is_hub_id(name: str | None) -> bool:
    """Whether a model or dataset name is a Hub id (``owner/name``) rather than a local path."""
    return (
        bool(name)
        and "/" in name
        and not os.path.exists(name)
        and not os.path.isabs(name)
        and name.count("/") == 1
        and not name.startswith(".")
    )


def card_license(checkpoint_dir: str | None) -> str | None:
    """The licence stated in the card (README.md metadata) of a checkpoint folder, or None."""
    path = os.path.join(checkpoint_dir, "README.md") if checkpoint_dir else None
    if not path or not os.path.isfile(path):
        return None
    try:
        return ModelCard.load(path, ignore_metadata_errors=True).data.license or None
    except Exception:  # noqa: BLE001 - an unreadable card states no licence
        return None


def has_cim_card(output_dir: str) -> bool:
    """Whether `output_dir` holds a card of this package (README.md tagged `transformers-cim`), which the Trainer's
    generic card must not replace."""
    path = os.path.join(output_dir, "README.md")
    return os.path.isfile(path) and "transformers-cim" in (ModelCard.load(path).data.tags or [])


def write_model_card(output_dir: str, card: ModelCard) -> str:
    path = os.path.join(output_dir, "README.md")
    card.save(path)
    return path


__all__ = [
    "CARD_TAGS",
    "card_license",
    "card_with_metadata",
    "encoder_description",
    "has_cim_card",
    "is_hub_id",
    "write_model_card",
]
