"""Model cards and Hub uploads for DSL checkpoints: :func:`build_model_card` renders the card (metadata, usage,
training details, the sweep's eval results), ``dsl-push`` (:mod:`dsl_diffusion.hub_cards.push`) assembles the
repository folder and uploads it."""

from .card import (
    DEFAULT_TAGS,
    PIPELINE_TASK,
    TEMPLATE_PATH,
    build_model_card,
    eval_results_from_sweep,
    sampler_defaults,
)


__all__ = [
    "DEFAULT_TAGS",
    "PIPELINE_TASK",
    "TEMPLATE_PATH",
    "build_model_card",
    "eval_results_from_sweep",
    "sampler_defaults",
]
