"""Deprecated import path, split into `transformers_cim.checkpoint_loading`
and `transformers_cim.training.checkpoints`. This alias goes in 0.2.0."""

from ._deprecation import alias_module

alias_module(__name__, "transformers_cim.checkpoint_loading", "transformers_cim.training.checkpoints")
