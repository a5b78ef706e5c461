"""Evaluation of DSL models: sample quality (MAUVE, Frechet distance, generative perplexity, unigram entropy),
likelihoods, calibration, self-correction, step-budget sweeps (``dsl-evaluate``) and their plots.

Names are imported lazily (as transformers and diffusers do), so that ``import dsl_diffusion.evaluation`` and
light users such as the model cards do not pay for mauve / faiss / scikit-learn until a metric is used.
"""

import importlib
from pathlib import Path


_EXPORTS = {
    "metrics": [
        "PROTOCOL_FEATURIZER",
        "PROTOCOL_JUDGE",
        "TextFeaturizer",
        "MauveResult",
        "compute_mauve",
        "frechet_distance",
        "Judge",
        "load_judge",
        "GenerativePerplexityResult",
        "compute_generative_perplexity",
        "EntropyResult",
        "unigram_entropy",
        "compute_unigram_entropy",
    ],
    "assets": ["minilm_encoder_path", "smollm2_gguf_judge"],
    "likelihood": ["LikelihoodResult", "evaluate_likelihood"],
    "calibration": [
        "ReliabilityResult",
        "expected_calibration_error",
        "CalibrationResult",
        "evaluate_calibration",
        "plot_reliability_diagrams",
    ],
    "self_correction": ["corrupt_tokens", "matched_evidence_snr", "SelfCorrectionResult", "evaluate_self_correction"],
    "plots": [
        "Curve",
        "plot_metric_vs_nfe",
        "nfe_to_reach",
        "NFEComparison",
        "NoiseFloor",
        "compare_curves",
        "curves_from_rows",
        "measure_noise_floor",
    ],
    "report": ["protocol_lines", "protocol_caption", "results_table", "render_markdown"],
    "sweep": ["SweepArguments", "run_sweep", "load_reference_texts"],
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

EVALUATE_MODULES_DIR = Path(__file__).resolve().parent / "evaluate_modules"
EVALUATE_MODULES = ("generative_perplexity", "unigram_entropy", "dsl_mauve")


def evaluate_module_path(name: str) -> str:
    """Path of a local ``evaluate`` metric script of this package, for ``evaluate.load(path)``.

    ``"generative_perplexity"``, ``"unigram_entropy"`` or ``"dsl_mauve"``: thin wrappers over the functions of
    :mod:`dsl_diffusion.evaluation.metrics`, loadable offline.
    """
    if name not in EVALUATE_MODULES:
        raise ValueError(f"Unknown evaluate module {name!r}; accepted: {EVALUATE_MODULES}")
    return str(EVALUATE_MODULES_DIR / name / f"{name}.py")


def __getattr__(name):
    if name in _MODULE_OF:
        module = importlib.import_module(f".{_MODULE_OF[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_MODULE_OF])


__all__ = [*_MODULE_OF, "evaluate_module_path", "EVALUATE_MODULES"]
