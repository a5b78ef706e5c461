"""The exact oracle denoiser of the known-law benchmark (`benchmarks/known_law/oracle.py`): its marginals against brute
force over every sequence, and the samplers run on it: ROAR samples the law, the SDE's error falls with T, and its ROAR
NLL is the law's entropy."""

import itertools
import math
import os
import sys

import pytest
import torch
from scipy import stats


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

from benchmarks.known_law.law import HMMLawConfig, build_law  # noqa: E402
from benchmarks.known_law.oracle import HMMOracleDenoiser, oracle_beside  # noqa: E402
from dsl_diffusion.modeling_dsl import DSLConfig, DSLForMaskedDiffusion  # noqa: E402
from dsl_diffusion.pipelines.samplers import get_sampler  # noqa: E402
from dsl_diffusion.trainer.losses import roar_nll  # noqa: E402


pytestmark = pytest.mark.usefixtures("single_threaded")

# Every token possible somewhere, some pairs and first tokens impossible; V^L = 256 sequences at L = 4.
SMALL = HMMLawConfig(vocab_size=4, num_states=3, tokens_per_state=2, successors_per_state=1, initial_states=2, law_seed=3)
LENGTH = 4


def small_config(vocab_size=4, embed_dim=4) -> DSLConfig:
    return DSLConfig(vocab_size=vocab_size, hidden_size=8, num_hidden_layers=1, num_attention_heads=1, cond_dim=8,
                     max_position_embeddings=LENGTH, embed_dim=embed_dim)


def small_oracle(seed=0) -> HMMOracleDenoiser:
    directions = torch.nn.functional.normalize(torch.randn(4, 4, generator=torch.Generator().manual_seed(seed)), dim=-1)
    return HMMOracleDenoiser(build_law(SMALL), small_config(), directions).eval()


def every_sequence(vocab_size: int, length: int) -> torch.LongTensor:
    return torch.tensor(list(itertools.product(range(vocab_size), repeat=length)), dtype=torch.long)


def brute_force_marginals(law, token_log_evidence: torch.Tensor) -> torch.Tensor:
    """`[L, V]` p(x_i = v | evidence) of one row by summing p(x) prod_j lik_j(x_j) over all V^L sequences: the
    definition, with no forward-backward."""
    length, vocab = token_log_evidence.shape
    sequences = every_sequence(vocab, length)
    log_weight = law.log_prob(sequences) + sum(token_log_evidence[i, sequences[:, i]] for i in range(length))
    weight = (log_weight - log_weight.max()).exp()
    weight = weight / weight.sum()
    return torch.stack([torch.zeros(vocab, dtype=torch.float64).index_add_(0, sequences[:, i], weight) for i in range(length)])


def sequence_index(tokens: torch.LongTensor, vocab_size: int) -> torch.LongTensor:
    return (tokens * vocab_size ** torch.arange(tokens.shape[1] - 1, -1, -1)).sum(-1)


def test_marginals_equal_brute_force_for_ids_and_noisy_states():
    oracle = small_oracle()
    law = build_law(SMALL)
    mask = oracle.config.mask_token_id
    # Visible and masked ids, including an impossible first token (law.first_token_marginal() has zeros) that the
    # evidence floor must absorb without NaN.
    impossible_first = int((law.first_token_marginal() == 0).nonzero()[0])
    ids = torch.tensor([[mask, mask, mask, mask], [2, mask, 1, mask], [mask, 3, mask, mask], [impossible_first, mask, mask, 0]])
    states = torch.randn(3, LENGTH, 4, generator=torch.Generator().manual_seed(1)) * torch.tensor([0.5, 2.0, 6.0])[:, None, None]
    for evidence in (oracle.token_log_evidence(ids), oracle.state_log_evidence(states)):
        posterior = oracle.log_posterior(evidence)
        assert torch.isfinite(posterior.exp()).all()
        for row in range(len(evidence)):
            # float64 forward-backward against float64 enumeration: only rounding separates them.
            assert torch.allclose(posterior[row].exp(), brute_force_marginals(law, evidence[row]), rtol=0, atol=1e-10)
    # The model contract: normalized float32 logits, the same numbers, and logits_to_keep packs the kept rows.
    logits = oracle(input_ids=ids).logits
    assert logits.dtype == torch.float32 and logits.shape == (4, LENGTH, 4)
    assert torch.allclose(logits.exp().sum(-1), torch.ones(4, LENGTH), atol=1e-6)
    keep = ids == mask
    kept = oracle(input_ids=ids, logits_to_keep=keep).logits
    assert torch.equal(kept, logits[keep])
    assert torch.allclose(oracle(noisy_states=states).logits.double().exp(),
                          oracle.log_posterior(oracle.state_log_evidence(states)).exp(), atol=1e-6)
    # z = 0 is [MASK]: flat evidence, the same posterior as the [MASK] id.
    assert torch.allclose(oracle(noisy_states=torch.zeros(1, LENGTH, 4)).logits, logits[:1], atol=1e-6)


def test_rows_that_underflow_the_rescaled_pass_are_recomputed_in_log_space():
    oracle = small_oracle()
    law = build_law(SMALL)
    impossible_first = int((law.first_token_marginal() == 0).nonzero()[0])
    # Row 0: overwhelming evidence (SNR 2,000) for a first token the law rules out: every other token's likelihood
    # is below exp(-745) after the max is taken out, so the rescaled messages underflow to 0. Row 1: ordinary.
    states = torch.randn(2, LENGTH, 4, generator=torch.Generator().manual_seed(2))
    states[0, 0] = 2000.0 * oracle.directions[impossible_first].float()
    evidence = oracle.state_log_evidence(states)
    _, smallest_scale = oracle._scaled_posterior(evidence)
    assert smallest_scale[0] == 0 and smallest_scale[1] > 1e-3, "row 0 must take the log-space path, row 1 not"
    posterior = oracle.log_posterior(evidence)
    for row in range(2):
        assert torch.allclose(posterior[row].exp(), brute_force_marginals(law, evidence[row]), rtol=0, atol=1e-10)
    # The two passes agree wherever the rescaled one holds: only float64 rounding separates them.
    scaled, _ = oracle._scaled_posterior(evidence[1:])
    assert torch.allclose(scaled.exp(), oracle._log_space_posterior(evidence[1:]).exp(), rtol=0, atol=1e-12)


def test_beside_a_model_takes_its_config_and_directions_and_rejects_bad_input():
    torch.manual_seed(0)
    model = DSLForMaskedDiffusion(small_config(embed_dim=3)).eval()
    oracle = oracle_beside(build_law(SMALL), model)
    assert torch.equal(oracle.token_directions(), model.token_directions().detach().double())
    assert oracle.config.mask_token_id == model.config.mask_token_id == 4
    # The same channel as the model's (the trainer's losses draw z through it): the same draws, bit for bit.
    ids, snr = torch.tensor([[0, 4, 2, 3]]), torch.tensor([[1.0, 5.0, 0.5, 20.0]])
    assert torch.equal(oracle.noisy_states(ids, snr, torch.Generator().manual_seed(2)),
                       model.noisy_states(ids, snr, torch.Generator().manual_seed(2)))
    with pytest.raises(ValueError, match="vocab_size"):
        oracle_beside(build_law(SMALL), DSLForMaskedDiffusion(small_config(vocab_size=5)))
    with pytest.raises(ValueError, match="padding"):
        oracle(input_ids=torch.full((1, LENGTH), 4), attention_mask=torch.tensor([[0, 1, 1, 1]]))
    with pytest.raises(ValueError, match=r"input_ids must lie in \[0, 4\]"):
        oracle(input_ids=torch.full((1, LENGTH), 5))
    with pytest.raises(ValueError, match="exactly one"):
        oracle()


def test_roar_through_the_oracle_samples_the_law():
    law = build_law(SMALL)
    samples = get_sampler("roar", top_p=1.0).run(
        small_oracle(), batch_size=20_000, seq_len=LENGTH, generator=torch.Generator().manual_seed(0), progress_bar=False
    ).sequences
    probabilities = law.log_prob(every_sequence(4, LENGTH)).exp()
    counts = torch.bincount(sequence_index(samples, 4), minlength=len(probabilities)).double()
    assert counts[probabilities == 0].sum() == 0  # never an impossible sequence
    expected = probabilities * len(samples)
    # Pearson's chi-square over the sequences, the rare ones (expected count < 5) pooled into one cell.
    rare = (expected < 5) & (probabilities > 0)
    observed = torch.cat([counts[~rare & (probabilities > 0)], counts[rare].sum()[None]])
    wanted = torch.cat([expected[~rare & (probabilities > 0)], expected[rare].sum()[None]])
    p_value = stats.chisquare(observed.numpy(), wanted.numpy()).pvalue
    # A sampler that ignored the decoded tokens (drawing each position from its marginal) gives p ~ 0 here.
    assert p_value > 1e-3, p_value


def test_sde_error_falls_as_the_grid_refines():
    law = build_law(SMALL)
    probabilities = law.log_prob(every_sequence(4, LENGTH)).exp()
    oracle = small_oracle()

    def total_variation(num_steps):
        samples = get_sampler("dsl-sde", num_steps=num_steps).run(
            oracle, batch_size=20_000, seq_len=LENGTH, generator=torch.Generator().manual_seed(0), progress_bar=False
        ).sequences
        empirical = torch.bincount(sequence_index(samples, 4), minlength=len(probabilities)).double() / len(samples)
        return float(0.5 * (empirical - probabilities).abs().sum())

    errors = [total_variation(t) for t in (2, 8, 32)]
    # Measured 0.26 / 0.066 / 0.025; 20,000 true law samples sit at ~0.027 (the plug-in floor over 171 possible
    # sequences), and the TV of one draw varies by ~0.005.
    assert errors[0] > errors[1] + 0.1 and errors[1] > errors[2] + 0.02, errors
    assert errors[2] < 0.04, errors


def test_roar_nll_of_the_oracle_is_the_law_entropy():
    law = build_law(SMALL)
    rows = law.sample(20_000, LENGTH, torch.Generator().manual_seed(5))
    oracle = small_oracle()
    generator = torch.Generator().manual_seed(6)
    estimates = []
    for batch in rows.split(100):  # one ROAR draw per batch row; per-row estimates from batches of 100
        out = roar_nll(oracle, batch, None, generator=generator)
        estimates.append(float(out.nll_sum / out.num_tokens))
    estimates = torch.tensor(estimates, dtype=torch.float64)
    entropy = law.exact_entropy(LENGTH) / LENGTH
    error = float(estimates.std() / math.sqrt(len(estimates)))
    # The any-order chain rule with the exact conditionals gives -log p(x) in expectation over k and the order.
    assert abs(float(estimates.mean()) - entropy) < 4 * error, (float(estimates.mean()), entropy, error)
    assert error < 0.01
