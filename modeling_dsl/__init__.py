"""The DSL denoiser. Importing this package registers it with the transformers Auto classes (in-library), and
marks the classes for remote code so that `save_pretrained` writes the flat modeling files and an `auto_map`."""

from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM

from .configuration_dsl import DSLConfig
from .generation_dsl import DSLGenerateOutput, DSLGenerationConfig, DSLGenerationMixin
from .modeling_dsl import DSLForMaskedDiffusion, DSLMaskedDiffusionOutput, DSLPreTrainedModel

AutoConfig.register(DSLConfig.model_type, DSLConfig, exist_ok=True)
AutoModel.register(DSLConfig, DSLForMaskedDiffusion, exist_ok=True)
AutoModelForMaskedLM.register(DSLConfig, DSLForMaskedDiffusion, exist_ok=True)

DSLConfig.register_for_auto_class()
DSLForMaskedDiffusion.register_for_auto_class("AutoModel")

__all__ = [
    "DSLConfig",
    "DSLForMaskedDiffusion",
    "DSLGenerateOutput",
    "DSLGenerationConfig",
    "DSLGenerationMixin",
    "DSLMaskedDiffusionOutput",
    "DSLPreTrainedModel",
]
