"""The `diffusion-text-generation` pipeline (and the samplers, re-exported from `dsl_diffusion.modeling_dsl`).

Importing this package registers the pipeline task with transformers, so that
`pipeline("diffusion-text-generation", model=model, tokenizer=tokenizer)` works in-library, and registers the DSL
model with the Auto classes (through `dsl_diffusion.modeling_dsl`), so that a saved DSL folder loads by path.
"""

import sys

from transformers import AutoModel
from transformers.pipelines import PIPELINE_REGISTRY

from .. import modeling_dsl  # noqa: F401  (registers DSLConfig / DSLForMaskedDiffusion with the Auto classes)
from ..modeling_dsl import samplers
from ..modeling_dsl.generation_dsl import DSLGenerationConfig
from ..modeling_dsl.samplers import (
    SAMPLERS,
    DiffusionSampler,
    DSLSDESampler,
    HybridConfig,
    HybridSampler,
    MDLMConfig,
    MDLMSampler,
    ReMDMConfig,
    ReMDMSampler,
    ROARConfig,
    ROARSampler,
    SamplerOutput,
    SDEConfig,
    get_sampler,
    snr_grid,
    time_grid,
    top_p_filter,
)
from .pipeline_diffusion import TASK, DiffusionTextGenerationPipeline

# The samplers live next to the modeling files (`modeling_dsl/samplers.py`, the registry, and its siblings by family):
# `model.generate` needs them, and the model's remote code can only ship flat siblings of the modeling file. `dsl_diffusion.pipelines.samplers` stays
# importable as the same module object (one set of classes), so existing imports keep working.
sys.modules[f"{__name__}.samplers"] = samplers

PIPELINE_REGISTRY.register_pipeline(TASK, pipeline_class=DiffusionTextGenerationPipeline, pt_model=AutoModel)

__all__ = [
    "TASK",
    "DSLGenerationConfig",
    "DiffusionTextGenerationPipeline",
    "SAMPLERS",
    "DiffusionSampler",
    "DSLSDESampler",
    "HybridConfig",
    "HybridSampler",
    "MDLMConfig",
    "MDLMSampler",
    "ReMDMConfig",
    "ReMDMSampler",
    "ROARConfig",
    "ROARSampler",
    "SamplerOutput",
    "SDEConfig",
    "get_sampler",
    "snr_grid",
    "time_grid",
    "top_p_filter",
]
