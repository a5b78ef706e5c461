"""DeepSpeed ZeRO-2 / ZeRO-3 training on CPU, really run: one process and two processes (torchrun, gloo).

Each run trains a tiny DSL model for a few optimizer steps on one fixed sequence repeated (so the loss must drop),
with the EMA on, then records the logits of the in-memory model (raw and EMA-swapped) on a probe batch. The test
process (a fresh process) reloads the saved weights and must reproduce those logits. The two-process ZeRO-2 and
ZeRO-3 runs must agree with each other, which checks the sharded ZeRO-3 EMA against the replicated ZeRO-2 one.

This file is also the worker: ``python tests/test_deepspeed.py worker OUTPUT_DIR INITIAL_MODEL STAGE STEPS SAVE_STEPS``.

DeepSpeed JIT-compiles one C++ op on CPU (``deepspeed_shm_comm``, ~1 min the first time); the compiled op is
cached in ``~/.cache/dsl-diffusion/torch_extensions`` (``TORCH_EXTENSIONS_DIR``), so later runs reuse it.
The optimizer is the Trainer's torch AdamW: DeepSpeed's CPUAdam would need one more compiled op.
"""

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

VOCAB = 32
LENGTH = 16
STEPS = 5
WORKER_TIMEOUT_S = 300


def tiny_config():
    from helpers import tiny_dsl_config  # VOCAB real tokens

    return tiny_dsl_config(dropout=0.0)


def probe_batch() -> torch.Tensor:
    ids = torch.arange(2 * LENGTH).reshape(2, LENGTH) % VOCAB
    ids[:, ::3] = VOCAB  # some [MASK] positions
    return ids


# --------------------------------------------------------------------------------------------------------------
# Worker (runs under DeepSpeed in a subprocess)
# --------------------------------------------------------------------------------------------------------------


def worker(output_dir: str, initial_model_dir: str, stage: int, steps: int, save_steps: int) -> None:
    import torch.distributed as dist
    from datasets import Dataset
    from safetensors.torch import save_file
    from transformers import set_seed

    from dsl_diffusion.modeling_dsl import DSLForMaskedDiffusion
    from dsl_diffusion.trainer.data import DiffusionDataCollator
    from dsl_diffusion.trainer.distributed import resolve_deepspeed_config
    from dsl_diffusion.trainer.trainer import DSLTrainer, DSLTrainingArguments, ExponentialMovingAverage

    # ZeRO-3: the TrainingArguments (which register the DeepSpeed config) must exist before the model, so that
    # from_pretrained creates it partitioned (deepspeed.zero.Init) and loads each rank's shard.
    args = DSLTrainingArguments(
        output_dir=output_dir,
        deepspeed=resolve_deepspeed_config(f"zero{stage}"),
        use_cpu=True,
        max_steps=steps,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        dsl_learning_rate=1e-2,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500,
        ema_decay=0.5,
        ema_warmup=False,
        seed=0,
        report_to="none",
        disable_tqdm=True,
    )
    model = DSLForMaskedDiffusion.from_pretrained(initial_model_dir)
    sequence = (torch.arange(LENGTH) * 7 % VOCAB).tolist()
    dataset = Dataset.from_dict({"input_ids": [sequence] * 64, "attention_mask": [[1] * LENGTH] * 64})
    trainer = DSLTrainer(model=model, args=args, train_dataset=dataset, data_collator=DiffusionDataCollator())
    set_seed(0)  # the same corruption draws whatever the model loading consumed
    trainer.train()

    engine = trainer.model_wrapped
    engine.eval()
    with torch.no_grad():
        logits = engine(input_ids=probe_batch()).logits.clone()
        with trainer.ema_applied():
            ema_logits = engine(input_ids=probe_batch()).logits.clone()
        restored_logits = engine(input_ids=probe_batch()).logits.clone()
    assert torch.equal(logits, restored_logits), "swapping the EMA out must restore the live weights exactly"

    # The gathered EMA reloads into per-rank shards that gather back to the same full tensors.
    ema_state = trainer.ema.state_dict()
    reloaded = ExponentialMovingAverage(trainer.model.named_parameters(), decay=0.5)
    reloaded.load_state_dict(ema_state, num_updates=trainer.ema.num_updates)
    for name, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, ema_state[name]), f"EMA of {name} changed in a save/load round trip"

    trainer.save_model(os.path.join(output_dir, "final"))
    if dist.get_rank() == 0:
        save_file({"logits": logits, "ema_logits": ema_logits}, os.path.join(output_dir, "probe.safetensors"))
        save_file(ema_state, os.path.join(output_dir, "ema_state.safetensors"))
        with open(os.path.join(output_dir, "log_history.json"), "w") as f:
            json.dump(trainer.state.log_history, f)
        with open(os.path.join(output_dir, "run.json"), "w") as f:
            json.dump({"world_size": dist.get_world_size(), "ema_updates": trainer.ema.num_updates}, f)
    # Leave together and tear the process group down: a rank that exits with gloo's threads still alive can abort
    # ("terminate called without an active exception") after all its work is done.
    dist.barrier()
    dist.destroy_process_group()


# --------------------------------------------------------------------------------------------------------------
# Test helpers
# --------------------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def subprocess_env() -> dict:
    from dsl_diffusion.trainer.distributed import DEFAULT_TORCH_EXTENSIONS_DIR

    env = dict(os.environ)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(DEFAULT_TORCH_EXTENSIONS_DIR))
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def run_checked(command: list[str], env: dict) -> subprocess.CompletedProcess:
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=WORKER_TIMEOUT_S)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return result


@pytest.fixture(scope="module")
def initial_model_dir(tmp_path_factory) -> Path:
    """One initialization shared by every run (ZeRO-3's zero.Init would otherwise initialize differently)."""
    from dsl_diffusion.modeling_dsl import DSLForMaskedDiffusion

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("initial_model")
    DSLForMaskedDiffusion(tiny_config()).save_pretrained(path)
    return path


def run_worker(output_dir: Path, initial_model: Path, stage: int, num_processes: int, save_steps: int = 0) -> Path:
    env = subprocess_env()
    worker_args = [__file__, "worker", str(output_dir), str(initial_model), str(stage), str(STEPS), str(save_steps)]
    if num_processes == 1:
        # One process: the environment a launcher would set, for DeepSpeed's process group.
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
        command = [sys.executable, *worker_args]
    else:
        command = [
            sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={num_processes}",
            "--master_addr=127.0.0.1", f"--master_port={free_port()}", *worker_args,
        ]
    run_checked(command, env)
    return output_dir


def check_run(output_dir: Path, world_size: int) -> dict:
    """Finite, decreasing loss; the saved weights reproduce the in-memory logits (raw and EMA) in this process."""
    from safetensors.torch import load_file

    from dsl_diffusion.modeling_dsl import DSLForMaskedDiffusion

    run = json.loads((output_dir / "run.json").read_text())
    assert run["world_size"] == world_size and run["ema_updates"] == STEPS
    losses = [entry["loss"] for entry in json.loads((output_dir / "log_history.json").read_text()) if "loss" in entry]
    assert len(losses) == STEPS and all(math.isfinite(loss) for loss in losses)
    assert losses[-1] < losses[0] - 0.2, f"the loss did not drop on a repeated batch: {losses}"
    # The untrained model predicts about uniformly: a loss scaled wrongly for the world size would not be log V.
    assert abs(losses[0] - math.log(VOCAB)) < 0.15, losses[0]

    probe = load_file(output_dir / "probe.safetensors")
    model = DSLForMaskedDiffusion.from_pretrained(output_dir / "final").eval()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=probe_batch()).logits, probe["logits"], atol=1e-5, rtol=1e-5)
        ema_state = load_file(output_dir / "ema_state.safetensors")
        missing, unexpected = model.load_state_dict(ema_state, strict=False)
        assert not unexpected and not [name for name in missing if "inv_freq" not in name]
        torch.testing.assert_close(model(input_ids=probe_batch()).logits, probe["ema_logits"], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(probe["logits"], probe["ema_logits"]), "the EMA must differ from the live weights"
    return {"weights": load_file(output_dir / "final" / "model.safetensors"), "ema": ema_state}


# --------------------------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------------------------


def test_model_has_no_zero_dim_parameters():
    """DeepSpeed broadcasts and partitions parameters through `param.data.view(torch.uint8)`, which fails on
    0-dim tensors: every parameter of the model must have at least one dimension."""
    from dsl_diffusion.modeling_dsl import DSLForMaskedDiffusion

    model = DSLForMaskedDiffusion(tiny_config())
    scalar = [name for name, param in model.named_parameters() if param.dim() == 0]
    assert not scalar, f"0-dim parameters break DeepSpeed (use shape [1]): {scalar}"


def test_deepspeed_configs_are_shipped():
    from dsl_diffusion.trainer.distributed import resolve_deepspeed_config

    for stage in (2, 3):
        config = json.loads(Path(resolve_deepspeed_config(f"zero{stage}")).read_text())
        assert config["zero_optimization"]["stage"] == stage
        assert config["train_micro_batch_size_per_gpu"] == "auto" and config["gradient_accumulation_steps"] == "auto"
        assert "optimizer" not in config, "the Trainer's torch AdamW (with the DSL parameter group) is used"
    zero3 = json.loads(Path(resolve_deepspeed_config("zero3")).read_text())["zero_optimization"]
    assert zero3["stage3_gather_16bit_weights_on_model_save"] is True


@pytest.mark.parametrize("stage", [2, 3])
def test_single_process(tmp_path, initial_model_dir, stage):
    check_run(run_worker(tmp_path / f"zero{stage}", initial_model_dir, stage, num_processes=1), world_size=1)


def test_two_processes_zero2_and_zero3_agree(tmp_path, initial_model_dir):
    zero2 = check_run(run_worker(tmp_path / "zero2", initial_model_dir, 2, num_processes=2), world_size=2)
    zero3_dir = run_worker(tmp_path / "zero3", initial_model_dir, 3, num_processes=2, save_steps=STEPS)
    zero3 = check_run(zero3_dir, world_size=2)
    # Same data, same seed, same math: only the sharding differs.
    for name, tensor in zero2["weights"].items():
        torch.testing.assert_close(zero3["weights"][name], tensor, atol=5e-5, rtol=1e-4, msg=name)
    for name, tensor in zero2["ema"].items():
        torch.testing.assert_close(zero3["ema"][name], tensor, atol=5e-5, rtol=1e-4, msg=name)
    # The ZeRO-3 checkpoint holds the gathered EMA and is marked complete.
    from safetensors.torch import load_file

    checkpoint = zero3_dir / f"checkpoint-{STEPS}"
    assert (checkpoint / "checkpoint_complete.json").is_file()
    checkpoint_ema = load_file(checkpoint / "ema.safetensors")
    for name, tensor in zero3["ema"].items():
        torch.testing.assert_close(checkpoint_ema[name], tensor, atol=0, rtol=0, msg=name)


def test_cli_single_process_zero2(tmp_path):
    """`dsl-finetune --deepspeed zero2` in one process (no launcher): the CLI sets up the process group itself."""
    command = [
        os.path.join(os.path.dirname(sys.executable), "dsl-finetune"),  # the console script
        "--dataset", "bbc", "--max_documents", "8", "--model_size", "tiny", "--block_size", "32",
        "--config_overrides", "hidden_size=32,intermediate_size=64,embed_dim=8",
        "--output_dir", str(tmp_path / "cli"), "--max_steps", "2", "--per_device_train_batch_size", "2",
        "--use_cpu", "--logging_steps", "1", "--save_strategy", "no", "--report_to", "none",
        "--deepspeed", "zero2", "--disable_tqdm", "true",
    ]
    run_checked(command, subprocess_env())
    from dsl_diffusion.modeling_dsl import DSLForMaskedDiffusion

    model = DSLForMaskedDiffusion.from_pretrained(tmp_path / "cli")
    assert model.config.hidden_size == 32
    history = json.loads((tmp_path / "cli" / "trainer_state.json").read_text())["log_history"]
    assert all(math.isfinite(entry["loss"]) for entry in history if "loss" in entry)


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "worker":
    worker(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]))
