"""The hybrid sampler's defaults, chosen on the known law's exact oracle: a grid of hybrid settings against the
DSL-SDE (log-linear grid up to the model's snr_max) at every step budget T, with the exact denoiser, so every gap
is the sampler's own.

    python -m benchmarks.known_law.hybrid_sweep            # 11.7 min measured on 2 shared CPU cores
    python -m benchmarks.known_law.hybrid_sweep --quick    # a smoke run (seconds)

Stage 1 (coarse; 1,000 samples, seed 0): the SDE and every hybrid setting of the grid at T in {4, 8, 16, 32, 64}:
the continuous share of the steps (T_c = T // 2, round(3T / 4) or T - 1), snr_star (<= s_hi = snr_max = 100), the
commit rule (threshold 0.5 / 0.9, top 50%), commit_mode "evidence", discrete_strategy "mdlm", the log-linear grid
of the continuous phase. Then, for the best few, the log-normal grid of the continuous phase, and for the best one
commit_mode "sample" (to show its bias). A setting's score is its worst ratio over T of NLL excess to the SDE's at
the same T, samples and seed (lower is better); since the NLL excess counts only possible samples, a setting whose
share of impossible samples exceeds the SDE's by more than 0.01 at some T ranks after all that do not.
Stage 2 (2,000 samples, seeds 0 and 1): the SDE, the old defaults and the best few of stage 1. The chosen setting
is the best stage-2 finalist by the same rule on the two-seed means; it is "as good as the SDE" at
T when its mean is within the noise of the SDE's (the difference <= 2 sigma of the difference of the two-seed means,
sigma taken as the larger of the seed-to-seed spread and the samples' standard error).
Metrics (`metrics.score_samples`): NLL excess over the law's entropy per token (possible samples), the share of
impossible samples, the bigram KL. Writes hybrid_sweep.json, hybrid_sweep.md and nll_excess_vs_steps.png under
benchmarks/results/known-law/hybrid_sweep/.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from dsl_diffusion.pipelines.samplers import get_sampler

from .metrics import score_samples
from .run import PRESETS
from .sampler_oracle import LAW_FIELDS, build

OUTPUT_DIR = Path(__file__).resolve().parents[1] / "results" / "known-law" / "hybrid_sweep"
CONTINUOUS_SHARES = {"T/2": lambda T: T // 2, "3T/4": lambda T: round(0.75 * T), "T-1": lambda T: T - 1}
COMMIT_RULES = {
    "thr0.5": dict(commit_rule="threshold", commit_threshold=0.5),
    "thr0.9": dict(commit_rule="threshold", commit_threshold=0.9),
    "top50%": dict(commit_rule="top_fraction", commit_fraction=0.5),
}
OLD_DEFAULTS = dict(share="T/2", snr_star=10.0, commit="thr0.9", commit_mode="evidence", snr_schedule="log-linear")
SDE = "sde"
IMPOSSIBLE_TOLERANCE = 0.01  # absolute share of samples; about 3 binomial sigmas at 1,000 samples and a 1% rate


def setting_label(setting: dict) -> str:
    if setting == SDE:
        return "dsl-sde (log-linear)"
    return (f"hybrid T_c={setting['share']} s*={setting['snr_star']:g} {setting['commit']} {setting['commit_mode']} "
            f"{setting['snr_schedule']}")  # fmt: skip


def sampler_for(setting, steps: int):
    if setting == SDE:
        return get_sampler("dsl-sde", num_steps=steps, snr_schedule="log-linear")
    continuous_steps = min(max(CONTINUOUS_SHARES[setting["share"]](steps), 1), steps - 1)
    return get_sampler(
        "hybrid", num_steps=steps, continuous_steps=continuous_steps, snr_star=setting["snr_star"],
        commit_mode=setting["commit_mode"], snr_schedule=setting["snr_schedule"], discrete_strategy="mdlm",
        **COMMIT_RULES[setting["commit"]],
    )  # fmt: skip


class Bench:
    """The law, its oracle and its reference statistics; `run` scores one (setting, T, seed, samples) cell."""

    def __init__(self, entropy_samples: int):
        preset = PRESETS["full"]
        self.preset, self.length = preset, preset["length"]
        self.law, self.oracle = build(preset)
        self.entropy = self.law.monte_carlo_entropy(self.length, entropy_samples, torch.Generator().manual_seed(10_000))
        self.exact_pairs = self.law.bigram_marginal(self.length)

    def reference(self, samples: int) -> dict:
        tokens = self.law.sample(samples, self.length, torch.Generator().manual_seed(1))
        return score_samples(self.law, tokens, self.entropy["entropy_per_token"], self.exact_pairs)

    def run(self, setting, steps: int, seed: int, samples: int, stage: str) -> dict:
        start = time.perf_counter()
        out = sampler_for(setting, steps).run(self.oracle, batch_size=samples, seq_len=self.length,
                                              generator=torch.Generator().manual_seed(seed), progress_bar=False)  # fmt: skip
        scores = score_samples(self.law, out.sequences, self.entropy["entropy_per_token"], self.exact_pairs)
        row = {"stage": stage, "label": setting_label(setting), "setting": setting, "steps": steps, "seed": seed,
               "samples": samples, "nfe": out.nfe, "seconds": time.perf_counter() - start, **scores}  # fmt: skip
        print(f"[{stage}] {row['label']:>58} T={steps:>2} seed={seed} nfe={out.nfe:>2} "
              f"nll_excess={_fmt(scores['nll_excess_mean'])} impossible={scores['impossible_share']:.3f} "
              f"bigram_kl={_fmt(scores['bigram_kl'])} ({row['seconds']:.1f}s)", flush=True)  # fmt: skip
        return row


def _fmt(value, digits=4):
    return "-" if value is None else f"{value:.{digits}f}"


def seed_means(rows: list[dict], label: str, steps: int) -> dict:
    """Mean over seeds of each metric for (label, T), with the seed-to-seed spread (max - min) of the NLL excess
    and the standard error of the mean NLL excess over all samples of all seeds."""
    group = [r for r in rows if r["label"] == label and r["steps"] == steps]
    out = {"seeds": [r["seed"] for r in group], "nfe": sum(r["nfe"] for r in group) / len(group)}
    for key in ("nll_excess_mean", "impossible_share", "bigram_kl"):
        values = [r[key] for r in group if r[key] is not None]
        out[key] = sum(values) / len(values) if values else None
        out[f"{key}_spread"] = max(values) - min(values) if len(values) > 1 else None
    errors = [r["nll_standard_error"] for r in group if r["nll_standard_error"] is not None]
    out["nll_excess_standard_error"] = math.sqrt(sum(e * e for e in errors)) / len(errors) if errors else None
    return out


def worst_ratio(rows: list[dict], label: str, steps: list[int]) -> float:
    """max over T of (NLL excess of `label`) / (NLL excess of the SDE), seed means of the same rows' seeds."""
    ratios = []
    for T in steps:
        mine, sde = seed_means(rows, label, T)["nll_excess_mean"], seed_means(rows, setting_label(SDE), T)["nll_excess_mean"]
        ratios.append(math.inf if mine is None or sde is None or sde <= 0 else mine / sde)
    return max(ratios)


def impossible_excess(rows: list[dict], label: str, steps: list[int]) -> float:
    """max over T of (impossible share of `label`) - (the SDE's), seed means of the same rows' seeds."""
    sde = setting_label(SDE)
    return max(seed_means(rows, label, T)["impossible_share"] - seed_means(rows, sde, T)["impossible_share"] for T in steps)


def rank_key(rows: list[dict], label: str, steps: list[int]) -> tuple[bool, float]:
    """The ranking rule: the NLL excess counts only possible samples, so a setting that makes more impossible
    samples than the SDE (by more than IMPOSSIBLE_TOLERANCE at some T) ranks after every one that does not; within
    each group, the lower worst ratio of NLL excess to the SDE's wins."""
    return impossible_excess(rows, label, steps) > IMPOSSIBLE_TOLERANCE, worst_ratio(rows, label, steps)


def noise_sigma(stats: dict) -> float:
    """One sigma of a two-seed mean NLL excess: the larger of the seed-to-seed estimate (spread / 2 for two seeds)
    and the standard error over all its samples."""
    spread = stats["nll_excess_mean_spread"]
    seed_sigma = spread / math.sqrt(2 * (len(stats["seeds"]) - 1)) if spread is not None else 0.0
    return max(seed_sigma, stats["nll_excess_standard_error"] or 0.0)


def stage1_grid(quick: bool) -> list[dict]:
    shares, stars, commits = (["T/2", "T-1"], [5.0, 20.0], ["thr0.9"]) if quick else (
        list(CONTINUOUS_SHARES), [5.0, 10.0, 20.0, 50.0, 100.0], list(COMMIT_RULES))
    return [dict(share=share, snr_star=star, commit=commit, commit_mode="evidence", snr_schedule="log-linear")
            for share in shares for star in stars for commit in commits]  # fmt: skip


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, nargs="+", default=None, help="Step budgets T (4 8 16 32 64; quick: 4 8).")
    parser.add_argument("--coarse_samples", type=int, default=None, help="Stage-1 samples (1000; quick: 64).")
    parser.add_argument("--final_samples", type=int, default=None, help="Stage-2 samples per seed (2000; quick: 64).")
    parser.add_argument("--final_seeds", type=int, nargs="+", default=None, help="Stage-2 seeds (0 1).")
    parser.add_argument("--lognormal_top", type=int, default=None, help="Stage-1 best settings rerun log-normal (3; 1).")
    parser.add_argument("--final_top", type=int, default=None, help="Stage-1 best settings taken to stage 2 (3; 1).")
    parser.add_argument("--entropy_samples", type=int, default=None, help="Law samples of the entropy (100k; 5k).")
    parser.add_argument("--output_dir", default=str(OUTPUT_DIR))
    parser.add_argument("--quick", action="store_true", help="A smoke run: the quick defaults above, a 4-point grid.")
    args = parser.parse_args(argv)
    defaults = dict(steps=[4, 8], coarse_samples=64, final_samples=64, final_seeds=[0, 1], lognormal_top=1,
                    final_top=1, entropy_samples=5000) if args.quick else dict(
        steps=[4, 8, 16, 32, 64], coarse_samples=1000, final_samples=2000, final_seeds=[0, 1], lognormal_top=3,
        final_top=3, entropy_samples=100_000)  # fmt: skip
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if min(args.steps) < 2:
        raise ValueError(f"--steps={args.steps}: every T must be >= 2 (the hybrid needs a continuous and a discrete step).")
    if min(args.coarse_samples, args.final_samples, args.lognormal_top, args.final_top) < 1:
        raise ValueError("--coarse_samples, --final_samples, --lognormal_top and --final_top must be >= 1.")
    torch.set_num_threads(2)
    started = time.perf_counter()
    bench = Bench(args.entropy_samples)
    steps = sorted(args.steps)

    # Stage 1: the coarse grid, then the log-normal continuous grid for the best few and "sample" for the best.
    coarse = []
    grid = stage1_grid(args.quick)
    for setting in [SDE, *grid]:
        coarse += [bench.run(setting, T, 0, args.coarse_samples, "coarse") for T in steps]
    ranked = sorted(grid, key=lambda s: rank_key(coarse, setting_label(s), steps))
    variants = [{**s, "snr_schedule": "log-normal"} for s in ranked[: args.lognormal_top]]
    variants.append({**ranked[0], "commit_mode": "sample"})
    for setting in variants:
        coarse += [bench.run(setting, T, 0, args.coarse_samples, "coarse") for T in steps]
    evidence = grid + variants[:-1]  # the "sample" row shows a bias; it is not a candidate
    ranked = sorted(evidence, key=lambda s: rank_key(coarse, setting_label(s), steps))
    coarse_ranking = [{"label": setting_label(s), "setting": s, "worst_ratio": worst_ratio(coarse, setting_label(s), steps),
                       "impossible_excess": impossible_excess(coarse, setting_label(s), steps)}
                      for s in [*evidence, variants[-1]]]  # fmt: skip
    coarse_ranking.sort(key=lambda entry: (entry["impossible_excess"] > IMPOSSIBLE_TOLERANCE, entry["worst_ratio"]))

    # Stage 2: the SDE, the old defaults and the best few, more samples and two seeds.
    finalists = ranked[: args.final_top]
    if OLD_DEFAULTS not in finalists:
        finalists = [*finalists, OLD_DEFAULTS]
    final = []
    for setting in [SDE, *finalists]:
        final += [bench.run(setting, T, seed, args.final_samples, "final") for T in steps for seed in args.final_seeds]
    candidates = [s for s in finalists if s in ranked[: args.final_top]]
    chosen = min(candidates, key=lambda s: rank_key(final, setting_label(s), steps))
    table = {setting_label(s): {str(T): seed_means(final, setting_label(s), T) for T in steps} for s in [SDE, *finalists]}
    verdict = {}
    for setting in finalists:
        label = setting_label(setting)
        per_T = {}
        for T in steps:
            mine, sde = table[label][str(T)], table[setting_label(SDE)][str(T)]
            difference = mine["nll_excess_mean"] - sde["nll_excess_mean"]
            noise = 2 * math.hypot(noise_sigma(mine), noise_sigma(sde))
            per_T[str(T)] = {"difference": difference, "two_sigma": noise, "as_good_as_sde": difference <= noise}
        verdict[label] = {"worst_ratio": worst_ratio(final, label, steps), "per_T": per_T,
                          "impossible_excess": impossible_excess(final, label, steps),
                          "as_good_as_sde_everywhere": all(v["as_good_as_sde"] for v in per_T.values())}  # fmt: skip
    old = table[setting_label(OLD_DEFAULTS)]
    chosen_label = setting_label(chosen)
    beats_old = all(table[chosen_label][str(T)]["nll_excess_mean"] <= old[str(T)]["nll_excess_mean"] for T in steps)

    report = {
        "law": {name: bench.preset[name] for name in (*LAW_FIELDS, "length")}, "entropy": bench.entropy,
        "law_samples": bench.reference(args.final_samples), "steps": steps, "coarse_samples": args.coarse_samples,
        "final_samples": args.final_samples, "final_seeds": args.final_seeds, "quick": args.quick,
        "grid": grid, "variants": variants, "coarse_ranking": coarse_ranking, "finalists": finalists, "candidates": candidates,
        "old_defaults": OLD_DEFAULTS, "chosen": chosen, "chosen_label": chosen_label,
        "chosen_beats_old_defaults_everywhere": beats_old, "verdict": verdict, "final_table": table,
        "coarse_rows": coarse, "final_rows": final, "wall_seconds": time.perf_counter() - started,
    }  # fmt: skip
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "hybrid_sweep.json").write_text(json.dumps(report, indent=1))
    (output_dir / "hybrid_sweep.md").write_text(markdown(report))
    plot(report, output_dir / "nll_excess_vs_steps.png")
    print(markdown(report))
    return 0


def markdown(report: dict) -> str:
    steps, table = report["steps"], report["final_table"]
    ref = report["law_samples"]
    sde = setting_label(SDE)
    lines = [
        "# The hybrid sampler's defaults on the known law's exact oracle", "",
        f"Law: the `full` preset's HMM, L = {report['law']['length']}, entropy "
        f"{report['entropy']['entropy_per_token']:.4f} nats/token. Law samples themselves (the floor): NLL excess "
        f"{ref['nll_excess_mean']:.4f}, bigram KL {ref['bigram_kl']:.4f}. Wall time {report['wall_seconds'] / 60:.1f} min.",
        "",
        f"Chosen: **{report['chosen_label']}** (the ranking rule: among the stage-2 finalists whose impossible "
        f"share exceeds the SDE's by at most {IMPOSSIBLE_TOLERANCE} at every T, the lowest worst ratio over T of NLL "
        f"excess to the SDE's); as good as the SDE at every T within the noise: "
        f"{report['verdict'][report['chosen_label']]['as_good_as_sde_everywhere']}; better than the old defaults at "
        f"every T: {report['chosen_beats_old_defaults_everywhere']}.", "",
        f"## Stage 2: {report['final_samples']} samples x seeds {report['final_seeds']} (mean ± seed spread max - min)",
        "", "| sampler | T | NFE | NLL excess | impossible share | bigram KL | vs SDE (2 sigma) |",
        "|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for label, per_T in table.items():
        for T in steps:
            stats = per_T[str(T)]
            versus = "" if label == sde else (
                f"{report['verdict'][label]['per_T'][str(T)]['difference']:+.4f} "
                f"({report['verdict'][label]['per_T'][str(T)]['two_sigma']:.4f})")  # fmt: skip
            lines.append(
                f"| {label} | {T} | {stats['nfe']:.1f} | {_fmt(stats['nll_excess_mean'])} ± "
                f"{_fmt(stats['nll_excess_mean_spread'])} | {stats['impossible_share']:.4f} ± "
                f"{_fmt(stats['impossible_share_spread'])} | {_fmt(stats['bigram_kl'])} ± "
                f"{_fmt(stats['bigram_kl_spread'])} | {versus} |"
            )
    lines += ["", "Worst ratio over T of NLL excess to the SDE (stage 2): " + ", ".join(
        f"{label}: {entry['worst_ratio']:.3f} (impossible share above the SDE's by at most "
        f"{entry['impossible_excess']:+.4f})" for label, entry in report["verdict"].items()), ""]  # fmt: skip
    lines += [f"## Stage 1: {report['coarse_samples']} samples, seed 0, NLL excess (worst ratio to the SDE)", "",
              "| setting | worst ratio | " + " | ".join(f"T = {T}" for T in steps) + " | max impossible excess |",
              "|---|---|" + "---|" * len(steps) + "---|"]  # fmt: skip
    coarse = report["coarse_rows"]
    for entry in [{"label": sde, "worst_ratio": 1.0, "impossible_excess": 0.0}, *report["coarse_ranking"]]:
        values = [seed_means(coarse, entry["label"], T)["nll_excess_mean"] for T in steps]
        lines.append(f"| {entry['label']} | {entry['worst_ratio']:.3f} | " + " | ".join(_fmt(v) for v in values)
                     + f" | {entry['impossible_excess']:+.4f} |")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    steps, table = report["steps"], report["final_table"]
    figure = Figure(figsize=(6.4, 4.6), layout="constrained")
    ax = figure.subplots()
    old = setting_label(OLD_DEFAULTS)
    for label, per_T in table.items():
        values = [math.nan if per_T[str(T)]["nll_excess_mean"] is None else per_T[str(T)]["nll_excess_mean"] for T in steps]
        spreads = [per_T[str(T)]["nll_excess_mean_spread"] or 0.0 for T in steps]
        name = label + (" (chosen)" if label == report["chosen_label"] else " (old defaults)" if label == old else "")
        style = dict(linewidth=2.4) if label in (report["chosen_label"], setting_label(SDE)) else dict(linewidth=1.0)
        ax.errorbar(steps, values, yerr=[s / 2 for s in spreads], marker="o", capsize=2, label=name, **style)
    ax.set_xscale("log", base=2)
    every = [stats["nll_excess_mean"] for per_T in table.values() for stats in per_T.values()]
    if all(value is not None and value > 0 for value in every):
        ax.set_yscale("log")
    ax.set_xlabel("step budget T")
    ax.set_ylabel("NLL excess over the law's entropy, nats/token")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=6)
    figure.suptitle("Hybrid vs DSL-SDE on the known law's exact oracle", fontsize=11)
    ax.set_title(f"{report['final_samples']} samples x seeds {report['final_seeds']}; bars: half the seed spread", fontsize=7)
    figure.savefig(path, dpi=130)


if __name__ == "__main__":
    raise SystemExit(main())
