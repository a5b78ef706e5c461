"""Self-correction: can one refinement pass of the denoiser repair tokens of real text that were replaced at random?

Protocol. In every row of clean text ``x`` a known fraction of the (non-padding) positions, chosen uniformly
without replacement, is replaced by a token drawn uniformly among the OTHER ``V - 1`` tokens, giving ``x~``. One
refinement pass reads ``x~`` and writes ``y``; we report

- ``fixed_rate``: the share of corrupted positions where ``y`` is the original token again;
- ``kept_rate``: the share of clean positions where ``y`` still is the original token;
- ``accuracy_before`` / ``accuracy_after``: token accuracy of ``x~`` and of ``y`` against ``x``.

Refinement methods (all see every position of ``x~`` and rewrite every position):

- ``"posterior"`` (default): show each token of ``x~`` as soft evidence at SNR ``s``, ``z_i = s e_{x~_i}`` (no
  noise), and take ``y = argmax p_theta(. | z)``: one network call. Because ``p(x | z)`` is proportional to
  ``p(x) prod_i exp(<z_i, e_{x_i}>)``, ``s`` sets how much the observed token is trusted against the context. The
  default ``s`` matches the corruption channel: an observed token is right with probability ``1 - r`` and each
  other token has probability ``r / (V - 1)``, a log-likelihood ratio of ``log((1 - r)(V - 1) / r)``, and the
  Gaussian evidence gives the observed token a log-ratio of ``s (1 - <e_v, e_w>) ~ s`` over a nearly orthogonal
  alternative.
- ``"dsl-sde"``: start the DSL stochastic-localization SDE at SNR ``s`` from the state the forward process would
  have produced if ``x~`` were the truth, ``z = s e_{x~} + sqrt(s) eps``, and integrate it (the sampler of
  :mod:`dsl_diffusion.pipelines.samplers`) on a log-linear grid up to ``snr_max`` in ``num_steps`` steps; ``y`` is
  the final argmax (``num_steps + 1`` network calls).
- ``"endpoint"``: feed ``x~`` as clean tokens through ``input_ids`` and take the argmax. A Bayes-optimal DSL
  model trusts clean tokens (infinite SNR), as MDLM's carry-over does, so this is the no-correction baseline.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
from transformers.utils.logging import tqdm  # honours transformers.utils.logging.disable_progress_bar()

from ..pipelines.samplers import ContinuousState, Denoiser, DSLSDESampler, NoiseSource, SDEConfig, StepRecorder
from .utils import batch_tensors


__all__ = [
    "SELF_CORRECTION_METHODS",
    "corrupt_tokens",
    "matched_evidence_snr",
    "SelfCorrectionResult",
    "evaluate_self_correction",
]

SELF_CORRECTION_METHODS = ("posterior", "dsl-sde", "endpoint")


def corrupt_tokens(
    input_ids: torch.LongTensor,
    fraction: float,
    vocab_size: int,
    attention_mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.LongTensor, torch.BoolTensor]:
    """Replace ``round(fraction * n)`` uniformly chosen real positions of each row (``n`` its non-padding length)
    by a uniformly drawn different token in ``[0, vocab_size)``. Returns ``(corrupted_ids, corrupted_mask)``."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    if vocab_size < 2:
        raise ValueError(f"vocab_size must be >= 2 to replace a token by another, got {vocab_size}")
    if int(input_ids.max()) >= vocab_size or int(input_ids.min()) < 0:
        raise ValueError(f"input_ids must be real tokens in [0, {vocab_size}) (no [MASK])")
    real = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    device = input_ids.device
    # A random score per position; the k lowest-scoring real positions of a row are corrupted (k per row).
    scores = torch.rand(input_ids.shape, device=device, generator=generator).masked_fill(~real, 2.0)
    ranks = scores.argsort(dim=1).argsort(dim=1)
    num_corrupted = torch.round(real.sum(dim=1).double() * fraction).long()
    corrupted_mask = (ranks < num_corrupted[:, None]) & real
    # Uniform over the V - 1 other tokens: draw in [0, V - 1) and skip over the original id.
    draws = torch.randint(0, vocab_size - 1, input_ids.shape, device=device, generator=generator)
    replacements = draws + (draws >= input_ids).long()
    return torch.where(corrupted_mask, replacements, input_ids), corrupted_mask


def matched_evidence_snr(fraction: float, vocab_size: int) -> float:
    """The SNR whose Gaussian evidence matches a uniform-replacement channel of rate ``fraction`` (see the module
    docstring): ``log((1 - fraction) (vocab_size - 1) / fraction)``."""
    return math.log((1.0 - fraction) * (vocab_size - 1) / fraction)


@dataclass
class SelfCorrectionResult:
    """Outcome of one refinement pass over corrupted real text, with the settings that produced it."""

    method: str
    corruption_fraction: float
    snr: float | None
    fixed_rate: float
    kept_rate: float
    accuracy_before: float
    accuracy_after: float
    num_corrupted: int
    num_clean: int
    num_sequences: int
    nfe_per_pass: int
    seed: int
    settings: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def _refine_sde(model, corrupted, attention_mask, snr, snr_max, num_steps, generator):
    sampler = DSLSDESampler(SDEConfig(num_steps=num_steps, snr_min=snr, snr_max=snr_max, s_hi=snr_max))
    denoiser = Denoiser(model, attention_mask, s_hi=snr_max)
    grid = sampler.build_grid(model, device=corrupted.device).expand(*corrupted.shape, -1)
    valid = torch.ones_like(corrupted, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    z = model.noisy_states(corrupted, snr, generator=generator) * valid[..., None]
    state = ContinuousState(
        z=z,
        grid=grid,
        tokens=corrupted.clone(),
        generatable=valid,
        confidences=torch.zeros(corrupted.shape, dtype=torch.float64, device=corrupted.device),
        noise=NoiseSource(generator, corrupted.shape[0], corrupted.device),
    )
    with tqdm(total=num_steps, disable=True) as progress:
        state, _ = sampler.integrate(state, denoiser, StepRecorder(None, False), progress)
    return state.tokens, denoiser.nfe


@torch.no_grad()
def evaluate_self_correction(
    model,
    dataloader,
    corruption_fraction: float = 0.1,
    method: str = "posterior",
    snr: float | None = None,
    num_steps: int = 16,
    seed: int = 0,
    max_batches: int | None = None,
) -> SelfCorrectionResult:
    """Corrupt real text (``dataloader`` of clean ``input_ids``), refine it once with ``method``, and measure.

    Args:
        corruption_fraction: the share of real positions replaced in each row, in (0, 1).
        method: ``"posterior"``, ``"dsl-sde"`` or ``"endpoint"`` (module docstring).
        snr: the evidence SNR of the corrupted tokens for ``"posterior"``/``"dsl-sde"`` (None = the matched SNR
            :func:`matched_evidence_snr`, capped below ``model.config.snr_max`` for the SDE).
        num_steps: SDE steps for ``"dsl-sde"``.
        seed: seeds the corruption and the SDE noise.
    """
    if method not in SELF_CORRECTION_METHODS:
        raise ValueError(f"Unknown self-correction method {method!r}; accepted: {SELF_CORRECTION_METHODS}")
    vocab_size = int(model.config.vocab_size)
    snr_max = float(model.config.snr_max)
    if method == "endpoint":
        snr = None
    elif snr is None:
        snr = matched_evidence_snr(corruption_fraction, vocab_size)
        if method == "dsl-sde":
            snr = min(snr, snr_max / 2)
    if snr is not None and not (math.isfinite(snr) and snr > 0):
        raise ValueError(f"snr must be a finite number > 0, got {snr}")
    if method == "dsl-sde" and snr >= snr_max:
        raise ValueError(f"snr={snr} must be below the model's snr_max={snr_max}, where the SDE ends")

    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    was_training = model.training
    model.eval()
    fixed = kept = num_corrupted = num_clean = correct_before = correct_after = num_sequences = nfe = 0
    num_batches = 0
    try:
        for batch in tqdm(dataloader, desc=f"self-correction ({method})", leave=False):
            if max_batches is not None and num_batches >= max_batches:
                break
            input_ids, attention_mask = batch_tensors(batch, device)
            real = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
            corrupted, corrupted_mask = corrupt_tokens(
                input_ids, corruption_fraction, vocab_size, attention_mask, generator=generator
            )
            if method == "endpoint":
                refined = model(input_ids=corrupted, attention_mask=attention_mask).logits.argmax(dim=-1)
                nfe = 1
            elif method == "posterior":
                evidence = model.token_directions()[corrupted] * snr * real[..., None]
                refined = model(noisy_states=evidence, attention_mask=attention_mask).logits.argmax(dim=-1)
                nfe = 1
            else:
                refined, nfe = _refine_sde(model, corrupted, attention_mask, snr, snr_max, num_steps, generator)
            clean_mask = real & ~corrupted_mask
            restored = refined == input_ids
            fixed += int((restored & corrupted_mask).sum())
            kept += int((restored & clean_mask).sum())
            num_corrupted += int(corrupted_mask.sum())
            num_clean += int(clean_mask.sum())
            correct_before += int(((corrupted == input_ids) & real).sum())
            correct_after += int((restored & real).sum())
            num_sequences += input_ids.shape[0]
            num_batches += 1
    finally:
        model.train(was_training)
    if num_corrupted == 0 or num_clean == 0:
        raise ValueError(
            f"corruption_fraction={corruption_fraction} left {num_corrupted} corrupted and {num_clean} clean tokens: "
            "both rates need some of each (use longer rows or another fraction)"
        )
    total = num_corrupted + num_clean
    return SelfCorrectionResult(
        method=method,
        corruption_fraction=corruption_fraction,
        snr=snr,
        fixed_rate=fixed / num_corrupted,
        kept_rate=kept / num_clean,
        accuracy_before=correct_before / total,
        accuracy_after=correct_after / total,
        num_corrupted=num_corrupted,
        num_clean=num_clean,
        num_sequences=num_sequences,
        nfe_per_pass=nfe,
        seed=seed,
        settings={"num_steps": num_steps} if method == "dsl-sde" else {},
    )
