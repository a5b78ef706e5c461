"""Model cards for DSL checkpoints, rendered with ``huggingface_hub.ModelCard`` / ``ModelCardData``.

The card's YAML header carries ``library_name``, ``pipeline_tag``, ``base_model``, ``datasets``, ``license``, ``tags``
and, when a sweep report (``sweep_results.json`` of ``dsl-evaluate``) is given, one ``model-index`` eval result per
metric and sweep cell (``EvalResult``: MAUVE, Gen PPL, unigram entropy and NFE for every sampler and step budget).
The body (``templates/model_card.md``, Jinja2) explains the model, shows how to load it with ``AutoModel`` and
``trust_remote_code=True`` and how to call the sampling pipeline with its sampler defaults, lists the training
details, and repeats the sweep's protocol, table and plots.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Sequence

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from ..evaluation.report import protocol_lines, results_table
from ..modeling_dsl.generation_dsl import DSLGenerationConfig
from ..pipelines.samplers import SAMPLERS


__all__ = [
    "PIPELINE_TASK",
    "DEFAULT_TAGS",
    "TEMPLATE_PATH",
    "sampler_defaults",
    "eval_results_from_sweep",
    "build_model_card",
]

PIPELINE_TASK = "diffusion-text-generation"
DEFAULT_TAGS = ["dsl", "discrete-stochastic-localization", "masked-diffusion", "diffusion-language-model", "mdlm"]
TEMPLATE_PATH = Path(__file__).resolve().parent / "templates" / "model_card.md"
KNOWN_DATASET_NAMES = {"Skylion007/openwebtext": "OpenWebText", "openwebtext": "OpenWebText"}

# (metric type on the Hub, display name, key of a sweep row)
SWEEP_METRICS = (
    ("mauve", "MAUVE", "mauve"),
    ("perplexity", "Gen PPL", "gen_ppl"),
    ("entropy", "Unigram entropy", "entropy"),
    ("nfe", "NFE", "nfe"),
)


def sampler_defaults() -> dict[str, dict]:
    """``{sampler: {knob: default}}`` read from the sampler configs of :mod:`dsl_diffusion.pipelines.samplers`."""
    defaults = {}
    for name, sampler_class in SAMPLERS.items():
        knobs = {}
        for knob in dataclasses.fields(sampler_class.config_class):
            if knob.default is not dataclasses.MISSING:
                knobs[knob.name] = knob.default
            elif knob.default_factory is not dataclasses.MISSING:
                knobs[knob.name] = knob.default_factory()
        defaults[name] = knobs
    return defaults


def _rows_for_checkpoint(report: dict, checkpoint: str | None) -> list[dict]:
    rows = report["rows"]
    labels = sorted({row["checkpoint"] for row in rows})
    if checkpoint is None:
        if len(labels) > 1:
            raise ValueError(f"The sweep report holds several checkpoints {labels}: say which one the card is for")
        return rows
    selected = [row for row in rows if row["checkpoint"] == checkpoint]
    if not selected:
        raise ValueError(f"Checkpoint {checkpoint!r} is not in the sweep report; its checkpoints are {labels}")
    return selected


def _dataset_identity(source: str) -> tuple[str, str]:
    """(dataset_type, dataset_name) for the model-index: a Hub id as it is, a local path by its file name."""
    if Path(source).exists():
        name = Path(source).name
        return name, name
    return source, KNOWN_DATASET_NAMES.get(source, source)


def eval_results_from_sweep(report: dict, checkpoint: str | None = None) -> list[EvalResult]:
    """One ``EvalResult`` per metric and sweep cell of ``checkpoint`` (the only one if None).

    Each result names its cell in ``metric_name`` (``"MAUVE (remdm, T=128)"``) and ``metric_config``
    (``"remdm-T128"``) and records in ``metric_args`` the sampler, step budget, NFE, sample counts, and the
    featurizer / judge and seeds the value depends on.
    """
    references = report["references"]
    mauve_settings, judge = report["mauve_settings"], report["judge"]
    dataset_type, dataset_name = _dataset_identity(references["source"])
    results = []
    for row in _rows_for_checkpoint(report, checkpoint):
        cell_args = {
            "sampler": row["sampler"],
            "num_steps": row["num_steps"],
            "nfe": round(float(row["nfe"]), 3),
            "num_samples": row["num_samples"],
            "seed": report["generation"]["seed"],
            "top_p": report["generation"]["top_p"],
        }
        for metric_type, display_name, key in SWEEP_METRICS:
            if row.get(key) is None:
                continue
            metric_args = dict(cell_args)
            if metric_type == "mauve":
                metric_args.update(
                    featurizer=mauve_settings["featurizer"]["name_or_path"],
                    num_references=references["num_references"],
                    kmeans_seeds=list(mauve_settings["seeds"]),
                    mauve_scaling_factor=mauve_settings["mauve_scaling_factor"],
                    mauve_std=round(float(row["mauve_std"]), 6),
                )
            elif metric_type == "perplexity":
                metric_args.update(judge=judge["name_or_path"], max_length=report["judge_max_length"])
            results.append(
                EvalResult(
                    task_type="text-generation",
                    task_name="Unconditional text generation",
                    dataset_type=dataset_type,
                    dataset_name=dataset_name,
                    dataset_split=references["split"],
                    metric_type=metric_type,
                    metric_value=round(float(row[key]), 6),
                    metric_name=f"{display_name} ({row['sampler']}, T={row['num_steps']})",
                    metric_config=f"{row['sampler']}-T{row['num_steps']}",
                    metric_args=metric_args,
                )
            )
    return results


def _markdown_value(value) -> str:
    text = json.dumps(value) if isinstance(value, (dict, list, tuple)) else str(value)
    return text.replace("|", "\\|")


def build_model_card(
    model_name: str,
    repo_id: str,
    *,
    base_model: str | None = "kuleshov-group/mdlm-owt",
    datasets: Sequence[str] = ("Skylion007/openwebtext",),
    license: str = "apache-2.0",
    language: str | None = "en",
    tags: Sequence[str] = (),
    summary: str | None = None,
    architecture: str | None = None,
    generation_config: dict | None = None,
    sampler_defaults_table: dict[str, dict] | None = None,
    training_details: dict | None = None,
    sweep_report: dict | None = None,
    sweep_checkpoint: str | None = None,
    plot_paths: dict[str, str] | None = None,
    sweep_results_file: str = "evaluation/sweep_results.json",
) -> ModelCard:
    """Render the model card of a DSL checkpoint.

    Args:
        model_name: the name in the card title and the ``model-index``.
        repo_id: the Hub repository the usage snippet loads.
        generation_config: the model's generation defaults (``DSLGenerationConfig.to_diff_dict()``; default: the
            published ones), shown as stored in ``generation_config.json`` and used in the snippet.
        sampler_defaults_table: ``{sampler: {knob: default}}`` (default: :func:`sampler_defaults`).
        training_details: ``{setting: value}`` shown as a table (e.g. the fine-tuning arguments).
        sweep_report: the ``sweep_results.json`` dict of ``dsl-evaluate``; its rows of ``sweep_checkpoint`` become
            the ``model-index`` eval results and the evaluation table.
        plot_paths: ``{"mauve": "evaluation/mauve_vs_nfe.png", ...}``, paths relative to the repository root.
    """
    eval_results = eval_results_from_sweep(sweep_report, sweep_checkpoint) if sweep_report else None
    card_data = ModelCardData(
        model_name=model_name,
        base_model=base_model,
        datasets=list(datasets) or None,
        license=license,
        language=language,
        library_name="transformers",
        # Not "text-generation": the Hub's widget and the stock TextGenerationPipeline would call an autoregressive
        # generate. The model ships its own pipeline ("diffusion-text-generation", remote code), which no Hub tag names.
        pipeline_tag="other",
        tags=list(dict.fromkeys([*DEFAULT_TAGS, *tags])),
        metrics=["mauve", "perplexity"] if eval_results else None,
        eval_results=eval_results,
    )
    defaults = sampler_defaults() if sampler_defaults_table is None else sampler_defaults_table
    if generation_config is None:
        generation_config = DSLGenerationConfig.published_defaults().to_diff_dict()
    generation_config = {key: value for key, value in generation_config.items() if key != "transformers_version"}
    evaluation_table = evaluation_protocol = None
    if sweep_report:
        rows = _rows_for_checkpoint(sweep_report, sweep_checkpoint)
        others = [row for row in sweep_report["rows"] if row not in rows]
        evaluation_table = results_table(rows + others, sweep_report["references"])
        evaluation_protocol = "\n".join(protocol_lines(sweep_report))
    titles = {"mauve": "MAUVE against NFE", "gen_ppl": "Gen PPL against NFE"}
    plots = [{"title": titles.get(key, key), "path": path} for key, path in (plot_paths or {}).items()]
    return ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATE_PATH),
        model_name=model_name,
        repo_id=repo_id,
        summary=summary
        or f"`{model_name}` is a DSL text diffusion model: it generates text by progressively localizing every token "
        "from noise, with samplers that trade quality against the number of denoiser calls (NFE).",
        architecture=architecture or "DiT backbone (bidirectional transformer with adaLN) with a DSL input converter.",
        base_model_line=f"[{base_model}](https://huggingface.co/{base_model})"
        if base_model
        else "trained from scratch",
        license=license,
        pipeline_task=PIPELINE_TASK,
        default_sampler=generation_config.get("sampler") or DSLGenerationConfig.default_generation_params()["sampler"],
        default_num_steps=generation_config.get("num_steps", 128),
        generation_config=json.dumps(generation_config, indent=2, sort_keys=True),
        generation_config_file="generation_config.json",
        sampler_defaults={name: _markdown_value(knobs) for name, knobs in defaults.items()},
        training_details={key: _markdown_value(value) for key, value in (training_details or {}).items()},
        evaluation_table=evaluation_table,
        evaluation_protocol=evaluation_protocol,
        plots=plots,
        sweep_results_file=sweep_results_file,
    )
