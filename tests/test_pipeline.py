"""The diffusion-text-generation pipeline (the stock Pipeline call over `model.generate`), the model's stored
defaults, the remote-code round trip and the CLI.

A tiny random DSL model and a tiny WordLevel tokenizer (built here with the `tokenizers` library: 32 real tokens,
`[MASK]` added last so that its id is the model's mask_token_id) keep every test fast.
"""

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import datasets
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, pipeline
from transformers.pipelines.pt_utils import KeyDataset
from transformers.utils import logging as hf_logging

from dsl_diffusion.modeling_dsl.generation_dsl import ALL_SAMPLER_KNOBS, LEGACY_GENERATION_CONFIG_NAME
from dsl_diffusion.pipelines import DiffusionTextGenerationPipeline, DSLGenerationConfig
from dsl_diffusion.pipelines.generate import SamplerArguments, main
from helpers import run_remote_code, tiny_dsl_model, word_level_tokenizer

WORDS = ["[PAD]", "[UNK]", "[EOS]"] + [f"w{i}" for i in range(29)]  # 32 real tokens


def make_tokenizer(with_mask=True):
    special = dict(pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]")
    if with_mask:
        special["mask_token"] = "[MASK]"
    return word_level_tokenizer(WORDS + (["[MASK]"] if with_mask else []), "[UNK]", **special)


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="module")
def model():
    return tiny_dsl_model(pad_token_id=0, eos_token_id=2)


@pytest.fixture(scope="module")
def pipe(model, tokenizer):
    return pipeline("diffusion-text-generation", model=model, tokenizer=tokenizer, device="cpu", progress_bar=False)


@pytest.fixture(scope="module")
def saved_folder(pipe, tmp_path_factory):
    folder = tmp_path_factory.mktemp("saved") / "tiny-dsl"
    pipe.save_pretrained(folder)
    return folder


FAST = dict(num_steps=4, seed=0, max_length=12)


# ---------------------------------------------------------------------------------------------------------------
# In-library generation
# ---------------------------------------------------------------------------------------------------------------


def test_pipeline_task_resolves_to_the_diffusion_pipeline(pipe):
    assert isinstance(pipe, DiffusionTextGenerationPipeline)
    # no __call__ of its own: lists, generators and datasets go through the stock Pipeline machinery
    assert "__call__" not in vars(DiffusionTextGenerationPipeline)


def test_the_pipeline_equals_model_generate(pipe, model, tokenizer):
    prompt_ids = tokenizer("w1 w2", add_special_tokens=False, return_tensors="pt")["input_ids"]
    output = model.generate(prompt_ids, max_new_tokens=6, num_steps=4, seed=[11, 12], num_return_sequences=2)
    records = pipe("w1 w2", max_new_tokens=6, num_steps=4, seed=11, num_return_sequences=2, return_tensors=True)
    assert [record["generated_token_ids"].tolist() for record in records] == output.sequences.tolist()
    assert all(record["nfe"] == output.nfe for record in records)


def test_unconditional_output_mirrors_text_generation(pipe, tokenizer):
    outputs = pipe(None, num_return_sequences=3, return_tensors=True, **FAST)
    assert len(outputs) == 3
    for output in outputs:
        assert set(output) == {"generated_text", "generated_token_ids", "nfe"}
        ids = output["generated_token_ids"]
        assert ids.shape == (12,) and (ids < 32).all()
        # decoded WITHOUT skipping special tokens by default (the evaluation protocol)
        assert output["generated_text"] == tokenizer.decode(ids.tolist(), skip_special_tokens=False)
        assert 1 <= output["nfe"] <= 5
    special_ids = set(tokenizer.all_special_ids)
    samples = pipe(None, num_return_sequences=8, skip_special_tokens=True, return_tensors=True, **FAST)
    assert any(special_ids & set(sample["generated_token_ids"].tolist()) for sample in samples)  # so the check bites
    for sample in samples:
        assert sample["generated_text"] == tokenizer.decode(sample["generated_token_ids"].tolist(), skip_special_tokens=True)


def test_prefix_prompt_is_kept_and_return_full_text(pipe, tokenizer):
    prompt = "w1 w2 w3"
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    full = pipe(prompt, return_tensors=True, **FAST)[0]
    assert full["generated_token_ids"][:3].tolist() == prompt_ids and full["generated_text"].startswith(prompt)
    continuation = pipe(prompt, return_full_text=False, return_tensors=True, **FAST)[0]
    assert torch.equal(continuation["generated_token_ids"], full["generated_token_ids"][3:])


def test_infilling_generates_only_the_masks(pipe):
    for sampler in ("mdlm", "remdm-conf", "dsl-sde", "hybrid", "roar"):
        output = pipe("w1 [MASK] [MASK] w3 [MASK]", sampler=sampler, num_steps=4, seed=0, return_tensors=True)[0]
        ids = output["generated_token_ids"].tolist()
        assert len(ids) == 5 and ids[0] == 4 and ids[3] == 6 and 32 not in ids
        if sampler == "roar":
            assert output["nfe"] == 3


PROMPTS = ["w1 w2 w3 w4", "w5", "w6 w7"]
BATCH_SETTINGS = dict(max_new_tokens=6, num_return_sequences=2, seed=3, sampler="remdm", strategy="rescale", eta=0.5, num_steps=6)


def texts(results):
    return [[sample["generated_text"] for sample in samples] for samples in results]


def test_batches_of_prompts_do_not_change_the_samples(pipe):
    one_at_a_time = pipe(PROMPTS, batch_size=1, **BATCH_SETTINGS)
    batched = pipe(PROMPTS, batch_size=4, **BATCH_SETTINGS)  # padded batches that mix prompts
    assert texts(one_at_a_time) == texts(batched)
    assert [len(samples) for samples in batched] == [2, 2, 2]
    assert batched[0][0]["generated_text"] != batched[0][1]["generated_text"]


def test_a_dataset_and_a_generator_stream_like_text_generation(pipe):
    expected = texts(pipe(PROMPTS, batch_size=1, **BATCH_SETTINGS))
    dataset = datasets.Dataset.from_dict({"text": PROMPTS})
    streamed = pipe(KeyDataset(dataset, "text"), batch_size=2, num_workers=2, **BATCH_SETTINGS)
    assert not isinstance(streamed, list)  # an iterator, consumed on demand
    assert texts(streamed) == expected
    assert texts(pipe((prompt for prompt in PROMPTS), batch_size=3, **BATCH_SETTINGS)) == expected


def test_no_progress_bar_by_default_and_disable_progress_bar_is_respected(pipe, capfd):
    pipe(None, **FAST)
    assert "sampling" not in capfd.readouterr().err
    pipe(None, progress_bar=True, **FAST)
    assert "remdm sampling" in capfd.readouterr().err
    hf_logging.disable_progress_bar()
    try:
        pipe(None, progress_bar=True, **FAST)
        assert "sampling" not in capfd.readouterr().err
    finally:
        hf_logging.enable_progress_bar()


def test_seed_and_generator_determinism(pipe):
    first, second = pipe(None, **FAST), pipe(None, **FAST)
    assert first == second
    assert pipe(None, **{**FAST, "seed": 1}) != first
    settings = {key: value for key, value in FAST.items() if key != "seed"}
    from_generator = [pipe(None, generator=torch.Generator().manual_seed(5), **settings) for _ in range(2)]
    assert from_generator[0] == from_generator[1]


def test_trajectory_and_confidences(pipe):
    output = pipe(None, return_trajectory=True, return_confidences=True, return_tensors=True, **FAST)[0]
    assert len(output["trajectory"]) == 4 and output["trajectory"][-1] == output["generated_text"]
    assert "[MASK]" in output["trajectory"][0]
    assert output["trajectory_token_ids"].shape == (4, 12)
    assert output["confidences"].shape == (12,) and ((output["confidences"] > 0) & (output["confidences"] <= 1)).all()
    listed = pipe(None, return_confidences=True, **FAST)[0]["confidences"]
    assert isinstance(listed, list) and len(listed) == 12


def test_every_sampler_runs_through_the_pipeline(pipe):
    for sampler in ("mdlm", "remdm", "remdm-cap", "remdm-rescale", "remdm-conf", "remdm-loop", "dsl-sde", "hybrid", "roar"):
        output = pipe(None, sampler=sampler, num_steps=4, seed=0, max_length=8)[0]
        assert len(output["generated_text"].split()) == 8


# ---------------------------------------------------------------------------------------------------------------
# Stored defaults, saving, remote code
# ---------------------------------------------------------------------------------------------------------------


def test_saved_folder_carries_custom_pipeline_code_and_defaults(pipe, saved_folder, model, tmp_path):
    files = set(os.listdir(saved_folder))
    assert {"pipeline_diffusion.py", "samplers.py", "sampling_utils.py", "samplers_discrete.py", "samplers_continuous.py", "samplers_hybrid.py", "generation_dsl.py", "modeling_dsl.py", "configuration_dsl.py"} <= files
    assert "generation_config.json" in files and LEGACY_GENERATION_CONFIG_NAME not in files
    config = json.loads((saved_folder / "config.json").read_text())
    assert config["custom_pipelines"] == {
        "diffusion-text-generation": {"impl": "pipeline_diffusion.DiffusionTextGenerationPipeline", "pt": ["AutoModel"]}
    }
    # the model config now carries the entry, so a plain model.save_pretrained keeps it too
    model.save_pretrained(tmp_path / "model-only")
    assert "custom_pipelines" in json.loads((tmp_path / "model-only" / "config.json").read_text())


def test_stored_defaults_apply_and_the_call_overrides_them(saved_folder, tmp_path):
    folder = tmp_path / "with-defaults"
    shutil.copytree(saved_folder, folder)
    DSLGenerationConfig(sampler="dsl-sde", num_steps=3, max_length=10).save_pretrained(folder)
    loaded = pipeline(
        "diffusion-text-generation",
        model=str(folder),
        pipeline_class=DiffusionTextGenerationPipeline,  # the library's class, not the folder's remote code
        device="cpu",
        progress_bar=False,
    )
    default = loaded(None, seed=0)[0]
    assert default["nfe"] == 3 + 1 and len(default["generated_text"].split()) == 10  # the SDE: T + 1 calls
    overridden = loaded(None, seed=0, num_steps=5, max_length=6)[0]
    assert overridden["nfe"] == 5 + 1 and len(overridden["generated_text"].split()) == 6
    roar = loaded(None, seed=0, sampler="roar")[0]
    assert roar["nfe"] == 10


def test_a_legacy_diffusion_generation_config_is_still_read(saved_folder, tmp_path):
    folder = tmp_path / "legacy"
    shutil.copytree(saved_folder, folder)
    (folder / "generation_config.json").unlink()
    legacy = {"sampler": "remdm-loop", "num_steps": 24, "top_p": 0.9, "max_length": 10}
    (folder / LEGACY_GENERATION_CONFIG_NAME).write_text(json.dumps(legacy))
    loaded = pipeline(
        "diffusion-text-generation", model=str(folder), pipeline_class=DiffusionTextGenerationPipeline, device="cpu"
    )
    config = loaded.model.generation_config
    assert (config.sampler, config.strategy, config.num_steps, config.max_length) == ("remdm", "loop", 24, 10)
    assert (config.top_p, config.nucleus_rule) == (0.9, "mdlm")  # the old top_p meant the MDLM rule
    assert len(loaded(None, seed=0, num_steps=2)[0]["generated_text"].split()) == 10


def test_fresh_process_loads_the_pipeline_from_remote_code_without_the_library(pipe, saved_folder, tmp_path):
    folder = tmp_path / "copied-model"
    shutil.copytree(saved_folder, folder)
    script = (
        "import sys, json\n"
        "sys.modules['dsl_diffusion'] = None  # block the editable install: only the folder's code may run\n"
        "from transformers import pipeline\n"
        "pipe = pipeline(model=sys.argv[1], trust_remote_code=True, device='cpu')\n"
        "outputs = pipe(None, num_return_sequences=2, num_steps=4, seed=0, max_length=12, progress_bar=False)\n"
        "print(json.dumps({'module': type(pipe).__module__, 'outputs': outputs}))\n"
    )
    remote = run_remote_code(script, folder, tmp_path)
    assert remote["module"].startswith("transformers_modules.") and remote["module"].endswith("pipeline_diffusion")
    assert remote["outputs"] == pipe(None, num_return_sequences=2, num_steps=4, seed=0, max_length=12)


# ---------------------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------------------

CALL_ERRORS = [
    ({"sampler": "ddpm"}, ValueError, r"sampler='ddpm' is not supported; accepted: 'mdlm', 'remdm', 'dsl-sde', 'hybrid', 'roar'"),
    ({"sampler": "remdm", "eta": 1.5}, ValueError, r"eta=1.5 is outside the accepted range \[0.0, 1.0\]"),
    ({"sampler": "remdm", "eta": -0.5}, ValueError, r"eta=-0.5"),
    ({"sampler": "remdm-loop", "t_on": 0.2, "t_off": 0.3}, ValueError, r"t_off=0.3 must be < t_on=0.2"),
    ({"num_steps": 0}, ValueError, r"num_steps=0 must be >= 1"),
    ({"top_p": 0.0}, ValueError, r"top_p=0.0"),
    ({"max_length": 2, "inputs": "w1 w2 w3"}, ValueError, r"the prompt has 3 tokens, more than the sequence length max_length=2"),
    ({"max_length": 4, "max_new_tokens": 2}, ValueError, r"either max_length or max_new_tokens"),
    ({"max_length": 3, "inputs": "w1 w2 w3"}, ValueError, r"nothing to generate"),
    ({"num_return_sequences": 0}, ValueError, r"num_return_sequences=0 must be an integer >= 1"),
    ({"seed": 1, "generator": torch.Generator()}, ValueError, r"either seed or generator"),
    ({"etta": 0.1}, TypeError, r"unexpected arguments \['etta'\]"),
    ({"inputs": 5}, TypeError, r"an input must be None or a string, got int"),
    ({"nucleus_rule": "hf"}, ValueError, r"nucleus_rule='hf' is not supported; accepted: 'transformers', 'mdlm'"),
    ({"top_k": -1}, ValueError, r"top_k=-1 must be >= 0"),
]


@pytest.mark.parametrize("kwargs,error,message", CALL_ERRORS, ids=[str(kwargs) for kwargs, _, _ in CALL_ERRORS])
def test_call_errors_are_clear(pipe, kwargs, error, message):
    kwargs = {"max_length": 8, **kwargs}
    inputs = kwargs.pop("inputs", None)
    with pytest.raises(error, match=message):
        pipe(inputs, **kwargs)


def test_model_and_tokenizer_errors(model, tokenizer):
    no_mask_model = GPT2LMHeadModel(GPT2Config(vocab_size=33, n_positions=16, n_embd=8, n_layer=1, n_head=2))
    with pytest.raises(ValueError, match="the model .* has no mask token"):
        DiffusionTextGenerationPipeline(model=no_mask_model, tokenizer=tokenizer, device="cpu")
    wrong_mask = make_tokenizer()
    wrong_mask.mask_token = "w5"
    with pytest.raises(ValueError, match=r"mask token id 8 differs from the model's mask_token_id=32"):
        DiffusionTextGenerationPipeline(model=model, tokenizer=wrong_mask, device="cpu")
    no_mask_tokenizer = DiffusionTextGenerationPipeline(model=model, tokenizer=make_tokenizer(with_mask=False), device="cpu")
    assert len(no_mask_tokenizer("w1 w2", max_length=6, num_steps=2, seed=0, progress_bar=False)) == 1
    with pytest.raises(ValueError, match="the tokenizer has no mask token"):
        no_mask_tokenizer("w1 [MASK] w2", num_steps=2, seed=0)
    with pytest.raises(ValueError, match=r"\['etta'\] are not fields of DSLGenerationConfig"):
        DSLGenerationConfig(sampler="mdlm", etta=0.2)
    with pytest.raises(ValueError, match=r"eta=3.0 is outside"):
        DSLGenerationConfig(sampler="remdm", eta=3.0)


# ---------------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------------


def test_cli_lists_every_sampler_knob():
    assert {f.name for f in dataclasses.fields(SamplerArguments)} - {"sampler"} == set(ALL_SAMPLER_KNOBS)


def test_cli_generates_from_a_saved_folder(pipe, saved_folder, tmp_path):
    output = tmp_path / "samples.jsonl"
    command = [
        sys.executable, "-m", "dsl_diffusion.pipelines.generate", "--model", str(saved_folder), "--prompt", "w1 w2",
        "--num_return_sequences", "3", "--batch_size", "2", "--max_length", "9", "--sampler", "remdm",
        "--strategy", "conf", "--num_steps", "4", "--seed", "7", "--device", "cpu", "--output", str(output),
        "--progress_bar", "false",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in output.read_text().splitlines()]
    expected = pipe("w1 w2", num_return_sequences=3, max_length=9, sampler="remdm", strategy="conf", num_steps=4, seed=7)
    assert [record["generated_text"] for record in records] == [sample["generated_text"] for sample in expected]
    assert [record["seed"] for record in records] == [7, 8, 9] and all(record["prompt"] == "w1 w2" for record in records)


def test_cli_in_process_prints_and_rejects_bad_knobs(saved_folder, capsys):
    status = main(["--model", str(saved_folder), "--max_length", "6", "--num_steps", "2", "--device", "cpu", "--progress_bar", "false"])
    assert status == 0
    assert capsys.readouterr().out.count("nfe=") == 1
    with pytest.raises(ValueError, match=r"eta=2.0 is outside"):
        main(["--model", str(saved_folder), "--sampler", "remdm", "--eta", "2.0", "--device", "cpu"])
