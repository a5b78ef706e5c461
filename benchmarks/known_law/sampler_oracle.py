"""The new samplers on the known law, through its exact oracle: how far each sampler's samples are from the law
against NFE, with the exact denoiser (so every gap is the sampler's own, none the network's).

    python -m benchmarks.known_law.sampler_oracle                 # ~15 min on 2 shared CPU cores
    python -m benchmarks.known_law.sampler_oracle --quick         # a smoke run (seconds)

The law is the `full` preset's HMM (V = 64, K = 16, L = 32; `run.py`). Samplers, at T in {4, 8, 16} steps (T = 32
would double the time):
- MDLM and ReMDM "conf" (the baselines), on the oracle as it is: a visible token is hard evidence;
- confidence-aware parallel decoding (approximate): the threshold rule (0.9, T caps the calls) and the budget
  rule with L / T positions per call (exactly T calls, like MDLM's T steps);
- ReMDM "rescore" against "conf" at the same endpoint SNR s_hi, on the oracle shown a decoded token the way a
  DSL-trained model's converter is, z = s_hi e_x (`ConverterEndpointOracle`). At s_hi = 100 that evidence is
  nearly hard (the score of a decoded token is ~1, its own evidence), at s_hi = 5 it is soft: the score then
  mixes in the context, and every draw also conditions on soft evidence, which biases the baseline as well.
Metrics (`metrics.score_samples`): NLL excess over the law's entropy per token (possible samples), the share of
impossible samples, the bigram KL; each cell with 2 sampling seeds. Writes JSON and markdown under
benchmarks/results/known-law/samplers/.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch
from torch import nn

from dsl_diffusion.modeling_dsl import DSLConfig
from dsl_diffusion.pipelines.samplers import get_sampler

from .law import HMMLawConfig, build_law
from .metrics import score_samples
from .oracle import HMMOracleDenoiser
from .run import PRESETS

OUTPUT_DIR = Path(__file__).resolve().parents[1] / "results" / "known-law" / "samplers"
LAW_FIELDS = ("vocab_size", "num_states", "tokens_per_state", "successors_per_state", "initial_states")


class ConverterEndpointOracle(nn.Module):
    """The exact oracle, shown a token of `input_ids` as a converter-endpoint DSL model shows it: the noise-free
    state z = s e_x at the endpoint SNR s (`endpoint_snr`, default `snr_max`), `[MASK]` at z = 0. Its config says
    `endpoint_inputs="converter"`, so ReMDM "rescore" accepts it."""

    def __init__(self, oracle: HMMOracleDenoiser):
        super().__init__()
        self.oracle = oracle
        self.config = copy.deepcopy(oracle.config)
        self.config.endpoint_inputs = "converter"

    def token_directions(self) -> torch.Tensor:
        return self.oracle.token_directions()

    def forward(self, input_ids=None, noisy_states=None, attention_mask=None, endpoint_snr=None, logits_to_keep=0):
        if input_ids is not None:
            snr = self.config.snr_max if endpoint_snr is None else endpoint_snr
            is_token = (input_ids != self.config.mask_token_id)[..., None]
            directions = self.oracle.directions.float()[input_ids.clamp(max=self.config.vocab_size - 1)]
            noisy_states = snr * directions * is_token
        return self.oracle(noisy_states=noisy_states, attention_mask=attention_mask, logits_to_keep=logits_to_keep)


def build(preset: dict, direction_seed: int = 0):
    law = build_law(HMMLawConfig(**{name: preset[name] for name in LAW_FIELDS}))
    length = preset["length"]
    config = DSLConfig(
        vocab_size=preset["vocab_size"], embed_dim=preset["embed_dim"], max_position_embeddings=length,
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, cond_dim=16,
    )  # fmt: skip
    generator = torch.Generator().manual_seed(direction_seed)
    directions = torch.randn(preset["vocab_size"], preset["embed_dim"], generator=generator)
    oracle = HMMOracleDenoiser(law, config, directions / directions.norm(dim=-1, keepdim=True)).eval()
    return law, oracle


def cells(length: int, steps: list[int]) -> list[dict]:
    """(label, sampler name, knobs, which oracle, steps) for every cell."""
    out = []
    for T in steps:
        out += [
            dict(label="mdlm", sampler="mdlm", knobs=dict(num_steps=T), endpoint="hard", steps=T),
            dict(label="remdm-conf", sampler="remdm-conf", knobs=dict(num_steps=T), endpoint="hard", steps=T),
            dict(label="confidence-0.9", sampler="confidence", knobs=dict(num_steps=T, confidence_threshold=0.9),
                 endpoint="hard", steps=T),
            dict(label="confidence-budget", sampler="confidence",
                 knobs=dict(num_steps=T, confidence_rule="budget", tokens_per_step=math.ceil(length / T)),
                 endpoint="hard", steps=T),
        ]  # fmt: skip
        for s_hi in (100.0, 5.0):
            for strategy in ("conf", "rescore"):
                out.append(dict(label=f"remdm-{strategy}@s_hi={s_hi:g}", sampler=f"remdm-{strategy}",
                                knobs=dict(num_steps=T, s_hi=s_hi), endpoint="converter", steps=T))  # fmt: skip
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=None, help="Samples per cell and seed (1000; quick: 100).")
    parser.add_argument("--steps", type=int, nargs="+", default=None, help="Step budgets T (4 8 16; quick: 4 8).")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="Sampling seeds (0 1; quick: 0).")
    parser.add_argument("--entropy_samples", type=int, default=None, help="Law samples of the entropy (100k; 5k).")
    parser.add_argument("--output_dir", default=str(OUTPUT_DIR))
    parser.add_argument("--quick", action="store_true", help="A smoke run: the quick defaults above.")
    args = parser.parse_args(argv)
    defaults = dict(samples=100, steps=[4, 8], seeds=[0], entropy_samples=5000) if args.quick else dict(
        samples=1000, steps=[4, 8, 16], seeds=[0, 1], entropy_samples=100_000
    )
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.samples < 1 or any(steps < 1 for steps in args.steps):
        raise ValueError(f"--samples={args.samples} and --steps={args.steps} must be >= 1.")
    torch.set_num_threads(2)
    preset = PRESETS["full"]
    length = preset["length"]
    law, oracle = build(preset)
    models = {"hard": oracle, "converter": ConverterEndpointOracle(oracle).eval()}
    entropy = law.monte_carlo_entropy(length, args.entropy_samples, torch.Generator().manual_seed(10_000))
    exact_pairs = law.bigram_marginal(length)
    reference = score_samples(law, law.sample(args.samples, length, torch.Generator().manual_seed(1)),
                              entropy["entropy_per_token"], exact_pairs)  # fmt: skip
    rows = []
    for cell in cells(length, args.steps):
        for seed in args.seeds:
            sampler = get_sampler(cell["sampler"], **cell["knobs"])
            start = time.perf_counter()
            out = sampler.run(models[cell["endpoint"]], batch_size=args.samples, seq_len=length,
                              generator=torch.Generator().manual_seed(seed), progress_bar=False)  # fmt: skip
            scores = score_samples(law, out.sequences, entropy["entropy_per_token"], exact_pairs)
            rows.append({**{k: cell[k] for k in ("label", "sampler", "knobs", "endpoint", "steps")}, "seed": seed,
                         "nfe": out.nfe, "seconds": time.perf_counter() - start, **scores})  # fmt: skip
            print(f"{cell['label']:>24} T={cell['steps']:>2} seed={seed} nfe={out.nfe:>2} "
                  f"nll_excess={scores['nll_excess_mean']} impossible={scores['impossible_share']:.3f} "
                  f"bigram_kl={scores['bigram_kl']}", flush=True)  # fmt: skip
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    report = {
        "law": {name: preset[name] for name in (*LAW_FIELDS, "length")}, "entropy": entropy,
        "law_samples": reference, "samples_per_cell": args.samples, "seeds": args.seeds, "rows": rows,
    }  # fmt: skip
    (output_dir / "sampler_oracle.json").write_text(json.dumps(report, indent=1))
    (output_dir / "sampler_oracle.md").write_text(markdown(report))
    print(markdown(report))
    return 0


def _mean(rows, key):
    values = [row[key] for row in rows if row[key] is not None]
    return sum(values) / len(values) if values else None


def markdown(report: dict) -> str:
    rows = report["rows"]
    ref = report["law_samples"]
    lines = [
        "# Samplers on the known law's exact oracle", "",
        f"Law: the `full` preset's HMM, L = {report['law']['length']}, entropy "
        f"{report['entropy']['entropy_per_token']:.4f} nats/token. {report['samples_per_cell']} samples per cell and "
        f"seed, seeds {report['seeds']}; values are seed means (NFE: the mean of real calls).",
        f"Law samples themselves (the noise floor): NLL excess {ref['nll_excess_mean']:.4f}, bigram KL "
        f"{ref['bigram_kl']:.4f}, impossible 0.", "",
        "| sampler | oracle | T | NFE | NLL excess | impossible share | bigram KL |", "|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    seen = []
    for row in rows:
        key = (row["label"], row["steps"])
        if key in seen:
            continue
        seen.append(key)
        group = [r for r in rows if (r["label"], r["steps"]) == key]
        nll, kl = _mean(group, "nll_excess_mean"), _mean(group, "bigram_kl")
        lines.append(
            f"| {row['label']} | {row['endpoint']} | {row['steps']} | {_mean(group, 'nfe'):.1f} | "
            f"{'-' if nll is None else f'{nll:.4f}'} | {_mean(group, 'impossible_share'):.3f} | "
            f"{'-' if kl is None else f'{kl:.4f}'} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
