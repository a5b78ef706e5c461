"""Builders shared by the test files: tiny DSL configs and models, tiny word-level tokenizers.

A plain module (imported as ``from helpers import ...``, like ``mdlm_reference``), so that subprocess workers
started as ``python tests/<file>.py`` can use it too; pytest fixtures live in ``conftest.py``.
"""

import json
import os
import subprocess
import sys

import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit
from transformers import PreTrainedTokenizerFast

from dsl_diffusion.modeling_dsl import DSLConfig, DSLForMaskedDiffusion


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# The tiny DSL model most tests use: 32 real tokens, [MASK] = 32.
TINY_DSL_KWARGS = dict(
    vocab_size=32,
    mask_token_id=32,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    cond_dim=16,
    max_position_embeddings=64,
    embed_dim=8,
)


def tiny_dsl_config(**overrides) -> DSLConfig:
    """The tiny DSL config, with ``overrides`` replacing or adding fields."""
    return DSLConfig(**{**TINY_DSL_KWARGS, **overrides})


def tiny_dsl_model(seed: int = 0, **overrides) -> DSLForMaskedDiffusion:
    """A tiny random DSL model (initialized after ``torch.manual_seed(seed)``), in eval mode."""
    torch.manual_seed(seed)
    return DSLForMaskedDiffusion(tiny_dsl_config(**overrides)).eval()


def word_level_tokenizer(words, unknown_word: str, /, **special_tokens) -> PreTrainedTokenizerFast:
    """A whitespace-split word-level tokenizer whose ids are the positions in ``words``; words not in ``words`` map
    to ``unknown_word``. ``special_tokens`` (``pad_token=...``, ``unk_token=...``) go to the fast tokenizer."""
    backend = Tokenizer(WordLevel({word: index for index, word in enumerate(words)}, unk_token=unknown_word))
    backend.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, **special_tokens)


def run_remote_code(script: str, folder, tmp_path) -> dict:
    """Run `script` (given the saved `folder` as argv[1]) in a fresh, isolated Python process with its own remote-code
    cache and no Hub access; return the JSON object its last printed line holds."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    result = subprocess.run(
        [sys.executable, "-I", "-c", script, str(folder)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])
