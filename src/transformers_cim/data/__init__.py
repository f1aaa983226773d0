"""Deprecated import path: moved to `transformers_cim.training.data`. This alias goes in 0.2.0."""

from .._deprecation import alias_module

alias_module(__name__, "transformers_cim.training.data")
