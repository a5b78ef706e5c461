"""What every sampler of masked-diffusion and DSL denoisers shares: the output, the grids, the nucleus, the
categorical draw, the noise, the network wrapper (NFE, cache), the inputs, the per-step recorder, the knob checks,
the shared sampling config and the sampler base class. The samplers themselves live by family in
`samplers_discrete.py` (MDLM, ReMDM, ROAR, confidence), `samplers_continuous.py` (the DSL SDE) and
`samplers_hybrid.py`; `samplers.py` is their registry.

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

SNR_SCHEDULES = ("log-linear", "log-normal", "linear")
# "transformers": top_p keeps the smallest set of tokens whose mass is >= p (transformers' TopPLogitsWarper);
# "mdlm": the published MDLM / ReMDM rule, the tokens whose cumulative mass is <= p (the top-1 always kept).
NUCLEUS_RULES = ("transformers", "mdlm")


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
                    f"{sorted(cls.name for cls in _sampler_classes() if issubclass(cls.config_class, SamplingConfig))}."
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



def _sampler_classes(root: type = DiffusionSampler) -> list[type]:
    """Every named sampler class defined so far (the subclasses of `root`, at any depth)."""
    classes = []
    for subclass in root.__subclasses__():
        classes += ([subclass] if subclass.name else []) + _sampler_classes(subclass)
    return classes
