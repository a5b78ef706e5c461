"""The known-law benchmark (`benchmarks/known_law/`): the law's exact quantities against brute force, the metrics, and
the stages end to end at a toy size."""

import itertools
import json
import math
import os
import sys

import pytest
import torch


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

from benchmarks.known_law.law import HiddenMarkovLaw, HMMLawConfig, LawSampleStream, build_law  # noqa: E402
from benchmarks.known_law.metrics import bigram_counts, bigram_kl, nfe_to_match, nll_scores  # noqa: E402
from benchmarks.known_law.run import (  # noqa: E402
    ARMS, KnownLawArguments, arm_start_model, arm_steps, arm_training_arguments, fresh_model, main, plan_cells, run,
)
from dsl_diffusion.evaluation.utils import Stage  # noqa: E402
from dsl_diffusion.modeling_dsl import DSLForMaskedDiffusion  # noqa: E402


pytestmark = pytest.mark.usefixtures("single_threaded")

TINY = HMMLawConfig(vocab_size=5, num_states=3, tokens_per_state=3, successors_per_state=1, initial_states=2, law_seed=7)


def brute_force_log_prob(law: HiddenMarkovLaw, tokens: list[int]) -> float:
    """Sum over every hidden path: the definition the forward algorithm must reproduce."""
    total = 0.0
    for path in itertools.product(range(law.num_states), repeat=len(tokens)):
        p = float(law.initial[path[0]] * law.emission[path[0], tokens[0]])
        for t in range(1, len(tokens)):
            p *= float(law.transition[path[t - 1], path[t]] * law.emission[path[t], tokens[t]])
        total += p
    return math.log(total) if total > 0 else -math.inf


def every_sequence(vocab_size: int, length: int) -> torch.LongTensor:
    return torch.tensor(list(itertools.product(range(vocab_size), repeat=length)), dtype=torch.long)


def test_forward_algorithm_matches_brute_force_and_sums_to_one():
    law = build_law(TINY)
    sequences = every_sequence(5, 4)
    log_p = law.log_prob(sequences)
    for row in sequences[::37].tolist():  # a spread of sequences, possible and impossible
        expected = brute_force_log_prob(law, row)
        got = float(law.log_prob(torch.tensor([row]))[0])
        assert (got == expected == -math.inf) or got == pytest.approx(expected, rel=1e-12, abs=1e-12)
    assert float(log_p.exp().sum()) == pytest.approx(1.0, abs=1e-12)
    # The law is sparse: impossible sequences exist (log p = -inf exactly, no NaN).
    assert torch.isneginf(log_p).any() and not torch.isnan(log_p).any()


def test_entropy_exact_and_monte_carlo_agree():
    law = build_law(TINY)
    length = 5
    exact = law.exact_entropy(length) / length
    estimate = law.monte_carlo_entropy(length, 40_000, torch.Generator().manual_seed(0))
    assert abs(estimate["entropy_per_token"] - exact) < 4 * estimate["standard_error"] + 1e-9
    assert 0 < exact < math.log(5)


def test_bigram_marginal_exact_and_against_counts():
    law = build_law(TINY)
    length = 4
    sequences = every_sequence(5, length)
    p = law.log_prob(sequences).exp()
    exact = torch.zeros(5, 5, dtype=torch.float64)
    for t in range(length - 1):
        exact.index_put_((sequences[:, t], sequences[:, t + 1]), p, accumulate=True)
    exact /= length - 1
    assert torch.allclose(law.bigram_marginal(length), exact, atol=1e-12)
    samples = law.sample(50_000, length, torch.Generator().manual_seed(1))
    counts = bigram_counts(samples, 5)
    assert torch.allclose(counts / counts.sum(), exact, atol=0.01)
    # True samples never use an impossible pair, and their KL is the small plug-in bias only.
    scores = bigram_kl(samples, exact)
    assert scores["impossible_pair_share"] == 0 and 0 <= scores["bigram_kl"] < 1e-3


def test_nll_scores_count_impossible_samples_apart():
    law = build_law(TINY)
    samples = law.sample(200, 6, torch.Generator().manual_seed(2))
    impossible = every_sequence(5, 6)[torch.isneginf(law.log_prob(every_sequence(5, 6)))][:50]
    scores = nll_scores(law, torch.cat([samples, impossible]), entropy_per_token=1.0)
    assert scores["impossible_share"] == pytest.approx(50 / 250)
    assert scores["num_possible"] == 200 and math.isfinite(scores["nll_mean"])
    assert scores["nll_excess_mean"] == pytest.approx(scores["nll_mean"] - 1.0)


def test_training_stream_is_fresh_and_law_distributed():
    law = build_law(TINY)
    stream = iter(LawSampleStream(law, length=6, seed=3, chunk_size=64))
    rows = torch.stack([next(stream)["input_ids"] for _ in range(200)])
    assert torch.isfinite(law.log_prob(rows)).all()  # every training row is possible under the law
    assert len({tuple(r) for r in rows.tolist()}) > 150  # fresh draws, not one memorizable batch repeated


def test_headline_says_no_separation_inside_the_noise_floor():
    def row(arm, steps, seed, value):
        return {"arm": arm, "sampler": "remdm", "num_steps": steps, "seed": seed, "nfe": steps, "metric": value}

    baseline = [row("b", t, s, v + 0.01 * s) for t, v in ((4, 0.6), (8, 0.4), (16, 0.3)) for s in (0, 1)]
    same = [row("c", t, s, v - 0.01 * s) for t, v in ((4, 0.6), (8, 0.4), (16, 0.3)) for s in (0, 1)]
    result = nfe_to_match(baseline, same, "metric")
    assert [e["verdict"] for e in result["entries"]] == ["no separation"] * 3
    better = [row("c", t, s, v + 0.001 * s) for t, v in ((4, 0.4), (8, 0.3), (16, 0.2)) for s in (0, 1)]
    result = nfe_to_match(baseline, better, "metric")
    entry = result["entries"][1]  # baseline at T = 8 (0.405) is reached by the candidate near NFE 4
    assert entry["separated"] and entry["speedup"] > 1.5 and "x" in entry["verdict"]


def test_stages_run_end_to_end_and_resume(tmp_path):
    out = tmp_path / "known-law"
    # A first run without oracle cells stands for a run made before they existed: its cells must be reused.
    run(KnownLawArguments(preset="ci", output_dir=str(out), oracle_seeds=[]))
    earlier = {path.name: path.stat().st_mtime_ns for path in (out / "samples").glob("*.json") if path.name != "done.json"}
    report = main(["--preset", "ci", "--output_dir", str(out)])
    for name in ("results.json", "results.md", "nll_excess_vs_nfe.png", "bigram_kl_vs_nfe.png", "ce_gap_vs_snr.png"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "nll_excess_vs_nfe.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {name: (out / "samples" / name).stat().st_mtime_ns for name in earlier} == earlier  # reused, not redrawn
    args = KnownLawArguments(preset="ci", output_dir=str(out))
    assert len(report["cells"]) == len(plan_cells(args))
    entropy = report["law"]["entropy"]["entropy_per_token"]
    for cell in report["cells"]:
        assert cell["num_samples"] == args.samples_per_cell
        assert 0 <= cell["impossible_share"] <= 1
        if cell["num_possible"]:
            assert cell["nll_mean"] >= 0 and cell["nll_excess_mean"] == pytest.approx(cell["nll_mean"] - entropy)
    # One oracle cell per (sampler, T) of the plan, beside the arm of its first cell.
    oracle = [cell for cell in report["cells"] if cell["arm"] == "oracle"]
    planned = {(c["sampler"], c["num_steps"]) for c in report["cells"] if c["arm"] != "oracle"}
    assert sorted((c["sampler"], c["num_steps"]) for c in oracle) == sorted(planned) and len(earlier) + len(oracle) == len(report["cells"])
    assert {c["beside"] for c in oracle if c["sampler"] in ("dsl-sde", "hybrid")} == {"dsl"}
    roar_oracle = next(c for c in oracle if c["sampler"] == "roar")
    assert roar_oracle["impossible_share"] == 0  # the exact conditionals never write an impossible pair
    for arm in args.arms:
        record = report["arms"][arm]
        assert math.isfinite(record["roar_nll"]["nll_per_token"]) and record["tokens"] == args.finetune_steps * args.batch_size * args.length
        assert [e["step"] for e in record["gap_history"]] == [0, 3, 6]  # gap_log_steps = 3 over 6 steps
        gap = report["denoiser_gap"][arm]
        assert gap["num_rows"] == args.gap_rows and math.isfinite(gap["endpoint"]["gap"])
        assert len(gap["per_snr"]) == (9 if ARMS[arm]["objective"] == "dsl" else 0)
    assert "## Denoiser gap" in (out / "results.md").read_text() and "| oracle / roar |" in (out / "results.md").read_text()
    # The headline: every sampler of the candidate arm against the baseline's better of MDLM and ReMDM per budget,
    # with both samplers' oracle ceilings.
    assert set(report["headline"]) == {f"dsl / {name}" for name in (
        "remdm", "dsl-sde", "hybrid", "remdm-rescore", "confidence", "dsl-sde-revision", "dsl-sde-lognormal", "hybrid-half")}
    for metrics in report["headline"].values():
        for entry in metrics["nll_excess_mean"]["entries"]:
            assert entry["baseline_sampler"] in ("mdlm", "remdm")
            assert entry["oracle_baseline"] is not None and entry["oracle_candidate_same_steps"] is not None
    assert "dsl-sharp-smooth: smoothed ROAR" in (out / "results.md").read_text()
    # Resuming finds every stage done and rewrites the same report.
    again = main(["--preset", "ci", "--output_dir", str(out)])
    assert json.dumps(again["cells"]) == json.dumps(report["cells"])
    assert json.dumps(again["denoiser_gap"]) == json.dumps(report["denoiser_gap"])


def test_sampler_oracle_shows_tokens_at_the_endpoint_snr_and_writes_its_report(tmp_path):
    """The converter-endpoint oracle is the exact posterior given z = s e_x at the visible tokens: as s grows it
    approaches the hard-evidence oracle (float32 logits: a tolerance), at s = 5 it does not; ReMDM "rescore" runs
    on it and refuses the hard oracle (whose visible token is its own certain evidence). The quick run writes the
    JSON and markdown reports."""
    from benchmarks.known_law.run import PRESETS
    from benchmarks.known_law.sampler_oracle import ConverterEndpointOracle, build
    from benchmarks.known_law.sampler_oracle import main as sampler_oracle_main
    from dsl_diffusion.pipelines.samplers import get_sampler

    law, oracle = build(PRESETS["full"])
    converter = ConverterEndpointOracle(oracle).eval()
    tokens = law.sample(4, 32, torch.Generator().manual_seed(0))
    tokens[:, 1::2] = oracle.config.mask_token_id
    masked = tokens == oracle.config.mask_token_id
    hard = oracle(input_ids=tokens).logits.softmax(-1)[masked]
    assert (converter(input_ids=tokens, endpoint_snr=1e4).logits.softmax(-1)[masked] - hard).abs().max() < 1e-4
    assert (converter(input_ids=tokens, endpoint_snr=5.0).logits.softmax(-1)[masked] - hard).abs().max() > 0.05
    out = get_sampler("remdm-rescore", num_steps=4).run(converter, batch_size=2, seq_len=32, progress_bar=False)
    assert out.nfe in (4, 5)
    with pytest.raises(ValueError, match="endpoint_inputs='table'"):
        get_sampler("remdm-rescore", num_steps=4).run(oracle, batch_size=2, seq_len=32, progress_bar=False)

    assert sampler_oracle_main(["--quick", "--steps", "4", "--samples", "20", "--output_dir", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "sampler_oracle.json").read_text())
    assert {row["label"] for row in report["rows"]} >= {"mdlm", "confidence-0.9", "remdm-rescore@s_hi=5"}
    assert "| confidence-budget | hard | 4 |" in (tmp_path / "sampler_oracle.md").read_text()


def test_recipe_search_arms_set_their_knobs(tmp_path):
    args = KnownLawArguments(preset="ci", output_dir=str(tmp_path))
    resolved = {arm: arm_training_arguments(args, arm, str(tmp_path / arm)) for arm in ARMS}
    assert resolved["dsl-sharp-token"].per_token_snr and not resolved["dsl-sharp"].per_token_snr
    assert resolved["dsl-sharp-half"].rho == 0.5 and resolved["dsl-sharp"].rho == args.rho
    low = resolved["dsl-sharp-low"]
    assert (low.lognormal_mu, low.lognormal_sigma) == (1.0, 1.5)
    assert resolved["dsl-sharp-lr"].learning_rate == resolved["dsl-sharp-lr"].dsl_learning_rate == 1e-3
    assert resolved["dsl-sharp-token-4x"].max_steps == resolved["mdlm-4x"].max_steps == 4 * args.finetune_steps
    assert resolved["dsl-sharp-token-4x"].per_token_snr and resolved["dsl-scratch"].per_token_snr
    assert resolved["dsl-sharp-smooth"].roar_smoothed and not resolved["dsl-sharp"].roar_smoothed
    mix = resolved["dsl-scratch-mix"]
    assert mix.per_token_snr and mix.per_token_snr_fraction == 0.5 and resolved["dsl-scratch"].per_token_snr_fraction == 1.0
    assert mix.build_snr_path().continuous.per_token_fraction == 0.5
    assert resolved["mdlm-4x"].objective == "mdlm"
    scratch = resolved["dsl-scratch"]
    assert arm_steps(args, "dsl-scratch") == scratch.max_steps == args.pretrain_steps + args.finetune_steps
    assert arm_steps(args, "dsl-scratch-4x") == args.pretrain_steps + arm_steps(args, "mdlm-4x")
    assert scratch.lr_scheduler_type == "cosine" and scratch.learning_rate == args.pretrain_learning_rate
    # The starting weights: the sharp converter on the pretrained weights, E frozen, or a fresh initialization.
    pretrained = fresh_model(args)
    stage = Stage(str(tmp_path), "pretrain")
    pretrained.save_pretrained(stage.path)
    sharp = arm_start_model(args, "dsl-sharp-frozen", stage)
    assert float(sharp.converter_beta.detach()) == 3.0
    assert float(sharp.converter_bias.detach()[-1]) == pytest.approx(math.log(args.vocab_size))
    assert torch.equal(sharp.converter_bias[:-1], pretrained.converter_bias[:-1].detach())
    assert not sharp.token_directions.weight.requires_grad and sharp.backbone.vocab_embed.embedding.requires_grad
    plain = arm_start_model(args, "dsl", stage)
    assert torch.equal(plain.converter_beta, pretrained.converter_beta) and plain.token_directions.weight.requires_grad
    assert isinstance(arm_start_model(args, "dsl-scratch", stage), DSLForMaskedDiffusion)
