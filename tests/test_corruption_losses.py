"""Known-answer and statistical tests of the SNR paths, MDLM masking and the losses (trainer/corruption.py, losses.py).

Where a test needs a model with a known answer (a perfect, a uniform or a Bayes-optimal predictor), it subclasses
the real DSLForMaskedDiffusion and overrides only `forward`, so that the noisy-state channel and the token
directions are the real ones.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from scipy import stats

from dsl_diffusion.modeling_dsl import DSLForMaskedDiffusion
from dsl_diffusion.modeling_dsl.modeling_dsl import DSLMaskedDiffusionOutput
from dsl_diffusion.trainer.corruption import (
    ConstantPath,
    LinearPath,
    LogLinearPath,
    LogNormalPath,
    MixturePath,
    ROARPath,
    build_snr_path,
    mdlm_alpha,
    mdlm_mask_tokens,
    sample_mdlm_times,
)
from dsl_diffusion.trainer.losses import diffusion_nll_bound, dsl_loss, mdlm_loss, roar_nll, token_loss_mask
from helpers import tiny_dsl_config as tiny_config
from helpers import tiny_dsl_model

VOCAB = 32  # the vocabulary of helpers.tiny_dsl_config


@pytest.fixture
def tiny_model():
    return tiny_dsl_model()


class PerfectDenoiser(DSLForMaskedDiffusion):
    """Puts a huge logit on the clean token (which it is told), whatever the corruption."""

    clean_ids: torch.Tensor

    def forward(self, input_ids=None, noisy_states=None, attention_mask=None, **kwargs):
        logits = F.one_hot(self.clean_ids, self.config.vocab_size).float() * 1e4
        return DSLMaskedDiffusionOutput(logits=logits)


class UniformDenoiser(DSLForMaskedDiffusion):
    """Predicts the uniform distribution everywhere and records the token ids it was shown."""

    def forward(self, input_ids=None, noisy_states=None, attention_mask=None, **kwargs):
        self.seen_ids = input_ids
        shape = (input_ids if input_ids is not None else noisy_states[..., 0]).shape
        return DSLMaskedDiffusionOutput(logits=torch.zeros(*shape, self.config.vocab_size))


class VisibleCountDenoiser(DSLForMaskedDiffusion):
    """At every position, logit k on the clean token (k = number of visible tokens in the row), 0 elsewhere.

    Its CE at a masked position is log(1 + (V - 1) e^{-k}), so the any-order NLL has a closed form.
    """

    clean_ids: torch.Tensor

    def forward(self, input_ids=None, noisy_states=None, attention_mask=None, **kwargs):
        visible = (input_ids != self.config.mask_token_id) & attention_mask.bool()
        k = visible.sum(dim=1).float()
        logits = F.one_hot(self.clean_ids, self.config.vocab_size).float() * k[:, None, None]
        return DSLMaskedDiffusionOutput(logits=logits)


class BayesDenoiser(DSLForMaskedDiffusion):
    """The exact posterior for i.i.d. uniform tokens: p(v | z_i) is proportional to exp(<z_i, e_v>) (unit-norm e_v)."""

    def forward(self, input_ids=None, noisy_states=None, attention_mask=None, **kwargs):
        return DSLMaskedDiffusionOutput(logits=noisy_states.float() @ self.token_directions().float().T)


# --------------------------------------------------------------------------------------------------------------
# SNR paths
# --------------------------------------------------------------------------------------------------------------


def test_roar_number_of_visible_tokens_is_uniform_and_subsets_are_uniform():
    generator = torch.Generator().manual_seed(0)
    batch, length, snr_max = 20000, 12, 100.0
    snr = ROARPath(snr_max=snr_max).sample(batch, length, generator=generator)
    assert set(snr.unique().tolist()) == {0.0, snr_max}
    visible_counts = (snr > 0).sum(dim=1)
    # k ~ U{0..L-1}: never all tokens visible, each count equally likely (chi-square goodness of fit).
    observed = torch.bincount(visible_counts, minlength=length + 1)
    assert observed[length] == 0
    assert stats.chisquare(observed[:length].numpy()).pvalue > 1e-3
    # The masked fraction (L - k) / L is then uniform on {1/L, ..., 1}: its mean is (L + 1) / (2L).
    masked_fraction = 1.0 - visible_counts.float() / length
    assert abs(masked_fraction.mean().item() - (length + 1) / (2 * length)) < 0.01
    # Given k, every position is equally likely to be visible.
    position_counts = (snr > 0).sum(dim=0)
    assert stats.chisquare(position_counts.numpy()).pvalue > 1e-3


def test_roar_respects_row_lengths():
    generator = torch.Generator().manual_seed(1)
    lengths = torch.tensor([3, 8] * 2000)
    snr = ROARPath().sample(len(lengths), 8, generator=generator, lengths=lengths)
    short = snr[lengths == 3]
    assert (short[:, 3:] == 0).all(), "padding positions must never be visible"
    observed = torch.bincount((short > 0).sum(dim=1), minlength=4)
    assert observed[3] == 0 and stats.chisquare(observed[:3].numpy()).pvalue > 1e-3


def test_smoothed_roar_ranges():
    generator = torch.Generator().manual_seed(2)
    path = ROARPath(snr_max=100.0, smoothed=True, smoothed_snr_lo=0.5, clean_low_fraction=0.8)
    snr = path.sample(4000, 16, generator=generator)
    clean, masked = snr[snr >= 80.0], snr[snr < 80.0]
    assert clean.max() <= 100.0 and masked.max() < 0.5 and masked.min() >= 0.0
    # Both ranges are filled uniformly: the means sit at the midpoints.
    assert abs(clean.mean().item() - 90.0) < 0.5 and abs(masked.mean().item() - 0.25) < 0.01


@pytest.mark.parametrize("per_token", [False, True])
def test_lognormal_snr_matches_mu_sigma(per_token):
    generator = torch.Generator().manual_seed(3)
    mu, sigma = 2.69, 1.41
    snr = LogNormalPath(mu=mu, sigma=sigma, per_token=per_token).sample(4000, 8, generator=generator)
    if per_token:
        log_snr = snr.log().flatten()
        # Independent across tokens of a row.
        assert abs(torch.corrcoef(snr.log()[:, :2].T)[0, 1].item()) < 0.05
    else:
        assert (snr == snr[:, :1]).all(), "per-sequence SNRs are constant along a row"
        log_snr = snr[:, 0].log()
    assert stats.kstest(log_snr.numpy(), "norm", args=(mu, sigma)).pvalue > 1e-3
    assert abs(log_snr.mean().item() - mu) < 0.06 and abs(log_snr.std().item() - sigma) < 0.06


def test_loglinear_and_linear_paths_are_uniform_in_their_variable():
    generator = torch.Generator().manual_seed(4)
    snr = LogLinearPath(snr_min=0.01, snr_max=100.0).sample(5000, 4, generator=generator)[:, 0]
    assert stats.kstest(snr.log().numpy(), "uniform", args=(math.log(0.01), math.log(1e4))).pvalue > 1e-3
    snr = LinearPath(snr_max=50.0).sample(5000, 4, generator=generator)[:, 0]
    assert stats.kstest(snr.numpy(), "uniform", args=(0.0, 50.0)).pvalue > 1e-3


def test_grids_are_increasing_from_zero_to_snr_max():
    lognormal = LogNormalPath(mu=2.69, sigma=1.41, snr_max=100.0)
    for path in (lognormal, LogLinearPath(snr_max=100.0), LinearPath(snr_max=100.0), MixturePath(rho=0.25)):
        grid = path.grid(16)
        assert grid.shape == (17,) and grid[0] == 0.0
        assert torch.isclose(grid[-1], torch.tensor(100.0, dtype=torch.float64))
        assert (grid.diff() > 0).all()
    # Log-normal quantiles: equal probability mass between consecutive grid points.
    cdf = stats.norm.cdf(lognormal.grid(8)[1:].log().numpy(), loc=2.69, scale=1.41)
    masses = torch.diff(torch.tensor([0.0, *cdf]))
    assert torch.allclose(masses, masses[0].expand_as(masses), atol=1e-9)
    with pytest.raises(NotImplementedError, match="no scalar SNR schedule"):
        ROARPath().grid(8)


def test_mixture_fraction_of_roar_rows():
    generator = torch.Generator().manual_seed(5)
    path = MixturePath(roar=ROARPath(snr_max=100.0), continuous=LogNormalPath(), rho=0.25)
    draw = path.sample_with_rows(8, 16, generator=generator)
    assert draw.roar_rows.sum() == 2, "rho * B = 2 ROAR rows exactly"
    endpoint = draw.snr[draw.roar_rows]
    assert ((endpoint == 0) | (endpoint == 100.0)).all()
    assert (draw.snr[~draw.roar_rows] > 0).all()
    # Batch size 1: a ROAR row with probability rho.
    hits = sum(bool(path.sample_with_rows(1, 4, generator=generator).roar_rows) for _ in range(4000))
    assert abs(hits / 4000 - 0.25) < 0.025


def test_reference_mixed_path_is_floor_quarter_roar_rows_and_lognormal_4_1_5():
    """The reference code's `mixed` path: B // 4 ROAR rows (none below 4 rows), the rest per-sequence
    log-normal with mu 4.0, sigma 1.5 (checked with a KS test of log SNR over many rows)."""
    path = build_snr_path("reference_mixed", rho=0.9, lognormal_mu=0.0)  # rho and mu do not apply to this name
    generator = torch.Generator().manual_seed(0)
    for batch, expected in ((8, 2), (10, 2), (3, 0), (1, 0)):
        for _ in range(5):
            assert int(path.sample_with_rows(batch, 4, generator=generator).roar_rows.sum()) == expected
    draws = [path.sample_with_rows(8, 4, generator=generator) for _ in range(500)]
    log_snr = torch.cat([d.snr[~d.roar_rows, 0] for d in draws]).double().log()
    assert all(torch.equal(d.snr[~d.roar_rows], d.snr[~d.roar_rows][:, :1].expand(-1, 4)) for d in draws[:20])
    assert stats.kstest(log_snr.numpy(), "norm", args=(4.0, 1.5)).pvalue > 1e-3
    # The stochastic rounding of "mixture" differs exactly here: 1 row still sees ROAR with probability rho.
    assert MixturePath(rho=0.25, row_count="stochastic").num_roar_rows(1, generator=torch.Generator().manual_seed(1)) in (0, 1)
    with pytest.raises(ValueError, match=r"row_count='round' is not supported; accepted: \('stochastic', 'floor'\)"):
        MixturePath(row_count="round")


def test_lognormal_per_token_fraction_mixes_per_token_and_per_sequence_rows():
    mu, sigma, rows, length = 2.69, 1.41, 4000, 8
    generator = torch.Generator().manual_seed(5)
    snr = LogNormalPath(mu=mu, sigma=sigma, per_token=True, per_token_fraction=0.25).sample(rows, length, generator=generator)
    one_snr = (snr == snr[:, :1]).all(dim=1)
    # Each row is per-token with probability 1/4: the count of one-SNR rows is Binomial(4000, 3/4) (sd 27).
    assert abs(one_snr.sum().item() - 0.75 * rows) < 4 * math.sqrt(rows * 0.75 * 0.25)
    # Both kinds of row keep the log-normal marginal, and the per-token rows stay independent along the row.
    per_token_rows = snr[~one_snr].log()
    for log_snr in (snr[one_snr, 0].log(), per_token_rows.flatten()):
        assert stats.kstest(log_snr.numpy(), "norm", args=(mu, sigma)).pvalue > 1e-3
    assert abs(torch.corrcoef(per_token_rows[:, :2].T)[0, 1].item()) < 0.1
    # A fraction of 1 is the plain per-token path, draw for draw.
    plain = LogNormalPath(mu=mu, sigma=sigma, per_token=True).sample(16, length, generator=torch.Generator().manual_seed(2))
    whole = LogNormalPath(mu=mu, sigma=sigma, per_token=True, per_token_fraction=1.0).sample(
        16, length, generator=torch.Generator().manual_seed(2)
    )
    assert torch.equal(plain, whole)
    with pytest.raises(ValueError, match="per_token_fraction=0.5 needs per_token=True"):
        LogNormalPath(per_token_fraction=0.5)
    with pytest.raises(ValueError, match=r"per_token_fraction must lie in \[0, 1\], got 1.5"):
        LogNormalPath(per_token=True, per_token_fraction=1.5)
    with pytest.raises(ValueError, match="applies to the log-normal paths.*not to snr_path='loglinear'"):
        build_snr_path("loglinear", per_token=True, per_token_fraction=0.5)
    assert build_snr_path("mixture", per_token=True, per_token_fraction=0.5).continuous.per_token_fraction == 0.5


def test_build_snr_path_and_validation():
    assert isinstance(build_snr_path("mixture", rho=0.5), MixturePath)
    assert build_snr_path("roar_smoothed").smoothed
    assert build_snr_path("lognormal", per_token=True).per_token
    with pytest.raises(ValueError, match="unknown SNR path 'cosine'.*mixture"):
        build_snr_path("cosine")
    with pytest.raises(ValueError, match=r"rho must lie in \[0, 1\], got 1.5"):
        MixturePath(rho=1.5)
    with pytest.raises(ValueError, match="snr_max must be a finite number > 0, got -1"):
        ROARPath(snr_max=-1.0)
    with pytest.raises(ValueError, match="snr must be a finite number >= 0, got -0.5"):
        ConstantPath(-0.5)


# --------------------------------------------------------------------------------------------------------------
# MDLM masking
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shared_offset", [False, True])
def test_antithetic_times_cover_each_stratum_once(shared_offset):
    eps, batch = 1e-3, 64
    for seed in range(20):
        generator = torch.Generator().manual_seed(seed)
        t = sample_mdlm_times(batch, sampling_eps=eps, shared_offset=shared_offset, generator=generator)
        assert ((t >= eps) & (t <= 1.0)).all()
        u = (t - eps) / (1 - eps)
        strata = torch.floor(u * batch).long()
        assert torch.equal(strata.sort().values, torch.arange(batch)), "exactly one draw per stratum"
        if shared_offset:
            assert torch.allclose(t.diff(), torch.full((batch - 1,), (1 - eps) / batch), atol=1e-6)


def test_mdlm_masking_rate_follows_log_linear_schedule():
    generator = torch.Generator().manual_seed(6)
    ids = torch.randint(0, VOCAB, (4, 20000), generator=generator)
    attention_mask = torch.ones_like(ids)
    attention_mask[:, -1000:] = 0
    t = torch.tensor([0.1, 0.4, 0.7, 1.0])
    noisy, masked = mdlm_mask_tokens(ids, t, VOCAB, eps=1e-3, attention_mask=attention_mask, generator=generator)
    assert not masked[:, -1000:].any(), "padding is never masked"
    assert torch.equal(noisy == VOCAB, masked)
    rate = masked[:, :-1000].float().mean(dim=1)
    assert torch.allclose(rate, 1 - mdlm_alpha(t), atol=0.012)


def test_mdlm_loss_is_zero_for_a_perfect_model():
    torch.manual_seed(0)
    model = PerfectDenoiser(tiny_config())
    ids = torch.randint(0, VOCAB, (8, 16))
    model.clean_ids = ids
    out = mdlm_loss(model, ids, torch.ones_like(ids), generator=torch.Generator().manual_seed(0))
    assert out.loss.item() == 0.0 and out.nll_sum.item() == 0.0 and out.num_tokens.item() == 8 * 16


def test_mdlm_loss_for_a_uniform_model_is_analytic():
    torch.manual_seed(0)
    model = UniformDenoiser(tiny_config())
    ids = torch.randint(0, VOCAB, (16, 32))
    attention_mask = torch.ones_like(ids)
    attention_mask[3, 20:] = 0
    t = sample_mdlm_times(16, generator=torch.Generator().manual_seed(1))
    out = mdlm_loss(model, ids, attention_mask, t=t, generator=torch.Generator().manual_seed(2))
    masked = model.seen_ids == VOCAB
    assert not masked[attention_mask == 0].any()
    # Exactly: sum over the masked tokens of log V / t, divided by all real tokens.
    expected = (masked.float().sum(dim=1) / t).sum() * math.log(VOCAB) / attention_mask.sum()
    assert torch.allclose(out.loss, expected.float(), rtol=1e-5)
    assert out.num_tokens == attention_mask.sum()
    # In expectation over the masks: E[1[masked] / t] = (1 - eps), so the loss is about (1 - eps) log V.
    big = torch.randint(0, VOCAB, (64, 512))
    out = mdlm_loss(model, big, None, generator=torch.Generator().manual_seed(3))
    assert abs(out.loss.item() - (1 - 1e-3) * math.log(VOCAB)) < 0.05 * math.log(VOCAB)


def test_mdlm_loss_rejects_bad_times(tiny_model):
    ids = torch.randint(0, VOCAB, (2, 8))
    with pytest.raises(ValueError, match="t must have shape"):
        mdlm_loss(tiny_model, ids, None, t=torch.tensor([0.5]))
    with pytest.raises(ValueError, match=r"must lie in \(0, 1\]"):
        mdlm_loss(tiny_model, ids, None, t=torch.tensor([0.0, 0.5]))


# --------------------------------------------------------------------------------------------------------------
# DSL loss, ROAR NLL and the I-MMSE bound
# --------------------------------------------------------------------------------------------------------------


def test_dsl_loss_at_snr_zero_is_the_unconditional_cross_entropy(tiny_model):
    ids = torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(0))
    attention_mask = torch.ones_like(ids)
    attention_mask[1, 10:] = 0
    out = dsl_loss(tiny_model, ids, attention_mask, ConstantPath(0.0), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = tiny_model(noisy_states=torch.zeros(4, 16, 8), attention_mask=attention_mask).logits
    per_token = F.cross_entropy(logits.flatten(0, 1), ids.flatten(), reduction="none")
    expected = per_token[attention_mask.flatten().bool()].mean()
    assert torch.allclose(out.loss, expected, atol=1e-6)
    assert out.num_tokens == attention_mask.sum()
    assert torch.allclose(out.nll_sum, expected * attention_mask.sum(), rtol=1e-5)
    assert set(out.components) == {"ce", "continuous_ce"}


def test_dsl_loss_components_split_endpoint_and_continuous_rows(tiny_model):
    ids = torch.randint(0, VOCAB, (8, 16), generator=torch.Generator().manual_seed(0))
    path = build_snr_path("mixture", rho=0.5)
    out = dsl_loss(tiny_model, ids, None, path, roar_lambda=0.5, generator=torch.Generator().manual_seed(2))
    assert {"ce", "continuous_ce", "endpoint_ce", "endpoint_masked_ce", "roar_nll"} <= set(out.components)
    # Half of the rows of each part: the overall CE is the average of the two parts.
    assert math.isclose(out.components["ce"], (out.components["continuous_ce"] + out.components["endpoint_ce"]) / 2, rel_tol=1e-5)
    # The default ROAR term is the reference code's convex combination (1 - lambda) CE + lambda ROAR.
    assert math.isclose(out.loss.item(), 0.5 * out.components["ce"] + 0.5 * out.components["roar_nll"], rel_tol=1e-5)
    only_roar = dsl_loss(tiny_model, ids, None, build_snr_path("mixture", rho=1.0), generator=torch.Generator())
    assert "continuous_ce" not in only_roar.components and "endpoint_ce" in only_roar.components


@pytest.mark.parametrize("roar_term, ce_weight", [("convex", 0.75), ("added", 1.0)])
def test_roar_term_is_a_convex_combination_or_an_added_term(tiny_model, roar_term, ce_weight):
    """lambda = 0.25 on a deterministic objective (SNR 0 everywhere, so CE and ROAR use no noise draws): the loss is
    (1 - lambda) CE + lambda ROAR ("convex") or CE + lambda ROAR ("added"), with both parts computed independently."""
    ids = torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(0))
    out = dsl_loss(
        tiny_model, ids, None, ConstantPath(0.0), roar_lambda=0.25, roar_term=roar_term,
        generator=torch.Generator().manual_seed(3),
    )
    ce = dsl_loss(tiny_model, ids, None, ConstantPath(0.0), generator=torch.Generator().manual_seed(3))
    # The ROAR draw comes after the CE part's noise draw (zeros at SNR 0): replay the generator to the same state.
    generator = torch.Generator().manual_seed(3)
    tiny_model.noisy_states(ids, 0.0, generator=generator)
    roar = roar_nll(tiny_model, ids, None, snr_hi=100.0, generator=generator)
    torch.testing.assert_close(out.loss, ce_weight * ce.loss + 0.25 * roar.loss)
    assert out.components["roar_nll"] == pytest.approx(roar.loss.item())
    assert out.nll_sum == pytest.approx(ce.nll_sum.item()), "nll_sum stays the cross-entropy part"


def test_roar_term_validation(tiny_model):
    ids = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match=r"roar_lambda=1.5 must lie in \[0, 1\] with roar_term='convex'"):
        dsl_loss(tiny_model, ids, None, ConstantPath(0.0), roar_lambda=1.5)
    with pytest.raises(ValueError, match=r"roar_term='sum' is not supported; accepted: \('convex', 'added'\)"):
        dsl_loss(tiny_model, ids, None, ConstantPath(0.0), roar_term="sum")
    assert torch.isfinite(dsl_loss(tiny_model, ids, None, ConstantPath(0.0), roar_lambda=1.5, roar_term="added").loss)


def test_loss_mask_drops_tokens_from_every_loss_but_not_from_the_input(tiny_model):
    """EOS (id 5 here) is dropped from the loss: the loss is the mean CE over the other real tokens, computed from
    logits of a forward pass that still saw the EOS tokens (attention is untouched)."""
    with torch.no_grad():  # adaLN-zero makes every block the identity at init: give attention a visible effect
        for name, param in tiny_model.named_parameters():
            if "adaLN_modulation" in name:
                param.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    eos = 5
    ids = torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(0))
    ids[:, 0] = eos
    ids[:, 7] = eos
    attention_mask = torch.ones_like(ids)
    attention_mask[1, 12:] = 0
    loss_mask = token_loss_mask(ids, [eos])
    counted = attention_mask.bool() & (ids != eos)
    assert torch.equal(loss_mask, ids != eos) and token_loss_mask(ids, []) is None

    snr = 30.0 * attention_mask.float()
    out = dsl_loss(tiny_model, ids, attention_mask, ConstantPath(30.0), generator=torch.Generator().manual_seed(1),
                   loss_mask=loss_mask)
    with torch.no_grad():
        states = tiny_model.noisy_states(ids, snr, generator=torch.Generator().manual_seed(1))
        logits = tiny_model(noisy_states=states, attention_mask=attention_mask).logits
        without_eos_in_attention = tiny_model(noisy_states=states, attention_mask=attention_mask * (ids != eos)).logits
    per_token = F.cross_entropy(logits.flatten(0, 1), ids.flatten(), reduction="none").view(ids.shape)
    assert out.num_tokens == counted.sum()
    torch.testing.assert_close(out.loss, per_token[counted].mean())
    # The check can tell: hiding EOS from attention would give another loss, far outside assert_close's tolerance.
    hidden = F.cross_entropy(without_eos_in_attention.flatten(0, 1), ids.flatten(), reduction="none").view(ids.shape)
    assert abs(hidden[counted].mean() - out.loss) > 1e-4

    nelbo = mdlm_loss(tiny_model, ids, attention_mask, t=torch.ones(4), generator=torch.Generator().manual_seed(2),
                      loss_mask=loss_mask)
    assert nelbo.num_tokens == counted.sum()
    with torch.no_grad():  # t = 1 (1 - alpha = 0.999): mask almost everything; recompute with the same masks
        noisy, masked = mdlm_mask_tokens(ids, torch.ones(4), VOCAB, attention_mask=attention_mask.bool(),
                                         generator=torch.Generator().manual_seed(2))
        mdlm_logits = tiny_model(input_ids=noisy, attention_mask=attention_mask).logits
    mdlm_ce = F.cross_entropy(mdlm_logits.flatten(0, 1), ids.flatten(), reduction="none").view(ids.shape)
    torch.testing.assert_close(nelbo.nll_sum, (mdlm_ce * (masked & counted)).sum())

    roar = roar_nll(tiny_model, ids, attention_mask, generator=torch.Generator().manual_seed(3), loss_mask=loss_mask)
    assert roar.num_tokens == counted.sum()
    with pytest.raises(ValueError, match=r"loss_mask shape \[4, 15\] does not match input_ids \[4, 16\]"):
        dsl_loss(tiny_model, ids, None, ConstantPath(0.0), loss_mask=loss_mask[:, :15])


def test_roar_nll_with_a_loss_mask_averages_the_counted_masked_tokens():
    """VisibleCountDenoiser with the last 2 of 6 tokens excluded (as the reference code excludes pad = EOS): the order
    and k ~ U{0..5} run over ALL real tokens, the CE over the counted masked ones only (a row whose counted tokens
    are all visible contributes 0)."""
    torch.manual_seed(0)
    model = VisibleCountDenoiser(tiny_config())
    length, batch = 6, 4000
    ids = torch.randint(0, VOCAB - 1, (batch, length))
    ids[:, 4:] = VOCAB - 1  # the excluded token
    model.clean_ids = ids
    out = roar_nll(model, ids, torch.ones_like(ids), generator=torch.Generator().manual_seed(1),
                   loss_mask=token_loss_mask(ids, [VOCAB - 1]))
    # Given k visible of 6, a counted masked token has CE log(1 + (V - 1) e^{-k}) (there is at least one with k <= 3;
    # with k = 4, 5 all counted tokens may be visible and the row contributes 0).
    expected_per_token = 0.0
    for k in range(length):
        # P(at least one counted token masked) * CE: the row mean over counted masked tokens is exact CE(k).
        p_some_masked = 1.0 - math.comb(length - 4, k - 4) / math.comb(length, k) if k >= 4 else 1.0
        expected_per_token += p_some_masked * math.log(1 + (VOCAB - 1) * math.exp(-k)) / length
    assert out.num_tokens == batch * 4
    assert abs(out.loss.item() / expected_per_token - 1) < 0.03


def test_gradients_reach_directions_converter_and_backbone():
    torch.manual_seed(0)
    model = DSLForMaskedDiffusion(tiny_config(dropout=0.0))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    ids = torch.randint(0, VOCAB, (4, 16))
    out = dsl_loss(model, ids, None, build_snr_path("mixture", rho=0.25), generator=torch.Generator().manual_seed(0))
    out.loss.backward()
    grads = {name: param.grad for name, param in model.named_parameters()}
    for name in (
        "token_directions.weight",
        "converter_beta",
        "converter_bias",
        "backbone.vocab_embed.embedding",  # the converter's value matrix W
        "backbone.blocks.0.adaLN_modulation.weight",
        "backbone.blocks.1.adaLN_modulation.weight",
        "backbone.output_layer.linear.weight",
        "backbone.output_layer.adaLN_modulation.weight",
    ):
        assert grads[name] is not None and grads[name].abs().sum() > 0, name
    # Only directions learn: the gradient of each raw row is orthogonal to that row.
    raw = model.token_directions.weight
    radial = (grads["token_directions.weight"] * raw).sum(dim=-1) / raw.norm(dim=-1)
    assert radial.abs().max() < 1e-5 * grads["token_directions.weight"].norm(dim=-1).max().clamp(min=1e-12) + 1e-9
    before = model.token_directions().detach().clone()
    optimizer.step()
    after = model.token_directions()
    assert torch.allclose(after.norm(dim=-1), torch.ones(VOCAB), atol=1e-6)
    assert not torch.allclose(after, before)


def test_roar_nll_expectation_matches_the_any_order_nll():
    torch.manual_seed(0)
    model = VisibleCountDenoiser(tiny_config())
    length, batch = 6, 4000
    ids = torch.randint(0, VOCAB, (batch, length))
    attention_mask = torch.ones_like(ids)
    attention_mask[batch // 2 :, 4:] = 0  # half the rows have 4 real tokens
    model.clean_ids = ids
    out = roar_nll(model, ids, attention_mask, generator=torch.Generator().manual_seed(1))

    def any_order_nll(n):  # sum over k = 0..n-1 of the CE with k visible tokens
        return sum(math.log(1 + (VOCAB - 1) * math.exp(-k)) for k in range(n))

    expected_sum = batch // 2 * (any_order_nll(6) + any_order_nll(4))
    assert out.num_tokens == batch // 2 * 10
    assert abs(out.nll_sum.item() / expected_sum - 1) < 0.03
    assert torch.allclose(out.loss, out.nll_sum / out.num_tokens)


def test_roar_nll_of_a_uniform_model_is_log_vocab(tiny_model):
    model = UniformDenoiser(tiny_config())
    ids = torch.randint(0, VOCAB, (8, 16))
    for snr_hi in (None, 100.0):
        out = roar_nll(model, ids, None, snr_hi=snr_hi, generator=torch.Generator().manual_seed(0))
        assert math.isclose(out.loss.item(), math.log(VOCAB), rel_tol=1e-6)


def test_diffusion_nll_bound_of_a_uniform_model_is_analytic():
    torch.manual_seed(0)
    model = UniformDenoiser(tiny_config())
    ids = torch.randint(0, VOCAB, (4, 8))
    out = diffusion_nll_bound(model, ids, None, snr_max=20.0, num_points=8, num_noise_draws=2)
    # x_hat is the mean direction at every SNR: 1/2 * S * ||e_x - mean(E)||^2 + log V, exactly.
    directions = model.token_directions().detach()
    squared = (directions[ids] - directions.mean(dim=0)).pow(2).sum(dim=-1)
    expected = (0.5 * 20.0 * squared + math.log(VOCAB)).mean()
    assert torch.allclose(out.loss, expected, rtol=1e-5)
    assert math.isclose(out.components["endpoint_ce"], math.log(VOCAB), rel_tol=1e-6)


def test_diffusion_nll_bound_is_tight_for_the_bayes_posterior():
    """With the exact posterior of i.i.d. uniform tokens, the I-MMSE bound equals the true NLL, log V per token."""
    torch.manual_seed(0)
    model = BayesDenoiser(tiny_config())
    ids = torch.randint(0, VOCAB, (32, 32))
    out = diffusion_nll_bound(
        model, ids, None, snr_max=100.0, num_points=96, num_noise_draws=2, generator=torch.Generator().manual_seed(0)
    )
    assert abs(out.loss.item() / math.log(VOCAB) - 1) < 0.02, out.components
    assert out.components["endpoint_ce"] < 0.01  # at s = 100 the token is all but certain
