"""transformers-cim: Correlational Image Modeling (CIM, CVPR 2023) for Hugging Face transformers.

Importing this package registers `CIMConfig` (model_type "cim") with `AutoConfig` and the CIM models with
`AutoModel` and `AutoModelForPreTraining`.
"""

from transformers import AutoConfig, AutoModel, AutoModelForPreTraining

from .configuration_cim import PRESET_NAMES, CIMConfig, preset_encoder_config
from .modeling_cim import CIMForPreTraining, CIMForPreTrainingOutput, CIMModel, CIMModelOutput, CIMPreTrainedModel
from .pretext import PretextBatch, correlation_maps, sample_exemplar_boxes, sample_pretext, warp_exemplars

__version__ = "0.1.0"


def _register_auto_classes() -> None:
    AutoConfig.register("cim", CIMConfig, exist_ok=True)
    AutoModel.register(CIMConfig, CIMModel, exist_ok=True)
    AutoModelForPreTraining.register(CIMConfig, CIMForPreTraining, exist_ok=True)
    CIMConfig.register_for_auto_class()
    CIMModel.register_for_auto_class("AutoModel")
    CIMForPreTraining.register_for_auto_class("AutoModelForPreTraining")


_register_auto_classes()

__all__ = [
    "PRESET_NAMES",
    "CIMConfig",
    "CIMForPreTraining",
    "CIMForPreTrainingOutput",
    "CIMModel",
    "CIMModelOutput",
    "CIMPreTrainedModel",
    "PretextBatch",
    "correlation_maps",
    "preset_encoder_config",
    "sample_exemplar_boxes",
    "sample_pretext",
    "warp_exemplars",
]
