"""Known-answer tests of the samplers (dsl_diffusion.pipelines.samplers).

The toy denoisers below expose the model's interface and compute the EXACT posterior by enumerating every sequence
of a tiny vocabulary and length: p(x | evidence) is proportional to p(x) prod_i exp(l_i(x_i)), where the evidence
l_i is 0 / -inf for an observed token, 0 for `[MASK]`, and <z_i, e_v> for a noisy state (unit-norm directions e_v).
Targets: (a) independent tokens with given marginals, (b) a 3-state Markov chain of length 3.

Distribution tests draw 10,000 sequences in one batch with a fixed seed (so they are deterministic) and use a
chi-square goodness-of-fit test at significance 1e-3 on the joint distribution of whole sequences. Negative
controls (a sampler that must be wrong) check that the test has the power to notice.

Token ids drawn through two code paths of one model under the same seeds (a row of a padded batch and the row alone,
logits at the kept positions and at all, synced and plain, planned and unplanned, compiled and eager) are compared
exactly, though the two paths' logits may differ in the last bits on another machine (other BLAS blocking or memory
alignment): an id flips only where a draw falls within that difference of a decision boundary. Noise of 3e-5 added
to every logit (100 times the 3e-7 seen between a model and its reloaded copy) changed no token of 26 runs of the
prompted batch below (every sampler, both input paths), 3e-4 changed 3 runs: at the real 3e-7 a flip is about a 1e-4
event per run. A real bug moves logits far more (1e-2 changed 18 of the 26 runs) or draws other noise.
"""

import dataclasses
import itertools
import math
import os
import sys
import tempfile
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from scipy import stats
from torch import nn

from dsl_diffusion.pipelines.samplers import (
    ConfidenceConfig,
    ConfidenceSampler,
    Denoiser,
    DSLSDESampler,
    EvidenceDenoiser,
    HybridConfig,
    HybridSampler,
    MDLMConfig,
    MDLMTopPLogitsWarper,
    MDLMSampler,
    NoiseSource,
    ReMDMConfig,
    ReMDMSampler,
    ROARSampler,
    SDEConfig,
    SamplingConfig,
    gumbel_argmax,
    get_sampler,
    nucleus_kept,
    prepare_inputs,
    sampling_log_probs,
    snr_grid,
    time_grid,
    top_p_filter,
)
from helpers import tiny_dsl_model

SIGNIFICANCE = 1e-3
NUM_SAMPLES = 10_000


# ---------------------------------------------------------------------------------------------------------------
# Toy denoisers with a closed-form posterior
# ---------------------------------------------------------------------------------------------------------------


class ExactPosteriorToy(nn.Module):
    """Exact denoiser of a distribution over all V^L sequences, given by `log_joint` (one entry per sequence in
    itertools.product order). Same interface as DSLForMaskedDiffusion; counts its forward calls."""

    def __init__(self, log_joint, vocab_size, length, embed_dim=3, snr_max=100.0, seed=0):
        super().__init__()
        sequences = torch.tensor(list(itertools.product(range(vocab_size), repeat=length)))
        generator = torch.Generator().manual_seed(seed)
        self.register_buffer("sequences", sequences)
        self.register_buffer("one_hot", F.one_hot(sequences, vocab_size).double())
        self.register_buffer("log_joint", log_joint.double())
        self.register_buffer("directions", F.normalize(torch.randn(vocab_size, embed_dim, generator=generator), dim=-1))
        self.config = SimpleNamespace(
            mask_token_id=vocab_size,
            vocab_size=vocab_size,
            snr_max=snr_max,
            max_position_embeddings=length,
            time_conditioning=False,
        )
        self.calls = 0
        self.drift_scale = 1.0  # != 1 makes the SDE's drift softmax(logits) @ token_directions() deliberately wrong
        self.eval()

    @property
    def target(self) -> torch.Tensor:
        return self.log_joint.exp()

    def evidence(self, input_ids=None, noisy_states=None) -> torch.Tensor:
        """Per-position log-evidence l_i(v), `[B, L, V]` float64."""
        vocab_size = self.config.vocab_size
        if noisy_states is not None:
            return noisy_states.double() @ self.directions.double().T
        observed = input_ids != vocab_size
        is_value = F.one_hot(input_ids.clamp(max=vocab_size - 1), vocab_size).bool()
        log_indicator = torch.zeros(is_value.shape, dtype=torch.float64).masked_fill(~is_value, -torch.inf)
        return torch.where(observed[..., None], log_indicator, 0.0)

    def forward(self, input_ids=None, noisy_states=None, attention_mask=None):
        self.calls += 1
        evidence = self.evidence(input_ids, noisy_states)
        batch, length, _ = evidence.shape
        per_sequence = evidence.gather(-1, self.sequences.T[None].expand(batch, length, -1)).sum(dim=1)
        posterior = (self.log_joint[None] + per_sequence).softmax(dim=-1)  # p(x | evidence) over all sequences
        marginals = torch.einsum("bn,nlv->blv", posterior, self.one_hot)
        return SimpleNamespace(logits=marginals.clamp_min(1e-30).log().float())

    def token_directions(self):
        """The directions the samplers see (the evidence above always uses the true ones)."""
        return self.drift_scale * self.directions

    def noisy_states(self, input_ids, snr, generator=None):
        """The localization channel z = s e_x + sqrt(s) eps."""
        directions = self.directions[input_ids]
        return snr * directions + math.sqrt(snr) * torch.randn(directions.shape, generator=generator)


def independent_toy(marginals, **kwargs):
    marginals = torch.tensor(marginals, dtype=torch.float64)
    length, vocab_size = marginals.shape
    sequences = torch.tensor(list(itertools.product(range(vocab_size), repeat=length)))
    return ExactPosteriorToy(marginals.log().gather(1, sequences.T).sum(0), vocab_size, length, **kwargs)


def markov_toy(initial, transition, length, **kwargs):
    initial, transition = torch.tensor(initial).double(), torch.tensor(transition).double()
    vocab_size = initial.shape[0]
    sequences = torch.tensor(list(itertools.product(range(vocab_size), repeat=length)))
    log_joint = initial.log()[sequences[:, 0]]
    for i in range(1, length):
        log_joint = log_joint + transition.log()[sequences[:, i - 1], sequences[:, i]]
    return ExactPosteriorToy(log_joint, vocab_size, length, **kwargs)


INDEPENDENT_MARGINALS = [[0.05, 0.1, 0.25, 0.6], [0.4, 0.3, 0.2, 0.1], [0.7, 0.1, 0.1, 0.1]]
MARKOV_INITIAL = [0.5, 0.3, 0.2]
MARKOV_TRANSITION = [[0.7, 0.2, 0.1], [0.2, 0.5, 0.3], [0.3, 0.3, 0.4]]


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """The toys work on many tiny tensors: one intra-op thread is faster than two on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def independent():
    return independent_toy(INDEPENDENT_MARGINALS)


@pytest.fixture(scope="module")
def markov():
    return markov_toy(MARKOV_INITIAL, MARKOV_TRANSITION, length=3)


def sequence_counts(sequences, vocab_size):
    length = sequences.shape[1]
    index = (sequences * vocab_size ** torch.arange(length - 1, -1, -1)).sum(dim=1)
    return torch.bincount(index, minlength=vocab_size**length).double()


def chi_square_pvalue(sequences, target, vocab_size):
    counts = sequence_counts(sequences, vocab_size)
    keep = target > 0
    assert counts[~keep].sum() == 0, "sampled a sequence of probability 0"
    expected = target[keep] / target[keep].sum() * counts.sum()
    return stats.chisquare(counts[keep].numpy(), expected.numpy()).pvalue


def total_variation(sequences, target, vocab_size):
    counts = sequence_counts(sequences, vocab_size)
    return 0.5 * (counts / counts.sum() - target).abs().sum().item()


def sample(sampler, model, seed=0, **kwargs):
    kwargs.setdefault("batch_size", NUM_SAMPLES)
    return sampler.run(model, generator=torch.Generator().manual_seed(seed), progress_bar=False, **kwargs)


@pytest.fixture(scope="module", params=["table", "converter"])
def tiny_dsl(request):
    """The tiny DSL model with each discrete input path (the converter one with a mask slot that no longer keeps all
    the weight at z = 0, as after DSL training, so that the two paths really differ)."""
    model = tiny_dsl_model(endpoint_inputs=request.param)
    with torch.no_grad():
        model.converter_bias[model.config.mask_token_id] = 2.0
    return model


# ---------------------------------------------------------------------------------------------------------------
# Numerics: nucleus, temperature, Gumbel-max, grids
# ---------------------------------------------------------------------------------------------------------------


def test_top_p_keeps_cumulative_mass_at_most_p_and_the_top_token():
    probs = torch.tensor([[0.0625, 0.5, 0.1875, 0.25]], dtype=torch.float64)  # sorted: .5, .25, .1875, .0625
    # cumulative (sorted) = .5, .75, .9375, 1 ; keep those <= p, always the top-1, renormalize
    assert torch.allclose(top_p_filter(probs, 0.75), torch.tensor([[0, 2 / 3, 0, 1 / 3]], dtype=torch.float64))
    expected = torch.tensor([[0, 0.5, 0.1875, 0.25]], dtype=torch.float64) / 0.9375
    assert torch.allclose(top_p_filter(probs, 0.95), expected)
    # 0.6 < 0.75: unlike HF's TopPLogitsWarper (which keeps the token that crosses p), only the top-1 survives.
    assert torch.equal(top_p_filter(probs, 0.6), torch.tensor([[0, 1.0, 0, 0]], dtype=torch.float64))
    assert torch.equal(top_p_filter(probs, 0.1), torch.tensor([[0, 1.0, 0, 0]], dtype=torch.float64))
    assert torch.equal(top_p_filter(probs, 1.0), probs)
    batch = torch.tensor([[0.5, 0.25, 0.25], [0.125, 0.125, 0.75]], dtype=torch.float64)
    assert torch.allclose(top_p_filter(batch, 0.8), torch.tensor([[2 / 3, 1 / 3, 0], [0, 0, 1]], dtype=torch.float64))


def test_temperature_and_nucleus_log_probs():
    logits = torch.tensor([[math.log(0.5), math.log(0.3), math.log(0.2)]])
    tempered = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64) ** 2
    assert torch.allclose(sampling_log_probs(logits, temperature=0.5).exp(), tempered / tempered.sum())
    # tempered: .66, .24, .11. The MDLM rule keeps the mass <= 0.8: only the top-1.
    mdlm = sampling_log_probs(logits, temperature=0.5, top_p=0.8, nucleus_rule="mdlm").exp()
    assert torch.allclose(mdlm, torch.tensor([[1.0, 0, 0]], dtype=torch.float64))
    # transformers' rule (the default) keeps the smallest set of mass >= 0.8: the top two.
    hf = sampling_log_probs(logits, temperature=0.5, top_p=0.8).exp()
    assert torch.allclose(hf, torch.cat([tempered[:2] / tempered[:2].sum(), torch.zeros(1, dtype=torch.float64)])[None])
    # top-k after temperature, before top-p; top_k=1 is the argmax.
    top2 = sampling_log_probs(logits, top_k=2).exp()
    assert torch.allclose(top2, torch.tensor([[0.5 / 0.8, 0.3 / 0.8, 0]], dtype=torch.float64))
    assert torch.equal(sampling_log_probs(logits, top_k=1).exp(), torch.tensor([[1.0, 0, 0]], dtype=torch.float64))


def keep_mass_at_least(probs, top_p):
    """transformers' nucleus, written out: in decreasing order, keep a token while the mass before it is < p."""
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    keep = (sorted_probs.cumsum(-1) - sorted_probs) < top_p
    kept = torch.zeros_like(probs).scatter_(-1, order, sorted_probs * keep)
    return kept / kept.sum(-1, keepdim=True)


def test_the_two_nucleus_rules_differ_by_the_boundary_token():
    probs = torch.tensor([[0.0625, 0.5, 0.1875, 0.25]], dtype=torch.float64)
    for top_p in (0.1, 0.6, 0.75, 0.8, 0.95):
        hf = sampling_log_probs(probs.log(), top_p=top_p).exp()
        assert torch.allclose(hf, keep_mass_at_least(probs, top_p))
        mdlm = sampling_log_probs(probs.log(), top_p=top_p, nucleus_rule="mdlm").exp()
        assert torch.allclose(mdlm, top_p_filter(probs, top_p))
    # at p = 0.6: MDLM keeps {.5}, transformers keeps {.5, .25}
    assert (sampling_log_probs(probs.log(), top_p=0.6).exp() > 0).sum() == 2
    assert (sampling_log_probs(probs.log(), top_p=0.6, nucleus_rule="mdlm").exp() > 0).sum() == 1
    warped = MDLMTopPLogitsWarper(0.6)(None, probs.log())
    assert torch.isinf(warped).sum() == 3 and warped[0, 1] == math.log(0.5)


@pytest.mark.parametrize("rule", ["transformers", "mdlm"])
def test_nucleus_through_top_candidates_keeps_what_the_full_sort_keeps(rule):
    """On a 50,257-token vocabulary with rows whose nucleus lies within the top 256, within the top 4,096, or is
    most of the vocabulary (its dropped tokens among the bottom 16,384 or not), `nucleus_kept`
    keeps exactly the full-sort set: transformers' own `TopPLogitsWarper` for "transformers", the sorted
    cumulative-mass rule for "mdlm"."""
    from transformers import TopPLogitsWarper

    generator = torch.Generator().manual_seed(0)
    scales = torch.tensor([8.0, 8.0, 3.0, 3.0, 0.3, 0.3])[:, None]  # peaked, medium, nearly flat rows
    logits = torch.randn(6, 50_257, generator=generator, dtype=torch.float64) * scales
    probs = logits.softmax(dim=-1)
    for top_p in (0.5, 0.9, 0.99):
        if rule == "transformers":
            expected = torch.isfinite(TopPLogitsWarper(top_p)(None, logits.clone()))
        else:
            expected = top_p_filter_by_full_sort(probs, top_p) > 0
        assert torch.equal(nucleus_kept(probs, top_p, rule), expected), top_p
    counts = nucleus_kept(probs, 0.9, rule).sum(dim=-1)
    assert counts[0] <= 256 < counts[2] <= 4096 < counts[4]  # every tier of the top candidates was exercised
    ascending = probs[4].sort().values
    # The flat row's dropped mass 1 - top_p (0.01 and 0.1 / 0.5) lies within the bottom 16,384 / beyond them.
    assert 0.1 < ascending[:16384].sum() < 0.5


def top_p_filter_by_full_sort(probs, top_p):
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    keep = sorted_probs.cumsum(-1) <= top_p
    keep[..., 0] = True
    return torch.zeros_like(probs).scatter_(-1, order, sorted_probs * keep)


def test_gumbel_argmax_draws_the_categorical_and_never_a_zero_probability_class():
    probs = torch.tensor([0.5, 0.3, 0.0, 0.2], dtype=torch.float64)
    uniforms = torch.rand(50_000, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    draws = gumbel_argmax(probs.log().expand(50_000, 4), uniforms)
    counts = torch.bincount(draws, minlength=4).double()
    assert counts[2] == 0
    pvalue = stats.chisquare(counts[[0, 1, 3]].numpy(), (50_000 * probs[[0, 1, 3]]).numpy()).pvalue
    assert pvalue > SIGNIFICANCE


def test_mask_class_of_an_mdlm_style_head_is_never_sampled():
    class MaskHeadToy(nn.Module):  # V + 1 outputs, the [MASK] logit by far the largest
        config = SimpleNamespace(mask_token_id=4, max_position_embeddings=6, time_conditioning=False)

        def forward(self, input_ids=None, attention_mask=None):
            logits = torch.zeros(*input_ids.shape, 5)
            logits[..., 4] = 50.0
            return SimpleNamespace(logits=logits)

    for name in ("mdlm", "remdm", "roar"):
        kwargs = {} if name == "roar" else {"num_steps": 4}
        out = sample(get_sampler(name, **kwargs), MaskHeadToy(), batch_size=64)
        assert (out.sequences < 4).all()


def test_time_and_snr_grids():
    grid = time_grid(4)
    assert grid.dtype == torch.float64 and grid[0] == 1 and grid[-1] == 1e-5 and len(grid) == 5
    for schedule in ("linear", "log-linear", "log-normal"):
        grid = snr_grid(schedule, 16, snr_max=100.0)
        assert len(grid) == 17 and grid[-1] == 100.0 and (grid.diff() > 0).all()
    assert snr_grid("linear", 4, 100.0)[0] == 0 and snr_grid("log-normal", 4, 100.0)[0] == 0
    assert torch.allclose(snr_grid("log-linear", 2, 100.0, snr_min=1.0), torch.tensor([1.0, 10.0, 100.0]).double())
    # log-normal grid = quantiles of logN(2.69, 1.41) at equally spaced levels of [0, F(100)]
    law = stats.lognorm(s=1.41, scale=math.exp(2.69))
    levels = torch.linspace(0, law.cdf(100.0), 9, dtype=torch.float64).numpy()
    assert torch.allclose(snr_grid("log-normal", 8, 100.0), torch.tensor(law.ppf(levels)), rtol=1e-9)


# ---------------------------------------------------------------------------------------------------------------
# Discrete samplers reproduce the target distribution
# ---------------------------------------------------------------------------------------------------------------

INDEPENDENT_CASES = {
    "mdlm": lambda: MDLMSampler(num_steps=8),
    "remdm-cap": lambda: ReMDMSampler(strategy="cap", eta=0.5, num_steps=8),
    "remdm-rescale": lambda: ReMDMSampler(strategy="rescale", eta=1.0, num_steps=8),
    # conf remasks the less likely values more often: exact only as sigma_max -> 0, below resolution here
    "remdm-conf": lambda: ReMDMSampler(strategy="conf", num_steps=16),
    "remdm-loop": lambda: ReMDMSampler(strategy="loop", eta=0.1, num_steps=32),  # >= 21 steps reach phase 3
    "roar": lambda: ROARSampler(),
}


@pytest.mark.parametrize("name", INDEPENDENT_CASES)
def test_discrete_samplers_reproduce_independent_marginals(independent, name):
    out = sample(INDEPENDENT_CASES[name](), independent, seed=1)
    assert chi_square_pvalue(out.sequences, independent.target, 4) > SIGNIFICANCE


# A step draws every token it unmasks independently from its per-position marginal, so on a correlated target
# MDLM / ReMDM are exact only when a step rarely unmasks two tokens: many steps, and an eta small enough that the
# remasked tokens trickle back (at sigma = sigma_max every masked token unmasks at once). conf is only
# approximately exact (its remasking depends on the token values): a TV bound, not a goodness-of-fit test.
MARKOV_CASES = {
    "mdlm": lambda: MDLMSampler(num_steps=64),
    "remdm-cap": lambda: ReMDMSampler(strategy="cap", eta=0.04, num_steps=64),
    "remdm-rescale": lambda: ReMDMSampler(strategy="rescale", eta=0.02, num_steps=64),
    "remdm-loop": lambda: ReMDMSampler(strategy="loop", eta=0.01, num_steps=128),
    "roar": lambda: ROARSampler(),
}


@pytest.mark.parametrize("name", MARKOV_CASES)
def test_discrete_samplers_reproduce_markov_chain(markov, name):
    out = sample(MARKOV_CASES[name](), markov, seed=1)
    assert chi_square_pvalue(out.sequences, markov.target, 3) > SIGNIFICANCE


def test_remdm_conf_is_close_to_the_markov_chain(markov):
    out = sample(ReMDMSampler(strategy="conf", num_steps=128), markov, seed=1)
    assert total_variation(out.sequences, markov.target, 3) < 0.04


def test_chi_square_has_power_one_step_mdlm_samples_the_product_of_marginals(markov):
    out = sample(MDLMSampler(num_steps=1), markov, seed=1)
    assert chi_square_pvalue(out.sequences, markov.target, 3) < 1e-6


def test_nucleus_and_temperature_give_the_filtered_marginals(independent):
    marginals = torch.tensor(INDEPENDENT_MARGINALS, dtype=torch.float64)
    tempered = marginals**2 / (marginals**2).sum(-1, keepdim=True)
    sequences = torch.tensor(list(itertools.product(range(4), repeat=3)))
    for rule, nucleus in (("mdlm", top_p_filter), ("transformers", keep_mass_at_least)):
        target = nucleus(tempered, 0.9).gather(1, sequences.T).prod(0)
        knobs = dict(top_p=0.9, temperature=0.5, nucleus_rule=rule)
        for sampler in (MDLMSampler(num_steps=8, **knobs), ROARSampler(**knobs)):
            out = sample(sampler, independent, seed=2)
            assert chi_square_pvalue(out.sequences, target, 4) > SIGNIFICANCE, (rule, sampler)


def conditional_target(model, fixed: dict):
    """p(x | x_i = v for i, v in fixed) over all sequences, by enumeration."""
    target = model.target.clone()
    for position, value in fixed.items():
        target[model.sequences[:, position] != value] = 0
    return target / target.sum()


@pytest.mark.parametrize("name", ["mdlm", "remdm-cap", "roar", "hybrid"])
@pytest.mark.parametrize("fixed", [{0: 2}, {1: 0}], ids=["prefix", "infill"])
def test_conditioning_reproduces_the_exact_conditional(markov, name, fixed):
    input_ids = torch.full((NUM_SAMPLES, 3), 3)
    for position, value in fixed.items():
        input_ids[:, position] = value
    kwargs = {
        "mdlm": {"num_steps": 64},
        "remdm-cap": {"num_steps": 64, "eta": 0.5},
        "roar": {},
        # commit nothing (threshold 1, at an s* low enough that no probability rounds to 1) and keep no evidence:
        # the discrete phase restarts from all-[MASK] and must be exact (with evidence it would inherit the 2-step
        # SDE's error at every position)
        "hybrid": {"num_steps": 66, "continuous_steps": 2, "snr_star": 10.0, "commit_threshold": 1.0,
                   "commit_mode": "sample"},
    }[name]
    out = sample(get_sampler(name, **kwargs), markov, seed=3, input_ids=input_ids)
    for position, value in fixed.items():
        assert (out.sequences[:, position] == value).all()
    assert chi_square_pvalue(out.sequences, conditional_target(markov, fixed), 3) > SIGNIFICANCE


# ---------------------------------------------------------------------------------------------------------------
# The SDE converges as the grid is refined, and fails with a wrong drift
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("toy_name,schedule", [("independent", "log-linear"), ("markov", "log-linear"), ("markov", "log-normal"), ("markov", "linear")])
def test_sde_converges_as_the_grid_is_refined(request, toy_name, schedule):
    toy = request.getfixturevalue(toy_name)
    vocab_size = toy.config.vocab_size
    distances = []
    for num_steps in (4, 16, 64):
        out = sample(DSLSDESampler(num_steps=num_steps, snr_schedule=schedule), toy, seed=4)
        assert out.nfe == num_steps + 1
        distances.append(total_variation(out.sequences, toy.target, vocab_size))
    assert distances[0] > distances[1] > distances[2], distances
    assert distances[0] > 2.5 * distances[2], distances  # Euler-Maruyama: roughly O(1/K)
    if schedule != "linear":  # the linear grid wastes steps at high SNR: slower, but still converging
        assert distances[2] < 0.05, distances


@pytest.mark.parametrize("toy_name", ["independent", "markov"])
def test_sde_with_a_wrong_drift_fails_visibly(request, toy_name):
    toy = request.getfixturevalue(toy_name)
    vocab_size = toy.config.vocab_size
    right = total_variation(sample(DSLSDESampler(num_steps=64), toy, seed=4).sequences, toy.target, vocab_size)
    toy.drift_scale = 0.3
    try:
        wrong = total_variation(sample(DSLSDESampler(num_steps=64), toy, seed=4).sequences, toy.target, vocab_size)
    finally:
        toy.drift_scale = 1.0
    assert wrong > 0.15 and wrong > 4 * right, (wrong, right)


def test_sde_intermediate_state_has_the_law_of_the_localization_channel(markov):
    """z_s of the SL SDE is distributed as s e_x + sqrt(s) eps with x ~ p: compare the first two moments with
    draws from the channel itself (toy.noisy_states) at s = 4."""
    captured = {}
    grid = snr_grid("log-linear", 64, snr_max=4.0)

    def keep_last_state(step_index, state):
        captured["z"] = state.z

    sample(DSLSDESampler(num_steps=64), markov, seed=5, snr_grid=grid, callback=keep_last_state)
    sde_states = captured["z"].double()
    reference_tokens = markov.sequences[torch.multinomial(markov.target, NUM_SAMPLES, replacement=True)]
    reference = markov.noisy_states(reference_tokens, 4.0, generator=torch.Generator().manual_seed(6)).double()
    standard_error = reference.std(dim=0) / math.sqrt(NUM_SAMPLES)
    assert ((sde_states.mean(0) - reference.mean(0)).abs() < 5 * math.sqrt(2) * standard_error).all()
    assert torch.allclose(sde_states.var(0), reference.var(0), rtol=0.1)


def test_sde_per_token_grids(markov):
    """A per-token grid (position 0 on a log-normal grid, the others log-linear) is still exact in the limit."""
    grids = torch.stack(
        [snr_grid("log-normal", 64, 100.0), snr_grid("log-linear", 64, 100.0), snr_grid("log-linear", 64, 100.0)]
    )
    out = sample(DSLSDESampler(), markov, seed=4, snr_grid=grids)
    assert out.nfe == 65
    assert total_variation(out.sequences, markov.target, 3) < 0.05
    with pytest.raises(ValueError, match="does not fit"):
        sample(DSLSDESampler(), markov, snr_grid=torch.stack([grids[0]] * 5))
    with pytest.raises(ValueError, match="non-decreasing"):
        sample(DSLSDESampler(), markov, snr_grid=grids.flip(-1))


# ---------------------------------------------------------------------------------------------------------------
# ReMDM sigma schedules and the hybrid commit, on hand-computed values
# ---------------------------------------------------------------------------------------------------------------


def discrete_state(tokens, confidences, mask_token_id=9):
    tokens = torch.tensor(tokens)
    return SimpleNamespace(
        tokens=tokens,
        generatable=torch.ones_like(tokens, dtype=torch.bool),
        confidences=torch.tensor(confidences, dtype=torch.float64),
        mask_token_id=mask_token_id,
    )


def test_remdm_sigma_schedules_by_hand():
    t, s = torch.tensor([[0.5]], dtype=torch.float64), torch.tensor([[0.25]], dtype=torch.float64)
    state = discrete_state([[1, 9, 2, 3]], [[0.9, 0.0, 0.5, 0.2]])
    sigma_max = 0.25 / 0.5  # min(1, (1 - alpha_s) / alpha_t) with alpha_t = .5, alpha_s = .75
    _, _, sigma = ReMDMSampler(strategy="cap", eta=0.3).schedule(t, s, state)
    assert sigma.item() == pytest.approx(0.3)
    _, _, sigma = ReMDMSampler(strategy="cap", eta=0.8).schedule(t, s, state)
    assert sigma.item() == pytest.approx(sigma_max)
    _, _, sigma = ReMDMSampler(strategy="rescale", eta=0.4).schedule(t, s, state)
    assert sigma.item() == pytest.approx(0.4 * sigma_max)
    alpha_t, alpha_s, sigma = ReMDMSampler(strategy="conf").schedule(t, s, state)
    weights = torch.tensor([math.exp(-0.9), 0.0, math.exp(-0.5), math.exp(-0.2)])
    expected = sigma_max * weights / weights.sum()  # softmax(-psi) over the decoded positions only
    assert torch.allclose(sigma.float(), expected[None], atol=1e-7)
    assert (alpha_t.item(), alpha_s.item()) == (0.5, 0.75)
    _, _, sigma = MDLMSampler().schedule(t, s, state)
    assert sigma.item() == 0


def test_remdm_loop_schedule_by_hand():
    sampler = ReMDMSampler(strategy="loop", eta=0.02, t_on=0.5, t_off=0.1, alpha_on=0.8)

    def at(t, s):
        tensors = (torch.tensor([[t]], dtype=torch.float64), torch.tensor([[s]], dtype=torch.float64))
        return [value.item() for value in sampler.schedule(*tensors, None)]

    assert at(1.0, 0.75) == pytest.approx([0.0, 0.4, 0.0])  # phase 1: alpha = 0.8 (1 - t) / (1 - 0.5)
    assert at(0.75, 0.45) == pytest.approx([0.4, 0.8, 0.0])  # reaches alpha_on at t_on, never beyond
    assert at(0.45, 0.3) == pytest.approx([0.8, 0.8, 0.02])  # phase 2: alpha held, remasking at eta
    assert at(0.15, 0.05) == pytest.approx([0.8, 0.8, 0.02])  # phase chosen by the step's start time
    assert at(0.1, 0.05) == pytest.approx([0.8, 0.9, 0.0])  # phase 3: alpha = 1 - 0.2 t / 0.1


def test_remdm_loop_warns_when_the_grid_never_reaches_phase_3(independent, caplog):
    with caplog.at_level("WARNING"):
        sample(ReMDMSampler(strategy="loop", num_steps=16), independent, batch_size=2)
    assert "num_steps >= 21" in caplog.text


def test_hybrid_commit_rules_by_hand():
    logits = torch.tensor([[[5.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 1.0]]]).log_softmax(-1)
    probs = logits.double().exp().max(-1).values  # .987, .333, .909, .576
    state = SimpleNamespace(
        tokens=torch.full((1, 4), 3), generatable=torch.ones(1, 4, dtype=torch.bool), confidences=torch.zeros(1, 4).double()
    )
    tokens, confidences = HybridSampler(commit_threshold=0.9, commit_mode="argmax").commit(state, logits, mask_token_id=3)
    assert tokens.tolist() == [[0, 3, 1, 3]]
    assert torch.allclose(confidences, torch.tensor([[probs[0, 0], 0, probs[0, 2], 0]]).double())
    top_three = HybridSampler(commit_rule="top_fraction", commit_fraction=0.75, commit_mode="argmax")
    assert top_three.commit(state, logits, 3)[0].tolist() == [[0, 3, 1, 2]]  # the 3 most confident of 4 positions
    nothing = HybridSampler(commit_rule="top_fraction", commit_fraction=0.0, commit_mode="argmax")
    assert nothing.commit(state, logits, 3)[0].tolist() == [[3, 3, 3, 3]]


@pytest.mark.parametrize("commit_mode", ["evidence", "sample"])
def test_hybrid_sampling_commit_draws_from_the_posterior_at_the_committed_positions(commit_mode):
    """The same two positions in 20,000 rows: position 0 (max probability 0.92 >= 0.9) is committed with a token
    drawn from p(x | z), whose frequencies pass a chi-square test, and psi is the drawn token's probability;
    position 1 (max 0.5) stays masked. The argmax commit would put all the mass on token 0."""
    probs = torch.tensor([[0.92, 0.05, 0.03], [0.5, 0.3, 0.2]], dtype=torch.float64)
    rows = 20_000
    logits = probs.log().float()[None].expand(rows, -1, -1)
    state = SimpleNamespace(
        tokens=torch.full((rows, 2), 3),
        generatable=torch.ones(rows, 2, dtype=torch.bool),
        confidences=torch.zeros(rows, 2, dtype=torch.float64),
        noise=NoiseSource(torch.Generator().manual_seed(0), rows, torch.device("cpu")),
    )
    tokens, confidences = HybridSampler(commit_threshold=0.9, commit_mode=commit_mode).commit(state, logits, 3)
    assert (tokens[:, 1] == 3).all() and (confidences[:, 1] == 0).all()
    counts = torch.bincount(tokens[:, 0], minlength=3).double()
    assert stats.chisquare(counts.numpy(), (probs[0] * rows).numpy()).pvalue > SIGNIFICANCE
    torch.testing.assert_close(confidences[:, 0], probs[0][tokens[:, 0]].double(), rtol=1e-6, atol=1e-7)


def test_evidence_denoiser_shows_tokens_kept_evidence_and_masks():
    """Per position: s_hi e_x at a token, the kept z at a masked position with evidence, 0 at a masked position
    without; evidence is spent once its position is decoded (a later remask shows 0), and a cached call reuses
    the logits without a forward pass."""
    seen = []

    class Recorder(nn.Module):
        config = SimpleNamespace(mask_token_id=4, vocab_size=4)
        directions = F.normalize(torch.arange(1.0, 13.0).view(4, 3), dim=-1)

        def forward(self, noisy_states=None, attention_mask=None, input_ids=None):
            assert input_ids is None, "the evidence path feeds noisy states only"
            seen.append(noisy_states.clone())
            return SimpleNamespace(logits=torch.zeros(*noisy_states.shape[:2], 4))

        def token_directions(self):
            return self.directions

    model = Recorder()
    evidence = torch.randn(1, 4, 3, generator=torch.Generator().manual_seed(0))
    denoiser = EvidenceDenoiser(
        model, None, evidence_states=evidence, evidence_positions=torch.tensor([[False, True, True, False]]),
        s_hi=50.0, use_cache=True,
    )
    denoiser.from_tokens(torch.tensor([[2, 4, 4, 4]]))  # a token, two masked with evidence, one without
    torch.testing.assert_close(seen[-1][0, 0], 50.0 * model.directions[2])
    torch.testing.assert_close(seen[-1][0, 1:3], evidence[0, 1:3])
    assert torch.equal(seen[-1][0, 3], torch.zeros(3))
    denoiser.from_tokens(torch.tensor([[2, 1, 4, 4]]))  # position 1 decoded
    torch.testing.assert_close(seen[-1][0, 1], 50.0 * model.directions[1])
    denoiser.from_tokens(torch.tensor([[2, 4, 4, 4]]))  # position 1 remasked: its evidence is spent
    assert torch.equal(seen[-1][0, 1], torch.zeros(3)) and torch.equal(seen[-1][0, 2], evidence[0, 2])
    denoiser.from_tokens(torch.tensor([[2, 4, 4, 4]]))
    assert denoiser.nfe == len(seen) == 3, "an unchanged state reuses the cached logits"


def test_hybrid_evidence_commit_is_exact_on_a_product_law_and_the_others_are_biased(independent):
    """T = 64 on the exact denoiser of the independent law, 20,000 samples, the default threshold commit at s* = 5
    after 32 linear SDE steps (accurate enough that its Euler error stays below the test's resolution). Keeping the
    uncommitted positions' evidence passes the chi-square test of the joint law; without it ("sample") or with
    the argmax ("argmax") the commit is badly biased, because the confidence rule selects positions by their
    noisy state. (At the default s* = 10 on a log-linear grid of 32 steps the SDE's own Euler error, total
    variation ~0.03 whatever the commit, fails the test at this size.)"""
    knobs = dict(num_steps=64, continuous_steps=32, snr_star=5.0, snr_schedule="linear", use_cache=True)
    pvalues, distances = {}, {}
    for commit_mode in ("evidence", "sample", "argmax"):
        independent.calls = 0
        out = sample(HybridSampler(commit_mode=commit_mode, **knobs), independent, seed=11, batch_size=20_000)
        assert out.nfe == independent.calls
        pvalues[commit_mode] = chi_square_pvalue(out.sequences, independent.target, 4)
        distances[commit_mode] = total_variation(out.sequences, independent.target, 4)
    assert pvalues["evidence"] > SIGNIFICANCE, (pvalues, distances)
    assert pvalues["sample"] < 1e-10 and pvalues["argmax"] < 1e-10, (pvalues, distances)
    assert distances["sample"] > 3 * distances["evidence"] and distances["argmax"] > 3 * distances["evidence"]


def test_hybrid_nfe_and_trajectory(markov, discrete_steps):
    full = HybridSampler(num_steps=12, continuous_steps=4, snr_star=20.0, use_cache=False, logits_where_needed=False)
    out = sample(full, markov, batch_size=8, return_trajectory=True)
    # full logits: T_c SDE steps + the commit posterior + T_d discrete steps (+ at most one noise-removal call)
    assert out.nfe in (4 + 1 + 8, 4 + 1 + 8 + 1)
    assert len(out.trajectory) == 12 and torch.equal(out.trajectory[-1], out.sequences)
    # logits where needed: only the discrete steps that unmask a position (and the noise removal) call
    discrete_steps.clear()
    kept = sample(HybridSampler(num_steps=12, continuous_steps=4, snr_star=20.0, use_cache=False), markov, batch_size=8)
    unmasking = sum(bool(drawn_positions(before, after, 3).any()) for before, after in discrete_steps)
    assert kept.nfe == 4 + 1 + unmasking <= out.nfe and torch.equal(kept.sequences, out.sequences)


def test_hybrid_with_a_near_clean_commit_converges_as_the_continuous_phase_is_refined(independent):
    """Committing at s* = 100 with threshold 0.999 keeps the SDE's tokens, which converge as T_c grows; the few
    uncommitted positions are finished by exact MDLM with their evidence. On the log-linear grid, whose Euler error
    on this product law the bound was set for (the log-normal default starts with a coarse step from s = 0)."""
    distances = []
    for continuous_steps in (4, 16, 64):
        sampler = HybridSampler(num_steps=continuous_steps + 8, continuous_steps=continuous_steps, snr_star=100.0,
                                commit_threshold=0.999, snr_schedule="log-linear")
        distances.append(total_variation(sample(sampler, independent, seed=7).sequences, independent.target, 4))
    assert distances[0] > distances[1] > distances[2] and distances[2] < 0.04, distances


# ---------------------------------------------------------------------------------------------------------------
# Cache, conditioning, batching, determinism, outputs
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mdlm", "remdm-cap", "remdm-loop"])
def test_cache_gives_identical_samples_with_fewer_real_calls(markov, name):
    """With full logits every step calls the network, unless its tokens are those of the previous call. (With
    `logits_where_needed` a step calls only when a position unmasks, which changes the tokens: see
    test_a_step_that_unmasks_nothing_makes_no_network_call.)"""
    results = {}
    for use_cache in (True, False):
        markov.calls = 0
        sampler = get_sampler(name, num_steps=64, use_cache=use_cache, logits_where_needed=False)
        out = sample(sampler, markov, seed=8, batch_size=3)
        assert out.nfe == markov.calls  # NFE counts real network calls
        results[use_cache] = out
    assert torch.equal(results[True].sequences, results[False].sequences)
    assert results[True].nfe < results[False].nfe
    assert results[False].nfe in (64, 65)


ALL_SAMPLERS = {
    "mdlm": lambda: MDLMSampler(num_steps=8),
    "remdm-rescale": lambda: ReMDMSampler(strategy="rescale", eta=1.0, num_steps=8),  # remasks the most
    "remdm-conf": lambda: ReMDMSampler(strategy="conf", num_steps=8),
    "remdm-loop": lambda: ReMDMSampler(strategy="loop", eta=0.1, num_steps=24),
    "remdm-s_hi": lambda: ReMDMSampler(strategy="cap", num_steps=8, s_hi=30.0),
    "dsl-sde": lambda: DSLSDESampler(num_steps=8),
    "hybrid": lambda: HybridSampler(num_steps=8, commit_rule="top_fraction"),
    "roar": lambda: ROARSampler(),
    "confidence": lambda: ConfidenceSampler(num_steps=8, confidence_threshold=0.05),
    "confidence-budget": lambda: ConfidenceSampler(confidence_rule="budget", tokens_per_step=3, num_steps=16),
}


def row_generators(seeds):
    return [torch.Generator().manual_seed(seed) for seed in seeds]


@pytest.mark.parametrize("name", ALL_SAMPLERS)
def test_fixed_tokens_never_change_and_no_mask_is_left(tiny_dsl, name):
    mask = tiny_dsl.config.mask_token_id
    input_ids = torch.randint(0, 32, (4, 24), generator=torch.Generator().manual_seed(0))
    input_ids[:, 6:] = mask  # prefix of 6 tokens
    input_ids[2:, 10:14] = 5  # rows 2, 3: a fixed span inside the generated part (infilling)
    out = ALL_SAMPLERS[name]().run(tiny_dsl, input_ids, generator=row_generators(range(4)), progress_bar=False)
    fixed = input_ids != mask
    assert torch.equal(out.sequences[fixed], input_ids[fixed])
    assert (out.sequences < 32).all()


# The confidence sampler orders positions by their logits: the tiny random model gives many masked positions the
# same top probability up to float rounding, which left padding changes (~4e-8), so a row's order may differ.
@pytest.mark.parametrize("name", [name for name in ALL_SAMPLERS if not name.startswith("confidence")])
def test_a_row_of_a_left_padded_batch_equals_the_row_alone(tiny_dsl, name):
    mask, pad = tiny_dsl.config.mask_token_id, 0
    prompts = [[3, 1, 4, 1, 5], [9, 2], [6, 5, 3, 5]]
    new_tokens = 12
    width = max(map(len, prompts)) + new_tokens
    batch = torch.full((3, width), pad)
    attention_mask = torch.zeros(3, width, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        sequence = torch.tensor(prompt + [mask] * new_tokens)
        batch[row, width - len(sequence) :] = sequence
        attention_mask[row, width - len(sequence) :] = 1
    seeds = [11, 12, 13]
    sampler = ALL_SAMPLERS[name]()
    batched = sampler.run(tiny_dsl, batch, attention_mask, generator=row_generators(seeds), progress_bar=False)
    for row, prompt in enumerate(prompts):
        alone_input = torch.tensor([prompt + [mask] * new_tokens])
        alone = sampler.run(tiny_dsl, alone_input, generator=row_generators(seeds[row : row + 1]), progress_bar=False)
        assert torch.equal(batched.sequences[row, width - alone_input.shape[1] :], alone.sequences[0])
        assert (batched.sequences[row, : width - alone_input.shape[1]] == pad).all()


@pytest.mark.parametrize("name", ALL_SAMPLERS)
def test_same_seed_same_samples(tiny_dsl, name):
    sampler = ALL_SAMPLERS[name]()
    runs = [
        sampler.run(tiny_dsl, batch_size=3, seq_len=16, generator=torch.Generator().manual_seed(seed), progress_bar=False)
        for seed in (0, 0, 1)
    ]
    assert torch.equal(runs[0].sequences, runs[1].sequences) and runs[0].nfe == runs[1].nfe
    assert not torch.equal(runs[0].sequences, runs[2].sequences)


# Every discrete sampler: MDLM, each ReMDM strategy, the hybrid's discrete phase with each commit mode (and with
# ReMDM), and ROAR; T = 24 steps (the hybrid: 12 discrete) for the 16 positions of each row of `prompted_batch`.
DISCRETE_SAMPLERS = {
    "mdlm": lambda: MDLMSampler(num_steps=24),
    "remdm-cap": lambda: ReMDMSampler(strategy="cap", eta=0.5, num_steps=24),
    "remdm-rescale": lambda: ReMDMSampler(strategy="rescale", eta=1.0, num_steps=24),  # remasks the most
    "remdm-conf": lambda: ReMDMSampler(strategy="conf", num_steps=24),
    "remdm-loop": lambda: ReMDMSampler(strategy="loop", eta=0.1, num_steps=24),
    "remdm-s_hi": lambda: ReMDMSampler(strategy="cap", num_steps=24, s_hi=30.0),
    "hybrid-evidence": lambda: HybridSampler(num_steps=24, commit_rule="top_fraction", commit_mode="evidence"),
    "hybrid-sample": lambda: HybridSampler(num_steps=24, commit_rule="top_fraction", commit_mode="sample"),
    "hybrid-argmax": lambda: HybridSampler(num_steps=24, commit_rule="top_fraction", commit_mode="argmax"),
    "hybrid-remdm-conf": lambda: HybridSampler(num_steps=24, commit_rule="top_fraction", discrete_strategy="conf"),
    "roar": lambda: ROARSampler(),
}


def prompted_batch(mask_token_id):
    """3 rows of 20 positions, a 4-token prompt: fixed positions never need logits."""
    input_ids = torch.full((3, 20), mask_token_id)
    input_ids[:, :4] = torch.tensor([3, 1, 4, 1])
    return input_ids


class ForwardRecorder:
    """Wraps a model's forward (as an instance attribute) and records every call: `logits_to_keep` when it is a
    `[batch, length]` map (None when every position's logits were asked for) and `input_ids` (None on the noisy-
    states path)."""

    def __init__(self, model):
        self.model, self.calls = model, []

    def __enter__(self):
        forward = self.model.forward

        def recording_forward(*args, logits_to_keep=0, input_ids=None, **kwargs):
            kept = logits_to_keep.clone() if torch.is_tensor(logits_to_keep) else None
            self.calls.append(SimpleNamespace(keep=kept, input_ids=None if input_ids is None else input_ids.clone()))
            return forward(*args, logits_to_keep=logits_to_keep, input_ids=input_ids, **kwargs)

        self.model.forward = recording_forward
        return self

    def __exit__(self, *exc):
        del self.model.forward


@pytest.fixture
def discrete_steps(monkeypatch):
    """Records every discrete step and final noise removal of a run (the hybrid's discrete phase included), in
    order: (tokens before, tokens after)."""
    events = []
    step, remove_noise = MDLMSampler.step, MDLMSampler.remove_noise

    def recording(method):
        def recorded(self, state, logits):
            after = method(self, state, logits)
            events.append((state.tokens.clone(), after.tokens.clone()))
            return after

        return recorded

    monkeypatch.setattr(MDLMSampler, "step", recording(step))
    monkeypatch.setattr(MDLMSampler, "remove_noise", recording(remove_noise))
    return events


def drawn_positions(before, after, mask_token_id):
    """The positions whose token changed from `[MASK]`: where a step (or the noise removal) drew a token."""
    return (before == mask_token_id) & (after != mask_token_id)


@pytest.mark.parametrize("name", DISCRETE_SAMPLERS)
def test_logits_only_where_needed_draw_the_same_samples_as_full_logits(tiny_dsl, name):
    """`logits_where_needed` (the default) gives the very same samples and confidences as full logits under the
    same seeds, with no more network calls (fewer whenever a step unmasks nothing), and the output head runs on
    far fewer positions (ROAR: one per row and call, the same calls)."""
    input_ids = prompted_batch(tiny_dsl.config.mask_token_id)
    runs = {}
    for where_needed in (False, True):
        sampler = DISCRETE_SAMPLERS[name]()
        sampler.config.logits_where_needed = where_needed
        with ForwardRecorder(tiny_dsl) as recorder:
            out = sampler.run(
                tiny_dsl, input_ids, generator=row_generators([5, 6, 7]), return_confidences=True, progress_bar=False
            )
        assert out.nfe == len(recorder.calls)
        positions = sum(input_ids.numel() if call.keep is None else int(call.keep.sum()) for call in recorder.calls)
        runs[where_needed] = (out, positions)
    (full, full_positions), (kept, kept_positions) = runs[False], runs[True]
    assert torch.equal(kept.sequences, full.sequences)
    # the output head on a subset of positions may round differently in the last bit
    torch.testing.assert_close(kept.confidences, full.confidences)
    assert kept_positions < full_positions
    if name == "roar":
        assert kept.nfe == full.nfe and kept_positions == 3 * 16  # one position per row and call
    else:
        assert kept.nfe <= full.nfe


@pytest.mark.parametrize("name", [name for name in DISCRETE_SAMPLERS if name != "roar"])
def test_each_call_asks_for_the_logits_of_the_positions_its_step_unmasks(tiny_dsl, discrete_steps, name):
    """Every discrete network call asks for logits exactly at the positions whose token changes from `[MASK]` in
    its step (for the last call, the noise removal's), on the tokens that step starts from; a step that unmasks
    nothing makes no call. So NFE = (steps that unmask something) + (the noise removal, if a `[MASK]` was left),
    plus the hybrid's T_c SDE calls and its commit call. (Without the output cache, whose hits would only remove
    calls: see test_denoiser_skips_calls_that_need_no_logits_and_reuses_covering_ones.) One row over T = 64
    steps, so that some steps unmask nothing."""
    mask = tiny_dsl.config.mask_token_id
    input_ids = prompted_batch(mask)[:1]
    sampler = DISCRETE_SAMPLERS[name]()
    sampler.config = dataclasses.replace(sampler.config, num_steps=64, use_cache=False)
    with ForwardRecorder(tiny_dsl) as recorder:
        out = sampler.run(tiny_dsl, input_ids, generator=row_generators([5]), progress_bar=False)
    discrete_calls = [call for call in recorder.calls if call.keep is not None]
    continuous_calls = len(recorder.calls) - len(discrete_calls)
    expected = [(before, drawn_positions(before, after, mask)) for before, after in discrete_steps]
    expected = [(before, drawn) for before, drawn in expected if drawn.any()]
    assert len(discrete_calls) == len(expected) < len(discrete_steps)  # some steps unmask nothing: no call
    for call, (before, drawn) in zip(discrete_calls, expected):
        assert torch.equal(call.keep, drawn)
        if call.input_ids is not None:  # the hybrid's evidence mode shows noisy states instead
            assert torch.equal(call.input_ids, before)
    assert continuous_calls == (sampler.config.continuous_steps + 1 if name.startswith("hybrid") else 0)
    assert out.nfe == continuous_calls + len(expected)


@pytest.mark.parametrize("name", ["mdlm", "remdm-cap", "remdm-loop"])
def test_a_step_that_unmasks_nothing_makes_no_network_call(markov, discrete_steps, name):
    """One row of 3 positions over T = 64 steps: most steps unmask nothing and make no call, even on a model
    without `logits_to_keep` (the toy, which computes every position whenever it is called). NFE is the number of
    steps that unmask (+ the noise removal if a `[MASK]` was left); with full logits (and no cache) it is T (+ 1).
    Without the cache, whose hits would only remove calls."""
    nfe = {}
    for where_needed in (True, False):
        discrete_steps.clear()
        markov.calls = 0
        sampler = get_sampler(name, num_steps=64, logits_where_needed=where_needed, use_cache=False)
        out = sample(sampler, markov, seed=9, batch_size=1)
        assert out.nfe == markov.calls
        assert len(discrete_steps) in (64, 65)  # every step ran (and the noise removal, when needed)
        nfe[where_needed] = out.nfe
        if where_needed:
            unmasking = sum(bool(drawn_positions(before, after, 3).any()) for before, after in discrete_steps)
            assert out.nfe == unmasking
        else:
            assert out.nfe == len(discrete_steps)
    assert nfe[True] < nfe[False]
    if name == "mdlm":  # no remasking: each position unmasks once, in at most 3 steps (+ the removal)
        assert nfe[True] <= 4


def test_step_without_a_plan_draws_what_the_planned_step_draws(tiny_dsl):
    """`step(state, full_logits)` in a user's own loop plans the step itself: the same tokens and confidences as
    `plan_step`, then the logits of the unmasking positions only (`Denoiser.from_tokens(tokens, keep)`)."""
    sampler = ReMDMSampler(strategy="conf", num_steps=6)
    inputs = prepare_inputs(tiny_dsl, batch_size=2, seq_len=10)
    mask = tiny_dsl.config.mask_token_id
    states = [
        sampler.init_state(inputs, NoiseSource(torch.Generator().manual_seed(4), 2, torch.device("cpu")), mask)
        for _ in range(2)
    ]
    denoiser = Denoiser(tiny_dsl, None)
    with torch.no_grad():
        for _ in range(6):
            unplanned, planned = states
            unplanned = sampler.step(unplanned, tiny_dsl(input_ids=unplanned.tokens).logits)
            planned = sampler.plan_step(planned)
            assert planned.plan is not None and not (planned.plan.unmask & planned.plan.remask).any()
            planned = sampler.step(planned, denoiser.from_tokens(planned.tokens, sampler.logits_needed(planned)))
            assert planned.plan is None  # consumed
            assert torch.equal(unplanned.tokens, planned.tokens)
            torch.testing.assert_close(unplanned.confidences, planned.confidences)
            states = [unplanned, planned]
    assert (planned.tokens != mask).any() and denoiser.nfe <= 6
    # the last step (to t_min) unmasks nearly every masked position: logits that do not cover them are an error
    noise = NoiseSource(torch.Generator().manual_seed(0), 2, torch.device("cpu"))
    last = sampler.plan_step(dataclasses.replace(sampler.init_state(inputs, noise, mask), step_index=5))
    assert last.plan.unmask.any()
    empty = Denoiser(tiny_dsl, None).from_tokens(last.tokens, torch.zeros_like(last.tokens, dtype=torch.bool))
    with pytest.raises(RuntimeError, match="not computed"):
        sampler.step(last, empty)


def test_denoiser_skips_calls_that_need_no_logits_and_reuses_covering_ones(tiny_dsl):
    """`from_tokens(tokens, keep)`: no call (an empty KeptLogits, no NFE) when `keep` selects nothing; with the
    cache, the previous logits when the tokens are unchanged and `keep` lies within the positions it computed."""
    mask = tiny_dsl.config.mask_token_id
    tokens = torch.tensor([[3, mask, mask, mask], [mask, 5, mask, mask]])
    nothing = torch.zeros_like(tokens, dtype=torch.bool)
    some = torch.tensor([[False, True, True, False], [True, False, False, False]])
    with ForwardRecorder(tiny_dsl) as recorder:
        denoiser = Denoiser(tiny_dsl, None, use_cache=True)
        empty = denoiser.from_tokens(tokens, nothing)
        assert denoiser.nfe == 0 and recorder.calls == [] and empty.values.shape == (0, 0)
        assert empty[nothing].numel() == 0
        with pytest.raises(RuntimeError, match="not computed"):
            empty[some]
        logits = denoiser.from_tokens(tokens, some)
        assert denoiser.nfe == 1 and torch.equal(recorder.calls[-1].keep, some) and logits.values.shape == (3, 32)
        subset = some & torch.tensor([[False, True, False, False], [True, False, False, False]])
        assert denoiser.from_tokens(tokens, subset) is logits and denoiser.nfe == 1  # covered: reused
        assert denoiser.from_tokens(tokens, nothing) is logits and denoiser.nfe == 1
        beyond = some | (tokens == mask)
        denoiser.from_tokens(tokens, beyond)  # a position not computed: a call
        assert denoiser.nfe == 2 and torch.equal(recorder.calls[-1].keep, beyond)
        denoiser.from_tokens(tokens)  # every position asked for: a call
        changed = tokens.clone()
        changed[0, 1] = 7
        full = denoiser.from_tokens(changed)
        assert denoiser.nfe == 4 and torch.is_tensor(full)
        assert denoiser.from_tokens(changed, some) is full and denoiser.nfe == 4  # full logits cover any keep
        no_cache = Denoiser(tiny_dsl, None)
        no_cache.from_tokens(tokens, some)
        no_cache.from_tokens(tokens, some)
        assert no_cache.from_tokens(tokens, nothing).values.shape == (0, 0) and no_cache.nfe == 2


def test_evidence_is_spent_at_every_step_not_only_at_network_calls():
    """In the hybrid's evidence mode a position decoded in a step that makes no call, then remasked, comes back
    at 0 (its evidence spent), even when the tokens are back to those of the cached call."""
    seen = []

    class Recorder(nn.Module):
        config = SimpleNamespace(mask_token_id=4, vocab_size=4)
        directions = F.normalize(torch.arange(1.0, 13.0).view(4, 3), dim=-1)

        def forward(self, noisy_states=None, attention_mask=None):
            seen.append(noisy_states.clone())
            return SimpleNamespace(logits=torch.zeros(*noisy_states.shape[:2], 4))

        def token_directions(self):
            return self.directions

    evidence = torch.randn(1, 4, 3, generator=torch.Generator().manual_seed(0))
    denoiser = EvidenceDenoiser(
        Recorder(), None, evidence_states=evidence, evidence_positions=torch.ones(1, 4, dtype=torch.bool),
        s_hi=50.0, use_cache=True,
    )
    masked = torch.tensor([[4, 4, 4, 4]])
    denoiser.from_tokens(masked, torch.tensor([[True, False, False, False]]))
    torch.testing.assert_close(seen[-1][0, 1], evidence[0, 1])
    denoiser.from_tokens(torch.tensor([[4, 2, 4, 4]]), torch.zeros(1, 4, dtype=torch.bool))  # no call
    assert denoiser.nfe == 1
    denoiser.from_tokens(masked, torch.tensor([[True, False, False, False]]))  # position 1 remasked
    assert denoiser.nfe == 2, "the cached logits were computed with position 1's evidence: stale"
    assert torch.equal(seen[-1][0, 1], torch.zeros(3)) and torch.equal(seen[-1][0, 2], evidence[0, 2])


def test_trajectory_callback_and_confidences(independent):
    steps = []
    out = sample(
        MDLMSampler(num_steps=6),
        independent,
        batch_size=500,
        return_trajectory=True,
        return_confidences=True,
        callback=lambda step_index, state: steps.append(step_index),
    )
    assert steps == list(range(6)) and len(out.trajectory) == 6
    assert torch.equal(out.trajectory[-1], out.sequences)
    masked_counts = [int((draft == 4).sum()) for draft in out.trajectory]
    assert masked_counts == sorted(masked_counts, reverse=True)  # MDLM never remasks
    # independent tokens: psi = p_i(token) exactly
    marginals = torch.tensor(INDEPENDENT_MARGINALS)
    expected = marginals[torch.arange(3), out.sequences]
    assert torch.allclose(out.confidences, expected, atol=1e-6)


def test_roar_calls_once_per_generated_position(independent):
    input_ids = torch.tensor([[4, 1, 4], [4, 4, 4]])
    attention_mask = torch.tensor([[1, 1, 1], [1, 1, 1]])
    out = ROARSampler().run(independent, input_ids, attention_mask, progress_bar=False, return_trajectory=True)
    assert out.nfe == 3 and len(out.trajectory) == 3
    assert (out.trajectory[0] == 4).sum() == 2 + 1  # one position revealed per row per step
    assert out.sequences[0, 1] == 1


# ---------------------------------------------------------------------------------------------------------------
# Validation of every knob
# ---------------------------------------------------------------------------------------------------------------

INVALID = [
    (MDLMConfig, {"num_steps": 0}, ValueError, r"num_steps=0 must be >= 1"),
    (MDLMConfig, {"num_steps": 2.5}, TypeError, r"num_steps must be an int"),
    (MDLMConfig, {"t_min": 0.0}, ValueError, r"t_min=0.0 is outside the accepted range \(0.0, 1.0\)"),
    (MDLMConfig, {"use_cache": "yes"}, TypeError, r"use_cache must be True or False, got 'yes'"),
    (HybridConfig, {"use_cache": 1}, TypeError, r"use_cache must be True or False"),
    (SamplingConfig, {"top_p": 0.0}, ValueError, r"top_p=0.0 is outside the accepted range \(0.0, 1.0\]"),
    (SamplingConfig, {"top_p": 1.5}, ValueError, r"top_p=1.5"),
    (SamplingConfig, {"temperature": 0}, ValueError, r"temperature=0 is outside"),
    (SamplingConfig, {"s_hi": -1.0}, ValueError, r"s_hi=-1.0"),
    (ReMDMConfig, {"strategy": "max"}, ValueError, r"strategy='max' is not supported; accepted: 'cap', 'rescale'"),
    (ReMDMConfig, {"eta": 1.5}, ValueError, r"eta=1.5 is outside the accepted range \[0.0, 1.0\]"),
    (ReMDMConfig, {"eta": -0.1}, ValueError, r"eta=-0.1"),
    (ReMDMConfig, {"t_on": 0.1, "t_off": 0.2}, ValueError, r"t_off=0.2 must be < t_on=0.1"),
    (ReMDMConfig, {"t_on": 0.3, "t_off": 0.3}, ValueError, r"t_off=0.3 must be < t_on=0.3"),
    (ReMDMConfig, {"t_on": 1.0}, ValueError, r"t_on=1.0 is outside"),
    (ReMDMConfig, {"alpha_on": 1.0}, ValueError, r"alpha_on=1.0 is outside"),
    (ReMDMConfig, {"strategy": "loop", "eta": 0.5}, ValueError, r"eta=0.5 is too large for the loop"),
    (SDEConfig, {"num_steps": -3}, ValueError, r"num_steps=-3"),
    (SDEConfig, {"snr_schedule": "cosine"}, ValueError, r"snr_schedule='cosine' .* 'log-linear', 'log-normal', 'linear'"),
    (SDEConfig, {"snr_min": 0.0}, ValueError, r"snr_min=0.0"),
    (SDEConfig, {"snr_max": 1e-4}, ValueError, r"snr_max=0.0001"),
    (SDEConfig, {"lognormal_std": 0.0}, ValueError, r"lognormal_std=0.0"),
    (HybridConfig, {"num_steps": 1}, ValueError, r"num_steps=1 must be >= 2"),
    (HybridConfig, {"num_steps": 8, "continuous_steps": 8}, ValueError, r"continuous_steps=8 must be in \[1, num_steps - 1\]"),
    (HybridConfig, {"snr_star": 0.0}, ValueError, r"snr_star=0.0"),
    (HybridConfig, {"commit_rule": "entropy"}, ValueError, r"commit_rule='entropy' .* 'threshold', 'top_fraction'"),
    (HybridConfig, {"commit_threshold": 0.0}, ValueError, r"commit_threshold=0.0"),
    (HybridConfig, {"commit_fraction": 1.2}, ValueError, r"commit_fraction=1.2"),
    (HybridConfig, {"commit_mode": "mode"}, ValueError, r"commit_mode='mode' .* 'evidence', 'sample', 'argmax'"),
    (HybridConfig, {"discrete_strategy": "roar"}, ValueError, r"discrete_strategy='roar' .* 'mdlm'"),
    (HybridConfig, {"discrete_t_start": 0.0}, ValueError, r"discrete_t_start=0.0"),
    (HybridConfig, {"eta": 2.0}, ValueError, r"eta=2.0"),
    (HybridConfig, {"t_on": 0.2, "t_off": 0.4}, ValueError, r"t_off=0.4 must be < t_on=0.2"),
    (HybridConfig, {"discrete_strategy": "rescore"}, ValueError, r"discrete_strategy='rescore' is not supported"),
    (ConfidenceConfig, {"num_steps": 0}, ValueError, r"num_steps=0 must be >= 1"),
    (ConfidenceConfig, {"confidence_rule": "entropy"}, ValueError, r"confidence_rule='entropy' .* 'threshold', 'budget'"),
    (ConfidenceConfig, {"confidence_threshold": 0.0}, ValueError, r"confidence_threshold=0.0 is outside .* \(0.0, 1.0\]"),
    (ConfidenceConfig, {"confidence_threshold": 1.5}, ValueError, r"confidence_threshold=1.5"),
    (ConfidenceConfig, {"tokens_per_step": 0}, ValueError, r"tokens_per_step=0 must be >= 1"),
    (ConfidenceConfig, {"tokens_per_step": 1.5}, TypeError, r"tokens_per_step must be an int"),
]


@pytest.mark.parametrize("config_class,knobs,error,message", INVALID, ids=[f"{c.__name__}-{k}" for c, k, _, _ in INVALID])
def test_invalid_knobs_raise_clear_errors(config_class, knobs, error, message):
    with pytest.raises(error, match=message):
        config_class(**knobs)


def test_invalid_names_inputs_and_models(tiny_dsl):
    with pytest.raises(ValueError, match=r"sampler='ddim' is not supported; accepted: 'mdlm', 'remdm', 'dsl-sde'"):
        get_sampler("ddim")
    with pytest.raises(ValueError, match=r"\['eta'\] not knobs of sampler 'mdlm'"):
        get_sampler("mdlm", eta=0.1)
    assert get_sampler("remdm-loop").config.strategy == "loop" and get_sampler("remdm-loop").config.eta == 0.02
    no_mask = SimpleNamespace(config=SimpleNamespace(mask_token_id=None), parameters=lambda: iter(()))
    with pytest.raises(ValueError, match="no mask token"):
        MDLMSampler().run(no_mask, batch_size=1, seq_len=4, progress_bar=False)
    with pytest.raises(ValueError, match=r"input_ids must lie in \[0, 32\]"):
        MDLMSampler().run(tiny_dsl, torch.tensor([[40, 32]]), progress_bar=False)
    with pytest.raises(ValueError, match="got 2 generators for a batch of 3 rows"):
        MDLMSampler().run(tiny_dsl, batch_size=3, seq_len=4, generator=row_generators([0, 1]), progress_bar=False)
    with pytest.raises(ValueError, match="attention_mask has shape"):
        MDLMSampler().run(tiny_dsl, torch.tensor([[32, 32]]), torch.ones(1, 3), progress_bar=False)


# ---------------------------------------------------------------------------------------------------------------
# ZeRO-3: every rank makes the same number of forward passes
# ---------------------------------------------------------------------------------------------------------------


def _distributed_worker(rank, world_size, init_file, result_file):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        toy = markov_toy(MARKOV_INITIAL, MARKOV_TRANSITION, length=3)
        # rank 0 has nothing to generate (no logits needed: no MDLM call, no ROAR step), rank 1 fills 3
        input_ids = torch.tensor([[0, 2, 1]]) if rank == 0 else torch.tensor([[3, 3, 3]])
        calls = {}
        for name, synced in (("mdlm", True), ("mdlm", False), ("roar", True), ("roar", False)):
            toy.calls = 0
            sampler = get_sampler(name, **({"num_steps": 32} if name == "mdlm" else {}))
            sampler.run(toy, input_ids, generator=torch.Generator().manual_seed(rank), progress_bar=False, synced_gpus=synced)
            calls[f"{name}-{synced}"] = toy.calls
        gathered = [None] * world_size
        torch.distributed.all_gather_object(gathered, calls)
        if rank == 0:
            torch.save(gathered, result_file)
    finally:
        torch.distributed.destroy_process_group()


def test_synced_gpus_makes_every_rank_run_the_same_number_of_forward_passes():
    with tempfile.TemporaryDirectory() as folder:
        init_file, result_file = os.path.join(folder, "init"), os.path.join(folder, "result.pt")
        torch.multiprocessing.spawn(_distributed_worker, args=(2, init_file, result_file), nprocs=2, join=True)
        rank0, rank1 = torch.load(result_file)
    # rank 0 calls whenever rank 1 needs logits (it needs none itself: its calls keep no position)
    assert rank0["mdlm-True"] == rank1["mdlm-True"] == rank1["mdlm-False"] >= 1
    assert rank0["roar-True"] == rank1["roar-True"] == 3
    # the control: without syncing, rank 0 would skip calls that rank 1 makes (a ZeRO-3 deadlock)
    assert rank0["mdlm-False"] == 0 < rank1["mdlm-False"]
    assert rank0["roar-False"] == 0 and rank1["roar-False"] == 3


@pytest.fixture
def other_rank(monkeypatch):
    """Simulates a second rank's vote in `all_ranks_agree` (single process): `other_rank.can_skip` is its flag,
    `other_rank.votes` this rank's flags, in order."""
    state = SimpleNamespace(can_skip=True, votes=[])

    def all_ranks_agree(flag, device):
        state.votes.append(flag)
        return flag and state.can_skip

    for module in {Denoiser.__module__, MDLMSampler.__module__}:  # the network wrapper and the discrete loop vote
        monkeypatch.setattr(sys.modules[module], "all_ranks_agree", all_ranks_agree)
    return state


def test_synced_gpus_skips_a_call_only_when_every_rank_can(tiny_dsl, other_rank):
    """Under synced_gpus a rank votes to skip a call it does not need (nothing to keep, or covered by the cache),
    and skips it only if the other rank can too; otherwise it calls the network with its empty or covered `keep`,
    so that every rank makes the same number of forward passes."""
    mask = tiny_dsl.config.mask_token_id
    tokens = torch.tensor([[3, mask, mask, mask]])
    nothing = torch.zeros_like(tokens, dtype=torch.bool)
    some = torch.tensor([[False, True, True, False]])
    with ForwardRecorder(tiny_dsl) as recorder:
        denoiser = Denoiser(tiny_dsl, None, use_cache=True, synced_gpus=True)
        assert denoiser.from_tokens(tokens, nothing).values.shape == (0, 0) and denoiser.nfe == 0  # both skip
        other_rank.can_skip = False  # the other rank needs logits
        logits = denoiser.from_tokens(tokens, nothing)
        assert denoiser.nfe == 1 and torch.equal(recorder.calls[-1].keep, nothing) and logits.values.shape == (0, 32)
        denoiser.from_tokens(tokens, some)
        assert denoiser.nfe == 2 and torch.equal(recorder.calls[-1].keep, some)
        covered = torch.tensor([[False, True, False, False]])
        denoiser.from_tokens(tokens, covered)  # the cache covers it, but the other rank calls: so does this one
        assert denoiser.nfe == 3 and torch.equal(recorder.calls[-1].keep, covered)
        other_rank.can_skip = True
        assert denoiser.from_tokens(tokens, covered).values.shape == (1, 32) and denoiser.nfe == 3  # reused
    assert other_rank.votes == [True, True, False, True, True]


@pytest.mark.parametrize("name", ["mdlm", "remdm-conf", "hybrid-sample", "hybrid-evidence"])
def test_a_synced_rank_calls_whenever_another_rank_needs_logits(tiny_dsl, other_rank, name):
    """A whole run under synced_gpus: while another rank needs logits at every step (and the noise removal), this
    rank calls the network at every step, with empty `keep`s where it needs nothing, and samples exactly what it
    samples alone; when the other rank needs nothing, it makes exactly its own calls."""
    input_ids = prompted_batch(tiny_dsl.config.mask_token_id)

    def run(synced_gpus):
        return DISCRETE_SAMPLERS[name]().run(
            tiny_dsl, input_ids, generator=row_generators([5, 6, 7]), return_confidences=True, progress_bar=False,
            synced_gpus=synced_gpus,
        )

    alone = run(synced_gpus=False)
    with ForwardRecorder(tiny_dsl) as recorder:
        other_rank.can_skip = False
        busy = run(synced_gpus=True)
    other_rank.can_skip = True
    idle = run(synced_gpus=True)
    # the hybrid: T_c = 24 // 2 SDE steps and the commit's call, then T_d = 12 discrete steps
    continuous_calls, num_discrete_steps = (12 + 1, 12) if name.startswith("hybrid") else (0, 24)
    assert busy.nfe == continuous_calls + num_discrete_steps + 1 > alone.nfe  # every step and the noise removal
    assert any(call.keep is not None and not call.keep.any() for call in recorder.calls)
    assert idle.nfe == alone.nfe
    for out in (busy, idle):
        assert torch.equal(out.sequences, alone.sequences)
        torch.testing.assert_close(out.confidences, alone.confidences)


@pytest.mark.parametrize("name", ["remdm-cap", "dsl-sde"])
def test_torch_compile_knob_samples_what_the_eager_model_samples(name):
    """`torch_compile=True` runs the forward through inductor (full logits, static shapes) and draws the same tokens
    as the eager model under the same seed."""
    model = tiny_dsl_model(endpoint_inputs="table")
    torch._dynamo.reset()
    runs = [
        get_sampler(name, num_steps=6, torch_compile=compiled).run(
            model, batch_size=2, seq_len=12, generator=torch.Generator().manual_seed(3), progress_bar=False
        )
        for compiled in (False, True)
    ]
    assert torch.equal(runs[0].sequences, runs[1].sequences) and runs[0].nfe == runs[1].nfe


def test_noise_source_uses_a_generator_of_the_model_device_as_given():
    where = torch.ones(2, 3, dtype=torch.bool)
    source = NoiseSource(torch.Generator().manual_seed(0), 2, torch.device("cpu"))
    assert torch.equal(source.sample(where), torch.rand(6, generator=torch.Generator().manual_seed(0), dtype=torch.float64))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_noise_source_draws_on_the_gpu_from_a_cpu_generator():
    """A CPU generator seeds one generator on the model's device, deterministically: no [N, V] draw on the CPU."""
    where = torch.ones(2, 3, dtype=torch.bool, device="cuda")
    draws = [NoiseSource(torch.Generator().manual_seed(0), 2, torch.device("cuda")).sample(where, (5,)) for _ in range(2)]
    assert draws[0].device.type == "cuda" and torch.equal(draws[0], draws[1])
    rows = NoiseSource([torch.Generator().manual_seed(s) for s in (1, 2)], 2, torch.device("cuda"))
    assert [g.device.type for g in rows.row_generators] == ["cuda", "cuda"]


# ---------------------------------------------------------------------------------------------------------------
# Confidence-aware parallel decoding
# ---------------------------------------------------------------------------------------------------------------


def confidence_run(model, sampler, input_ids):
    """(output, the drafts before and after each step, the recorded network calls) of one seeded run."""
    with ForwardRecorder(model) as recorder:
        out = sampler.run(model, input_ids, generator=torch.Generator().manual_seed(0), progress_bar=False,
                          return_trajectory=True)  # fmt: skip
    drafts = [input_ids] + out.trajectory
    return out, list(zip(drafts, drafts[1:])), recorder.calls


@pytest.mark.parametrize("threshold", [0.4, 0.5])
def test_confidence_unmasks_every_position_above_the_threshold_and_at_least_one(threshold):
    """Each step unmasks exactly the masked positions whose top probability is >= the threshold, plus each row's
    most confident one when none is; the last allowed step unmasks everything left. Checked against the exact
    denoiser's marginals given the draft before the step (a Markov chain of 6 tokens, whose confidences differ
    from position to position); one network call per step."""
    toy = markov_toy(MARKOV_INITIAL, MARKOV_TRANSITION, length=6)
    mask = toy.config.mask_token_id
    input_ids = torch.full((8, 6), mask)
    input_ids[4:, 2] = 1  # half the rows with a fixed token
    sampler = ConfidenceSampler(num_steps=4, confidence_threshold=threshold)
    calls = toy.calls
    out = sampler.run(toy, input_ids, generator=torch.Generator().manual_seed(0), progress_bar=False,
                      return_trajectory=True)  # fmt: skip
    drafts = [input_ids] + out.trajectory
    assert out.nfe == toy.calls - calls == len(out.trajectory) and (out.sequences != mask).all()
    parallel = False
    for k, (before, after) in enumerate(zip(drafts, drafts[1:])):
        masked = before == mask
        drawn = drawn_positions(before, after, mask)
        if k == sampler.config.num_steps - 1:
            assert torch.equal(drawn, masked)
            continue
        top = torch.full(masked.shape, -1.0, dtype=torch.float64)
        top[masked] = toy(input_ids=before).logits[masked].double().softmax(-1).max(dim=-1).values
        expected = masked & (top >= threshold)
        for row in range(masked.shape[0]):
            if masked[row].any():
                expected[row, top[row].argmax()] = True
        assert torch.equal(drawn, expected)
        assert (drawn.sum(dim=-1) >= masked.any(dim=-1).long()).all()
        parallel |= bool((drawn.sum(dim=-1) > 1).any())
    assert parallel  # the threshold did decode several positions of a row at once


def test_confidence_nfe_is_the_steps_taken_capped_by_num_steps():
    """16 positions per row: the budget rule takes ceil(16 / k) calls; a cap below that makes the last step
    unmask every position left; the threshold rule stops as soon as nothing is masked (a high threshold: one
    position per call)."""
    model = tiny_dsl_model()
    mask = model.config.mask_token_id
    input_ids = prompted_batch(mask)
    cases = [
        (ConfidenceSampler(confidence_rule="budget", tokens_per_step=3, num_steps=100), 6, [3] * 5 + [1]),
        (ConfidenceSampler(confidence_rule="budget", tokens_per_step=3, num_steps=4), 4, [3, 3, 3, 7]),
        (ConfidenceSampler(confidence_threshold=1.0, num_steps=100), 16, [1] * 16),
    ]
    for sampler, nfe, per_step in cases:
        out, steps, calls = confidence_run(model, sampler, input_ids)
        assert out.nfe == len(calls) == nfe
        assert [int(drawn_positions(b, a, mask)[0].sum()) for b, a in steps] == per_step


def test_confidence_is_exact_one_position_per_call_and_on_a_product_law(markov, independent):
    """On an exact denoiser: one position per call samples the joint law whatever the (confidence-chosen) order;
    a product law is sampled exactly by any rule; decoding two dependent positions from one call is biased (the
    control, which the test has the power to notice)."""
    one_per_call = ConfidenceSampler(confidence_rule="budget", tokens_per_step=1, num_steps=3)
    assert chi_square_pvalue(sample(one_per_call, markov, seed=1).sequences, markov.target, 3) > SIGNIFICANCE
    parallel = ConfidenceSampler(confidence_threshold=0.3, num_steps=2)
    assert chi_square_pvalue(sample(parallel, independent, seed=1).sequences, independent.target, 4) > SIGNIFICANCE
    two_at_once = ConfidenceSampler(confidence_rule="budget", tokens_per_step=2, num_steps=2)
    assert chi_square_pvalue(sample(two_at_once, markov, seed=1).sequences, markov.target, 3) < 1e-6


def test_confidence_through_generate_and_the_registry():
    model = tiny_dsl_model()
    out = model.generate(sampler="confidence", confidence_rule="budget", tokens_per_step=4, num_steps=10,
                         max_length=12, seed=3)  # fmt: skip
    again = model.generate(sampler="confidence", confidence_rule="budget", tokens_per_step=4, num_steps=10,
                           max_length=12, seed=3)  # fmt: skip
    assert out.nfe == 3 and torch.equal(out.sequences, again.sequences)
    assert get_sampler("confidence").config == ConfidenceConfig()
    with pytest.raises(ValueError, match=r"\['eta'\] not knobs of sampler 'confidence'"):
        get_sampler("confidence", eta=0.1)


# ---------------------------------------------------------------------------------------------------------------
# ReMDM rescore: remasking weighted by the current draft's own scores
# ---------------------------------------------------------------------------------------------------------------


class ConverterEndpointToy(ExactPosteriorToy):
    """The exact denoiser, shown a token of `input_ids` as a DSL model's converter shows it: the noise-free state
    z = s e_x at the endpoint SNR s (`endpoint_snr`, default `snr_max`), `[MASK]` at z = 0."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.config.endpoint_inputs = "converter"

    def forward(self, input_ids=None, noisy_states=None, attention_mask=None, endpoint_snr=None):
        if input_ids is not None:
            snr = self.config.snr_max if endpoint_snr is None else endpoint_snr
            is_token = (input_ids != self.config.mask_token_id)[..., None]
            noisy_states = snr * self.directions[input_ids.clamp(max=self.config.vocab_size - 1)] * is_token
        return super().forward(noisy_states=noisy_states, attention_mask=attention_mask)


def test_rescore_is_the_drafts_own_score_and_weighs_the_remasking_like_conf():
    """The score of a decoded token is p(x_j = current token | the draft, x_j included) from the step's own call;
    sigma spreads sigma_max over the decoded positions by softmax(-score), the conf rule with the score for psi.
    On the exact denoiser it is ~1 at the default endpoint SNR (a visible token is its own evidence) and mixes
    in the context at a low one."""
    toy = ConverterEndpointToy(markov_toy(MARKOV_INITIAL, MARKOV_TRANSITION, length=3).log_joint, 3, 3)
    tokens = torch.tensor([[0, 3, 2]])
    state = SimpleNamespace(tokens=tokens, generatable=torch.ones_like(tokens, dtype=torch.bool), mask_token_id=3,
                            scores=None)  # fmt: skip
    scores = {}
    for snr in (100.0, 1.0):
        logits = toy(input_ids=tokens, endpoint_snr=snr).logits
        scores[snr] = ReMDMSampler.rescore(state, logits)
        expected = logits.double().softmax(-1)[0, [0, 2], [0, 2]]
        assert torch.allclose(scores[snr][0, [0, 2]], expected) and scores[snr][0, 1] == 0
    assert (scores[100.0][0, [0, 2]] > 0.99).all() and (scores[1.0][0, [0, 2]] < 0.9).all()
    state.scores = scores[1.0]
    t, s = torch.tensor([[0.5]], dtype=torch.float64), torch.tensor([[0.25]], dtype=torch.float64)
    _, _, sigma = ReMDMSampler(strategy="rescore").schedule(t, s, state)
    weights = torch.exp(-scores[1.0][0]) * torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64)
    assert torch.allclose(sigma[0], 0.5 * weights / weights.sum())  # sigma_max = 0.5 here


def test_rescore_calls_once_per_step_with_every_writable_position():
    """No extra call: each step's one call returns the masked positions' logits (to unmask) and the decoded ones'
    (to score), so a step calls even when it unmasks nothing: NFE = T (+ 1 for the noise removal)."""
    model = tiny_dsl_model(endpoint_inputs="converter")
    input_ids = prompted_batch(model.config.mask_token_id)
    with ForwardRecorder(model) as recorder:
        out = ReMDMSampler(strategy="rescore", eta=0.5, num_steps=12, use_cache=False).run(
            model, input_ids, generator=torch.Generator().manual_seed(0), progress_bar=False
        )
    generatable = input_ids == model.config.mask_token_id
    assert out.nfe == len(recorder.calls) in (12, 13)
    assert all(torch.equal(call.keep, generatable) for call in recorder.calls[:12])
    assert (out.sequences != model.config.mask_token_id).all()


def test_rescore_rejects_models_whose_score_is_identically_one(markov):
    """MDLM weights (SUBS carries a visible token over), the infinite-SNR endpoint, and a model that does not say
    how it shows a visible token (the exact toy shows it as hard evidence) are refused before any call."""
    for endpoint_inputs in ("table", "converter_at_mask"):
        model = tiny_dsl_model(endpoint_inputs=endpoint_inputs)
        with pytest.raises(ValueError, match=f"endpoint_inputs='{endpoint_inputs}'.*Use strategy='conf'"):
            get_sampler("remdm-rescore").run(model, batch_size=1, seq_len=4, progress_bar=False)
    calls = markov.calls
    with pytest.raises(ValueError, match="endpoint_inputs=None"):
        get_sampler("remdm-rescore").run(markov, batch_size=1, progress_bar=False)
    assert markov.calls == calls
