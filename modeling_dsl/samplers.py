"""The samplers' registry: build a sampler by name (`get_sampler`), the names and their aliases (`SAMPLERS`,
`resolve_sampler_name`) and each sampler's knobs (`sampler_knobs`).

The samplers for masked-diffusion and DSL denoisers live by family in flat sibling modules:
- `sampling_utils.py`: what they all share (the output, the grids, the nucleus, the categorical draw, the noise, the
  network wrapper, the inputs, the step recorder, the knob checks, `SamplingConfig`, the `DiffusionSampler` base);
- `samplers_discrete.py`: MDLM, ReMDM (cap / rescale / conf / loop / rescore), ROAR and confidence-aware parallel
  decoding;
- `samplers_continuous.py`: the DSL stochastic-localization SDE;
- `samplers_hybrid.py`: the hybrid continuous-then-discrete sampler.
This module re-exports their public names, so `from .samplers import X` works for all of them. Every module here
travels to the Hugging Face Hub as remote code next to the model files (flat siblings, relative imports only), so
they import only torch, transformers, tqdm and the standard library.
"""

from __future__ import annotations

import dataclasses

from .samplers_continuous import REVISION_SELECTIONS, ContinuousState, DraftRevision, DSLSDESampler, SDEConfig
from .samplers_discrete import (
    CONFIDENCE_RULES,
    REMDM_STRATEGIES,
    ConfidenceConfig,
    ConfidenceSampler,
    ConfidenceState,
    DiscreteState,
    MDLMConfig,
    MDLMSampler,
    ReMDMConfig,
    ReMDMSampler,
    ROARConfig,
    ROARSampler,
    ROARState,
    StepPlan,
)
from .samplers_hybrid import (
    COMMIT_MODES,
    COMMIT_RULES,
    HYBRID_DISCRETE_STRATEGIES,
    EvidenceDenoiser,
    HybridConfig,
    HybridSampler,
)
from .sampling_utils import (
    NUCLEUS_RULES,
    SNR_SCHEDULES,
    Denoiser,
    DiffusionSampler,
    KeptLogits,
    MDLMTopPLogitsWarper,
    NoiseSource,
    NucleusLogitsWarper,
    SamplerInputs,
    SamplerOutput,
    SamplingConfig,
    StepRecorder,
    TokenDraw,
    gumbel_argmax,
    nucleus_kept,
    prepare_inputs,
    sampling_log_probs,
    snr_grid,
    time_grid,
    top_p_filter,
)


# ----------------------------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------------------------

SAMPLERS = {
    "mdlm": MDLMSampler,
    "remdm": ReMDMSampler,
    "dsl-sde": DSLSDESampler,
    "hybrid": HybridSampler,
    "roar": ROARSampler,
    "confidence": ConfidenceSampler,
}
# "remdm-cap" etc., the names of the ReMDM code, select the strategy.
SAMPLER_ALIASES = {f"remdm-{strategy}": ("remdm", {"strategy": strategy}) for strategy in REMDM_STRATEGIES}


def sampler_knobs(name: str) -> tuple[str, ...]:
    """The config fields (knobs) of a sampler."""
    name, _ = resolve_sampler_name(name)
    return tuple(field.name for field in dataclasses.fields(SAMPLERS[name].config_class))


def resolve_sampler_name(name: str) -> tuple[str, dict]:
    """(canonical name, knobs implied by the name). Raises a ValueError listing the accepted names."""
    if name in SAMPLERS:
        return name, {}
    if name in SAMPLER_ALIASES:
        return SAMPLER_ALIASES[name]
    accepted = ", ".join(map(repr, list(SAMPLERS) + list(SAMPLER_ALIASES)))
    raise ValueError(f"sampler={name!r} is not supported; accepted: {accepted}.")


def get_sampler(name: str, **knobs) -> DiffusionSampler:
    """Build a sampler by name (`"mdlm"`, `"remdm"`, `"remdm-loop"`, `"dsl-sde"`, `"hybrid"`, `"roar"`,
    `"confidence"`)
    from knobs. A knob that the sampler does not have raises a ValueError naming the accepted ones."""
    canonical, implied = resolve_sampler_name(name)
    sampler_class = SAMPLERS[canonical]
    accepted = {field.name for field in dataclasses.fields(sampler_class.config_class)}
    unknown = sorted(set(knobs) - accepted)
    if unknown:
        raise ValueError(f"{unknown} not knobs of sampler {canonical!r}; accepted: {sorted(accepted)}.")
    return sampler_class(**{**knobs, **implied})


__all__ = [
    "SamplerOutput",
    "SamplingConfig",
    "MDLMConfig",
    "ReMDMConfig",
    "ROARConfig",
    "ConfidenceConfig",
    "SDEConfig",
    "HybridConfig",
    "DiffusionSampler",
    "MDLMSampler",
    "ReMDMSampler",
    "ROARSampler",
    "ConfidenceSampler",
    "DSLSDESampler",
    "DraftRevision",
    "REVISION_SELECTIONS",
    "HybridSampler",
    "DiscreteState",
    "StepPlan",
    "KeptLogits",
    "ContinuousState",
    "ROARState",
    "ConfidenceState",
    "NoiseSource",
    "Denoiser",
    "SamplerInputs",
    "prepare_inputs",
    "time_grid",
    "snr_grid",
    "top_p_filter",
    "nucleus_kept",
    "NucleusLogitsWarper",
    "MDLMTopPLogitsWarper",
    "TokenDraw",
    "NUCLEUS_RULES",
    "EvidenceDenoiser",
    "StepRecorder",
    "REMDM_STRATEGIES",
    "CONFIDENCE_RULES",
    "SNR_SCHEDULES",
    "COMMIT_RULES",
    "COMMIT_MODES",
    "HYBRID_DISCRETE_STRATEGIES",
    "sampling_log_probs",
    "gumbel_argmax",
    "get_sampler",
    "sampler_knobs",
    "resolve_sampler_name",
    "SAMPLERS",
    "SAMPLER_ALIASES",
]
