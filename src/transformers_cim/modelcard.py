"""Deprecated import path: split into `transformers_cim.hub_card` and
`transformers_cim.training.modelcard`. This alias goes in 0.2.0."""

from ._deprecation import alias_module

alias_module(__name__, "transformers_cim.hub_card", "transformers_cim.training.modelcard")
