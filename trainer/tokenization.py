"""Tokenizers for masked diffusion language models.

A diffusion LM over ``V`` real tokens needs one extra input id, ``[MASK]``, and the DSL model expects it
to be the LAST id: ``mask_token_id == V`` (GPT-2: V = 50257 real tokens, ``<|endoftext|>`` = 50256,
``[MASK]`` = 50257, exactly as in the MDLM checkpoints). Every function here returns a tokenizer that
follows that layout, with ``pad_token`` set (GPT-2: pad = eos) and never equal to ``[MASK]``.

GPT-2 offline: the machines this project is tested on cannot reach the Hugging Face Hub, but the PyPI
package ``openai-whisper`` ships the GPT-2 byte-level BPE ranks (``whisper/assets/gpt2.tiktoken``, the
same file as tiktoken's ``gpt2`` encoding). :func:`build_offline_gpt2_tokenizer` rebuilds the exact
GPT-2 tokenizer from it with the merge derivation of ``transformers``' ``TikTokenConverter``.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, GPT2TokenizerFast, PreTrainedTokenizerBase, PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import TikTokenConverter

from .assets import package_folder


logger = logging.getLogger(__name__)

MASK_TOKEN = "[MASK]"
GPT2_END_OF_TEXT = "<|endoftext|>"
GPT2_END_OF_TEXT_ID = 50256
GPT2_MODEL_MAX_LENGTH = 1024  # the value in the Hub's gpt2 tokenizer_config.json
# Hub ids whose tokenizer is the GPT-2 tokenizer, so the offline rebuild is an exact substitute.
GPT2_TOKENIZER_IDS = frozenset(
    f"{prefix}{size}"
    for prefix in ("", "openai-community/")
    for size in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
)


class _TikTokenFileConverter(TikTokenConverter):
    """``TikTokenConverter`` that reads a ``.tiktoken`` rank file without needing the ``tiktoken`` package.

    The file format is one ``<base64 token bytes> <rank>`` pair per line; this is the whole of
    ``tiktoken.load.load_tiktoken_bpe`` for a local file.
    """

    @staticmethod
    def load_tiktoken_bpe(tiktoken_url: str) -> dict[bytes, int]:
        ranks = {}
        for line in Path(tiktoken_url).read_text(encoding="utf-8").splitlines():
            if line:
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
        return ranks


def _whisper_gpt2_ranks_path() -> Path:
    # The package is located, not imported: importing whisper would pull in numba.
    path = package_folder(
        "whisper",
        "openai-whisper",
        "The offline GPT-2 tokenizer needs the GPT-2 BPE ranks shipped by `openai-whisper`; install it with "
        "`pip install --no-deps openai-whisper` (scripts/setup.sh does this).",
    ) / "assets" / "gpt2.tiktoken"
    if not path.is_file():
        raise FileNotFoundError(f"openai-whisper is installed but has no GPT-2 rank file at {path}.")
    return path


def build_offline_gpt2_tokenizer() -> GPT2TokenizerFast:
    """Build the GPT-2 tokenizer (50257 tokens, ``<|endoftext|>`` = 50256) without network access.

    The vocabulary maps each token's bytes through GPT-2's byte-to-unicode table; the merges are derived
    from the ranks (every split of a token into two lower-ranked tokens, ordered by the merged token's
    rank), which reproduces tiktoken's rank-greedy BPE. ``<|endoftext|>`` is bos, eos and unk as in the
    Hub's ``gpt2`` tokenizer; pad is not set here (see :func:`load_tokenizer`).
    """
    vocab, merges = _TikTokenFileConverter().extract_vocab_merges_from_model(str(_whisper_gpt2_ranks_path()))
    if len(vocab) != GPT2_END_OF_TEXT_ID:
        raise ValueError(f"Expected {GPT2_END_OF_TEXT_ID} BPE ranks in the GPT-2 rank file, found {len(vocab)}.")
    vocab[GPT2_END_OF_TEXT] = GPT2_END_OF_TEXT_ID
    return GPT2TokenizerFast(
        vocab=vocab,
        merges=merges,
        unk_token=GPT2_END_OF_TEXT,
        bos_token=GPT2_END_OF_TEXT,
        eos_token=GPT2_END_OF_TEXT,
        model_max_length=GPT2_MODEL_MAX_LENGTH,
    )


def add_mask_token(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Give ``tokenizer`` a ``[MASK]`` token whose id is the last one (``len(tokenizer) - 1``), in place.

    A tokenizer with no mask token gets ``[MASK]`` appended (GPT-2: id 50257). An existing mask token is
    kept only if it already is the last id, since the diffusion model treats ``mask_token_id`` as the
    vocabulary size ``V`` and never predicts it. Returns the same tokenizer for chaining.
    """
    if tokenizer.mask_token is None:
        tokenizer.add_special_tokens({"mask_token": MASK_TOKEN})
    mask_token_id = tokenizer.mask_token_id
    if mask_token_id != len(tokenizer) - 1:
        raise ValueError(
            f"The mask token {tokenizer.mask_token!r} has id {mask_token_id}, but masked diffusion needs it to be "
            f"the last id ({len(tokenizer) - 1}) so that it equals the number of real tokens; use a tokenizer "
            "without a mask token and let add_mask_token append one."
        )
    _check_pad_is_not_mask(tokenizer)
    return tokenizer


def _check_pad_is_not_mask(tokenizer: PreTrainedTokenizerBase) -> None:
    # Padding positions are ignored by the attention mask, [MASK] positions are what the model predicts:
    # sharing one id would make padded rows look like fully masked ones.
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id == tokenizer.mask_token_id:
        raise ValueError(
            f"pad_token {tokenizer.pad_token!r} and mask_token {tokenizer.mask_token!r} share id "
            f"{tokenizer.pad_token_id}; the pad token must be a different token (for GPT-2-style tokenizers, eos)."
        )


def _ensure_pad_token(tokenizer: PreTrainedTokenizerBase) -> None:
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(
                f"{type(tokenizer).__name__} has neither a pad nor an eos token; set tokenizer.pad_token first."
            )
        tokenizer.pad_token = tokenizer.eos_token
    _check_pad_is_not_mask(tokenizer)


def load_tokenizer(name_or_path: str = "gpt2") -> PreTrainedTokenizerBase:
    """Load a tokenizer (Hub id or local directory) ready for masked diffusion: with mask and pad tokens.

    For the GPT-2 family (``gpt2``, ``gpt2-large``, ...) an unreachable Hub falls back to
    :func:`build_offline_gpt2_tokenizer`, which is the identical tokenizer.
    """
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    except OSError:
        if name_or_path not in GPT2_TOKENIZER_IDS:
            raise
        logger.info(
            "Could not load the %r tokenizer from the Hub or the cache; rebuilding the identical GPT-2 tokenizer "
            "offline from the BPE ranks shipped by openai-whisper.",
            name_or_path,
        )
        tokenizer = build_offline_gpt2_tokenizer()
    _ensure_pad_token(tokenizer)
    return add_mask_token(tokenizer)


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> PreTrainedTokenizerFast:
    """Train a GPT-2-style byte-level BPE tokenizer on ``texts`` with the ``tokenizers`` library.

    ``vocab_size`` is the number of REAL tokens ``V`` (the diffusion model's output classes), counting
    ``<|endoftext|>`` (id 0; bos = eos = pad) and the 256 byte tokens; ``[MASK]`` is appended after them
    with id ``V``, so ``len(tokenizer) == V + 1``. A corpus too small to learn ``V - 257`` merges yields
    fewer real tokens (with a warning); ``mask_token_id`` is then still the number of real tokens.
    Training is deterministic for the same texts.
    """
    if isinstance(texts, str):
        raise TypeError("texts must be an iterable of documents (e.g. a list of str), not a single str.")
    minimum_vocab_size = len(pre_tokenizers.ByteLevel.alphabet()) + 1  # 256 bytes + <|endoftext|>
    if not isinstance(vocab_size, int) or vocab_size < minimum_vocab_size:
        raise ValueError(
            f"vocab_size={vocab_size!r} is too small: a byte-level BPE vocabulary holds the 256 byte tokens and "
            f"{GPT2_END_OF_TEXT}, so vocab_size must be an int >= {minimum_vocab_size}."
        )
    if not isinstance(min_frequency, int) or min_frequency < 1:
        raise ValueError(f"min_frequency={min_frequency!r} must be an int >= 1.")

    backend = Tokenizer(models.BPE())
    # add_prefix_space=False and the GPT-2 split regex: the same pre-tokenization as GPT-2.
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[GPT2_END_OF_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    learned_size = backend.get_vocab_size()
    if learned_size < vocab_size:
        logger.warning(
            "The training texts only support %d BPE tokens (asked for vocab_size=%d): the tokenizer has %d real "
            "tokens and [MASK] = %d.",
            learned_size,
            vocab_size,
            learned_size,
            learned_size,
        )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=GPT2_END_OF_TEXT,
        eos_token=GPT2_END_OF_TEXT,
        unk_token=GPT2_END_OF_TEXT,
        pad_token=GPT2_END_OF_TEXT,
    )
    return add_mask_token(tokenizer)
