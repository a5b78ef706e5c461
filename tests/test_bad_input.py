"""Bad input never passes silently: hostile but realistic inputs to every public object and console script.

Each case asserts the exception type and a fragment of the message (which names the bad value, the accepted range
or the fix). Areas: the config, the model (forward, noisy states, loading), the samplers, the pipeline, the
trainer's arguments, the metrics and the console scripts. Everything runs on the tiny model of ``helpers.py``; the
console-script cases run in-process, except one subprocess that checks the exit status.
"""

import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch
from huggingface_hub.errors import StrictDataclassFieldValidationError
from safetensors.torch import save_file

from dsl_diffusion.evaluation.metrics import compute_mauve, compute_unigram_entropy, unigram_entropy
from dsl_diffusion.modeling_dsl import DSLForMaskedDiffusion
from dsl_diffusion.pipelines.samplers import get_sampler, snr_grid
from dsl_diffusion.trainer.trainer import CHECKPOINT_COMPLETE_NAME, DSLTrainer, DSLTrainingArguments
from helpers import tiny_dsl_config, tiny_dsl_model, word_level_tokenizer
from mdlm_reference import random_mdlm_state_dict

pytestmark = pytest.mark.usefixtures("single_threaded")

NAN, INF = math.nan, math.inf


def raises(exception, fragment):
    """pytest.raises matching a literal fragment of the message."""
    return pytest.raises(exception, match=re.escape(fragment))


# ---------------------------------------------------------------------------------------------------------------
# Shared tiny objects
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model():
    return tiny_dsl_model(pad_token_id=0, eos_token_id=2)


@pytest.fixture(scope="module")
def tokenizer():
    words = ["[PAD]", "[UNK]", "[EOS]"] + [f"w{i}" for i in range(29)] + ["[MASK]"]  # [MASK] = 32 = vocab_size
    special = dict(pad_token="[PAD]", unk_token="[UNK]", bos_token="[EOS]", eos_token="[EOS]", mask_token="[MASK]")
    return word_level_tokenizer(words, "[UNK]", **special)


@pytest.fixture(scope="module")
def pipe(model, tokenizer):
    from transformers import pipeline

    import dsl_diffusion.pipelines  # noqa: F401  (registers the task)

    return pipeline("diffusion-text-generation", model=model, tokenizer=tokenizer, device="cpu", progress_bar=False)


@pytest.fixture(scope="module")
def saved_model(model, tokenizer, tmp_path_factory):
    folder = tmp_path_factory.mktemp("saved") / "tiny-dsl"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 32, (2, 8), generator=torch.Generator().manual_seed(0))


# ---------------------------------------------------------------------------------------------------------------
# DSLConfig: every field
# ---------------------------------------------------------------------------------------------------------------

CONFIG_CASES = [
    # sizes: integers >= 1, checked before any default is derived from them
    (dict(vocab_size=0), ValueError, "vocab_size=0 must be an integer >= 1"),
    (dict(vocab_size=-3), ValueError, "vocab_size=-3 must be an integer >= 1"),
    (dict(hidden_size=0), ValueError, "hidden_size=0 must be an integer >= 1"),
    (dict(hidden_size=-32), ValueError, "hidden_size=-32 must be an integer >= 1"),
    (dict(num_hidden_layers=-1), ValueError, "num_hidden_layers=-1 must be an integer >= 1"),
    (dict(num_hidden_layers=0), ValueError, "num_hidden_layers=0 must be an integer >= 1"),
    (dict(num_attention_heads=0), ValueError, "num_attention_heads=0 must be an integer >= 1"),
    (dict(num_attention_heads=3), ValueError, "hidden_size=32 must be divisible by num_attention_heads=3"),
    (dict(num_attention_heads=32), ValueError, "head dimension 1 must be even"),
    (dict(intermediate_size=0), ValueError, "intermediate_size=0 must be an integer >= 1"),
    (dict(cond_dim=0), ValueError, "cond_dim=0 must be an integer >= 1"),
    (dict(converter_chunk_size=0), ValueError, "converter_chunk_size=0 must be an integer >= 1"),
    (dict(converter_top_k=-2), ValueError, "converter_top_k=-2 must be an integer >= 1"),
    (dict(cond_dim=0, snr_conditioning="norm"), ValueError, "cond_dim=0 must be an integer >= 1"),
    (dict(max_position_embeddings=0), ValueError, "max_position_embeddings=0 must be an integer >= 1"),
    (dict(embed_dim=0), ValueError, "embed_dim=0 must be an integer >= 1"),
    (dict(embed_dim=-4, converter_beta_init=None), ValueError, "embed_dim=-4 must be an integer >= 1"),
    # floats: finite and in range
    (dict(snr_max=NAN), ValueError, "snr_max=nan must be a finite number in (0, inf)"),
    (dict(snr_max=INF), ValueError, "snr_max=inf must be a finite number in (0, inf)"),
    (dict(snr_max=0), ValueError, "snr_max=0 must be a finite number in (0, inf)"),
    (dict(snr_max=-1.0), ValueError, "snr_max=-1.0 must be a finite number"),
    (dict(layer_norm_eps=-1.0), ValueError, "layer_norm_eps=-1.0 must be a finite number in (0, 1]"),
    (dict(layer_norm_eps=0.0), ValueError, "layer_norm_eps=0.0 must be a finite number in (0, 1]"),
    (dict(layer_norm_eps=NAN), ValueError, "layer_norm_eps=nan"),
    (dict(rope_theta=0.0), ValueError, "rope_theta=0.0 must be a finite number in (1, inf)"),
    (dict(rope_theta=1.0), ValueError, "The rotary base must exceed 1"),
    (dict(rope_theta=INF), ValueError, "rope_theta=inf"),
    (dict(converter_beta_init=NAN), ValueError, "converter_beta_init=nan must be a finite number in (0, inf)"),
    (dict(converter_beta_init=0.0), ValueError, "converter_beta_init=0.0"),
    (dict(converter_beta_init=-1.0), ValueError, "inverse temperature"),
    (dict(converter_mask_bias=INF), ValueError, "converter_mask_bias=inf must be a finite number"),
    (dict(converter_mask_bias=NAN), ValueError, "converter_mask_bias=nan"),
    (dict(direction_init_std=0.0), ValueError, "direction_init_std=0.0 must be a finite number in (0, inf)"),
    (dict(direction_init_std=-1.0), ValueError, "direction_init_std=-1.0"),
    (dict(initializer_range=-0.02), ValueError, "initializer_range=-0.02 must be a finite number in [0, inf)"),
    (dict(initializer_range=NAN), ValueError, "initializer_range=nan"),
    (dict(dropout=1.0), ValueError, "dropout=1.0 must be a finite number in [0, 1)"),
    (dict(dropout=-0.1), ValueError, "dropout=-0.1"),
    (dict(dropout=NAN), ValueError, "dropout=nan"),
    # choices and ids
    (dict(snr_conditioning="Norm"), ValueError, "snr_conditioning='Norm' is not supported; accepted: ('none', 'norm')"),
    (dict(snr_conditioning="norm", time_conditioning=True), ValueError, "both claim the adaLN input"),
    (dict(mask_token_id=5), ValueError, "mask_token_id=5 must equal vocab_size=32"),
    (dict(mask_token_id=-1), ValueError, "mask_token_id=-1 is outside the input vocabulary [0, 32]"),
    (dict(pad_token_id=-1), ValueError, "pad_token_id=-1 is outside the input vocabulary [0, 32]"),
    (dict(eos_token_id=99), ValueError, "eos_token_id=99 is outside the input vocabulary [0, 32]"),
    (dict(vocab_size="32"), StrictDataclassFieldValidationError, "Field 'vocab_size' expected int"),
]


@pytest.mark.parametrize("overrides, exception, fragment", CONFIG_CASES, ids=[str(case[0]) for case in CONFIG_CASES])
def test_config_rejects(overrides, exception, fragment):
    with raises(exception, fragment):
        tiny_dsl_config(**overrides)


def test_config_validates_before_deriving_defaults():
    # embed_dim=0 would divide by zero in 1/sqrt(embed_dim); the size error must come first.
    with raises(ValueError, "embed_dim=0 must be an integer >= 1"):
        tiny_dsl_config(embed_dim=0, converter_beta_init=None)


def test_config_validates_sizes_given_with_mdlm_names():
    with raises(ValueError, "num_hidden_layers=0 must be an integer >= 1"):
        tiny_dsl_config(vocab_size=33, mask_token_id=None, n_blocks=0)


# ---------------------------------------------------------------------------------------------------------------
# The model: forward and noisy_states
# ---------------------------------------------------------------------------------------------------------------


def _states(model, ids, snr=5.0):
    return model.noisy_states(ids, snr, generator=torch.Generator().manual_seed(0))


FORWARD_CASES = [
    ("nan states", lambda m, ids: m(noisy_states=_states(m, ids) * NAN), ValueError, "noisy_states contain NaN or infinite"),
    ("inf states", lambda m, ids: m(noisy_states=_states(m, ids) + INF), ValueError, "noisy_states contain NaN or infinite"),
    ("integer states", lambda m, ids: m(noisy_states=_states(m, ids).long()), TypeError, "noisy_states must be a float tensor"),
    ("ids as states", lambda m, ids: m(noisy_states=ids), TypeError, "token ids go to `input_ids`"),
    ("typo attention_masks", lambda m, ids: m(input_ids=ids, attention_masks=torch.ones_like(ids)), TypeError,
     "unexpected arguments ['attention_masks']"),
    ("typo noisy_state", lambda m, ids: m(input_ids=ids, noisy_state=None), TypeError, "unexpected arguments ['noisy_state']"),
    ("irrelevant timesteps", lambda m, ids: m(input_ids=ids, timesteps=torch.zeros(2)), ValueError,
     "timesteps were given but this model has time_conditioning=False"),
    ("endpoint_snr with states", lambda m, ids: m(noisy_states=_states(m, ids), endpoint_snr=50.0), ValueError,
     "endpoint_snr applies to input_ids"),
    ("nan endpoint_snr", lambda m, ids: m(input_ids=ids, endpoint_snr=NAN), ValueError, "endpoint_snr=nan must be a finite number > 0"),
    ("output_attentions", lambda m, ids: m(input_ids=ids, output_attentions=True), ValueError, "output_attentions=True is not supported"),
    ("mask value 2", lambda m, ids: m(input_ids=ids, attention_mask=torch.full_like(ids, 2)), ValueError,
     "attention_mask must hold only 0 (padding) and 1"),
    ("mask value 0.5", lambda m, ids: m(input_ids=ids, attention_mask=torch.full(ids.shape, 0.5)), ValueError,
     "got values [0.5]"),
    ("mask value -1", lambda m, ids: m(input_ids=ids, attention_mask=-torch.ones_like(ids)), ValueError, "got values [-1]"),
    ("mask not a tensor", lambda m, ids: m(input_ids=ids, attention_mask=[[1] * 8] * 2), TypeError,
     "attention_mask must be a tensor of 0/1"),
    ("mask shape", lambda m, ids: m(input_ids=ids, attention_mask=torch.ones(2, 7)), ValueError, "attention_mask must be [2, 8]"),
    ("both inputs", lambda m, ids: m(input_ids=ids, noisy_states=_states(m, ids)), ValueError, "pass exactly one of"),
    ("no input", lambda m, ids: m(), ValueError, "pass exactly one of"),
    ("ids too large", lambda m, ids: m(input_ids=ids + 40), ValueError, "input_ids must lie in [0, 32]"),
    ("float ids", lambda m, ids: m(input_ids=ids.float()), TypeError, "input_ids must be an integer tensor of token ids, got torch.float32"),
    ("states wrong width", lambda m, ids: m(noisy_states=torch.zeros(2, 8, 5)), ValueError, "noisy_states must be [batch, length, 8]"),
    ("noisy_states ids -1", lambda m, ids: m.noisy_states(ids.masked_fill(ids == ids[0, 0], -1), 1.0), ValueError,
     "input_ids must lie in [0, 32]"),
    ("noisy_states ids 33", lambda m, ids: m.noisy_states(ids + 33, 1.0), ValueError, "got range [33,"),
    ("noisy_states float ids", lambda m, ids: m.noisy_states(ids.float(), 1.0), TypeError, "input_ids must be an integer tensor"),
    ("noisy_states nan snr", lambda m, ids: m.noisy_states(ids, NAN), ValueError, "snr must be finite and >= 0"),
    ("noisy_states negative snr", lambda m, ids: m.noisy_states(ids, -1.0), ValueError, "snr must be finite and >= 0"),
    ("noisy_states snr shape", lambda m, ids: m.noisy_states(ids, torch.ones(3)), ValueError, "a per-sequence snr must have shape [2]"),
]


@pytest.mark.parametrize("call, exception, fragment", [case[1:] for case in FORWARD_CASES], ids=[case[0] for case in FORWARD_CASES])
def test_model_rejects(model, ids, call, exception, fragment):
    with raises(exception, fragment), torch.no_grad():
        call(model, ids)


def test_model_accepts_what_transformers_passes(model, ids):
    with torch.no_grad():
        reference = model(input_ids=ids).logits
        passed = model(input_ids=ids, attention_mask=torch.ones_like(ids, dtype=torch.bool), use_cache=False,
                       output_attentions=False, num_items_in_batch=16).logits
    torch.testing.assert_close(passed, reference)


def test_mask_token_id_at_vocab_size_is_not_warned_about(tmp_path, caplog):
    """[MASK] = vocab_size is the library's convention, not bad input: transformers' generic check (ids in
    [0, vocab_size)) must not warn about it when a config is built, validated, saved or loaded."""
    from transformers.utils import logging as hf_logging

    hf_logging.enable_propagation()
    try:
        config = tiny_dsl_config(pad_token_id=0, bos_token_id=2, eos_token_id=2)
        config.validate()
        config.save_pretrained(tmp_path)
        type(config).from_pretrained(tmp_path).validate()
    finally:
        hf_logging.disable_propagation()
    assert config.mask_token_id == config.vocab_size
    assert "within the vocabulary" not in caplog.text


def test_model_warns_beyond_max_position_embeddings(model, caplog):
    from transformers.utils import logging as hf_logging

    hf_logging.enable_propagation()
    try:
        with torch.no_grad():
            model(input_ids=torch.zeros(1, 65, dtype=torch.long))
    finally:
        hf_logging.disable_propagation()
    assert "sequence length 65 exceeds max_position_embeddings=64" in caplog.text


# ---------------------------------------------------------------------------------------------------------------
# Loading checkpoints
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def broken_folders(saved_model, tmp_path_factory):
    import shutil

    root = tmp_path_factory.mktemp("broken")
    truncated, not_json, deeper, as_mdlm = (root / name for name in ("truncated", "not_json", "deeper", "as_mdlm"))
    for folder in (truncated, not_json, deeper):
        shutil.copytree(saved_model, folder)
    weights = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    (not_json / "config.json").write_text("{'vocab_size': 32,")
    tiny_dsl_model(num_hidden_layers=3).save_pretrained(deeper)
    config = json.loads((deeper / "config.json").read_text())
    (deeper / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 2}))
    return {"truncated": truncated, "not_json": not_json, "deeper": deeper, "dsl": saved_model, "root": root}


LOADING_CASES = [
    ("missing absolute folder", "from_pretrained", lambda f: f["root"] / "nothere", FileNotFoundError, "does not exist"),
    ("missing relative folder", "from_pretrained", lambda f: "./no-such-model", FileNotFoundError,
     "'./no-such-model' does not exist"),
    ("missing nested folder", "from_pretrained", lambda f: "runs/a/final", FileNotFoundError, "Hub repo id of the form 'owner/name'"),
    ("truncated weights", "from_pretrained", lambda f: f["truncated"], OSError, "model.safetensors is not a readable safetensors file"),
    ("non-JSON config", "from_pretrained", lambda f: f["not_json"], ValueError, "config.json is not valid JSON"),
    ("more blocks than config", "from_pretrained", lambda f: f["deeper"], ValueError, "weights that its config has no place for"),
    ("mdlm: missing folder", "from_mdlm", lambda f: f["root"] / "nothere", FileNotFoundError, "does not exist"),
    ("mdlm: truncated weights file", "from_mdlm", lambda f: f["truncated"] / "model.safetensors", OSError, "probably truncated"),
    ("mdlm: non-JSON config", "from_mdlm", lambda f: f["not_json"], ValueError, "config.json is not valid JSON"),
    ("mdlm: a DSL folder", "from_mdlm", lambda f: f["dsl"], ValueError, "is already a DSL model"),
]


@pytest.mark.parametrize("method, path, exception, fragment", [case[1:] for case in LOADING_CASES], ids=[case[0] for case in LOADING_CASES])
def test_loading_rejects(broken_folders, method, path, exception, fragment):
    with raises(exception, fragment):
        getattr(DSLForMaskedDiffusion, method)(path(broken_folders))


@pytest.mark.parametrize(
    "overrides, fragment",
    [(dict(snr_max=-3.0), "snr_max=-3.0 must be a finite number"), (dict(embed_dim=0), "embed_dim=0 must be an integer >= 1"),
     (dict(vocab_size=40), "mask_token_id=32 must equal vocab_size=40")],
)
def test_loading_validates_keyword_overrides(saved_model, overrides, fragment):
    # transformers sets these after the config is built, bypassing its constructor's checks.
    with raises(ValueError, fragment):
        DSLForMaskedDiffusion.from_pretrained(saved_model, **overrides)


def test_from_mdlm_asks_for_the_head_count_it_cannot_infer():
    state_dict = random_mdlm_state_dict(vocab_with_mask=41, hidden=32, blocks=2, cond=16)
    with raises(ValueError, "hidden_size=32 is below MDLM's head dimension 64, so the head count cannot be inferred"):
        DSLForMaskedDiffusion.from_mdlm(state_dict)


def test_loading_through_auto_model_names_the_truncated_file(broken_folders):
    from transformers import AutoModel

    with raises(OSError, str(broken_folders["truncated"] / "model.safetensors")):
        AutoModel.from_pretrained(broken_folders["truncated"])


# ---------------------------------------------------------------------------------------------------------------
# Samplers
# ---------------------------------------------------------------------------------------------------------------

SAMPLER_CASES = [
    ("dsl-sde", dict(snr_min=5.0, snr_max=1.0), ValueError, "snr_max=1.0 is outside the accepted range (5.0, inf)"),
    ("dsl-sde", dict(snr_min=NAN), ValueError, "snr_min=nan"),
    ("dsl-sde", dict(snr_max=INF), ValueError, "snr_max=inf"),
    ("dsl-sde", dict(lognormal_std=0.0), ValueError, "lognormal_std=0.0"),
    ("dsl-sde", dict(lognormal_mean=NAN), ValueError, "lognormal_mean=nan"),
    ("dsl-sde", dict(snr_schedule="cosine"), ValueError, "snr_schedule='cosine' is not supported"),
    ("mdlm", dict(num_steps=0), ValueError, "num_steps=0 must be >= 1"),
    ("mdlm", dict(num_steps=2.5), TypeError, "num_steps must be an int"),
    ("mdlm", dict(num_steps=True), TypeError, "num_steps must be an int"),
    ("mdlm", dict(top_p=NAN), ValueError, "top_p=nan is outside the accepted range (0.0, 1.0]"),
    ("mdlm", dict(top_p=0.0), ValueError, "top_p=0.0"),
    ("mdlm", dict(temperature=INF), ValueError, "temperature=inf"),
    ("mdlm", dict(use_cache="yes"), TypeError, "use_cache must be True or False"),
    ("remdm", dict(eta=INF), ValueError, "eta=inf is outside the accepted range [0.0, 1.0]"),
    ("remdm", dict(strategy="loop", t_on=0.1, t_off=0.5), ValueError, "t_off=0.5 must be < t_on=0.1"),
    ("remdm", dict(strategy="greedy"), ValueError, "strategy='greedy' is not supported"),
    ("hybrid", dict(num_steps=4, continuous_steps=4), ValueError, "continuous_steps"),
    ("hybrid", dict(commit_threshold=NAN), ValueError, "commit_threshold=nan"),
    ("roar", dict(eta=0.1), ValueError, "not knobs of sampler 'roar'"),
    ("ddim", dict(), ValueError, "sampler='ddim' is not supported"),
]


@pytest.mark.parametrize("name, knobs, exception, fragment", SAMPLER_CASES, ids=[f"{c[0]}-{c[1]}" for c in SAMPLER_CASES])
def test_sampler_config_rejects(name, knobs, exception, fragment):
    with raises(exception, fragment):
        get_sampler(name, **knobs)


SAMPLER_RUN_CASES = [
    ("snr_min above the model's snr_max", "dsl-sde", dict(snr_min=200.0), {}, ValueError,
     "snr_min=200.0 must be < snr_max=100.0: the log-linear SNR grid rises"),
    ("hybrid snr_star above s_hi", "hybrid", dict(snr_star=1e9), {}, ValueError, "snr_star=1000000000.0 must be <= s_hi=100.0"),
    ("float input_ids", "mdlm", {}, dict(input_ids=torch.full((1, 4), 32.0)), ValueError, "input_ids must be a LongTensor"),
    ("input_ids beyond [MASK]", "mdlm", {}, dict(input_ids=torch.full((1, 4), 40)), ValueError, "input_ids must lie in [0, 32]"),
    ("attention_mask 2", "mdlm", {}, dict(input_ids=torch.full((1, 4), 32), attention_mask=torch.full((1, 4), 2)), ValueError,
     "attention_mask must hold only 0 (padding) and 1"),
    ("batch_size 0", "mdlm", {}, dict(batch_size=0), ValueError, "batch_size=0 must be an integer >= 1"),
    ("seq_len 0", "mdlm", {}, dict(seq_len=0), ValueError, "seq_len=0 must be an integer >= 1"),
    ("generator list too short", "mdlm", {}, dict(batch_size=2, generator=[torch.Generator()]), ValueError,
     "got 1 generators for a batch of 2 rows"),
    ("generator of the wrong type", "mdlm", {}, dict(generator=7), TypeError, "generator must be None, a torch.Generator"),
    ("return_trajectory 'no'", "mdlm", {}, dict(return_trajectory="no"), TypeError, "return_trajectory must be True or False"),
    ("progress_bar None", "mdlm", {}, dict(progress_bar=None), TypeError, "progress_bar must be True or False"),
    ("synced_gpus 1", "mdlm", {}, dict(synced_gpus=1), TypeError, "synced_gpus must be True or False"),
    ("callback not callable", "mdlm", {}, dict(callback=[]), TypeError, "callback must be callable"),
    ("decreasing snr_grid", "dsl-sde", {}, dict(snr_grid=torch.tensor([1.0, 0.5, 2.0])), ValueError,
     "snr_grid must be finite, >= 0 and non-decreasing"),
]


@pytest.mark.parametrize("name, knobs, run_kwargs, exception, fragment", [c[1:] for c in SAMPLER_RUN_CASES], ids=[c[0] for c in SAMPLER_RUN_CASES])
def test_sampler_run_rejects(model, name, knobs, run_kwargs, exception, fragment):
    sampler = get_sampler(name, num_steps=2, **knobs)
    run_kwargs = {"seq_len": 4, **run_kwargs} if "input_ids" not in run_kwargs else run_kwargs
    with raises(exception, fragment):
        sampler.run(model, **{"progress_bar": False, **run_kwargs})


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(schedule="log-linear", num_steps=4, snr_max=1.0, snr_min=2.0), "snr_min=2.0 must be < snr_max=1.0"),
        (dict(schedule="linear", num_steps=4, snr_max=NAN), "snr_max=nan"),
        (dict(schedule="log-normal", num_steps=4, snr_max=-1.0), "snr_max=-1.0"),
    ],
)
def test_snr_grid_rejects(kwargs, fragment):
    with raises(ValueError, fragment):
        snr_grid(**kwargs)


# ---------------------------------------------------------------------------------------------------------------
# The pipeline
# ---------------------------------------------------------------------------------------------------------------

FAST = dict(num_steps=2, seed=0, max_length=10)

PIPELINE_CASES = [
    ("unclosed marker", "w1 [MASK w2", {}, ValueError, "the prompt contains '[MASK ', which looks like a malformed infill marker"),
    ("lower-case marker", "w1 [mask] w2", {}, ValueError, "'[mask]', which looks like a malformed infill marker"),
    ("unopened marker", "w1 MASK] w2", {}, ValueError, "'MASK]'"),
    ("angle-bracket marker", "w1 <mask> w2", {}, ValueError, "write the mask token exactly as '[MASK]'"),
    ("spaced marker", "w1 [ MASK ] w2", {}, ValueError, "'[ MASK ]'"),
    ("return_full_text 'no'", "w1", dict(return_full_text="no"), TypeError, "return_full_text must be True or False, got 'no'"),
    ("return_text 0", "w1", dict(return_text=0), TypeError, "return_text must be True or False"),
    ("skip_special_tokens 'false'", "w1", dict(skip_special_tokens="false"), TypeError, "skip_special_tokens must be True or False"),
    ("return_trajectory 1", "w1", dict(return_trajectory=1), TypeError, "return_trajectory must be True or False"),
    ("callback_on_step_end not callable", "w1", dict(callback_on_step_end="print"), TypeError,
     "callback_on_step_end must be callable"),
    ("snr_min above snr_max", "w1", dict(sampler="dsl-sde", snr_min=500.0), ValueError, "snr_min=500.0 must be < snr_max=100.0"),
    ("unknown argument", "w1", dict(temprature=0.5), TypeError, "got unexpected arguments ['temprature']"),
    ("unknown sampler", "w1", dict(sampler="ancestral"), ValueError, "sampler='ancestral' is not supported"),
    ("negative seed", "w1", dict(seed=-1), ValueError, "seed=-1 must be an integer >= 0"),
    ("max_length float", "w1", dict(max_length=1.5), ValueError, "max_length=1.5 must be a non-negative integer"),
    ("prompt longer than max_length", "w1 w2 w3", dict(max_length=2), ValueError, "more than the sequence length max_length=2"),
    ("num_return_sequences 0", "w1", dict(num_return_sequences=0), ValueError, "num_return_sequences=0 must be an integer >= 1"),
    ("batch_size 0", ["w1", "w2"], dict(batch_size=0), ValueError, "batch_size=0 must be an integer >= 1"),
    ("a list with a number", ["w1", 3], {}, TypeError, "an input must be None or a string, got int (3)"),
    ("nan top_p", "w1", dict(top_p=NAN), ValueError, "top_p=nan"),
]


@pytest.mark.parametrize("prompt, kwargs, exception, fragment", [c[1:] for c in PIPELINE_CASES], ids=[c[0] for c in PIPELINE_CASES])
def test_pipeline_rejects(pipe, prompt, kwargs, exception, fragment):
    with raises(exception, fragment):
        pipe(prompt, **{**FAST, **kwargs})


def test_pipeline_accepts_the_exact_marker_and_the_plain_word(pipe):
    infilled = pipe("w1 [MASK] w2", **FAST)
    assert len(infilled) == 1 and infilled[0]["generated_text"].startswith("w1 ")
    assert pipe("w1 mask w2", **FAST)[0]["nfe"] >= 1  # "mask" as a word is text, not a marker


# ---------------------------------------------------------------------------------------------------------------
# Trainer arguments
# ---------------------------------------------------------------------------------------------------------------

TRAINING_CASES = [
    (dict(roar_lambda=INF), "roar_lambda=inf must be a finite weight >= 0"),
    (dict(roar_lambda=NAN), "roar_lambda=nan"),
    (dict(roar_lambda=-0.5), "roar_lambda=-0.5"),
    (dict(dsl_learning_rate=INF), "dsl_learning_rate=inf must be a finite number > 0"),
    (dict(dsl_learning_rate=NAN), "dsl_learning_rate=nan"),
    (dict(dsl_learning_rate=-1e-3), "dsl_learning_rate=-0.001"),
    (dict(learning_rate=-1e-3), "learning_rate=-0.001 must be a finite number >= 0"),
    (dict(learning_rate=NAN), "learning_rate=nan"),
    (dict(learning_rate=INF), "learning_rate=inf"),
    (dict(weight_decay=NAN), "weight_decay=nan must be a finite number >= 0"),
    (dict(dsl_weight_decay=INF), "dsl_weight_decay=inf"),
    (dict(max_grad_norm=NAN), "max_grad_norm=nan"),
    (dict(lognormal_sigma=INF), "lognormal_sigma=inf must be a finite number > 0"),
    (dict(lognormal_mu=NAN), "lognormal_mu=nan must be finite"),
    (dict(snr_min=INF), "snr_min=inf must be a finite SNR > 0"),
    (dict(smoothed_snr_lo=0.0), "smoothed_snr_lo=0.0"),
    (dict(snr_max=INF), "snr_max=inf must be a finite SNR > 0"),
    (dict(rho=NAN), "rho=nan (ROAR fraction) must lie in [0, 1]"),
    (dict(per_token_snr=True, per_token_snr_fraction=NAN), "per_token_snr_fraction=nan (share of per-token rows)"),
    (dict(per_token_snr_fraction=0.5), "per_token_snr_fraction=0.5 needs per_token_snr=True"),
    (dict(time_eps=1.0), "time_eps=1.0 must lie in (0, 1)"),
    (dict(ema_decay=1.0), "ema_decay=1.0 must lie in [0, 1)"),
    (dict(objective="elbo"), "objective='elbo' is not supported"),
    (dict(per_device_eval_batch_size=0), "per_device_eval_batch_size=0 must be an integer >= 1"),
]


@pytest.mark.parametrize("overrides, fragment", TRAINING_CASES, ids=[str(c[0]) for c in TRAINING_CASES])
def test_training_arguments_reject(tmp_path, overrides, fragment):
    with raises(ValueError, fragment):
        DSLTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", **overrides)


def test_dsl_parameter_patterns_must_match_a_parameter(tmp_path, model):
    args = DSLTrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, report_to="none", dsl_parameter_patterns=["token_embeddings"]
    )
    trainer = DSLTrainer(model=tiny_dsl_model(), args=args)
    with raises(ValueError, "dsl_parameter_patterns=['token_embeddings'] match no parameter of the model"):
        trainer.create_optimizer()


@pytest.fixture
def run_dir(tmp_path):
    """An output folder with a complete checkpoint-2 and an interrupted checkpoint-4 (no completion marker)."""
    for step, complete in ((2, True), (4, False)):
        folder = tmp_path / "out" / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        if complete:
            (folder / CHECKPOINT_COMPLETE_NAME).write_text(json.dumps({"global_step": step}))
    return tmp_path / "out"


def test_resume_checkpoint_resolution(run_dir, tmp_path):
    from dsl_diffusion.trainer.finetune import resolve_resume_checkpoint

    assert resolve_resume_checkpoint("last", str(run_dir)) == str(run_dir / "checkpoint-2")
    assert resolve_resume_checkpoint(None, str(run_dir)) is None
    with raises(ValueError, f"{run_dir / 'checkpoint-4'} has no {CHECKPOINT_COMPLETE_NAME} marker"):
        resolve_resume_checkpoint(str(run_dir / "checkpoint-4"), str(run_dir))
    with raises(FileNotFoundError, "is not an existing checkpoint folder"):
        resolve_resume_checkpoint(str(run_dir / "checkpoint-9"), str(run_dir))
    with raises(ValueError, "has no complete checkpoint-N folder"):
        resolve_resume_checkpoint("last", str(tmp_path / "fresh"))


FINETUNE_CASES = [
    ("incomplete resume checkpoint", ["--resume_from_checkpoint", "{run}/checkpoint-4"], ValueError, "marker"),
    ("resume last without checkpoints", ["--resume_from_checkpoint", "last", "--output_dir", "{tmp}/fresh"], ValueError,
     "has no complete checkpoint-N folder"),
    ("missing model folder", ["--model_name_or_path", "{tmp}/no-model"], FileNotFoundError, "no-model' does not exist"),
    ("missing MDLM checkpoint", ["--mdlm_checkpoint", "./no-mdlm"], FileNotFoundError, "'./no-mdlm' does not exist"),
    ("negative learning rate", ["--learning_rate=-1e-3"], ValueError, "learning_rate=-0.001 must be a finite number >= 0"),
    ("nan learning rate", ["--learning_rate", "nan"], ValueError, "learning_rate=nan"),
    ("infinite DSL learning rate", ["--dsl_learning_rate", "inf"], ValueError, "dsl_learning_rate=inf"),
    ("batch size 0", ["--per_device_train_batch_size", "0"], ValueError, "per_device_train_batch_size=0 must be an integer >= 1"),
    ("accumulation 0", ["--gradient_accumulation_steps", "0"], ValueError, "gradient_accumulation_steps=0"),
    ("nan LoRA alpha", ["--lora_r", "4", "--lora_alpha", "nan"], ValueError, "lora_alpha=nan must be a finite number > 0"),
    ("misspelled override", ["--config_overrides", "embeddim=8"], ValueError,
     "config_overrides='embeddim=8': key embeddim isn't in the original config dict"),
    ("override out of range", ["--config_overrides", "embed_dim=0"], ValueError, "embed_dim=0 must be an integer >= 1"),
    ("override of a loaded model", ["--model_name_or_path", "{model}", "--tokenizer_name", "{model}", "--config_overrides",
                                    "snr_max=-3"], ValueError, "snr_max=-3.0 must be a finite number"),
    ("missing tokenizer folder", ["--tokenizer_name", "./no-tokenizer"], FileNotFoundError, "'./no-tokenizer' does not exist"),
]


@pytest.mark.parametrize("extra, exception, fragment", [c[1:] for c in FINETUNE_CASES], ids=[c[0] for c in FINETUNE_CASES])
def test_finetune_rejects_before_loading_data(run_dir, tmp_path, saved_model, extra, exception, fragment):
    from dsl_diffusion.trainer.finetune import run

    replacements = {"{run}": str(run_dir), "{tmp}": str(tmp_path), "{model}": str(saved_model)}
    for placeholder, value in replacements.items():
        extra = [token.replace(placeholder, value) for token in extra]
    argv = [
        "--output_dir", str(run_dir), "--use_cpu", "--report_to", "none", "--tokenizer_name", "gpt2",
        # A data file that does not exist: each check must fire before any data is read.
        "--dataset", str(tmp_path / "missing.txt"),
        *extra,
    ]  # fmt: skip
    with raises(exception, fragment):
        run(argv)


@pytest.mark.parametrize(
    "content, kwargs, exception, fragment",
    [
        ("not json\n", {}, ValueError, "as one JSON object per line (.jsonl) or a JSON list of objects (.json): ArrowInvalid"),
        ('{"body": "w1 w2"}\n', {}, ValueError, "text_column='text' is not a column of the dataset; its columns are ['body']"),
        (None, {}, ValueError, "Local data file(s) not found"),
        ('{"text": "w1 w2"}\n', dict(packing="sliding"), ValueError, "packing='sliding'; accepted: ('wrapped', 'padded')"),
    ],
    ids=["not JSON", "no text column", "missing file", "unknown packing"],
)
def test_data_rejects(tmp_path, tokenizer, content, kwargs, exception, fragment):
    from dsl_diffusion.trainer.data import build_datasets

    path = tmp_path / "corpus.jsonl"
    if content is not None:
        path.write_text(content)
    with raises(exception, fragment):
        build_datasets(str(path), tokenizer, 16, **kwargs)


# ---------------------------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------------------------

FEATURES = torch.randn(20, 4, generator=torch.Generator().manual_seed(0)).numpy()

METRIC_CASES = [
    ("mauve scaling nan", lambda: compute_mauve(p_features=FEATURES, q_features=FEATURES, mauve_scaling_factor=NAN),
     ValueError, "mauve_scaling_factor must be a finite number > 0"),
    ("mauve scaling inf", lambda: compute_mauve(p_features=FEATURES, q_features=FEATURES, mauve_scaling_factor=INF),
     ValueError, "got inf"),
    ("mauve scaling 0", lambda: compute_mauve(p_features=FEATURES, q_features=FEATURES, mauve_scaling_factor=0), ValueError,
     "got 0"),
    ("mauve nan features", lambda: compute_mauve(p_features=FEATURES * NAN, q_features=FEATURES), ValueError,
     "contains NaN or infinite values"),
    ("mauve unequal counts", lambda: compute_mauve(p_features=FEATURES, q_features=FEATURES[:10]), ValueError,
     "MAUVE got 20 references and 10 samples"),
    ("mauve both texts and features", lambda: compute_mauve(p_text=["a"], p_features=FEATURES, q_features=FEATURES),
     ValueError, "exactly one of them"),
    ("entropy of negative ids", lambda: unigram_entropy([5, -100, -100, 7]), ValueError, "token ids must be >= 0, got -100"),
    ("entropy of bool ids", lambda: unigram_entropy(torch.tensor([True, False])), TypeError, "token ids must be integers"),
    ("entropy of float ids", lambda: unigram_entropy([1.5, 2.0]), TypeError, "token ids must be integers"),
    ("entropy of nothing", lambda: unigram_entropy([]), ValueError, "empty sequence"),
    ("batch entropy with padding", lambda: compute_unigram_entropy([[1, 2, 3], [4, -1, -1]]), ValueError, "got -1"),
    ("batch entropy of a string", lambda: compute_unigram_entropy("1 2 3"), ValueError, "non-empty list of token-id sequences"),
]


@pytest.mark.parametrize("call, exception, fragment", [c[1:] for c in METRIC_CASES], ids=[c[0] for c in METRIC_CASES])
def test_metrics_reject(call, exception, fragment):
    with raises(exception, fragment):
        call()


# ---------------------------------------------------------------------------------------------------------------
# Console scripts: checks before side effects, outputs that are never half-written
# ---------------------------------------------------------------------------------------------------------------


def test_generate_checks_the_output_folder_before_loading(saved_model, tmp_path):
    from dsl_diffusion.pipelines.generate import main

    with raises(FileNotFoundError, f"the folder {tmp_path / 'missing'} does not exist"):
        main(["--model", str(saved_model), "--output", str(tmp_path / "missing" / "samples.jsonl")])
    with raises(IsADirectoryError, "is a folder"):
        main(["--model", str(saved_model), "--output", str(tmp_path)])
    with raises(FileNotFoundError, "does not exist"):
        main(["--model", str(tmp_path / "no-model"), "--output", str(tmp_path / "samples.jsonl")])
    with raises(ValueError, "--dtype 'float8' is not supported"):
        main(["--model", str(saved_model), "--dtype", "float8"])
    with raises(ValueError, "sampler='euler' is not supported"):
        main(["--model", str(saved_model), "--sampler", "euler"])
    assert os.listdir(tmp_path) == []


def test_generate_output_is_written_whole(saved_model, tmp_path):
    from dsl_diffusion.pipelines.generate import main

    output = tmp_path / "samples.jsonl"
    main(["--model", str(saved_model), "--output", str(output), "--num_steps", "2", "--max_length", "6",
          "--num_return_sequences", "2", "--progress_bar", "false"])  # fmt: skip
    assert len(output.read_text().splitlines()) == 2 and sorted(os.listdir(tmp_path)) == ["samples.jsonl"]


def test_generate_script_exits_nonzero_with_the_message(tmp_path):
    """The console script as a user runs it: a missing --output folder fails fast, before the model is loaded."""
    output = tmp_path / "missing" / "samples.jsonl"
    result = subprocess.run(
        [sys.executable, "-m", "dsl_diffusion.pipelines.generate", "--model", str(tmp_path), "--output", str(output)],
        capture_output=True, text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert result.returncode != 0
    assert "does not exist; create it first" in result.stderr


def _push_argv(saved_model, output_dir, *extra):
    return ["--model_path", str(saved_model), "--repo_id", "someone/tiny-dsl", "--output_dir", str(output_dir),
            "--dry_run", *extra]  # fmt: skip


def test_push_dry_run_with_a_missing_sweep_leaves_nothing_and_the_retry_works(saved_model, tmp_path):
    from dsl_diffusion.hub_cards.push import main

    output_dir = tmp_path / "upload"
    with raises(FileNotFoundError, f"{tmp_path / 'no-sweep'} has no sweep_results.json"):
        main(_push_argv(saved_model, output_dir, "--sweep_dir", str(tmp_path / "no-sweep")))
    assert sorted(os.listdir(tmp_path)) == []  # neither the folder nor a staging folder
    assert main(_push_argv(saved_model, output_dir)) == 0
    assert {"config.json", "model.safetensors", "README.md"} <= set(os.listdir(output_dir))
    assert sorted(os.listdir(tmp_path)) == ["upload"]


@pytest.mark.parametrize(
    "extra, exception, fragment",
    [
        (["--training_details", "{tmp}/details.json"], FileNotFoundError, "details.json does not exist"),
        (["--training_details", "{tmp}/list.json"], ValueError, "must hold a JSON object"),
        (["--training_details", "{tmp}/broken.json"], ValueError, "broken.json is not valid JSON"),
        (["--model_path", "{tmp}/no-model"], FileNotFoundError, "no-model' does not exist"),
    ],
)
def test_push_checks_inputs_before_building(saved_model, tmp_path, extra, exception, fragment):
    from dsl_diffusion.hub_cards.push import main

    inputs = tmp_path / "inputs"
    inputs.mkdir()
    (inputs / "list.json").write_text("[1, 2]")
    (inputs / "broken.json").write_text("{steps: 3")
    extra = [token.replace("{tmp}", str(inputs)) for token in extra]
    with raises(exception, fragment):
        main(_push_argv(saved_model, tmp_path / "upload", *extra))
    assert sorted(os.listdir(tmp_path)) == ["inputs"]


def test_push_failure_during_the_build_leaves_no_folder(saved_model, tmp_path, monkeypatch):
    from dsl_diffusion.hub_cards import push

    def broken_card(**kwargs):
        raise RuntimeError("card template failed")

    monkeypatch.setattr(push, "build_model_card", broken_card)
    with raises(RuntimeError, "card template failed"):
        push.main(_push_argv(saved_model, tmp_path / "upload"))
    assert os.listdir(tmp_path) == []


def test_convert_reports_a_tokenizer_mismatch_before_writing(tmp_path):
    from dsl_diffusion.modeling_dsl.convert_mdlm import main

    source = tmp_path / "mdlm"
    source.mkdir()
    save_file(random_mdlm_state_dict(vocab_with_mask=41, hidden=32, blocks=2, cond=16), source / "model.safetensors")
    (source / "config.json").write_text(json.dumps({"model_type": "mdlm", "n_heads": 2, "model_length": 32}))
    with raises(ValueError, "tokenizer 'gpt2' has 50258 ids but the model expects 41"):
        main(["--mdlm_checkpoint", str(source), "--output_dir", str(tmp_path / "dsl"), "--tokenizer", "gpt2"])
    assert not (tmp_path / "dsl").exists()


def test_convert_names_a_missing_checkpoint(tmp_path):
    from dsl_diffusion.modeling_dsl.convert_mdlm import main

    with raises(FileNotFoundError, "'./no-mdlm-here' does not exist"):
        main(["--mdlm_checkpoint", "./no-mdlm-here", "--output_dir", str(tmp_path / "dsl")])
    assert not (tmp_path / "dsl").exists()


EVALUATE_CASES = [
    ("missing checkpoint", ["--checkpoints", "a={tmp}/no-model"], FileNotFoundError, "--checkpoints a={tmp}/no-model"),
    ("folder without config", ["--checkpoints", "a={tmp}/empty"], FileNotFoundError, "the folder has no config.json"),
    ("nan MAUVE scaling", ["--checkpoints", "{model}", "--mauve_scaling_factor", "nan"], ValueError,
     "mauve_scaling_factor must be a finite number > 0"),
    ("bad sampler knob value", ["--checkpoints", "{model}", "--samplers", "remdm-cap", "--sampler_kwargs", '{"remdm-cap": {"eta": 2}}'],
     ValueError, "--sampler_kwargs for 'remdm-cap' (at --steps 4): eta=2 is outside the accepted range"),
    ("judge length 1", ["--checkpoints", "{model}", "--judge_max_length", "1"], ValueError, "judge_max_length must be an integer >= 2"),
    ("sequence length 0", ["--checkpoints", "{model}", "--seq_len", "0"], ValueError, "seq_len must be an integer >= 1"),
    ("hybrid split above a budget", ["--checkpoints", "{model}", "--samplers", "hybrid", "--sampler_kwargs",
                                     '{"hybrid": {"continuous_steps": 6}}'], ValueError, "(at --steps 4)"),
]


@pytest.mark.parametrize("extra, exception, fragment", [c[1:] for c in EVALUATE_CASES], ids=[c[0] for c in EVALUATE_CASES])
def test_evaluate_checks_before_writing(saved_model, tmp_path, extra, exception, fragment):
    from dsl_diffusion.evaluation.sweep import main

    (tmp_path / "empty").mkdir()
    output_dir = tmp_path / "sweep"
    replace = lambda token: token.replace("{tmp}", str(tmp_path)).replace("{model}", str(saved_model))  # noqa: E731
    argv = ["--output_dir", str(output_dir), "--steps", "4", "--num_samples", "2", *map(replace, extra)]
    with raises(exception, replace(fragment)):
        main(argv)
    assert not output_dir.exists()


def test_evaluate_arguments_need_a_mauve_seed():
    from dsl_diffusion.evaluation.sweep import SweepArguments

    with raises(ValueError, "mauve_seeds is empty"):
        SweepArguments(checkpoints=["a"], mauve_seeds=[])


def test_finetune_rejects_a_misspelled_override_from_a_config_file(tmp_path):
    """A YAML/JSON config gives the overrides as a mapping, which skips the string parser: the names are checked too."""
    from dsl_diffusion.trainer.finetune import check_override_names

    with raises(ValueError, "config_overrides names ['embeddim'], which are not DSLConfig fields"):
        check_override_names({"embeddim": 8})
