"""Every console script, run as a user runs it (the installed entry point `.venv/bin/dsl-*`, in a subprocess): exit
status 0 on success and non-zero on failure."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import pipeline

import dsl_diffusion.pipelines  # noqa: F401  (registers the pipeline task)
from helpers import tiny_dsl_model, word_level_tokenizer
from mdlm_reference import random_mdlm_state_dict
from test_modeling import BLOCKS, COND, HIDDEN, MDLM_VOCAB, write_mdlm_hub_folder
from test_sweep import sweep_assets  # noqa: F401  (a fixture)

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ENTRY_POINTS = ("dsl-convert-mdlm", "dsl-finetune", "dsl-generate", "dsl-evaluate", "dsl-push", "dsl-demo")
WORDS = ["[PAD]", "[UNK]", "[EOS]"] + [f"w{i}" for i in range(29)] + ["[MASK]"]


def run_entry_point(name, *arguments, cwd=None, timeout=600):
    executable = BIN / name
    assert executable.is_file(), f"{executable} is not installed (pip install -e .)"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run([str(executable), *map(str, arguments)], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=cwd)  # fmt: skip


@pytest.fixture(scope="module")
def saved_folder(tmp_path_factory):
    """A tiny DSL model with a word-level tokenizer, saved by the pipeline (model, tokenizer, remote code)."""
    tokenizer = word_level_tokenizer(
        WORDS, "[UNK]", pad_token="[PAD]", unk_token="[UNK]", bos_token="[EOS]", eos_token="[EOS]", mask_token="[MASK]"
    )
    model = tiny_dsl_model(pad_token_id=0, eos_token_id=2, max_position_embeddings=16)
    folder = tmp_path_factory.mktemp("cli") / "tiny-dsl"
    pipeline("diffusion-text-generation", model=model, tokenizer=tokenizer, device="cpu").save_pretrained(folder)
    return folder


def test_every_entry_point_is_installed():
    assert all((BIN / name).is_file() for name in ENTRY_POINTS)


def test_dsl_generate_exit_status(saved_folder, tmp_path):
    output = tmp_path / "samples.jsonl"
    ok = run_entry_point("dsl-generate", "--model", saved_folder, "--max_length", "8", "--num_steps", "2",
                         "--num_return_sequences", "2", "--device", "cpu", "--output", output)  # fmt: skip
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert len(output.read_text().splitlines()) == 2
    bad_knob = run_entry_point("dsl-generate", "--model", saved_folder, "--num_steps", "0", "--device", "cpu")
    assert bad_knob.returncode != 0 and "num_steps=0 must be >= 1" in bad_knob.stderr
    missing = run_entry_point("dsl-generate", "--model", tmp_path / "no-such-model", "--device", "cpu")
    assert missing.returncode != 0


def test_dsl_convert_mdlm_exit_status(tmp_path):
    state_dict = random_mdlm_state_dict(vocab_with_mask=MDLM_VOCAB, hidden=HIDDEN, blocks=BLOCKS, cond=COND)
    source = write_mdlm_hub_folder(tmp_path / "mdlm", state_dict)
    ok = run_entry_point("dsl-convert-mdlm", "--mdlm_checkpoint", source, "--output_dir", tmp_path / "dsl", "--tokenizer", "none")
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert (tmp_path / "dsl" / "model.safetensors").is_file() and (tmp_path / "dsl" / "generation_config.json").is_file()
    bad = run_entry_point("dsl-convert-mdlm", "--mdlm_checkpoint", source, "--output_dir", tmp_path / "x", "--dtype", "float16")
    assert bad.returncode != 0 and "dtype='float16' is not supported" in bad.stderr


def test_dsl_push_exit_status(saved_folder, tmp_path):
    ok = run_entry_point("dsl-push", "--model_path", saved_folder, "--repo_id", "someone/tiny", "--output_dir",
                         tmp_path / "repo", "--dry_run")  # fmt: skip
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert (tmp_path / "repo" / "README.md").is_file()
    bad = run_entry_point("dsl-push", "--model_path", saved_folder, "--repo_id", "no-namespace", "--dry_run")
    assert bad.returncode != 0 and "repo_id must look like `namespace/name`" in bad.stderr


def test_dsl_finetune_exit_status(saved_folder, tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"w{i % 20} w{(i * 7) % 29} w3 w4"}) + "\n" for i in range(40)))
    common = ["--model_name_or_path", saved_folder, "--dataset", corpus, "--block_size", "8", "--max_steps", "1",
              "--per_device_train_batch_size", "2", "--use_cpu", "--report_to", "none", "--disable_tqdm", "true"]  # fmt: skip
    ok = run_entry_point("dsl-finetune", *common, "--output_dir", tmp_path / "out")
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert (tmp_path / "out" / "model.safetensors").is_file()
    bad = run_entry_point("dsl-finetune", *common, "--output_dir", tmp_path / "bad", "--lora_r", "-1")
    assert bad.returncode != 0 and "lora_r=-1 must be >= 0" in bad.stderr


def test_dsl_evaluate_exit_status(sweep_assets, tmp_path):  # noqa: F811  (the fixture imported above)
    from dsl_diffusion.evaluation.assets import minilm_encoder_path

    arguments = ["--checkpoints", f"tiny={sweep_assets['checkpoint']}", "--samplers", "mdlm", "--steps", "2",
                 "--num_samples", "4", "--batch_size", "2", "--seq_len", "16", "--device", "cpu",
                 "--reference_source", sweep_assets["references"], "--featurizer", minilm_encoder_path(),
                 "--judge", sweep_assets["judge"]]  # fmt: skip
    ok = run_entry_point("dsl-evaluate", *arguments, "--output_dir", tmp_path / "sweep")
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert (tmp_path / "sweep" / "sweep_results.json").is_file()
    bad = run_entry_point("dsl-evaluate", *arguments, "--output_dir", tmp_path / "bad", "--top_p", "1.5")
    assert bad.returncode != 0 and "top_p must be in (0, 1]" in bad.stderr


def test_dsl_demo_exit_status(tmp_path):
    # A full demo run is the `make demo` job (minutes even at the "ci" size; test_demo runs it in-process, and its
    # main returns None, i.e. status 0): here the entry point's argument handling, on success and on failure.
    ok = run_entry_point("dsl-demo", "--help")
    assert ok.returncode == 0 and "--preset" in ok.stdout
    bad = run_entry_point("dsl-demo", "--preset", "no-such-preset", "--output_dir", tmp_path / "demo")
    assert bad.returncode != 0


def test_setup_script_names_no_registry_host():
    script = (REPO / "scripts" / "setup.sh").read_text()
    assert "://" not in script and "curl" not in script
    assert "npm pack" in script and "npm is missing" in script
