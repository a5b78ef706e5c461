"""Text renderings of a sweep report (the dict that ``dsl-evaluate`` writes to ``sweep_results.json``): the protocol
lines that name the featurizer, judge, sample counts and seeds, and the Markdown results table. Kept free of heavy
imports so that model cards can use it."""

from __future__ import annotations

from typing import Sequence


__all__ = ["protocol_lines", "protocol_caption", "results_table", "render_markdown"]


def protocol_lines(report: dict) -> list[str]:
    """Markdown bullet lines naming everything the numbers depend on."""
    mauve, judge, generation = report["mauve_settings"], report["judge"], report["generation"]
    featurizer = mauve["featurizer"]
    references = report["references"]
    gguf = f" (`{judge['gguf_file']}`)" if judge.get("gguf_file") else ""
    return [
        f"- MAUVE: featurizer `{featurizer['name_or_path']}` ({featurizer['pooling']} pooling, texts truncated at "
        f"{featurizer['effective_max_text_length']} tokens), {references['num_references']} references "
        f"(`{references['source']}`, {references['split']} split, {references['format']} format) against "
        f"{generation['num_samples']} samples per cell; buckets {mauve['num_buckets_setting']} "
        f"({mauve['num_buckets']}), PCA variance {mauve['kmeans_explained_var']}, scaling factor "
        f"{mauve['mauve_scaling_factor']}, k-means seeds {mauve['seeds']} (mean +- std over seeds).",
        f"- Gen PPL: judge `{judge['name_or_path']}`{gguf}, texts retokenized and truncated at "
        f"{report['judge_max_length']} tokens, all non-EOS tokens plus the first EOS counted, corpus-level.",
        f"- Sampling: top-p {generation['top_p']}, {generation['batch_size']} sample(s) per sampler call, sample i "
        f"of a cell drawn with seed {generation['seed']} + i, {generation['seq_len']} tokens per sample. Entropy: "
        "mean unigram entropy (nats) of the raw token ids.",
    ]


def protocol_caption(report: dict) -> str:
    """One short line for plots: featurizer, judge, sample counts and seeds."""
    mauve, generation = report["mauve_settings"], report["generation"]
    return (
        f"MAUVE: {mauve['featurizer']['name_or_path']} features, {report['references']['num_references']} refs vs "
        f"{generation['num_samples']} samples/cell, k-means seeds {mauve['seeds']}; Gen PPL judge: "
        f"{report['judge']['name_or_path']}; sampling seed {generation['seed']}, top-p {generation['top_p']}"
    )


def results_table(rows: Sequence[dict], references: dict | None = None) -> str:
    """The Markdown table of sweep rows (and the references' own Gen PPL and entropy as the last row)."""
    lines = [
        "| checkpoint | sampler | T | NFE | MAUVE | Frechet dist. | Gen PPL | entropy | samples |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['checkpoint']} | {row['sampler']} | {row['num_steps']} | {row['nfe']:.1f} | "
            f"{row['mauve']:.4f} +- {row['mauve_std']:.4f} | {row['frechet_distance']:.4g} | {row['gen_ppl']:.2f} | "
            f"{row['entropy']:.3f} | {row['num_samples']} |"
        )
    if references is not None:
        lines.append(
            f"| references (data) | - | - | - | - | - | {references['gen_ppl']:.2f} | {references['entropy']:.3f} | "
            f"{references['num_references']} |"
        )
    return "\n".join(lines)


def render_markdown(report: dict) -> str:
    """The sweep's Markdown report: protocol lines, the results table and the NFE comparison."""
    lines = [
        "# DSL step-budget sweep",
        "",
        *protocol_lines(report),
        "",
        results_table(report["rows"], report["references"]),
    ]
    comparison = report.get("nfe_comparison")
    if comparison:
        lines += [
            "",
            "## NFE needed to reach the baseline's MAUVE",
            "",
            f"Baseline `{comparison['baseline']}`, candidate `{comparison['candidate']}`: MAUVE interpolated linearly "
            "in log-NFE between measured points; nothing is extrapolated. "
            + noise_floor_sentence(comparison.get("noise_floor")),
            "",
        ]
        lines += [f"- {point['description']}" for point in comparison["points"]]
    return "\n".join(lines) + "\n"


def noise_floor_sentence(floor: dict | None) -> str:
    """How a table's noise floor was measured, for the line above it (a ``NoiseFloor.to_dict()``)."""
    if not floor or not floor["measured"]:
        return "The noise floor was not measured (one seed, no estimator spread): ratios are not checked against noise."
    parts = []
    if floor["seed_spread"] is not None:
        parts.append(f"seed-to-seed spread {floor['seed_spread']:.4g}")
    if floor["estimator_spread"] is not None:
        parts.append(f"2 x the estimator's std (k-means seeds) {floor['estimator_spread']:.4g}")
    return (
        f"A ratio is given only where the two curves differ by more than the noise floor {floor['value']:.4g} "
        f"(the larger of {' and '.join(parts)}); elsewhere: no separation."
    )
