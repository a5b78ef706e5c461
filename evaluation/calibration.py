"""Calibration of the denoiser's token predictions: expected calibration error (ECE) and reliability diagrams, per
SNR bucket of the continuous DSL path and at the discrete endpoint.

A prediction is the arg-max token of ``p_theta(. | z)`` at one position, its confidence the probability it gets,
and it is correct when it equals the clean token. Confidences are binned into ``num_bins`` equal-width bins of
``[0, 1]`` (the first bin includes 0) and ``ECE = sum_b (n_b / N) |accuracy_b - confidence_b|`` (Guo et al., 2017).

Buckets: for each ``(low, high)`` SNR bucket every token of a batch gets its own SNR drawn log-uniformly in
``[low, high)`` and the model sees ``z = model.noisy_states(x, snr)``; all non-padding positions are scored. The
endpoint bucket masks each token of a row with a probability drawn uniformly per row (the MDLM corruption with
t ~ U(0, 1)) and scores the masked positions only (visible ones are copied).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from matplotlib.figure import Figure
from transformers.utils.logging import tqdm  # honours transformers.utils.logging.disable_progress_bar()

from .utils import batch_tensors


__all__ = [
    "DEFAULT_SNR_BUCKETS",
    "ENDPOINT_BUCKET",
    "ReliabilityResult",
    "ReliabilityAccumulator",
    "expected_calibration_error",
    "CalibrationResult",
    "evaluate_calibration",
    "plot_reliability_diagrams",
]

DEFAULT_SNR_BUCKETS = ((0.25, 1.0), (1.0, 4.0), (4.0, 16.0), (16.0, 64.0))
ENDPOINT_BUCKET = "endpoint"


@dataclass
class ReliabilityResult:
    """ECE and the reliability diagram's bins. Empty bins have ``None`` accuracy and confidence."""

    ece: float
    num_predictions: int
    accuracy: float
    mean_confidence: float
    bin_edges: list[float]
    bin_counts: list[int]
    bin_accuracy: list[float | None]
    bin_confidence: list[float | None]

    def to_dict(self) -> dict:
        return asdict(self)


class ReliabilityAccumulator:
    """Accumulates per-bin counts, summed confidences and summed correct predictions over many batches, so that
    the ECE of millions of tokens needs no more memory than ``num_bins`` numbers."""

    def __init__(self, num_bins: int = 15):
        if num_bins < 1:
            raise ValueError(f"num_bins must be >= 1, got {num_bins}")
        self.num_bins = num_bins
        self.counts = torch.zeros(num_bins, dtype=torch.float64)
        self.confidence_sums = torch.zeros(num_bins, dtype=torch.float64)
        self.correct_sums = torch.zeros(num_bins, dtype=torch.float64)

    def update(self, confidences: torch.Tensor, correct: torch.Tensor) -> None:
        confidences = torch.as_tensor(confidences).reshape(-1).double().cpu()
        correct = torch.as_tensor(correct).reshape(-1).double().cpu()
        if confidences.shape != correct.shape:
            raise ValueError(f"{confidences.numel()} confidences but {correct.numel()} correctness flags")
        if confidences.numel() and not bool(((confidences >= 0) & (confidences <= 1)).all()):
            raise ValueError("confidences must lie in [0, 1]")
        # Bin b holds (b / B, (b + 1) / B]; a confidence of exactly 0 goes to the first bin.
        bins = (torch.ceil(confidences * self.num_bins).long() - 1).clamp(0, self.num_bins - 1)
        self.counts += torch.bincount(bins, minlength=self.num_bins).double()
        self.confidence_sums += torch.bincount(bins, weights=confidences, minlength=self.num_bins)
        self.correct_sums += torch.bincount(bins, weights=correct, minlength=self.num_bins)

    def result(self) -> ReliabilityResult:
        total = float(self.counts.sum())
        if total == 0:
            raise ValueError("No predictions were accumulated: the ECE of an empty set is undefined")
        filled = self.counts > 0
        accuracy = torch.where(filled, self.correct_sums / self.counts.clamp(min=1), torch.nan)
        confidence = torch.where(filled, self.confidence_sums / self.counts.clamp(min=1), torch.nan)
        gaps = (accuracy - confidence).abs().nan_to_num(0.0)
        return ReliabilityResult(
            ece=float((self.counts / total * gaps).sum()),
            num_predictions=int(total),
            accuracy=float(self.correct_sums.sum() / total),
            mean_confidence=float(self.confidence_sums.sum() / total),
            bin_edges=torch.linspace(0, 1, self.num_bins + 1, dtype=torch.float64).tolist(),
            bin_counts=[int(count) for count in self.counts.tolist()],
            bin_accuracy=[None if math.isnan(value) else value for value in accuracy.tolist()],
            bin_confidence=[None if math.isnan(value) else value for value in confidence.tolist()],
        )


def expected_calibration_error(confidences, correct, num_bins: int = 15) -> ReliabilityResult:
    """ECE and reliability bins of predictions with the given ``confidences`` (in [0, 1]) and ``correct`` flags."""
    accumulator = ReliabilityAccumulator(num_bins)
    accumulator.update(confidences, correct)
    return accumulator.result()


@dataclass
class CalibrationResult:
    """Reliability results per bucket name (``"snr[low,high)"`` and ``"endpoint"``) and the settings used."""

    buckets: dict[str, ReliabilityResult]
    num_sequences: int
    num_bins: int
    seed: int
    snr_buckets: list[list[float]] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "buckets": {name: result.to_dict() for name, result in self.buckets.items()},
            "num_sequences": self.num_sequences,
            "num_bins": self.num_bins,
            "seed": self.seed,
            "snr_buckets": self.snr_buckets,
        }


def _bucket_name(low: float, high: float) -> str:
    return f"snr[{low:g},{high:g})"


def _score(logits: torch.Tensor, targets: torch.Tensor, positions: torch.Tensor, accumulator: ReliabilityAccumulator):
    confidence, prediction = torch.softmax(logits.float(), dim=-1).max(dim=-1)
    accumulator.update(confidence[positions], (prediction == targets)[positions])


@torch.no_grad()
def evaluate_calibration(
    model,
    dataloader,
    snr_buckets: Sequence[Sequence[float]] = DEFAULT_SNR_BUCKETS,
    include_endpoint: bool = True,
    num_bins: int = 15,
    seed: int = 0,
    max_batches: int | None = None,
) -> CalibrationResult:
    """ECE and reliability bins of ``model``'s token predictions per SNR bucket (and at the discrete endpoint).

    ``dataloader`` yields clean ``input_ids`` (tensors, or dicts with ``input_ids``/``attention_mask``).
    """
    snr_buckets = [[float(low), float(high)] for low, high in snr_buckets]
    for low, high in snr_buckets:
        if not (0 < low < high and math.isfinite(high)):
            raise ValueError(f"SNR bucket [{low}, {high}) is invalid: need 0 < low < high < inf")
    if not snr_buckets and not include_endpoint:
        raise ValueError("Nothing to evaluate: give SNR buckets or include_endpoint=True")
    accumulators = {_bucket_name(low, high): ReliabilityAccumulator(num_bins) for low, high in snr_buckets}
    if include_endpoint:
        accumulators[ENDPOINT_BUCKET] = ReliabilityAccumulator(num_bins)

    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    mask_token_id = model.config.mask_token_id
    was_training = model.training
    model.eval()
    num_sequences, num_batches = 0, 0
    try:
        for batch in tqdm(dataloader, desc="calibration", leave=False):
            if max_batches is not None and num_batches >= max_batches:
                break
            input_ids, attention_mask = batch_tensors(batch, device)
            real = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
            for low, high in snr_buckets:
                log_snr = torch.empty(input_ids.shape, device=device).uniform_(
                    math.log(low), math.log(high), generator=generator
                )
                noisy_states = model.noisy_states(input_ids, log_snr.exp(), generator=generator)
                logits = model(noisy_states=noisy_states, attention_mask=attention_mask).logits
                _score(logits, input_ids, real, accumulators[_bucket_name(low, high)])
            if include_endpoint:
                mask_rate = torch.rand(input_ids.shape[0], 1, device=device, generator=generator)
                masked = (torch.rand(input_ids.shape, device=device, generator=generator) < mask_rate) & real
                logits = model(
                    input_ids=input_ids.masked_fill(masked, mask_token_id), attention_mask=attention_mask
                ).logits
                _score(logits, input_ids, masked, accumulators[ENDPOINT_BUCKET])
            num_sequences += input_ids.shape[0]
            num_batches += 1
    finally:
        model.train(was_training)
    if num_sequences == 0:
        raise ValueError("The dataloader yielded no sequences")
    return CalibrationResult(
        buckets={name: accumulator.result() for name, accumulator in accumulators.items()},
        num_sequences=num_sequences,
        num_bins=num_bins,
        seed=seed,
        snr_buckets=snr_buckets,
    )


def plot_reliability_diagrams(result: CalibrationResult | dict[str, ReliabilityResult], path: str | Path) -> Path:
    """One reliability diagram per bucket (accuracy per confidence bin against the diagonal), saved as a PNG."""
    buckets = result.buckets if isinstance(result, CalibrationResult) else result
    if not buckets:
        raise ValueError("No buckets to plot")
    figure = Figure(figsize=(3.2 * len(buckets), 3.4), layout="constrained")
    axes = figure.subplots(1, len(buckets), squeeze=False)[0]
    for ax, (name, bins) in zip(axes, buckets.items()):
        edges = bins.bin_edges
        width = edges[1] - edges[0]
        centers = [(left + right) / 2 for left, right in zip(edges[:-1], edges[1:])]
        filled = [(c, a) for c, a in zip(centers, bins.bin_accuracy) if a is not None]
        ax.bar([c for c, _ in filled], [a for _, a in filled], width=width, edgecolor="black", label="accuracy")
        ax.plot([0, 1], [0, 1], linestyle="--", color="gray", label="perfect calibration")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence")
        ax.set_title(f"{name}\nECE {bins.ece:.3f}, n = {bins.num_predictions}", fontsize=9)
    axes[0].set_ylabel("accuracy")
    axes[0].legend(loc="upper left", fontsize=7)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    return path
