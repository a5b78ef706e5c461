"""Samplers for masked-diffusion and DSL denoisers: MDLM, ReMDM (cap / rescale / conf / loop), the DSL
stochastic-localization SDE, the hybrid continuous-then-discrete sampler and ROAR.

This file travels to the Hugging Face Hub as remote code next to the model files, so it imports only torch,
transformers, tqdm and the standard library.

Every sampler is one small object in the spirit of diffusers' schedulers: a validated `@dataclass` config, a state,
a `step(state, model_output)` that advances the state by one step given the network's output, and a
`run(model, ...)` that drives the whole loop and returns a [`SamplerOutput`].

The denoiser contract (the DSL model, MDLM-style models and the test toys all follow it):
- `model(input_ids=[B, L], attention_mask=...)` -> `.logits [B, L, V]`: the discrete endpoint path (a token is
  clean, `[MASK]` = `model.config.mask_token_id` is SNR 0). The model shows these endpoints to its network as it
  was trained to see them (the DSL model's `config.endpoint_inputs`); a sampler's `s_hi` reaches it as
  `endpoint_snr=`;
- `model(noisy_states=[B, L, d], attention_mask=...)` -> `.logits`: the continuous DSL path;
- `model.token_directions()` -> unit-norm `[V, d]` (the SDE's drift is the posterior mean `softmax(logits) @ E`);
- `model.config.mask_token_id`, `model.config.snr_max`, `model.config.max_position_embeddings`.

Common conventions (METHOD.md section 4): the discrete time grid is `t_k = linspace(1, t_min, T + 1)` with
`alpha_t = 1 - t`; categorical draws (one shared [`TokenDraw`]) apply the user's logits processors, temperature,
top-k and top-p, then draw by Gumbel-max in float64 (or take the argmax with `do_sample=False`); top-p has
transformers' meaning (keep mass >= p) unless `nucleus_rule="mdlm"` (the published rule: keep the tokens whose
cumulative probability is <= p, the top-1 always kept); `[MASK]` is never sampled; a final noise-removal step fills
any `[MASK]` left greedily. NFE counts real network calls: with `logits_where_needed` (the default) a discrete step
in which no position unmasks makes none (see [`MDLMSampler`]).

Reproducibility: pass a list of `torch.Generator`s (one per row) and each row's draws depend on its own generator
only, so a row sampled inside a (left-padded) batch equals the same row sampled alone with the same generator. A
single generator (or none) draws the whole batch at once, which is faster and still deterministic.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from transformers import LogitsProcessor, LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper
from transformers.utils import ModelOutput, logging
from transformers.utils.logging import tqdm  # honours transformers.utils.logging.disable_progress_bar()


logger = logging.get_logger(__name__)

REMDM_STRATEGIES = ("cap", "rescale", "conf", "loop")
SNR_SCHEDULES = ("log-linear", "log-normal", "linear")
COMMIT_RULES = ("threshold", "top_fraction")
COMMIT_MODES = ("evidence", "sample", "argmax")
# "transformers": top_p keeps the smallest set of tokens whose mass is >= p (transformers' TopPLogitsWarper);
# "mdlm": the published MDLM / ReMDM rule, the tokens whose cumulative mass is <= p (the top-1 always kept).
NUCLEUS_RULES = ("transformers", "mdlm")
HYBRID_DISCRETE_STRATEGIES = ("mdlm",) + REMDM_STRATEGIES


# ----------------------------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class SamplerOutput(ModelOutput):
    """Result of a sampler run.

    Args:
        sequences: `[batch, length]` generated token ids (no `[MASK]` left; fixed tokens and padding unchanged).
        nfe: number of real network forward passes (cache hits are not counted).
        trajectory: with `return_trajectory=True`, one `[batch, length]` draft per step (on CPU): for discrete
            samplers the tokens after the step (`[MASK]` where still masked), for the SDE the argmax of
            p(x | z) after the step. The last draft equals `sequences`.
        confidences: with `return_confidences=True`, `[batch, length]` float32: the probability each token had
            under the sampling distribution when it was (last) decoded; 1 for fixed tokens, 0 for padding.
    """

    sequences: torch.LongTensor | None = None
    nfe: int | None = None
    trajectory: list[torch.LongTensor] | None = None
    confidences: torch.FloatTensor | None = None


# ----------------------------------------------------------------------------------------------------------------
# Numerics shared by all samplers
# ----------------------------------------------------------------------------------------------------------------


def time_grid(num_steps: int, t_min: float = 1e-5, device=None) -> torch.Tensor:
    """The discrete samplers' grid `t_k = linspace(1, t_min, num_steps + 1)` in float64."""
    return torch.linspace(1.0, t_min, num_steps + 1, dtype=torch.float64, device=device)


def snr_grid(
    schedule: str,
    num_steps: int,
    snr_max: float,
    snr_min: float = 1e-3,
    lognormal_mean: float = 2.69,
    lognormal_std: float = 1.41,
    device=None,
) -> torch.Tensor:
    """An increasing SNR grid `s_0 < s_1 < ... < s_K = snr_max` (K = num_steps) in float64.

    - "linear": `linspace(0, snr_max, K + 1)`.
    - "log-linear": geometric from `snr_min` to `snr_max` (the SDE starts from the tiny-noise state at `snr_min`).
    - "log-normal": the quantiles of the training SNR law `logN(mean, std)` at `K + 1` equally spaced levels of
      `[0, F(snr_max)]`, so `s_0 = 0`, `s_K = snr_max`, and the steps are dense where training put its SNRs.
    """
    # snr_max may come from the model config rather than the sampler's own (validated) knobs.
    _check_range("snr_max", snr_max, 0.0, math.inf, low_open=True, high_open=True)
    if schedule == "log-linear" and not snr_min < snr_max:
        raise ValueError(
            f"snr_min={snr_min} must be < snr_max={snr_max}: the log-linear SNR grid rises from snr_min to snr_max. "
            "Lower snr_min or raise snr_max."
        )
    if schedule == "linear":
        return torch.linspace(0.0, snr_max, num_steps + 1, dtype=torch.float64, device=device)
    if schedule == "log-linear":
        return torch.logspace(
            math.log10(snr_min), math.log10(snr_max), num_steps + 1, dtype=torch.float64, device=device
        )
    if schedule == "log-normal":
        top_level = 0.5 * math.erfc(-(math.log(snr_max) - lognormal_mean) / (lognormal_std * math.sqrt(2.0)))
        levels = torch.linspace(0.0, top_level, num_steps + 1, dtype=torch.float64, device=device)
        grid = torch.exp(lognormal_mean + lognormal_std * torch.special.ndtri(levels))
        grid[-1] = snr_max  # exact endpoint despite the round trip through the normal quantile
        return grid
    raise ValueError(f"snr_schedule={schedule!r} is not supported; accepted: {SNR_SCHEDULES}.")


# The nucleus is looked for among the top 256, then the top 4,096 tokens of a row: a trained LM's nucleus is usually
# small, and a partial top-k costs a fraction of a |V|-wide sort. A row whose nucleus is most of the vocabulary (a
# nearly flat row) drops only its least probable tokens, which are looked for among the bottom 16,384 (unsorted, that
# top-k takes about an eighth of a 50,257-wide sort; then only those candidates are sorted). Only then is the whole
# row sorted: on rows whose nucleus is about half the vocabulary, the bottom 16,384 miss and cost ~30% extra.
NUCLEUS_CANDIDATES = (256, 4096)
DROPPED_CANDIDATES = 16384


def nucleus_kept(probs: torch.Tensor, top_p: float, rule: str = "transformers") -> torch.BoolTensor:
    """The tokens a nucleus keeps, `[..., V]` bool (`probs`: rows summing to 1). "transformers": the smallest set of
    most probable tokens whose mass is >= `top_p` (a token is kept when the mass ranked above it is < `top_p`, as
    transformers' `TopPLogitsWarper`); "mdlm": the tokens whose cumulative mass, their own included, is <= `top_p`
    (the MDLM / ReMDM code). The top-1 is always kept.

    Exact without sorting the vocabulary in two cases. When the top k candidates already hold `top_p` of the mass,
    no token outside them can be kept (the mass ranked above it is >= `top_p`); a row skips to the next stage when
    even the next tier cannot hold `top_p` (its mass is at most the current mass plus the new candidates, each no
    more probable than the last one). When the 16,384 least probable tokens hold more than 1 - `top_p` of the mass, every
    dropped token is among them: a token is dropped iff the mass at and below it in ascending order is <= 1 - `top_p`
    ("transformers": the very form of transformers' warper; "mdlm": the mass strictly below it is < 1 - `top_p`)."""
    if top_p >= 1.0:
        return torch.ones_like(probs, dtype=torch.bool)
    flat = probs.reshape(-1, probs.shape[-1])
    vocab_size = flat.shape[-1]
    kept = torch.zeros_like(flat, dtype=torch.bool)

    def keep(rows, top, index):
        cumulative = top.cumsum(dim=-1)
        keep = (cumulative - top < top_p) if rule == "transformers" else (cumulative <= top_p)
        keep[:, 0] = True
        kept[rows] = kept[rows].scatter_(-1, index, keep)

    pending = torch.arange(flat.shape[0], device=flat.device)
    hopeless = []
    tiers = [k for k in NUCLEUS_CANDIDATES if k < vocab_size]
    for k, next_k in zip(tiers, tiers[1:] + [vocab_size]):
        if not pending.numel():
            break
        top, index = flat[pending].topk(k, dim=-1)
        mass = top.sum(dim=-1)
        found = mass >= top_p
        keep(pending[found], top[found], index[found])
        beyond_reach = ~found & (mass + (next_k - k) * top[:, -1] < top_p)
        hopeless.append(pending[beyond_reach])
        pending = pending[~found & ~beyond_reach]
    rows = torch.cat([*hopeless, pending])
    dropped_mass = 1.0 - top_p
    if rows.numel() and DROPPED_CANDIDATES < vocab_size:
        bottom, index = flat[rows].topk(DROPPED_CANDIDATES, dim=-1, largest=False, sorted=False)
        mass = bottom.sum(dim=-1)
        found = mass > dropped_mass if rule == "transformers" else mass >= dropped_mass
        ascending, order = bottom[found].sort(dim=-1)
        cumulative = ascending.cumsum(dim=-1)
        drop = (cumulative <= dropped_mass) if rule == "transformers" else (cumulative - ascending < dropped_mass)
        found_rows = rows[found]
        row_kept = torch.ones(len(found_rows), vocab_size, dtype=torch.bool, device=flat.device)
        kept[found_rows] = row_kept.scatter_(-1, index[found].gather(-1, order), ~drop)
        kept[found_rows, flat[found_rows].argmax(dim=-1)] = True
        rows = rows[~found]
    if rows.numel():
        keep(rows, *flat[rows].sort(dim=-1, descending=True))
    return kept.reshape(probs.shape)


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filtering with the rule of the MDLM / ReMDM code: keep the tokens whose cumulative probability (in
    decreasing order) is <= `top_p`, always keep the top-1, renormalize. `probs`: `[..., V]`, rows summing to 1."""
    if top_p >= 1.0:
        return probs
    filtered = probs * nucleus_kept(probs, top_p, "mdlm")
    return filtered / filtered.sum(dim=-1, keepdim=True)


class NucleusLogitsWarper(LogitsProcessor):
    """Top-p filtering as a transformers logits warper, with either rule of [`nucleus_kept`]: "transformers" keeps
    what transformers' `TopPLogitsWarper` keeps (found without sorting the vocabulary when the nucleus is small),
    "mdlm" the published MDLM / ReMDM rule."""

    rule = "transformers"

    def __init__(self, top_p: float, filter_value: float = -math.inf):
        if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p={top_p!r} must be a number in (0, 1].")
        self.top_p = float(top_p)
        self.filter_value = filter_value

    def __call__(self, input_ids: torch.LongTensor | None, scores: torch.Tensor) -> torch.Tensor:
        kept = nucleus_kept(torch.softmax(scores.double(), dim=-1), self.top_p, self.rule)
        return scores.masked_fill(~kept, self.filter_value)


class MDLMTopPLogitsWarper(NucleusLogitsWarper):
    """The published MDLM / ReMDM nucleus rule as a transformers logits warper: keep the tokens whose cumulative
    probability is <= `top_p` (the top-1 always kept). transformers' `TopPLogitsWarper` keeps the smallest set whose
    mass is >= `top_p` instead, i.e. one token more at the boundary. Usable in any `generate` (the demo's
    autoregressive reference uses it, so that every arm samples with the same rule)."""

    rule = "mdlm"


def sampling_log_probs(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_p: float = 1.0,
    *,
    top_k: int = 0,
    nucleus_rule: str = "transformers",
    logits_processor: LogitsProcessorList | None = None,
    context_ids: torch.LongTensor | None = None,
) -> torch.Tensor:
    """float64 log-probabilities of the sampling distribution of `logits` (`[N, V]`), in transformers' order: the
    user's `logits_processor` (called as `processor(context_ids, scores)`), then temperature, top-k and top-p
    (`nucleus_rule` "transformers": keep mass >= p; "mdlm": keep mass <= p), then a log-softmax. Filtered tokens get
    log-probability -inf, so they are never drawn."""
    scores = logits.double()
    if logits_processor:
        scores = logits_processor(context_ids, scores).double()
    warpers = LogitsProcessorList()
    if temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(float(temperature)))
    if top_k:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        warpers.append(NucleusLogitsWarper(top_p) if nucleus_rule == "transformers" else MDLMTopPLogitsWarper(top_p))
    return torch.log_softmax(warpers(context_ids, scores), dim=-1)


def gumbel_argmax(log_probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Gumbel-max: argmax(log p + G), G = -log(-log U) with U ~ U[0, 1) in float64. p = 0 is never drawn."""
    gumbel = -torch.log(-torch.log(uniforms))
    return (log_probs + gumbel).argmax(dim=-1)


# ----------------------------------------------------------------------------------------------------------------
# Randomness, the network wrapper and the inputs
# ----------------------------------------------------------------------------------------------------------------


class NoiseSource:
    """Random draws at selected positions of a `[batch, length]` layout.

    With one generator per row, each row draws only for its own selected positions, in position order, so its
    numbers never depend on the other rows or on left padding. With a single generator (or `None`, torch's default
    generator) the whole batch draws at once.

    Draws are made on the model's device: a generator of another device (a CPU generator for a GPU run) seeds, once,
    a generator on the model's device, so that the `[N, V]` float64 uniforms of the categorical draws are never
    made on the CPU and copied over. Deterministic given the user's generators, but a different stream from drawing
    on the CPU.
    """

    def __init__(self, generator, batch_size: int, device: torch.device):
        self.device = device
        if isinstance(generator, (list, tuple)):
            if len(generator) != batch_size:
                raise ValueError(
                    f"got {len(generator)} generators for a batch of {batch_size} rows: pass one per row, a single "
                    "torch.Generator or None."
                )
            if not all(isinstance(g, torch.Generator) for g in generator):
                raise TypeError("every element of `generator` must be a torch.Generator.")
            self.row_generators, self.generator = [self._on_device(g) for g in generator], None
        elif generator is None or isinstance(generator, torch.Generator):
            self.row_generators, self.generator = None, self._on_device(generator)
        else:
            raise TypeError(
                f"generator must be None, a torch.Generator or a list of them, got {type(generator).__name__}."
            )

    def _on_device(self, generator: torch.Generator | None) -> torch.Generator | None:
        if generator is None or torch.device(generator.device).type == torch.device(self.device).type:
            return generator
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        return torch.Generator(self.device).manual_seed(seed)

    def _draw(self, kind: str, shape: tuple, generator, dtype) -> torch.Tensor:
        draw = torch.rand if kind == "uniform" else torch.randn
        return draw(shape, generator=generator, dtype=dtype, device=self.device)

    def sample(self, where: torch.Tensor, trailing: tuple = (), kind: str = "uniform", dtype=torch.float64):
        """`[N, *trailing]` draws for the N positions where `where` ([batch, length] bool) is True, row-major."""
        if self.row_generators is None:
            return self._draw(kind, (int(where.sum()), *trailing), self.generator, dtype)
        counts = where.sum(dim=1).tolist()
        draws = [self._draw(kind, (n, *trailing), g, dtype) for n, g in zip(counts, self.row_generators)]
        return torch.cat(draws, dim=0)

    def uniform_map(self, where: torch.Tensor) -> torch.Tensor:
        """`[batch, length]` float64 uniforms at `where`, 0 elsewhere."""
        out = torch.zeros(where.shape, dtype=torch.float64, device=self.device)
        out[where] = self.sample(where)
        return out


def default_synced_gpus() -> bool:
    """True iff torch.distributed runs with more than one rank (e.g. under DeepSpeed ZeRO-3)."""
    return torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1


def all_ranks_agree(flag: bool, device: torch.device) -> bool:
    """True iff `flag` holds on every rank (an all-reduce MIN); every rank must call this the same number of times."""
    value = torch.tensor(int(flag), device=device)
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MIN)
    return bool(value.item())


def _max_over_ranks(value: int, device: torch.device) -> int:
    tensor = torch.tensor(value, device=device)
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
    return int(tensor.item())


@dataclass
class KeptLogits:
    """Logits computed only where a sampler needs them (`forward(logits_to_keep=kept)`): `values` `[N, V]` at the
    positions of the `[batch, length]` bool map `kept`, row-major. Indexed like the full `[batch, length, V]` logits:
    `logits[where]` gives the rows of the positions of `where`, which must lie inside `kept`.

    When `kept` selects no position the [`Denoiser`] makes no network call and returns [`KeptLogits.empty`]: its
    `values` are `[0, 0]` (the vocabulary width is not known without a call), and nothing can be read from it."""

    values: torch.Tensor
    kept: torch.BoolTensor

    @classmethod
    def empty(cls, kept: torch.BoolTensor) -> "KeptLogits":
        """The logits of a call that was not made because `kept` selects no position."""
        return cls(values=torch.empty(0, 0, device=kept.device), kept=kept)

    def __getitem__(self, where: torch.BoolTensor) -> torch.Tensor:
        if bool((where & ~self.kept).any()):
            raise RuntimeError("logits were requested at a position whose logits were not computed (not in `kept`).")
        return self.values[where[self.kept]]


class Denoiser:
    """Calls the network, counts real calls (NFE) and keeps the discrete output cache.

    `from_tokens(tokens, keep)` makes no call when `keep` selects no position (nothing needs logits), nor, with the
    cache, when the tokens are exactly those of the previous call and that call computed every position of `keep`
    (the previous logits are reused: valid because the network has no time input). Under `synced_gpus` a call is
    skipped only if every rank can skip it, so every rank makes the same number of forward passes (ZeRO-3 gathers
    parameters collectively): a rank that needs no logits still calls the network, with its empty `keep`, while
    another rank needs them.

    A token state always reaches the network as `input_ids`: the model knows whether its weights were trained on
    the converter at the SNR endpoints (DSL) or on table rows (MDLM) and shows the state accordingly. `endpoint_snr`
    (the sampler's `s_hi`, None = the model's default) is passed along; `s_hi` is the SNR at which
    `tokens_to_states` places fixed tokens on the continuous path. `from_tokens(tokens, keep)` returns
    [`KeptLogits`] at `keep` when the model's forward takes `logits_to_keep`, else the full logits.
    """

    def __init__(
        self,
        model,
        attention_mask: torch.Tensor | None,
        *,
        use_cache: bool = False,
        synced_gpus: bool = False,
        s_hi: float | None = None,
        endpoint_snr: float | None = None,
        torch_compile: bool = False,
    ):
        self.model = model
        # Compiled once per model and reused by every later run (the compiled code lives in dynamo's cache).
        self.network = torch.compile(model) if torch_compile else model
        self.attention_mask = attention_mask
        self.use_cache = use_cache
        self.synced_gpus = synced_gpus
        self.endpoint_snr = endpoint_snr
        self.mask_token_id = model.config.mask_token_id
        self.s_hi = s_hi
        self.nfe = 0
        self._cached_tokens = None
        self._cached_keep = None
        self._cached_logits = None
        self._directions = None
        self.keeps_logits = not torch_compile and "logits_to_keep" in inspect.signature(model.forward).parameters

    def _forward(self, logits_to_keep: torch.BoolTensor | None = None, **model_inputs) -> torch.Tensor | KeptLogits:
        self.nfe += 1
        if logits_to_keep is not None and self.keeps_logits:
            values = self.network(**model_inputs, attention_mask=self.attention_mask, logits_to_keep=logits_to_keep)
            return KeptLogits(self._without_mask_class(values.logits), logits_to_keep)
        return self._without_mask_class(self.network(**model_inputs, attention_mask=self.attention_mask).logits)

    def _without_mask_class(self, logits: torch.Tensor) -> torch.Tensor:
        if logits.shape[-1] > self.mask_token_id:
            # MDLM-style heads carry a [MASK] class: it is never a sampling outcome.
            logits = logits.clone()
            logits[..., self.mask_token_id] = -torch.inf
        return logits

    def token_directions(self) -> torch.Tensor:
        if self._directions is None:
            self._directions = self.model.token_directions().detach().float()
        return self._directions

    def tokens_to_states(self, tokens: torch.Tensor) -> torch.Tensor:
        """z = s_hi e_x at token positions, 0 at `[MASK]`."""
        directions = self.token_directions()
        is_token = tokens != self.mask_token_id
        states = directions[tokens.masked_fill(~is_token, 0)] * self.s_hi
        return states * is_token[..., None]

    def from_tokens(self, tokens: torch.Tensor, keep: torch.BoolTensor | None = None) -> torch.Tensor | KeptLogits:
        """Logits for a discrete state at the `[batch, length]` positions `keep` (None = everywhere); no call (an
        empty [`KeptLogits`]) when `keep` selects nothing, and the cached logits when they cover the request."""
        reuse = self.use_cache and self._cache_covers(tokens, keep)
        skip = reuse or (keep is not None and not bool(keep.any()))
        if self.synced_gpus and (self.use_cache or keep is not None):
            # Both conditions come from the run's config, the same on every rank, so every rank votes at every call.
            skip = all_ranks_agree(skip, tokens.device)
        if skip:
            return self._cached_logits if reuse else KeptLogits.empty(keep)
        endpoint_kwargs = {} if self.endpoint_snr is None else {"endpoint_snr": self.endpoint_snr}
        logits = self._forward(input_ids=tokens, logits_to_keep=keep, **endpoint_kwargs)
        if self.use_cache:
            self._cached_tokens, self._cached_logits = tokens.clone(), logits
            # A model without `logits_to_keep` (or a compiled one) computed every position whatever `keep` asked.
            self._cached_keep = logits.kept.clone() if isinstance(logits, KeptLogits) else None
        return logits

    def _cache_covers(self, tokens: torch.Tensor, keep: torch.BoolTensor | None) -> bool:
        """Whether the previous call's logits serve `tokens` at `keep`: the same tokens, and every position of
        `keep` computed (every position, for `keep=None`)."""
        if self._cached_tokens is None or not torch.equal(tokens, self._cached_tokens):
            return False
        if self._cached_keep is None:
            return True
        return keep is not None and not bool((keep & ~self._cached_keep).any())

    def _forget_cached_logits(self) -> None:
        """Drop the cached output (the network's input changed where the tokens did not)."""
        self._cached_tokens = self._cached_keep = self._cached_logits = None

    def from_states(self, noisy_states: torch.Tensor) -> torch.Tensor:
        """Logits for continuous noisy states (never cached: z changes at every step)."""
        return self._forward(noisy_states=noisy_states)


@dataclass
class SamplerInputs:
    """The starting sequences of a run.

    Attributes:
        tokens: `[B, L]` ids; `[MASK]` marks what to generate.
        attention_mask: what the network receives (None = attend everywhere).
        valid: `[B, L]` bool, False at padding.
        generatable: `[B, L]` bool, the positions the sampler writes (the `[MASK]` positions that are not padding).
    """

    tokens: torch.LongTensor
    attention_mask: torch.Tensor | None
    valid: torch.BoolTensor
    generatable: torch.BoolTensor


def _model_device(model) -> torch.device:
    tensor = next(itertools.chain(model.parameters(), model.buffers()), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def prepare_inputs(model, input_ids=None, attention_mask=None, batch_size=None, seq_len=None) -> SamplerInputs:
    """Validate the conditioning and build the starting state.

    - Unconditional: `input_ids=None`; `batch_size` (default 1) rows of `seq_len` (default
      `model.config.max_position_embeddings`) `[MASK]`s.
    - Prefix / infilling: `input_ids` holds the fixed tokens and `[MASK]` where to generate. Left padding is
      marked by `attention_mask` (0 = padding); padded positions are never generated nor attended to.
    """
    mask_token_id = getattr(model.config, "mask_token_id", None)
    if mask_token_id is None:
        raise ValueError("the model has no mask token: its config must set `mask_token_id` (the [MASK] input id).")
    device = _model_device(model)
    if input_ids is None:
        batch_size = 1 if batch_size is None else batch_size
        seq_len = getattr(model.config, "max_position_embeddings", None) if seq_len is None else seq_len
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r} must be an integer >= 1.")
        if not isinstance(seq_len, int) or seq_len < 1:
            raise ValueError(f"seq_len={seq_len!r} must be an integer >= 1.")
        if attention_mask is not None:
            raise ValueError("attention_mask needs input_ids: unconditional generation has no padding.")
        tokens = torch.full((batch_size, seq_len), mask_token_id, dtype=torch.long, device=device)
    else:
        if not torch.is_tensor(input_ids) or input_ids.dim() != 2 or input_ids.dtype != torch.long:
            raise ValueError("input_ids must be a LongTensor of shape [batch, length].")
        if input_ids.numel() and (input_ids.min() < 0 or input_ids.max() > mask_token_id):
            raise ValueError(f"input_ids must lie in [0, {mask_token_id}] ([MASK] = {mask_token_id}).")
        tokens = input_ids.to(device)
    valid = torch.ones_like(tokens, dtype=torch.bool)
    if attention_mask is not None:
        if tuple(attention_mask.shape) != tuple(tokens.shape):
            raise ValueError(
                f"attention_mask has shape {list(attention_mask.shape)}, input_ids has {list(tokens.shape)}."
            )
        if attention_mask.dtype != torch.bool and bool(((attention_mask != 0) & (attention_mask != 1)).any()):
            raise ValueError("attention_mask must hold only 0 (padding) and 1 (real token).")
        attention_mask = attention_mask.to(device)
        valid = attention_mask.bool()
    generatable = (tokens == mask_token_id) & valid
    return SamplerInputs(tokens=tokens, attention_mask=attention_mask, valid=valid, generatable=generatable)


class StepRecorder:
    """Runs once after every step: collects the trajectory, hands the draft to a streamer
    (`streamer.put_draft(value=tokens)`, DiffusionGemma's draft hook, `[batch, length]` on CPU) and calls the
    per-step callback `callback(step_index, state)`."""

    def __init__(self, callback: Callable | None, keep_trajectory: bool, streamer=None):
        self.callback = callback
        self.trajectory = [] if keep_trajectory else None
        self.streamer = streamer if streamer is not None and hasattr(streamer, "put_draft") else None

    @property
    def reads_drafts(self) -> bool:
        """Whether anything looks at the per-step drafts (a sampler may skip reading a draft nobody sees)."""
        return self.trajectory is not None or self.streamer is not None or self.callback is not None

    def __call__(self, step_index: int, state) -> None:
        draft = state.tokens.detach().cpu().clone() if self.trajectory is not None or self.streamer else None
        if self.trajectory is not None:
            self.trajectory.append(draft)
        if self.streamer is not None:
            self.streamer.put_draft(value=draft)
        if self.callback is not None:
            self.callback(step_index, state)


# ----------------------------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------------------------


def _check_int(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r}).")
    if value < minimum:
        raise ValueError(f"{name}={value} must be >= {minimum}.")


def _check_range(name, value, low, high, low_open=False, high_open=False):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} ({value!r}).")
    too_low = value <= low if low_open else value < low
    too_high = value >= high if high_open else value > high
    if too_low or too_high or math.isnan(value):
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"{name}={value} is outside the accepted range {interval}.")


def _check_bool(name, value):
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}.")


def _check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not supported; accepted: {', '.join(map(repr, choices))}.")


@dataclass
class SamplingConfig:
    """Knobs shared by the samplers that draw categorical tokens (the meaning of transformers' `generate`).

    Args:
        do_sample: True draws from the sampling distribution (Gumbel-max in float64); False takes its argmax at
            every unmasking (greedy).
        temperature: > 0, divides the logits before the softmax.
        top_k: keep the k most probable tokens (0 disables it).
        top_p: nucleus mass in (0, 1]; 1 disables it (published OWT setting: 0.9 with `nucleus_rule="mdlm"`).
        nucleus_rule: "transformers" (keep the smallest set of tokens whose mass is >= top_p, as transformers'
            `TopPLogitsWarper`) or "mdlm" (the published MDLM / ReMDM rule: keep the tokens whose cumulative mass is
            <= top_p, the top-1 always kept).
        s_hi: the SNR at which the model shows a decoded token (`endpoint_snr`; None = the model's default,
            `model.config.snr_max`). It matters for models whose `config.endpoint_inputs` is "converter".
        logits_where_needed: ask the model for logits only at the positions that draw a token
            (`forward(logits_to_keep=...)`): those that unmask in this step (MDLM / ReMDM decide them before the
            network call, as the decision never reads the logits), the `[MASK]`s left for the final noise removal,
            or ROAR's one position per row. The output head is skipped elsewhere, and a step in which nothing
            unmasks makes no network call at all. The tokens drawn are the same; the NFE can only be smaller (the
            exact rule: [`MDLMSampler`]). False computes every position's logits at every step (models whose
            `forward` has no `logits_to_keep` always compute them all, but skip the calls all the same).
        torch_compile: run the model's forward through `torch.compile` (inductor). The first call of a shape
            compiles (seconds on a GPU, a minute or more on a CPU); later calls and runs reuse it. Logits are then
            computed at every position: a data-dependent set of positions would break the compiled graph.
    """

    top_p: float = 1.0
    temperature: float = 1.0
    s_hi: float | None = None
    do_sample: bool = True
    top_k: int = 0
    nucleus_rule: str = "transformers"
    logits_where_needed: bool = True
    torch_compile: bool = False

    def __post_init__(self):
        _check_range("top_p", self.top_p, 0.0, 1.0, low_open=True)
        _check_range("temperature", self.temperature, 0.0, math.inf, low_open=True, high_open=True)
        if self.s_hi is not None:
            _check_range("s_hi", self.s_hi, 0.0, math.inf, low_open=True, high_open=True)
        _check_bool("do_sample", self.do_sample)
        _check_bool("logits_where_needed", self.logits_where_needed)
        _check_bool("torch_compile", self.torch_compile)
        _check_int("top_k", self.top_k, 0)
        _check_choice("nucleus_rule", self.nucleus_rule, NUCLEUS_RULES)


class TokenDraw:
    """The categorical draw every sampler shares: the sampling distribution (the user's `logits_processor`, then
    temperature, top-k and top-p) and one token per selected position, drawn by float64 Gumbel-max (`do_sample`) or
    taken as the argmax (greedy). `[MASK]` is never a candidate (the [`Denoiser`] removes its logit).

    A logits processor sees, for each selected position, the whole current sequence of its row as `input_ids`
    (`[N, L]`, `[MASK]` where still masked) and that position's scores (`[N, V]`)."""

    def __init__(self, config: SamplingConfig, logits_processor: LogitsProcessorList | None = None):
        self.config = config
        self.logits_processor = logits_processor

    def log_probs(self, logits: torch.Tensor, where: torch.BoolTensor, tokens: torch.LongTensor) -> torch.Tensor:
        """`[N, V]` float64 log-probabilities of the sampling distribution at the N positions of `where`."""
        context_ids = tokens[where.nonzero()[:, 0]] if self.logits_processor else None
        config = self.config
        return sampling_log_probs(
            logits[where],
            config.temperature,
            config.top_p,
            top_k=config.top_k,
            nucleus_rule=config.nucleus_rule,
            logits_processor=self.logits_processor,
            context_ids=context_ids,
        )

    def draw(self, logits, where, tokens, noise: NoiseSource) -> tuple[torch.LongTensor, torch.Tensor]:
        """(tokens `[N]`, their sampling probabilities `[N]`): sampled, or the argmax when `do_sample=False`."""
        if not bool(where.any()):
            # Nothing to draw, so no logits to read: they may be an empty KeptLogits (no network call was made).
            # Skipping consumes no randomness: an empty draw takes no numbers from a generator either.
            return self._nothing(where.device)
        log_probs = self.log_probs(logits, where, tokens)
        if self.config.do_sample:
            new_tokens = gumbel_argmax(log_probs, noise.sample(where, (log_probs.shape[-1],)))
        else:
            new_tokens = log_probs.argmax(dim=-1)
        return new_tokens, log_probs.gather(-1, new_tokens[:, None]).squeeze(-1).exp()

    def best(self, logits, where, tokens) -> tuple[torch.LongTensor, torch.Tensor]:
        """(argmax tokens `[N]`, their probabilities `[N]`) of the sampling distribution (noise removal, commit)."""
        if not bool(where.any()):
            return self._nothing(where.device)
        best_log_probs, best_tokens = self.log_probs(logits, where, tokens).max(dim=-1)
        return best_tokens, best_log_probs.exp()

    @staticmethod
    def _nothing(device) -> tuple[torch.LongTensor, torch.Tensor]:
        return torch.empty(0, dtype=torch.long, device=device), torch.empty(0, dtype=torch.float64, device=device)


@dataclass
class MDLMConfig(SamplingConfig):
    """MDLM ancestral sampling.

    Args:
        num_steps: T >= 1 steps on `linspace(1, t_min, T + 1)`.
        t_min: last time of the grid, in (0, 1) (MDLM: 1e-5).
        use_cache: reuse the previous network output when the tokens are those of its call and it computed every
            position needed (with `logits_where_needed`, that takes ReMDM remasking everything decoded since).
    """

    num_steps: int = 128
    t_min: float = 1e-5
    use_cache: bool = True

    def __post_init__(self):
        super().__post_init__()
        _check_int("num_steps", self.num_steps, 1)
        _check_range("t_min", self.t_min, 0.0, 1.0, low_open=True, high_open=True)
        _check_bool("use_cache", self.use_cache)


@dataclass
class ReMDMConfig(MDLMConfig):
    """ReMDM remasking sampling: one posterior, four sigma schedules.

    Args:
        strategy: "cap" (sigma = min(eta, sigma_max)), "rescale" (sigma = eta sigma_max), "conf" (sigma_l =
            sigma_max softmax_l(-psi_l) over decoded positions) or "loop" (MDLM up to t_on, remasking at eta with
            alpha held at alpha_on until t_off, then MDLM).
        eta: remasking strength in [0, 1] (None = the published default: 0.02 for "loop", 0.04 otherwise).
        t_on, t_off: the loop window, 0 < t_off < t_on < 1 (published: 0.55, 0.05).
        alpha_on: the fraction of decoded tokens held in the loop, in (0, 1) (published: 0.9).
    """

    strategy: str = "cap"
    eta: float | None = None
    t_on: float = 0.55
    t_off: float = 0.05
    alpha_on: float = 0.9

    def __post_init__(self):
        super().__post_init__()
        _check_choice("strategy", self.strategy, REMDM_STRATEGIES)
        if self.eta is None:
            self.eta = 0.02 if self.strategy == "loop" else 0.04
        _check_range("eta", self.eta, 0.0, 1.0)
        _check_loop_window(self)


def _check_loop_window(config):
    _check_range("t_on", config.t_on, 0.0, 1.0, low_open=True, high_open=True)
    _check_range("t_off", config.t_off, 0.0, 1.0, low_open=True, high_open=True)
    if config.t_off >= config.t_on:
        raise ValueError(f"t_off={config.t_off} must be < t_on={config.t_on} (the loop runs for t_off < t <= t_on).")
    _check_range("alpha_on", config.alpha_on, 0.0, 1.0, low_open=True, high_open=True)
    loop_limit = (1.0 - config.alpha_on) / config.alpha_on
    if getattr(config, "strategy", None) == "loop" or getattr(config, "discrete_strategy", None) == "loop":
        if config.eta > loop_limit:
            # With alpha held at alpha_on, a masked token unmasks with prob eta alpha_on / (1 - alpha_on) <= 1.
            raise ValueError(
                f"eta={config.eta} is too large for the loop with alpha_on={config.alpha_on}: accepted range "
                f"[0, {loop_limit:.6g}] = [0, (1 - alpha_on) / alpha_on]."
            )


@dataclass
class ROARConfig(SamplingConfig):
    """Random-order autoregression: one position per step in a random permutation (NFE = #positions to fill)."""


@dataclass
class SDEConfig:
    """The DSL stochastic-localization SDE z <- z + x_hat(z) ds + sqrt(ds) xi, tokens = argmax p(x | z) at the end.

    Args:
        num_steps: K >= 1 Euler steps (NFE = K + 1: one call per step and the final decode).
        snr_schedule: "log-linear", "log-normal" (quantiles of the training SNR law) or "linear".
        snr_min: first SNR of the log-linear grid (> 0); the SDE starts from z = sqrt(snr_min) xi.
        snr_max: last SNR (None = `model.config.snr_max`).
        lognormal_mean, lognormal_std: the log-normal law of the "log-normal" grid (OWT training: 2.69, 1.41).
        s_hi: SNR at which fixed (prompt) tokens are shown, z = s_hi e_x (None = `model.config.snr_max`).
        torch_compile: run the model's forward through `torch.compile` (inductor). The first call of a shape
            compiles (seconds on a GPU, a minute or more on a CPU); later calls and runs reuse it. Logits are then
            computed at every position: a data-dependent set of positions would break the compiled graph.
    """

    num_steps: int = 128
    snr_schedule: str = "log-linear"
    snr_min: float = 1e-3
    snr_max: float | None = None
    lognormal_mean: float = 2.69
    lognormal_std: float = 1.41
    s_hi: float | None = None
    torch_compile: bool = False

    def __post_init__(self):
        _check_int("num_steps", self.num_steps, 1)
        _check_bool("torch_compile", self.torch_compile)
        _check_choice("snr_schedule", self.snr_schedule, SNR_SCHEDULES)
        _check_range("snr_min", self.snr_min, 0.0, math.inf, low_open=True, high_open=True)
        if self.snr_max is not None:
            _check_range("snr_max", self.snr_max, self.snr_min, math.inf, low_open=True, high_open=True)
        _check_range("lognormal_std", self.lognormal_std, 0.0, math.inf, low_open=True, high_open=True)
        _check_range("lognormal_mean", self.lognormal_mean, -math.inf, math.inf, low_open=True, high_open=True)
        if self.s_hi is not None:
            _check_range("s_hi", self.s_hi, 0.0, math.inf, low_open=True, high_open=True)


@dataclass
class HybridConfig(SamplingConfig):
    """Continuous-then-discrete: the SDE for `continuous_steps` steps up to SNR `snr_star`, a commit, then
    `num_steps - continuous_steps` discrete MDLM / ReMDM steps.

    Args:
        num_steps: T, the total step budget (>= 2).
        continuous_steps: T_c in [1, T - 1] (None = T // 2).
        snr_star: s*, the SNR reached by the continuous phase (> 0).
        snr_schedule, snr_min, lognormal_mean, lognormal_std: the SNR grid of the continuous phase (up to s*).
        commit_rule: "threshold" (commit the positions whose max probability is >= commit_threshold) or
            "top_fraction" (commit the commit_fraction most confident positions of each row).
        commit_threshold: in (0, 1]. commit_fraction: in [0, 1].
        commit_mode: what the commit does with p(x | z) at the end of the continuous phase.
            - "evidence" (default): a committed position draws its token from p(x_i | z) (temperature, nucleus),
              and every uncommitted position keeps its noisy state z_j (SNR s*) as evidence for the discrete phase:
              the network sees s_hi e_x at decoded tokens, z_j at still-masked positions that had evidence and 0 at
              the others (a position remasked by ReMDM returns to 0). Every later draw is then from
              p(x_j | decoded tokens, z), so the commit adds no bias: on an exact denoiser of a product law the
              hybrid is exact up to the continuous phase's Euler error. Caveats: that error now reaches every
              position (a coarse continuous phase is better forgotten: "sample"), and a network trained with one
              SNR per sequence has not seen states mixing s_hi, s* and 0.
            - "sample": the same draw; the uncommitted positions become `[MASK]` without evidence. Biased, because
              the confidence rule picks positions by their z: being left uncommitted is evidence about the token
              (e.g. that it is not the prior's favourite), which the discrete phase ignores when it draws it from
              p(x_j | committed tokens). On a product law at T = 64 this bias is about as large as argmax's.
            - "argmax": a committed position takes its most probable token (the original hybrid). Biased towards
              each position's mode on top of the "sample" bias: a position committed at probability 0.9 on its
              top token is that token every time, so samples are less diverse than the model. Neither bias
              shrinks as the step budget grows.
        discrete_strategy: "mdlm" or a ReMDM strategy ("cap", "rescale", "conf", "loop") for the discrete phase.
        discrete_t_start: the time the discrete phase starts from (None = each row's fraction of masked positions,
            the time at which MDLM's forward process masks that fraction).
        eta, t_on, t_off, alpha_on, t_min, use_cache: as in [`ReMDMConfig`].
    """

    num_steps: int = 48
    continuous_steps: int | None = None
    snr_star: float = 10.0
    snr_schedule: str = "log-linear"
    snr_min: float = 1e-3
    lognormal_mean: float = 2.69
    lognormal_std: float = 1.41
    commit_rule: str = "threshold"
    commit_threshold: float = 0.9
    commit_fraction: float = 0.5
    commit_mode: str = "evidence"
    discrete_strategy: str = "mdlm"
    discrete_t_start: float | None = None
    eta: float | None = None
    t_on: float = 0.55
    t_off: float = 0.05
    alpha_on: float = 0.9
    t_min: float = 1e-5
    use_cache: bool = True

    def __post_init__(self):
        super().__post_init__()
        _check_int("num_steps", self.num_steps, 2)
        if self.continuous_steps is None:
            self.continuous_steps = self.num_steps // 2
        _check_int("continuous_steps", self.continuous_steps, 1)
        if self.continuous_steps >= self.num_steps:
            raise ValueError(
                f"continuous_steps={self.continuous_steps} must be in [1, num_steps - 1] = [1, {self.num_steps - 1}]."
            )
        _check_range("snr_star", self.snr_star, 0.0, math.inf, low_open=True, high_open=True)
        _check_choice("snr_schedule", self.snr_schedule, SNR_SCHEDULES)
        _check_range("snr_min", self.snr_min, 0.0, self.snr_star, low_open=True, high_open=True)
        _check_range("lognormal_std", self.lognormal_std, 0.0, math.inf, low_open=True, high_open=True)
        _check_choice("commit_rule", self.commit_rule, COMMIT_RULES)
        _check_range("commit_threshold", self.commit_threshold, 0.0, 1.0, low_open=True)
        _check_range("commit_fraction", self.commit_fraction, 0.0, 1.0)
        _check_choice("commit_mode", self.commit_mode, COMMIT_MODES)
        _check_choice("discrete_strategy", self.discrete_strategy, HYBRID_DISCRETE_STRATEGIES)
        if self.discrete_t_start is not None:
            _check_range("discrete_t_start", self.discrete_t_start, 0.0, 1.0, low_open=True)
        if self.eta is None:
            self.eta = 0.02 if self.discrete_strategy == "loop" else 0.04
        _check_range("eta", self.eta, 0.0, 1.0)
        _check_loop_window(self)
        _check_range("t_min", self.t_min, 0.0, 1.0, low_open=True, high_open=True)
        _check_bool("use_cache", self.use_cache)

    def discrete_config(self) -> MDLMConfig:
        """The config of the discrete phase (T_d = num_steps - continuous_steps steps)."""
        shared = dict(
            num_steps=self.num_steps - self.continuous_steps,
            t_min=self.t_min,
            use_cache=self.use_cache,
            top_p=self.top_p,
            temperature=self.temperature,
            do_sample=self.do_sample,
            top_k=self.top_k,
            nucleus_rule=self.nucleus_rule,
            s_hi=self.s_hi,
            logits_where_needed=self.logits_where_needed,
            torch_compile=self.torch_compile,
        )
        if self.discrete_strategy == "mdlm":
            return MDLMConfig(**shared)
        return ReMDMConfig(
            **shared,
            strategy=self.discrete_strategy,
            eta=self.eta,
            t_on=self.t_on,
            t_off=self.t_off,
            alpha_on=self.alpha_on,
        )


# ----------------------------------------------------------------------------------------------------------------
# Sampler base
# ----------------------------------------------------------------------------------------------------------------


class DiffusionSampler:
    """Base class: holds a validated config; subclasses implement `init_state`, `step` and `_sample`."""

    name: str = ""
    config_class: type = SamplingConfig

    def __init__(self, config=None, **knobs):
        if config is None:
            config = self.config_class(**knobs)
        else:
            if not isinstance(config, self.config_class):
                raise TypeError(f"{type(self).__name__} needs a {self.config_class.__name__}, got {type(config).__name__}.")
            if knobs:
                config = dataclasses.replace(config, **knobs)
        self.config = config

    def __repr__(self):
        return f"{type(self).__name__}({self.config})"

    @torch.no_grad()
    def run(
        self,
        model,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *,
        batch_size: int | None = None,
        seq_len: int | None = None,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        callback: Callable | None = None,
        return_trajectory: bool = False,
        return_confidences: bool = False,
        progress_bar: bool = True,
        synced_gpus: bool | None = None,
        logits_processor: LogitsProcessorList | None = None,
        streamer=None,
        **run_kwargs,
    ) -> SamplerOutput:
        """Sample sequences.

        Args:
            model: the denoiser (see the module docstring). Put it in eval mode: dropout would make the cache and
                the determinism guarantees meaningless.
            input_ids: `[B, L]` ids with `[MASK]` where to generate (prefix prompt, infilling), or None for
                `batch_size` unconditional rows of `seq_len` tokens.
            attention_mask: `[B, L]`, 0 at (left) padding.
            generator: a torch.Generator for the whole batch, or one per row (batch-invariant results), or None.
            callback: `callback(step_index, state)` after every step; `state.tokens` is the current draft.
            return_trajectory, return_confidences: see [`SamplerOutput`].
            progress_bar: show a progress bar (transformers' tqdm: `disable_progress_bar()` turns it off).
            synced_gpus: every rank makes the same number of forward passes (skip the cache only when all ranks
                agree). None = True iff torch.distributed runs with more than one rank.
            logits_processor: a `LogitsProcessorList` applied to the per-position scores before every categorical
                draw (see [`TokenDraw`]); samplers that make no categorical draw (the SDE) reject it.
            streamer: an object with `put_draft(value=...)`, called once per step with the current draft.
        """
        for name, flag in (("return_trajectory", return_trajectory), ("return_confidences", return_confidences),
                           ("progress_bar", progress_bar)):  # fmt: skip
            _check_bool(name, flag)  # a string such as "no" is truthy
        if synced_gpus is not None:
            _check_bool("synced_gpus", synced_gpus)
        if callback is not None and not callable(callback):
            raise TypeError(f"callback must be callable as callback(step_index, state), got {type(callback).__name__}.")
        if getattr(model, "training", False):
            logger.warning_once("the model is in training mode (dropout on): call model.eval() before sampling.")
        if logits_processor is not None:
            if not isinstance(self.config, SamplingConfig):
                raise ValueError(
                    f"logits_processor does not apply to sampler {self.name!r}: it makes no categorical draw (its "
                    "tokens are the argmax of p(x | z) at the end); samplers that accept it: "
                    f"{sorted(name for name, cls in SAMPLERS.items() if issubclass(cls.config_class, SamplingConfig))}."
                )
            run_kwargs["logits_processor"] = logits_processor
        inputs = prepare_inputs(model, input_ids, attention_mask, batch_size, seq_len)
        noise = NoiseSource(generator, inputs.tokens.shape[0], inputs.tokens.device)
        synced_gpus = default_synced_gpus() if synced_gpus is None else synced_gpus
        recorder = StepRecorder(callback, return_trajectory, streamer)
        # A decoded token is shown the same converter input at every later step: compute it once per run.
        endpoint_cache = getattr(model, "endpoint_cache", None)
        with endpoint_cache() if endpoint_cache is not None else contextlib.nullcontext():
            state, nfe = self._sample(model, inputs, noise, recorder, progress_bar, synced_gpus, **run_kwargs)
        return SamplerOutput(
            sequences=state.tokens,
            nfe=nfe,
            trajectory=recorder.trajectory,
            confidences=state.confidences.float() if return_confidences else None,
        )

    def _sample(self, model, inputs, noise, recorder, progress_bar, synced_gpus, **run_kwargs):
        raise NotImplementedError

    def _s_hi(self, model) -> float:
        s_hi = self.config.s_hi if self.config.s_hi is not None else getattr(model.config, "snr_max", None)
        if s_hi is None:
            raise ValueError("set `s_hi` (the SNR of a clean token): the model config has no `snr_max`.")
        return float(s_hi)

    def _progress(self, total: int, enabled: bool):
        return tqdm(total=total, desc=f"{self.name} sampling", disable=not enabled, leave=False)


def _initial_confidences(inputs: SamplerInputs) -> torch.Tensor:
    """1 at fixed tokens, 0 at positions to generate and at padding (float64)."""
    return (inputs.valid & ~inputs.generatable).double()


# ----------------------------------------------------------------------------------------------------------------
# Discrete masked diffusion: MDLM and ReMDM
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class StepPlan:
    """Which positions a discrete step changes, decided before its network call (see [`MDLMSampler.plan_step`]).

    Attributes:
        unmask: `[B, L]` masked positions that draw a token in this step: the only logits the step reads.
        remask: `[B, L]` decoded positions that return to `[MASK]` (ReMDM).
    """

    unmask: torch.BoolTensor
    remask: torch.BoolTensor


@dataclass
class DiscreteState:
    """State of the discrete samplers.

    Attributes:
        tokens: `[B, L]` current tokens (`[MASK]` where masked).
        generatable: `[B, L]` positions the sampler may write.
        confidences: `[B, L]` float64, psi: the probability each token had when decoded.
        times: `[B or 1, T + 1]` float64 time grid (per-row grids allowed).
        noise: the random source.
        draw: the categorical draw (sampling distribution, greedy or sampled).
        step_index: the next step to take.
        plan: the next step's [`StepPlan`] once `plan_step` has drawn it (None otherwise; `step` consumes it).
    """

    tokens: torch.LongTensor
    generatable: torch.BoolTensor
    confidences: torch.Tensor
    times: torch.Tensor
    noise: NoiseSource
    mask_token_id: int
    draw: TokenDraw
    step_index: int = 0
    plan: StepPlan | None = None


class MDLMSampler(DiffusionSampler):
    """MDLM ancestral sampling: a masked token unmasks from t to s with probability (alpha_s - alpha_t) /
    (1 - alpha_t), drawing from p_theta; decoded tokens are kept. This is the ReMDM posterior with sigma = 0.

    A step is `plan_step(state)` (which positions unmask and remask: random, but independent of the logits) then
    `step(state, logits)` (draw the new tokens), so that the network is asked for logits only where a token is
    drawn (`logits_where_needed`) and not at all when nothing is.

    NFE (real network calls). With `logits_where_needed=False`, every step calls the network, and so does the final
    noise removal when a `[MASK]` is left (T or T + 1 calls), except that with `use_cache` a call whose tokens are
    exactly those of the previous call reuses its output. With `logits_where_needed=True` (the default) a step
    calls the network only if at least one position unmasks in it, and the noise removal only if a `[MASK]` is left:
    NFE = (steps that unmask at least one position) + (1 if a `[MASK]` is left after the last step), less the cache
    hits (tokens equal to the previous call's and the positions needed among its kept ones, which only ReMDM's
    remasking of everything decoded since that call brings about). The samples are the same either way, and the NFE
    is never larger: a step that unmasks changes the tokens, so between two such steps (or such a step and the noise
    removal) the run with full logits made a call of its own too. Under `synced_gpus` a call is made whenever any
    rank needs one."""

    name = "mdlm"
    config_class = MDLMConfig

    # -- the posterior ------------------------------------------------------------------------------------------

    def schedule(self, t: torch.Tensor, s: torch.Tensor, state: DiscreteState):
        """(alpha_t, alpha_s, sigma) for the step t -> s; `t`, `s` are `[B, 1]`, sigma broadcasts to `[B, L]`."""
        return 1.0 - t, 1.0 - s, torch.zeros_like(t)

    def init_state(
        self, inputs: SamplerInputs, noise: NoiseSource, mask_token_id: int, times=None, logits_processor=None
    ) -> DiscreteState:
        if times is None:
            times = time_grid(self.config.num_steps, self.config.t_min, device=inputs.tokens.device)[None]
        return DiscreteState(
            tokens=inputs.tokens.clone(),
            generatable=inputs.generatable,
            confidences=_initial_confidences(inputs),
            times=times,
            noise=noise,
            mask_token_id=mask_token_id,
            draw=TokenDraw(self.config, logits_processor),
        )

    def plan_step(self, state: DiscreteState) -> DiscreteState:
        """Decide step t_k -> t_{k+1}'s changes before its network call: a decoded token is remasked with
        probability sigma, a masked token unmasks with probability (alpha_s - (1 - sigma) alpha_t) / (1 - alpha_t).
        Neither reads the logits (every sigma, "conf" included, depends on the stored confidences only), so the
        uniforms are drawn here, the step's first draw as always, and `step` reads the logits only at the
        unmasking positions. Returns the state with `plan` set."""
        k = state.step_index
        t, s = state.times[:, k : k + 1], state.times[:, k + 1 : k + 2]
        alpha_t, alpha_s, sigma = self.schedule(t, s, state)
        is_masked = state.tokens == state.mask_token_id
        masked = state.generatable & is_masked
        decoded = state.generatable & ~is_masked

        # One uniform per writable position decides both remasking (decoded) and unmasking (masked).
        uniforms = state.noise.uniform_map(state.generatable)
        unmask_prob = ((alpha_s - (1.0 - sigma) * alpha_t) / (1.0 - alpha_t)).clamp(0.0, 1.0)
        plan = StepPlan(unmask=masked & (uniforms < unmask_prob), remask=decoded & (uniforms < sigma))
        return dataclasses.replace(state, plan=plan)

    def step(self, state: DiscreteState, logits: torch.Tensor | KeptLogits) -> DiscreteState:
        """One ReMDM/MDLM step t_k -> t_{k+1}: the planned positions unmask, drawing from p_theta, and the planned
        decoded tokens are remasked. `logits`: `[B, L, V]`, or [`KeptLogits`] covering `state.plan.unmask`. A
        state without a plan is planned here first (the same draws, in the same order)."""
        if state.plan is None:
            state = self.plan_step(state)
        plan = state.plan
        tokens, confidences = state.tokens.clone(), state.confidences.clone()
        new_tokens, new_probs = state.draw.draw(logits, plan.unmask, state.tokens, state.noise)
        tokens[plan.unmask], confidences[plan.unmask] = new_tokens, new_probs
        tokens[plan.remask], confidences[plan.remask] = state.mask_token_id, 0.0
        return dataclasses.replace(
            state, tokens=tokens, confidences=confidences, step_index=state.step_index + 1, plan=None
        )

    def remove_noise(self, state: DiscreteState, logits: torch.Tensor | KeptLogits) -> DiscreteState:
        """Fill every `[MASK]` left with the argmax of p_theta."""
        where = state.generatable & (state.tokens == state.mask_token_id)
        best_tokens, best_probs = state.draw.best(logits, where, state.tokens)
        tokens, confidences = state.tokens.clone(), state.confidences.clone()
        tokens[where], confidences[where] = best_tokens, best_probs
        return dataclasses.replace(state, tokens=tokens, confidences=confidences)

    def logits_needed(self, state: DiscreteState) -> torch.BoolTensor | None:
        """Where the next network call's logits are read (None = everywhere, with `logits_where_needed=False`): the
        planned step's unmasking positions, or, without a plan (the final noise removal), every masked position."""
        if not self.config.logits_where_needed:
            return None
        if state.plan is not None:
            return state.plan.unmask
        return state.generatable & (state.tokens == state.mask_token_id)

    # -- the loop -----------------------------------------------------------------------------------------------

    def denoise(self, state, denoiser: Denoiser, recorder, progress, step_offset: int = 0) -> DiscreteState:
        """Run the T steps from `state` (then the final noise removal, folded into the last step)."""
        num_steps = state.times.shape[-1] - 1
        for k in range(num_steps):
            state = self.plan_step(state)
            state = self.step(state, denoiser.from_tokens(state.tokens, self.logits_needed(state)))
            if k == num_steps - 1:
                any_masked = bool((state.generatable & (state.tokens == state.mask_token_id)).any())
                if denoiser.synced_gpus:
                    any_masked = not all_ranks_agree(not any_masked, state.tokens.device)
                if any_masked:
                    state = self.remove_noise(state, denoiser.from_tokens(state.tokens, self.logits_needed(state)))
            recorder(step_offset + k, state)
            progress.update(1)
        return state

    def _make_denoiser(self, model, inputs, synced_gpus) -> Denoiser:
        return Denoiser(
            model,
            inputs.attention_mask,
            use_cache=self.config.use_cache and not getattr(model.config, "time_conditioning", False),
            synced_gpus=synced_gpus,
            endpoint_snr=self.config.s_hi,
            torch_compile=self.config.torch_compile,
        )

    def _sample(self, model, inputs, noise, recorder, progress_bar, synced_gpus, logits_processor=None):
        denoiser = self._make_denoiser(model, inputs, synced_gpus)
        state = self.init_state(inputs, noise, model.config.mask_token_id, logits_processor=logits_processor)
        with self._progress(self.config.num_steps, progress_bar) as progress:
            state = self.denoise(state, denoiser, recorder, progress)
        return state, denoiser.nfe


class ReMDMSampler(MDLMSampler):
    """ReMDM (Wang et al. 2025): per token, a decoded token is remasked with probability sigma_t and a masked token
    unmasks with probability (alpha_s - (1 - sigma_t) alpha_t) / (1 - alpha_t), with
    sigma_t in [0, sigma_max], sigma_max = min(1, (1 - alpha_s) / alpha_t). The strategy picks sigma:
    cap, rescale, conf, loop (see [`ReMDMConfig`])."""

    name = "remdm"
    config_class = ReMDMConfig

    def schedule(self, t, s, state):
        config = self.config
        if config.strategy == "loop":
            return self._loop_schedule(t, s)
        alpha_t, alpha_s = 1.0 - t, 1.0 - s
        sigma_max = torch.where(alpha_t > 0, ((1.0 - alpha_s) / alpha_t.clamp_min(1e-300)).clamp(max=1.0), 1.0)
        if config.strategy == "cap":
            return alpha_t, alpha_s, sigma_max.clamp(max=config.eta)
        if config.strategy == "rescale":
            return alpha_t, alpha_s, config.eta * sigma_max
        # conf: spread sigma_max over the decoded positions, the least confident ones first.
        decoded = state.generatable & (state.tokens != state.mask_token_id)
        scores = (-state.confidences).masked_fill(~decoded, -torch.inf)
        weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a row with nothing decoded has no remasking
        return alpha_t, alpha_s, sigma_max * weights

    def _loop_schedule(self, t, s):
        """Phase 1 (t > t_on): MDLM with alpha rescaled to reach alpha_on at t_on. Phase 2 (t_off < t <= t_on):
        alpha held at alpha_on, remasking at eta. Phase 3 (t <= t_off): MDLM from alpha_on to 1."""
        config = self.config

        def alpha(u):
            rising = config.alpha_on * (1.0 - u) / (1.0 - config.t_on)
            finishing = 1.0 - (1.0 - config.alpha_on) * u / config.t_off
            return torch.where(u > config.t_on, rising, torch.where(u > config.t_off, config.alpha_on, finishing))

        in_loop = (t <= config.t_on) & (t > config.t_off)
        alpha_t = torch.where(in_loop, config.alpha_on, alpha(t))
        alpha_s = torch.where(in_loop, config.alpha_on, alpha(s))
        sigma = torch.where(in_loop, config.eta, 0.0)
        return alpha_t, alpha_s, sigma

    def _sample(self, model, inputs, noise, recorder, progress_bar, synced_gpus, logits_processor=None):
        config = self.config
        if config.strategy == "loop":
            step_times = time_grid(config.num_steps, config.t_min)[:-1]
            if not bool((step_times <= config.t_off).any()):
                # The phase is chosen by the step's start time, as in the ReMDM code: a grid this coarse never
                # reaches phase 3, so about 1 - alpha_on of the tokens are still masked after the last step and
                # get filled greedily by the noise-removal step.
                logger.warning(
                    f"remdm loop with num_steps={config.num_steps} has no step with t <= t_off={config.t_off}: the "
                    "run ends with alpha held at alpha_on and the remaining [MASK]s are filled greedily. Use "
                    f"num_steps >= {math.ceil(1.0 / config.t_off) + 1} or a larger t_off."
                )
        return super()._sample(model, inputs, noise, recorder, progress_bar, synced_gpus, logits_processor)


# ----------------------------------------------------------------------------------------------------------------
# ROAR
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class ROARState:
    """State of ROAR: the tokens and each row's visiting order (`order[b, k]` is row b's k-th position)."""

    tokens: torch.LongTensor
    generatable: torch.BoolTensor
    confidences: torch.Tensor
    order: torch.LongTensor
    num_positions: torch.LongTensor
    noise: NoiseSource
    mask_token_id: int
    draw: TokenDraw
    step_index: int = 0


class ROARSampler(DiffusionSampler):
    """Random-order autoregression: visit the positions to generate in a random permutation; at each, draw x_j from
    p_theta(. | current state) and fix it (a decoded token, shown to a DSL model as z_j = s_hi e_{x_j}).
    One network call per position."""

    name = "roar"
    config_class = ROARConfig

    def init_state(
        self, inputs: SamplerInputs, noise: NoiseSource, mask_token_id: int, logits_processor=None
    ) -> ROARState:
        keys = noise.uniform_map(inputs.generatable).masked_fill(~inputs.generatable, torch.inf)
        return ROARState(
            tokens=inputs.tokens.clone(),
            generatable=inputs.generatable,
            confidences=_initial_confidences(inputs),
            order=keys.argsort(dim=-1, stable=True),
            num_positions=inputs.generatable.sum(dim=-1),
            noise=noise,
            mask_token_id=mask_token_id,
            draw=TokenDraw(self.config, logits_processor),
        )

    @staticmethod
    def positions(state: ROARState) -> torch.BoolTensor:
        """The `[batch, length]` map of this step's positions: each row's k-th, for the rows that have one."""
        k = state.step_index
        rows = (state.num_positions > k).nonzero().squeeze(-1)
        where = torch.zeros_like(state.generatable)
        where[rows, state.order[rows, k]] = True
        return where

    def step(self, state: ROARState, logits: torch.Tensor | KeptLogits) -> ROARState:
        k = state.step_index
        where = self.positions(state)
        new_tokens, new_probs = state.draw.draw(logits, where, state.tokens, state.noise)
        tokens, confidences = state.tokens.clone(), state.confidences.clone()
        tokens[where], confidences[where] = new_tokens, new_probs
        return dataclasses.replace(state, tokens=tokens, confidences=confidences, step_index=k + 1)

    def _sample(self, model, inputs, noise, recorder, progress_bar, synced_gpus, logits_processor=None):
        denoiser = Denoiser(
            model,
            inputs.attention_mask,
            synced_gpus=synced_gpus,
            endpoint_snr=self.config.s_hi,
            torch_compile=self.config.torch_compile,
        )
        state = self.init_state(inputs, noise, model.config.mask_token_id, logits_processor)
        num_steps = int(state.num_positions.max()) if state.num_positions.numel() else 0
        if synced_gpus:  # every rank runs as many steps as the longest row of any rank
            num_steps = _max_over_ranks(num_steps, state.tokens.device)
        with self._progress(num_steps, progress_bar) as progress:
            for k in range(num_steps):
                keep = self.positions(state) if self.config.logits_where_needed else None
                state = self.step(state, denoiser.from_tokens(state.tokens, keep))
                recorder(k, state)
                progress.update(1)
        return state, denoiser.nfe


# ----------------------------------------------------------------------------------------------------------------
# The DSL stochastic-localization SDE
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class ContinuousState:
    """State of the SDE.

    Attributes:
        z: `[B, L, d]` noisy states (fixed tokens at s_hi e_x, padding at 0).
        grid: `[B or 1, L or 1, K + 1]` float64 SNR grid (per-token grids allowed).
        tokens: `[B, L]` the current draft, argmax p(x | z) at generated positions.
        confidences: `[B, L]` the draft's probabilities.
    """

    z: torch.Tensor
    grid: torch.Tensor
    tokens: torch.LongTensor
    generatable: torch.BoolTensor
    confidences: torch.Tensor
    noise: NoiseSource
    step_index: int = 0


class DSLSDESampler(DiffusionSampler):
    """The stochastic-localization SDE of DSL: starting from z = sqrt(s_0) xi (0 for s_0 = 0), on an SNR grid
    s_0 < ... < s_K, z <- z + x_hat(z) (s_{k+1} - s_k) + sqrt(s_{k+1} - s_k) xi with x_hat = E_p(x|z)[e_x];
    tokens = argmax p(x | z_K). Exact in the limit of a fine grid: z_s has the law of s e_x + W_s."""

    name = "dsl-sde"
    config_class = SDEConfig

    def build_grid(self, model, snr_grid_override=None, device=None, snr_max=None, num_steps=None, schedule=None):
        """`[1, 1, K + 1]` from the config, or a user grid of shape `[K + 1]`, `[L, K + 1]` or `[B, L, K + 1]`."""
        if snr_grid_override is not None:
            grid = torch.as_tensor(snr_grid_override, dtype=torch.float64, device=device)
            if grid.dim() not in (1, 2, 3) or grid.shape[-1] < 2:
                raise ValueError("snr_grid must have shape [K + 1], [L, K + 1] or [B, L, K + 1] with K >= 1.")
            if (grid < 0).any() or (grid.diff(dim=-1) < 0).any() or not torch.isfinite(grid).all():
                raise ValueError("snr_grid must be finite, >= 0 and non-decreasing along its last dimension.")
            while grid.dim() < 3:
                grid = grid[None]
            return grid
        config = self.config
        if snr_max is None:
            snr_max = config.snr_max if config.snr_max is not None else float(model.config.snr_max)
        grid = snr_grid(
            schedule or config.snr_schedule,
            num_steps or config.num_steps,
            snr_max,
            snr_min=config.snr_min,
            lognormal_mean=config.lognormal_mean,
            lognormal_std=config.lognormal_std,
            device=device,
        )
        return grid[None, None]

    def init_state(self, inputs: SamplerInputs, noise: NoiseSource, denoiser: Denoiser, grid) -> ContinuousState:
        batch, length = inputs.tokens.shape
        if grid.shape[0] not in (1, batch) or grid.shape[1] not in (1, length):
            raise ValueError(f"snr_grid of shape {list(grid.shape)} does not fit a batch of shape [{batch}, {length}].")
        grid = grid.expand(batch, length, -1)
        fixed = inputs.valid & ~inputs.generatable
        z = denoiser.tokens_to_states(inputs.tokens.masked_fill(~fixed, denoiser.mask_token_id))
        start = grid[..., 0][inputs.generatable].sqrt().float()
        z[inputs.generatable] = start[:, None] * noise.sample(inputs.generatable, (z.shape[-1],), "normal", z.dtype)
        return ContinuousState(
            z=z,
            grid=grid,
            tokens=inputs.tokens.clone(),
            generatable=inputs.generatable,
            confidences=_initial_confidences(inputs),
            noise=noise,
        )

    def step(self, state: ContinuousState, posterior_mean: torch.Tensor) -> ContinuousState:
        """One Euler-Maruyama step of dz = x_hat(z) ds + dW_s from s_k to s_{k+1}; `posterior_mean` is x_hat,
        `[B, L, d]`."""
        k, where = state.step_index, state.generatable
        ds = (state.grid[..., k + 1] - state.grid[..., k])[where].float()[:, None]
        xi = state.noise.sample(where, (state.z.shape[-1],), "normal", state.z.dtype)
        z = state.z.clone()
        z[where] = z[where] + posterior_mean[where].float() * ds + ds.sqrt() * xi
        return dataclasses.replace(state, z=z, step_index=k + 1)

    @staticmethod
    def read_draft(state: ContinuousState, probs: torch.Tensor) -> ContinuousState:
        """Set the draft to argmax p(x | z) at the generated positions, with its probability (`probs`: the float32
        softmax of the logits, `[B, L, V]`)."""
        best_probs, tokens = probs.max(dim=-1)
        where = state.generatable
        draft, confidences = state.tokens.clone(), state.confidences.clone()
        draft[where], confidences[where] = tokens[where], best_probs[where].double()
        return dataclasses.replace(state, tokens=draft, confidences=confidences)

    def integrate(self, state, denoiser, recorder, progress) -> tuple[ContinuousState, torch.Tensor]:
        """Run the Euler steps over the state's grid; returns the final state (its draft read at z_K) and the
        logits at z_K. One network call per grid point, and one softmax per call: it gives both the next step's
        drift x_hat = softmax(logits) E and the draft, which is read after the last step and, only when a
        trajectory, streamer or callback looks at it, after every step."""
        directions = denoiser.token_directions()
        logits = denoiser.from_states(state.z)
        probs = logits.float().softmax(dim=-1)
        num_steps = state.grid.shape[-1] - 1
        for k in range(num_steps):
            state = self.step(state, probs @ directions)
            logits = denoiser.from_states(state.z)
            probs = logits.float().softmax(dim=-1)
            if recorder.reads_drafts or k == num_steps - 1:
                state = self.read_draft(state, probs)
            recorder(k, state)
            progress.update(1)
        return state, logits

    def _sample(self, model, inputs, noise, recorder, progress_bar, synced_gpus, snr_grid=None):
        s_hi = self.config.s_hi if self.config.s_hi is not None else float(model.config.snr_max)
        denoiser = Denoiser(
            model, inputs.attention_mask, synced_gpus=synced_gpus, s_hi=s_hi, torch_compile=self.config.torch_compile
        )
        grid = self.build_grid(model, snr_grid, device=inputs.tokens.device)
        state = self.init_state(inputs, noise, denoiser, grid)
        with self._progress(grid.shape[-1] - 1, progress_bar) as progress:
            state, _ = self.integrate(state, denoiser, recorder, progress)
        return state, denoiser.nfe


# ----------------------------------------------------------------------------------------------------------------
# Hybrid continuous-then-discrete
# ----------------------------------------------------------------------------------------------------------------


class EvidenceDenoiser(Denoiser):
    """The hybrid's discrete phase with the uncommitted positions' evidence kept (``commit_mode="evidence"``).

    A token state is shown to the network as noisy states (`forward(noisy_states=...)`, the general path): s_hi e_x
    at a token, the kept continuous state z_j at a `[MASK]` position not decoded since the commit, 0 at any other
    `[MASK]`. Evidence is spent once its position is decoded: a position that ReMDM remasks later returns to z = 0,
    like any remasked token. (s_hi e_x and 0 are what `input_ids` shows a model with `endpoint_inputs="converter"`.)
    """

    def __init__(self, model, attention_mask, evidence_states, evidence_positions, **kwargs):
        super().__init__(model, attention_mask, **kwargs)
        self.evidence_states = evidence_states
        self.evidence_positions = evidence_positions.clone()

    def from_tokens(self, tokens: torch.Tensor, keep: torch.BoolTensor | None = None) -> torch.Tensor | KeptLogits:
        # Spend the evidence of the positions decoded since the previous step here, at every step, not only at
        # network calls: a step that unmasks nothing makes no call, and a token decoded then remasked between two
        # calls must come back at 0. The network's input then changed where the tokens may be back to those of
        # the cached call, so the cached logits no longer apply.
        still_masked = self.evidence_positions & (tokens == self.mask_token_id)
        if not torch.equal(still_masked, self.evidence_positions):
            self.evidence_positions = still_masked
            self._forget_cached_logits()
        return super().from_tokens(tokens, keep)

    def _forward(self, input_ids=None, noisy_states=None, logits_to_keep=None):
        if input_ids is not None:
            noisy_states = self.states_with_evidence(input_ids)
        return super()._forward(noisy_states=noisy_states, logits_to_keep=logits_to_keep)

    def states_with_evidence(self, tokens: torch.Tensor) -> torch.Tensor:
        states = self.tokens_to_states(tokens)
        return torch.where(self.evidence_positions[..., None], self.evidence_states.to(states.dtype), states)


class HybridSampler(DiffusionSampler):
    """Continuous then discrete (DSL paper, T = 48): the SDE for T_c steps up to SNR s*; commit the confident
    positions (a token drawn from p(x | z), or its argmax: `commit_mode`) and mask the rest (keeping their z as
    evidence with `commit_mode="evidence"`); finish with T_d = T - T_c discrete MDLM / ReMDM steps started at each
    row's masked fraction. NFE = T_c + 1 (SDE and commit) + the discrete phase's calls: T_d (+ 1 if the final noise
    removal is needed) with `logits_where_needed=False` and no cache hit, else only the discrete steps that unmask
    a position (+ 1), as in [`MDLMSampler`]."""

    name = "hybrid"
    config_class = HybridConfig

    def commit(self, state: ContinuousState, logits: torch.Tensor, mask_token_id: int) -> tuple[torch.Tensor, ...]:
        """(tokens with the non-committed positions masked, psi) from p(x | z_{T_c}); psi is the committed token's
        probability under the sampling distribution, 0 at the masked positions."""
        config = self.config
        where = state.generatable
        log_probs = sampling_log_probs(
            logits[where], config.temperature, config.top_p, top_k=config.top_k, nucleus_rule=config.nucleus_rule
        )
        best_probs = torch.zeros(where.shape, dtype=torch.float64, device=where.device)
        best_probs[where] = log_probs.max(dim=-1).values.exp()
        if config.commit_rule == "threshold":
            committed = where & (best_probs >= config.commit_threshold)
        else:
            ranking = best_probs.masked_fill(~where, -1.0).argsort(dim=-1, descending=True, stable=True)
            rank = ranking.argsort(dim=-1)  # rank of each position by confidence, 0 = most confident
            quota = (where.sum(dim=-1, keepdim=True) * config.commit_fraction).floor().long()
            committed = where & (rank < quota)
        committed_log_probs = log_probs[committed[where]]
        if config.commit_mode == "argmax" or not config.do_sample:  # greedy generation commits the argmax too
            committed_tokens = committed_log_probs.argmax(dim=-1)
        else:
            uniforms = state.noise.sample(committed, (committed_log_probs.shape[-1],))
            committed_tokens = gumbel_argmax(committed_log_probs, uniforms)
        tokens = state.tokens.clone()
        tokens[where] = mask_token_id
        tokens[committed] = committed_tokens
        confidences = state.confidences.clone()
        confidences[where] = 0.0
        confidences[committed] = committed_log_probs.gather(-1, committed_tokens[:, None]).squeeze(-1).exp()
        return tokens, confidences

    def _sample(self, model, inputs, noise, recorder, progress_bar, synced_gpus, logits_processor=None):
        config = self.config
        mask_token_id = model.config.mask_token_id
        s_hi = self._s_hi(model)
        if config.snr_star > s_hi:
            # The SDE would run past the SNR that stands for a clean token, which no training draw reaches.
            raise ValueError(
                f"snr_star={config.snr_star} must be <= s_hi={s_hi} (the SNR of a clean token): the continuous phase "
                "stops at or before it, then commits. Lower snr_star."
            )
        discrete = (ReMDMSampler if config.discrete_strategy != "mdlm" else MDLMSampler)(config.discrete_config())
        sde = DSLSDESampler(
            SDEConfig(
                num_steps=config.continuous_steps,
                snr_schedule=config.snr_schedule,
                snr_min=config.snr_min,
                snr_max=config.snr_star,
                lognormal_mean=config.lognormal_mean,
                lognormal_std=config.lognormal_std,
                s_hi=s_hi,
            )
        )
        use_cache = config.use_cache and not getattr(model.config, "time_conditioning", False)
        denoiser = Denoiser(
            model,
            inputs.attention_mask,
            use_cache=use_cache,
            synced_gpus=synced_gpus,
            s_hi=s_hi,
            endpoint_snr=config.s_hi,
            torch_compile=config.torch_compile,
        )
        with self._progress(config.num_steps, progress_bar) as progress:
            grid = sde.build_grid(model, device=inputs.tokens.device)
            continuous = sde.init_state(inputs, noise, denoiser, grid)
            continuous, logits = sde.integrate(continuous, denoiser, recorder, progress)
            tokens, confidences = self.commit(continuous, logits, mask_token_id)

            generatable = inputs.generatable
            discrete_denoiser = denoiser
            if config.commit_mode == "evidence":
                discrete_denoiser = EvidenceDenoiser(
                    model,
                    inputs.attention_mask,
                    evidence_states=continuous.z,
                    evidence_positions=generatable & (tokens == mask_token_id),
                    s_hi=s_hi,
                    use_cache=use_cache,
                    synced_gpus=synced_gpus,
                    torch_compile=config.torch_compile,
                )
            if config.discrete_t_start is not None:
                t_start = torch.full((tokens.shape[0],), config.discrete_t_start, dtype=torch.float64)
            else:
                masked = (generatable & (tokens == mask_token_id)).sum(dim=-1)
                t_start = masked.double() / generatable.sum(dim=-1).clamp_min(1).double()
            t_start = t_start.to(tokens.device).clamp_min(config.t_min)
            steps = torch.linspace(0.0, 1.0, discrete.config.num_steps + 1, dtype=torch.float64, device=tokens.device)
            times = t_start[:, None] + (config.t_min - t_start[:, None]) * steps[None]
            state = DiscreteState(
                tokens=tokens,
                generatable=generatable,
                confidences=confidences,
                times=times,
                noise=noise,
                mask_token_id=mask_token_id,
                draw=TokenDraw(discrete.config, logits_processor),
            )
            state = discrete.denoise(state, discrete_denoiser, recorder, progress, step_offset=config.continuous_steps)
        nfe = denoiser.nfe + (discrete_denoiser.nfe if discrete_denoiser is not denoiser else 0)
        return state, nfe


# ----------------------------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------------------------

SAMPLERS = {
    "mdlm": MDLMSampler,
    "remdm": ReMDMSampler,
    "dsl-sde": DSLSDESampler,
    "hybrid": HybridSampler,
    "roar": ROARSampler,
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
    """Build a sampler by name (`"mdlm"`, `"remdm"`, `"remdm-loop"`, `"dsl-sde"`, `"hybrid"`, `"roar"`) from knobs.
    A knob that the sampler does not have raises a ValueError naming the accepted ones."""
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
    "SDEConfig",
    "HybridConfig",
    "DiffusionSampler",
    "MDLMSampler",
    "ReMDMSampler",
    "ROARSampler",
    "DSLSDESampler",
    "HybridSampler",
    "DiscreteState",
    "StepPlan",
    "KeptLogits",
    "ContinuousState",
    "ROARState",
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
    "sampling_log_probs",
    "gumbel_argmax",
    "get_sampler",
    "sampler_knobs",
    "resolve_sampler_name",
    "SAMPLERS",
    "SAMPLER_ALIASES",
]
