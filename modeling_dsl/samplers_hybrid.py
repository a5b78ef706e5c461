"""The hybrid continuous-then-discrete sampler: the DSL SDE up to an SNR s*, a commit, then MDLM / ReMDM steps,
with its config. It composes the samplers of `samplers_continuous.py` and `samplers_discrete.py`. Remote code:
imports only torch, transformers and its flat siblings."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from .samplers_continuous import ContinuousState, DraftRevision, DSLSDESampler, SDEConfig, check_revision_knobs
from .samplers_discrete import (
    REMDM_STRATEGIES,
    DiscreteState,
    MDLMConfig,
    MDLMSampler,
    ReMDMConfig,
    ReMDMSampler,
    _check_loop_window,
)
from .sampling_utils import (
    SNR_SCHEDULES,
    Denoiser,
    DiffusionSampler,
    KeptLogits,
    SamplingConfig,
    TokenDraw,
    _check_bool,
    _check_choice,
    _check_int,
    _check_range,
    gumbel_argmax,
    sampling_log_probs,
)


COMMIT_RULES = ("threshold", "top_fraction")
COMMIT_MODES = ("evidence", "sample", "argmax")
# "rescore" is left out: the discrete phase shows its tokens as noisy states (commit_mode="evidence"), and its
# score was not studied there.
HYBRID_DISCRETE_STRATEGIES = ("mdlm",) + tuple(strategy for strategy in REMDM_STRATEGIES if strategy != "rescore")


# ----------------------------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class HybridConfig(SamplingConfig):
    """Continuous-then-discrete: the SDE for `continuous_steps` steps up to SNR `snr_star`, a commit, then
    `num_steps - continuous_steps` discrete MDLM / ReMDM steps.

    The defaults (T_c = T - 1, s* = s_hi, the log-normal grid, threshold 0.9, "evidence") come from the sweep on
    the known law's exact oracle (`benchmarks/known_law/hybrid_sweep.py`, 2,000 samples x 2 seeds): NLL excess
    0.425 / 0.219 / 0.123 / 0.067 / 0.038 nats/token at T = 4 / 8 / 16 / 32 / 64, against 0.452 / 0.262 / 0.123 /
    0.063 / 0.024 for the SDE on its log-linear grid (within two sigmas of it at every T; worse at T = 64, where
    the seed spread is 0.015) and 0.796 / 0.472 / 0.236 / 0.116 / 0.061 for the former defaults (T_c = T // 2,
    s* = 10, log-linear), which also made up to 35% impossible samples. No setting with an earlier switch (smaller
    T_c or s*) came near the SDE: its discrete steps decode positions from their separate marginals. So the
    default hybrid is nearly the SDE on a log-normal grid with a final draw; it does not beat the SDE at equal NFE.
    The hybrid is for what the SDE cannot do: a discrete phase that runs on MDLM-style inputs (`input_ids`, so
    ReMDM remasking and its strategies) after a short continuous phase, e.g. `continuous_steps` small with a
    lower `snr_star`.

    Args:
        num_steps: T, the total step budget (>= 2).
        continuous_steps: T_c in [1, T - 1] (None = T - 1).
        snr_star: s*, the SNR reached by the continuous phase (> 0 and <= s_hi; None = s_hi).
        snr_schedule, snr_min, lognormal_mean, lognormal_std: the SNR grid of the continuous phase (up to s*;
            default "log-normal").
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
        revision_rounds, revision_snr, revision_fraction, revision_selection, revision_steps: the draft revision
            run after the discrete phase (off with `revision_rounds=0`); see [`DraftRevision`].
    """

    num_steps: int = 48
    continuous_steps: int | None = None
    snr_star: float | None = None
    snr_schedule: str = "log-normal"
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
    revision_rounds: int = 0
    revision_snr: float = 2.0
    revision_fraction: float = 0.5
    revision_selection: str = "random"
    revision_steps: int = 8

    def __post_init__(self):
        super().__post_init__()
        _check_int("num_steps", self.num_steps, 2)
        check_revision_knobs(self)
        if self.continuous_steps is None:
            self.continuous_steps = self.num_steps - 1
        _check_int("continuous_steps", self.continuous_steps, 1)
        if self.continuous_steps >= self.num_steps:
            raise ValueError(
                f"continuous_steps={self.continuous_steps} must be in [1, num_steps - 1] = [1, {self.num_steps - 1}]."
            )
        if self.snr_star is not None:
            _check_range("snr_star", self.snr_star, 0.0, math.inf, low_open=True, high_open=True)
        _check_choice("snr_schedule", self.snr_schedule, SNR_SCHEDULES)
        # With snr_star=None the log-linear grid's own check (snr_min < s*) runs once s_hi is known.
        snr_min_limit = math.inf if self.snr_star is None else self.snr_star
        _check_range("snr_min", self.snr_min, 0.0, snr_min_limit, low_open=True, high_open=True)
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
    a position (+ 1), as in [`MDLMSampler`]; the draft revision adds `revision_rounds * (revision_steps + 1)`."""

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
        snr_star = s_hi if config.snr_star is None else config.snr_star
        if snr_star > s_hi:
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
                snr_max=snr_star,
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
        revision = DraftRevision.from_config(config, s_hi)
        with self._progress(config.num_steps + revision.total_steps, progress_bar) as progress:
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
            # The revision shows decoded tokens at s_hi e_x and re-noised ones at their new state: the commit's
            # evidence is spent (every position is decoded by now).
            tokens, confidences = revision.revise(
                state.tokens, generatable, state.confidences, denoiser, noise, recorder, progress, config.num_steps
            )
            state = dataclasses.replace(state, tokens=tokens, confidences=confidences)
        nfe = denoiser.nfe + (discrete_denoiser.nfe if discrete_denoiser is not denoiser else 0)
        return state, nfe
