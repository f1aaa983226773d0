"""Deprecated import path: split into `transformers_cim.encoder_loading` and the `layer_decay`, `linear_probe`,
`mixup` and `classification_trainer` modules of `transformers_cim.training`. This alias goes in 0.2.0."""

from ._deprecation import alias_module

alias_module(
    __name__,
    "transformers_cim.encoder_loading",
    "transformers_cim.training.layer_decay",
    "transformers_cim.training.linear_probe",
    "transformers_cim.training.mixup",
    "transformers_cim.training.classification_trainer",
)
