"""Likelihood estimates of a DSL model over a dataset: NLL per token, bits per token (or per character), PPL bound.

The per-batch estimators live in :mod:`dsl_diffusion.trainer.losses`; this module only runs one of them over a
dataloader and aggregates ``nll_sum / num_tokens`` correctly across batches of different sizes:

- ``"roar"``: the random-order autoregressive NLL (exact any-order AR likelihood in expectation over the order),
  :func:`~dsl_diffusion.trainer.losses.roar_nll`;
- ``"diffusion"``: the I-MMSE upper bound of the continuous DSL path,
  :func:`~dsl_diffusion.trainer.losses.diffusion_nll_bound`;
- ``"mdlm"``: MDLM's NELBO on the discrete endpoint path, :func:`~dsl_diffusion.trainer.losses.mdlm_loss`.

All three are Monte-Carlo estimates: the result records the seed, and more data (or several passes) lowers their
variance. ``"diffusion"`` and ``"mdlm"`` bound the NLL from above; ``"roar"`` estimates the NLL of the any-order
autoregressive model the denoiser defines.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
from transformers.utils.logging import tqdm  # honours transformers.utils.logging.disable_progress_bar()

from ..trainer.losses import diffusion_nll_bound, mdlm_loss, roar_nll
from .utils import batch_tensors


__all__ = ["ESTIMATORS", "LikelihoodResult", "evaluate_likelihood"]

ESTIMATORS = {"roar": roar_nll, "diffusion": diffusion_nll_bound, "mdlm": mdlm_loss}
UPPER_BOUNDS = {"diffusion", "mdlm"}


@dataclass
class LikelihoodResult:
    """Aggregated likelihood estimate.

    ``nll_per_token`` is in nats; ``bits_per_token = nll_per_token / ln 2``; ``ppl_bound = exp(nll_per_token)``
    (a perplexity bound for the bounding estimators); ``bits_per_character`` is the total NLL in bits divided by
    ``num_characters`` when the character count of the evaluated text was given (for character-level data, where
    one token is one character, it equals ``bits_per_token``). ``components`` are the estimator's per-batch
    components averaged with the batches' token counts as weights.
    """

    estimator: str
    is_upper_bound: bool
    nll_per_token: float
    bits_per_token: float
    ppl_bound: float
    nll_sum: float
    num_tokens: int
    num_sequences: int
    num_batches: int
    bits_per_character: float | None = None
    num_characters: int | None = None
    seed: int = 0
    estimator_kwargs: dict = field(default_factory=dict)
    components: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def evaluate_likelihood(
    model,
    dataloader,
    estimator: str = "roar",
    num_characters: int | None = None,
    seed: int = 0,
    max_batches: int | None = None,
    **estimator_kwargs,
) -> LikelihoodResult:
    """Run one likelihood ``estimator`` over ``dataloader`` and aggregate it.

    Args:
        model: a :class:`~dsl_diffusion.modeling_dsl.DSLForMaskedDiffusion` (or a wrapper the losses accept).
        dataloader: yields ``input_ids`` tensors or dicts with ``input_ids`` and ``attention_mask``.
        estimator: ``"roar"``, ``"diffusion"`` or ``"mdlm"`` (see the module docstring).
        num_characters: the number of characters of the evaluated text, for bits per character.
        seed: seeds the estimator's randomness (masks, orders, noise), so that results are reproducible.
        max_batches: stop after this many batches.
        estimator_kwargs: passed to the estimator: ``snr_hi`` for ``"roar"``; ``snr_max`` (default: the model's
            ``config.snr_max``), ``num_points`` (default 64), ``num_noise_draws`` (default 1) and ``spacing`` for
            ``"diffusion"``; ``eps`` for ``"mdlm"``.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"Unknown likelihood estimator {estimator!r}; accepted: {sorted(ESTIMATORS)}")
    if num_characters is not None and not (math.isfinite(num_characters) and num_characters > 0):
        raise ValueError(f"num_characters must be a finite number > 0 (the evaluated text's length), got {num_characters}")
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"max_batches must be >= 1, got {max_batches}")
    if estimator == "diffusion":
        estimator_kwargs.setdefault("snr_max", float(model.config.snr_max))
        estimator_kwargs.setdefault("num_points", 64)
        estimator_kwargs.setdefault("num_noise_draws", 1)
    estimate = ESTIMATORS[estimator]

    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    was_training = model.training
    model.eval()
    nll_sum, num_tokens, num_sequences, num_batches = 0.0, 0, 0, 0
    weighted_components: dict[str, float] = {}
    try:
        total = len(dataloader) if hasattr(dataloader, "__len__") else None
        if total is not None and max_batches is not None:
            total = min(total, max_batches)
        for batch in tqdm(dataloader, total=total, desc=f"{estimator} likelihood", leave=False):
            if max_batches is not None and num_batches >= max_batches:
                break
            input_ids, attention_mask = batch_tensors(batch, device)
            output = estimate(model, input_ids, attention_mask, generator=generator, **estimator_kwargs)
            batch_tokens = int(output.num_tokens)
            nll_sum += float(output.nll_sum)
            num_tokens += batch_tokens
            num_sequences += input_ids.shape[0]
            num_batches += 1
            for name, value in output.components.items():
                weighted_components[name] = weighted_components.get(name, 0.0) + value * batch_tokens
    finally:
        model.train(was_training)
    if num_tokens == 0:
        raise ValueError("The dataloader yielded no (non-padding) tokens")

    nll_per_token = nll_sum / num_tokens
    return LikelihoodResult(
        estimator=estimator,
        is_upper_bound=estimator in UPPER_BOUNDS,
        nll_per_token=nll_per_token,
        bits_per_token=nll_per_token / math.log(2),
        ppl_bound=math.exp(nll_per_token),
        nll_sum=nll_sum,
        num_tokens=num_tokens,
        num_sequences=num_sequences,
        num_batches=num_batches,
        bits_per_character=None if num_characters is None else nll_sum / math.log(2) / num_characters,
        num_characters=num_characters,
        seed=seed,
        estimator_kwargs=estimator_kwargs,
        components={name: value / num_tokens for name, value in weighted_components.items()},
    )
