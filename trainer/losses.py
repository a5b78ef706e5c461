"""Training objectives and likelihood estimates of DSL and MDLM, as pure functions of (model, batch).

Every function returns a :class:`LossOutput`: ``loss`` is what ``backward`` uses (a mean over the counted
tokens), ``nll_sum`` the summed negative log-likelihood estimate in nats over those tokens and ``num_tokens``
their count, so that ``nll_sum / num_tokens`` aggregates correctly over batches, accumulation steps and devices,
and ``components`` holds floats for logging.

``model`` may be the bare :class:`~dsl_diffusion.modeling_dsl.DSLForMaskedDiffusion` or any wrapper that forwards
keyword arguments to it (DistributedDataParallel, a DeepSpeed engine, a PEFT model): the forward pass goes through
the wrapper (so that gradient hooks fire), the noisy-state channel is taken from the unwrapped model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from accelerate.utils import extract_model_from_parallel

from .corruption import (
    ROARPath,
    SNRPath,
    mdlm_loss_weight,
    mdlm_mask_tokens,
    sample_mdlm_times,
)

__all__ = [
    "LossOutput",
    "ROAR_TERMS",
    "dsl_loss",
    "mdlm_loss",
    "roar_nll",
    "diffusion_nll_bound",
    "token_loss_mask",
    "unwrap_denoiser",
]

# How the optional ROAR NLL term enters the DSL objective with weight lambda:
#   "convex": (1 - lambda) CE + lambda ROAR, lambda in [0, 1] (the reference code's `mix_lambda`; the total weight
#             stays 1, so a learning rate means the same at every lambda);
#   "added":  CE + lambda ROAR, lambda >= 0 (a literal reading of METHOD.md's "extra term").
ROAR_TERMS = ("convex", "added")


@dataclass
class LossOutput:
    """Result of a loss or likelihood estimate.

    Args:
        loss: scalar tensor that ``backward`` uses.
        nll_sum: summed NLL (or cross-entropy, for the DSL objective) in nats over the counted tokens.
        num_tokens: number of counted (non-padding) tokens.
        components: named float values for logging (e.g. the endpoint and continuous parts of the DSL loss).
    """

    loss: torch.Tensor
    nll_sum: torch.Tensor
    num_tokens: torch.Tensor
    components: dict[str, float] = field(default_factory=dict)


def unwrap_denoiser(model):
    """The DSL model inside distributed wrappers (DDP, DeepSpeed, FSDP, torch.compile: accelerate's
    ``extract_model_from_parallel``) and a PEFT wrapper (its ``get_base_model()``)."""
    model = extract_model_from_parallel(model)
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    if not hasattr(model, "noisy_states"):
        raise TypeError(f"{type(model).__name__} is not a DSL denoiser (it has no `noisy_states` method)")
    return model


def _token_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    if attention_mask is None:
        return torch.ones_like(input_ids, dtype=torch.bool)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask shape {list(attention_mask.shape)} does not match input_ids {list(input_ids.shape)}"
        )
    return attention_mask.bool()


def _loss_tokens(tokens: torch.Tensor, loss_mask: torch.Tensor | None) -> torch.Tensor:
    """The tokens whose cross-entropy counts: real tokens (``tokens``) that ``loss_mask`` keeps (all when None).

    A loss mask removes tokens from the loss only; they stay in the input and are attended to (the reference code
    drops pad = EOS from its cross-entropy this way, never from attention)."""
    if loss_mask is None:
        return tokens
    if loss_mask.shape != tokens.shape:
        raise ValueError(f"loss_mask shape {list(loss_mask.shape)} does not match input_ids {list(tokens.shape)}")
    return tokens & loss_mask.bool()


def token_loss_mask(input_ids: torch.Tensor, excluded_token_ids: Sequence[int]) -> torch.Tensor | None:
    """Bool [B, L]: False at the tokens in ``excluded_token_ids`` (e.g. GPT-2's EOS = BOS = pad); None if empty."""
    if not excluded_token_ids:
        return None
    excluded = torch.as_tensor(list(excluded_token_ids), dtype=input_ids.dtype, device=input_ids.device)
    return ~torch.isin(input_ids, excluded)


def _per_token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """-log softmax(logits)[target] per position, [B, L], computed in fp32."""
    batch, length, vocab = logits.shape
    return F.cross_entropy(logits.float().reshape(-1, vocab), targets.reshape(-1), reduction="none").view(batch, length)


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> float | None:
    count = int(mask.sum())
    return float((values * mask).sum() / count) if count else None


def dsl_loss(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    snr_path: SNRPath,
    roar_lambda: float = 0.0,
    generator: torch.Generator | None = None,
    loss_mask: torch.Tensor | None = None,
    roar_term: str = "convex",
) -> LossOutput:
    """The continuum-corruption objective of DSL (METHOD.md section 3).

    Unweighted cross-entropy of the clean tokens given z = s e_x + sqrt(s) eps, averaged over the counted tokens
    (real tokens that ``loss_mask`` keeps; every token is still fed to the network), with the SNRs drawn from
    ``snr_path``. With ``roar_lambda > 0`` a fresh ROAR draw's NLL joins it as ``roar_term`` says (see
    ``ROAR_TERMS``): "convex" (default, the reference code) is (1 - lambda) CE + lambda ROAR, "added" is
    CE + lambda ROAR.

    Components: ``continuous_ce`` (tokens of continuous rows), ``endpoint_ce`` (tokens of ROAR endpoint rows),
    ``endpoint_masked_ce`` (the masked, s = 0, tokens of the endpoint rows: a ROAR NLL estimate at s_hi = s_max
    that comes for free), ``roar_nll`` (only when ``roar_lambda > 0``) and ``ce`` (the unweighted mean).
    """
    if roar_term not in ROAR_TERMS:
        raise ValueError(f"roar_term={roar_term!r} is not supported; accepted: {ROAR_TERMS}")
    if not (math.isfinite(roar_lambda) and roar_lambda >= 0):
        raise ValueError(f"roar_lambda must be a finite number >= 0, got {roar_lambda}")
    if roar_term == "convex" and roar_lambda > 1:
        raise ValueError(f"roar_lambda={roar_lambda} must lie in [0, 1] with roar_term='convex'")
    denoiser = unwrap_denoiser(model)
    tokens = _token_mask(input_ids, attention_mask)
    counted = _loss_tokens(tokens, loss_mask)
    batch, length = input_ids.shape
    draw = snr_path.sample_with_rows(
        batch, length, generator=generator, device=input_ids.device, lengths=tokens.sum(dim=1)
    )
    snr = draw.snr.masked_fill(~tokens, 0.0)
    noisy_states = denoiser.noisy_states(input_ids, snr, generator=generator)
    logits = model(noisy_states=noisy_states, attention_mask=attention_mask).logits
    cross_entropy = _per_token_cross_entropy(logits, input_ids) * counted
    nll_sum = cross_entropy.sum()
    num_tokens = counted.sum()
    loss = nll_sum / num_tokens.clamp(min=1)

    with torch.no_grad():
        endpoint_tokens = counted & draw.roar_rows[:, None]
        components = {
            "ce": float(loss.detach()),
            "continuous_ce": _masked_mean(cross_entropy, counted & ~draw.roar_rows[:, None]),
            "endpoint_ce": _masked_mean(cross_entropy, endpoint_tokens),
            "endpoint_masked_ce": _masked_mean(cross_entropy, endpoint_tokens & (snr == 0)),
        }
    if roar_lambda > 0:
        roar = roar_nll(
            model,
            input_ids,
            attention_mask,
            snr_hi=snr_path_snr_max(snr_path),
            generator=generator,
            loss_mask=loss_mask,
        )
        # Both terms are means over the same counted tokens, so loss * num_tokens stays a sum over tokens (which
        # is what gradient accumulation needs).
        ce_weight = 1.0 - roar_lambda if roar_term == "convex" else 1.0
        loss = ce_weight * loss + roar_lambda * roar.loss
        components["roar_nll"] = float(roar.loss.detach())
    return LossOutput(
        loss=loss,
        nll_sum=nll_sum.detach(),
        num_tokens=num_tokens,
        components={name: value for name, value in components.items() if value is not None},
    )


def snr_path_snr_max(snr_path: SNRPath) -> float:
    """The SNR that stands for a clean token on this path (its ROAR part's ``snr_max``, else its ``snr_max``)."""
    roar = snr_path if isinstance(snr_path, ROARPath) else getattr(snr_path, "roar", None)
    return float(getattr(roar, "snr_max", getattr(snr_path, "snr_max", 100.0)))


def mdlm_loss(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    eps: float = 1e-3,
    t: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    antithetic: bool = True,
    loss_mask: torch.Tensor | None = None,
) -> LossOutput:
    """MDLM's continuous-time NELBO with the SUBS parametrization (METHOD.md section 2).

    Each real token is masked with probability 1 - alpha_t = (1 - eps) t, t drawn per row with low-discrepancy
    sampling on [eps, 1] (or given as ``t``, shape [B]). SUBS: the model never predicts ``[MASK]`` (zero masking
    probability) and unmasked positions carry over the observed token (zero loss), so the loss is
    sum over masked tokens of w(t) * (-log p_theta(x | z_t)), w(t) = 1/t, divided by ALL non-padding tokens.
    ``exp(nll_sum / num_tokens)`` is the perplexity bound ("PPL <=").
    ``loss_mask`` (optional) removes tokens from the sum and the count; they are still masked and fed as usual.
    """
    denoiser = unwrap_denoiser(model)
    tokens = _token_mask(input_ids, attention_mask)
    batch = input_ids.shape[0]
    if t is None:
        t = sample_mdlm_times(
            batch, sampling_eps=eps, antithetic=antithetic, generator=generator, device=input_ids.device
        )
    elif t.shape != (batch,):
        raise ValueError(f"t must have shape [{batch}], got {list(t.shape)}")
    if not bool(((t > 0) & (t <= 1)).all()):
        raise ValueError(f"diffusion times t must lie in (0, 1], got range [{float(t.min())}, {float(t.max())}]")
    noisy_ids, masked = mdlm_mask_tokens(
        input_ids, t, denoiser.config.mask_token_id, eps=eps, attention_mask=tokens, generator=generator
    )
    logits = model(input_ids=noisy_ids, attention_mask=attention_mask).logits
    counted = _loss_tokens(tokens, loss_mask)
    counted_masked = masked & counted
    cross_entropy = _per_token_cross_entropy(logits, input_ids) * counted_masked
    weighted = cross_entropy * mdlm_loss_weight(t.float())[:, None]
    nll_sum = weighted.sum()
    num_tokens = counted.sum()
    loss = nll_sum / num_tokens.clamp(min=1)
    with torch.no_grad():
        components = {
            "nelbo": float(loss.detach()),
            "masked_ce": _masked_mean(cross_entropy, counted_masked),
            "mask_fraction": float(counted_masked.sum() / num_tokens.clamp(min=1)),
        }
    return LossOutput(
        loss=loss,
        nll_sum=nll_sum.detach(),
        num_tokens=num_tokens,
        components={name: value for name, value in components.items() if value is not None},
    )


def roar_nll(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    snr_hi: float | None = None,
    generator: torch.Generator | None = None,
    loss_mask: torch.Tensor | None = None,
) -> LossOutput:
    """One-sample estimate of the random-order autoregressive (any-order) NLL.

    Per row, k ~ U{0..n-1} uniformly chosen tokens are visible and the rest masked; the row's estimate is the
    mean CE over its masked tokens. Averaged over k and the order, that mean times n is the exact any-order NLL
    of the row, so ``nll_sum`` = sum_rows n * (mean masked CE) and ``loss = nll_sum / num_tokens`` (nats/token).

    ``snr_hi=None`` feeds the noise-free endpoints as token ids (``[MASK]`` at masked positions); a number feeds
    noisy states with SNR ``snr_hi`` on the visible tokens and 0 on the masked ones.

    ``loss_mask`` (optional) removes tokens from the estimate (as the reference code drops pad = EOS): the order
    still runs over every real token; a row's mean CE is over its masked counted tokens, scaled by its number of
    counted tokens.
    """
    denoiser = unwrap_denoiser(model)
    tokens = _token_mask(input_ids, attention_mask)
    batch, length = input_ids.shape
    lengths = tokens.sum(dim=1)
    visible = ROARPath.visible_mask(batch, length, generator=generator, device=input_ids.device, lengths=lengths)
    masked = tokens & ~visible
    if snr_hi is None:
        noisy_ids = input_ids.masked_fill(masked, denoiser.config.mask_token_id)
        logits = model(input_ids=noisy_ids, attention_mask=attention_mask).logits
    else:
        if not (math.isfinite(snr_hi) and snr_hi > 0):
            raise ValueError(f"snr_hi must be a finite number > 0 or None (noise-free), got {snr_hi!r}")
        noisy_states = denoiser.noisy_states(input_ids, visible.float() * snr_hi, generator=generator)
        logits = model(noisy_states=noisy_states, attention_mask=attention_mask).logits
    counted = _loss_tokens(tokens, loss_mask)
    counted_masked = masked & counted
    cross_entropy = _per_token_cross_entropy(logits, input_ids) * counted_masked
    # k <= n - 1, so every row with a real token has at least one masked token.
    row_mean = cross_entropy.sum(dim=1) / counted_masked.sum(dim=1).clamp(min=1)
    counted_lengths = counted.sum(dim=1)
    nll_sum = (row_mean * counted_lengths).sum()
    num_tokens = counted_lengths.sum()
    loss = nll_sum / num_tokens.clamp(min=1)
    return LossOutput(
        loss=loss, nll_sum=nll_sum.detach(), num_tokens=num_tokens, components={"roar_nll": float(loss.detach())}
    )


def _nll_grid(snr_max: float, num_points: int, spacing: str) -> list[float]:
    if spacing == "linear":
        return torch.linspace(0.0, snr_max, num_points, dtype=torch.float64).tolist()
    if spacing == "loglinear":
        # 0, then geometric from snr_max * 1e-4: the integrand is bounded by 4 (both vectors lie in the unit
        # ball), so the first trapezoid contributes at most 2e-4 * snr_max nats.
        geometric = torch.logspace(math.log10(snr_max) - 4.0, math.log10(snr_max), num_points - 1, dtype=torch.float64)
        return [0.0] + geometric.tolist()
    raise ValueError(f"unknown grid spacing {spacing!r}; accepted: 'loglinear', 'linear'")


@torch.no_grad()
def diffusion_nll_bound(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    snr_max: float,
    num_points: int,
    num_noise_draws: int,
    generator: torch.Generator | None = None,
    spacing: str = "loglinear",
) -> LossOutput:
    """The I-MMSE upper bound on -log p(x) of the continuous DSL path (METHOD.md section 3).

    -log p(x) <= 1/2 int_0^S E||e_x - x_hat(z_s)||^2 ds + E[-log p_theta(x | z_S)], all tokens sharing one SNR s,
    integrated with the trapezoid rule on ``num_points`` SNRs (0 included, S = ``snr_max`` last) and averaged
    over ``num_noise_draws`` noise draws. Components: ``mmse_integral`` and ``endpoint_ce`` (nats per token).
    """
    if not (math.isfinite(snr_max) and snr_max > 0):
        raise ValueError(f"snr_max must be a finite number > 0, got {snr_max!r}")
    if num_points < 2:
        raise ValueError(f"num_points must be >= 2 (0 and snr_max at least), got {num_points}")
    if num_noise_draws < 1:
        raise ValueError(f"num_noise_draws must be >= 1, got {num_noise_draws}")
    denoiser = unwrap_denoiser(model)
    tokens = _token_mask(input_ids, attention_mask)
    grid = _nll_grid(float(snr_max), num_points, spacing)
    clean_directions = denoiser.token_directions()[input_ids].float()

    integral = torch.zeros(input_ids.shape, dtype=torch.float64, device=input_ids.device)
    endpoint_ce = torch.zeros_like(integral)
    for _ in range(num_noise_draws):
        squared_errors = []
        for snr in grid:
            noisy_states = denoiser.noisy_states(input_ids, snr, generator=generator)
            logits = model(noisy_states=noisy_states, attention_mask=attention_mask).logits
            error = clean_directions - denoiser.posterior_mean(logits)
            squared_errors.append(error.pow(2).sum(dim=-1).double())
        squared_errors = torch.stack(squared_errors, dim=-1)
        integral += torch.trapezoid(squared_errors, torch.tensor(grid, dtype=torch.float64, device=integral.device))
        endpoint_ce += _per_token_cross_entropy(logits, input_ids).double()
    per_token = (0.5 * integral + endpoint_ce) / num_noise_draws * tokens
    num_tokens = tokens.sum()
    count = num_tokens.clamp(min=1)
    nll_sum = per_token.sum().float()
    return LossOutput(
        loss=nll_sum / count,
        nll_sum=nll_sum,
        num_tokens=num_tokens,
        components={
            "mmse_integral": float(0.5 * (integral * tokens).sum() / num_noise_draws / count),
            "endpoint_ce": float((endpoint_ce * tokens).sum() / num_noise_draws / count),
        },
    )
