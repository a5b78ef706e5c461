"""The draft revision (DraftRevision): re-noise chosen tokens to SNR s_d and integrate them back with the SDE.

Exactness is tested on a law whose joint is enumerated (the 3-state Markov chain of length 3 of test_samplers.py,
27 sequences): start from 20,000 exact law samples, apply one revision round through the exact denoiser on a fine
grid, and chi-square the 27 outcome counts against p. Power: the same test rejects, with p-values below 1e-10, a
round whose channel has the wrong SNR (the right signal s_d e_x with the noise of SNR 4 s_d) and a round whose
denoiser does not condition on the tokens outside S. The Euler error is visible too: with 16 steps instead of 64 the
same round gives p ~ 0.01 at this size, so 64 steps is a few times finer than what 20,000 samples can tell apart.
"""

import math

import pytest
import torch

from dsl_diffusion.pipelines.samplers import (
    Denoiser,
    DraftRevision,
    HybridConfig,
    HybridSampler,
    NoiseSource,
    SDEConfig,
    StepRecorder,
    get_sampler,
)
from test_samplers import MARKOV_INITIAL, MARKOV_TRANSITION, chi_square_pvalue, markov_toy, sequence_counts

SIGNIFICANCE = 1e-3
NUM_SAMPLES = 20_000
REVISION_SNR = 2.0
FINE_STEPS = 64


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def markov():
    return markov_toy(MARKOV_INITIAL, MARKOV_TRANSITION, length=3)


@pytest.fixture(scope="module")
def law_samples(markov):
    generator = torch.Generator().manual_seed(0)
    return markov.sequences[torch.multinomial(markov.target, NUM_SAMPLES, replacement=True, generator=generator)]


class NoProgress:
    def update(self, n):
        pass


def revise(model, tokens, revision: DraftRevision, seed=1, confidences=None):
    """One call of `revision.revise` on complete sequences; returns (tokens, NFE)."""
    batch, length = tokens.shape
    generatable = torch.ones(batch, length, dtype=torch.bool)
    confidences = torch.ones(batch, length, dtype=torch.float64) if confidences is None else confidences
    denoiser = Denoiser(model, None, s_hi=revision.s_hi)
    noise = NoiseSource(torch.Generator().manual_seed(seed), batch, tokens.device)
    revised, _ = revision.revise(tokens, generatable, confidences, denoiser, noise, StepRecorder(None, False), NoProgress(), 0)
    return revised, denoiser.nfe


def one_round(snr_max, revision_class=DraftRevision, **overrides):
    knobs = dict(rounds=1, snr=REVISION_SNR, fraction=0.5, selection="random", num_steps=FINE_STEPS, s_hi=snr_max)
    return revision_class(**{**knobs, **overrides})


def test_a_revision_round_leaves_the_law_invariant(markov, law_samples):
    revision = one_round(markov.config.snr_max)  # ceil(0.5 * 3) = 2 of the 3 positions per row
    revised, nfe = revise(markov, law_samples, revision)
    assert nfe == FINE_STEPS + 1
    # The move is not the identity: a third of the rows change (so the test is about a real re-draw).
    assert (revised != law_samples).any(dim=1).float().mean() > 0.3
    assert chi_square_pvalue(revised, markov.target, 3) > SIGNIFICANCE


class WrongChannelRevision(DraftRevision):
    """A deliberately wrong round: the signal of SNR s_d with the noise of SNR 4 s_d."""

    def renoise(self, tokens, where, denoiser, noise):
        z = denoiser.tokens_to_states(tokens)
        eps = noise.sample(where, (z.shape[-1],), "normal", z.dtype)
        z[where] = self.snr * denoiser.token_directions()[tokens[where]] + math.sqrt(4 * self.snr) * eps
        return z


class UnconditionedToy(torch.nn.Module):
    """The exact denoiser shown [MASK] (z = 0) at every clean token: it drops the conditioning on x_{-S}."""

    def __init__(self, toy):
        super().__init__()
        self.toy, self.config = toy, toy.config

    def forward(self, noisy_states=None, **kwargs):
        clean = noisy_states.norm(dim=-1, keepdim=True) > self.config.snr_max / 2
        return self.toy(noisy_states=noisy_states.masked_fill(clean, 0.0), **kwargs)

    def token_directions(self):
        return self.toy.token_directions()


def test_the_invariance_test_rejects_wrong_moves(markov, law_samples):
    revised, _ = revise(markov, law_samples, one_round(markov.config.snr_max, WrongChannelRevision))
    assert chi_square_pvalue(revised, markov.target, 3) < 1e-10
    revised, _ = revise(UnconditionedToy(markov), law_samples, one_round(markov.config.snr_max))
    assert chi_square_pvalue(revised, markov.target, 3) < 1e-10


def total_variation(sequences, target, vocab_size=3):
    counts = sequence_counts(sequences, vocab_size)
    return 0.5 * float((counts / counts.sum() - target).abs().sum())


def test_rounds_move_a_wrong_draft_towards_the_law(markov):
    """Draft: the product of the law's marginals (what decoding every position at once from p(x_i) gives). Each
    round is a Gibbs step with p as its fixed point, so the distance to p shrinks round after round."""
    probs = markov.target.view(3, 3, 3)
    marginals = [probs.sum(dim=(1, 2)), probs.sum(dim=(0, 2)), probs.sum(dim=(0, 1))]
    generator = torch.Generator().manual_seed(2)
    draft = torch.stack([torch.multinomial(m, 10_000, replacement=True, generator=generator) for m in marginals], 1)
    distances = [total_variation(draft, markov.target)]
    for rounds in (1, 4):
        revised, nfe = revise(markov, draft, one_round(markov.config.snr_max, rounds=rounds, num_steps=32))
        assert nfe == rounds * 33
        distances.append(total_variation(revised, markov.target))
    # Sampling noise of the TV at 10,000 draws of 27 outcomes is ~0.015; the draft starts ~0.2 away.
    assert distances[0] > 0.1 and distances[1] < 0.6 * distances[0] and distances[2] < 0.35 * distances[0]


def test_lowest_confidence_selection_takes_the_least_confident_tokens():
    revision = DraftRevision(1, 2.0, 0.4, "lowest_confidence", 4, 100.0)
    confidences = torch.tensor([[0.9, 0.1, 0.5, 0.3, 1.0], [0.2, 0.2, 0.2, 0.9, 0.9]], dtype=torch.float64)
    generatable = torch.tensor([[True, True, True, True, False], [True] * 5])
    noise = NoiseSource(torch.Generator().manual_seed(0), 2, torch.device("cpu"))
    where = revision.select(generatable, confidences, noise)
    # Row 0: ceil(0.4 * 4) = 2 of its 4 generated positions, the two least confident; row 1: 2 of the three ties.
    assert where[0].tolist() == [False, True, False, True, False]
    assert where[1, 3:].tolist() == [False, False] and int(where[1].sum()) == 2


@pytest.mark.parametrize("name", ["dsl-sde", "hybrid"])
def test_samplers_count_every_revision_call(markov, name):
    knobs = dict(num_steps=6, revision_steps=5)
    generator = torch.Generator().manual_seed(0)
    plain = get_sampler(name, **knobs).run(markov, batch_size=64, generator=generator, progress_bar=False)
    revised = get_sampler(name, revision_rounds=3, **knobs).run(
        markov, batch_size=64, generator=torch.Generator().manual_seed(0), progress_bar=False, return_trajectory=True
    )
    assert revised.nfe == plain.nfe + 3 * (5 + 1)
    assert len(revised.trajectory) == 6 + 3 * 5 and torch.equal(revised.trajectory[-1], revised.sequences)
    assert (revised.sequences != markov.config.mask_token_id).all()


def test_hybrid_with_revision_samples_the_law(markov):
    """A fine hybrid run followed by revision rounds is still a sample of p (each round leaves p invariant)."""
    sampler = HybridSampler(HybridConfig(num_steps=96, continuous_steps=64, snr_star=5.0, revision_rounds=2,
                                         revision_steps=FINE_STEPS))
    out = sampler.run(markov, batch_size=NUM_SAMPLES, generator=torch.Generator().manual_seed(3), progress_bar=False)
    assert chi_square_pvalue(out.sequences, markov.target, 3) > SIGNIFICANCE


@pytest.mark.parametrize(
    "knobs, message",
    [
        (dict(revision_rounds=-1), "revision_rounds=-1"),
        (dict(revision_snr=0.0), "revision_snr=0.0"),
        (dict(revision_fraction=0.0), "revision_fraction=0.0"),
        (dict(revision_fraction=1.5), "revision_fraction=1.5"),
        (dict(revision_selection="bogus"), "revision_selection='bogus'"),
        (dict(revision_steps=0), "revision_steps=0"),
    ],
)
@pytest.mark.parametrize("config_class", [SDEConfig, HybridConfig])
def test_revision_knobs_are_validated(config_class, knobs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        config_class(**knobs)


def test_revision_snr_must_stay_below_the_clean_token_snr(markov):
    with pytest.raises(ValueError, match="revision_snr=200.0 must be < s_hi=100.0"):
        get_sampler("dsl-sde", num_steps=2, revision_rounds=1, revision_snr=200.0).run(markov, progress_bar=False)
