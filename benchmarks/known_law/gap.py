"""The denoiser gap: how far a model's cross-entropy lies above the Bayes (oracle) cross-entropy on the SAME inputs.

For law rows x and a corruption of them (noisy states z, or ROAR endpoint ids), the gap at a cell is

    mean over target tokens of  -log p_model(x_i | input) - (-log p_oracle(x_i | input))     (nats/token, >= 0 in
                                                                                               expectation)

with the oracle of `oracle.py` built beside the model (`oracle_beside`: its config and its OWN token directions E),
so both read the same z through the same channel: the gap is what the network loses against the exact posterior,
not a difference between channels. Cells:

- `per_snr`: one SNR per sequence (as the log-normal path draws it, every token of a row at the same s), at each s
  of a grid; every token is a target;
- `per_token` (only asked for arms trained on per-token SNRs): log-normal SNRs drawn per token with the arm's
  (mu, sigma), through the trainer's `LogNormalPath`;
- `endpoint`: ROAR endpoint rows through `forward(input_ids=...)` (k ~ U{0..L-1} visible tokens, the rest
  `[MASK]`), the masked positions the targets: what the discrete samplers ask of the model.

The standard error is over rows (tokens of a row share their noise and their row), by the ratio-estimator formula
for a mean over tokens whose count differs per row. Every draw comes from its own seeded generator, so a cell sees the
same rows and the same noise at every evaluation (a training curve of the gap is not noise-on-noise) and the global
RNG (the training stream) is untouched.

`DenoiserGapCallback` logs the gap during training every N steps into the trainer's log history and
`denoiser_gap.json` in the output directory.
"""

from __future__ import annotations

import json
import math
import os

import torch
from transformers import TrainerCallback

from dsl_diffusion.evaluation.utils import atomic_write_json
from dsl_diffusion.trainer.corruption import LogNormalPath, ROARPath
from dsl_diffusion.trainer.losses import unwrap_denoiser

from .law import HiddenMarkovLaw
from .oracle import oracle_beside


SNR_GRID = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)
GAP_LOG_NAME = "denoiser_gap.json"


def _token_cross_entropy(logits: torch.Tensor, targets: torch.LongTensor) -> torch.Tensor:
    """`[B, L]` float64 -log softmax(logits)[target]."""
    log_probs = logits.double().log_softmax(dim=-1)
    return -log_probs.gather(-1, targets[..., None]).squeeze(-1)


def _summary(model_ce: torch.Tensor, oracle_ce: torch.Tensor, targets: torch.BoolTensor) -> dict:
    """Means over the target tokens and the gap's standard error over rows (ratio estimator)."""
    counts = targets.sum(dim=1).double()
    total = float(counts.sum())
    gap_sums = ((model_ce - oracle_ce) * targets).sum(dim=1)
    gap = float(gap_sums.sum()) / total
    rows = len(counts)
    residual = gap_sums - gap * counts
    error = math.sqrt(float((residual**2).sum()) * rows / max(rows - 1, 1)) / total
    return {
        "model_ce": float((model_ce * targets).sum()) / total,
        "oracle_ce": float((oracle_ce * targets).sum()) / total,
        "gap": gap,
        "gap_standard_error": error,
        "num_tokens": int(total),
    }


class DenoiserGap:
    """The gap cells of one model on fixed evaluation rows and fixed noise seeds (see the module doc).

    Args:
        law: the data's law.
        rows: `[N, L]` law rows, the targets.
        snrs: the per-sequence SNR grid.
        seed: the noise seeds derive from it (cell by cell), so every call draws the same z and ROAR masks.
        batch_size: rows per forward call.
    """

    def __init__(self, law: HiddenMarkovLaw, rows: torch.LongTensor, snrs=SNR_GRID, seed: int = 0, batch_size: int = 512):
        if rows.dim() != 2 or len(rows) < 2:
            raise ValueError(f"rows must be [N, L] law rows with N >= 2 (a standard error needs two), got {list(rows.shape)}.")
        if any(not (math.isfinite(s) and s > 0) for s in snrs):
            raise ValueError(f"snrs={list(snrs)} must be finite SNRs > 0 (0 is [MASK]: the endpoint cell covers it).")
        self.law, self.rows, self.snrs, self.seed, self.batch_size = law, rows, tuple(float(s) for s in snrs), seed, batch_size
        self._endpoint_oracle_ce = None  # the oracle's endpoint CE does not depend on E: computed once

    def _generator(self, cell: int) -> torch.Generator:
        return torch.Generator().manual_seed(1_000_003 * (self.seed + 1) + cell)

    @torch.no_grad()
    def _noisy_cell(self, model, oracle, draw_snr, cell: int) -> dict:
        denoiser = unwrap_denoiser(model)
        device = denoiser.token_directions().device
        generator = self._generator(cell)
        model_ce, oracle_ce = [], []
        for batch in self.rows.split(self.batch_size):
            snr = draw_snr(batch.shape, generator)
            states = denoiser.noisy_states(batch.to(device), snr.to(device), generator=generator)
            targets = batch.to(device)
            model_ce.append(_token_cross_entropy(model(noisy_states=states).logits, targets).cpu())
            exact = oracle.log_posterior(oracle.state_log_evidence(states))
            oracle_ce.append(-exact.gather(-1, targets[..., None]).squeeze(-1).cpu())
        model_ce, oracle_ce = torch.cat(model_ce), torch.cat(oracle_ce)
        return _summary(model_ce, oracle_ce, torch.ones_like(model_ce, dtype=torch.bool))

    @torch.no_grad()
    def _endpoint_cell(self, model, oracle) -> dict:
        device = unwrap_denoiser(model).token_directions().device
        mask_id = oracle.config.mask_token_id
        generator = self._generator(len(self.snrs) + 1)
        model_ce, oracle_ce, masked = [], [], []
        for batch in self.rows.split(self.batch_size):
            visible = ROARPath.visible_mask(batch.shape[0], batch.shape[1], generator=generator)
            ids = batch.masked_fill(~visible, mask_id).to(device)
            model_ce.append(_token_cross_entropy(model(input_ids=ids).logits, batch.to(device)).cpu())
            if self._endpoint_oracle_ce is None:
                exact = oracle.log_posterior(oracle.token_log_evidence(ids))
                oracle_ce.append(-exact.gather(-1, batch.to(device)[..., None]).squeeze(-1).cpu())
            masked.append(~visible)
        if self._endpoint_oracle_ce is None:
            self._endpoint_oracle_ce = torch.cat(oracle_ce)
        return _summary(torch.cat(model_ce), self._endpoint_oracle_ce, torch.cat(masked))

    def __call__(self, model, per_token_lognormal: tuple[float, float] | None = None, noisy: bool = True) -> dict:
        """The gap table of `model` (eval mode is the caller's): `per_snr` and, if asked, `per_token` (noisy states,
        only with `noisy`), and `endpoint`. `per_token_lognormal` = (mu, sigma) of the arm's per-token SNRs."""
        oracle = oracle_beside(self.law, unwrap_denoiser(model))
        table = {"num_rows": len(self.rows), "per_snr": [], "per_token": None}
        if noisy:
            for cell, snr in enumerate(self.snrs):
                constant = lambda shape, generator, snr=snr: torch.full(shape, snr)  # noqa: E731
                table["per_snr"].append({"snr": snr, **self._noisy_cell(model, oracle, constant, cell)})
            if per_token_lognormal is not None:
                mu, sigma = per_token_lognormal
                path = LogNormalPath(mu=mu, sigma=sigma, per_token=True)
                draw = lambda shape, generator: path.sample(shape[0], shape[1], generator=generator)  # noqa: E731
                table["per_token"] = {"mu": mu, "sigma": sigma, **self._noisy_cell(model, oracle, draw, len(self.snrs))}
        table["endpoint"] = self._endpoint_cell(model, oracle)
        return table


def flat_gap_entry(table: dict) -> dict:
    """The gap cells as flat float entries (a Trainer log-history row)."""
    entry = {f"gap/snr={row['snr']:g}": row["gap"] for row in table["per_snr"]}
    if table["per_token"] is not None:
        entry["gap/per_token"] = table["per_token"]["gap"]
    entry["gap/endpoint"] = table["endpoint"]["gap"]
    return entry


class DenoiserGapCallback(TrainerCallback):
    """Measure the denoiser gap every `every` optimizer steps (and before the first) during training.

    The weights measured are the ones being trained (the raw weights, not their EMA); the model is put in eval mode
    and back, under no_grad, with its own seeded generators, so training is not disturbed. Each measurement is a
    row of the trainer's log history (`flat_gap_entry`, with `step`) and, in full, an entry of
    `<output_dir>/denoiser_gap.json`, which is rewritten from the log history at every measurement (a resumed run
    continues the list its checkpoint recorded).

    Args:
        law: the data's law.
        rows: `[N, L]` fixed law rows of the evaluation.
        every: steps between measurements (>= 1).
        per_token_lognormal: (mu, sigma) of the arm's per-token SNRs, to add the per-token cell; None for none.
        noisy: measure the noisy-state cells (False for an arm trained only on the discrete endpoints).
        seed, snrs, batch_size: as [`DenoiserGap`].
    """

    def __init__(self, law, rows, every: int, per_token_lognormal=None, noisy: bool = True, seed: int = 0,
                 snrs=SNR_GRID, batch_size: int = 512):
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"every={every!r} must be an integer >= 1 (steps between gap measurements).")
        self.gap = DenoiserGap(law, rows, snrs=snrs, seed=seed, batch_size=batch_size)
        self.every, self.per_token_lognormal, self.noisy = every, per_token_lognormal, noisy
        self.tables: dict[int, dict] = {}

    def _measure(self, args, state, model) -> None:
        was_training = model.training
        model.eval()
        try:
            table = self.gap(model, self.per_token_lognormal, noisy=self.noisy)
        finally:
            model.train(was_training)
        self.tables[state.global_step] = table
        state.log_history.append({"step": state.global_step, **flat_gap_entry(table)})
        if state.is_world_process_zero:
            self._write(args.output_dir, state)

    def _write(self, output_dir: str, state) -> None:
        path = os.path.join(output_dir, GAP_LOG_NAME)
        previous = {}
        if os.path.isfile(path):
            with open(path) as f:
                previous = {entry["step"]: entry for entry in json.load(f)["measurements"]}
        steps = sorted({entry["step"] for entry in state.log_history if "gap/endpoint" in entry})
        measurements = [{"step": step, **self.tables[step]} if step in self.tables else previous[step]
                        for step in steps if step in self.tables or step in previous]
        atomic_write_json(path, {"every": self.every, "num_rows": len(self.gap.rows), "measurements": measurements})

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step == 0:  # the starting point; a resumed run has it in its log history already
            self._measure(args, state, model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every == 0:
            self._measure(args, state, model)
