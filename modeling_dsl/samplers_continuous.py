"""The continuous DSL sampler: the stochastic-localization SDE on an SNR grid, read through the noisy-state path
`model(noisy_states=...)`, with its config. What it shares with the other families is in `sampling_utils.py`.
Remote code: imports only torch, transformers and its flat siblings."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from .sampling_utils import (
    SNR_SCHEDULES,
    Denoiser,
    DiffusionSampler,
    NoiseSource,
    SamplerInputs,
    _check_bool,
    _check_choice,
    _check_int,
    _check_range,
    _initial_confidences,
    snr_grid,
)


@dataclass
class SDEConfig:
    """The DSL stochastic-localization SDE z <- z + x_hat(z) ds + sqrt(ds) xi, tokens = argmax p(x | z) at the end.

    Args:
        num_steps: K >= 1 Euler steps (NFE = K + 1: one call per step and the final decode; the draft revision
            adds `revision_rounds * (revision_steps + 1)`).
        snr_schedule: "log-linear", "log-normal" (quantiles of the training SNR law) or "linear".
        snr_min: first SNR of the log-linear grid (> 0); the SDE starts from z = sqrt(snr_min) xi.
        snr_max: last SNR (None = `model.config.snr_max`).
        lognormal_mean, lognormal_std: the log-normal law of the "log-normal" grid (OWT training: 2.69, 1.41).
        s_hi: SNR at which fixed (prompt) tokens are shown, z = s_hi e_x (None = `model.config.snr_max`).
        torch_compile: run the model's forward through `torch.compile` (inductor). The first call of a shape
            compiles (seconds on a GPU, a minute or more on a CPU); later calls and runs reuse it. Logits are then
            computed at every position: a data-dependent set of positions would break the compiled graph.
        revision_rounds, revision_snr, revision_fraction, revision_selection, revision_steps: the draft revision
            run after the last step (off with `revision_rounds=0`); see [`DraftRevision`].
    """

    num_steps: int = 128
    snr_schedule: str = "log-linear"
    snr_min: float = 1e-3
    snr_max: float | None = None
    lognormal_mean: float = 2.69
    lognormal_std: float = 1.41
    s_hi: float | None = None
    torch_compile: bool = False
    revision_rounds: int = 0
    revision_snr: float = 2.0
    revision_fraction: float = 0.5
    revision_selection: str = "random"
    revision_steps: int = 8

    def __post_init__(self):
        _check_int("num_steps", self.num_steps, 1)
        check_revision_knobs(self)
        _check_bool("torch_compile", self.torch_compile)
        _check_choice("snr_schedule", self.snr_schedule, SNR_SCHEDULES)
        _check_range("snr_min", self.snr_min, 0.0, math.inf, low_open=True, high_open=True)
        if self.snr_max is not None:
            _check_range("snr_max", self.snr_max, self.snr_min, math.inf, low_open=True, high_open=True)
        _check_range("lognormal_std", self.lognormal_std, 0.0, math.inf, low_open=True, high_open=True)
        _check_range("lognormal_mean", self.lognormal_mean, -math.inf, math.inf, low_open=True, high_open=True)
        if self.s_hi is not None:
            _check_range("s_hi", self.s_hi, 0.0, math.inf, low_open=True, high_open=True)



REVISION_SELECTIONS = ("random", "lowest_confidence")


def check_revision_knobs(config) -> None:
    """Validate the draft-revision knobs a config carries (the SDE's and the hybrid's)."""
    _check_int("revision_rounds", config.revision_rounds, 0)
    _check_range("revision_snr", config.revision_snr, 0.0, math.inf, low_open=True, high_open=True)
    _check_range("revision_fraction", config.revision_fraction, 0.0, 1.0, low_open=True)
    _check_choice("revision_selection", config.revision_selection, REVISION_SELECTIONS)
    _check_int("revision_steps", config.revision_steps, 1)


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

    def integrate(self, state, denoiser, recorder, progress, step_offset: int = 0) -> tuple[ContinuousState, torch.Tensor]:
        """Run the Euler steps over the state's grid; returns the final state (its draft read at z_K) and the
        logits at z_K. One network call per grid point, and one softmax per call: it gives both the next step's
        drift x_hat = softmax(logits) E and the draft, which is read after the last step and, only when a
        trajectory, streamer or callback looks at it, after every step (reported as step `step_offset + k`)."""
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
            recorder(step_offset + k, state)
            progress.update(1)
        return state, logits

    def _sample(self, model, inputs, noise, recorder, progress_bar, synced_gpus, snr_grid=None):
        s_hi = self.config.s_hi if self.config.s_hi is not None else float(model.config.snr_max)
        denoiser = Denoiser(
            model, inputs.attention_mask, synced_gpus=synced_gpus, s_hi=s_hi, torch_compile=self.config.torch_compile
        )
        grid = self.build_grid(model, snr_grid, device=inputs.tokens.device)
        state = self.init_state(inputs, noise, denoiser, grid)
        revision = DraftRevision.from_config(self.config, s_hi)
        num_steps = grid.shape[-1] - 1
        with self._progress(num_steps + revision.total_steps, progress_bar) as progress:
            state, _ = self.integrate(state, denoiser, recorder, progress)
            tokens, confidences = revision.revise(
                state.tokens, state.generatable, state.confidences, denoiser, noise, recorder, progress, num_steps
            )
        return dataclasses.replace(state, tokens=tokens, confidences=confidences), denoiser.nfe


# ----------------------------------------------------------------------------------------------------------------
# Draft revision: a corrector that re-noises decoded tokens and integrates them back
# ----------------------------------------------------------------------------------------------------------------


class DraftRevision:
    r"""Revise a finished draft: re-noise some decoded tokens to a finite SNR and integrate them back with the SDE,
    conditioned on every other token. It throws away less than remasking to `[MASK]` (the re-noised state keeps
    evidence about the old token) and, with an exact denoiser, it leaves the target law invariant.

    One round: choose a set S of generated positions (`fraction` of each row, at least one; "random": uniformly,
    "lowest_confidence": the least confident tokens); draw z_S = s_d e_{x_S} + sqrt(s_d) eps (the exact
    localization channel at SNR s_d = `snr`); show every other token as s_hi e_x (and the prompt as it is); run
    `num_steps` Euler steps of the SDE on S only, on the log-linear grid from s_d to s_hi, every call seeing the
    whole sequence; the new tokens are argmax p(x_S | z_S) at s_hi. NFE = `num_steps` + 1 per round.

    Invariance (exact denoiser, `selection="random"`). Let p be the target law of the generated tokens given the
    prompt, and x ~ p.
    1. S is drawn from fresh randomness, independently of x. Then, given S, (x_{-S}, x_S) ~ p and z_S drawn from
       the forward channel given x_S make (x, z_S) ~ p(x) N(z_S; s_d e_{x_S}, s_d I), whose (x_{-S}, z_S)-marginal
       is p(x_{-S}) p(z_S | x_{-S}).
    2. Stochastic localization: for x_S ~ p(. | x_{-S}) and a Brownian motion W, the process y_s = s e_{x_S} + W_s
       is, in its own filtration, the diffusion dy = E[e_{x_S} | y_s, x_{-S}] ds + dB_s (the innovation B is a
       Brownian motion); started at y_{s_d} = z_S it has the law of (y_s)_{s >= s_d} given y_{s_d} = z_S, so y_s / s
       -> e_{x_S'} with x_S' ~ p(x_S | z_S, x_{-S}). Its drift is the posterior mean of each position of S given
       (z_S, x_{-S}): exactly what the network is asked for, since every ||e_v|| = 1 makes p(x | z) free of the
       SNRs (a token at s_hi is, to the drift, the token itself once s_hi is large; see 4).
    3. So (x_{-S}, x_S') has law sum over z_S of p(x_{-S}) p(z_S | x_{-S}) p(x_S' | z_S, x_{-S}) = p(x_{-S})
       p(x_S' | x_{-S}) = p. The round is a Gibbs step of the data augmentation (x, z_S): it is reversible with
       respect to p for every S, and so is a mixture over S drawn independently of x.
    4. The assumptions, precisely: (a) the denoiser returns the exact p(x_i | z) at every position of S, for the
       mixed state (z_S at S, s_hi e_x at the other generated tokens, the prompt); (b) S independent of x given
       the prompt (and of the sampler's other randomness only through fresh draws); (c) the SDE is integrated
       exactly from s_d to infinity. What the implementation does differently is the error of the move: the Euler
       discretization on `num_steps` steps (the only error that does not vanish with s_hi), the stop at s_hi with
       an argmax (its error, the posterior mass off the argmax at SNR s_hi, falls like exp(-s_hi (1 - cos))
       between two directions at cosine cos), float32 states, and a token shown at s_hi rather than observed
       exactly. Tested by an exact-law chi-square test on a law whose joint is enumerated, with negative controls
       (a channel of the wrong SNR, a denoiser that does not condition on x_{-S}) that it rejects.

    With `selection="lowest_confidence"` S depends on x (through the probability each token had when it was
    drawn), so step 1 fails and the move is approximate: it can favour or disfavour tokens by how confident their
    draw was. It spends the revision where a sampler's errors tend to be; measure it on a known law before relying
    on it.

    A draft that is not a sample of p (a sampler's output) is moved towards p by the same step: p is its fixed
    point, and each round re-draws a share of the positions from their exact conditional.
    """

    def __init__(self, rounds: int, snr: float, fraction: float, selection: str, num_steps: int, s_hi: float):
        if rounds and not snr < s_hi:
            raise ValueError(
                f"revision_snr={snr} must be < s_hi={s_hi} (the SNR of a clean token): the revision integrates from "
                "revision_snr up to s_hi. Lower revision_snr."
            )
        self.rounds, self.snr, self.fraction, self.selection = rounds, snr, fraction, selection
        self.num_steps, self.s_hi = num_steps, s_hi
        self.sde = DSLSDESampler(SDEConfig(num_steps=num_steps, snr_min=snr, snr_max=s_hi, s_hi=s_hi))

    @classmethod
    def from_config(cls, config, s_hi: float) -> "DraftRevision":
        """The revision a config's `revision_*` knobs describe."""
        return cls(
            config.revision_rounds,
            config.revision_snr,
            config.revision_fraction,
            config.revision_selection,
            config.revision_steps,
            s_hi,
        )

    @property
    def total_steps(self) -> int:
        return self.rounds * self.num_steps

    def select(self, generatable: torch.BoolTensor, confidences: torch.Tensor, noise: NoiseSource) -> torch.BoolTensor:
        """The positions S of one round: ceil(fraction * n) of each row's n generated positions. One uniform per
        generated position orders them ("random") or breaks ties between equal confidences."""
        order = noise.uniform_map(generatable).masked_fill(~generatable, math.inf).argsort(dim=-1)
        if self.selection == "lowest_confidence":
            # A stable sort by confidence of the random order: the least confident first, equals in random order.
            by_confidence = confidences.double().masked_fill(~generatable, math.inf).gather(-1, order)
            order = order.gather(-1, by_confidence.argsort(dim=-1, stable=True))
        rank = order.argsort(dim=-1)
        quota = (generatable.sum(dim=-1, keepdim=True) * self.fraction).ceil().long()
        return generatable & (rank < quota)

    def renoise(self, tokens: torch.LongTensor, where: torch.BoolTensor, denoiser: Denoiser, noise: NoiseSource):
        """States of the round: z = s_d e_x + sqrt(s_d) eps at `where` (the forward channel), s_hi e_x at every other
        token, 0 at `[MASK]` and padding."""
        z = denoiser.tokens_to_states(tokens)
        directions = denoiser.token_directions()
        eps = noise.sample(where, (z.shape[-1],), "normal", z.dtype)
        z[where] = self.snr * directions[tokens[where]] + math.sqrt(self.snr) * eps
        return z

    def revise(self, tokens, generatable, confidences, denoiser, noise, recorder, progress, step_offset: int):
        """Run the rounds on a draft with no `[MASK]` left at `generatable`; returns (tokens, confidences). The
        revised positions' confidences become their draft probability at s_hi."""
        grid = self.sde.build_grid(None, device=tokens.device).expand(*tokens.shape, -1)
        for round_index in range(self.rounds):
            where = self.select(generatable, confidences, noise)
            state = ContinuousState(
                z=self.renoise(tokens, where, denoiser, noise),
                grid=grid,
                tokens=tokens,
                generatable=where,
                confidences=confidences,
                noise=noise,
            )
            offset = step_offset + round_index * self.num_steps
            state, _ = self.sde.integrate(state, denoiser, recorder, progress, step_offset=offset)
            tokens, confidences = state.tokens, state.confidences
        return tokens, confidences
