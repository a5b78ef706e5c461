"""The known-law benchmark: does DSL+ReMDM match MDLM+ReMDM with fewer denoiser calls, on a law whose answer is known?

    python -m benchmarks.known_law.run --output_dir outputs/known-law            # the full run (~1 h, 2 quiet CPU cores)
    python -m benchmarks.known_law.run --preset ci --output_dir /tmp/kl          # the CI size (seconds)

Stages (each writes under --output_dir and is skipped once its `done.json` exists, so an interrupted run resumes;
training stages also checkpoint every --save_steps):

1. law       - the sticky sparse HMM (`law.py`), its entropy per token by a high-precision Monte Carlo of the exact
               -log p, its exact pair law, and the bigram-KL floor of fresh TRUE samples of the cell size;
2. pretrain  - an MDLM (`DSLForMaskedDiffusion` + `DSLTrainer`, objective "mdlm") on fresh law samples;
3. arms      - equal tokens from the pretrained weights: "mdlm" continued; "dsl" with the reference recipe (one AdamW
               rate, constant 3e-4, EMA 0.999); "dsl-group" with E, beta and b at a higher rate; optionally
               "dsl-group-w" (the same with W in the group) and the recipe-search arms of `ARMS`; each arm's ROAR
               NLL on fresh law samples, and its denoiser gap every `gap_log_steps` during training (`gap.py`);
   gap-<arm> - each arm's final denoiser gap table (per SNR, per token where it trained so, ROAR endpoints);
4. samples   - every (arm, sampler, T, seed) cell draws `samples_per_cell` sequences with the library's samplers,
               and every (sampler, T) also on the exact oracle of the law (`oracle.py`, arm "oracle", seeds
               `oracle_seeds`) beside the arm it was planned for (its E drives the oracle's noisy states): the
               ceiling of each sampler at that budget. Each cell is scored under the law at once (`metrics.py`)
               and written to its own file; a rerun draws only the cells missing on disk, also after this stage
               finished with fewer cells (a new arm, the oracle cells);
5. report    - results.json, results.md, nll_excess_vs_nfe.png, bigram_kl_vs_nfe.png, ce_gap_vs_snr.png and the
               headline "NFE DSL+ReMDM needs to match MDLM+ReMDM", with the seed-to-seed noise floor.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field, fields

import torch
from transformers.utils.logging import tqdm  # honours transformers.utils.logging.disable_progress_bar()
from transformers import HfArgumentParser

from dsl_diffusion.evaluation.utils import Stage, atomic_write_json

from .law import HiddenMarkovLaw, HMMLawConfig, LawSampleStream, build_law
from .metrics import bigram_kl, nll_scores, nfe_to_match, score_samples


logger = logging.getLogger("known_law")

# The arms: objective and the parameter group of each. Every arm shares the reference recipe (AdamW, constant rate,
# no warm-up, EMA 0.999, clip 1.0); only the fields below differ. Set explicitly, so that the benchmark does not move
# when the trainer's defaults do. Optional fields of an arm (the recipe-search knobs):
#   rho                  ROAR share of the mixture path (default: --rho);
#   lognormal            (mu, sigma) of the log-normal part (default: --lognormal_mu, --lognormal_sigma);
#   per_token            log-normal SNRs per token instead of per sequence (the trainer's per_token_snr);
#   per_token_fraction   with per_token, the share of the continuous rows drawn per token, the rest one SNR per row
#                        (the trainer's per_token_snr_fraction): the SDE shows every position at one SNR;
#   roar_smoothed        smoothed ROAR rows: masked tokens at s ~ U[0, 1), visible ones at s ~ U[0.8, 1] s_max;
#   converter_beta       the converter's beta at the start of the arm (the pretrained MDLM never trained it);
#   converter_mask_bias  the converter's [MASK]-slot bias at the start, a number or "log_vocab" (log V: the mask slot
#                        then weighs as much as a token at z = 0 and loses to it once beta s > log V, instead of
#                        outweighing every token up to s ~ log(99 (V + 1)) / beta);
#   frozen_directions    the token directions E are not trained;
#   learning_rate        one rate for every parameter instead of --finetune_learning_rate;
#   steps_factor         the arm runs steps_factor x --finetune_steps (more tokens than the other arms);
#   from_scratch         random initialization instead of the pretrained MDLM, --pretrain_steps + steps_factor x
#                        --finetune_steps at the pretraining schedule (cosine from --pretrain_learning_rate, the same
#                        warm-up): the tokens of the pretrained MDLM plus its fine-tuning.
DSL_GROUP_PATTERNS = ["token_directions", "converter_beta", "converter_bias"]  # E, beta, b
# The DSL arms use the library's mixture path (a quarter of ROAR endpoint rows, log-normal SNRs for the rest) rather
# than the reference code's all-log-normal path: the discrete samplers compared here feed exactly the endpoint states.
SHARP = dict(converter_beta=3.0, converter_mask_bias="log_vocab")  # the LLaDA port's sharp converter (METHOD.md 3)
ARMS = {
    "mdlm": dict(objective="mdlm", patterns=None, group_rate=None),
    "dsl": dict(objective="dsl", patterns=None, group_rate=None),  # one rate for everything (the reference)
    "dsl-group": dict(objective="dsl", patterns=DSL_GROUP_PATTERNS, group_rate="dsl_group_learning_rate"),
    "dsl-group-w": dict(
        objective="dsl", patterns=DSL_GROUP_PATTERNS, group_rate="dsl_group_learning_rate", include_input_table=True
    ),
    # Ablation: the reference recipe with every row a ROAR endpoint row (rho = 1): the network then trains only on
    # the states the discrete samplers show it, as many of them as the MDLM arm sees.
    "dsl-endpoint-only": dict(objective="dsl", patterns=None, group_rate=None, rho=1.0),
    # The recipe search: the sharp converter, then one knob changed at a time.
    "dsl-beta": dict(objective="dsl", patterns=None, group_rate=None, converter_beta=3.0),  # beta 3 alone
    "dsl-sharp": dict(objective="dsl", patterns=None, group_rate=None, **SHARP),
    "dsl-sharp-token": dict(objective="dsl", patterns=None, group_rate=None, **SHARP, per_token=True),
    "dsl-sharp-half": dict(objective="dsl", patterns=None, group_rate=None, **SHARP, rho=0.5),
    "dsl-sharp-smooth": dict(objective="dsl", patterns=None, group_rate=None, **SHARP, roar_smoothed=True),
    "dsl-sharp-low": dict(objective="dsl", patterns=None, group_rate=None, **SHARP, lognormal=(1.0, 1.5)),
    "dsl-sharp-frozen": dict(objective="dsl", patterns=None, group_rate=None, **SHARP, frozen_directions=True),
    "dsl-sharp-lr": dict(objective="dsl", patterns=None, group_rate=None, **SHARP, learning_rate=1e-3),
    "dsl-sharp-token-4x": dict(objective="dsl", patterns=None, group_rate=None, **SHARP, per_token=True, steps_factor=4),
    "mdlm-4x": dict(objective="mdlm", patterns=None, group_rate=None, steps_factor=4),  # on the 4x DSL arm's tokens
    "dsl-scratch": dict(objective="dsl", patterns=None, group_rate=None, **SHARP, per_token=True, from_scratch=True),
    "dsl-scratch-4x": dict(objective="dsl", patterns=None, group_rate=None, **SHARP, per_token=True, from_scratch=True,
                           steps_factor=4),  # the tokens of pretraining plus mdlm-4x
    # dsl-scratch with half of its continuous rows at one SNR per row, the states the SDE visits.
    "dsl-scratch-mix": dict(objective="dsl", patterns=None, group_rate=None, **SHARP, per_token=True,
                            per_token_fraction=0.5, from_scratch=True),
    "dsl-scratch-mix-4x": dict(objective="dsl", patterns=None, group_rate=None, **SHARP, per_token=True,
                               per_token_fraction=0.5, from_scratch=True, steps_factor=4),
}
# Arms trained in the recipe search and left out of the full preset, each with why (results.md lists them). Their
# recipes stay in `ARMS`, so `--arms` can train any of them again.
DROPPED_ARMS = {
    "dsl-group": "E, beta and b at 10x the rate: ROAR NLL 3.099 in the first run, better than the reference's 3.196, "
                 "worse than the sharp start's 2.986, which needs no second rate",
    "dsl-beta": "beta 3 without the [MASK] bias: the gap is larger than dsl-sharp's at every SNR",
    "dsl-sharp-token": "per-token SNRs at 1k steps: a better endpoint gap, a worse per-sequence one; kept at 4x",
    "dsl-sharp-half": "rho 0.5: the endpoint gap falls, the noisy-state gap rises; no net gain",
    "dsl-sharp-smooth": "smoothed ROAR: the worst endpoint gap and ROAR NLL of the sharp arms",
    "dsl-sharp-frozen": "E frozen: the same numbers as dsl-sharp (E barely moves when it trains)",
}
ORACLE_ARM = "oracle"
# The headline pair's samplers: the MDLM arm with plain MDLM and ReMDM (the headline baseline takes the better of the
# two at each budget), the DSL arm with ReMDM, the DSL-SDE and the hybrid; each at every budget and seed.
BASELINE_SAMPLERS = ("remdm", "mdlm")
CANDIDATE_SAMPLERS = ("remdm", "dsl-sde", "hybrid")
# The pair's other samplers (at the secondary budgets and seeds): confidence-aware parallel decoding for both, and
# ReMDM with re-scored remasking for the DSL arm (it needs a model that predicts every position).
SECONDARY_BASELINE_SAMPLERS = ("confidence",)
SECONDARY_CANDIDATE_SAMPLERS = ("remdm-rescore", "confidence", "dsl-sde-revision", "dsl-sde-lognormal", "hybrid-half")
# Rows that run a library sampler with a knob set of their own, under a name of their own (their own curve): the
# DSL-SDE with one round of draft revision after its last step, a quarter of the budget spent on it, and the DSL-SDE
# on the log-normal grid (quantiles of the training SNR law) instead of the log-linear one, and the hybrid with half
# the steps discrete (its defaults before the oracle sweep: T // 2 SDE steps up to s* = 10 on the log-linear grid).
SAMPLER_VARIANTS = {"dsl-sde-revision": "dsl-sde", "dsl-sde-lognormal": "dsl-sde", "hybrid-half": "hybrid"}
# The other arms' samplers, by objective, at `other_arm_step_budgets`.
OTHER_ARM_SAMPLERS = {"mdlm": ("remdm",), "dsl": ("remdm", "dsl-sde", "hybrid")}

PRESETS = {
    "ci": dict(
        vocab_size=12, num_states=4, tokens_per_state=5, successors_per_state=2, initial_states=2, length=8,
        entropy_samples=4000, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, embed_dim=8, cond_dim=16,
        batch_size=16, pretrain_steps=12, finetune_steps=6, save_steps=5, step_budgets=[2, 8], samples_per_cell=64,
        sampling_batch_size=32, seeds=[0, 1], secondary_seeds=[0], roar_eval_samples=64,
        arms=["mdlm", "dsl", "dsl-group"], candidate_arm="dsl", gap_log_steps=3, gap_rows=32,
    ),
    "full": dict(
        vocab_size=64, num_states=16, tokens_per_state=16, successors_per_state=3, initial_states=4, length=32,
        entropy_samples=200_000, hidden_size=96, num_hidden_layers=4, num_attention_heads=4, embed_dim=32,
        cond_dim=64, batch_size=64, pretrain_steps=2500, finetune_steps=1000, save_steps=250,
        step_budgets=[2, 4, 8, 16, 32], samples_per_cell=2000, sampling_batch_size=1000, seeds=[0, 1],
        secondary_seeds=[0], secondary_step_budgets=[4, 16], roar_eval_samples=8192,
        arms=["mdlm", "dsl", "dsl-sharp", "dsl-sharp-low", "dsl-sharp-lr", "dsl-sharp-token-4x", "mdlm-4x", "dsl-scratch",
              "dsl-scratch-mix"],
        candidate_arm="dsl-scratch",
        gap_log_steps=100, gap_rows=1024,
    ),
}
LOOP_MIN_STEPS = 21  # ReMDM's loop needs enough steps to reach its third phase (as in the demo)


@dataclass
class KnownLawArguments:
    output_dir: str = field(default="outputs/known-law", metadata={"help": "Where every stage writes (resumable)."})
    preset: str = field(default="full", metadata={"help": f"One of {sorted(PRESETS)}; the fields below override it."})
    # --- the law
    vocab_size: int | None = field(default=None, metadata={"help": "Tokens V of the law."})
    num_states: int | None = field(default=None, metadata={"help": "Hidden states K."})
    tokens_per_state: int | None = field(default=None, metadata={"help": "Tokens each state can emit (sparsity)."})
    successors_per_state: int | None = field(default=None, metadata={"help": "States each state can move to."})
    stay_probability: float = field(default=0.85, metadata={"help": "P(h_t+1 = h_t): how sticky the hidden state is."})
    initial_states: int | None = field(default=None, metadata={"help": "States a sequence can start in."})
    emission_concentration: float = field(default=1.0, metadata={"help": "Dirichlet concentration of emissions."})
    law_seed: int = field(default=1234, metadata={"help": "Seed of the law's random parameters."})
    length: int | None = field(default=None, metadata={"help": "Sequence length L."})
    entropy_samples: int | None = field(default=None, metadata={"help": "Law samples of the entropy Monte Carlo."})
    # --- the denoiser
    hidden_size: int | None = field(default=None, metadata={"help": "Width."})
    num_hidden_layers: int | None = field(default=None, metadata={"help": "Depth."})
    num_attention_heads: int | None = field(default=None, metadata={"help": "Heads."})
    embed_dim: int | None = field(default=None, metadata={"help": "DSL noisy-state dimension d."})
    cond_dim: int | None = field(default=None, metadata={"help": "adaLN conditioning width."})
    # --- training
    batch_size: int | None = field(default=None, metadata={"help": "Rows per optimizer step (every stage)."})
    pretrain_steps: int | None = field(default=None, metadata={"help": "MDLM pretraining steps."})
    pretrain_learning_rate: float = field(default=1e-3, metadata={"help": "Peak rate of pretraining (cosine)."})
    finetune_steps: int | None = field(default=None, metadata={"help": "Steps of each arm (equal tokens)."})
    finetune_learning_rate: float = field(default=3e-4, metadata={"help": "Constant rate of every arm (reference)."})
    dsl_group_learning_rate: float = field(
        default=3e-3, metadata={"help": "Rate of E, beta, b (and W in dsl-group-w) in the dsl-group arms."}
    )
    ema_decay: float = field(default=0.999, metadata={"help": "EMA decay of every arm (reference: 0.999)."})
    rho: float = field(default=0.25, metadata={"help": "ROAR share of the DSL arms' mixture path."})
    lognormal_mu: float = field(default=2.69, metadata={"help": "Mean log SNR of the DSL arms' log-normal part."})
    lognormal_sigma: float = field(default=1.41, metadata={"help": "Std of log SNR of the DSL arms' log-normal part."})
    arms: list[str] | None = field(default=None, metadata={"help": f"Arms to fine-tune, from {sorted(ARMS)}."})
    save_steps: int | None = field(default=None, metadata={"help": "Checkpoint every N steps (0 = never)."})
    # --- sampling
    step_budgets: list[int] | None = field(default=None, metadata={"help": "Step budgets T (a doubling grid up to L)."})
    samples_per_cell: int | None = field(default=None, metadata={"help": "Samples per cell (>= 2,000 for the real run)."})
    sampling_batch_size: int | None = field(default=None, metadata={"help": "Rows per sampler call."})
    baseline_arm: str = field(default="mdlm", metadata={"help": "The headline's MDLM arm (MDLM and ReMDM)."})
    candidate_arm: str | None = field(
        default=None,
        metadata={"help": "The headline's DSL arm (ReMDM, DSL-SDE, hybrid; rescore and confidence); default: the "
                          "preset's (full: dsl-scratch, the best DSL arm on the MDLM arm's tokens; ci: dsl)."},
    )
    seeds: list[int] | None = field(default=None, metadata={"help": "Sampling seeds of the headline pair."})
    other_arm_seeds: list[int] | None = field(
        default=None, metadata={"help": "Sampling seeds of the other arms' samplers (default: seeds)."}
    )
    other_arm_step_budgets: list[int] | None = field(
        default=None, metadata={"help": "Budgets of the other arms' samplers (default: step_budgets)."}
    )
    secondary_seeds: list[int] | None = field(
        default=None, metadata={"help": "Sampling seeds of the pair's secondary samplers (rescore, confidence) and ROAR."}
    )
    secondary_step_budgets: list[int] | None = field(
        default=None, metadata={"help": "Budgets of the pair's secondary samplers (default: every budget)."}
    )
    roar_arms: list[str] = field(
        default_factory=lambda: ["dsl", "mdlm"], metadata={"help": "Arms sampled with ROAR (NFE = L); 'none' for no ROAR."}
    )
    roar_eval_samples: int | None = field(default=None, metadata={"help": "Fresh law rows of each arm's ROAR NLL."})
    oracle_seeds: list[int] = field(
        default_factory=lambda: [0], metadata={"help": "Sampling seeds of the oracle cells (one per sampler and budget)."}
    )
    gap_log_steps: int | None = field(
        default=None, metadata={"help": "Measure each arm's denoiser gap every N training steps (0 = only at the end)."}
    )
    gap_rows: int | None = field(default=None, metadata={"help": "Fixed law rows of the denoiser-gap measurements."})
    threads: int = field(
        default=1,
        metadata={"help": "torch threads (0 = torch's default). 1 by default: on a shared 2-core machine two OpenMP "
                  "threads spin against other processes and run ~10x slower; run shards in parallel instead."},
    )
    stop_after: str = field(default="", metadata={"help": "Stop after this stage: law, pretrain, arms or samples."})
    only_arms: list[str] = field(
        default_factory=list, metadata={"help": "Train only these arms, then stop (run arms in parallel processes)."}
    )
    cell_filter: list[str] = field(
        default_factory=list, metadata={"help": "Draw only the cells with these names (an extra parallel worker)."}
    )
    reverse_order: bool = field(
        default=False, metadata={"help": "Draw this worker's cells last-first, to meet the in-order shards halfway."}
    )
    sample_shard: str = field(
        default="0/1", metadata={"help": "k/n: draw only the cells whose index is k mod n, then stop (parallel shards); "
                                 "a final run with 0/1 finds every cell on disk and writes the report."},
    )
    seed: int = field(default=0, metadata={"help": "Seed of initialization and the training streams."})

    def __post_init__(self):
        if self.preset not in PRESETS:
            raise ValueError(f"preset={self.preset!r} is not supported; accepted: {sorted(PRESETS)}.")
        for name, value in PRESETS[self.preset].items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        unknown = set(self.arms) - set(ARMS)
        if unknown or "mdlm" not in self.arms or "dsl" not in self.arms:
            raise ValueError(f"arms={self.arms} must hold 'mdlm' and 'dsl' and come from {sorted(ARMS)}.")
        if any(t < 1 or t > self.length for t in self.step_budgets):
            raise ValueError(f"step_budgets={self.step_budgets} must lie in [1, L = {self.length}].")
        if self.secondary_step_budgets is None:
            self.secondary_step_budgets = list(self.step_budgets)
        if self.other_arm_seeds is None:
            self.other_arm_seeds = list(self.seeds)
        if self.other_arm_step_budgets is None:
            self.other_arm_step_budgets = list(self.step_budgets)
        pair = {"baseline_arm": (self.baseline_arm, "mdlm"), "candidate_arm": (self.candidate_arm, "dsl")}
        for name, (arm, objective) in pair.items():
            if arm not in self.arms or ARMS[arm]["objective"] != objective:
                raise ValueError(f"{name}={arm!r} must be one of arms={self.arms} with objective {objective!r}.")
        if self.stop_after not in ("", "law", "pretrain", "arms", "samples"):
            raise ValueError(f"stop_after={self.stop_after!r} must be one of law, pretrain, arms, samples.")
        if self.roar_arms == ["none"]:
            self.roar_arms = []
        if set(self.roar_arms) - set(self.arms):
            raise ValueError(f"roar_arms={self.roar_arms} must be a subset of arms={self.arms}.")
        if self.gap_log_steps < 0 or self.gap_rows < 2:
            raise ValueError(f"gap_log_steps={self.gap_log_steps} must be >= 0 and gap_rows={self.gap_rows} >= 2.")
        if set(self.only_arms) - set(self.arms):
            raise ValueError(f"only_arms={self.only_arms} must be a subset of arms={self.arms}.")
        shard, _, count = self.sample_shard.partition("/")
        if not (shard.isdigit() and count.isdigit() and int(shard) < int(count)):
            raise ValueError(f"sample_shard={self.sample_shard!r} must read k/n with 0 <= k < n.")
        self.shard_index, self.shard_count = int(shard), int(count)

    def law_config(self) -> HMMLawConfig:
        names = {f.name for f in fields(HMMLawConfig)}
        return HMMLawConfig(**{name: getattr(self, name) for name in names})


# ----------------------------------------------------------------------------------------------------------------
# 1. the law
# ----------------------------------------------------------------------------------------------------------------


def stage_law(args) -> tuple[HiddenMarkovLaw, dict]:
    stage = Stage(args.output_dir, "law")
    tensors_path = os.path.join(stage.path, "law.pt")
    if stage.done:
        tensors = torch.load(tensors_path)
        return HiddenMarkovLaw(**tensors), stage.record()
    law = build_law(args.law_config())
    torch.save({"initial": law.initial, "transition": law.transition, "emission": law.emission}, tensors_path)
    start = time.perf_counter()
    entropy = law.monte_carlo_entropy(args.length, args.entropy_samples, torch.Generator().manual_seed(10_000 + args.seed))
    record = {
        "config": asdict(args.law_config()),
        "length": args.length,
        "entropy": entropy,
        "describe": law.describe(),
        "true_sample_floor": true_sample_floor(args, law, entropy),
        "seconds": time.perf_counter() - start,
    }
    logger.info("law: entropy %.4f +- %.4f nats/token", entropy["entropy_per_token"], entropy["standard_error"])
    return law, stage.finish(record)


def true_sample_floor(args, law: HiddenMarkovLaw, entropy: dict) -> list[dict]:
    """The scores of TRUE law samples of the cell size, one set per seed: the floor every sampler's bigram KL (a
    plug-in estimate, biased upwards at a finite size) is read against."""
    exact_pairs = law.bigram_marginal(args.length)
    floors = []
    for seed in args.seeds:
        truth = law.sample(args.samples_per_cell, args.length, torch.Generator().manual_seed(20_000 + seed))
        floors.append({"seed": seed, **nll_scores(law, truth, entropy["entropy_per_token"]), **bigram_kl(truth, exact_pairs)})
    return floors


# ----------------------------------------------------------------------------------------------------------------
# 2-3. training
# ----------------------------------------------------------------------------------------------------------------


def training_arguments(args, out_dir: str, steps: int, **overrides):
    from dsl_diffusion.trainer import DSLTrainingArguments

    base = dict(
        output_dir=out_dir, max_steps=steps, per_device_train_batch_size=args.batch_size, weight_decay=0.0,
        max_grad_norm=1.0, logging_steps=max(1, steps // 20), report_to=[], eval_strategy="no", seed=args.seed,
        data_seed=args.seed, use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0,
        save_strategy="steps" if args.save_steps else "no", save_steps=args.save_steps or 500, save_total_limit=1,
        eval_roar_nll=False, eval_mdlm_nelbo=False, disable_tqdm=False,
    )
    base.update(overrides)
    return DSLTrainingArguments(**base)


def train(args, model, training_args, stream_seed: int, callbacks=None) -> dict:
    from transformers.trainer_utils import get_last_checkpoint

    from dsl_diffusion.trainer import DiffusionDataCollator, DSLTrainer

    law = HiddenMarkovLaw(**torch.load(os.path.join(args.output_dir, "law", "law.pt")))
    trainer = DSLTrainer(
        model=model, args=training_args, train_dataset=LawSampleStream(law, args.length, seed=stream_seed),
        data_collator=DiffusionDataCollator(), callbacks=callbacks,
    )
    checkpoint = get_last_checkpoint(training_args.output_dir) if args.save_steps else None
    start = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=checkpoint)
    seconds = time.perf_counter() - start
    trainer.save_model(training_args.output_dir)  # with the EMA weights when EMA is on (ema_export)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return {
        "train_seconds": seconds,
        "steps": training_args.max_steps,
        "tokens": training_args.max_steps * args.batch_size * args.length,
        "resumed_from_checkpoint": checkpoint and os.path.basename(checkpoint),
        "final_train_loss": result.training_loss if not losses else losses[-1],
        "loss_history": losses,
        "grad_norm_history": [entry["grad_norm"] for entry in trainer.state.log_history if "grad_norm" in entry],
        "gap_history": [entry for entry in trainer.state.log_history if "gap/endpoint" in entry],
    }


def fresh_model(args):
    """The denoiser at random initialization (seeded), as pretraining starts it."""
    from dsl_diffusion.modeling_dsl import DSLConfig, DSLForMaskedDiffusion

    torch.manual_seed(args.seed)
    config = DSLConfig(
        vocab_size=args.vocab_size, hidden_size=args.hidden_size, num_hidden_layers=args.num_hidden_layers,
        num_attention_heads=args.num_attention_heads, cond_dim=args.cond_dim, max_position_embeddings=args.length,
        embed_dim=args.embed_dim, dropout=0.0,
    )
    return DSLForMaskedDiffusion(config)


def pretrain_warmup(steps: int) -> int:
    return min(100, steps // 10)


def stage_pretrain(args, roar_rows: torch.LongTensor) -> Stage:
    from dsl_diffusion.modeling_dsl import DSLForMaskedDiffusion

    stage = Stage(args.output_dir, "pretrain")
    if stage.done:
        return stage
    model = fresh_model(args)
    training_args = training_arguments(
        args, stage.path, args.pretrain_steps, objective="mdlm", learning_rate=args.pretrain_learning_rate,
        lr_scheduler_type="cosine", warmup_steps=pretrain_warmup(args.pretrain_steps), ema_decay=0.0,
    )
    record = train(args, model, training_args, stream_seed=100 + args.seed)
    record["parameters_m"] = model.num_parameters() / 1e6
    model = DSLForMaskedDiffusion.from_pretrained(stage.path).eval()
    record.update(**endpoint_diagnostics(model, pretrained_law(args), args.length), roar_nll=roar_likelihood(args, model, roar_rows))
    stage.finish(record)
    return stage


def arm_steps(args, arm: str) -> int:
    spec = ARMS[arm]
    steps = spec.get("steps_factor", 1) * args.finetune_steps
    return args.pretrain_steps + steps if spec.get("from_scratch") else steps


def arm_training_arguments(args, arm: str, out_dir: str):
    spec = ARMS[arm]
    learning_rate = spec.get("learning_rate", args.finetune_learning_rate)
    overrides = dict(
        objective=spec["objective"], learning_rate=learning_rate, lr_scheduler_type="constant",
        warmup_steps=0, ema_decay=args.ema_decay,
        # MDLM's EMA warm-up (the reference has none): without it, after 1,000 steps at decay 0.999 the exported
        # weights would still hold 37% of the pretrained ones, which would mute whatever the arm learned.
        ema_warmup=True, eos_in_loss="count",
    )
    if spec.get("from_scratch"):  # the pretraining schedule over the pretraining and fine-tuning steps together
        learning_rate = args.pretrain_learning_rate
        overrides.update(learning_rate=learning_rate, lr_scheduler_type="cosine",
                         warmup_steps=pretrain_warmup(arm_steps(args, arm)))
    if spec["objective"] == "dsl":
        mu, sigma = spec.get("lognormal", (args.lognormal_mu, args.lognormal_sigma))
        overrides.update(snr_path="mixture", rho=spec.get("rho", args.rho), lognormal_mu=mu, lognormal_sigma=sigma,
                         per_token_snr=spec.get("per_token", False), roar_smoothed=spec.get("roar_smoothed", False),
                         per_token_snr_fraction=spec.get("per_token_fraction", 1.0), roar_lambda=0.0)
    if spec["patterns"] is None:
        # One rate for every parameter: AdamW is per-parameter, so equal rates and zero decay make it one group.
        overrides.update(dsl_learning_rate=learning_rate)
    else:
        overrides.update(
            dsl_parameter_patterns=spec["patterns"], dsl_learning_rate=getattr(args, spec["group_rate"]),
            dsl_group_includes_input_table=spec.get("include_input_table", False),
        )
    return training_arguments(args, out_dir, arm_steps(args, arm), **overrides)


def arm_start_model(args, arm: str, pretrained: Stage):
    """The arm's starting weights: the pretrained MDLM (or a fresh init for `from_scratch`), with the arm's converter
    start values and frozen parameters applied (see `ARMS`)."""
    from dsl_diffusion.modeling_dsl import DSLForMaskedDiffusion

    spec = ARMS[arm]
    torch.manual_seed(args.seed)
    model = fresh_model(args) if spec.get("from_scratch") else DSLForMaskedDiffusion.from_pretrained(pretrained.path)
    with torch.no_grad():
        if "converter_beta" in spec:
            model.converter_beta.fill_(spec["converter_beta"])
            model.config.converter_beta_init = float(spec["converter_beta"])  # recorded with the saved config
        if "converter_mask_bias" in spec:
            value = spec["converter_mask_bias"]
            value = math.log(model.config.vocab_size) if value == "log_vocab" else float(value)
            model.converter_bias[model.config.mask_token_id] = value
            model.config.converter_mask_bias = value
    if spec.get("frozen_directions"):
        model.token_directions.weight.requires_grad_(False)
    return model


def gap_rows(args, law: HiddenMarkovLaw) -> torch.LongTensor:
    """The fixed law rows every denoiser-gap measurement uses (training curves and final tables alike)."""
    return law.sample(args.gap_rows, args.length, torch.Generator().manual_seed(50_000 + args.seed))


def arm_gap_options(arm: str) -> dict:
    """What the gap measures for an arm: the noisy-state cells for the DSL arms only (an MDLM arm never saw noisy
    states: its converter is untrained), the per-token cell where the arm trained on per-token SNRs."""
    spec = ARMS[arm]
    return {"noisy": spec["objective"] == "dsl", "per_token": bool(spec.get("per_token"))}


def stage_arm(args, arm: str, pretrained: Stage, roar_rows: torch.LongTensor) -> Stage:
    from dsl_diffusion.modeling_dsl import DSLForMaskedDiffusion

    from .gap import DenoiserGapCallback

    stage = Stage(args.output_dir, f"arm-{arm}")
    if stage.done:
        return stage
    model = arm_start_model(args, arm, pretrained)
    before = {"directions": model.token_directions().detach().clone(), "bias": model.converter_bias.detach().clone()}
    training_args = arm_training_arguments(args, arm, stage.path)
    callbacks = []
    if args.gap_log_steps:
        options = arm_gap_options(arm)
        per_token = (training_args.lognormal_mu, training_args.lognormal_sigma) if options["per_token"] else None
        law = pretrained_law(args)
        callbacks.append(DenoiserGapCallback(law, gap_rows(args, law), every=args.gap_log_steps,
                                             per_token_lognormal=per_token, noisy=options["noisy"], seed=args.seed))
    # Every arm reads the same fresh stream: equal tokens, and the same ones.
    record = train(args, model, training_args, stream_seed=200 + args.seed, callbacks=callbacks)
    model = DSLForMaskedDiffusion.from_pretrained(stage.path).eval()  # the exported (EMA) weights
    cosine = torch.nn.functional.cosine_similarity(model.token_directions().detach(), before["directions"], dim=-1)
    record.update(
        arm=arm,
        recipe={k: getattr(training_args, k) for k in (
            "objective", "learning_rate", "lr_scheduler_type", "warmup_steps", "ema_decay", "ema_warmup", "dsl_learning_rate",
            "dsl_parameter_patterns", "snr_path", "rho", "lognormal_mu", "lognormal_sigma", "per_token_snr",
            "per_token_snr_fraction", "roar_smoothed", "roar_lambda", "max_grad_norm", "per_device_train_batch_size", "max_steps")},
        start={k: v for k, v in ARMS[arm].items() if k not in ("objective", "patterns", "group_rate")},
        endpoint_inputs=getattr(model.config, "endpoint_inputs", "table (before the converter endpoint path existed)"),
        directions_mean_cosine_to_init=float(cosine.mean()),
        converter_beta=float(model.converter_beta.detach()),
        converter_bias_max_change=float((model.converter_bias.detach() - before["bias"]).abs().max()),
        **endpoint_diagnostics(model, pretrained_law(args), args.length),
        roar_nll=roar_likelihood(args, model, roar_rows),
    )
    stage.finish(record)
    return stage


def stage_gap(args, arm: str, law: HiddenMarkovLaw) -> dict:
    """The arm's final denoiser gap table (its exported weights), a stage of its own so that arms trained before
    the gap existed get one too."""
    from dsl_diffusion.modeling_dsl import DSLForMaskedDiffusion

    from .gap import DenoiserGap

    stage = Stage(args.output_dir, f"gap-{arm}")
    if stage.done:
        return stage.record()
    arm_path = os.path.join(args.output_dir, f"arm-{arm}")
    model = DSLForMaskedDiffusion.from_pretrained(arm_path).eval()
    options = arm_gap_options(arm)
    per_token = None
    if options["per_token"]:
        with open(os.path.join(arm_path, "done.json")) as f:
            recipe = json.load(f)["recipe"]
        per_token = (recipe["lognormal_mu"], recipe["lognormal_sigma"])
    start = time.perf_counter()
    table = DenoiserGap(law, gap_rows(args, law), seed=args.seed)(model, per_token, noisy=options["noisy"])
    return stage.finish({"arm": arm, **table, "seconds": time.perf_counter() - start})


def pretrained_law(args) -> HiddenMarkovLaw:
    return HiddenMarkovLaw(**torch.load(os.path.join(args.output_dir, "law", "law.pt")))


@torch.no_grad()
def endpoint_diagnostics(model, law: HiddenMarkovLaw, length: int) -> dict:
    """How the model reads the all-masked state every discrete sampler starts from, against the exact answer: the
    total variation between its per-position predictions and the law's exact per-position marginals (0 for a perfect
    denoiser), and the converter's mask-slot weight at z = 0."""
    ids = torch.full((1, length), model.config.mask_token_id)
    predicted = model(input_ids=ids).logits.double().softmax(-1)[0]
    exact = law.state_marginals(length) @ law.emission
    total_variation = 0.5 * (predicted - exact).abs().sum(-1)
    impossible_first = float(predicted[0][law.first_token_marginal() == 0].sum())
    return {
        "all_masked_marginal_tv_mean": float(total_variation.mean()),
        "all_masked_first_token_impossible_mass": impossible_first,
        "converter_mask_slot_weight_at_z0": float(model.converter_bias.double().softmax(-1)[-1]),
    }


def roar_likelihood(args, model, rows: torch.LongTensor) -> dict:
    """The model's own ROAR NLL (exact any-order AR likelihood in expectation) on fresh law rows, through the
    model's default discrete path, with the standard error over rows."""
    from dsl_diffusion.trainer.losses import roar_nll

    generator = torch.Generator().manual_seed(30_000 + args.seed)
    per_row = []
    with torch.no_grad():
        for batch in rows.split(512):
            out = roar_nll(model, batch, None, generator=generator)
            per_row.append(out.nll_sum / out.num_tokens)  # a batch mean; rows have equal length
    values = torch.stack([torch.as_tensor(v, dtype=torch.float64) for v in per_row])
    return {
        "nll_per_token": float(values.mean()),
        "standard_error": float(values.std() / math.sqrt(len(values))) if len(values) > 1 else None,
        "num_rows": len(rows),
    }


# ----------------------------------------------------------------------------------------------------------------
# 4. sampling
# ----------------------------------------------------------------------------------------------------------------


def remdm_knobs(num_steps: int, length: int) -> dict:
    """The published ReMDM settings scaled to L: "loop" (eta 0.02) for T >= L, "cap" (eta 0.04) below."""
    if num_steps >= length and num_steps >= LOOP_MIN_STEPS:
        return {"strategy": "loop", "eta": 0.02, "t_on": 0.55, "t_off": 0.05, "alpha_on": 0.9}
    return {"strategy": "cap", "eta": 0.04}


def sampler_cell(args, arm: str, sampler: str, steps: int, seed: int) -> dict:
    """One cell: `sampler` is a name of `get_sampler`; ReMDM takes the published knobs scaled to L (its strategy in the
    cell's name), rescore ReMDM's eta, the DSL-SDE the log-linear grid, the others their defaults."""
    if sampler == "remdm":
        knobs = remdm_knobs(steps, args.length)
    elif sampler == "remdm-rescore":  # its own curve, not ReMDM's
        knobs = {"eta": 0.04}
    elif sampler == "dsl-sde":
        knobs = {"snr_schedule": "log-linear"}
    elif sampler == "hybrid-half":
        knobs = {"continuous_steps": steps // 2, "snr_star": 10.0, "snr_schedule": "log-linear"}
    elif sampler == "dsl-sde-lognormal":
        knobs = {"snr_schedule": "log-normal"}
    elif sampler == "dsl-sde-revision":  # T - T/4 SDE steps, one round of T/4 revision steps: NFE T + 2 (SDE: T + 1)
        revision_steps = max(1, steps // 4)
        knobs = {"snr_schedule": "log-linear", "num_steps": steps - revision_steps, "revision_rounds": 1,
                 "revision_steps": revision_steps}
    else:
        knobs = {}
    return dict(arm=arm, sampler=sampler, num_steps=steps, seed=seed, knobs=knobs)


def plan_cells(args) -> list[dict]:
    """The cells in priority order:
    1. the headline pair (`baseline_arm`: MDLM and ReMDM; `candidate_arm`: ReMDM, DSL-SDE, hybrid) at every budget
       and seed;
    2. the pair's secondary samplers (confidence for both, rescore for the DSL arm) at the secondary budgets and seeds;
    3. ROAR (NFE = L) of the `roar_arms`, at the secondary seeds;
    4. the other arms' samplers (`OTHER_ARM_SAMPLERS`; none for `DROPPED_ARMS`) at `other_arm_step_budgets`, the
       first of `other_arm_seeds`;
    5. the same at the remaining `other_arm_seeds`;
    6. the oracle: each (sampler, T) above once per `oracle_seeds`, beside the arm of its first cell (whose config
       and E it takes; E matters only to the samplers that show it noisy states: the SDE and the hybrid).
    A budget below 2 has no hybrid cell (one continuous and one discrete step at least)."""
    pair = ((args.baseline_arm, BASELINE_SAMPLERS), (args.candidate_arm, CANDIDATE_SAMPLERS))
    secondary = ((args.baseline_arm, SECONDARY_BASELINE_SAMPLERS), (args.candidate_arm, SECONDARY_CANDIDATE_SAMPLERS))
    # A dropped arm keeps its ROAR NLL and gap rows in the report, not sampler cells.
    other_arms = [arm for arm in args.arms if arm not in (args.baseline_arm, args.candidate_arm, *DROPPED_ARMS)]

    def sweep(arms_and_samplers, budgets, seeds):
        return [sampler_cell(args, arm, sampler, steps, seed) for seed in seeds for steps in budgets
                for arm, samplers in arms_and_samplers for sampler in samplers
                if steps >= 2 or SAMPLER_VARIANTS.get(sampler, sampler) != "hybrid"]

    first, rest = args.other_arm_seeds[:1], args.other_arm_seeds[1:]
    others = [(arm, OTHER_ARM_SAMPLERS[ARMS[arm]["objective"]]) for arm in other_arms]
    cells = sweep(pair, args.step_budgets, args.seeds)
    cells += sweep(secondary, args.secondary_step_budgets, args.secondary_seeds)
    cells += [dict(arm=arm, sampler="roar", num_steps=args.length, seed=seed, knobs={})
              for seed in args.secondary_seeds for arm in args.roar_arms]
    cells += sweep(others, args.other_arm_step_budgets, first) + sweep(others, args.other_arm_step_budgets, rest)
    oracle_cells = {}
    for cell in cells:
        key = (cell["sampler"], cell["num_steps"], json.dumps(cell["knobs"], sort_keys=True))
        oracle_cells.setdefault(key, cell)
    cells += [dict(arm=ORACLE_ARM, beside=cell["arm"], sampler=cell["sampler"], num_steps=cell["num_steps"], seed=seed,
                   knobs=cell["knobs"]) for seed in args.oracle_seeds for cell in oracle_cells.values()]
    for cell in cells:
        cell["name"] = f"{cell['arm']}+{sampler_label(cell)}@T{cell['num_steps']}#seed{cell['seed']}"
    return cells


def sampler_label(cell: dict) -> str:
    return cell["sampler"] + ("-" + cell["knobs"]["strategy"] if "strategy" in cell["knobs"] else "")


def draw_cell(args, model, cell: dict) -> tuple[torch.LongTensor, float]:
    from dsl_diffusion.pipelines.samplers import get_sampler

    knobs = dict(cell["knobs"])
    name = SAMPLER_VARIANTS.get(cell["sampler"], cell["sampler"])
    if name != "roar":  # ROAR takes one step per position
        knobs.setdefault("num_steps", cell["num_steps"])
    if name != "dsl-sde":
        knobs["top_p"] = 1.0  # no truncation: the samplers are judged against the law itself
    sampler = get_sampler(name, **knobs)
    generator = torch.Generator().manual_seed(cell["seed"])
    sequences, nfe = [], []
    remaining = args.samples_per_cell
    while remaining > 0:
        size = min(args.sampling_batch_size, remaining)
        out = sampler.run(model, batch_size=size, seq_len=args.length, generator=generator, progress_bar=False)
        sequences.append(out.sequences.cpu())
        nfe.append(float(out.nfe))
        remaining -= size
    return torch.cat(sequences), sum(nfe) / len(nfe)


def cell_model(args, law: HiddenMarkovLaw, arm: str, beside: str | None = None):
    """The denoiser of a cell: an arm's exported weights, or the oracle beside one."""
    from dsl_diffusion.modeling_dsl import DSLForMaskedDiffusion

    from .oracle import oracle_beside

    model = DSLForMaskedDiffusion.from_pretrained(os.path.join(args.output_dir, f"arm-{beside or arm}")).eval()
    return oracle_beside(law, model) if arm == ORACLE_ARM else model


def stage_samples(args, law: HiddenMarkovLaw, law_record: dict) -> Stage:
    # Not skipped once done: a plan with more cells than the finished one (a new arm, the oracle cells) draws only
    # the missing ones; every cell on disk is reused.
    stage = Stage(args.output_dir, "samples")
    entropy = law_record["entropy"]["entropy_per_token"]
    exact_pairs = law.bigram_marginal(args.length)
    models = {}
    cells = plan_cells(args)
    mine = cells[args.shard_index :: args.shard_count]
    if args.cell_filter:
        mine = [cell for cell in mine if cell["name"] in set(args.cell_filter)]
    if args.reverse_order:
        mine = mine[::-1]
    for cell in tqdm(mine, desc=f"sampling cells (shard {args.sample_shard})"):
        path = os.path.join(stage.path, cell["name"] + ".json")
        if os.path.isfile(path):
            continue
        key = (cell["arm"], cell.get("beside"))
        if key not in models:
            models[key] = cell_model(args, law, *key)
        start = time.perf_counter()
        tokens, nfe = draw_cell(args, models[key], cell)
        seconds = time.perf_counter() - start
        if (tokens >= args.vocab_size).any():
            raise RuntimeError(f"{cell['name']} left [MASK] in its output")
        torch.save(tokens.to(torch.int16), os.path.join(stage.path, cell["name"] + ".pt"))
        record = {**cell, "nfe": nfe, "seconds": seconds, **score_samples(law, tokens, entropy, exact_pairs)}
        atomic_write_json(path, record)
        logger.info("%-36s NFE %5.1f  %5.1f s  excess %s  impossible %.3f  KL %s", cell["name"], nfe, seconds,
                    _fmt(record["nll_excess_mean"]), record["impossible_share"], _fmt(record["bigram_kl"]))
    names = [cell["name"] for cell in cells]
    if all(os.path.isfile(os.path.join(stage.path, name + ".json")) for name in names) and (
        not stage.done or stage.record().get("cells") != names
    ):
        stage.finish({"cells": names})
    return stage


def _fmt(value, digits=3):
    return "-" if value is None else f"{value:.{digits}f}"


# ----------------------------------------------------------------------------------------------------------------
# 5. report
# ----------------------------------------------------------------------------------------------------------------


def load_cells(args) -> list[dict]:
    folder = os.path.join(args.output_dir, "samples")
    rows = []
    for cell in plan_cells(args):
        with open(os.path.join(folder, cell["name"] + ".json")) as f:
            rows.append(json.load(f))
    return rows


def curve_label(row: dict) -> str:
    return f"{row['arm']} / {row['sampler']}"


def seed_mean_rows(rows: list[dict], metric: str) -> list[dict]:
    """One row per (arm, sampler, T): the metric averaged over seeds (NFE too: cached samplers vary)."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        if row.get(metric) is not None:
            groups.setdefault((row["arm"], row["sampler"], row["num_steps"]), []).append(row)
    return [
        {"arm": arm, "sampler": sampler, "num_steps": steps, "nfe": sum(r["nfe"] for r in group) / len(group),
         metric: sum(r[metric] for r in group) / len(group)}
        for (arm, sampler, steps), group in groups.items()
    ]


def plot(args, rows: list[dict], law_record: dict) -> list[str]:
    from dsl_diffusion.evaluation.plots import curves_from_rows, plot_metric_vs_nfe

    caption = (f"sticky sparse HMM V={args.vocab_size}, K={args.num_states}, L={args.length}; {args.samples_per_cell} "
               f"samples/cell, mean over seeds {args.seeds} (headline) / {args.secondary_seeds}; top_p=1")
    floor = sum(f["bigram_kl"] for f in law_record["true_sample_floor"]) / len(law_record["true_sample_floor"])
    # The headline pair's samplers at every budget and their oracle ceilings (the secondary samplers, drawn at two
    # budgets, are in the tables): one color per sampler, the baseline dashed, the candidate solid, the oracle dotted.
    samplers = {args.baseline_arm: BASELINE_SAMPLERS, args.candidate_arm: CANDIDATE_SAMPLERS,
                ORACLE_ARM: BASELINE_SAMPLERS + CANDIDATE_SAMPLERS}
    headline_rows = [row for row in rows if row["sampler"] in samplers.get(row["arm"], ())]
    colors = {sampler: f"C{i}" for i, sampler in enumerate(dict.fromkeys(BASELINE_SAMPLERS + CANDIDATE_SAMPLERS))}
    lines = {args.baseline_arm: dict(linestyle="--", marker="s"), args.candidate_arm: dict(linestyle="-", marker="o"),
             ORACLE_ARM: dict(linestyle=":", marker="x", alpha=0.8)}
    styles = {f"{arm} / {sampler}": dict(color=colors[sampler], **lines[arm]) for arm in samplers for sampler in samplers[arm]}
    paths = []
    for metric, name, file, log_y in (
        ("nll_excess_mean", "true-law NLL/token minus entropy (possible samples), nats", "nll_excess_vs_nfe.png", False),
        ("bigram_kl", f"bigram KL to the exact law (true-sample floor {floor:.4f})", "bigram_kl_vs_nfe.png", True),
        ("impossible_share", "share of impossible samples (p(x) = 0)", "impossible_share_vs_nfe.png", False),
    ):
        curves = curves_from_rows(seed_mean_rows(headline_rows, metric), metric, group_keys=("arm", "sampler"))
        paths.append(str(plot_metric_vs_nfe(curves, os.path.join(args.output_dir, file), name,
                                            title="Known-law benchmark", log_y=log_y, caption=caption,
                                            xticks=args.step_budgets, styles=styles)))
    return paths


def plot_gap(args, gaps: dict[str, dict]) -> str | None:
    """ce_gap_vs_snr.png: each DSL arm's denoiser gap against the per-sequence SNR, with its standard error."""
    from matplotlib.figure import Figure

    noisy = {arm: table for arm, table in gaps.items() if table["per_snr"]}
    if not noisy:
        return None
    figure = Figure(figsize=(6.4, 4.6), layout="constrained")
    ax = figure.subplots()
    for arm, table in noisy.items():
        snrs = [row["snr"] for row in table["per_snr"]]
        ax.errorbar(snrs, [row["gap"] for row in table["per_snr"]], yerr=[row["gap_standard_error"] for row in table["per_snr"]],
                    marker="o", capsize=2, label=f"{arm} (endpoint gap {table['endpoint']['gap']:.3f})")
    ax.set_xscale("log")
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xlabel("SNR s (one per sequence)")
    ax.set_ylabel("CE(model) - CE(Bayes) on the same z, nats/token")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    figure.suptitle("Known-law benchmark: denoiser gap", fontsize=11)
    ax.set_title(f"{next(iter(noisy.values()))['num_rows']} fixed law rows, the oracle with each arm's own E", fontsize=7)
    path = os.path.join(args.output_dir, "ce_gap_vs_snr.png")
    figure.savefig(path, dpi=130)
    return path


def gap_markdown(gaps: dict[str, dict]) -> list[str]:
    snrs = sorted({row["snr"] for table in gaps.values() for row in table["per_snr"]})

    def cell(entry):
        return "" if entry is None else f"{entry['gap']:.3f} ± {entry['gap_standard_error']:.3f}"

    lines = [
        "## Denoiser gap: CE(model) - CE(Bayes) on the same inputs (nats/token ± standard error over rows)",
        "",
        "Per SNR: every token of a row at s, noisy states through the arm's own E (the oracle reads the same z with "
        "the same E). Per token: log-normal SNRs per token, for arms trained so. Endpoint: ROAR endpoint rows through "
        "`input_ids`, the masked positions. Bayes CE in brackets.",
        "",
        "| arm | " + " | ".join(f"s = {s:g}" for s in snrs) + " | per token | endpoint |",
        "|---|" + "---|" * (len(snrs) + 2),
    ]
    for arm, table in gaps.items():
        by_snr = {row["snr"]: row for row in table["per_snr"]}
        endpoint = table["endpoint"]
        lines.append(f"| {arm} | " + " | ".join(cell(by_snr.get(s)) for s in snrs) + f" | {cell(table['per_token'])} | "
                     f"{cell(endpoint)} [{endpoint['oracle_ce']:.3f}] |")
    return lines + [""]


HEADLINE_METRICS = (("nll_excess_mean", "nll_standard_error"), ("bigram_kl", None), ("impossible_share", None))


def seed_mean(rows: list[dict], metric: str) -> float | None:
    values = [row[metric] for row in rows if row.get(metric) is not None]
    return sum(values) / len(values) if values else None


def best_baseline_rows(args, rows: list[dict], metric: str) -> list[dict]:
    """The baseline arm's rows of the better of its samplers (`BASELINE_SAMPLERS`) at each budget, by seed mean."""
    chosen = []
    for steps in sorted({row["num_steps"] for row in rows if row["arm"] == args.baseline_arm}):
        options = []
        for sampler in BASELINE_SAMPLERS:
            group = [row for row in rows if (row["arm"], row["sampler"], row["num_steps"]) == (args.baseline_arm, sampler, steps)]
            if seed_mean(group, metric) is not None:
                options.append((seed_mean(group, metric), sampler, group))
        if options:
            chosen += min(options, key=lambda option: option[0])[2]
    return chosen


def headline(args, rows: list[dict]) -> dict:
    """For each sampler of the candidate arm with two budgets or more: the NFE it needs to match the baseline arm's
    better of MDLM and ReMDM at each budget, per metric (`nfe_to_match`), each entry with the baseline's sampler and
    the oracle's values of both samplers at that budget (their ceilings)."""
    out = {}
    for metric, error_key in HEADLINE_METRICS:
        baseline = best_baseline_rows(args, rows, metric)
        baseline_sampler = {row["num_steps"]: row["sampler"] for row in baseline}
        for sampler in CANDIDATE_SAMPLERS + SECONDARY_CANDIDATE_SAMPLERS:
            candidate = [row for row in rows if (row["arm"], row["sampler"]) == (args.candidate_arm, sampler)]
            if len({row["num_steps"] for row in candidate}) < 2:
                continue
            result = nfe_to_match(baseline, candidate, metric, error_key)
            for entry in result["entries"]:
                steps = entry["num_steps"]
                entry["baseline_sampler"] = baseline_sampler[steps]
                for key, name in (("oracle_baseline", baseline_sampler[steps]), ("oracle_candidate_same_steps", sampler)):
                    entry[key] = seed_mean([row for row in rows if (row["arm"], row["sampler"], row["num_steps"]) == (
                        ORACLE_ARM, name, steps)], metric)
            out.setdefault(f"{args.candidate_arm} / {sampler}", {})[metric] = result
    return out


def markdown(args, rows: list[dict], law_record: dict, arms: dict, heads: dict, gaps: dict) -> str:
    entropy = law_record["entropy"]
    lines = [
        "# Known-law benchmark",
        "",
        f"Law: sticky sparse HMM, V = {args.vocab_size}, K = {args.num_states} hidden states, {args.tokens_per_state} "
        f"tokens per state, {args.successors_per_state} successors, stay {args.stay_probability}, L = {args.length}. "
        f"Entropy H(X_1..L)/L = **{entropy['entropy_per_token']:.4f} ± {entropy['standard_error']:.4f}** nats/token "
        f"({entropy['method']}, {entropy['num_sequences']:,} sequences).",
        "",
        "True-law samples of the cell size (the floor): " + "; ".join(
            f"seed {f['seed']}: NLL excess {f['nll_excess_mean']:+.4f}, bigram KL {f['bigram_kl']:.4f}"
            for f in law_record["true_sample_floor"]),
        "",
        "## Arms (from the pretrained MDLM, or from random weights where the recipe says from_scratch)",
        "",
        "| arm | training tokens | ROAR NLL (nats/token) | minus entropy | all-masked TV to exact marginals | "
        "mask-slot weight at z=0 | train s |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, record in arms.items():
        roar = record["roar_nll"]
        lines.append(
            f"| {name} | {record['tokens'] / 1e6:.2f}M | {roar['nll_per_token']:.4f} ± {roar['standard_error'] or 0:.4f} | "
            f"{roar['nll_per_token'] - entropy['entropy_per_token']:+.4f} | {record['all_masked_marginal_tv_mean']:.4f} | "
            f"{record['converter_mask_slot_weight_at_z0']:.3f} | {record['train_seconds']:.0f} |"
        )
    lines += ["", "Recipe-search arms left out of the full preset (`DROPPED_ARMS`; their rows above where this run "
              "trained them):", ""]
    lines += [f"- {arm}: {why}." for arm, why in DROPPED_ARMS.items()]
    lines += [""] + gap_markdown(gaps)
    steps = sorted({r["num_steps"] for r in rows})
    lines += [
        "## NLL excess (mean / median over possible samples, nats/token) · impossible share · bigram KL",
        "",
        "Each cell: mean over seeds; seeds listed. NFE is the measured number of network calls. The `oracle` rows run "
        "the same sampler on the exact denoiser of the law (its ceiling at that budget; for the SDE and the hybrid "
        "with the E of the arm the cell was planned for).",
        "",
        "| arm / sampler | seeds | " + " | ".join(f"T = {t}" for t in steps) + " |",
        "|---|---|" + "---|" * len(steps),
    ]
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(curve_label(row), []).append(row)
    for label, group in groups.items():
        seeds = sorted({r["seed"] for r in group})
        cells = []
        for t in steps:
            at = [r for r in group if r["num_steps"] == t]
            if not at:
                cells.append("")
                continue

            def avg(key):
                values = [r[key] for r in at if r[key] is not None]
                return sum(values) / len(values) if values else None

            cells.append(f"{_fmt(avg('nll_excess_mean'))} / {_fmt(avg('nll_excess_median'))} · "
                         f"{avg('impossible_share'):.3f} · {_fmt(avg('bigram_kl'), 4)} (NFE {avg('nfe'):.0f})")
        lines.append(f"| {label} | {','.join(map(str, seeds))} | " + " | ".join(cells) + " |")
    lines += [
        "", f"## Headline: the NFE {args.candidate_arm}'s samplers need to match {args.baseline_arm} with the better of "
        "MDLM and ReMDM", "",
        "Lower is better for every metric. At each baseline budget: the baseline's better sampler there, its value, "
        "the candidate at the same T, both samplers' oracle ceilings at that T, the noise floor (the larger seed-to-seed "
        "range, or twice the combined standard error) and the verdict; no ratio is given inside the noise floor.", "",
    ]
    for label, metrics in heads.items():
        for metric, result in metrics.items():
            lines += [f"**{label} vs {args.baseline_arm}, {metric}** (seeds {result['seeds']}):", "",
                      "| baseline T | baseline sampler | baseline | its oracle | candidate at same T | its oracle | "
                      "noise floor | verdict |", "|---|---|---|---|---|---|---|---|"]
            for e in result["entries"]:
                lines.append(f"| {e['num_steps']} | {e['baseline_sampler']} | {_fmt(e['baseline'], 4)} | "
                             f"{_fmt(e['oracle_baseline'], 4)} | {_fmt(e.get('candidate_same_steps'), 4)} | "
                             f"{_fmt(e['oracle_candidate_same_steps'], 4)} | {_fmt(e.get('noise_floor'), 4)} | "
                             f"{e['verdict']} |")
            lines.append("")
    return "\n".join(lines) + "\n"


def stage_report(args, law_record: dict, arm_stages: dict[str, Stage], pretrain: Stage, gaps: dict) -> dict:
    rows = load_cells(args)
    arms = {"pretrained (MDLM)": pretrain.record(), **{name: stage.record() for name, stage in arm_stages.items()}}
    heads = headline(args, rows)
    plots = plot(args, rows, law_record)
    gap_plot = plot_gap(args, gaps)
    plots += [gap_plot] if gap_plot else []
    table = markdown(args, rows, law_record, arms, heads, gaps)
    with open(os.path.join(args.output_dir, "results.md"), "w") as f:
        f.write(table)
    report = {
        "arguments": asdict(args),
        "law": law_record,
        "pretrain": pretrain.record(),
        "arms": arms,
        "cells": rows,
        "headline": heads,
        "denoiser_gap": gaps,
        "plots": plots,
        "environment": {"python": sys.version.split()[0], "torch": torch.__version__, "platform": platform.platform(),
                        "threads": torch.get_num_threads()},
    }
    atomic_write_json(os.path.join(args.output_dir, "results.json"), report)
    print(table)
    return report


def run(args: KnownLawArguments) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    os.makedirs(args.output_dir, exist_ok=True)
    start = time.perf_counter()
    law, law_record = stage_law(args)
    if any(floor["num_samples"] != args.samples_per_cell for floor in law_record["true_sample_floor"]):
        # A run with another cell size than the law stage's: the floor at this one (the stage's record is kept).
        law_record = {**law_record, "true_sample_floor": true_sample_floor(args, law, law_record["entropy"])}
    if args.stop_after == "law":
        return {}
    # One fixed set of fresh law rows scores every model's ROAR NLL.
    roar_rows = law.sample(args.roar_eval_samples, args.length, torch.Generator().manual_seed(40_000 + args.seed))
    pretrain = stage_pretrain(args, roar_rows)
    if args.stop_after == "pretrain":
        return {}
    if args.only_arms:
        for arm in args.only_arms:
            stage_arm(args, arm, pretrain, roar_rows)
            stage_gap(args, arm, law)
        return {}
    arm_stages = {arm: stage_arm(args, arm, pretrain, roar_rows) for arm in args.arms}
    gaps = {arm: stage_gap(args, arm, law) for arm in args.arms}
    if args.stop_after == "arms":
        return {}
    samples = stage_samples(args, law, law_record)
    if args.stop_after == "samples" or not samples.done or samples.record()["cells"] != [c["name"] for c in plan_cells(args)]:
        return {}
    report = stage_report(args, law_record, arm_stages, pretrain, gaps)
    logger.info("known-law benchmark finished in %.1f s (this session)", time.perf_counter() - start)
    return report


def main(argv=None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    (args,) = HfArgumentParser(KnownLawArguments).parse_args_into_dataclasses(args=argv)
    return run(args)


if __name__ == "__main__":
    main()
