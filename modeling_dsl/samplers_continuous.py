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
