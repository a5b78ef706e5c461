"""The denoiser gap of the known-law benchmark (`benchmarks/known_law/gap.py`): zero for the oracle itself, the model's
cross-entropy the trainer's own loss on the same z, fixed noise across calls, and the training callback."""

import json
import os
import sys

import pytest
import torch


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

from benchmarks.known_law.gap import GAP_LOG_NAME, DenoiserGap, DenoiserGapCallback  # noqa: E402
from benchmarks.known_law.law import HMMLawConfig, LawSampleStream, build_law  # noqa: E402
from benchmarks.known_law.oracle import oracle_beside  # noqa: E402
from dsl_diffusion.modeling_dsl import DSLConfig, DSLForMaskedDiffusion  # noqa: E402
from dsl_diffusion.trainer import DiffusionDataCollator, DSLTrainer, DSLTrainingArguments  # noqa: E402
from dsl_diffusion.trainer.corruption import ConstantPath  # noqa: E402
from dsl_diffusion.trainer.losses import dsl_loss  # noqa: E402


pytestmark = pytest.mark.usefixtures("single_threaded")

LAW = HMMLawConfig(vocab_size=6, num_states=3, tokens_per_state=3, successors_per_state=1, initial_states=2, law_seed=11)
LENGTH = 6
SNRS = (0.5, 4.0, 32.0)


def tiny_model(seed=0) -> DSLForMaskedDiffusion:
    torch.manual_seed(seed)
    config = DSLConfig(vocab_size=6, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, cond_dim=8,
                       max_position_embeddings=LENGTH, embed_dim=4, dropout=0.0)
    return DSLForMaskedDiffusion(config).eval()


def law_rows(count=256, seed=0):
    return build_law(LAW).sample(count, LENGTH, torch.Generator().manual_seed(seed))


def test_oracle_has_zero_gap_and_a_random_model_a_positive_one():
    law = build_law(LAW)
    model = tiny_model()
    gap = DenoiserGap(law, law_rows(), snrs=SNRS, seed=3, batch_size=100)
    # The oracle measured as a model: the same z and the same E on both sides leave only its float32 rounding.
    table = gap(oracle_beside(law, model), per_token_lognormal=(1.0, 1.5))
    for cell in table["per_snr"] + [table["per_token"], table["endpoint"]]:
        assert abs(cell["gap"]) < 1e-5, cell
    state = torch.get_rng_state()
    first = gap(model, per_token_lognormal=(1.0, 1.5))
    assert torch.equal(torch.get_rng_state(), state)  # own generators: the training stream is untouched
    assert json.dumps(gap(model, per_token_lognormal=(1.0, 1.5))) == json.dumps(first)  # fixed rows and noise
    for cell in first["per_snr"] + [first["per_token"], first["endpoint"]]:
        assert cell["gap"] > 5 * cell["gap_standard_error"] > 0, cell
        assert cell["gap"] == pytest.approx(cell["model_ce"] - cell["oracle_ce"], abs=1e-12)
    assert first["per_snr"][0]["num_tokens"] == 256 * LENGTH
    assert 0 < first["endpoint"]["num_tokens"] < 256 * LENGTH  # the masked positions only


def test_per_snr_cells_are_the_trainers_loss_on_the_same_noise():
    law = build_law(LAW)
    model = tiny_model(1)
    rows = law_rows(64)
    gap = DenoiserGap(law, rows, snrs=SNRS, seed=5, batch_size=64)  # one batch: one draw order, as dsl_loss's
    table = gap(model)
    for cell, row in enumerate(table["per_snr"]):
        with torch.no_grad():
            expected = dsl_loss(model, rows, None, ConstantPath(row["snr"]), generator=gap._generator(cell))
            oracle = dsl_loss(oracle_beside(law, model), rows, None, ConstantPath(row["snr"]), generator=gap._generator(cell))
        # The library's loss (float32 cross-entropy) against the gap's float64 one, on the same z.
        assert row["model_ce"] == pytest.approx(float(expected.loss), abs=1e-5)
        assert row["oracle_ce"] == pytest.approx(float(oracle.loss), abs=1e-5)
    # More signal, less left to guess: the Bayes cross-entropy falls with the SNR.
    oracle_ce = [row["oracle_ce"] for row in table["per_snr"]]
    assert oracle_ce == sorted(oracle_ce, reverse=True)


def train_tiny(tmp_path, name, callbacks):
    law = build_law(LAW)
    model = tiny_model(2)
    args = DSLTrainingArguments(
        output_dir=str(tmp_path / name), max_steps=6, per_device_train_batch_size=8, learning_rate=1e-3,
        logging_steps=3, report_to=[], save_strategy="no", use_cpu=True, seed=0, data_seed=0, disable_tqdm=True,
        dataloader_num_workers=0, eval_roar_nll=False, eval_mdlm_nelbo=False,
    )
    trainer = DSLTrainer(model=model, args=args, train_dataset=LawSampleStream(law, LENGTH, seed=1, chunk_size=64),
                         data_collator=DiffusionDataCollator(), callbacks=callbacks)
    trainer.train()
    return trainer


def test_callback_logs_the_gap_during_training_without_changing_it(tmp_path):
    callback = DenoiserGapCallback(build_law(LAW), law_rows(32), every=3, snrs=SNRS)
    with_gap = train_tiny(tmp_path, "with", [callback])
    without = train_tiny(tmp_path, "without", [])
    # Eval mode and back, no_grad, own generators: the trajectory is the one without the callback.
    for (name, a), (_, b) in zip(with_gap.model.state_dict().items(), without.model.state_dict().items()):
        assert torch.equal(a, b), name
    assert with_gap.model.training
    entries = [e for e in with_gap.state.log_history if "gap/endpoint" in e]
    assert [e["step"] for e in entries] == [0, 3, 6]
    assert set(entries[0]) == {"step", "gap/snr=0.5", "gap/snr=4", "gap/snr=32", "gap/endpoint"}
    with open(tmp_path / "with" / GAP_LOG_NAME) as f:
        saved = json.load(f)
    assert [m["step"] for m in saved["measurements"]] == [0, 3, 6]
    assert saved["measurements"][2]["per_snr"][1]["gap"] == entries[2]["gap/snr=4"]
    with pytest.raises(ValueError, match="every=0"):
        DenoiserGapCallback(build_law(LAW), law_rows(32), every=0)
