"""`dsl-generate`: sample text from a DSL / masked-diffusion checkpoint with any sampler.

    dsl-generate --model path/to/dsl-model --num_return_sequences 4 --max_length 1024 \
        --sampler remdm --strategy loop --num_steps 1024 --top_p 0.9 --seed 1 --output samples.jsonl

Sampler knobs left unset come from the model's `generation_config.json` (else `DSLGenerationConfig`'s defaults).
Without `--output` the texts are printed; with it, one JSON object per sample is written:
{"prompt", "sample_index", "seed", "generated_text", "nfe"}. Exits 0 on success, non-zero on failure.
"""

import json
import os
import sys
from dataclasses import asdict, dataclass, field

import torch
from transformers import HfArgumentParser, pipeline

from .pipeline_diffusion import TASK, DiffusionTextGenerationPipeline
from .samplers import resolve_sampler_name

DTYPES = ("float32", "bfloat16", "float16", "auto")


@dataclass
class GenerationArguments:
    model: str = field(metadata={"help": "A saved DSL model folder or Hub repo id."})
    prompt: list[str] | None = field(
        default=None, metadata={"help": "Prompt(s): a fixed prefix, or a text with [MASK]s to infill. None: unconditional."}
    )
    num_return_sequences: int = field(default=1, metadata={"help": "Samples per prompt."})
    batch_size: int = field(default=1, metadata={"help": "Sequences per sampler run."})
    seed: int = field(default=1, metadata={"help": "Sample r of the run uses a generator seeded with seed + r."})
    max_length: int | None = field(default=None, metadata={"help": "Total sequence length (default: the model's)."})
    max_new_tokens: int | None = field(default=None, metadata={"help": "Positions to generate after the prompt."})
    output: str | None = field(default=None, metadata={"help": "Write the samples to this JSONL file."})
    device: str | None = field(default=None, metadata={"help": "torch device (default: cuda:0 if available, else cpu)."})
    dtype: str = field(default="float32", metadata={"help": "Model dtype: float32, bfloat16, float16 or auto."})
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Run the folder's own model and pipeline code instead of the library's."}
    )
    skip_special_tokens: bool = field(
        default=False, metadata={"help": "Drop special tokens when decoding (the evaluation protocol keeps them)."}
    )
    progress_bar: bool = field(default=True, metadata={"help": "Show a progress bar per sampler run."})


@dataclass
class SamplerArguments:
    """Every knob defaults to None: unset knobs come from the model's generation config."""

    sampler: str | None = field(default=None, metadata={"help": "mdlm, remdm, remdm-{cap,rescale,conf,loop,rescore}, dsl-sde, hybrid, roar, confidence."})
    num_steps: int | None = field(
        default=None, metadata={"help": "Number of steps T (not for roar: one per position; confidence: the most calls)."}
    )
    do_sample: bool | None = field(default=None, metadata={"help": "False: the argmax at every unmasking (greedy)."})
    top_p: float | None = field(default=None, metadata={"help": "Nucleus mass in (0, 1]."})
    nucleus_rule: str | None = field(
        default=None, metadata={"help": "transformers (keep mass >= top_p) or mdlm (the published rule: mass <= top_p)."}
    )
    top_k: int | None = field(default=None, metadata={"help": "Keep the k most probable tokens (0: off)."})
    temperature: float | None = field(default=None, metadata={"help": "Softmax temperature > 0."})
    use_cache: bool | None = field(default=None, metadata={"help": "Reuse the network output when no token changed."})
    s_hi: float | None = field(default=None, metadata={"help": "SNR of a clean token (default: the model's snr_max)."})
    t_min: float | None = field(default=None, metadata={"help": "Last time of the discrete grid (1e-5)."})
    strategy: str | None = field(default=None, metadata={"help": "ReMDM: cap, rescale, conf, loop or rescore."})
    eta: float | None = field(default=None, metadata={"help": "ReMDM remasking strength in [0, 1]."})
    t_on: float | None = field(default=None, metadata={"help": "ReMDM loop: start of the loop window."})
    t_off: float | None = field(default=None, metadata={"help": "ReMDM loop: end of the loop window (< t_on)."})
    alpha_on: float | None = field(default=None, metadata={"help": "ReMDM loop: alpha held inside the window."})
    snr_schedule: str | None = field(default=None, metadata={"help": "SDE grid: log-linear, log-normal or linear."})
    snr_min: float | None = field(default=None, metadata={"help": "SDE: first SNR of the log-linear grid."})
    snr_max: float | None = field(default=None, metadata={"help": "SDE: last SNR (default: the model's snr_max)."})
    lognormal_mean: float | None = field(default=None, metadata={"help": "SDE log-normal grid: mean of log SNR."})
    lognormal_std: float | None = field(default=None, metadata={"help": "SDE log-normal grid: std of log SNR."})
    continuous_steps: int | None = field(default=None, metadata={"help": "Hybrid: SDE steps T_c (< num_steps; None = T - 1)."})
    snr_star: float | None = field(default=None, metadata={"help": "Hybrid: SNR s* reached by the SDE phase (None = s_hi)."})
    commit_rule: str | None = field(default=None, metadata={"help": "Hybrid: threshold or top_fraction."})
    commit_threshold: float | None = field(default=None, metadata={"help": "Hybrid: commit if max prob >= this."})
    commit_fraction: float | None = field(default=None, metadata={"help": "Hybrid: commit this fraction per row."})
    commit_mode: str | None = field(
        default=None, metadata={"help": "Hybrid: evidence (default), sample or argmax (see HybridConfig)."}
    )
    discrete_strategy: str | None = field(default=None, metadata={"help": "Hybrid: mdlm, cap, rescale, conf or loop."})
    discrete_t_start: float | None = field(default=None, metadata={"help": "Hybrid: start time of the discrete phase."})
    confidence_rule: str | None = field(
        default=None, metadata={"help": "Confidence: threshold (top probability >= the threshold) or budget."}
    )
    confidence_threshold: float | None = field(
        default=None, metadata={"help": "Confidence: unmask the positions whose top probability is >= this (0.9)."}
    )
    tokens_per_step: int | None = field(
        default=None, metadata={"help": "Confidence, budget rule: positions unmasked per step and row."}
    )
    revision_rounds: int | None = field(
        default=None, metadata={"help": "SDE / hybrid: draft-revision rounds after the last step (0: off)."}
    )
    revision_snr: float | None = field(
        default=None, metadata={"help": "SDE / hybrid revision: SNR s_d the chosen tokens are re-noised to."}
    )
    revision_fraction: float | None = field(
        default=None, metadata={"help": "SDE / hybrid revision: share of the generated positions re-noised per round."}
    )
    revision_selection: str | None = field(
        default=None, metadata={"help": "SDE / hybrid revision: random (exact) or lowest_confidence (approximate)."}
    )
    revision_steps: int | None = field(
        default=None, metadata={"help": "SDE / hybrid revision: Euler steps per round, from s_d to s_hi."}
    )
    logits_where_needed: bool | None = field(
        default=None,
        metadata={"help": "Output head only where a step draws (default True; the same tokens, no call in a step that "
                          "unmasks nothing)."},
    )
    torch_compile: bool | None = field(
        default=None, metadata={"help": "Run the forward through torch.compile (compiles on the first call)."}
    )


def check_generation_arguments(args: GenerationArguments, sampler_args: SamplerArguments) -> None:
    """What can be checked before the model is loaded: the model path, the output file's folder, the dtype and the
    sampler name (a typo must not cost a model load or a sampling run, nor lose its samples)."""
    from ..modeling_dsl.modeling_dsl import check_checkpoint_files

    check_checkpoint_files(args.model)
    if args.output:
        folder = os.path.dirname(os.path.abspath(args.output))
        if os.path.isdir(args.output):
            raise IsADirectoryError(f"--output {args.output} is a folder; give a file path such as samples.jsonl.")
        if not os.path.isdir(folder):
            raise FileNotFoundError(
                f"--output {args.output}: the folder {folder} does not exist; create it first (checked before sampling "
                "so that no samples are lost)."
            )
        if not os.access(folder, os.W_OK):
            raise PermissionError(f"--output {args.output}: the folder {folder} is not writable.")
    if args.dtype not in DTYPES:
        raise ValueError(f"--dtype {args.dtype!r} is not supported; accepted: {DTYPES}.")
    if sampler_args.sampler is not None:
        resolve_sampler_name(sampler_args.sampler)  # the knobs' values need the model's stored defaults: checked later


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments, generate, print or write the samples; returns the exit status (0)."""
    parser = HfArgumentParser((GenerationArguments, SamplerArguments))
    args, sampler_args = parser.parse_args_into_dataclasses(args=argv)
    check_generation_arguments(args, sampler_args)
    dtype = args.dtype if args.dtype == "auto" else getattr(torch, args.dtype)
    # A saved folder names its own copy of the pipeline code (`custom_pipelines`): use the library's class unless
    # the user asks for the folder's remote code.
    pipeline_class = None if args.trust_remote_code else DiffusionTextGenerationPipeline
    pipe = pipeline(
        TASK,
        model=args.model,
        device=args.device,
        dtype=dtype,
        trust_remote_code=args.trust_remote_code,
        pipeline_class=pipeline_class,
    )
    knobs = {name: value for name, value in asdict(sampler_args).items() if value is not None}
    prompts = args.prompt or [None]
    length = {"max_new_tokens": args.max_new_tokens} if args.max_new_tokens is not None else {"max_length": args.max_length}
    results = pipe(
        prompts,
        num_return_sequences=args.num_return_sequences,
        batch_size=args.batch_size,
        seed=args.seed,
        skip_special_tokens=args.skip_special_tokens,
        progress_bar=args.progress_bar,
        **{key: value for key, value in length.items() if value is not None},
        **knobs,
    )
    if args.output:
        with open(f"{args.output}.tmp", "w", encoding="utf-8") as f:  # renamed when complete: never a partial file
            for prompt_index, (prompt, samples) in enumerate(zip(prompts, results)):
                for sample_index, sample in enumerate(samples):
                    row = prompt_index * args.num_return_sequences + sample_index
                    record = {"prompt": prompt, "sample_index": sample_index, "seed": args.seed + row, **sample}
                    f.write(json.dumps(record) + "\n")
        os.replace(f"{args.output}.tmp", args.output)
        print(f"wrote {sum(map(len, results))} samples to {args.output}", file=sys.stderr)
    else:
        for prompt, samples in zip(prompts, results):
            for sample in samples:
                print(f"--- prompt={prompt!r} nfe={sample['nfe']}\n{sample['generated_text']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
