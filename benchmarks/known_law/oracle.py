"""The exact denoiser of a known hidden Markov law: the Bayes posterior p(x_i = v | all evidence) for every position.

It follows the samplers' model contract (`modeling_dsl/samplers.py`), so every sampler runs on it unchanged:

- `forward(input_ids=[B, L])`: the discrete endpoint path. A token id is a clean token (indicator evidence: the
  s -> infinity limit of the Gaussian channel, whatever `endpoint_snr` says), `[MASK]` is SNR 0 (flat evidence);
- `forward(noisy_states=[B, L, d])`: the continuous DSL path. With unit-norm token directions E the channel
  z = s e_x + sqrt(s) eps has likelihood p(z | x = v) proportional to exp(<z, e_v>), whatever the SNR s
  (METHOD.md section 3), so z is evidence exp(<z_i, e_v>) at position i;
- `logits_to_keep` (a `[B, L]` bool map: logits only there, packed `[N, V]`) as the DSL model takes it;
- `config` (the model's it stands beside) and `token_directions()` (that model's E).

The logits are the log posterior marginals (normalized, so softmax gives them back), over the model's V output
classes (DSL predicts no `[MASK]` class); a token the law cannot put at a position given the evidence is log 0 =
-inf. Everything is computed in float64 by the forward-backward algorithm (rescaled messages, log space where those
underflow); only the returned logits are cast to float32, the dtype of the DSL model's logits.

Build it with `oracle_beside(law, model)`: the posterior then reads noisy states with that model's own E, so the
oracle is the ceiling of that arm on the very same z.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from dsl_diffusion.modeling_dsl.modeling_dsl import DSLMaskedDiffusionOutput

from .law import HiddenMarkovLaw


# A visible token's evidence for every OTHER token: not 0, so that a token the law cannot produce where it stands
# (an impossible pair, an impossible first token) leaves a finite posterior instead of a row of NaN; far below any
# probability the law assigns, so it moves possible rows by ~1e-30 relative.
EVIDENCE_FLOOR = 1e-30
# Entries of the [positions, K, V] tensors of one logsumexp chunk: 256K float64 (2 MB) stay in cache, measured 3x
# faster than 8M-entry chunks on a CPU at the full preset's size (K = 16, V = 64, 32,000 positions).
CHUNK_ENTRIES = 2**18
# A rescaled forward-backward message or posterior normalizer below this has lost precision to underflow (float64's
# smallest normal number is 2e-308): that row is recomputed in log space.
SCALED_UNDERFLOW = 1e-250


class HMMOracleDenoiser(nn.Module):
    """The exact posterior of `law` given per-position evidence, behind the DSL model's `forward` (see the module doc).

    Args:
        law: the hidden Markov law of the data.
        config: the config of the model it stands beside (a copy is kept); its `vocab_size` must be the law's.
        token_directions: `[V, d]` unit-norm token directions E of that model (the noisy states' channel).
        evidence_floor: the likelihood a visible token id gives every other token (see `EVIDENCE_FLOOR`).
    """

    def __init__(self, law: HiddenMarkovLaw, config, token_directions: torch.Tensor, evidence_floor: float = EVIDENCE_FLOOR):
        super().__init__()
        if config.vocab_size != law.vocab_size:
            raise ValueError(
                f"the model's vocab_size={config.vocab_size} differs from the law's V={law.vocab_size}: the oracle "
                "predicts the law's tokens over the model's output classes, which must be the same."
            )
        if tuple(token_directions.shape) != (law.vocab_size, config.embed_dim):
            raise ValueError(
                f"token_directions must be [V, d] = [{law.vocab_size}, {config.embed_dim}], got "
                f"{list(token_directions.shape)}."
            )
        norms = token_directions.double().norm(dim=-1)
        if not torch.allclose(norms, torch.ones_like(norms), atol=1e-5):
            # exp(<z, e_v>) is the likelihood only for unit-norm directions (else -s |e_v|^2 / 2 would not cancel).
            raise ValueError(f"token_directions must have unit-norm rows; norms range [{norms.min():.4g}, {norms.max():.4g}].")
        if not 0 < evidence_floor < 1:
            raise ValueError(f"evidence_floor={evidence_floor} must lie in (0, 1).")
        self.config = copy.deepcopy(config)
        self.evidence_floor = float(evidence_floor)
        self.register_buffer("log_initial", law.initial.double().log())
        self.register_buffer("log_transition", law.transition.double().log())
        self.register_buffer("log_emission", law.emission.double().log())
        self.register_buffer("directions", token_directions.detach().double().clone())

    def token_directions(self) -> torch.Tensor:
        return self.directions

    def noisy_states(self, input_ids: torch.LongTensor, snr, generator: torch.Generator | None = None) -> torch.Tensor:
        """The channel z_i = s_i e_{x_i} + sqrt(s_i) eps_i with this oracle's E, `[MASK]` at z = 0 (float32, as the
        DSL model's `noisy_states`, which the trainer's losses call on whatever denoiser they are given)."""
        mask_id = self.config.mask_token_id
        is_mask = input_ids == mask_id
        snr = torch.as_tensor(snr, dtype=torch.float32, device=input_ids.device)
        snr = (snr[:, None] if snr.dim() == 1 else snr).expand(input_ids.shape).masked_fill(is_mask, 0.0)
        directions = self.directions.float()[input_ids.masked_fill(is_mask, 0)]
        noise_device = generator.device if generator is not None else directions.device
        noise = torch.randn(directions.shape, generator=generator, device=noise_device).to(directions.device)
        return snr[..., None] * directions + snr.sqrt()[..., None] * noise

    # --- evidence ------------------------------------------------------------------------------------------------

    def token_log_evidence(self, input_ids: torch.LongTensor) -> torch.Tensor:
        """`[B, L, V]` log-likelihood of each token per position: 0 / log(floor) at a visible id, 0 at `[MASK]`."""
        mask_id = self.config.mask_token_id
        if input_ids.dim() != 2 or input_ids.dtype not in (torch.long, torch.int, torch.int16, torch.uint8):
            raise ValueError(f"input_ids must be an integer [batch, length] tensor, got {input_ids.dtype} {list(input_ids.shape)}.")
        if input_ids.numel() and (input_ids.min() < 0 or input_ids.max() > mask_id):
            raise ValueError(f"input_ids must lie in [0, {mask_id}] ([MASK] = {mask_id}).")
        input_ids = input_ids.long().to(self.directions.device)
        visible = input_ids != mask_id
        evidence = torch.full((*input_ids.shape, self.config.vocab_size), math.log(self.evidence_floor),
                              dtype=torch.float64, device=input_ids.device)
        evidence.scatter_(-1, input_ids.masked_fill(~visible, 0)[..., None], 0.0)
        evidence[~visible] = 0.0
        return evidence

    def state_log_evidence(self, noisy_states: torch.Tensor) -> torch.Tensor:
        """`[B, L, V]` log-likelihood <z_i, e_v> of each token per position (up to a constant per position)."""
        if noisy_states.dim() != 3 or noisy_states.shape[-1] != self.directions.shape[1]:
            raise ValueError(
                f"noisy_states must be [batch, length, {self.directions.shape[1]}], got {list(noisy_states.shape)}."
            )
        if not noisy_states.is_floating_point() or not bool(torch.isfinite(noisy_states).all()):
            raise ValueError("noisy_states must be a finite float tensor (z = 0 is [MASK]).")
        return noisy_states.double() @ self.directions.T

    # --- exact posterior -----------------------------------------------------------------------------------------

    def _chunk_rows(self) -> int:
        num_states, vocab = self.log_emission.shape
        return max(1, CHUNK_ENTRIES // (num_states * vocab))

    def _state_log_likelihood(self, token_log_evidence: torch.Tensor) -> torch.Tensor:
        """`[N, V]` -> `[N, K]`: log p(evidence | h = k) = logsumexp_v (log B[k, v] + log lik(v))."""
        rows = self._chunk_rows()
        return torch.cat([
            torch.logsumexp(chunk[:, None, :] + self.log_emission[None], dim=2)
            for chunk in token_log_evidence.split(rows)
        ])

    def _token_log_prior(self, state_log_weights: torch.Tensor) -> torch.Tensor:
        """`[N, K]` -> `[N, V]`: logsumexp_k (log w(k) + log B[k, v])."""
        rows = self._chunk_rows()
        return torch.cat([
            torch.logsumexp(chunk[:, :, None] + self.log_emission[None], dim=1) for chunk in state_log_weights.split(rows)
        ])

    def log_posterior(self, token_log_evidence: torch.Tensor) -> torch.Tensor:
        """`[B, L, V]` float64 log p(x_i = v | evidence at every position), normalized over v.

        `token_log_evidence[b, i, v]` is log p(evidence_i | x_i = v) up to a constant per position. Forward-backward
        with messages rescaled to sum 1 at every position (`_scaled_posterior`, matrix products, ~4x faster than log
        space); the rows where that underflows (a position whose likeliest tokens the law rules out, the rest of its
        evidence below exp(-745)) are recomputed in log space (`_log_space_posterior`), so both give the same answer.
        """
        posterior, smallest_scale = self._scaled_posterior(token_log_evidence)
        failed = smallest_scale < SCALED_UNDERFLOW
        if failed.any():
            posterior[failed] = self._log_space_posterior(token_log_evidence[failed])
        return posterior

    def _scaled_posterior(self, token_log_evidence: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward-backward on likelihoods exp(evidence - max_v evidence), each message rescaled to sum 1: the scales
        cancel in the normalized posterior. Also returns each row's smallest scale (0 where a message underflowed)."""
        batch, length, vocab = token_log_evidence.shape
        likelihood = (token_log_evidence - token_log_evidence.amax(dim=-1, keepdim=True)).exp()
        emission, transition = self.log_emission.exp(), self.log_transition.exp()
        state_evidence = likelihood @ emission.T  # [B, L, K]: p(evidence_i | h_i = k), up to a constant
        scales = []

        def rescaled(message):
            scale = message.sum(dim=-1, keepdim=True)
            scales.append(scale)
            return message / scale

        predicted = [self.log_initial.exp().expand(batch, -1)]
        for i in range(length - 1):
            predicted.append(rescaled((predicted[-1] * state_evidence[:, i]) @ transition))
        after = [torch.ones_like(predicted[0])]
        for i in range(length - 1, 0, -1):
            after.append(rescaled((state_evidence[:, i] * after[-1]) @ transition.T))
        # p(h_i = k, evidence at every position but i), up to a constant per position.
        without_own = torch.stack(predicted, dim=1) * torch.stack(after[::-1], dim=1)
        joint = (without_own @ emission) * likelihood
        normalizer = joint.sum(dim=-1, keepdim=True)
        smallest = torch.cat([*scales, normalizer.view(batch, length)], dim=-1).nan_to_num(0.0).amin(dim=-1)
        return (joint / normalizer).log(), smallest

    def _log_space_posterior(self, token_log_evidence: torch.Tensor) -> torch.Tensor:
        """The same posterior in log space: alpha_pred[i] = log p(h_i, evidence before i), beta[i] = log p(evidence
        after i | h_i); p(x_i = v | all) is proportional to sum_k exp(alpha_pred[i, k] + beta[i, k]) B[k, v] lik_i(v)."""
        batch, length, vocab = token_log_evidence.shape
        flat_evidence = token_log_evidence.reshape(-1, vocab)
        # log p(evidence_i | h_i = k) = logsumexp_v (log B[k, v] + log lik_i(v)).
        state_evidence = self._state_log_likelihood(flat_evidence).view(batch, length, -1)
        log_a = self.log_transition
        predicted = [self.log_initial.expand(batch, -1)]
        for i in range(length - 1):
            filtered = predicted[-1] + state_evidence[:, i]
            predicted.append(torch.logsumexp(filtered[:, :, None] + log_a[None], dim=1))
        after = [torch.zeros_like(predicted[0])]
        for i in range(length - 1, 0, -1):
            message = state_evidence[:, i] + after[-1]
            after.append(torch.logsumexp(log_a[None] + message[:, None, :], dim=2))
        # log p(h_i = k, evidence at every position but i), up to a constant per row.
        without_own = torch.stack(predicted, dim=1) + torch.stack(after[::-1], dim=1)
        prior = self._token_log_prior(without_own.reshape(-1, without_own.shape[-1]))
        joint = prior.view(batch, length, vocab) + token_log_evidence
        return joint - torch.logsumexp(joint, dim=-1, keepdim=True)

    # --- the model contract --------------------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        noisy_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        endpoint_snr: float | None = None,
        logits_to_keep: int | torch.Tensor = 0,
    ) -> DSLMaskedDiffusionOutput:
        if (input_ids is None) == (noisy_states is None):
            raise ValueError("pass exactly one of `input_ids` (discrete endpoints) or `noisy_states` (continuous z).")
        if endpoint_snr is not None and noisy_states is not None:
            raise ValueError("endpoint_snr applies to input_ids; noisy_states carry their own SNR in z.")
        if attention_mask is not None and not bool((attention_mask != 0).all()):
            raise ValueError(
                "the oracle scores whole sequences of the law (a law sequence starts at its first position): "
                "padding (attention_mask 0) is not supported; pass attention_mask=None or all ones."
            )
        if input_ids is not None:
            evidence = self.token_log_evidence(input_ids)
        else:
            evidence = self.state_log_evidence(noisy_states)
        logits = self.log_posterior(evidence)
        batch, length = logits.shape[:2]
        if torch.is_tensor(logits_to_keep):
            if logits_to_keep.dtype != torch.bool or tuple(logits_to_keep.shape) != (batch, length):
                raise ValueError(
                    f"logits_to_keep must be 0 (every position) or a [{batch}, {length}] bool tensor, got "
                    f"{logits_to_keep.dtype} {list(logits_to_keep.shape)}."
                )
            logits = logits[logits_to_keep.to(logits.device)]
        elif isinstance(logits_to_keep, bool) or logits_to_keep != 0:
            raise ValueError(f"logits_to_keep={logits_to_keep!r} must be 0 (every position) or a [batch, length] bool tensor.")
        return DSLMaskedDiffusionOutput(logits=logits.float())


def oracle_beside(law: HiddenMarkovLaw, model) -> HMMOracleDenoiser:
    """The exact denoiser with `model`'s config and token directions E (a snapshot: call again after E changed), on
    `model`'s device, in eval mode."""
    directions = model.token_directions().detach()
    return HMMOracleDenoiser(law, model.config, directions).to(directions.device).eval()
