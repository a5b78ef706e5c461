"""The discrete masked-diffusion samplers: MDLM ancestral sampling, ReMDM remasking (cap / rescale / conf /
loop / rescore), ROAR (random-order autoregression) and confidence-aware parallel decoding, with their configs. They read a token state through the endpoint path
`model(input_ids=...)`; what they share with the other families (the draw, the noise, the network wrapper, the
inputs) is in `sampling_utils.py`. Remote code: imports only torch, transformers and its flat siblings."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from transformers.utils import logging

from .sampling_utils import (
    Denoiser,
    DiffusionSampler,
    KeptLogits,
    NoiseSource,
    SamplerInputs,
    SamplingConfig,
    TokenDraw,
    _check_bool,
    _check_choice,
    _check_int,
    _check_range,
    _initial_confidences,
    _max_over_ranks,
    all_ranks_agree,
    gumbel_argmax,
    time_grid,
)


logger = logging.get_logger(__name__)

REMDM_STRATEGIES = ("cap", "rescale", "conf", "loop", "rescore")
# "threshold": unmask every masked position whose top probability is >= confidence_threshold; "budget": the
# tokens_per_step most confident masked positions of each row.
CONFIDENCE_RULES = ("threshold", "budget")


# ----------------------------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------------------------


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
    """ReMDM remasking sampling: one posterior, five sigma schedules.

    Args:
        strategy: "cap" (sigma = min(eta, sigma_max)), "rescale" (sigma = eta sigma_max), "conf" (sigma_l =
            sigma_max softmax_l(-psi_l) over decoded positions), "loop" (MDLM up to t_on, remasking at eta with
            alpha held at alpha_on until t_off, then MDLM) or "rescore" (as "conf", with psi_l replaced by the
            re-scored p_theta(x_l = current token | current draft) of the step's own network call; only for models
            that show decoded tokens at a finite SNR, `endpoint_inputs="converter"`: see [`ReMDMSampler`]).
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
class ConfidenceConfig(SamplingConfig):
    """Confidence-aware parallel decoding (Fast-dLLM's threshold rule, LLaDA's low-confidence remasking). An
    APPROXIMATE sampler: which positions unmask depends on the logits, so it does not sample the model's law (see
    [`ConfidenceSampler`]).

    Args:
        num_steps: the most network calls a run makes (>= 1). Each step makes one call and unmasks at least one
            position per row; the run stops as soon as every position is decoded, so NFE <= num_steps. The last
            allowed step unmasks every position still masked (a small cap means large parallel last steps).
        confidence_rule: "threshold" (unmask every masked position whose top probability, under the sampling
            distribution, is >= `confidence_threshold`, and at least the most confident one of each row) or
            "budget" (unmask the `tokens_per_step` most confident masked positions of each row).
        confidence_threshold: in (0, 1] (Fast-dLLM: 0.9). 1 unmasks one position per step (the most confident),
            except positions whose top probability is exactly 1.
        tokens_per_step: >= 1, the "budget" rule's positions per step and row.
    """

    num_steps: int = 128
    confidence_rule: str = "threshold"
    confidence_threshold: float = 0.9
    tokens_per_step: int = 1

    def __post_init__(self):
        super().__post_init__()
        _check_int("num_steps", self.num_steps, 1)
        _check_choice("confidence_rule", self.confidence_rule, CONFIDENCE_RULES)
        _check_range("confidence_threshold", self.confidence_threshold, 0.0, 1.0, low_open=True)
        _check_int("tokens_per_step", self.tokens_per_step, 1)


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
        scores: ReMDM "rescore" only: `[B, L]` float64 p_theta(x_j = current token | current draft) at the decoded
            positions, from the current step's network call (0 elsewhere; None before the first step).
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
    scores: torch.Tensor | None = None


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

    def plans_before_call(self) -> bool:
        """Whether a step's plan is drawn before its network call (from the stored state only), so that the call
        needs logits only where the plan unmasks. ReMDM "rescore" plans from the call's own output instead."""
        return True

    def plan_step(self, state: DiscreteState, logits: torch.Tensor | KeptLogits | None = None) -> DiscreteState:
        """Decide step t_k -> t_{k+1}'s changes before its network call: a decoded token is remasked with
        probability sigma, a masked token unmasks with probability (alpha_s - (1 - sigma) alpha_t) / (1 - alpha_t).
        Neither reads the logits (every sigma, "conf" included, depends on the stored confidences only), so the
        uniforms are drawn here, the step's first draw as always, and `step` reads the logits only at the
        unmasking positions. Returns the state with `plan` set. `logits` (the step's network output) is read only
        by a strategy that plans from it (ReMDM "rescore")."""
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
            state = self.plan_step(state, logits)
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
        planned step's unmasking positions, or, without a plan (the final noise removal), every masked position;
        a step planned from its own call (ReMDM "rescore") needs every writable position."""
        if not self.config.logits_where_needed:
            return None
        if state.plan is not None:
            return state.plan.unmask
        if not self.plans_before_call() and state.step_index < state.times.shape[-1] - 1:
            return state.generatable  # a step planned from its own call: every writable position (see ReMDMSampler)
        return state.generatable & (state.tokens == state.mask_token_id)

    # -- the loop -----------------------------------------------------------------------------------------------

    def denoise(self, state, denoiser: Denoiser, recorder, progress, step_offset: int = 0) -> DiscreteState:
        """Run the T steps from `state` (then the final noise removal, folded into the last step)."""
        num_steps = state.times.shape[-1] - 1
        for k in range(num_steps):
            if self.plans_before_call():
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
    cap, rescale, conf, loop, rescore (see [`ReMDMConfig`]).

    "rescore" weighs the remasking by each decoded token's current score p_theta(x_j = current token | current
    draft), read at the decoded positions of the step's own network call (no extra call): sigma_l = sigma_max
    softmax_l(-score_l), like "conf" with the score instead of the probability at decoding time. What the score
    means depends on how the network is shown the decoded token x_j itself, which is part of the draft:
    - a model that sees it as clean evidence (MDLM weights, `endpoint_inputs="table"`: SUBS carries a visible
      token over, so the score is identically 1, and the network's output there was never trained;
      `"converter_at_mask"`: the s -> infinity limit, where a Bayes-optimal denoiser's score is identically 1) has
      no information in it: these models are rejected;
    - a DSL-trained model (`endpoint_inputs="converter"`) sees x_j through the converter at z_j = s_hi e_{x_j}, a
      finite SNR: the score mixes the context's support for x_j with x_j's own evidence, which dominates as s_hi
      grows (the `s_hi` knob sets it). It is not p(x_j | the other tokens), only closer to it at small s_hi.
    NFE: the plan needs the call's output, so every step calls the network (T calls, + 1 for the final noise
    removal when a `[MASK]` is left, less output-cache hits), with logits at every writable position; "conf"
    plans before the call and skips the steps that unmask nothing."""

    name = "remdm"
    config_class = ReMDMConfig

    def plans_before_call(self) -> bool:
        return self.config.strategy != "rescore"

    def plan_step(self, state: DiscreteState, logits: torch.Tensor | KeptLogits | None = None) -> DiscreteState:
        if self.config.strategy == "rescore":
            if logits is None:
                raise ValueError("strategy='rescore' plans a step from that step's network call: pass its logits.")
            state = dataclasses.replace(state, scores=self.rescore(state, logits))
        return super().plan_step(state)

    @staticmethod
    def rescore(state: DiscreteState, logits: torch.Tensor | KeptLogits) -> torch.Tensor:
        """`[B, L]` float64 p_theta(x_j = current token | current draft) at the decoded positions (0 elsewhere),
        under the model's distribution (no temperature or nucleus: a filtered-out token would score 0)."""
        decoded = state.generatable & (state.tokens != state.mask_token_id)
        scores = torch.zeros(decoded.shape, dtype=torch.float64, device=decoded.device)
        if bool(decoded.any()):
            log_probs = torch.log_softmax(logits[decoded].double(), dim=-1)
            scores[decoded] = log_probs.gather(-1, state.tokens[decoded][:, None]).squeeze(-1).exp()
        return scores

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
        # conf / rescore: spread sigma_max over the decoded positions, the least confident (lowest score) first.
        decoded = state.generatable & (state.tokens != state.mask_token_id)
        psi = state.scores if config.strategy == "rescore" else state.confidences
        scores = (-psi).masked_fill(~decoded, -torch.inf)
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
        endpoint_inputs = getattr(model.config, "endpoint_inputs", None)
        if config.strategy == "rescore" and endpoint_inputs != "converter":
            raise ValueError(
                f"strategy='rescore' needs a model that shows a decoded token at a finite SNR "
                f"(config.endpoint_inputs='converter', a DSL-trained model); this model has endpoint_inputs="
                f"{endpoint_inputs!r}. With 'table' (MDLM weights, SUBS parametrization) a visible token is carried "
                "over, so p(x_j = current token | draft) is identically 1; with 'converter_at_mask' it is shown at "
                "infinite SNR, where an exact denoiser's score is 1 too. Use strategy='conf'."
            )
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
# Confidence-aware parallel decoding
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class ConfidenceState:
    """State of the confidence sampler: the tokens, what may be written, psi, and the call budget.

    Attributes:
        num_steps: the most steps (network calls) of the run; the step with `step_index == num_steps - 1` unmasks
            every position still masked.
    """

    tokens: torch.LongTensor
    generatable: torch.BoolTensor
    confidences: torch.Tensor
    noise: NoiseSource
    mask_token_id: int
    draw: TokenDraw
    num_steps: int
    step_index: int = 0


class ConfidenceSampler(DiffusionSampler):
    """Confidence-aware parallel decoding: at each step one network call on the current draft gives p_theta(x_j |
    draft) at every masked position j; the confident positions (`confidence_rule`: top probability >=
    `confidence_threshold`, at least the most confident one per row, or the `tokens_per_step` most confident) draw
    their token from the sampling distribution (or take its argmax with `do_sample=False`) and are fixed; the others
    stay masked. Decoded tokens are never remasked. It reads the endpoint path `forward(input_ids=...)` only, so it
    runs on every model of the contract (MDLM weights and DSL-trained ones alike).

    Approximate: a step that unmasks several positions draws them from their separate marginals given the draft,
    ignoring their dependence (the cost of fewer calls). On an exact denoiser with `do_sample=True` it is exact in
    two cases. (a) One position per call (`confidence_rule="budget"` with `tokens_per_step=1`, enough `num_steps`):
    the most-confident-first order depends only on the tokens already decoded, and any such adaptive order samples
    the joint law by the chain rule (the order changes which errors a learned denoiser makes, not the law an exact
    one samples). (b) A product law (independent positions), whose marginals do not depend on the context, for
    any rule. The threshold rule's error shrinks as the threshold rises: positions decoded together each had a
    top probability >= the threshold, so each departs from its one likely value with probability <= 1 - threshold.

    NFE: one call per step, and the steps stop when every position is decoded: NFE = the steps taken <=
    `num_steps`; with the threshold rule, at least ceil(positions / num_steps) positions unmask per call once the
    cap binds. Under `synced_gpus` every rank steps until every rank is done."""

    name = "confidence"
    config_class = ConfidenceConfig

    def init_state(
        self, inputs: SamplerInputs, noise: NoiseSource, mask_token_id: int, logits_processor=None
    ) -> ConfidenceState:
        return ConfidenceState(
            tokens=inputs.tokens.clone(),
            generatable=inputs.generatable,
            confidences=_initial_confidences(inputs),
            noise=noise,
            mask_token_id=mask_token_id,
            draw=TokenDraw(self.config, logits_processor),
            num_steps=self.config.num_steps,
        )

    @staticmethod
    def masked(state: ConfidenceState) -> torch.BoolTensor:
        return state.generatable & (state.tokens == state.mask_token_id)

    def select(self, masked: torch.BoolTensor, top_probs: torch.Tensor, last_step: bool) -> torch.BoolTensor:
        """The `[B, L]` positions that unmask, given each masked position's top probability (`top_probs`, `[B, L]`
        float64, read only at `masked`)."""
        if last_step:
            return masked.clone()
        scores = top_probs.masked_fill(~masked, -1.0)
        rank = scores.argsort(dim=-1, descending=True, stable=True).argsort(dim=-1)  # 0 = most confident
        if self.config.confidence_rule == "budget":
            return masked & (rank < self.config.tokens_per_step)
        return masked & ((scores >= self.config.confidence_threshold) | (rank == 0))

    def step(self, state: ConfidenceState, logits: torch.Tensor | KeptLogits) -> ConfidenceState:
        """One step: `logits` (`[B, L, V]`, or [`KeptLogits`] covering every masked position) of the current draft;
        the selected positions draw their token. The draw takes uniforms only at the unmasking positions."""
        masked = self.masked(state)
        tokens, confidences = state.tokens.clone(), state.confidences.clone()
        if bool(masked.any()):
            log_probs = state.draw.log_probs(logits, masked, state.tokens)  # [N, V] at the masked positions
            top_probs = torch.zeros(masked.shape, dtype=torch.float64, device=masked.device)
            top_probs[masked] = log_probs.max(dim=-1).values.exp()
            unmask = self.select(masked, top_probs, last_step=state.step_index >= state.num_steps - 1)
            chosen = log_probs[unmask[masked]]
            if self.config.do_sample:
                new_tokens = gumbel_argmax(chosen, state.noise.sample(unmask, (chosen.shape[-1],)))
            else:
                new_tokens = chosen.argmax(dim=-1)
            tokens[unmask] = new_tokens
            confidences[unmask] = chosen.gather(-1, new_tokens[:, None]).squeeze(-1).exp()
        return dataclasses.replace(state, tokens=tokens, confidences=confidences, step_index=state.step_index + 1)

    def _sample(self, model, inputs, noise, recorder, progress_bar, synced_gpus, logits_processor=None):
        denoiser = Denoiser(
            model,
            inputs.attention_mask,
            synced_gpus=synced_gpus,
            endpoint_snr=self.config.s_hi,
            torch_compile=self.config.torch_compile,
        )
        state = self.init_state(inputs, noise, model.config.mask_token_id, logits_processor)
        with self._progress(self.config.num_steps, progress_bar) as progress:
            for k in range(self.config.num_steps):
                done = not bool(self.masked(state).any())
                if synced_gpus:  # a rank that is done keeps calling (with nothing to keep) while another is not
                    done = all_ranks_agree(done, state.tokens.device)
                if done:
                    break
                keep = self.masked(state) if self.config.logits_where_needed else None
                state = self.step(state, denoiser.from_tokens(state.tokens, keep))
                recorder(k, state)
                progress.update(1)
        return state, denoiser.nfe


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
