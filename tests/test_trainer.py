"""DSLTrainer, DSLTrainingArguments, the EMA, and the `dsl-finetune` CLI (validation, MDLM conversion from a YAML
config, LoRA save/reload/merge, and resuming a run that was killed mid-way)."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from safetensors.torch import load_file

from dsl_diffusion.modeling_dsl import DSLForMaskedDiffusion
from dsl_diffusion.pipelines.samplers import get_sampler
from dsl_diffusion.trainer.losses import roar_nll, unwrap_denoiser
from dsl_diffusion.trainer.corruption import ConstantPath, ROARPath
from dsl_diffusion.trainer.data import DiffusionDataCollator
from dsl_diffusion.trainer.finetune import run as finetune_run
from dsl_diffusion.trainer.trainer import (
    CHECKPOINT_COMPLETE_NAME,
    EMA_WEIGHTS_NAME,
    DSLTrainer,
    DSLTrainingArguments,
    ExponentialMovingAverage,
    get_last_complete_checkpoint,
)
from helpers import tiny_dsl_config

VOCAB = 32
LENGTH = 16


@pytest.fixture(autouse=True)
def offline_hub(monkeypatch):
    """No Hub access in tests: the env var for subprocesses, the constant for this (already importing) process."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def tiny_config(**overrides):
    """helpers.tiny_dsl_config (VOCAB real tokens) without dropout."""
    return tiny_dsl_config(**{"dropout": 0.0, **overrides})


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return DSLForMaskedDiffusion(tiny_config(**overrides))


def token_dataset(num_rows, lengths=None, seed=0, repeat_one=False):
    """Random rows of LENGTH tokens; ``lengths`` gives each row's number of real tokens (the rest is padding)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (num_rows, LENGTH), generator=generator)
    if repeat_one:
        ids = ids[:1].expand(num_rows, LENGTH)
    mask = torch.ones_like(ids)
    for row, length in enumerate(lengths or []):
        mask[row, length:] = 0
    return Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": mask.tolist()})


def make_args(tmp_path, **overrides):
    defaults = dict(
        output_dir=str(tmp_path / "out"),
        use_cpu=True,
        report_to="none",
        disable_tqdm=True,
        save_strategy="no",
        logging_steps=1,
        seed=0,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=8,
    )
    defaults.update(overrides)
    return DSLTrainingArguments(**defaults)


def make_trainer(tmp_path, model=None, train_rows=None, eval_rows=None, snr_path=None, **overrides):
    return DSLTrainer(
        model=model if model is not None else tiny_model(),
        args=make_args(tmp_path, **overrides),
        train_dataset=train_rows,
        eval_dataset=eval_rows,
        data_collator=DiffusionDataCollator(),
        snr_path=snr_path,
    )


# --------------------------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"objective": "ar"}, r"objective='ar' is not supported; accepted: \('dsl', 'mdlm'\)"),
        ({"snr_path": "cosine"}, r"snr_path='cosine' is not supported; accepted: \('mixture'"),
        ({"rho": 1.5}, r"rho=1.5 \(ROAR fraction\) must lie in \[0, 1\]"),
        ({"snr_max": -1.0}, r"snr_max=-1.0 must be a finite SNR > 0"),
        ({"snr_min": 0.0}, r"snr_min=0.0 must be a finite SNR > 0"),
        ({"roar_lambda": -0.5}, r"roar_lambda=-0.5 must be a finite weight >= 0"),
        ({"time_eps": 0.0}, r"time_eps=0.0 must lie in \(0, 1\)"),
        ({"ema_decay": 1.0}, r"ema_decay=1.0 must lie in \[0, 1\)"),
        ({"lognormal_sigma": 0.0}, r"lognormal_sigma=0.0 must be a finite number > 0"),
        ({"dsl_learning_rate": -1e-3}, r"dsl_learning_rate=-0.001 must be a finite number > 0"),
        ({"recipe": "mdlm"}, r"recipe='mdlm' is not supported; accepted: \('reference',\)"),
        ({"eos_in_loss": "mask"}, r"eos_in_loss='mask' is not supported; accepted: \('count', 'drop'\)"),
        ({"roar_term": "sum"}, r"roar_term='sum' is not supported; accepted: \('convex', 'added'\)"),
        ({"roar_lambda": 1.5}, r"roar_lambda=1.5 must lie in \[0, 1\] with roar_term='convex'"),
        ({"snr_path": "reference_mixed", "lognormal_mu": 3.0}, r"snr_path='reference_mixed' fixes rho 1/4 .*lognormal_mu"),
    ],
)
def test_arguments_are_validated(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        make_args(tmp_path, **overrides)


def test_trainer_requires_dsl_arguments(tmp_path):
    from transformers import TrainingArguments

    with pytest.raises(TypeError, match="DSLTrainingArguments"):
        DSLTrainer(model=tiny_model(), args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True))


# --------------------------------------------------------------------------------------------------------------
# Loss normalization, objectives, parameter groups
# --------------------------------------------------------------------------------------------------------------


def test_gradient_accumulation_equals_one_large_batch(tmp_path):
    """2 micro-batches of 2 rows == 1 batch of 4 rows: the loss is the mean over the REAL tokens of the whole step.

    SNR 0 everywhere makes the DSL loss deterministic (z = 0), so both runs see exactly the same objective."""
    rows = token_dataset(4, lengths=[16, 3, 9, 16])
    common = dict(optim="sgd", learning_rate=1.0, max_steps=1, weight_decay=0.0, lr_scheduler_type="constant")
    accumulated = make_trainer(
        tmp_path / "a", train_rows=rows, snr_path=ConstantPath(0.0),
        per_device_train_batch_size=2, gradient_accumulation_steps=2, **common,
    )
    accumulated.train()
    single = make_trainer(tmp_path / "b", train_rows=rows, snr_path=ConstantPath(0.0), per_device_train_batch_size=4, **common)
    single.train()
    for (name, a), (_, b) in zip(accumulated.model.named_parameters(), single.model.named_parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)

    # The logged loss is the token mean over all 4 rows (not the mean of the two micro-batch means).
    model = tiny_model()
    ids, mask = torch.tensor(rows["input_ids"]), torch.tensor(rows["attention_mask"])
    with torch.no_grad():
        logits = model(noisy_states=torch.zeros(4, LENGTH, 8), attention_mask=mask).logits
    per_token = F.cross_entropy(logits.flatten(0, 1), ids.flatten(), reduction="none").view(4, LENGTH) * mask
    token_mean = per_token.sum() / mask.sum()
    logged = [entry["loss"] for entry in accumulated.state.log_history if "loss" in entry][0]
    assert math.isclose(logged, token_mean.item(), rel_tol=1e-5)
    # The test can tell: whichever 2 + 2 split the sampler made, the mean of the micro-batch means differs.
    for first in ([0, 1], [0, 2], [0, 3]):
        second = [row for row in range(4) if row not in first]
        means = [per_token[rows].sum() / mask[rows].sum() for rows in (first, second)]
        assert abs((means[0] + means[1]).item() / 2 - token_mean.item()) > 1e-4


def test_torch_compile_trains_like_eager(tmp_path):
    """`--torch_compile` (transformers' flag; "aot_eager" here to skip code generation) traces the DSL loss' forward
    and backward and takes the same steps as eager training on a fixed-SNR objective."""
    rows = token_dataset(8)
    common = dict(optim="sgd", learning_rate=0.5, max_steps=2, lr_scheduler_type="constant")
    torch._dynamo.reset()
    runs = {}
    for compiled in (False, True):
        extra = dict(torch_compile=True, torch_compile_backend="aot_eager") if compiled else {}
        trainer = make_trainer(tmp_path / str(compiled), train_rows=rows, snr_path=ConstantPath(4.0), **common, **extra)
        trainer.train()
        assert hasattr(trainer.model_wrapped, "_orig_mod") == compiled  # the step really ran the compiled module
        runs[compiled] = dict(unwrap_denoiser(trainer.model).named_parameters())
    for name, value in runs[False].items():
        torch.testing.assert_close(runs[True][name], value, atol=1e-5, rtol=1e-4, msg=name)


def test_compute_loss_normalizes_by_the_step_token_count(tmp_path):
    trainer = make_trainer(tmp_path, snr_path=ConstantPath(0.0))
    batch = DiffusionDataCollator()(list(token_dataset(2, lengths=[5, 16])))
    out = trainer.objective_loss(trainer.model, batch)
    scaled = trainer.compute_loss(trainer.model, batch, num_items_in_batch=torch.tensor(100))
    torch.testing.assert_close(scaled, out.nll_sum / 100)
    assert out.num_tokens == 21
    samples, count = trainer.get_batch_samples(iter([batch, batch]), 2, torch.device("cpu"))
    assert len(samples) == 2 and count == 42


def test_mdlm_objective_learns_a_repeated_sequence(tmp_path):
    trainer = make_trainer(
        tmp_path, train_rows=token_dataset(32, repeat_one=True), objective="mdlm", max_steps=8, learning_rate=1e-2,
        lr_scheduler_type="constant",
    )
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert {"nelbo", "masked_ce", "mask_fraction"} <= set(logs[0])
    assert logs[-1]["masked_ce"] < logs[0]["masked_ce"] - 0.5


def test_dsl_parameter_group_learning_rate_and_direction_drift(tmp_path):
    def run(directory, dsl_learning_rate, **overrides):
        trainer = make_trainer(
            directory, train_rows=token_dataset(16), max_steps=3, learning_rate=1e-4, weight_decay=0.1,
            dsl_learning_rate=dsl_learning_rate, dsl_weight_decay=0.0, lr_scheduler_type="constant", **overrides,
        )
        trainer.train()
        return trainer

    def groups_of(trainer):
        names = {id(param): name for name, param in trainer.model.named_parameters()}
        return {
            (group["lr"], group["weight_decay"]): {names[id(p)] for p in group["params"]}
            for group in trainer.optimizer.param_groups
        }

    trainer = run(tmp_path / "fast", 5e-2)
    groups = groups_of(trainer)
    # Exactly E, beta and b; W (the converter's value matrix, MDLM's input table) is a backbone matrix.
    assert groups[(5e-2, 0.0)] == {"token_directions.weight", "converter_beta", "converter_bias"}
    assert {"backbone.vocab_embed.embedding", "backbone.blocks.0.attn_qkv.weight"} <= groups[(1e-4, 0.1)]
    assert "backbone.blocks.0.norm1.weight" in groups[(1e-4, 0.0)]
    with_table = groups_of(run(tmp_path / "table", 5e-2, dsl_group_includes_input_table=True))
    assert with_table[(5e-2, 0.0)] == {
        "token_directions.weight", "converter_beta", "converter_bias", "backbone.vocab_embed.embedding"
    }
    assert "backbone.vocab_embed.embedding" not in with_table[(1e-4, 0.1)]

    fast = [entry for entry in trainer.state.log_history if "loss" in entry][-1]
    slow = [entry for entry in run(tmp_path / "slow", None).state.log_history if "loss" in entry][-1]
    assert fast["token_directions_cosine_to_init"] < slow["token_directions_cosine_to_init"] <= 1.0
    assert slow["token_directions_cosine_to_init"] > 0.9999
    assert fast["token_directions_cosine_to_init"] < 0.999
    assert "converter_beta" in fast and {"continuous_ce", "ce"} <= set(fast)
    # The mask slot: its bias and its weight at z = 0, softmax(b)[mask], both read off the trained model.
    bias = trainer.model.converter_bias.detach()
    mask_slot = trainer.model.config.mask_token_id
    assert fast["converter_mask_bias"] == pytest.approx(bias[mask_slot].item())
    assert fast["converter_mask_weight_at_zero"] == pytest.approx(bias.softmax(-1)[mask_slot].item())
    initial_bias = trainer.model.config.converter_mask_bias
    assert abs(fast["converter_mask_bias"] - initial_bias) > 10 * abs(slow["converter_mask_bias"] - initial_bias)
    # W's relative change ||W - W_0|| / ||W_0|| against the untrained model's table (same seed).
    initial_table = tiny_model().backbone.vocab_embed.embedding.detach()
    expected = (trainer.model.backbone.vocab_embed.embedding.detach() - initial_table).norm() / initial_table.norm()
    assert 0 < fast["input_table_relative_change"] == pytest.approx(expected.item(), rel=1e-5)


def test_reference_recipe_sets_its_values_and_keeps_explicit_ones(tmp_path):
    args = make_args(tmp_path, recipe="reference")
    assert (args.learning_rate, args.lr_scheduler_type, args.warmup_steps) == (3e-4, "constant", 0)
    assert (args.weight_decay, args.adam_beta1, args.adam_beta2, args.adam_epsilon) == (0.0, 0.9, 0.999, 1e-8)
    assert (args.max_grad_norm, args.ema_decay, args.ema_warmup) == (1.0, 0.999, False)
    assert (args.snr_path, args.lognormal_mu, args.lognormal_sigma, args.per_token_snr) == ("lognormal", 2.69, 1.41, False)
    assert (args.roar_lambda, args.roar_term, args.eos_in_loss) == (0.0, "convex", "drop")
    assert args.dsl_learning_rate is None
    saved = json.loads(args.to_json_string())
    assert saved["recipe"] == "reference" and saved["snr_path"] == "lognormal" and saved["ema_decay"] == 0.999

    # Without a recipe: the documented defaults.
    plain = make_args(tmp_path)
    assert (plain.snr_path, plain.roar_term, plain.eos_in_loss, plain.ema_decay, plain.ema_warmup) == (
        "mixture", "convex", "count", 0.0, True
    )
    # Explicit values win over the recipe, including one equal to the plain default (eos_in_loss="count").
    custom = make_args(
        tmp_path, recipe="reference", learning_rate=1e-3, dsl_learning_rate=3e-3, eos_in_loss="count",
        snr_path="mixture", ema_decay=0.0,
    )
    assert (custom.learning_rate, custom.dsl_learning_rate, custom.eos_in_loss) == (1e-3, 3e-3, "count")
    assert (custom.snr_path, custom.ema_decay) == ("mixture", 0.0)

    # The recipe's optimizer is one AdamW group in effect: every group at 3e-4 without weight decay, clip 1.0 and a
    # warm-up-free EMA of 0.999.
    trainer = make_trainer(tmp_path, train_rows=token_dataset(8), recipe="reference", max_steps=1,
                           model=tiny_model(eos_token_id=VOCAB - 1))
    trainer.train()
    assert {(group["lr"], group["weight_decay"]) for group in trainer.optimizer.param_groups} == {(3e-4, 0.0)}
    assert isinstance(trainer.optimizer.optimizer, torch.optim.AdamW)  # inside accelerate's wrapper
    assert trainer.ema.decay == 0.999 and trainer.ema.warmup is False
    assert trainer.loss_excluded_token_ids == (VOCAB - 1,)


def test_eos_dropped_from_the_training_loss_and_the_step_token_count(tmp_path):
    """eos_in_loss="drop": the objective skips EOS / BOS (a loss mask; the model still sees them) and the
    step's token count, which normalizes accumulated micro-batches, skips them too."""
    eos, bos = 3, 4
    rows = token_dataset(2, lengths=[16, 9])
    ids = torch.tensor(rows["input_ids"])
    ids[(ids == eos) | (ids == bos)] = 10  # the only EOS / BOS tokens are the 4 placed here
    ids[:, 0], ids[0, 15], ids[1, 8] = bos, eos, eos
    batch = {"input_ids": ids, "attention_mask": torch.tensor(rows["attention_mask"])}
    counted = batch["attention_mask"].bool() & (ids != eos) & (ids != bos)
    model = tiny_model(eos_token_id=eos, bos_token_id=bos)
    trainer = make_trainer(tmp_path, model=model, snr_path=ConstantPath(0.0), eos_in_loss="drop")
    assert trainer.loss_excluded_token_ids == (eos, bos)
    out = trainer.objective_loss(trainer.model, batch)
    with torch.no_grad():
        logits = model(noisy_states=torch.zeros(2, LENGTH, 8), attention_mask=batch["attention_mask"]).logits
    per_token = F.cross_entropy(logits.flatten(0, 1), ids.flatten(), reduction="none").view(ids.shape)
    assert out.num_tokens == counted.sum() == 21
    torch.testing.assert_close(out.loss, per_token[counted].mean())
    assert trainer.count_loss_tokens(batch) == 21
    _, count = trainer.get_batch_samples(iter([batch, batch]), 2, torch.device("cpu"))
    assert count == 42
    counting = make_trainer(tmp_path / "count", model=model, snr_path=ConstantPath(0.0))
    assert counting.count_loss_tokens(batch) == 25 and counting.objective_loss(model, batch).num_tokens == 25

    with pytest.raises(ValueError, match="eos_in_loss='drop' needs the model config to name eos_token_id"):
        make_trainer(tmp_path / "none", model=tiny_model(), eos_in_loss="drop")


@pytest.fixture(scope="module")
def dsl_trained_model(tmp_path_factory):
    """A tiny model after a few DSL steps at a large DSL learning rate: the mask slot's weight at z = 0 has moved."""
    trainer = make_trainer(
        tmp_path_factory.mktemp("dsl"), train_rows=token_dataset(32), max_steps=6, learning_rate=1e-3,
        dsl_learning_rate=0.5, lr_scheduler_type="constant",
    )
    trainer.train()
    return trainer.model.eval()


DISCRETE_SAMPLERS = {
    "mdlm": dict(num_steps=4),
    "remdm-cap": dict(num_steps=4),
    "remdm-loop": dict(num_steps=8),
    "roar": {},
    # commits nothing and keeps no evidence: the discrete phase starts all-masked through input_ids (the default
    # commit_mode="evidence" shows the network noisy states instead: see test_samplers' EvidenceDenoiser test)
    "hybrid": dict(num_steps=4, commit_rule="top_fraction", commit_fraction=0.0, commit_mode="sample"),
}


@pytest.mark.parametrize("sampler_name", DISCRETE_SAMPLERS)
def test_discrete_samplers_show_a_dsl_model_what_training_showed(dsl_trained_model, sampler_name):
    """Train/inference consistency: after DSL training, the first discrete step of every sampler feeds the network
    the converter at z = 0 at `[MASK]` and the converter at z = s_hi e_x at a decoded (prompt) token."""
    model = dsl_trained_model
    config = model.config
    assert config.endpoint_inputs == "converter"
    with torch.no_grad():
        mask_weight_at_zero = float(model.converter_bias.softmax(-1)[config.mask_token_id])
        at_zero = model.convert_noisy_states(torch.zeros(1, 1, config.embed_dim))[0, 0]
    assert mask_weight_at_zero < 0.9, "the DSL steps should have moved the mask slot (initially 0.99)"
    assert (at_zero - model.backbone.vocab_embed.embedding[config.mask_token_id]).abs().max() > 1e-3

    calls = []  # (path, backbone input) of every forward pass, in order
    record_path = model.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(["input_ids" if kwargs.get("input_ids") is not None else "states"]),
        with_kwargs=True,
    )
    record_input = model.backbone.blocks[0].register_forward_pre_hook(lambda module, args: calls[-1].append(args[0]))
    prompt = torch.tensor([[3, 7, 11, 2]])
    input_ids = torch.cat([prompt, torch.full((1, 12), config.mask_token_id)], dim=1).repeat(2, 1)
    try:
        get_sampler(sampler_name, **DISCRETE_SAMPLERS[sampler_name]).run(
            model, input_ids, generator=torch.Generator().manual_seed(0), progress_bar=False
        )
    finally:
        record_path.remove()
        record_input.remove()
    hidden = next(h for path, h in calls if path == "input_ids")  # the first discrete step
    with torch.no_grad():
        prompt_states = config.snr_max * model.token_directions()[prompt[0]]
        at_s_hi = model.convert_noisy_states(prompt_states)
    masked = input_ids[0] == config.mask_token_id
    torch.testing.assert_close(hidden[:, masked], at_zero.expand(2, int(masked.sum()), -1), atol=1e-6, rtol=0)
    torch.testing.assert_close(hidden[:, : prompt.shape[1]], at_s_hi.expand(2, -1, -1), atol=1e-6, rtol=0)


def test_roar_nll_through_input_ids_equals_the_converter_endpoints(dsl_trained_model):
    """The likelihood estimates read a DSL model through the same endpoints as its training and samplers: the ROAR
    NLL through `input_ids` equals the same draw shown as noise-free states z = s_max e_x (visible), 0 (masked)."""
    model = dsl_trained_model
    ids = torch.randint(0, VOCAB, (3, LENGTH), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        by_ids = roar_nll(model, ids, None, snr_hi=None, generator=torch.Generator().manual_seed(1))
        visible = ROARPath.visible_mask(3, LENGTH, generator=torch.Generator().manual_seed(1))
        states = model.config.snr_max * model.token_directions()[ids] * visible[..., None]
        cross_entropy = F.cross_entropy(model(noisy_states=states).logits.transpose(1, 2), ids, reduction="none")
    masked = ~visible
    expected = (cross_entropy * masked).sum(1) / masked.sum(1)  # per row; rows have equal lengths
    torch.testing.assert_close(by_ids.loss, expected.mean(), atol=1e-5, rtol=1e-5)


def test_mdlm_objective_keeps_the_table_path(tmp_path):
    trainer = make_trainer(tmp_path, train_rows=token_dataset(8), max_steps=1, objective="mdlm")
    trainer.train()
    assert trainer.model.config.endpoint_inputs == "table"


# --------------------------------------------------------------------------------------------------------------
# EMA
# --------------------------------------------------------------------------------------------------------------


def test_ema_warmup_known_answer_swap_and_round_trip(tmp_path):
    layer = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        layer.weight.fill_(0.0)
    ema = ExponentialMovingAverage(layer.named_parameters(), decay=0.9, warmup=True)
    expected, values = 0.0, [1.0, 2.0, 4.0, 8.0]
    for n, value in enumerate(values, start=1):
        with torch.no_grad():
            layer.weight.fill_(value)
        decay = min(0.9, (1 + n) / (10 + n))  # 2/11, 3/12, 4/13, 5/14
        expected = decay * expected + (1 - decay) * value
        ema.update()
    assert ema.num_updates == 4
    torch.testing.assert_close(ema.shadow["weight"], torch.full((1, 2), expected))
    with ema.applied():
        torch.testing.assert_close(layer.weight.detach(), torch.full((1, 2), expected))
    assert torch.equal(layer.weight.detach(), torch.full((1, 2), 8.0)), "swap_out restores the live weights"

    ema.save(str(tmp_path))
    other = ExponentialMovingAverage(layer.named_parameters(), decay=0.9)
    other.load(str(tmp_path))
    assert other.num_updates == 4 and torch.equal(other.shadow["weight"], ema.shadow["weight"])
    no_warmup = ExponentialMovingAverage(layer.named_parameters(), decay=0.9, warmup=False)
    assert no_warmup.current_decay() == 0.9


def test_ema_is_checkpointed_and_used_for_evaluation(tmp_path):
    train_rows, eval_rows = token_dataset(16, seed=1), token_dataset(8, seed=2)
    trainer = make_trainer(
        tmp_path, train_rows=train_rows, eval_rows=eval_rows, max_steps=4, learning_rate=5e-3, ema_decay=0.8,
        save_strategy="steps", save_steps=2,
    )
    trainer.train()
    checkpoint = tmp_path / "out" / "checkpoint-2"
    assert (checkpoint / EMA_WEIGHTS_NAME).is_file() and (checkpoint / CHECKPOINT_COMPLETE_NAME).is_file()
    assert get_last_complete_checkpoint(str(tmp_path / "out")).endswith("checkpoint-4")

    ema_metrics = trainer.evaluate()
    trainer.args.ema_eval = False
    live_metrics = trainer.evaluate()
    assert ema_metrics["eval_loss"] != live_metrics["eval_loss"]

    # A model that simply holds the EMA weights evaluates exactly like the EMA-swapped trainer.
    holder = tiny_model()
    holder.load_state_dict(trainer.ema.state_dict(), strict=False)
    reference = make_trainer(tmp_path / "ref", model=holder, eval_rows=eval_rows)
    assert math.isclose(reference.evaluate()["eval_loss"], ema_metrics["eval_loss"], rel_tol=1e-6)


# --------------------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------------------


def test_evaluation_reports_roar_nll_and_mdlm_nelbo(tmp_path):
    """At initialization the tiny model predicts nearly uniformly: both likelihoods are about log V."""
    eval_rows = token_dataset(64, seed=3)
    trainer = make_trainer(tmp_path, eval_rows=eval_rows, objective="mdlm", per_device_eval_batch_size=32)
    metrics = trainer.evaluate()
    log_vocab = math.log(VOCAB)
    assert abs(metrics["eval_roar_nll"] - log_vocab) < 0.05
    assert abs(metrics["eval_mdlm_nelbo"] - (1 - 1e-3) * log_vocab) < 0.15 * log_vocab
    assert math.isclose(metrics["eval_roar_bits_per_token"], metrics["eval_roar_nll"] / math.log(2))
    assert math.isclose(metrics["eval_mdlm_bits_per_token"], metrics["eval_mdlm_nelbo"] / math.log(2))
    assert math.isclose(metrics["eval_mdlm_ppl_bound"], math.exp(metrics["eval_mdlm_nelbo"]))
    assert metrics == {**trainer.evaluate(), **{k: metrics[k] for k in metrics if "runtime" in k or "per_second" in k}}

    batch = DiffusionDataCollator()(list(eval_rows.select(range(4))))
    trainer._eval_rng = trainer._eval_generator()
    loss, logits, labels = trainer.prediction_step(trainer.model, batch, prediction_loss_only=False)
    assert loss.dim() == 0 and torch.isfinite(loss) and logits is None and labels is None


def test_resume_needs_a_complete_checkpoint(tmp_path):
    output = tmp_path / "out"
    (output / "checkpoint-2").mkdir(parents=True)
    (output / "checkpoint-2" / CHECKPOINT_COMPLETE_NAME).write_text("{}")
    (output / "checkpoint-4").mkdir()  # killed while saving: no marker
    assert get_last_complete_checkpoint(str(output)).endswith("checkpoint-2")
    trainer = make_trainer(tmp_path / "other", train_rows=token_dataset(4), max_steps=1)
    with pytest.raises(ValueError, match="no complete checkpoint"):
        trainer.train(resume_from_checkpoint=True)


# --------------------------------------------------------------------------------------------------------------
# The CLI
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gpt2_tokenizer_without_mask(tmp_path_factory):
    from dsl_diffusion.trainer.tokenization import build_offline_gpt2_tokenizer

    path = tmp_path_factory.mktemp("gpt2_no_mask")
    build_offline_gpt2_tokenizer().save_pretrained(path)
    return str(path)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--objective", "ar"], r"objective='ar' is not supported; accepted"),
        (["--rho", "1.5"], r"rho=1.5 \(ROAR fraction\) must lie in \[0, 1\]"),
        (["--snr_max", "-1"], r"snr_max=-1.0 must be a finite SNR > 0"),
        (["--packing", "sliding"], r"packing='sliding' is not supported; accepted: \('wrapped', 'padded'\)"),
        (["--model_name_or_path", "a", "--mdlm_checkpoint", "b"], r"either --model_name_or_path \(a\) or --mdlm_checkpoint"),
        (["--config_overrides", "max_position_embeddings=32", "--block_size", "64"],
         r"block_size=64 exceeds the model's max_position_embeddings=32; accepted: 3 <= block_size <= 32"),
        (["--add_mask_token", "false", "--tokenizer_name", "{no_mask}"], r"has no mask token"),
    ],
)
def test_cli_rejects_bad_arguments_before_any_work(tmp_path, gpt2_tokenizer_without_mask, extra, message):
    argv = [
        "--output_dir", str(tmp_path / "out"), "--use_cpu", "--report_to", "none",
        # A data file that does not exist: validation must fail first, before any data is read.
        "--dataset", str(tmp_path / "missing.txt"),
        *[token.replace("{no_mask}", gpt2_tokenizer_without_mask) for token in extra],
    ]
    with pytest.raises(ValueError, match=message):
        finetune_run(argv)
    assert not (tmp_path / "out").exists()


def write_mdlm_checkpoint(path, hidden=32, blocks=2, cond=16, heads=2, length=64):
    sys.path.insert(0, os.path.dirname(__file__))
    from mdlm_reference import random_mdlm_state_dict
    from safetensors.torch import save_file

    path.mkdir(parents=True)
    state = random_mdlm_state_dict(vocab_with_mask=50258, hidden=hidden, blocks=blocks, cond=cond, scale=0.02)
    save_file(state, path / "model.safetensors")
    config = {"model_type": "mdlm", "hidden_dim": hidden, "cond_dim": cond, "n_blocks": blocks, "n_heads": heads,
              "model_length": length, "vocab_size": 50258, "dropout": 0.1, "time_conditioning": False}
    (path / "config.json").write_text(json.dumps(config))


def test_cli_converts_an_mdlm_checkpoint_from_a_yaml_config(tmp_path):
    write_mdlm_checkpoint(tmp_path / "mdlm")
    config = tmp_path / "run.yaml"
    config.write_text(
        "\n".join(
            [
                f"mdlm_checkpoint: {tmp_path / 'mdlm'}",
                "config_overrides: embed_dim=8",
                "dataset: bbc",
                "max_documents: 8",
                "block_size: 32",
                "objective: dsl",
                "rho: 0.5",
                f"output_dir: {tmp_path / 'out'}",
                "max_steps: 2",
                "per_device_train_batch_size: 2",
                "use_cpu: true",
                "report_to: none",
                "save_strategy: 'no'",
                "disable_tqdm: true",
                "do_eval: true",
                "max_eval_samples: 4",
            ]
        )
    )
    metrics = finetune_run([str(config)])
    assert {"train_loss", "eval_loss", "eval_roar_nll", "eval_mdlm_nelbo"} <= set(metrics)
    model = DSLForMaskedDiffusion.from_pretrained(tmp_path / "out")
    assert model.config.vocab_size == 50257 and model.config.embed_dim == 8 and model.config.hidden_size == 32
    assert json.loads((tmp_path / "out" / "dsl_training.json").read_text())["objective"] == "dsl"
    mdlm = load_file(tmp_path / "mdlm" / "model.safetensors")
    # Converted, then trained a little: the backbone moved away from MDLM's weights but stays close.
    delta = (model.backbone.blocks[0].attn_qkv.weight - mdlm["backbone.blocks.0.attn_qkv.weight"]).abs().max()
    assert 0 < delta < 0.1


def test_cli_lora_save_reload_merge(tmp_path):
    from peft import PeftModel

    torch.manual_seed(0)
    base = DSLForMaskedDiffusion(
        tiny_config(vocab_size=50257, mask_token_id=50257, bos_token_id=50256, eos_token_id=50256, pad_token_id=50256)
    )
    base.save_pretrained(tmp_path / "base")
    finetune_run([
        "--model_name_or_path", str(tmp_path / "base"), "--tokenizer_name", "gpt2",
        "--dataset", "bbc", "--max_documents", "8", "--block_size", "32",
        "--lora_r", "4", "--lora_alpha", "8", "--lora_target_modules", "attn_qkv,attn_out", "mlp.0", "mlp.2",
        "--lora_modules_to_save", "token_directions",
        "--output_dir", str(tmp_path / "out"), "--max_steps", "3", "--per_device_train_batch_size", "2",
        "--learning_rate", "1e-2", "--use_cpu", "--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "true",
    ])
    adapter_dir = tmp_path / "out" / "adapter"
    assert (adapter_dir / "adapter_config.json").is_file() and (adapter_dir / "adapter_model.safetensors").is_file()
    adapter_keys = set(load_file(adapter_dir / "adapter_model.safetensors"))
    for module in ("attn_qkv", "attn_out", "mlp.0", "mlp.2"):  # "a,b" and separate values both accepted
        assert any(f"{module}.lora_A" in key for key in adapter_keys), module
    assert not any("sigma_map" in key for key in adapter_keys)

    merged = DSLForMaskedDiffusion.from_pretrained(tmp_path / "out").eval()
    assert not any("lora" in name for name, _ in merged.named_parameters())
    assert merged.config.endpoint_inputs == "converter"  # trained with the DSL objective
    # The adapter was trained through the converter endpoints: its base must show them the same way.
    reloaded_base = DSLForMaskedDiffusion.from_pretrained(tmp_path / "base", endpoint_inputs="converter")
    reloaded = PeftModel.from_pretrained(reloaded_base, adapter_dir).eval()
    probe = torch.randint(0, 50258, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        merged_logits = merged(input_ids=probe).logits
        torch.testing.assert_close(reloaded(input_ids=probe).logits, merged_logits, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(base.eval()(input_ids=probe).logits, merged_logits, atol=1e-4)
    # Only adapted modules (and the directions, trained fully) changed.
    assert torch.equal(merged.backbone.output_layer.linear.weight, base.backbone.output_layer.linear.weight)
    assert not torch.equal(merged.backbone.blocks[0].attn_qkv.weight, base.backbone.blocks[0].attn_qkv.weight)
    assert not torch.equal(merged.token_directions.weight, base.token_directions.weight)


def test_cli_resume_after_kill_continues_the_same_trajectory(tmp_path):
    """Kill a real CLI run after its first complete checkpoint; resuming must end where an uninterrupted run ends
    (same data order, optimizer, scheduler, EMA and RNG: dropout is on)."""
    torch.manual_seed(0)
    base = DSLForMaskedDiffusion(
        tiny_config(vocab_size=50257, mask_token_id=50257, max_position_embeddings=32, dropout=0.1,
                    bos_token_id=50256, eos_token_id=50256, pad_token_id=50256)
    )
    base.save_pretrained(tmp_path / "base")

    def command(output_dir, *extra):
        return [
            sys.executable, "-m", "dsl_diffusion.trainer.finetune",
            "--model_name_or_path", str(tmp_path / "base"), "--tokenizer_name", "gpt2",
            "--dataset", "bbc", "--max_documents", "16", "--block_size", "32",
            "--output_dir", str(output_dir), "--max_steps", "30", "--save_steps", "5", "--save_total_limit", "2",
            "--per_device_train_batch_size", "2", "--learning_rate", "1e-3", "--ema_decay", "0.9",
            "--logging_steps", "1", "--use_cpu", "--report_to", "none", "--disable_tqdm", "true", "--seed", "0",
            *extra,
        ]

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    result = subprocess.run(command(straight), env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]

    process = subprocess.Popen(command(interrupted), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while get_last_complete_checkpoint(str(interrupted)) is None:
            assert process.poll() is None, "the run ended before writing a checkpoint"
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait(timeout=60)
    killed_at = get_last_complete_checkpoint(str(interrupted))
    assert not (interrupted / "model.safetensors").exists(), "the run must be killed mid-way"
    assert not (interrupted / "checkpoint-30").exists()

    result = subprocess.run(command(interrupted, "--resume_from_checkpoint", "last"), env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]

    def losses(run_dir):
        history = json.loads((run_dir / "trainer_state.json").read_text())["log_history"]
        return {entry["step"]: entry["loss"] for entry in history if "loss" in entry}

    resumed_losses, straight_losses = losses(interrupted), losses(straight)
    assert sorted(resumed_losses) == list(range(1, 31))
    resumed_from = int(killed_at.rsplit("-", 1)[1])
    for step in range(resumed_from + 1, 31):
        assert math.isclose(resumed_losses[step], straight_losses[step], rel_tol=1e-5, abs_tol=1e-6), step
    for name in ("model.safetensors", f"checkpoint-30/model.safetensors", f"checkpoint-30/{EMA_WEIGHTS_NAME}"):
        expected, actual = load_file(straight / name), load_file(interrupted / name)
        for key in expected:
            torch.testing.assert_close(actual[key], expected[key], atol=1e-6, rtol=1e-5, msg=f"{name}:{key}")
